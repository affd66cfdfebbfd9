/* Hot inner loops of the int8 conv kernels (espstream/kernels/_int8.pyx), in plain C.
 *
 * Why a header: GCC and Clang can compile one function several times for different
 * instruction sets and pick the best at load time (target_clones, dispatched through an
 * ifunc), so one portable build runs AVX2 code on CPUs that have it and baseline SSE2 code
 * elsewhere. Cython cannot annotate functions, so the loops it should clone live here.
 *
 * ESP_HOT expands to target_clones only where that works: x86-64 with GCC or Clang that knows
 * the attribute, on glibc Linux (the clone resolver is an ifunc; musl, macOS and Windows have
 * none). Everywhere else (ARM, MSVC, ...) the same functions compile as plain C. Define
 * ESPSTREAM_NO_CLONES to force the plain build.
 *
 * Arithmetic: int16 x int16 products summed in int32, the caller guarantees no overflow (int8
 * data: |product| <= 2**14); integer sums are exact in any order, so every clone gives the
 * same bits.
 */
#ifndef ESPSTREAM_KERNELS_HOT_H
#define ESPSTREAM_KERNELS_HOT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__has_attribute)
#  if __has_attribute(target_clones)
#    define ESP_HAS_CLONES 1
#  endif
#endif

#if defined(ESP_HAS_CLONES) && !defined(ESPSTREAM_NO_CLONES) && defined(__x86_64__) \
    && defined(__linux__) && defined(__GLIBC__)
#  define ESP_HOT __attribute__((target_clones("avx2", "default"))) __attribute__((noinline))
#else
#  define ESP_HOT
#endif

/* Two output pixels (x at xp and xp + step) times four output channels (weight rows w,
 * w + K, w + 2K, w + 3K) over the taps' runs: acc[0..3] += pixel 1, acc[4..7] += pixel 2.
 * Each weight load serves both pixels and each input load four channels. */
ESP_HOT static void esp_pair4(const int16_t *X, ptrdiff_t step, const int16_t *w, ptrdiff_t K,
                              const ptrdiff_t *rx, const ptrdiff_t *rw, const ptrdiff_t *rn,
                              ptrdiff_t nr, int32_t *acc)
{
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
    for (ptrdiff_t r = 0; r < nr; r++) {
        const int16_t *xp = X + rx[r], *xq = xp + step;
        const int16_t *w0 = w + rw[r], *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        ptrdiff_t n = rn[r];
        for (ptrdiff_t i = 0; i < n; i++) {
            int32_t xa = xp[i], xb = xq[i];
            a0 += xa * w0[i];
            a1 += xa * w1[i];
            a2 += xa * w2[i];
            a3 += xa * w3[i];
            b0 += xb * w0[i];
            b1 += xb * w1[i];
            b2 += xb * w2[i];
            b3 += xb * w3[i];
        }
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
    acc[4] = b0; acc[5] = b1; acc[6] = b2; acc[7] = b3;
}

/* One pixel, one output channel (edges and leftover channels). */
ESP_HOT static int32_t esp_dot1(const int16_t *X, const int16_t *w, const ptrdiff_t *rx,
                                const ptrdiff_t *rw, const ptrdiff_t *rn, ptrdiff_t nr)
{
    int32_t a = 0;
    for (ptrdiff_t r = 0; r < nr; r++) {
        const int16_t *xp = X + rx[r], *wp = w + rw[r];
        ptrdiff_t n = rn[r];
        for (ptrdiff_t i = 0; i < n; i++)
            a += (int32_t)xp[i] * wp[i];
    }
    return a;
}

/* Requantize n int32 sums per channel into int8: p holds add[n] (the bias, plus the rounding
 * constant when half-up), shift[n] in [1, 31], half[n] = 2**(shift-1) (then mask[n], unused).
 * Half-up: (acc + add) >> shift; half-even (even != 0): floor plus one above half, or at half
 * when the floor is odd. Then saturation to [lo, hi] (ReLU folded into lo). The caller
 * guarantees |acc + add| + half fits int32. Vectorises (per-lane shifts: vpsravd, AVX2). */
ESP_HOT static void esp_rq32_i8(const int32_t *acc, const int32_t *p, int32_t even,
                                int32_t lo, int32_t hi, int8_t *y, ptrdiff_t n)
{
    const int32_t *add = p, *sh = p + n, *half = p + 2 * n;
    if (even) {
        /* ties to even without a compare chain: floor((v + half - 1 + odd(floor(v / 2^s))) /
         * 2^s) (below half the sum stays under 2^s, above it reaches it, at half it adds the
         * floor's parity); the caller guarantees |v| + half fits int32 */
        for (ptrdiff_t c = 0; c < n; c++) {
            int32_t v = acc[c] + add[c];
            int32_t q = (v + (half[c] - 1) + ((v >> sh[c]) & 1)) >> sh[c];
            q = q < lo ? lo : q;
            y[c] = (int8_t)(q > hi ? hi : q);
        }
    } else {
        for (ptrdiff_t c = 0; c < n; c++) {
            int32_t v = (acc[c] + add[c]) >> sh[c];
            v = v < lo ? lo : v;
            y[c] = (int8_t)(v > hi ? hi : v);
        }
    }
}

/* Depthwise, one output pixel: acc[c] = sum over the nt valid taps of x[xo[t] + c] *
 * w[wo[t] + c] (weights [kH * kW, C]), the loop over C contiguous in both. */
ESP_HOT static void esp_dw_pixel(const int16_t *X, const int16_t *w, const ptrdiff_t *xo,
                                 const ptrdiff_t *wo, ptrdiff_t nt, ptrdiff_t C, int32_t *acc)
{
    for (ptrdiff_t c = 0; c < C; c++)
        acc[c] = 0;
    for (ptrdiff_t t = 0; t < nt; t++) {
        const int16_t *xp = X + xo[t], *wp = w + wo[t];
        for (ptrdiff_t c = 0; c < C; c++)
            acc[c] += (int32_t)xp[c] * wp[c];
    }
}


/* ---- All output channels at once ("broadcast" form) -------------------------------------
 * For groups == 1 and an even C_in: a pair of input values (x[k], x[k+1]) is broadcast and
 * multiplied with the interleaved weights of 8 (SSE2: 4) output channels in one pmaddwd,
 * accumulating per channel in vector lanes: no horizontal sums, and each weight load serves
 * two pixels. Weights are packed by esp_pack_pairs as [K / 2][cp][2] with cp = C_out rounded
 * up to ESP_BC_BLOCK (zero weights in the padding). Runs (rx, rw, rn) are as in esp_pair4 with
 * rw and rn even. Writes y1[0..C_out) (pixel at X) and, if y2, y2[0..C_out) (at X + step). */
#define ESP_BC_BLOCK 32

static void esp_pack_pairs(const int16_t *w, ptrdiff_t cout, ptrdiff_t K, ptrdiff_t cp,
                           int16_t *wp)
{
    for (ptrdiff_t k = 0; k < K / 2; k++)
        for (ptrdiff_t co = 0; co < cp; co++) {
            wp[(k * cp + co) * 2] = co < cout ? w[co * K + 2 * k] : 0;
            wp[(k * cp + co) * 2 + 1] = co < cout ? w[co * K + 2 * k + 1] : 0;
        }
}

static inline int32_t esp_ld_pair(const int16_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);  /* two int16 as one int32, alias-safe */
    return v;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ESPSTREAM_NO_CLONES)
#include <immintrin.h>
#define ESP_BC_X86 1

