/* septet's CPU matmul kernels for GGML-style 4-bit and 8-bit weights.
 *
 * y[m, n] = sum_k x[m, k] * W[n, k], with W in blocks of 32 inputs:
 *   q4_1: W = d * q + mn, q in 0..15; 16 bytes per block, byte j = q[j] | q[j + 16] << 4
 *   q8_0: W = d * q,      q in -127..127; 32 bytes per block
 * with d and mn in fp16, as GGML stores them: decoding one token reads every weight once,
 * and on this project's 2-core VM that is bounded by memory bandwidth (~8 GB/s), so every
 * byte per weight counts (fp32 scales would add 0.125 of Q4_1's 0.625).
 * Two arithmetics, chosen per call:
 *   fp32 activations (the default): each weight is expanded in registers to d * q + mn in
 *     fp32 and multiplied with the fp32 activations: the result is the fp32 matmul with the
 *     dequantised weight (up to summation order), at 4-bit memory traffic;
 *   int8 activations: quantised per block of 32 as llama.cpp does for these weight types
 *     (Q8_1 / Q8_0: dx = amax / 127, q = round(x / dx), dx kept in fp16 precision), so each
 *     block's dot product is integer arithmetic and the result follows llama.cpp's.
 * The weights are read once per call whatever the number of activation rows (up to 8 rows
 * share each unpacked block), which is what makes small batches cheap.
 *
 * Built at first use by septet/kernels/__init__.py with -O3 -march=native -fopenmp; the
 * AVX-512 VNNI path is used when the compiler targets it, a portable loop otherwise.
 * Row blocks of W are split across OpenMP threads (torch's own libgomp: same soname).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define QK 32

int septet_kernel_isa(void) { return SEPTET_VNNI; }

static float fp16_round(float v) { return (float)(_Float16)v; }

/* The quantised activations of one call. Per row r, per group g of 4 blocks:
 *   xq[r][g]:  128 bytes; q4_1: the 4 blocks' first 16 values (64 bytes), then their last
 *              16, matching the weights' low / high nibbles; q8_0: the 4 blocks in order;
 *   dxe[r][g]: 32 floats, each block's scale repeated over its dot-product lanes (q4_1:
 *              4 per block, in the first 16; q8_0: 8 per block);
 *   sx[r][b]:  dx * sum(q) per block (the q4_1 minimum term), zero-padded to nbs.
 * Blocks past K are zero, so every group can be read whole. */
typedef struct {
    int nb, ng, nbs;
    int8_t *xq;
    float *dxe, *sx;
} qx_t;

static void quantize_block(const float *v, int q4_order, int8_t *dst, float *d_out, float *s_out)
{
#if SEPTET_VNNI
    /* the same arithmetic as the loop below, 16 lanes at a time (cvtps rounds to nearest
     * even under the default MXCSR, as nearbyintf does): this runs single-threaded before
     * every call's parallel part, so at 2 threads and 8 rows it is worth vectorising */
    const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
    const __m512 idv = _mm512_set1_ps(id);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, idv));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, idv));
    const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(dst + (q4_order ? 64 : 16)), _mm512_cvtepi32_epi8(qb));
#else
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
    const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < QK; j++) {
        const int q = (int)nearbyintf(v[j] * id);
        sum += q;
        dst[q4_order ? (j < 16 ? j : 64 + j - 16) : j] = (int8_t)q;
    }
#endif
    *d_out = fp16_round(d);
    *s_out = fp16_round(d * (float)sum);
}

