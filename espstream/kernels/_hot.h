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

/* Half-up requantize of n int32 sums with one right shift s (rounding constant already in
 * add32), then saturation to [lo, hi] (ReLU folded into lo), into int8. */
ESP_HOT static void esp_rq32_i8(const int32_t *acc, const int32_t *add32, int32_t s,
                                int32_t lo, int32_t hi, int8_t *y, ptrdiff_t n)
{
    for (ptrdiff_t c = 0; c < n; c++) {
        int32_t v = (acc[c] + add32[c]) >> s;
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        y[c] = (int8_t)v;
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

#endif