__attribute__((target("avx2"))) static void
esp_bcast_avx2(const int16_t *X, ptrdiff_t step, const int16_t *wp, ptrdiff_t cout,
               ptrdiff_t cp, const ptrdiff_t *rx, const ptrdiff_t *rw, const ptrdiff_t *rn,
               ptrdiff_t nr, int32_t *y1, int32_t *y2)
{
    int32_t t1[ESP_BC_BLOCK], t2[ESP_BC_BLOCK];
    for (ptrdiff_t c0 = 0; c0 < cout; c0 += ESP_BC_BLOCK) {
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        __m256i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (ptrdiff_t r = 0; r < nr; r++) {
            const int16_t *xp = X + rx[r], *xq = xp + step;
            const int16_t *w = wp + (rw[r] / 2 * cp + c0) * 2;
            ptrdiff_t np = rn[r] / 2;
            for (ptrdiff_t k = 0; k < np; k++, w += 2 * cp) {
                __m256i xa = _mm256_set1_epi32(esp_ld_pair(xp + 2 * k));
                __m256i xb = _mm256_set1_epi32(esp_ld_pair(xq + 2 * k));
                __m256i w0 = _mm256_loadu_si256((const __m256i *)w);
                __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 16));
                __m256i w2 = _mm256_loadu_si256((const __m256i *)(w + 32));
                __m256i w3 = _mm256_loadu_si256((const __m256i *)(w + 48));
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(xa, w0));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(xa, w1));
                a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(xa, w2));
                a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(xa, w3));
                b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(xb, w0));
                b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(xb, w1));
                b2 = _mm256_add_epi32(b2, _mm256_madd_epi16(xb, w2));
                b3 = _mm256_add_epi32(b3, _mm256_madd_epi16(xb, w3));
            }
        }
        _mm256_storeu_si256((__m256i *)t1, a0);
        _mm256_storeu_si256((__m256i *)(t1 + 8), a1);
        _mm256_storeu_si256((__m256i *)(t1 + 16), a2);
        _mm256_storeu_si256((__m256i *)(t1 + 24), a3);
        _mm256_storeu_si256((__m256i *)t2, b0);
        _mm256_storeu_si256((__m256i *)(t2 + 8), b1);
        _mm256_storeu_si256((__m256i *)(t2 + 16), b2);
        _mm256_storeu_si256((__m256i *)(t2 + 24), b3);
        ptrdiff_t m = cout - c0 < ESP_BC_BLOCK ? cout - c0 : ESP_BC_BLOCK;
        memcpy(y1 + c0, t1, m * sizeof(int32_t));
        if (y2)
            memcpy(y2 + c0, t2, m * sizeof(int32_t));
    }
}

/* Baseline x86-64 (SSE2): the same with 4 channels per register, 16 per block. */
static void esp_bcast_sse2(const int16_t *X, ptrdiff_t step, const int16_t *wp, ptrdiff_t cout,
                           ptrdiff_t cp, const ptrdiff_t *rx, const ptrdiff_t *rw,
                           const ptrdiff_t *rn, ptrdiff_t nr, int32_t *y1, int32_t *y2)
{
    int32_t t1[16], t2[16];
    for (ptrdiff_t c0 = 0; c0 < cout; c0 += 16) {
        __m128i a0 = _mm_setzero_si128(), a1 = a0, a2 = a0, a3 = a0;
        __m128i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (ptrdiff_t r = 0; r < nr; r++) {
            const int16_t *xp = X + rx[r], *xq = xp + step;
            const int16_t *w = wp + (rw[r] / 2 * cp + c0) * 2;
            ptrdiff_t np = rn[r] / 2;
            for (ptrdiff_t k = 0; k < np; k++, w += 2 * cp) {
                __m128i xa = _mm_set1_epi32(esp_ld_pair(xp + 2 * k));
                __m128i xb = _mm_set1_epi32(esp_ld_pair(xq + 2 * k));
                __m128i w0 = _mm_loadu_si128((const __m128i *)w);
                __m128i w1 = _mm_loadu_si128((const __m128i *)(w + 8));
                __m128i w2 = _mm_loadu_si128((const __m128i *)(w + 16));
                __m128i w3 = _mm_loadu_si128((const __m128i *)(w + 24));
                a0 = _mm_add_epi32(a0, _mm_madd_epi16(xa, w0));
                a1 = _mm_add_epi32(a1, _mm_madd_epi16(xa, w1));
                a2 = _mm_add_epi32(a2, _mm_madd_epi16(xa, w2));
                a3 = _mm_add_epi32(a3, _mm_madd_epi16(xa, w3));
                b0 = _mm_add_epi32(b0, _mm_madd_epi16(xb, w0));
                b1 = _mm_add_epi32(b1, _mm_madd_epi16(xb, w1));
                b2 = _mm_add_epi32(b2, _mm_madd_epi16(xb, w2));
                b3 = _mm_add_epi32(b3, _mm_madd_epi16(xb, w3));
            }
        }
        _mm_storeu_si128((__m128i *)t1, a0);
        _mm_storeu_si128((__m128i *)(t1 + 4), a1);
        _mm_storeu_si128((__m128i *)(t1 + 8), a2);
        _mm_storeu_si128((__m128i *)(t1 + 12), a3);
        _mm_storeu_si128((__m128i *)t2, b0);
        _mm_storeu_si128((__m128i *)(t2 + 4), b1);
        _mm_storeu_si128((__m128i *)(t2 + 8), b2);
        _mm_storeu_si128((__m128i *)(t2 + 12), b3);
        ptrdiff_t m = cout - c0 < 16 ? cout - c0 : 16;
        memcpy(y1 + c0, t1, m * sizeof(int32_t));
        if (y2)
            memcpy(y2 + c0, t2, m * sizeof(int32_t));
    }
}
#endif

#if defined(__GNUC__) || defined(__clang__)
#define ESP_MAYBE_UNUSED __attribute__((unused))
#else
#define ESP_MAYBE_UNUSED
#endif

/* Portable twin (any compiler or architecture): the same sums, plain loops. */
ESP_MAYBE_UNUSED static void esp_bcast_c(const int16_t *X, ptrdiff_t step, const int16_t *wp, ptrdiff_t cout,
                        ptrdiff_t cp, const ptrdiff_t *rx, const ptrdiff_t *rw,
                        const ptrdiff_t *rn, ptrdiff_t nr, int32_t *y1, int32_t *y2)
{
    for (ptrdiff_t co = 0; co < cout; co++) {
        int32_t a = 0, b = 0;
        for (ptrdiff_t r = 0; r < nr; r++) {
            const int16_t *xp = X + rx[r], *xq = xp + step;
            const int16_t *w = wp + (rw[r] / 2 * cp + co) * 2;
            for (ptrdiff_t k = 0; k < rn[r] / 2; k++, w += 2 * cp) {
                a += (int32_t)xp[2 * k] * w[0] + (int32_t)xp[2 * k + 1] * w[1];
                b += (int32_t)xq[2 * k] * w[0] + (int32_t)xq[2 * k + 1] * w[1];
            }
        }
        y1[co] = a;
        if (y2)
            y2[co] = b;
    }
}

/* Which of the above this CPU runs: chosen once (cpuid), like an ifunc. */
typedef void (*esp_bcast_fn)(const int16_t *, ptrdiff_t, const int16_t *, ptrdiff_t, ptrdiff_t,
                             const ptrdiff_t *, const ptrdiff_t *, const ptrdiff_t *, ptrdiff_t,
                             int32_t *, int32_t *);

static esp_bcast_fn esp_bcast_pick(void)
{
#ifdef ESP_BC_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        return esp_bcast_avx2;
    return esp_bcast_sse2;
#else
    return esp_bcast_c;
#endif
}

/* ---- All output channels of up to four pixels, AVX-512 VNNI -----------------------------
 * The broadcast form above with vpdpwssd: one instruction multiplies the int16 pairs of 16
 * output channels by a broadcast input pair and adds into int32 lanes (no saturation: the
 * caller guarantees the sums fit), so there is no separate add and each weight load serves up
 * to four pixels (X, X + step, X + 2 step, X + 3 step: neighbouring outputs with the same
 * taps). Same packed weights as esp_bcast_* ([K / 2][cp][2], cp a multiple of 16). Writes
 * y[p][0..C_out) for p < npix. Integer sums are exact in any order: the bits equal the others'. */
typedef void (*esp_vnni_fn)(const int16_t *X, ptrdiff_t step, ptrdiff_t npix, const int16_t *wp,
                            ptrdiff_t cout, ptrdiff_t cp, const ptrdiff_t *rx,
                            const ptrdiff_t *rw, const ptrdiff_t *rn, ptrdiff_t nr,
                            int32_t *y0, int32_t *y1, int32_t *y2, int32_t *y3);

#if defined(ESP_BC_X86) && defined(__GNUC__) && (__GNUC__ >= 8 || defined(__clang__))
#define ESP_VNNI 1
#define ESP_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

/* NP pixels x NB blocks of 16 channels starting at channel c0; NP, NB are constants after
 * inlining, so the 4 x 4 accumulators live in registers. */