static int quantize_x(const float *x, int M, int K, int q4_order, qx_t *qx)
{
    const int nb = K / QK, ng = (nb + 3) / 4, nbs = (nb + 15) & ~15;
    qx->nb = nb, qx->ng = ng, qx->nbs = nbs;
    qx->xq = aligned_alloc(64, (size_t)M * ng * 128);
    qx->dxe = aligned_alloc(64, sizeof(float) * ((size_t)M * ng * 32 + (size_t)M * nbs));
    if (!qx->xq || !qx->dxe) { free(qx->xq); free(qx->dxe); return 1; }
    qx->sx = qx->dxe + (size_t)M * ng * 32;
    memset(qx->xq, 0, (size_t)M * ng * 128);
    memset(qx->dxe, 0, sizeof(float) * ((size_t)M * ng * 32 + (size_t)M * nbs));
    for (int r = 0; r < M; r++) {
        for (int b = 0; b < nb; b++) {
            const int g = b / 4, i = b % 4;
            int8_t *dst = qx->xq + ((size_t)r * ng + g) * 128 + (q4_order ? i * 16 : i * 32);
            float dx;
            quantize_block(x + (size_t)r * K + b * QK, q4_order, dst, &dx, qx->sx + (size_t)r * nbs + b);
            const int lanes = q4_order ? 4 : 8;
            for (int l = 0; l < lanes; l++) qx->dxe[((size_t)r * ng + g) * 32 + i * lanes + l] = dx;
        }
    }
    return 0;
}

#if SEPTET_VNNI
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Ask for weight row n + PREFETCH_ROWS (its blocks and scales) while row n is computed.
 * Decoding streams ~100 MB of weights per token from memory; the hardware prefetcher alone
 * left the 2-core VM's memory idle between rows: without this a SmolLM2 token's matmuls
 * take 1.23-1.27x as long with fp32 activations, 1.10-1.15x with int8 ones
 * (benchmarks/kernel_ab.py). Prefetches never fault, but only rows of this matrix are
 * asked for. */
#ifndef PREFETCH_ROWS /* benchmarks/kernel_ab.py builds with -DPREFETCH_ROWS=0 to compare */
#define PREFETCH_ROWS 4
#endif
ALWAYS_INLINE void prefetch_row(int n, int N, const uint8_t *row, size_t row_bytes, const _Float16 *d,
                                const _Float16 *mn, int nb)
{
    if (PREFETCH_ROWS == 0 || n + PREFETCH_ROWS >= N) return;
    const char *w = (const char *)(row + PREFETCH_ROWS * row_bytes);
    for (size_t o = 0; o < row_bytes; o += 64) _mm_prefetch(w + o, _MM_HINT_T0);
    const size_t s = (size_t)(n + PREFETCH_ROWS) * nb;
    for (int o = 0; o < nb; o += 32) {
        _mm_prefetch((const char *)(d + s + o), _MM_HINT_T0);
        if (mn) _mm_prefetch((const char *)(mn + s + o), _MM_HINT_T0);
    }
}

/* Weight rows [n0, n1) against `mr` activation rows (a constant in each instance below,
 * so the accumulators stay in registers). Per group of 4 blocks (128 weights): unpack the
 * nibbles once; per activation row, two VNNI dot products (low / high halves: 4 lanes per
 * block), one int->float conversion and one fma with the blocks' scales. The minimum
 * term sum_b mn[b] * sx[b] is a vector dot product per row at the end. */
