# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""ESP-DL integer kernels (NWC / NHWC, batch 1). Twin: espstream/kernels/reference.py.

Low-level entry points: arguments arrive checked and resolved by `espstream.kernels` (shapes,
window geometry, dtypes, C-contiguity); call those public wrappers, not these. All data is
`[H, W, C]` (1-D uses H = 1). Inner loops run on raw pointers without the GIL.

Conv (`Conv`, one object per layer and input shape): the weights are widened to int16, packed
and the bias / rounding constants derived once, when the object is made; a call widens the data
to int16, so the inner dot products are int16 x int16 -> int32 products accumulated in int32 for
int8 data (the caller guarantees no overflow) and in int64 for int16 data. Weights are
`[C_out, kH * kW * C_in/g]`. Taps adjacent in both the input and the weights (the whole kernel
row when groups == 1 and the horizontal dilation is 1) merge into one contiguous run;
neighbouring output pixels with the same taps share each weight load (no im2col). The int32
(int8 data) loops live in `_hot.h`, built for AVX2 and baseline x86-64 and picked at load time
(plain C elsewhere): with groups == 1 (an odd C_in widened by a zero channel) the weights are
packed in input-channel pairs and every output channel of up to four pixels is summed at once in
vector lanes (AVX-512 VNNI `_vnni`, else two pixels with AVX2 / SSE2 `_bcast`); interior columns
reuse one row's taps. Otherwise four output channels share each input load (8 dot products per
pass). Depthwise convs (groups == C_in == C_out) take weights as `[kH * kW, C]` and loop over
channels; int8 ones with the int32 requantize and AVX-512 VNNI run `esp_dw2_vnni` instead (the
whole image from the int8 data, no widened copy: two column taps per int16 pair, 32 channels
and up to 8 output columns at once, requantized in registers). Requantization: int8 sums with every shift in [1, 31] (per channel or not, either
rounding) in one vectorised int32 pass per pixel (`esp_rq32_i8`), the half-up constant folded
into the bias; the general int64 path otherwise.