#define ESP_VNNI_BODY(NP, NB)                                                                  \
    do {                                                                                       \
        __m512i acc[4][4];                                                                     \
        for (int p = 0; p < NP; p++)                                                           \
            for (int j = 0; j < NB; j++)                                                       \
                acc[p][j] = _mm512_setzero_si512();                                            \
        for (ptrdiff_t r = 0; r < nr; r++) {                                                   \
            const int16_t *xp = X + rx[r];                                                     \
            const int16_t *w = wp + (rw[r] / 2 * cp + c0) * 2;                                 \
            ptrdiff_t np_ = rn[r] / 2;                                                         \
            for (ptrdiff_t k = 0; k < np_; k++, w += 2 * cp) {                                 \
                __m512i wv[4], xv[4];                                                          \
                for (int j = 0; j < NB; j++)                                                   \
                    wv[j] = _mm512_loadu_si512((const void *)(w + 32 * j));                    \
                for (int p = 0; p < NP; p++)                                                   \
                    xv[p] = _mm512_set1_epi32(esp_ld_pair(xp + p * step + 2 * k));             \
                for (int p = 0; p < NP; p++)                                                   \
                    for (int j = 0; j < NB; j++)                                               \
                        acc[p][j] = _mm512_dpwssd_epi32(acc[p][j], xv[p], wv[j]);              \
            }                                                                                  \
        }                                                                                      \
        for (int p = 0; p < NP; p++)                                                           \
            for (int j = 0; j < NB; j++) {                                                     \
                ptrdiff_t left = cout - c0 - 16 * j;                                           \
                __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);  \
                _mm512_mask_storeu_epi32((void *)(ys[p] + c0 + 16 * j), m, acc[p][j]);         \
            }                                                                                  \
    } while (0)

#define ESP_VNNI_FN(NP)                                                                        \
    ESP_VNNI_TARGET static void esp_vnni_np##NP(                                               \
        const int16_t *X, ptrdiff_t step, const int16_t *wp, ptrdiff_t cout, ptrdiff_t cp,     \
        const ptrdiff_t *rx, const ptrdiff_t *rw, const ptrdiff_t *rn, ptrdiff_t nr,           \
        int32_t *const *ys)                                                                    \
    {                                                                                          \
        ptrdiff_t c0 = 0;                                                                      \
        for (; c0 + 64 <= cout; c0 += 64)                                                      \
            ESP_VNNI_BODY(NP, 4);                                                              \
        switch ((cout - c0 + 15) / 16) {                                                       \
        case 4: ESP_VNNI_BODY(NP, 4); break;                                                   \
        case 3: ESP_VNNI_BODY(NP, 3); break;                                                   \
        case 2: ESP_VNNI_BODY(NP, 2); break;                                                   \
        case 1: ESP_VNNI_BODY(NP, 1); break;                                                   \
        default: break;                                                                        \
        }                                                                                      \
    }

ESP_VNNI_FN(1)
ESP_VNNI_FN(2)
ESP_VNNI_FN(3)
ESP_VNNI_FN(4)

static void esp_vnni(const int16_t *X, ptrdiff_t step, ptrdiff_t npix, const int16_t *wp,
                     ptrdiff_t cout, ptrdiff_t cp, const ptrdiff_t *rx, const ptrdiff_t *rw,
                     const ptrdiff_t *rn, ptrdiff_t nr, int32_t *y0, int32_t *y1, int32_t *y2,
                     int32_t *y3)
{
    int32_t *ys[4] = {y0, y1, y2, y3};
    switch (npix) {
    case 4: esp_vnni_np4(X, step, wp, cout, cp, rx, rw, rn, nr, ys); break;
    case 3: esp_vnni_np3(X, step, wp, cout, cp, rx, rw, rn, nr, ys); break;
    case 2: esp_vnni_np2(X, step, wp, cout, cp, rx, rw, rn, nr, ys); break;
    default: esp_vnni_np1(X, step, wp, cout, cp, rx, rw, rn, nr, ys); break;
    }
}
#endif

/* The VNNI form where this CPU has it (AVX-512 F, BW and VNNI), else NULL: the caller then
 * runs the two-pixel broadcast form. */
static esp_vnni_fn esp_vnni_pick(void)
{
#ifdef ESP_VNNI
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vnni"))
        return esp_vnni;
#endif
    return NULL;
}

/* ---- Depthwise, AVX2 -------------------------------------------------------------------
 * vpmaddwd sums lane pairs, but depthwise channels must not mix: with weights whose odd
 * channels are zeroed (we) one vpmaddwd gives the even channels' products in int32 lanes, with
 * the even ones zeroed (wo) the odd channels'. Weights are packed once per layer by
 * esp_dw_pack as we[T][C] then wo[T][C]; 16 channels per step, the rest in plain C. */
static void esp_dw_pack(const int16_t *w, ptrdiff_t T, ptrdiff_t C, int16_t *wp)
{
    for (ptrdiff_t i = 0; i < T * C; i++) {
        wp[i] = (i % C) % 2 == 0 ? w[i] : 0;
        wp[T * C + i] = (i % C) % 2 == 1 ? w[i] : 0;
    }
}

typedef void (*esp_dw_fn)(const int16_t *, const int16_t *, const int16_t *, ptrdiff_t,
                          const ptrdiff_t *, const ptrdiff_t *, ptrdiff_t, ptrdiff_t, int32_t *);

/* Plain twin: w [T][C] unpacked (wp unused). */
static void esp_dw_plain(const int16_t *X, const int16_t *w, const int16_t *wp, ptrdiff_t T,
                         const ptrdiff_t *xo, const ptrdiff_t *wo, ptrdiff_t nt, ptrdiff_t C,
                         int32_t *acc)
{
    (void)wp;
    (void)T;
    esp_dw_pixel(X, w, xo, wo, nt, C, acc);
}

