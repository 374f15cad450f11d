/* One-token attention over a KV cache in fp32 (septet.nn.attention's decode path and the
 * fused step in step.c). */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#if SEPTET_VNNI
/* e^x for x <= 0 (softmax after subtracting the max), 16 lanes: x = n ln2 + r with
 * |r| <= ln2 / 2, a degree-6 polynomial for e^r (relative error ~2e-7), scaled by 2^n. */
static inline __m512 exp_nonpos(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* One query head's softmax(q·Kᵀ·scale)·V over the slots s < L with mask[s] != 0. */
void septet_attend_one(const float *qh, const float *kb, const float *vb, const uint8_t *mr, int L,
                       int D, float scale, float *p, float *oh)
{
    float mx = -INFINITY;
    for (int s = 0; s < L; s++) {
        if (!mr[s]) { p[s] = -INFINITY; continue; }
        const float *ks = kb + (size_t)s * D;
        float dot;
#if SEPTET_VNNI
        if (D % 16 == 0) {
            __m512 a = _mm512_setzero_ps();
            for (int j = 0; j < D; j += 16)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + j), _mm512_loadu_ps(ks + j), a);
            dot = _mm512_reduce_add_ps(a);
        } else
#endif
        {
            dot = 0.0f;
            for (int j = 0; j < D; j++) dot += qh[j] * ks[j];
        }
        p[s] = dot * scale;
        mx = fmaxf(mx, p[s]);
    }
    for (int j = 0; j < D; j++) oh[j] = 0.0f;
    if (mx == -INFINITY) return; /* no visible slot: zeros (SDPA would give NaN) */
    float sum = 0.0f;
    int s = 0;
#if SEPTET_VNNI
    {
        __m512 acc = _mm512_setzero_ps();
        const __m512 m = _mm512_set1_ps(mx);
        for (; s + 16 <= L; s += 16) {
            const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(p + s), m));
            _mm512_storeu_ps(p + s, e); /* masked slots: -inf - mx -> clamped -> ~0 */
            acc = _mm512_add_ps(acc, e);
        }
        sum = _mm512_reduce_add_ps(acc);
    }
#endif
    for (; s < L; s++) {
        p[s] = expf(p[s] - mx);
        sum += p[s];
    }
    const float inv = 1.0f / sum;
    for (s = 0; s < L; s++) {
        if (!mr[s]) continue;
        const float w = p[s] * inv, *vs = vb + (size_t)s * D;
#if SEPTET_VNNI
        if (D % 16 == 0) {
            const __m512 wv = _mm512_set1_ps(w);
            for (int j = 0; j < D; j += 16)
                _mm512_storeu_ps(oh + j, _mm512_fmadd_ps(wv, _mm512_loadu_ps(vs + j), _mm512_loadu_ps(oh + j)));
            continue;
        }
#endif
        for (int j = 0; j < D; j++) oh[j] += w * vs[j];
    }
}

/* One decoding step of attention, fp32: q (B, H, D) over the keys / values of a cache
 * k, v (B, Hkv, S, D) (contiguous), skipping the slots whose mask (B, S) is 0; out (B, H, D).
 * Query head h reads key/value head h / (H / Hkv) (grouped-query attention). Only the slots
 * up to a row's last visible one are read, so the cost follows the filled length of the
 * cache, not its allocated size S (a dense SDPA over the static cache reads all S). */
int septet_decode_attention(const float *q, const float *k, const float *v, const uint8_t *mask,
                            float *out, int B, int H, int Hkv, int S, int D, float scale, int nthreads)
{
    if (B <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || S <= 0 || D <= 0) return 1;
    const int G = H / Hkv;
    int rc = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H, hk = h / G;
        const uint8_t *mr = mask + (size_t)b * S;
        int L = S;
        while (L > 0 && !mr[L - 1]) L--;
        float *p = malloc(sizeof(float) * (L > 0 ? L : 1));
        if (!p) { rc = 2; continue; }
        const size_t kv = ((size_t)b * Hkv + hk) * S * D;
        septet_attend_one(q + (size_t)bh * D, k + kv, v + kv, mr, L, D, scale, p, out + (size_t)bh * D);
        free(p);
    }
    return rc;
}