Also here: pools, RequantizeLinear and saturating Add / Sub in one pass, StreamingCache's step
(three memcpy's), the GRU / LSTM time loop (`Rnn`; its rules: espstream/ops/recurrent.py)
and LayerNormalization's rows (`layernorm`; its rules: espstream/ops/norm.py).
"""

from libc.stddef cimport ptrdiff_t
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cimport numpy as cnp
import numpy as np

cnp.import_array()


cdef extern from "_hot.h" nogil:
    # The int32 inner loops, compiled for AVX2 and baseline x86-64 where the compiler can
    # pick at load time (see the header).
    void esp_pair4(const int16_t* X, ptrdiff_t step, const int16_t* w, ptrdiff_t K,
                   const ptrdiff_t* rx, const ptrdiff_t* rw, const ptrdiff_t* rn, ptrdiff_t nr,
                   int32_t* acc)
    int32_t esp_dot1(const int16_t* X, const int16_t* w, const ptrdiff_t* rx,
                     const ptrdiff_t* rw, const ptrdiff_t* rn, ptrdiff_t nr)
    void esp_rq32_i8(const int32_t* acc, const int32_t* p, int32_t even, int32_t lo,
                     int32_t hi, int8_t* y, ptrdiff_t n)
    void esp_dw_pixel(const int16_t* X, const int16_t* w, const ptrdiff_t* xo,
                      const ptrdiff_t* wo, ptrdiff_t nt, ptrdiff_t C, int32_t* acc)
    # All output channels of one or two pixels (groups == 1, even C_in), packed weights.
    enum: ESP_BC_BLOCK
    ctypedef void (*esp_bcast_fn)(const int16_t* X, ptrdiff_t step, const int16_t* wp,
                                  ptrdiff_t cout, ptrdiff_t cp, const ptrdiff_t* rx,
                                  const ptrdiff_t* rw, const ptrdiff_t* rn, ptrdiff_t nr,
                                  int32_t* y1, int32_t* y2)
    void esp_pack_pairs(const int16_t* w, ptrdiff_t cout, ptrdiff_t K, ptrdiff_t cp,
                        int16_t* wp)
    esp_bcast_fn esp_bcast_pick()
    int32_t esp_madd_probe(int64_t n)
    int32_t esp_dpwssd_probe(int64_t n)
    # Depthwise int32 sums of one pixel: AVX2 (even / odd packed weights) or plain C.
    ctypedef void (*esp_dw_fn)(const int16_t* X, const int16_t* w, const int16_t* wp,
                               ptrdiff_t T, const ptrdiff_t* xo, const ptrdiff_t* wo,
                               ptrdiff_t nt, ptrdiff_t C, int32_t* acc)
    void esp_dw_pack(const int16_t* w, ptrdiff_t T, ptrdiff_t C, int16_t* wp)
    esp_dw_fn esp_dw_pick()
    # Up to four pixels' output channels at once with AVX-512 VNNI (NULL without it).
    ctypedef void (*esp_vnni_fn)(const int16_t* X, ptrdiff_t step, ptrdiff_t npix,
                                 const int16_t* wp, ptrdiff_t cout, ptrdiff_t cp,
                                 const ptrdiff_t* rx, const ptrdiff_t* rw, const ptrdiff_t* rn,
                                 ptrdiff_t nr, int32_t* y0, int32_t* y1, int32_t* y2,
                                 int32_t* y3)
    esp_vnni_fn esp_vnni_pick()
    # Depthwise int8, whole image: two column taps per vpdpwssd lane, 32-channel blocks,
    # requantized in registers (AVX-512 VNNI; NULL without it).
    ctypedef void (*esp_dw2_fn)(const int8_t* x, ptrdiff_t H, ptrdiff_t W, ptrdiff_t C,
                                ptrdiff_t KH, ptrdiff_t KW, ptrdiff_t sh, ptrdiff_t sw,
                                ptrdiff_t dh, ptrdiff_t dw, ptrdiff_t pt, ptrdiff_t pl,
                                ptrdiff_t OH, ptrdiff_t OW, const int32_t* wq,
                                const int32_t* rq, int32_t even, int32_t lo, int32_t hi,
                                int8_t* Y, int32_t* P)
    esp_dw2_fn esp_dw2_pick()
    enum: ESP_DW2_TAPS
    ptrdiff_t esp_dw2_wp(ptrdiff_t OW, ptrdiff_t sw, ptrdiff_t KW, ptrdiff_t dw)
    ptrdiff_t esp_dw2_ch(ptrdiff_t k)
    void esp_dw2_pack(const int16_t* w, ptrdiff_t KH, ptrdiff_t KW, ptrdiff_t C, int32_t* wq)
    # GRU / LSTM time loop (recurrent.py's rnn_forward in C).
    ctypedef struct esp_rnn_args:
        int lstm, dirs, p4, pie_w, pie_r
        ptrdiff_t H, nin, seq
        const int32_t* w[2]
        const int32_t* r[2]
        const int64_t* wb[2]
        const int64_t* rb[2]
        const int16_t* wp[2]
        const int16_t* rp[2]
        ptrdiff_t cp, nin2, H2
        esp_vnni_fn vnni
        esp_bcast_fn bc
        int narrow
        int vec
        int w_shift, r_shift
        const float* sig
        const float* tnh
        int64_t sig_qmin, sig_qmax, tnh_qmin, tnh_qmax
        float resc_y, resc_c
        int64_t lo, hi
    void esp_rnn(const esp_rnn_args* a, const int64_t* x, const int64_t* h0, const int64_t* c0,
                 int64_t* y, int64_t* yh, int64_t* yc, int64_t* scratch, int16_t* scratch16)
    int esp_rnn_avx2()
    # Flat elementwise loops (saturating add / sub, requantize with int32 intermediates).
    void esp_addsub_i8(const int8_t* a, const int8_t* b, int8_t* y, ptrdiff_t n, int sub,
                       int16_t lo, int16_t hi)
    void esp_addsub_i16(const int16_t* a, const int16_t* b, int16_t* y, ptrdiff_t n, int sub,
                        int32_t lo, int32_t hi)
    void esp_rq_i8_i8(const int8_t* x, int8_t* y, ptrdiff_t n, int32_t s, int even, int32_t lo,
                      int32_t hi)
    void esp_rq_i8_i16(const int8_t* x, int16_t* y, ptrdiff_t n, int32_t s, int even,
                       int32_t lo, int32_t hi)
    void esp_rq_i16_i8(const int16_t* x, int8_t* y, ptrdiff_t n, int32_t s, int even,
                       int32_t lo, int32_t hi)
    void esp_rq_i16_i16(const int16_t* x, int16_t* y, ptrdiff_t n, int32_t s, int even,
                        int32_t lo, int32_t hi)
    # LayerNormalization rows (norm.py's layernorm_kernel in C); returns rows with a NaN.
    ptrdiff_t esp_layernorm_i8(const int8_t* x, int8_t* y, ptrdiff_t rows, ptrdiff_t n,
                               const float* sv, const float* bv, float s_in, float s_in2,
                               float fn, float eps, float s_out, int even, int32_t lo,
                               int32_t hi)
    ptrdiff_t esp_layernorm_i16(const int16_t* x, int16_t* y, ptrdiff_t rows, ptrdiff_t n,
                                const float* sv, const float* bv, float s_in, float s_in2,
                                float fn, float eps, float s_out, int even, int32_t lo,
                                int32_t hi)
    void esp_dw_plain(const int16_t* X, const int16_t* w, const int16_t* wp, ptrdiff_t T,
                      const ptrdiff_t* xo, const ptrdiff_t* wo, ptrdiff_t nt, ptrdiff_t C,
                      int32_t* acc)


cdef esp_bcast_fn _bcast = esp_bcast_pick()  # AVX2, SSE2 or plain C, once per process
cdef esp_dw_fn _dw = esp_dw_pick()  # AVX2 or plain C
cdef esp_vnni_fn _vnni = esp_vnni_pick()  # AVX-512 VNNI or NULL (then _bcast)
cdef esp_dw2_fn _dw2 = esp_dw2_pick()  # AVX-512 VNNI depthwise or NULL (then _dw per pixel)


def set_no_vnni(bint off):
    """Turn the AVX-512 VNNI conv loop off (True) or pick by CPU again (False): lets the tests
    check the AVX2 broadcast form (and the per-pixel depthwise loop) on a CPU that has VNNI."""
    global _vnni, _dw2
    _vnni = NULL if off else esp_vnni_pick()
    _dw2 = NULL if off else esp_dw2_pick()


def has_vnni():
    """Does this process run the AVX-512 VNNI conv loop?"""
    return _vnni != NULL


def set_plain_depthwise(bint plain):
    """Force the plain-C depthwise loop (True) or pick by CPU again (False): lets the tests
    check the fallback of a CPU without AVX2 on this one."""
    global _dw
    _dw = esp_dw_plain if plain else esp_dw_pick()


ctypedef fused data_t:
    int8_t
    int16_t

ctypedef fused acc_t:
    int32_t
    int64_t

ctypedef fused src_t:
    int8_t
    int16_t
    int32_t

cdef enum:
    HALF_UP = 0
    HALF_EVEN = 1

cdef enum:  # requantize kinds of the conv kernels (see `rq`)
    RQ_ANY = 0
    RQ_UP = 1
    RQ_EVEN = 2


cdef inline int64_t requant(int64_t v, int64_t s, int mode, bint relu,
                            int64_t lo, int64_t hi) noexcept nogil:
    """round(v * 2**-s) as ESP-DL does, then ReLU and saturation (reference.round_shift)."""
    cdef int64_t q, rest, half
    cdef int64_t lim = (<int64_t>1) << 31
    if s <= 0:
        # Beyond +-2**31 the result saturates anyway; the clip keeps the product in int64.
        if v > lim:
            v = lim
        elif v < -lim:
            v = -lim
        if s < -31:
            s = -31
        v = v * ((<int64_t>1) << (-s))
    else:
        if s > 62:
            s = 62
        half = (<int64_t>1) << (s - 1)
        if mode == HALF_UP:
            v = (v + half) >> s
        else:
            q = v >> s
            rest = v & ((half << 1) - 1)
            if rest > half or (rest == half and (q & 1)):
                q += 1
            v = q
    if relu and v < 0:
        v = 0
    if v < lo:
        v = lo
    elif v > hi:
        v = hi
    return v


cdef inline Py_ssize_t _taps(Py_ssize_t ih0, Py_ssize_t iw0, Py_ssize_t H, Py_ssize_t W,
                             Py_ssize_t C, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t dh,
                             Py_ssize_t dw, Py_ssize_t cig, Py_ssize_t* run_x,
                             Py_ssize_t* run_w, Py_ssize_t* run_n) noexcept nogil:
    """The taps of one window inside the input, as runs contiguous in both x and w."""
    cdef Py_ssize_t i, j, ih, iw, xo, wo, nr = 0
    for i in range(KH):
        ih = ih0 + i * dh
        if ih < 0 or ih >= H:
            continue
        for j in range(KW):
            iw = iw0 + j * dw
            if iw < 0 or iw >= W:
                continue
            xo = (ih * W + iw) * C
            wo = (i * KW + j) * cig
            if nr > 0 and run_x[nr - 1] + run_n[nr - 1] == xo and run_w[nr - 1] + run_n[nr - 1] == wo:
                run_n[nr - 1] += cig
            else:
                run_x[nr] = xo
                run_w[nr] = wo
                run_n[nr] = cig
                nr += 1
    return nr


cdef inline int64_t rq(int64_t v, int64_t s, int kind, int mode, int64_t lo,
                       int64_t hi) noexcept nogil:
    """Requantize an accumulator whose bias (and, for RQ_UP, rounding constant) is already
    added: RQ_UP is a plain arithmetic shift, RQ_EVEN a branch-free half-even shift, RQ_ANY the
    general case. ReLU is folded into `lo`."""
    cdef int64_t q, rest, half
    if kind == RQ_UP:
        v = v >> s
    elif kind == RQ_EVEN:
        q = v >> s
        half = (<int64_t>1) << (s - 1)
        rest = v & ((half << 1) - 1)
        v = q + ((rest > half) | ((rest == half) & (q & 1)))
    else:
        return requant(v, s, mode, False, lo, hi)
    if v < lo:
        v = lo
    if v > hi:
        v = hi
    return v


cdef inline void _rq32_row(const acc_t* acc, const int32_t* add32, int32_t even, int32_t lo,
                           int32_t hi, data_t* y, Py_ssize_t n) noexcept nogil:
    """Requantize a row of int32 sums with the per-channel int32 constants at add32 (see
    esp_rq32_i8): a loop the compiler vectorises. add32 is only set for int8 data."""
    if data_t is int8_t and acc_t is int32_t:
        esp_rq32_i8(acc, add32, even, lo, hi, y, n)


cdef inline void _rq_pixels(const acc_t* qa, Py_ssize_t npix, Py_ssize_t cout,
                            const int32_t* add32, int32_t s32, int32_t lo32, int32_t hi32,
                            const int64_t* add, const int64_t* shift, int kind, int mode,
                            int64_t lo, int64_t hi, data_t* yp) noexcept nogil:
    """Requantize `npix` pixels of sums (rows of `cout` at qa) into yp: the vectorised int32
    row where its constants exist (add32), else channel by channel."""
    cdef Py_ssize_t p, co
    for p in range(npix):
        if add32 != NULL:
            _rq32_row(qa + p * cout, add32, s32, lo32, hi32, yp + p * cout, cout)
        else:
            for co in range(cout):
                yp[p * cout + co] = <data_t>rq(qa[p * cout + co] + add[co], shift[co], kind,
                                               mode, lo, hi)


cdef inline bint _same_runs(Py_ssize_t nr, Py_ssize_t nr2, Py_ssize_t step, Py_ssize_t* rx,
                            Py_ssize_t* rw, Py_ssize_t* rn, Py_ssize_t* rx2, Py_ssize_t* rw2,
                            Py_ssize_t* rn2) noexcept nogil:
    """Do two windows have the same taps, the second shifted by `step` in the input?"""
    cdef Py_ssize_t r
    if nr != nr2:
        return False
    for r in range(nr):
        if rx2[r] != rx[r] + step or rw2[r] != rw[r] or rn2[r] != rn[r]:
            return False
    return True


cdef void _conv_general(const int16_t* X, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                        const int16_t* Wt, Py_ssize_t cout, Py_ssize_t KH, Py_ssize_t KW,
                        Py_ssize_t G, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw,
                        Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t OH, Py_ssize_t OW,
                        const int64_t* add, const int64_t* shift, int kind, int mode,
                        int64_t lo, int64_t hi, Py_ssize_t* runs, acc_t* accbuf,
                        const int32_t* add32, const int16_t* wpk, Py_ssize_t cp,
                        data_t* Y) noexcept nogil:
    """Two neighbouring output pixels with the same taps (the interior) share each weight load,
    four output channels share each input load: 8 dot products per pass. With `add32` the sums
    of a pixel pair go to `accbuf` (2 * C_out) and are requantized by a vectorised loop.
    With `wpk` (int32 sums, groups == 1, even C_in; weights packed by esp_pack_pairs with `cp`
    channels) the sums of every channel come from `_bcast` instead."""
    cdef Py_ssize_t cig = C // G, cog = cout // G, K = KH * KW * cig, T = KH * KW
    cdef Py_ssize_t oh, ow, g, co, co_end, r, i, n, nr, nr2, nr_loop, npix, step = sw * C
    cdef Py_ssize_t maxpix = 2, p
    cdef esp_vnni_fn vnni = NULL
    if acc_t is int32_t:
        if wpk != NULL and _vnni != NULL:
            vnni = _vnni
            maxpix = 4
    cdef Py_ssize_t* rx = runs
    cdef Py_ssize_t* rw = runs + T
    cdef Py_ssize_t* rn = runs + 2 * T
    cdef Py_ssize_t* rx2 = runs + 3 * T
    cdef Py_ssize_t* rw2 = runs + 4 * T
    cdef Py_ssize_t* rn2 = runs + 5 * T
    cdef const int16_t* xp
    cdef const int16_t* xq
    cdef const int16_t* w0
    cdef const int16_t* w1
    cdef const int16_t* w2
    cdef const int16_t* w3
    cdef data_t* yp
    cdef data_t* yq
    cdef acc_t a0, a1, a2, a3, b0, b1, b2, b3
    cdef int32_t xa, xb, v0, v1, v2, v3
    cdef int32_t s32 = kind == RQ_EVEN, lo32 = <int32_t>lo, hi32 = <int32_t>hi
    cdef acc_t* qa = accbuf
    cdef acc_t* qb = accbuf + cout
    cdef int32_t blk[8]
    # Interior columns [ow_lo, ow_hi): every horizontal tap inside the input, so the taps of
    # one output row are those of ow_lo shifted by (ow - ow_lo) * step: the VNNI loop runs
    # them from runs3 (computed once per row) without recomputing any window.
    cdef Py_ssize_t ow_lo = (pl + sw - 1) // sw, ow_hi = 0, nr3 = 0
    cdef Py_ssize_t* rx3 = runs + 6 * T
    cdef Py_ssize_t* rw3 = runs + 7 * T
    cdef Py_ssize_t* rn3 = runs + 8 * T
    if W - 1 - (KW - 1) * dw + pl >= 0:
        ow_hi = (W - 1 - (KW - 1) * dw + pl) // sw + 1
    if ow_hi > OW:
        ow_hi = OW
    if vnni == NULL or ow_lo >= ow_hi:
        ow_lo = ow_hi = 0
    for oh in range(OH):
        ow = 0
        if ow_lo < ow_hi:
            nr3 = _taps(oh * sh - pt, ow_lo * sw - pl, H, W, C, KH, KW, dh, dw, cig, rx3, rw3,
                        rn3)
        while ow < OW:
            if acc_t is int32_t:
                if ow_lo <= ow < ow_hi:
                    npix = ow_hi - ow if ow_hi - ow < 4 else 4
                    yp = Y + (oh * OW + ow) * cout
                    vnni(X + (ow - ow_lo) * step, step, npix, wpk, cout, cp,
                         <const ptrdiff_t*>rx3, <const ptrdiff_t*>rw3, <const ptrdiff_t*>rn3,
                         nr3, qa, qa + cout, qa + 2 * cout, qa + 3 * cout)
                    _rq_pixels(qa, npix, cout, add32, s32, lo32, hi32, add, shift, kind, mode,
                               lo, hi, yp)
                    ow += npix
                    continue
            nr = _taps(oh * sh - pt, ow * sw - pl, H, W, C, KH, KW, dh, dw, cig, rx, rw, rn)
            npix = 1
            while npix < maxpix and ow + npix < OW:
                nr2 = _taps(oh * sh - pt, (ow + npix) * sw - pl, H, W, C, KH, KW, dh, dw, cig,
                            rx2, rw2, rn2)
                if not _same_runs(nr, nr2, npix * step, rx, rw, rn, rx2, rw2, rn2):
                    break
                npix += 1
            yp = Y + (oh * OW + ow) * cout
            yq = yp + cout
            if acc_t is int32_t:
                if vnni != NULL:  # up to 4 pixels, sums into accbuf rows
                    vnni(X, step, npix, wpk, cout, cp, <const ptrdiff_t*>rx,
                         <const ptrdiff_t*>rw, <const ptrdiff_t*>rn, nr, qa, qa + cout,
                         qa + 2 * cout, qa + 3 * cout)
                    _rq_pixels(qa, npix, cout, add32, s32, lo32, hi32, add, shift, kind, mode,
                               lo, hi, yp)
                    ow += npix
                    continue
                if wpk != NULL:
                    _bcast(X, step if npix == 2 else 0, wpk, cout, cp, <const ptrdiff_t*>rx,
                           <const ptrdiff_t*>rw, <const ptrdiff_t*>rn, nr, qa,
                           qb if npix == 2 else NULL)
                    if add32 != NULL:
                        _rq32_row(qa, add32, s32, lo32, hi32, yp, cout)
                        if npix == 2:
                            _rq32_row(qb, add32, s32, lo32, hi32, yq, cout)
                    else:
                        for co in range(cout):
                            yp[co] = <data_t>rq(qa[co] + add[co], shift[co], kind, mode, lo, hi)
                            if npix == 2:
                                yq[co] = <data_t>rq(qb[co] + add[co], shift[co], kind, mode,
                                                    lo, hi)
                    ow += npix
                    continue
            for g in range(G):
                co = g * cog
                co_end = co + cog
                if npix == 2:
                    while co + 4 <= co_end:
                        a0 = 0
                        a1 = 0
                        a2 = 0
                        a3 = 0
                        b0 = 0
                        b1 = 0
                        b2 = 0
                        b3 = 0
                        if acc_t is int32_t:
                            esp_pair4(X + g * cig, step, Wt + co * K, K, <const ptrdiff_t*>rx,
                                      <const ptrdiff_t*>rw, <const ptrdiff_t*>rn, nr, blk)
                            a0, a1, a2, a3 = blk[0], blk[1], blk[2], blk[3]
                            b0, b1, b2, b3 = blk[4], blk[5], blk[6], blk[7]
                            nr_loop = 0
                        else:
                            nr_loop = nr
                        for r in range(nr_loop):  # int64 sums (int16 data)
                            xp = X + g * cig + rx[r]
                            xq = xp + step
                            n = rn[r]
                            w0 = Wt + co * K + rw[r]
                            w1 = w0 + K
                            w2 = w1 + K
                            w3 = w2 + K
                            for i in range(n):
                                xa = xp[i]
                                xb = xq[i]
                                v0 = w0[i]
                                v1 = w1[i]
                                v2 = w2[i]
                                v3 = w3[i]
                                a0 += xa * v0
                                a1 += xa * v1
                                a2 += xa * v2
                                a3 += xa * v3
                                b0 += xb * v0
                                b1 += xb * v1
                                b2 += xb * v2
                                b3 += xb * v3
                        if add32 != NULL:
                            qa[co] = a0
                            qa[co + 1] = a1
                            qa[co + 2] = a2
                            qa[co + 3] = a3
                            qb[co] = b0
                            qb[co + 1] = b1
                            qb[co + 2] = b2
                            qb[co + 3] = b3
                        else:
                            yp[co] = <data_t>rq(a0 + add[co], shift[co], kind, mode, lo, hi)
                            yp[co + 1] = <data_t>rq(a1 + add[co + 1], shift[co + 1], kind, mode, lo, hi)
                            yp[co + 2] = <data_t>rq(a2 + add[co + 2], shift[co + 2], kind, mode, lo, hi)
                            yp[co + 3] = <data_t>rq(a3 + add[co + 3], shift[co + 3], kind, mode, lo, hi)
                            yq[co] = <data_t>rq(b0 + add[co], shift[co], kind, mode, lo, hi)
                            yq[co + 1] = <data_t>rq(b1 + add[co + 1], shift[co + 1], kind, mode, lo, hi)
                            yq[co + 2] = <data_t>rq(b2 + add[co + 2], shift[co + 2], kind, mode, lo, hi)
                            yq[co + 3] = <data_t>rq(b3 + add[co + 3], shift[co + 3], kind, mode, lo, hi)
                        co += 4
                while co < co_end:  # leftover channels, or a lone pixel
                    a0 = 0
                    b0 = 0
                    if acc_t is int32_t:
                        a0 = esp_dot1(X + g * cig, Wt + co * K, <const ptrdiff_t*>rx,
                                      <const ptrdiff_t*>rw, <const ptrdiff_t*>rn, nr)
                        if npix == 2:
                            b0 = esp_dot1(X + g * cig + step, Wt + co * K, <const ptrdiff_t*>rx,
                                          <const ptrdiff_t*>rw, <const ptrdiff_t*>rn, nr)
                        nr_loop = 0
                    else:
                        nr_loop = nr
                    for r in range(nr_loop):  # int64 sums (int16 data)
                        xp = X + g * cig + rx[r]
                        n = rn[r]
                        w0 = Wt + co * K + rw[r]
                        for i in range(n):
                            a0 += <int32_t>xp[i] * w0[i]
                        if npix == 2:
                            xq = xp + step
                            for i in range(n):
                                b0 += <int32_t>xq[i] * w0[i]
                    if add32 != NULL:
                        qa[co] = a0
                        qb[co] = b0
                    else:
                        yp[co] = <data_t>rq(a0 + add[co], shift[co], kind, mode, lo, hi)
                        if npix == 2:
                            yq[co] = <data_t>rq(b0 + add[co], shift[co], kind, mode, lo, hi)
                    co += 1
            if add32 != NULL:
                _rq32_row(qa, add32, s32, lo32, hi32, yp, cout)
                if npix == 2:
                    _rq32_row(qb, add32, s32, lo32, hi32, yq, cout)
            ow += npix


cdef void _conv_depthwise(const int16_t* X, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                          const int16_t* Wt, Py_ssize_t KH, Py_ssize_t KW,
                          Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw,
                          Py_ssize_t pt, Py_ssize_t pl, Py_ssize_t OH, Py_ssize_t OW,
                          const int64_t* add, const int64_t* shift, int kind, int mode,
                          int64_t lo, int64_t hi, Py_ssize_t* runs, acc_t* acc,
                          const int32_t* add32, const int16_t* wdw, data_t* Y) noexcept nogil:
    """groups == C_in == C_out; weights transposed to [kH * kW, C] so the loops run over C
    (contiguous in both; the compiler vectorises them). With `add32` (one right shift for all
    channels, half-up, int32 cannot overflow) the requantize loop is vectorised too."""
    cdef Py_ssize_t oh, ow, i, j, ih, iw, c, t, nt
    cdef int32_t s32 = kind == RQ_EVEN, lo32 = <int32_t>lo, hi32 = <int32_t>hi
    cdef Py_ssize_t* xo = runs
    cdef Py_ssize_t* wo = runs + KH * KW
    cdef const int16_t* xp
    cdef const int16_t* wp
    cdef data_t* yp
    for oh in range(OH):
        for ow in range(OW):
            nt = 0
            for i in range(KH):
                ih = oh * sh - pt + i * dh
                if ih < 0 or ih >= H:
                    continue
                for j in range(KW):
                    iw = ow * sw - pl + j * dw
                    if iw < 0 or iw >= W:
                        continue
                    xo[nt] = (ih * W + iw) * C
                    wo[nt] = (i * KW + j) * C
                    nt += 1
            if acc_t is int32_t:
                _dw(X, Wt, wdw, KH * KW, <const ptrdiff_t*>xo, <const ptrdiff_t*>wo, nt, C, acc)
                nt = 0  # done
            else:
                for c in range(C):
                    acc[c] = 0
            for t in range(nt):
                xp = X + xo[t]
                wp = Wt + wo[t]
                for c in range(C):
                    acc[c] += <int32_t>xp[c] * wp[c]
            yp = Y + (oh * OW + ow) * C
            if add32 != NULL:
                _rq32_row(acc, add32, s32, lo32, hi32, yp, C)
            else:
                for c in range(C):
                    yp[c] = <data_t>rq(acc[c] + add[c], shift[c], kind, mode, lo, hi)


cdef class Conv:
    """One conv layer fixed for one input shape: everything but the data is derived once
    (bias plus rounding constant, shift kind, weights packed for the broadcast / VNNI / depthwise
    loops), so a call only widens x to int16, runs the loop and returns a fresh output.

    w: int16 [C_out, K] (depthwise: [kH * kW, C]); bias, shift: int64 [C_out]; in_hw, out_hw:
    (H, W) of the data and of the output; out_shape: the output array's shape (the caller's
    rank); int8: data type int8 (else int16). Calls take a C-contiguous array of in_hw x C of
    that type, already checked by the caller (`espstream.kernels`)."""

    cdef object w16, out_shape, out_dtype
    cdef const int16_t* w
    cdef int16_t* wpk
    cdef int16_t* wdw
    cdef int32_t* wq2
    cdef int32_t* rq2
    cdef int64_t* add
    cdef int64_t* shf
    cdef int32_t* add32
    cdef Py_ssize_t H, W, C, OH, OW, cout, KH, KW, G, sh, sw, dh, dw, pt, pl, cp, nacc, Cd
    cdef int kind, mode
    cdef bint is8, depthwise
    cdef int64_t lo, hi

    def __cinit__(self):
        self.wpk = NULL
        self.wdw = NULL
        self.wq2 = NULL
        self.rq2 = NULL
        self.add = NULL

    def __init__(self, w16, const int64_t[::1] bias, const int64_t[::1] shift, tuple in_hw,
                 Py_ssize_t C, tuple out_hw, tuple out_shape, Py_ssize_t KH, Py_ssize_t KW,
                 Py_ssize_t groups, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw,
                 Py_ssize_t pt, Py_ssize_t pl, int mode, bint relu, bint depthwise, bint int8,
                 Py_ssize_t data_c=-1):
        cdef const int16_t[:, ::1] wv = w16
        cdef Py_ssize_t c, k, nb, cout = bias.shape[0], K = wv.shape[1]
        cdef int64_t s, amax = 0
        self.w16 = w16  # kept alive: self.w points into it
        self.w = &wv[0, 0] if wv.shape[0] * wv.shape[1] else NULL
        self.H, self.W = in_hw
        self.OH, self.OW = out_hw
        self.C, self.cout, self.KH, self.KW, self.G = C, cout, KH, KW, groups
        # data_c < C: the data has data_c channels and is widened with zero channels to C (the
        # weights already hold zeros there), so an odd C_in takes the paired-channel loops
        self.Cd = C if data_c < 0 else data_c
        self.sh, self.sw, self.dh, self.dw, self.pt, self.pl = sh, sw, dh, dw, pt, pl
        self.mode, self.is8, self.depthwise = mode, int8, depthwise
        self.out_shape = out_shape
        self.out_dtype = np.int8 if int8 else np.int16
        self.nacc = max(C, 4 * cout, 1)
        if int8:
            self.lo, self.hi = -128, 127
        else:
            self.lo, self.hi = -32768, 32767
        if relu:
            self.lo = 0
        # add[c] = bias (+ the half-up rounding constant when every shift is a right shift),
        # shf, then add32: int32 constants per channel [add, shift, half, mask] when int8,
        # every shift in [1, 31] and acc + add cannot overflow (esp_rq32_i8)
        self.add = <int64_t*>malloc((4 * cout + 1) * sizeof(int64_t))
        if self.add == NULL:
            raise MemoryError()
        self.shf = self.add + cout
        self.add32 = <int32_t*>(self.add + 2 * cout)
        self.kind = RQ_UP if mode == HALF_UP else RQ_EVEN
        for c in range(cout):
            if shift[c] <= 0:
                self.kind = RQ_ANY
        for c in range(cout):
            s = shift[c]
            self.add[c] = bias[c]
            if self.kind != RQ_ANY and s > 62:
                s = 62  # as reference.round_shift: no effect on |v| < 2**61
            if self.kind == RQ_UP:
                self.add[c] += (<int64_t>1) << (s - 1)
            self.shf[c] = s
        if int8 and self.kind != RQ_ANY:
            for c in range(cout):
                if self.shf[c] > 31:
                    self.add32 = NULL
                    break
                # |acc + add| + half must fit int32 (the half-even step adds half - 1 + 1)
                s = (self.add[c] if self.add[c] >= 0 else -self.add[c]) + (
                    ((<int64_t>1) << (self.shf[c] - 1)) if self.kind == RQ_EVEN else 0)
                if s > amax:
                    amax = s
            if amax + KH * KW * (C // groups) * 16384 >= 2147483647:
                self.add32 = NULL
            if self.add32 != NULL:
                for c in range(cout):
                    self.add32[c] = <int32_t>self.add[c]
                    self.add32[cout + c] = <int32_t>self.shf[c]
                    self.add32[2 * cout + c] = (<int32_t>1) << (self.shf[c] - 1)
                    self.add32[3 * cout + c] = <int32_t>(((<int64_t>1) << self.shf[c]) - 1)
        else:
            self.add32 = NULL
        self.cp = 0
        if int8 and depthwise and C > 0:
            self.wdw = <int16_t*>malloc(2 * KH * KW * C * sizeof(int16_t))
            if self.wdw == NULL:
                raise MemoryError()
            esp_dw_pack(self.w, KH * KW, C, self.wdw)
            if self.add32 != NULL and cout == C and KH * ((KW + 1) // 2) <= ESP_DW2_TAPS:
                # the whole-image loop's tap pairs and padded per-channel constants
                # (32-channel blocks, channels in the loop's lane order esp_dw2_ch)
                nb = (C + 31) // 32
                self.wq2 = <int32_t*>malloc(nb * KH * ((KW + 1) // 2) * 32 * sizeof(int32_t))
                self.rq2 = <int32_t*>malloc(3 * 32 * nb * sizeof(int32_t))
                if self.wq2 == NULL or self.rq2 == NULL:
                    raise MemoryError()
                esp_dw2_pack(self.w, KH, KW, C, self.wq2)
                for k in range(32 * nb):
                    c = k // 32 * 32 + esp_dw2_ch(k % 32)
                    self.rq2[k] = self.add32[c] if c < C else 0
                    self.rq2[32 * nb + k] = self.add32[cout + c] if c < C else 1
                    self.rq2[64 * nb + k] = self.add32[2 * cout + c] if c < C else 1
        if int8 and not depthwise and groups == 1 and C % 2 == 0 and K > 0 and cout > 0:
            self.cp = (cout + ESP_BC_BLOCK - 1) // ESP_BC_BLOCK * ESP_BC_BLOCK
            self.wpk = <int16_t*>malloc(K * self.cp * sizeof(int16_t))
            if self.wpk == NULL:
                raise MemoryError()
            esp_pack_pairs(self.w, cout, K, self.cp, self.wpk)

    def __dealloc__(self):
        free(self.wpk)
        free(self.wdw)
        free(self.wq2)
        free(self.rq2)
        free(self.add)

    def __call__(self, x):
        """The output for x (C-contiguous, in_hw x C, the data type): a new array."""
        cdef cnp.ndarray xa = <cnp.ndarray>x
        cdef cnp.ndarray y = np.empty(self.out_shape, self.out_dtype)
        cdef Py_ssize_t n = self.H * self.W * self.C, i, c, px, C = self.C, Cd = self.Cd
        cdef esp_dw2_fn dw2 = _dw2
        cdef int32_t* pairs
        if self.OH == 0 or self.OW == 0 or self.cout == 0 or self.C == 0:
            return y
        if dw2 != NULL and self.wq2 != NULL and Cd == C:
            # depthwise int8: no widened copy, the loop builds its pairs block by block
            pairs = <int32_t*>malloc(
                (((self.KH - 1) * self.dh + 1) * esp_dw2_wp(self.OW, self.sw, self.KW, self.dw)
                 * 32 + 1)
                * sizeof(int32_t))
            if pairs == NULL:
                raise MemoryError()
            with nogil:
                dw2(<const int8_t*>cnp.PyArray_DATA(xa), self.H, self.W, C, self.KH, self.KW,
                    self.sh, self.sw, self.dh, self.dw, self.pt, self.pl, self.OH, self.OW,
                    self.wq2, self.rq2, self.kind == RQ_EVEN, <int32_t>self.lo,
                    <int32_t>self.hi, <int8_t*>cnp.PyArray_DATA(y), pairs)
            free(pairs)
            return y
        cdef int16_t* x16 = <int16_t*>malloc((n + 1) * sizeof(int16_t))
        cdef void* acc = malloc(self.nacc * (4 if self.is8 else 8))
        cdef Py_ssize_t* runs = <Py_ssize_t*>malloc(9 * self.KH * self.KW * sizeof(Py_ssize_t))
        cdef const int8_t* x8
        cdef const int16_t* xs
        if x16 == NULL or acc == NULL or runs == NULL:
            free(x16)
            free(acc)
            free(runs)
            raise MemoryError()
        with nogil:
            if self.is8:
                x8 = <const int8_t*>cnp.PyArray_DATA(xa)
                if Cd == C:
                    for i in range(n):
                        x16[i] = x8[i]
                else:
                    for px in range(self.H * self.W):
                        for c in range(Cd):
                            x16[px * C + c] = x8[px * Cd + c]
                        for c in range(Cd, C):
                            x16[px * C + c] = 0
                self._run8(x16, runs, <int32_t*>acc, <int8_t*>cnp.PyArray_DATA(y))
            else:
                xs = <const int16_t*>cnp.PyArray_DATA(xa)
                memcpy(x16, xs, n * sizeof(int16_t))
                self._run16(x16, runs, <int64_t*>acc, <int16_t*>cnp.PyArray_DATA(y))
        free(x16)
        free(acc)
        free(runs)
        return y

    cdef void _run8(self, const int16_t* x16, Py_ssize_t* runs, int32_t* acc,
                    int8_t* y) noexcept nogil:
        if self.depthwise:
            _conv_depthwise(x16, self.H, self.W, self.C, self.w, self.KH, self.KW, self.sh,
                            self.sw, self.dh, self.dw, self.pt, self.pl, self.OH, self.OW,
                            self.add, self.shf, self.kind, self.mode, self.lo, self.hi, runs,
                            acc, self.add32, self.wdw, y)
        else:
            _conv_general(x16, self.H, self.W, self.C, self.w, self.cout, self.KH, self.KW,
                          self.G, self.sh, self.sw, self.dh, self.dw, self.pt, self.pl,
                          self.OH, self.OW, self.add, self.shf, self.kind, self.mode, self.lo,
                          self.hi, runs, acc, self.add32, self.wpk, self.cp, y)

    cdef void _run16(self, const int16_t* x16, Py_ssize_t* runs, int64_t* acc,
                     int16_t* y) noexcept nogil:
        if self.depthwise:
            _conv_depthwise(x16, self.H, self.W, self.C, self.w, self.KH, self.KW, self.sh,
                            self.sw, self.dh, self.dw, self.pt, self.pl, self.OH, self.OW,
                            self.add, self.shf, self.kind, self.mode, self.lo, self.hi, runs,
                            acc, <int32_t*>NULL, <int16_t*>NULL, y)
        else:
            _conv_general(x16, self.H, self.W, self.C, self.w, self.cout, self.KH, self.KW,
                          self.G, self.sh, self.sw, self.dh, self.dw, self.pt, self.pl,
                          self.OH, self.OW, self.add, self.shf, self.kind, self.mode, self.lo,
                          self.hi, runs, acc, <int32_t*>NULL, <int16_t*>NULL, 0, y)


cdef void _avgpool(const data_t* x, data_t* y, float* a, Py_ssize_t H, Py_ssize_t W,
                   Py_ssize_t C, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW,
                   Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t pt,
                   Py_ssize_t pl, float scale_in, float inv_area, float scale_out,
                   int mode) noexcept nogil:
    cdef Py_ssize_t oh, ow, i, j, ih, iw, c
    cdef const data_t* xp
    cdef data_t* yp
    cdef float v, r, d, lo, hi
    # float32 constants, so no step is promoted to double
    cdef float magic = 12582912.0, zero = 0.0, one = 1.0, half = 0.5
    if data_t is int8_t:
        lo, hi = -128.0, 127.0
    else:
        lo, hi = -32768.0, 32767.0
    for oh in range(OH):
        for ow in range(OW):
            for c in range(C):
                a[c] = 0.0
            for i in range(KH):
                ih = oh * sh - pt + i * dh
                if ih < 0 or ih >= H:
                    continue
                for j in range(KW):
                    iw = ow * sw - pl + j * dw
                    if iw < 0 or iw >= W:
                        continue
                    xp = x + (ih * W + iw) * C
                    for c in range(C):
                        a[c] = a[c] + (<float>xp[c]) * scale_in
            yp = y + (oh * OW + ow) * C
            # Clamp first (lo, hi are integers, so rounding commutes with it); then round
            # in float32 without libm: adding and removing 1.5 * 2**23 rounds half to even
            # exactly for |v| < 2**22, and v - r is exact, so a tie shows as v - r == 0.5.
            if mode == HALF_UP:
                for c in range(C):
                    v = (a[c] * inv_area) / scale_out
                    v = lo if v < lo else v
                    v = hi if v > hi else v
                    r = (v + magic) - magic
                    d = v - r
                    r = r + (one if d == half else zero)
                    yp[c] = <data_t><int32_t>r
            else:
                for c in range(C):
                    v = (a[c] * inv_area) / scale_out
                    v = lo if v < lo else v
                    v = hi if v > hi else v
                    r = (v + magic) - magic
                    yp[c] = <data_t><int32_t>r


def avgpool(cnp.ndarray x, cnp.ndarray y, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh,
            Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t pt, Py_ssize_t pl,
            float scale_in, float inv_area, float scale_out, int mode):
    """AveragePool in float32 on C-contiguous x [H, W, C] into y [OH, OW, C] of x's type
    (int8 / int16; the caller checks): acc += float(q) * scale_in over valid taps in row-major
    order, y = (acc * inv_area) / scale_out, saturated and rounded exactly. Each float step is a
    separate float32 operation; x * scale_in is exact (a power of two), so even an FMA
    contraction of the accumulate step could not change a result."""
    cdef Py_ssize_t H = x.shape[0], W = x.shape[1], C = x.shape[2]
    cdef Py_ssize_t OH = y.shape[0], OW = y.shape[1]
    cdef bint is8 = cnp.PyArray_TYPE(x) == cnp.NPY_INT8
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* py = cnp.PyArray_DATA(y)
    if OH == 0 or OW == 0 or C == 0:
        return
    cdef float* a = <float*>malloc(C * sizeof(float))
    if a == NULL:
        raise MemoryError()
    with nogil:
        if is8:
            _avgpool(<const int8_t*>px, <int8_t*>py, a, H, W, C, OH, OW, KH, KW, sh, sw, dh,
                     dw, pt, pl, scale_in, inv_area, scale_out, mode)
        else:
            _avgpool(<const int16_t*>px, <int16_t*>py, a, H, W, C, OH, OW, KH, KW, sh, sw, dh,
                     dw, pt, pl, scale_in, inv_area, scale_out, mode)
    free(a)


cdef void _maxpool(const data_t* x, data_t* y, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                   Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh,
                   Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t pt,
                   Py_ssize_t pl) noexcept nogil:
    cdef Py_ssize_t oh, ow, i, j, ih, iw, c
    cdef const data_t* xp
    cdef data_t* yp
    cdef data_t lo
    if data_t is int8_t:
        lo = -128
    else:
        lo = -32768
    for oh in range(OH):
        for ow in range(OW):
            yp = y + (oh * OW + ow) * C
            for c in range(C):
                yp[c] = lo
            for i in range(KH):
                ih = oh * sh - pt + i * dh
                if ih < 0 or ih >= H:
                    continue
                for j in range(KW):
                    iw = ow * sw - pl + j * dw
                    if iw < 0 or iw >= W:
                        continue
                    xp = x + (ih * W + iw) * C
                    for c in range(C):  # an unconditional store lets this vectorise
                        yp[c] = xp[c] if xp[c] > yp[c] else yp[c]


def maxpool(cnp.ndarray x, cnp.ndarray y, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh,
            Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t pt, Py_ssize_t pl):
    """MaxPool over the valid taps of C-contiguous x [H, W, C] into y [OH, OW, C] of x's type;
    a window with none gives the type's minimum."""
    cdef Py_ssize_t H = x.shape[0], W = x.shape[1], C = x.shape[2]
    cdef Py_ssize_t OH = y.shape[0], OW = y.shape[1]
    cdef bint is8 = cnp.PyArray_TYPE(x) == cnp.NPY_INT8
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* py = cnp.PyArray_DATA(y)
    if OH == 0 or OW == 0 or C == 0:
        return
    with nogil:
        if is8:
            _maxpool(<const int8_t*>px, <int8_t*>py, H, W, C, OH, OW, KH, KW, sh, sw, dh, dw,
                     pt, pl)
        else:
            _maxpool(<const int16_t*>px, <int16_t*>py, H, W, C, OH, OW, KH, KW, sh, sw, dh,
                     dw, pt, pl)