#ifdef ESP_BC_X86
__attribute__((target("avx2"))) static void
esp_dw_avx2(const int16_t *X, const int16_t *w, const int16_t *wp, ptrdiff_t T,
            const ptrdiff_t *xo, const ptrdiff_t *wo, ptrdiff_t nt, ptrdiff_t C, int32_t *acc)
{
    ptrdiff_t c = 0, TC = T * C;
    for (; c + 16 <= C; c += 16) {
        __m256i ev = _mm256_setzero_si256(), od = ev;
        for (ptrdiff_t t = 0; t < nt; t++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(X + xo[t] + c));
            const int16_t *q = wp + wo[t] + c;
            ev = _mm256_add_epi32(ev, _mm256_madd_epi16(x, _mm256_loadu_si256((const __m256i *)q)));
            od = _mm256_add_epi32(od, _mm256_madd_epi16(x, _mm256_loadu_si256((const __m256i *)(q + TC))));
        }
        /* ev lane i = channel c + 2i, od lane i = c + 2i + 1: back to channel order */
        __m256i lo = _mm256_unpacklo_epi32(ev, od), hi = _mm256_unpackhi_epi32(ev, od);
        _mm256_storeu_si256((__m256i *)(acc + c), _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256((__m256i *)(acc + c + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
    for (; c < C; c++) {
        int32_t a = 0;
        for (ptrdiff_t t = 0; t < nt; t++)
            a += (int32_t)X[xo[t] + c] * w[wo[t] + c];
        acc[c] = a;
    }
}
#endif

static esp_dw_fn esp_dw_pick(void)
{
#ifdef ESP_BC_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        return esp_dw_avx2;
#endif
    return esp_dw_plain;
}

/* ---- Depthwise, AVX-512 VNNI, whole image ------------------------------------------------
 * Two column taps per vpdpwssd: for a block of 32 channels each input row is rebuilt once per
 * call (as output rows need it) as int16 pairs P[r][u][c] = (x[r][u - pl][c], x[r][u - pl + dw][c]) (zero outside the
 * image or the channels), so output column ow's taps (i, 2 jp) and (i, 2 jp + 1) are one
 * 32-bit lane of P[oh * sh - pt + i * dh][ow * sw + 2 jp * dw] times the packed weight pair
 * (w[i][2 jp][c], w[i][2 jp + 1][c]) (the odd kernel width's last pair has a zero weight).
 * The pairs come from vpunpck{l,h}wd of two sign-extended columns, which interleave within
 * 128-bit lanes: a block is two registers ("halves" h = 0, 1) whose int32 lane l holds channel
 * esp_dw2_ch(h, l) = 8 (l / 4) + 4 h + l % 4; weights and constants are packed in that order,
 * and two vpunpck{l,h}dq put the int8 results back in channel order. Up to eight output
 * columns share each weight load; accumulators start at the bias (add), are shifted in
 * registers (esp_rq32_i8's arithmetic: >> shift, ties to even when `even`), clamped by the
 * saturating int32 -> int8 narrowing (and lo), and stored as int8. Integer sums are exact in
 * any order: the bits equal the other paths'.
 * Weights wq: [ceil(C / 32)][KH][KWp][2][16] pairs (KWp = ceil(KW / 2)) by esp_dw2_pack; rq:
 * add, shift, half as three int32 arrays of Cp = 32 ceil(C / 32), same order (padding: 0, 1,
 * 1); pbuf: R * Wp * 32 int32 with R = (KH - 1) dh + 1 (the rows one output row reads) and
 * Wp = (OW - 1) sw + 2 (KWp - 1) dw + 1. */
#define ESP_DW2_TAPS 64  /* at most KH * ceil(KW / 2) tap pairs (the caller checks) */

static ptrdiff_t esp_dw2_wp(ptrdiff_t OW, ptrdiff_t sw, ptrdiff_t KW, ptrdiff_t dw)
{
    return (OW - 1) * sw + 2 * ((KW + 1) / 2 - 1) * dw + 1;
}

static inline ptrdiff_t esp_dw2_ch(ptrdiff_t k)  /* k = 16 h + l within a block */
{
    ptrdiff_t h = k / 16, l = k % 16;
    return 8 * (l / 4) + 4 * h + l % 4;
}

static void esp_dw2_pack(const int16_t *w, ptrdiff_t KH, ptrdiff_t KW, ptrdiff_t C,
                         int32_t *wq)
{
    ptrdiff_t KWp = (KW + 1) / 2, nb = (C + 31) / 32;
    for (ptrdiff_t b = 0; b < nb; b++)
        for (ptrdiff_t i = 0; i < KH; i++)
            for (ptrdiff_t jp = 0; jp < KWp; jp++)
                for (ptrdiff_t k = 0; k < 32; k++) {
                    ptrdiff_t ch = 32 * b + esp_dw2_ch(k), j = 2 * jp;
                    uint16_t lo = 0, hi = 0;
                    if (ch < C) {
                        lo = (uint16_t)w[(i * KW + j) * C + ch];
                        if (j + 1 < KW)
                            hi = (uint16_t)w[(i * KW + j + 1) * C + ch];
                    }
                    wq[((b * KH + i) * KWp + jp) * 32 + k] = (int32_t)((uint32_t)lo
                                                                       | ((uint32_t)hi << 16));
                }
}

#ifdef ESP_VNNI
#define ESP_DW2_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* acc + the pairs' products, in place: GCC's intrinsic copies each accumulator in and out of
 * another register around every vpdpwssd in these loops (two extra moves per product) */
ESP_DW2_TARGET static inline __m512i esp_dpw(__m512i acc, __m512i a, __m512i b)
{
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* NP output columns from ow of row oh for one 32-channel block (weights wb) into y (already
 * at column ow, channel cb); NP is a constant after inlining. */
#define ESP_DW2_BODY(NP)                                                                       \
    do {                                                                                       \
        __m512i a0[NP], a1[NP];                                                                \
        for (int p = 0; p < NP; p++) {                                                         \
            a0[p] = va0;                                                                       \
            a1[p] = va1;                                                                       \
        }                                                                                      \
        const int32_t *pc = P + ow * sw * 32;                                                  \
        for (ptrdiff_t t = 0; t < nt; t++) {                                                   \
            __m512i w0 = _mm512_loadu_si512((const void *)(wb + woff[t]));                     \
            __m512i w1 = _mm512_loadu_si512((const void *)(wb + woff[t] + 16));                \
            const int32_t *pj = pc + poff[t];                                                  \
            for (int p = 0; p < NP; p++) {                                                     \
                const int32_t *q = pj + p * sw * 32;                                           \
                a0[p] = esp_dpw(a0[p], _mm512_loadu_si512((const void *)q), w0);               \
                a1[p] = esp_dpw(a1[p], _mm512_loadu_si512((const void *)(q + 16)), w1);        \
            }                                                                                  \
        }                                                                                      \
        for (int p = 0; p < NP; p++) {                                                         \
            __m512i q0, q1;                                                                    \
            if (even) {                                                                        \
                __m512i o0 = _mm512_and_si512(_mm512_srav_epi32(a0[p], vs0), one);             \
                __m512i o1 = _mm512_and_si512(_mm512_srav_epi32(a1[p], vs1), one);             \
                q0 = _mm512_srav_epi32(_mm512_add_epi32(_mm512_add_epi32(a0[p], vh0), o0),     \
                                       vs0);                                                   \
                q1 = _mm512_srav_epi32(_mm512_add_epi32(_mm512_add_epi32(a1[p], vh1), o1),     \
                                       vs1);                                                   \
            } else {                                                                           \
                q0 = _mm512_srav_epi32(a0[p], vs0);                                            \
                q1 = _mm512_srav_epi32(a1[p], vs1);                                            \
            }                                                                                  \
            __m128i l8 = _mm512_cvtsepi32_epi8(q0), h8 = _mm512_cvtsepi32_epi8(q1);            \
            __m256i o = _mm256_inserti128_si256(                                               \
                _mm256_castsi128_si256(_mm_unpacklo_epi32(l8, h8)),                            \
                _mm_unpackhi_epi32(l8, h8), 1);                                                \
            if (relu)                                                                          \
                o = _mm256_max_epi8(o, vlo);                                                   \
            _mm256_mask_storeu_epi8((void *)(y + p * C), cm, o);                               \
        }                                                                                      \
    } while (0)

ESP_DW2_TARGET static void
esp_dw2_vnni(const int8_t *x, ptrdiff_t H, ptrdiff_t W, ptrdiff_t C, ptrdiff_t KH, ptrdiff_t KW,
             ptrdiff_t sh, ptrdiff_t sw, ptrdiff_t dh, ptrdiff_t dw, ptrdiff_t pt, ptrdiff_t pl,
             ptrdiff_t OH, ptrdiff_t OW, const int32_t *wq, const int32_t *rq, int32_t even,
             int32_t lo, int32_t hi, int8_t *Y, int32_t *P)
{
    /* int8 output: hi is 127 (the narrowing's own bound), lo -128 or above (ReLU: 0) */
    ptrdiff_t KWp = (KW + 1) / 2, nb = (C + 31) / 32, Cp = 32 * nb;
    ptrdiff_t Wp = esp_dw2_wp(OW, sw, KW, dw), R = (KH - 1) * dh + 1;
    int relu = lo > -128;
    const __m512i one = _mm512_set1_epi32(1);
    const __m256i vlo = _mm256_set1_epi8((char)(lo < -128 ? -128 : lo));
    (void)hi;
    for (ptrdiff_t b = 0; b < nb; b++) {
        ptrdiff_t cb = 32 * b, left = C - cb, built = 0;
        __mmask32 cm = left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
        const int32_t *wb = wq + b * KH * KWp * 32;
        const __m512i va0 = _mm512_loadu_si512((const void *)(rq + cb));
        const __m512i va1 = _mm512_loadu_si512((const void *)(rq + cb + 16));
        const __m512i vs0 = _mm512_loadu_si512((const void *)(rq + Cp + cb));
        const __m512i vs1 = _mm512_loadu_si512((const void *)(rq + Cp + cb + 16));
        const __m512i vh0 = _mm512_sub_epi32(
            _mm512_loadu_si512((const void *)(rq + 2 * Cp + cb)), one);
        const __m512i vh1 = _mm512_sub_epi32(
            _mm512_loadu_si512((const void *)(rq + 2 * Cp + cb + 16)), one);
        for (ptrdiff_t oh = 0; oh < OH; oh++) {
            /* the kernel rows inside the image */
            ptrdiff_t i0 = 0, i1 = KH;
            while (i0 < KH && oh * sh - pt + i0 * dh < 0)
                i0++;
            while (i1 > i0 && oh * sh - pt + (i1 - 1) * dh >= H)
                i1--;
            /* the pairs of the rows this output row reads, built once each (input rows in
             * increasing order) into a ring of R rows that stays in the L1 cache: int8 ->
             * int16, interleaved with the column dw further (zero outside the image) */
            /* every row of the ring's span [rhi - R + 1, rhi] not built yet (the rows read
             * are dh apart: a row skipped by one output row may be read by the next) */
            ptrdiff_t rhi = oh * sh - pt + (i1 - 1) * dh, r = rhi - R + 1;
            for (r = r > built ? r : built; i0 < i1 && r <= rhi; r++) {
                const int8_t *xr = x + r * W * C + cb;
                int32_t *pr = P + (r % R) * Wp * 32;
                for (ptrdiff_t u = 0; u < Wp; u++) {
                    ptrdiff_t a = u - pl, a2 = a + dw;
                    __m512i xa = _mm512_setzero_si512(), xb = xa;
                    if (a >= 0 && a < W)
                        xa = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(cm, xr + a * C));
                    if (a2 >= 0 && a2 < W)
                        xb = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(cm, xr + a2 * C));
                    _mm512_storeu_si512((void *)(pr + 32 * u), _mm512_unpacklo_epi16(xa, xb));
                    _mm512_storeu_si512((void *)(pr + 32 * u + 16),
                                        _mm512_unpackhi_epi16(xa, xb));
                }
                built = r + 1;
            }
            /* columns in ng groups of near-equal size (at most 8: the accumulators), so
             * every group has several independent vpdpwssd chains (a lone column would wait
             * on the latency) */
            /* the taps of this output row: ring row and column pair, weight pair */
            ptrdiff_t nt = 0, poff[ESP_DW2_TAPS], woff[ESP_DW2_TAPS];
            for (ptrdiff_t i = i0; i < i1; i++)
                for (ptrdiff_t jp = 0; jp < KWp; jp++, nt++) {
                    poff[nt] = (((oh * sh - pt + i * dh) % R) * Wp + 2 * jp * dw) * 32;
                    woff[nt] = (i * KWp + jp) * 32;
                }
            int8_t *y = Y + oh * OW * C + cb;
            ptrdiff_t ng = (OW + 7) / 8, ow = 0;
            for (ptrdiff_t g = 0; g < ng; g++) {
                ptrdiff_t n = (OW - ow) / (ng - g);
                switch (n) {
                case 8: ESP_DW2_BODY(8); break;
                case 7: ESP_DW2_BODY(7); break;
                case 6: ESP_DW2_BODY(6); break;
                case 5: ESP_DW2_BODY(5); break;
                case 4: ESP_DW2_BODY(4); break;
                case 3: ESP_DW2_BODY(3); break;
                case 2: ESP_DW2_BODY(2); break;
                default: ESP_DW2_BODY(1); break;
                }
                ow += n;
                y += n * C;
            }
        }
    }
}
#endif

/* The whole-image depthwise loop where this CPU has AVX-512 VNNI (and VL), else NULL. */
typedef void (*esp_dw2_fn)(const int8_t *, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                           ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                           ptrdiff_t, ptrdiff_t, ptrdiff_t, const int32_t *, const int32_t *,
                           int32_t, int32_t, int32_t, int8_t *, int32_t *);

static esp_dw2_fn esp_dw2_pick(void)
{
#ifdef ESP_VNNI
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return esp_dw2_vnni;
#endif
    return NULL;
}

/* ---- Elementwise (flat arrays) -----------------------------------------------------------
 * Saturating add / sub of int8 (sums in int16) or int16 (sums in int32): exact, then clipped.
 * Requantize of int8 / int16 data with one shift s in [-15, 30]: every intermediate of
 * round(v * 2**-s) fits int32 (|v| << 15 <= 2**30, |v| + 2**29 < 2**31), half-up or half-even
 * (even != 0), then saturation to [lo, hi]. Each loop is one pass the compiler vectorises. */
#define ESP_ADDSUB(NAME, T, W)                                                                 \
    ESP_HOT static void NAME(const T *a, const T *b, T *y, ptrdiff_t n, int sub, W lo, W hi)   \
    {                                                                                          \
        if (sub) {                                                                             \
            for (ptrdiff_t i = 0; i < n; i++) {                                                \
                W v = (W)a[i] - (W)b[i];                                                       \
                v = v < lo ? lo : v;                                                           \
                y[i] = (T)(v > hi ? hi : v);                                                   \
            }                                                                                  \
        } else {                                                                               \
            for (ptrdiff_t i = 0; i < n; i++) {                                                \
                W v = (W)a[i] + (W)b[i];                                                       \
                v = v < lo ? lo : v;                                                           \
                y[i] = (T)(v > hi ? hi : v);                                                   \
            }                                                                                  \
        }                                                                                      \
    }
ESP_ADDSUB(esp_addsub_i8, int8_t, int16_t)
ESP_ADDSUB(esp_addsub_i16, int16_t, int32_t)

#define ESP_RQ(NAME, S, D)                                                                     \
    ESP_HOT static void NAME(const S *x, D *y, ptrdiff_t n, int32_t s, int even, int32_t lo,   \
                             int32_t hi)                                                       \
    {                                                                                          \
        if (s <= 0) {                                                                          \
            int32_t m = (int32_t)1 << -s;                                                      \
            for (ptrdiff_t i = 0; i < n; i++) {                                                \
                int32_t v = (int32_t)x[i] * m;                                                 \
                v = v < lo ? lo : v;                                                           \
                y[i] = (D)(v > hi ? hi : v);                                                   \
            }                                                                                  \
        } else if (!even) {                                                                    \
            int32_t h = (int32_t)1 << (s - 1);                                                 \
            for (ptrdiff_t i = 0; i < n; i++) {                                                \
                int32_t v = ((int32_t)x[i] + h) >> s;                                          \
                v = v < lo ? lo : v;                                                           \
                y[i] = (D)(v > hi ? hi : v);                                                   \
            }                                                                                  \
        } else {                                                                               \
            int32_t h = (int32_t)1 << (s - 1);                                                 \
            for (ptrdiff_t i = 0; i < n; i++) { /* ties to even, as in esp_rq32_i8 */          \
                int32_t v = x[i], q = (v + (h - 1) + ((v >> s) & 1)) >> s;                     \
                q = q < lo ? lo : q;                                                           \
                y[i] = (D)(q > hi ? hi : q);                                                   \
            }                                                                                  \
        }                                                                                      \
    }
ESP_RQ(esp_rq_i8_i8, int8_t, int8_t)
ESP_RQ(esp_rq_i8_i16, int8_t, int16_t)
ESP_RQ(esp_rq_i16_i8, int16_t, int8_t)
ESP_RQ(esp_rq_i16_i16, int16_t, int16_t)

/* ---- GRU / LSTM time loop (espstream/ops/recurrent.py's rnn_forward, in C) ----------------
 * The same integer and float32 steps in the same order as rnn_forward (its docstring has the
 * rules); float32 arithmetic must stay IEEE single operations one by one, so this code is never
 * cloned for other instruction sets and contraction into FMAs is turned off. The caller checks
 * the ranges (shifts in [-20, 62], rows short enough that no float conversion overflows). */
#if defined(__clang__)
#define ESP_NO_CONTRACT _Pragma("clang fp contract(off)")
#else
#define ESP_NO_CONTRACT
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
#include <math.h>

typedef struct {
    int lstm, dirs, p4, pie_w, pie_r;  /* p4: esp32p4 (rint, PIE ties to even), else floor / up */
    ptrdiff_t H, nin, seq;       /* hidden size, input features, frames */
    const int32_t *w[2], *r[2];        /* [G * H, I], [G * H, H] */
    const int64_t *wb[2], *rb[2];      /* [G * H] or NULL */
    const int16_t *wp[2], *rp[2];      /* narrow: W, R packed in input pairs (esp_pack_pairs,
                                          cp channels, rows of nin2 / H2 = even lengths) */
    ptrdiff_t cp, nin2, H2;
    esp_vnni_fn vnni;                  /* the conv loops sum the int8 case exactly in int32: */
    esp_bcast_fn bc;                   /* VNNI where the CPU has it, else the broadcast form */
    int narrow;
    int vec;  /* the AVX2 unit loop may run: symmetric tables, bounded scales, a CPU with AVX2 */
    int w_shift, r_shift;
    const float *sig, *tnh;            /* gate tables [qmax + 1] */
    int64_t sig_qmin, sig_qmax, tnh_qmin, tnh_qmax;
    float resc_y, resc_c;
    int64_t lo, hi;
} esp_rnn_args;

/* rintf without a libm call where it is exact: adding and removing 1.5 * 2**23 rounds half to
 * even for |v| < 2**22 (both steps are exact float32 operations); beyond, libm. */
static inline float esp_rintf(float v)
{
    ESP_NO_CONTRACT
    const float magic = 12582912.0f;
    if (v > -4194304.0f && v < 4194304.0f)
        return (v + magic) - magic;
    return rintf(v);
}

static inline float esp_floorf(float v)
{
    ESP_NO_CONTRACT
    if (v > -4194304.0f && v < 4194304.0f) {
        float r = esp_rintf(v);
        return r > v ? r - 1.0f : r;
    }
    return floorf(v);
}

static inline int64_t esp_round_c(float v, int p4)
{
    ESP_NO_CONTRACT
    if (p4)
        return (int64_t)esp_rintf(v);
    return (int64_t)esp_floorf((float)((double)v + 0.5));
}

static inline int64_t esp_wrap16(int64_t v) { return ((v + 32768) & 0xFFFF) - 32768; }

static inline int64_t esp_sat(int64_t v, int64_t lo, int64_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline float esp_lut(const float *t, int64_t qmin, int64_t qmax, int odd, int64_t i)
{
    ESP_NO_CONTRACT
    /* GateTable.get without branches on the data: both halves read, one chosen */
    int64_t ip = i < 0 ? 0 : (i < qmax ? i : qmax);
    int64_t in = i > qmin ? -i : qmax;
    in = in < 0 ? 0 : in;
    float tp = t[ip], tn = t[in];
    float neg = odd ? -tn : 1.0f - tn;
    return i >= 0 ? tp : neg;
}

static inline int64_t esp_mat_out(int64_t acc, int shift, int pie, int p4)
{
    ESP_NO_CONTRACT
    int64_t out;
    if (pie) {  /* shift >= 0 */
        int s = shift > 62 ? 62 : shift;
        if (s == 0) {
            out = acc;
        } else if (p4) {
            int64_t q = acc >> s, rest = acc - (q << s), half = (int64_t)1 << (s - 1);
            out = q + ((rest > half) | ((rest == half) & (q & 1)));
        } else {
            out = (acc + ((int64_t)1 << (s - 1))) >> s;
        }
    } else {
        float scale = (float)ldexp(1.0, -shift);
        out = esp_round_c((float)acc * scale, p4);
    }
    return esp_sat(out, -32768, 32767);
}

static inline int64_t esp_mat_row(const int32_t *m, const int64_t *v, ptrdiff_t n, int shift,
                                  int pie, int p4)
{
    int64_t acc = 0;
    for (ptrdiff_t k = 0; k < n; k++)
        acc += (int64_t)m[k] * v[k];
    return esp_mat_out(acc, shift, pie, p4);
}

/* esp_mat_out over n int32 sums (the int8 case: |acc| <= 2**29) into out: the PIE roundings
 * with 1 <= shift <= 30 as loops the compiler vectorises (|acc| + half fits int32), the rest
 * element by element. */
static inline void esp_mat_outs(const int32_t *acc, int64_t *out, ptrdiff_t n, int shift,
                                int pie, int p4)
{
    if (pie && shift >= 1 && shift <= 30) {
        int32_t h = (int32_t)1 << (shift - 1);
        if (p4) {
            for (ptrdiff_t k = 0; k < n; k++) {
                int32_t v = acc[k], q = (v + (h - 1) + ((v >> shift) & 1)) >> shift;
                out[k] = q < -32768 ? -32768 : (q > 32767 ? 32767 : q);
            }
        } else {
            for (ptrdiff_t k = 0; k < n; k++) {
                int32_t q = (acc[k] + h) >> shift;
                out[k] = q < -32768 ? -32768 : (q > 32767 ? 32767 : q);
            }
        }
        return;
    }
    for (ptrdiff_t k = 0; k < n; k++)
        out[k] = esp_mat_out(acc[k], shift, pie, p4);
}

#ifdef ESP_BC_X86
/* The unit loops of esp_rnn eight hidden units at a time (AVX2, no FMA: each float32 step is
 * the same IEEE operation as the scalar code's, gathers read the same table entries, roundps /
 * floorps / the double step are the scalar roundings exactly). The caller guarantees symmetric
 * tables (qmin = -qmax) and scales small enough that every rounded value fits int32. Returns
 * how many units it did (a multiple of 8); the scalar loop does the rest. */
#define ESP_AVX2 __attribute__((target("avx2")))

ESP_AVX2 static inline __m256i esp_ld8(const int64_t *p)
{
    return _mm256_setr_epi32((int32_t)p[0], (int32_t)p[1], (int32_t)p[2], (int32_t)p[3],
                             (int32_t)p[4], (int32_t)p[5], (int32_t)p[6], (int32_t)p[7]);
}

ESP_AVX2 static inline void esp_st8(int64_t *p, __m256i v)
{
    int32_t t[8];
    _mm256_storeu_si256((__m256i *)t, v);
    for (int k = 0; k < 8; k++)
        p[k] = t[k];
}

ESP_AVX2 static inline __m256 esp_lut8(const float *t, int32_t qmax, int odd, __m256i i)
{
    ESP_NO_CONTRACT
    __m256i zero = _mm256_setzero_si256(), q = _mm256_set1_epi32(qmax);
    __m256i ip = _mm256_min_epi32(_mm256_max_epi32(i, zero), q);
    __m256i in = _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(zero, i), zero), q);
    __m256 tp = _mm256_i32gather_ps(t, ip, 4), tn = _mm256_i32gather_ps(t, in, 4);
    __m256 neg = odd ? _mm256_xor_ps(tn, _mm256_set1_ps(-0.0f))
                     : _mm256_sub_ps(_mm256_set1_ps(1.0f), tn);
    __m256i nonneg = _mm256_cmpgt_epi32(i, _mm256_set1_epi32(-1));
    return _mm256_blendv_ps(neg, tp, _mm256_castsi256_ps(nonneg));
}

ESP_AVX2 static inline __m256i esp_round8(__m256 v, int p4)
{
    ESP_NO_CONTRACT
    __m256 r;
    if (p4) {
        r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {  /* floorf((float)((double)v + 0.5)) */
        __m256d half = _mm256_set1_pd(0.5);
        __m256d lo = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), half);
        __m256d hi = _mm256_add_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), half);
        r = _mm256_floor_ps(_mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo)));
    }
    return _mm256_cvttps_epi32(r);
}