ALWAYS_INLINE void q4_1_tile(const int mr, const uint8_t *qs, const _Float16 *d, const _Float16 *mn,
                             int n0, int n1, const qx_t *qx, float *y, int N)
{
    const int nb = qx->nb, ng = qx->ng, nbs = qx->nbs, full = nb / 4, tail = nb % 4;
    const __m512i lowmask = _mm512_set1_epi8(0x0F);
    const __m512i expand = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int n = n0; n < n1; n++) {
        const uint8_t *wr = qs + (size_t)n * nb * 16;
        const _Float16 *dr = d + (size_t)n * nb, *mrow = mn + (size_t)n * nb;
        prefetch_row(n, N, wr, (size_t)nb * 16, d, mn, nb);
        __m512 acc[8];
        for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
        for (int g = 0; g < ng; g++) {
            __m512i v;
            __m512 dw;
            if (g < full) {
                v = _mm512_loadu_si512(wr + g * 64);
                dw = _mm512_permutexvar_ps(expand, _mm512_castps128_ps512(
                    _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(dr + g * 4)))));
            } else {
                v = _mm512_maskz_loadu_epi8(((__mmask64)1 << (tail * 16)) - 1, wr + g * 64);
                dw = _mm512_permutexvar_ps(expand, _mm512_castps128_ps512(
                    _mm_cvtph_ps(_mm_maskz_loadu_epi16((__mmask8)((1u << tail) - 1), dr + g * 4))));
            }
            const __m512i lo = _mm512_and_si512(v, lowmask);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lowmask);
            for (int r = 0; r < mr; r++) {
                const int8_t *xg = qx->xq + ((size_t)r * ng + g) * 128;
                __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(xg));
                s = _mm512_dpbusd_epi32(s, hi, _mm512_load_si512(xg + 64));
                const __m512 sc = _mm512_mul_ps(dw, _mm512_load_ps(qx->dxe + ((size_t)r * ng + g) * 32));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[r]);
            }
        }
        for (int j = 0; j < nbs; j += 16) {
            const __mmask16 k = nb - j >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - j)) - 1);
            const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mrow + j));
            for (int r = 0; r < mr; r++)
                acc[r] = _mm512_fmadd_ps(mv, _mm512_load_ps(qx->sx + (size_t)r * nbs + j), acc[r]);
        }
        for (int r = 0; r < mr; r++) y[(size_t)r * N + n] = _mm512_reduce_add_ps(acc[r]);
    }
}

/* The same for q8_0 weights, 64 bytes (2 blocks) per step: VNNI multiplies unsigned by
 * signed bytes, so the int8 x int8 product goes in as |w| * (x with w's sign). */
ALWAYS_INLINE void q8_0_tile(const int mr, const int8_t *qs, const _Float16 *d, int n0, int n1,
                             const qx_t *qx, float *y, int N)
{
    const int nb = qx->nb, ng = qx->ng;
    const __m512i expand = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int n = n0; n < n1; n++) {
        const int8_t *wr = qs + (size_t)n * nb * QK;
        const _Float16 *dr = d + (size_t)n * nb;
        prefetch_row(n, N, (const uint8_t *)wr, (size_t)nb * QK, d, NULL, nb);
        __m512 acc[8];
        for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
        for (int h = 0; 2 * h < nb; h++) {
            const int two = 2 * h + 1 < nb;
            const __m512i w = two ? _mm512_loadu_si512(wr + h * 64)
                                  : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, wr + h * 64);
            const __m512i aw = _mm512_abs_epi8(w);
            const __mmask64 neg = _mm512_movepi8_mask(w);
            const __m512 dw = _mm512_permutexvar_ps(expand, _mm512_castps128_ps512(
                _mm_cvtph_ps(_mm_maskz_loadu_epi16(two ? 3 : 1, dr + h * 2))));
            const int g = h / 2;
            for (int r = 0; r < mr; r++) {
                const int8_t *xg = qx->xq + ((size_t)r * ng + g) * 128 + (h % 2) * 64;
                __m512i xv = _mm512_load_si512(xg);
                xv = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
                const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, xv);
                const __m512 dxh = _mm512_load_ps(qx->dxe + ((size_t)r * ng + g) * 32 + (h % 2) * 16);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, dxh), acc[r]);
            }
        }
        for (int r = 0; r < mr; r++) y[(size_t)r * N + n] = _mm512_reduce_add_ps(acc[r]);
    }
}


/* fp32 activations. Each block's weights are expanded once to fp32 (w = d * q + mn, one
 * fma: the dequantised weight), then one fma per 16 weights per activation row. The fp16
 * scales of SPAN blocks at a time are converted to fp32 first (16 per instruction), so
 * each block broadcasts its scales straight from memory instead of converting them one by
 * one on the vector ports. With one or two rows the fma chain per accumulator would be
 * latency-bound (4 cycles each), so pairs of blocks go to separate accumulators there. */
#define SPAN 64

static inline void scales_to_f32(const _Float16 *src, int n, float *dst)
{
    for (int j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, src + j)));
    }
}