def requantize(const src_t[::1] x, data_t[::1] y, int64_t shift, int mode):
    """Elementwise saturate(round(x * 2**-shift)) over flat arrays."""
    cdef Py_ssize_t i, n = x.shape[0]
    cdef int64_t lo, hi
    if data_t is int8_t:
        lo, hi = -128, 127
    else:
        lo, hi = -32768, 32767
    with nogil:
        for i in range(n):
            y[i] = <data_t>requant(<int64_t>x[i], shift, mode, False, lo, hi)


def madd_probe(int64_t n):
    """n rounds of 10 independent AVX2 vpmaddwd (16 MACs each): benchmarks/kernels.py times it
    to measure the peak. Returns a checksum (0 without AVX2)."""
    cdef int32_t r
    with nogil:
        r = esp_madd_probe(n)
    return r


def dpwssd_probe(int64_t n):
    """n rounds of 10 independent AVX-512 vpdpwssd (32 MACs each): the VNNI peak for
    benchmarks/kernels.py. Returns a checksum (0 without AVX-512 VNNI)."""
    cdef int32_t r
    with nogil:
        r = esp_dpwssd_probe(n)
    return r


def addsub(cnp.ndarray a, cnp.ndarray b, bint sub):
    """Saturating a + b (a - b if sub) of two C-contiguous int8 or int16 arrays of one shape
    and type (the caller checks): a new array."""
    cdef cnp.ndarray y = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(a), cnp.PyArray_DIMS(a),
                                           cnp.PyArray_TYPE(a), 0)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(a)
    cdef int t = cnp.PyArray_TYPE(a)
    cdef void* pa = cnp.PyArray_DATA(a)
    cdef void* pb = cnp.PyArray_DATA(b)
    cdef void* py = cnp.PyArray_DATA(y)
    with nogil:
        if t == cnp.NPY_INT8:
            esp_addsub_i8(<const int8_t*>pa, <const int8_t*>pb, <int8_t*>py, n, sub, -128, 127)
        else:
            esp_addsub_i16(<const int16_t*>pa, <const int16_t*>pb, <int16_t*>py, n, sub,
                           -32768, 32767)
    return y