ESP_AVX2 static inline __m256i esp_sat8(__m256i v, int32_t lo, int32_t hi)
{
    return _mm256_min_epi32(_mm256_max_epi32(v, _mm256_set1_epi32(lo)), _mm256_set1_epi32(hi));
}

ESP_AVX2 static ptrdiff_t esp_gru_units_avx2(const esp_rnn_args *a, const int64_t *ic,
                                             const int64_t *hc, const int64_t *h, int64_t *hx)
{
    ESP_NO_CONTRACT
    ptrdiff_t H = a->H, j = 0;
    int32_t sq = (int32_t)a->sig_qmax, tq = (int32_t)a->tnh_qmax;
    __m256 one = _mm256_set1_ps(1.0f), ry = _mm256_set1_ps(a->resc_y);
    for (; j + 8 <= H; j += 8) {
        __m256 z = esp_lut8(a->sig, sq, 0, _mm256_add_epi32(esp_ld8(ic + j), esp_ld8(hc + j)));
        __m256 r = esp_lut8(a->sig, sq, 0, _mm256_add_epi32(esp_ld8(ic + H + j),
                                                              esp_ld8(hc + H + j)));
        __m256 hn = _mm256_cvtepi32_ps(esp_ld8(hc + 2 * H + j));
        __m256 icn = _mm256_cvtepi32_ps(esp_ld8(ic + 2 * H + j));
        __m256 rh = _mm256_mul_ps(r, hn);
        __m256i idx = esp_round8(_mm256_add_ps(icn, rh), a->p4);
        __m256 n = esp_lut8(a->tnh, tq, 1, idx);
        __m256 tmp = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(one, z), n), ry);
        __m256 zh = _mm256_mul_ps(z, _mm256_cvtepi32_ps(esp_ld8(h + j)));
        tmp = _mm256_add_ps(tmp, zh);
        esp_st8(hx + j, esp_sat8(esp_round8(tmp, a->p4), (int32_t)a->lo, (int32_t)a->hi));
    }
    return j;
}