ALWAYS_INLINE void q4_1_f32_block(const int mr, const int u, const uint8_t *wb, float db, float mb,
                                  const float *xb, int K, __m512 acc[8][2][2])
{
    /* the block's 16 possible weights d * j + m (j = 0..15) in one register; each nibble then
     * picks its weight with vpermps, which reads only an index's low 4 bits: no masking and
     * no int-to-float conversion (7 vector instructions per 32 weights instead of 9) */
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(db), _mm512_set1_ps(mb));
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)wb));
    const __m512 wlo = _mm512_permutexvar_ps(v, table);
    const __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
    for (int r = 0; r < mr; r++) {
        acc[r][u][0] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xb + (size_t)r * K), acc[r][u][0]);
        acc[r][u][1] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xb + (size_t)r * K + 16), acc[r][u][1]);
    }
}

ALWAYS_INLINE void q8_0_f32_block(const int mr, const int u, const int8_t *wb, float db, const float *xb,
                                  int K, __m512 acc[8][2][2])
{
    const __m512 dv = _mm512_set1_ps(db);
    const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)wb))), dv);
    const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)wb + 1))), dv);
    for (int r = 0; r < mr; r++) {
        acc[r][u][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + (size_t)r * K), acc[r][u][0]);
        acc[r][u][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + (size_t)r * K + 16), acc[r][u][1]);
    }
}

/* kind 4: q4_1 (16 bytes and d, mn per block); kind 8: q8_0 (32 bytes and d per block) */
ALWAYS_INLINE void f32_tile(const int kind, const int mr, const void *qs, const _Float16 *d, const _Float16 *mn,
                            int n0, int n1, const float *x, int K, float *y, int N)
{
    const int nb = K / QK, U = mr <= 2 ? 2 : 1, bytes = kind == 4 ? 16 : QK;
    float df[SPAN] __attribute__((aligned(64))), mf[SPAN] __attribute__((aligned(64)));
    for (int n = n0; n < n1; n++) {
        const uint8_t *wr = (const uint8_t *)qs + (size_t)n * nb * bytes;
        prefetch_row(n, N, wr, (size_t)nb * bytes, d, mn, nb);
        __m512 acc[8][2][2];
        for (int r = 0; r < mr; r++)
            for (int u = 0; u < U; u++) acc[r][u][0] = acc[r][u][1] = _mm512_setzero_ps();
        for (int c0 = 0; c0 < nb; c0 += SPAN) {
            const int c1 = c0 + SPAN < nb ? c0 + SPAN : nb;
            scales_to_f32(d + (size_t)n * nb + c0, c1 - c0, df);
            if (kind == 4) scales_to_f32(mn + (size_t)n * nb + c0, c1 - c0, mf);
            int b = c0;
            for (; b + U <= c1; b += U)
                for (int u = 0; u < U; u++) {
                    if (kind == 4)
                        q4_1_f32_block(mr, u, wr + (size_t)(b + u) * 16, df[b + u - c0], mf[b + u - c0],
                                       x + (b + u) * QK, K, acc);
                    else
                        q8_0_f32_block(mr, u, (const int8_t *)wr + (size_t)(b + u) * QK, df[b + u - c0],
                                       x + (b + u) * QK, K, acc);
                }
            for (; b < c1; b++) { /* the odd block left by U = 2 */
                if (kind == 4)
                    q4_1_f32_block(mr, 0, wr + (size_t)b * 16, df[b - c0], mf[b - c0], x + b * QK, K, acc);
                else
                    q8_0_f32_block(mr, 0, (const int8_t *)wr + (size_t)b * QK, df[b - c0], x + b * QK, K, acc);
            }
        }
        for (int r = 0; r < mr; r++) {
            __m512 t = _mm512_add_ps(acc[r][0][0], acc[r][0][1]);
            if (U == 2) t = _mm512_add_ps(t, _mm512_add_ps(acc[r][1][0], acc[r][1][1]));
            y[(size_t)r * N + n] = _mm512_reduce_add_ps(t);
        }
    }
}