def requantize_narrow(cnp.ndarray x, int32_t shift, bint even, bint out8):
    """saturate(round(x * 2**-shift)) of a C-contiguous int8 or int16 array, shift in
    [-15, 30] (the caller checks), into a new int8 (out8) or int16 array of x's shape."""
    cdef cnp.ndarray y = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x),
                                           cnp.NPY_INT8 if out8 else cnp.NPY_INT16, 0)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(x)
    cdef bint in8 = cnp.PyArray_TYPE(x) == cnp.NPY_INT8
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* py = cnp.PyArray_DATA(y)
    with nogil:
        if in8 and out8:
            esp_rq_i8_i8(<const int8_t*>px, <int8_t*>py, n, shift, even, -128, 127)
        elif in8:
            esp_rq_i8_i16(<const int8_t*>px, <int16_t*>py, n, shift, even, -32768, 32767)
        elif out8:
            esp_rq_i16_i8(<const int16_t*>px, <int8_t*>py, n, shift, even, -128, 127)
        else:
            esp_rq_i16_i16(<const int16_t*>px, <int16_t*>py, n, shift, even, -32768, 32767)
    return y


def layernorm(cnp.ndarray x, cnp.ndarray sv, cnp.ndarray bv, float s_in, float s_in2,
              float fn, float eps, float s_out, bint even):
    """LayerNormalization of the rows of a C-contiguous 2-D int8 or int16 array x [rows, n]
    with C-contiguous float32 sv, bv [n] (the caller checks; norm.py's `layernorm_fast`): a new
    array of x's shape and type, or None when a result is NaN (the caller runs NumPy then)."""
    cdef cnp.ndarray y = cnp.PyArray_EMPTY(2, cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)
    cdef ptrdiff_t rows = cnp.PyArray_DIMS(x)[0], n = cnp.PyArray_DIMS(x)[1], bad
    cdef bint in8 = cnp.PyArray_TYPE(x) == cnp.NPY_INT8
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* py = cnp.PyArray_DATA(y)
    cdef const float* ps = <const float*>cnp.PyArray_DATA(sv)
    cdef const float* pb = <const float*>cnp.PyArray_DATA(bv)
    with nogil:
        if in8:
            bad = esp_layernorm_i8(<const int8_t*>px, <int8_t*>py, rows, n, ps, pb, s_in, s_in2,
                                   fn, eps, s_out, even, -128, 127)
        else:
            bad = esp_layernorm_i16(<const int16_t*>px, <int16_t*>py, rows, n, ps, pb, s_in,
                                    s_in2, fn, eps, s_out, even, -32768, 32767)
    return None if bad else y