ESP_AVX2 static ptrdiff_t esp_lstm_units_avx2(const esp_rnn_args *a, const int64_t *g4,
                                              int64_t *c, int64_t *hx)
{
    ESP_NO_CONTRACT
    ptrdiff_t H = a->H, j = 0;
    int32_t sq = (int32_t)a->sig_qmax, tq = (int32_t)a->tnh_qmax;
    __m256 rc = _mm256_set1_ps(a->resc_c), ry = _mm256_set1_ps(a->resc_y);
    __m256i k32 = _mm256_set1_epi32(32768), m16 = _mm256_set1_epi32(0xFFFF);
    for (; j + 8 <= H; j += 8) {
        __m256 ig_ = esp_lut8(a->sig, sq, 0, esp_ld8(g4 + j));
        __m256 og = esp_lut8(a->sig, sq, 0, esp_ld8(g4 + H + j));
        __m256 fg = esp_lut8(a->sig, sq, 0, esp_ld8(g4 + 2 * H + j));
        __m256 gg = esp_lut8(a->tnh, tq, 1, esp_ld8(g4 + 3 * H + j));
        __m256 ig = _mm256_mul_ps(_mm256_mul_ps(ig_, gg), rc);
        __m256 fc = _mm256_mul_ps(fg, _mm256_cvtepi32_ps(esp_ld8(c + j)));
        __m256i cn = esp_round8(_mm256_add_ps(fc, ig), a->p4);
        cn = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(cn, k32), m16), k32);
        esp_st8(c + j, cn);
        __m256 t2 = _mm256_mul_ps(_mm256_mul_ps(og, esp_lut8(a->tnh, tq, 1, cn)), ry);
        esp_st8(hx + j, esp_sat8(esp_round8(t2, a->p4), (int32_t)a->lo, (int32_t)a->hi));
    }
    return j;
}
#endif