#define DISPATCH(call_with_mr)                                   \
    switch (mr) {                                                \
    case 1: call_with_mr(1); break;                              \
    case 2: call_with_mr(2); break;                              \
    case 3: call_with_mr(3); break;                              \
    case 4: call_with_mr(4); break;                              \
    case 5: call_with_mr(5); break;                              \
    case 6: call_with_mr(6); break;                              \
    case 7: call_with_mr(7); break;                              \
    default: call_with_mr(8); break;                             \
    }

static void q4_1_rows(const uint8_t *qs, const _Float16 *d, const _Float16 *mn, int n0, int n1,
                      const qx_t *qx, int mr, float *y, int N)
{
#define Q4(k) q4_1_tile(k, qs, d, mn, n0, n1, qx, y, N)
    DISPATCH(Q4)
#undef Q4
}

static void q8_0_rows(const int8_t *qs, const _Float16 *d, int n0, int n1, const qx_t *qx, int mr,
                      float *y, int N)
{
#define Q8(k) q8_0_tile(k, qs, d, n0, n1, qx, y, N)
    DISPATCH(Q8)
#undef Q8
}

static void q4_1_f32_rows(const uint8_t *qs, const _Float16 *d, const _Float16 *mn, int n0, int n1,
                          const float *x, int K, int mr, float *y, int N)
{
#define Q4F(k) f32_tile(4, k, qs, d, mn, n0, n1, x, K, y, N)
    DISPATCH(Q4F)
#undef Q4F
}

static void q8_0_f32_rows(const int8_t *qs, const _Float16 *d, int n0, int n1, const float *x, int K, int mr,
                          float *y, int N)
{
#define Q8F(k) f32_tile(8, k, qs, d, NULL, n0, n1, x, K, y, N)
    DISPATCH(Q8F)
#undef Q8F
}
#else
static void q4_1_rows(const uint8_t *qs, const _Float16 *d, const _Float16 *mn, int n0, int n1,
                      const qx_t *qx, int mr, float *y, int N)
{
    const int nb = qx->nb, ng = qx->ng;
    for (int n = n0; n < n1; n++) {
        const uint8_t *wr = qs + (size_t)n * nb * 16;
        for (int r = 0; r < mr; r++) {
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const int8_t *xb = qx->xq + ((size_t)r * ng + b / 4) * 128 + (b % 4) * 16;
                int s = 0;
                for (int j = 0; j < 16; j++)
                    s += (wr[b * 16 + j] & 15) * xb[j] + (wr[b * 16 + j] >> 4) * xb[64 + j];
                acc += (float)d[(size_t)n * nb + b] * qx->dxe[((size_t)r * ng + b / 4) * 32 + (b % 4) * 4] * (float)s
                     + (float)mn[(size_t)n * nb + b] * qx->sx[(size_t)r * qx->nbs + b];
            }
            y[(size_t)r * N + n] = acc;
        }
    }
}

static void q8_0_rows(const int8_t *qs, const _Float16 *d, int n0, int n1, const qx_t *qx, int mr,
                      float *y, int N)
{
    const int nb = qx->nb, ng = qx->ng;
    for (int n = n0; n < n1; n++) {
        const int8_t *wr = qs + (size_t)n * nb * QK;
        for (int r = 0; r < mr; r++) {
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const int8_t *xb = qx->xq + ((size_t)r * ng + b / 4) * 128 + (b % 4) * 32;
                int s = 0;
                for (int j = 0; j < QK; j++) s += wr[b * QK + j] * xb[j];
                acc += (float)d[(size_t)n * nb + b] * qx->dxe[((size_t)r * ng + b / 4) * 32 + (b % 4) * 8] * (float)s;
            }
            y[(size_t)r * N + n] = acc;
        }
    }
}