def cache_step(cnp.ndarray kept, cnp.ndarray x, tuple out_shape):
    """StreamingCache's byte-flat step on C-contiguous arrays of one type: out = [kept ; x]
    (shape out_shape), new kept = the last kept.size elements of out. Returns (out, kept)."""
    cdef cnp.ndarray out = np.empty(out_shape, x.dtype)
    cdef cnp.ndarray nxt = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(kept), cnp.PyArray_DIMS(kept),
                                             cnp.PyArray_TYPE(kept), 0)
    cdef size_t kb = cnp.PyArray_NBYTES(kept), xb = cnp.PyArray_NBYTES(x)
    cdef char* po = <char*>cnp.PyArray_DATA(out)
    with nogil:
        memcpy(po, cnp.PyArray_DATA(kept), kb)
        memcpy(po + kb, cnp.PyArray_DATA(x), xb)
        memcpy(cnp.PyArray_DATA(nxt), po + xb, kb)
    return out, nxt


cdef bint _rnn_vec = True


def _even_rows(m):
    """int16 copy of a 2-D array with a zero column added when its rows are odd."""
    m = np.asarray(m)
    if m.shape[1] % 2:
        m = np.concatenate([m, np.zeros((m.shape[0], 1), m.dtype)], axis=1)
    return np.ascontiguousarray(m, np.int16)