static int esp_rnn_avx2(void)
{
#ifdef ESP_BC_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

/* out[0..rows) = packed rows . v (v of n2 int16, even), through the conv's all-channel loop */
static inline void esp_rnn_mv(const esp_rnn_args *a, const int16_t *v, const int16_t *wp,
                              ptrdiff_t n2, ptrdiff_t rows, int32_t *out)
{
    ptrdiff_t rx = 0, rw = 0, rn = n2;
    if (a->vnni)
        a->vnni(v, 0, 1, wp, rows, a->cp, &rx, &rw, &rn, 1, out, NULL, NULL, NULL);
    else
        a->bc(v, 0, wp, rows, a->cp, &rx, &rw, &rn, 1, out, NULL);
}

/* x [seq, nin] (int64), h0 / c0 [dirs, H] or NULL; y [seq, dirs, H], yh, yc [dirs, H]; scratch:
 * 3 * G * H + 3 * H int64, scratch16: nin + H + 2 int16. `narrow` (int8 W, R, x and h) takes
 * the packed weights and sums in int32 (exact: |product| <= 2**14, at most 2**15 terms). */
static void esp_rnn(const esp_rnn_args *a, const int64_t *x, const int64_t *h0,
                    const int64_t *c0, int64_t *y, int64_t *yh, int64_t *yc, int64_t *scratch,
                    int16_t *scratch16)
{
    ESP_NO_CONTRACT
    ptrdiff_t H = a->H, nin = a->nin, G = a->lstm ? 4 : 3, GH = G * H;
    int64_t *ic = scratch, *hc = scratch + GH, *h = hc + GH, *c = h + H, *hx = c + H;
    int16_t *x16 = scratch16, *h16 = scratch16 + a->nin2;  /* narrow: x_t, h as int16 */
    int32_t *s32 = (int32_t *)(hx + H);                 /* narrow: 2 * G * H int32 sums */
    for (int d = 0; d < a->dirs; d++) {
        for (ptrdiff_t j = 0; j < H; j++) {
            h[j] = h0 ? h0[d * H + j] : 0;
            c[j] = c0 ? c0[d * H + j] : 0;
        }
        for (ptrdiff_t st = 0; st < a->seq; st++) {
            ptrdiff_t s = d == 0 ? st : a->seq - 1 - st;
            const int64_t *xs = x + s * nin;
            if (a->narrow) {
                for (ptrdiff_t k = 0; k < nin; k++)
                    x16[k] = (int16_t)xs[k];
                for (ptrdiff_t j = 0; j < H; j++)
                    h16[j] = (int16_t)h[j];
                if (a->nin2 > nin)
                    x16[nin] = 0;  /* the padding pair's zero */
                if (a->H2 > H)
                    h16[H] = 0;
                esp_rnn_mv(a, x16, a->wp[d], a->nin2, GH, s32);
                esp_rnn_mv(a, h16, a->rp[d], a->H2, GH, s32 + GH);
                esp_mat_outs(s32, ic, GH, a->w_shift, a->pie_w, a->p4);
                esp_mat_outs(s32 + GH, hc, GH, a->r_shift, a->pie_r, a->p4);
            } else {
                for (ptrdiff_t k = 0; k < GH; k++) {
                    ic[k] = esp_mat_row(a->w[d] + k * nin, xs, nin, a->w_shift, a->pie_w,
                                        a->p4);
                    hc[k] = esp_mat_row(a->r[d] + k * H, h, H, a->r_shift, a->pie_r, a->p4);
                }
            }
            if (!a->lstm) {
                if (a->wb[d]) {
                    for (ptrdiff_t k = 0; k < GH; k++) {
                        ic[k] = esp_wrap16(ic[k] + a->wb[d][k]);
                        hc[k] = esp_wrap16(hc[k] + a->rb[d][k]);
                    }
                }
                ptrdiff_t j0 = 0;
#ifdef ESP_BC_X86
                if (a->vec)
                    j0 = esp_gru_units_avx2(a, ic, hc, h, hx);
#endif
                for (ptrdiff_t j = j0; j < H; j++) {
                    float z = esp_lut(a->sig, a->sig_qmin, a->sig_qmax, 0, ic[j] + hc[j]);
                    float r = esp_lut(a->sig, a->sig_qmin, a->sig_qmax, 0,
                                      ic[H + j] + hc[H + j]);
                    float hn = (float)hc[2 * H + j], icn = (float)ic[2 * H + j];
                    float rh = r * hn;
                    int64_t idx = esp_round_c(icn + rh, a->p4);
                    float n = esp_lut(a->tnh, a->tnh_qmin, a->tnh_qmax, 1, idx);
                    float tmp = ((1.0f - z) * n) * a->resc_y;
                    float zh = z * (float)h[j];
                    tmp = tmp + zh;
                    hx[j] = esp_sat(esp_round_c(tmp, a->p4), a->lo, a->hi);
                }
            } else {
                for (ptrdiff_t k = 0; k < GH; k++)
                    ic[k] = a->wb[d] ? esp_wrap16(ic[k] + (a->wb[d][k] + hc[k] + a->rb[d][k]))
                                     : esp_wrap16(ic[k] + hc[k]);
                ptrdiff_t j0 = 0;
#ifdef ESP_BC_X86
                if (a->vec)
                    j0 = esp_lstm_units_avx2(a, ic, c, hx);
#endif
                for (ptrdiff_t j = j0; j < H; j++) {
                    float ig_ = esp_lut(a->sig, a->sig_qmin, a->sig_qmax, 0, ic[j]);
                    float og = esp_lut(a->sig, a->sig_qmin, a->sig_qmax, 0, ic[H + j]);
                    float fg = esp_lut(a->sig, a->sig_qmin, a->sig_qmax, 0, ic[2 * H + j]);
                    float gg = esp_lut(a->tnh, a->tnh_qmin, a->tnh_qmax, 1, ic[3 * H + j]);
                    float ig = (ig_ * gg) * a->resc_c;
                    float fc = fg * (float)c[j];
                    float tmp = fc + ig;
                    c[j] = esp_wrap16(esp_round_c(tmp, a->p4));
                    float t2 = (og * esp_lut(a->tnh, a->tnh_qmin, a->tnh_qmax, 1, c[j]))
                               * a->resc_y;
                    hx[j] = esp_sat(esp_round_c(t2, a->p4), a->lo, a->hi);
                }
            }
            for (ptrdiff_t j = 0; j < H; j++) {
                h[j] = hx[j];
                y[(s * a->dirs + d) * H + j] = h[j];
            }
        }
        for (ptrdiff_t j = 0; j < H; j++) {
            yh[d * H + j] = h[j];
            if (yc)
                yc[d * H + j] = c[j];
        }
    }
}

/* ---- LayerNormalization rows (espstream/ops/norm.py's layernorm_kernel, in C) -------------
 * Same float32 operations in the same order as the NumPy kernel (its module rule 1), inside
 * the no-contraction region above and never cloned: the int sum in int64 then wrapped to
 * int32, mean = float32(sum / n in double), the squared differences added left to right, the
 * Newton square root iterated until two iterates differ by at most 1e-5. Up to ESP_LN_ROWS
 * rows go at once, each row's sums still strictly in order (independent chains the CPU
 * overlaps; nothing is reassociated). sv / bv: [n] float32 scale and bias already times
 * 2**e_s / 2**e_b (ones / zeros when absent). Rounding without range branches: (v + 1.5 *
 * 2**23) - 1.5 * 2**23 is rint for |v| < 2**22, and beyond it keeps v's sign and a magnitude
 * past any int16 bound, so the saturated result is rint's. Returns the number of rows with a
 * NaN result (the caller then runs the NumPy kernel: NaN -> int is its cast's business). */
#define ESP_LN_ROWS 8

static inline void esp_ln_rows_stats(ptrdiff_t B, float s_in, float s_in2, float fn, float eps,
                                     float *mean, const float *var, float *inv)
{
    ESP_NO_CONTRACT
    float r[ESP_LN_ROWS], x[ESP_LN_ROWS];
    int live[ESP_LN_ROWS], any = 0;
    for (ptrdiff_t b = 0; b < B; b++) {
        mean[b] = mean[b] * s_in;
        float v = var[b] * s_in2;
        v = v / fn;
        x[b] = r[b] = v + eps;
        live[b] = x[b] != 0.0f;  /* sqrt_newton(0) = 0 */
        any |= live[b];
    }
    while (any) {  /* every row on its own iteration count, in lockstep */
        any = 0;
        for (ptrdiff_t b = 0; b < B; b++) {
            if (!live[b])
                continue;
            float nr = (r[b] + x[b] / r[b]) * 0.5f;
            live[b] = fabsf(nr - r[b]) > 1e-5f;
            r[b] = nr;
            any |= live[b];
        }
    }
    for (ptrdiff_t b = 0; b < B; b++)
        inv[b] = 1.0f / (x[b] == 0.0f ? 0.0f : r[b]);
}

#define ESP_LAYERNORM(NAME, T)                                                                 \
    static ptrdiff_t NAME(const T *x, T *y, ptrdiff_t rows, ptrdiff_t n, const float *sv,     \
                          const float *bv, float s_in, float s_in2, float fn, float eps,     \
                          float s_out, int even, int32_t lo, int32_t hi)                      \
    {                                                                                          \
        ESP_NO_CONTRACT                                                                        \
        ptrdiff_t bad = 0;                                                                     \
        const float magic = 12582912.0f, flo = (float)lo, fhi = (float)hi;                     \
        for (ptrdiff_t i0 = 0; i0 < rows; i0 += ESP_LN_ROWS) {                                 \
            ptrdiff_t B = rows - i0 < ESP_LN_ROWS ? rows - i0 : ESP_LN_ROWS;                   \
            const T *xb = x + i0 * n;                                                          \
            float mean[ESP_LN_ROWS], var[ESP_LN_ROWS], inv[ESP_LN_ROWS];                       \
            for (ptrdiff_t b = 0; b < B; b++) {                                                \
                int64_t s = 0;                                                                 \
                for (ptrdiff_t j = 0; j < n; j++)                                              \
                    s += xb[b * n + j];                                                        \
                int32_t s32 = (int32_t)(uint32_t)(uint64_t)s;                                  \
                mean[b] = (float)((double)s32 * 1.0 / (double)n);                              \
                var[b] = 0.0f;                                                                 \
            }                                                                                  \
            for (ptrdiff_t j = 0; j < n; j++)                                                  \
                for (ptrdiff_t b = 0; b < B; b++) {                                            \
                    float d = (float)xb[b * n + j] - mean[b];                                  \
                    var[b] = var[b] + d * d;                                                   \
                }                                                                              \
            esp_ln_rows_stats(B, s_in, s_in2, fn, eps, mean, var, inv);               \
            for (ptrdiff_t b = 0; b < B; b++) {                                                \
                const T *xr = xb + b * n;                                                      \
                T *yr = y + (i0 + b) * n;                                                      \
                float m = mean[b], iv = inv[b];                                                \
                int nan = 0;                                                                   \
                if (even) {                                                                    \
                    for (ptrdiff_t j = 0; j < n; j++) {                                        \
                        float nm = ((float)xr[j] * s_in - m) * iv;                             \
                        float v = (nm * sv[j] + bv[j]) * s_out;                                \
                        float r = (v + magic) - magic;                                         \
                        nan |= r != r;                                                         \
                        r = r < flo ? flo : r;                                                 \
                        r = r > fhi ? fhi : r;                                                 \
                        yr[j] = (T)(int32_t)r;                                                 \
                    }                                                                          \
                } else {                                                                       \
                    for (ptrdiff_t j = 0; j < n; j++) {                                        \
                        float nm = ((float)xr[j] * s_in - m) * iv;                             \
                        float v = (nm * sv[j] + bv[j]) * s_out + 0.5f;                         \
                        float r = (v + magic) - magic;                                         \
                        r = r > v ? r - 1.0f : r;                                              \
                        nan |= r != r;                                                         \
                        r = r < flo ? flo : r;                                                 \
                        r = r > fhi ? fhi : r;                                                 \
                        yr[j] = (T)(int32_t)r;                                                 \
                    }                                                                          \
                }                                                                              \
                bad += nan;                                                                    \
            }                                                                                  \
        }                                                                                      \
        return bad;                                                                            \
    }
ESP_LAYERNORM(esp_layernorm_i8, int8_t)
ESP_LAYERNORM(esp_layernorm_i16, int16_t)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

/* Throughput probe for benchmarks/kernels.py: n rounds of 10 independent vpmaddwd (16 MACs
 * each). Returns a nonzero checksum so the loop is not removed; 0 where AVX2 is not compiled
 * in or the CPU lacks it. */
#ifdef ESP_BC_X86
__attribute__((target("avx2"))) static int32_t esp_madd_probe_avx2(int64_t n)
{
    /* 10 independent chains a = madd(a, w): enough in flight to cover vpmaddwd's latency */
    __m256i w = _mm256_set1_epi16(3);
    __m256i a0 = _mm256_set1_epi16(1), a1 = _mm256_set1_epi16(2), a2 = _mm256_set1_epi16(3);
    __m256i a3 = _mm256_set1_epi16(4), a4 = _mm256_set1_epi16(5), a5 = _mm256_set1_epi16(6);
    __m256i a6 = _mm256_set1_epi16(7), a7 = _mm256_set1_epi16(8), a8 = _mm256_set1_epi16(9);
    __m256i a9 = _mm256_set1_epi16(10);
    for (int64_t i = 0; i < n; i++) {
        a0 = _mm256_madd_epi16(a0, w); a1 = _mm256_madd_epi16(a1, w);
        a2 = _mm256_madd_epi16(a2, w); a3 = _mm256_madd_epi16(a3, w);
        a4 = _mm256_madd_epi16(a4, w); a5 = _mm256_madd_epi16(a5, w);
        a6 = _mm256_madd_epi16(a6, w); a7 = _mm256_madd_epi16(a7, w);
        a8 = _mm256_madd_epi16(a8, w); a9 = _mm256_madd_epi16(a9, w);
    }
    a0 = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)),
                          _mm256_add_epi32(_mm256_add_epi32(a4, a5), _mm256_add_epi32(a6, a7)));
    a0 = _mm256_add_epi32(a0, _mm256_add_epi32(a8, a9));
    return _mm256_extract_epi32(a0, 0) | 1;
}
#endif