/* fp32 activations, portable: the dequantised weight d * q + mn times x, in fp32 */
static void q4_1_f32_rows(const uint8_t *qs, const _Float16 *d, const _Float16 *mn, int n0, int n1,
                          const float *x, int K, int mr, float *y, int N)
{
    const int nb = K / QK;
    for (int n = n0; n < n1; n++) {
        const uint8_t *wr = qs + (size_t)n * nb * 16;
        for (int r = 0; r < mr; r++) {
            const float *xr = x + (size_t)r * K;
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const float db = (float)d[(size_t)n * nb + b], mb = (float)mn[(size_t)n * nb + b];
                for (int j = 0; j < 16; j++)
                    acc += fmaf((float)(wr[b * 16 + j] & 15), db, mb) * xr[b * QK + j]
                         + fmaf((float)(wr[b * 16 + j] >> 4), db, mb) * xr[b * QK + 16 + j];
            }
            y[(size_t)r * N + n] = acc;
        }
    }
}

static void q8_0_f32_rows(const int8_t *qs, const _Float16 *d, int n0, int n1, const float *x, int K, int mr,
                          float *y, int N)
{
    const int nb = K / QK;
    for (int n = n0; n < n1; n++) {
        const int8_t *wr = qs + (size_t)n * nb * QK;
        for (int r = 0; r < mr; r++) {
            const float *xr = x + (size_t)r * K;
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const float db = (float)d[(size_t)n * nb + b];
                for (int j = 0; j < QK; j++) acc += ((float)wr[b * QK + j] * db) * xr[b * QK + j];
            }
            y[(size_t)r * N + n] = acc;
        }
    }
}
#endif

/* rows of W per OpenMP work item: small enough to balance 2-16 threads on a 576-row
 * matrix, large enough that scheduling is noise */
#define NCHUNK 16

static int run(int kind, int int8_act, const void *qs, const _Float16 *d, const _Float16 *mn, int N, int K,
               const float *x, int M, float *y, int nthreads)
{
    if (K % QK || N <= 0 || M <= 0) return 1;
    qx_t qx = {0};
    if (int8_act && quantize_x(x, M, K, kind == 4, &qx)) return 2;
    const int nchunks = (N + NCHUNK - 1) / NCHUNK;
    /* 8 activation rows per pass over the weights: each weight block is unpacked once
     * for all of them */
    for (int m0 = 0; m0 < M; m0 += 8) {
        const int mr = M - m0 < 8 ? M - m0 : 8;
        qx_t sub = qx;
        if (int8_act) {
            sub.xq += (size_t)m0 * qx.ng * 128;
            sub.dxe += (size_t)m0 * qx.ng * 32;
            sub.sx += (size_t)m0 * qx.nbs;
        }
        const float *xm = x + (size_t)m0 * K;
        float *ym = y + (size_t)m0 * N;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int c = 0; c < nchunks; c++) {
            const int n0 = c * NCHUNK, n1 = n0 + NCHUNK < N ? n0 + NCHUNK : N;
            if (kind == 4 && int8_act)
                q4_1_rows(qs, d, mn, n0, n1, &sub, mr, ym, N);
            else if (kind == 4)
                q4_1_f32_rows(qs, d, mn, n0, n1, xm, K, mr, ym, N);
            else if (int8_act)
                q8_0_rows(qs, d, n0, n1, &sub, mr, ym, N);
            else
                q8_0_f32_rows(qs, d, n0, n1, xm, K, mr, ym, N);
        }
    }
    free(qx.xq);
    free(qx.dxe);
    return 0;
}

int septet_q4_1_mm(const uint8_t *qs, const _Float16 *d, const _Float16 *mn, int N, int K,
                   const float *x, int M, float *y, int int8_act, int nthreads)
{
    return run(4, int8_act, qs, d, mn, N, K, x, M, y, nthreads);
}

int septet_q8_0_mm(const int8_t *qs, const _Float16 *d, int N, int K, const float *x, int M,
                   float *y, int int8_act, int nthreads)
{
    return run(8, int8_act, qs, d, NULL, N, K, x, M, y, nthreads);
}