def set_plain_rnn(bint plain):
    """GRU / LSTM objects built after this call run their hidden units one by one (True) or
    eight at a time with AVX2 where the CPU has it (False): lets the tests pit them."""
    global _rnn_vec
    _rnn_vec = not plain


cdef class Rnn:
    """One ESP-DL GRU / LSTM node's time loop in C (`esp_rnn` of _hot.h; the rules and the
    NumPy twin are `espstream.ops.recurrent.rnn_forward`). Built from that module's operands,
    called with x [seq, I] and the initial states as int64 arrays (None: zeros)."""

    cdef esp_rnn_args a
    cdef list keep
    cdef Py_ssize_t G

    def __init__(self, bint lstm, list w, list r, list wb, list rb, int w_shift, int r_shift,
                 bint pie_w, bint pie_r, bint p4, sig, int64_t sig_qmin, int64_t sig_qmax,
                 tnh, int64_t tnh_qmin, int64_t tnh_qmax, float resc_y, float resc_c,
                 int64_t lo, int64_t hi, bint narrow):
        """narrow: W, R, x and the state are int8 values (the caller checks), so the
        products are summed in int32 (exact up to 2**15 terms)."""
        cdef Py_ssize_t d
        cdef int16_t[::1] pk
        cdef const int16_t[:, ::1] m16
        cdef const int32_t[:, ::1] m
        cdef const int64_t[::1] b
        cdef const float[::1] t
        self.keep = []
        self.a.lstm, self.a.dirs, self.a.p4 = lstm, len(w), p4
        self.a.pie_w, self.a.pie_r = pie_w, pie_r
        self.a.w_shift, self.a.r_shift = w_shift, r_shift
        self.G = 4 if lstm else 3
        for d in range(len(w)):
            m = np.ascontiguousarray(w[d], np.int32)
            self.keep.append(m)
            self.a.w[d] = &m[0, 0]
            self.a.nin = m.shape[1]
            self.a.H = m.shape[0] // self.G
            m = np.ascontiguousarray(r[d], np.int32)
            self.keep.append(m)
            self.a.r[d] = &m[0, 0]
            self.a.wp[d] = NULL
            self.a.rp[d] = NULL
            if narrow:  # rows padded to an even length, packed in pairs for the conv loop
                self.a.cp = (m.shape[0] + ESP_BC_BLOCK - 1) // ESP_BC_BLOCK * ESP_BC_BLOCK
                for src, is_w in ((w[d], True), (r[d], False)):
                    m16 = _even_rows(src)
                    pk = np.zeros(m16.shape[1] * self.a.cp, np.int16)
                    esp_pack_pairs(&m16[0, 0], m16.shape[0], m16.shape[1], self.a.cp, &pk[0])
                    self.keep.append(pk)
                    if is_w:
                        self.a.wp[d] = &pk[0]
                        self.a.nin2 = m16.shape[1]
                    else:
                        self.a.rp[d] = &pk[0]
                        self.a.H2 = m16.shape[1]
            self.a.wb[d] = NULL
            self.a.rb[d] = NULL
            if wb[d] is not None:
                b = np.ascontiguousarray(wb[d], np.int64)
                self.keep.append(b)
                self.a.wb[d] = &b[0]
                b = np.ascontiguousarray(rb[d], np.int64)
                self.keep.append(b)
                self.a.rb[d] = &b[0]
        self.a.vnni = _vnni
        self.a.bc = _bcast
        t = np.ascontiguousarray(sig, np.float32)
        self.keep.append(t)
        self.a.sig = &t[0]
        t = np.ascontiguousarray(tnh, np.float32)
        self.keep.append(t)
        self.a.tnh = &t[0]
        self.a.sig_qmin, self.a.sig_qmax = sig_qmin, sig_qmax
        self.a.tnh_qmin, self.a.tnh_qmax = tnh_qmin, tnh_qmax
        self.a.resc_y, self.a.resc_c, self.a.lo, self.a.hi = resc_y, resc_c, lo, hi
        # the AVX2 unit loop: symmetric tables (gate_table makes them so) and scales that keep
        # every rounded value inside int32 (|c| <= 2**15 + resc_c, |h| <= resc_y + 2**15)
        self.a.vec = (_rnn_vec and esp_rnn_avx2() and sig_qmin == -sig_qmax
                      and tnh_qmin == -tnh_qmax and sig_qmax < (1 << 30) and tnh_qmax < (1 << 30)
                      and resc_y <= (1 << 24) and resc_c <= (1 << 24))
        # int8 sums of up to 2**15 terms: |acc| <= 2**29, and acc + half still fits int32
        self.a.narrow = narrow and self.a.nin <= (1 << 15) and self.a.H <= (1 << 15)

    def __call__(self, x, h0, c0):
        """(Y [seq, dirs, H], Y_h [dirs, H], Y_c [dirs, H] or None), int64."""
        cdef cnp.ndarray xa = np.ascontiguousarray(x, np.int64)
        cdef Py_ssize_t H = self.a.H, dirs = self.a.dirs, seq
        cdef cnp.ndarray ha, ca
        cdef const int64_t* hp = NULL
        cdef const int64_t* cp = NULL
        if xa.ndim != 2 or xa.shape[1] != self.a.nin:
            raise ValueError(f"input of {np.shape(x)}, the weights take {self.a.nin} "
                             "features")
        seq = xa.shape[0]
        if h0 is not None:
            ha = np.ascontiguousarray(h0, np.int64)
            if cnp.PyArray_SIZE(ha) != dirs * H:
                raise ValueError("initial_h of the wrong size")
            hp = <const int64_t*>cnp.PyArray_DATA(ha)
        if c0 is not None:
            ca = np.ascontiguousarray(c0, np.int64)
            if cnp.PyArray_SIZE(ca) != dirs * H:
                raise ValueError("initial_c of the wrong size")
            cp = <const int64_t*>cnp.PyArray_DATA(ca)
        cdef cnp.ndarray y = np.zeros((seq, dirs, H), np.int64)
        cdef cnp.ndarray yh = np.zeros((dirs, H), np.int64)
        cdef cnp.ndarray yc = np.zeros((dirs, H), np.int64)
        cdef int64_t* scratch = <int64_t*>malloc((3 * self.G * H + 3 * H + 1) * sizeof(int64_t))
        cdef int16_t* s16 = <int16_t*>malloc((self.a.nin + H + 3) * sizeof(int16_t))
        if scratch == NULL or s16 == NULL:
            free(scratch)
            free(s16)
            raise MemoryError()
        cdef esp_rnn_args args = self.a  # a copy: calls from several threads do not share seq
        args.seq = seq
        if seq > 0 and H > 0:
            with nogil:
                esp_rnn(&args, <const int64_t*>cnp.PyArray_DATA(xa), hp, cp,
                        <int64_t*>cnp.PyArray_DATA(y), <int64_t*>cnp.PyArray_DATA(yh),
                        <int64_t*>cnp.PyArray_DATA(yc) if self.a.lstm else NULL, scratch, s16)
        free(scratch)
        free(s16)
        return y, yh, (yc if self.a.lstm else None)