/* The same with AVX-512 VNNI: n rounds of 10 independent vpdpwssd on zmm (32 MACs each), the
 * instruction the VNNI conv loops run; 0 where it is not compiled in or the CPU lacks it. */
#ifdef ESP_VNNI
ESP_DW2_TARGET static int32_t esp_dpwssd_probe_512(int64_t n)
{
    __m512i w = _mm512_set1_epi16(3), a[10];
    for (int k = 0; k < 10; k++)
        a[k] = _mm512_set1_epi32(k + 1);
    for (int64_t i = 0; i < n; i++)
        for (int k = 0; k < 10; k++)
            a[k] = esp_dpw(a[k], w, w);
    for (int k = 1; k < 10; k++)
        a[0] = _mm512_add_epi32(a[0], a[k]);
    return _mm512_reduce_add_epi32(a[0]) | 1;
}
#endif

static int32_t esp_dpwssd_probe(int64_t n)
{
#ifdef ESP_VNNI
    if (esp_dw2_pick() != NULL)
        return esp_dpwssd_probe_512(n);
#endif
    (void)n;
    return 0;
}

static int32_t esp_madd_probe(int64_t n)
{
#ifdef ESP_BC_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        return esp_madd_probe_avx2(n);
#endif
    (void)n;
    return 0;
}

#endif
