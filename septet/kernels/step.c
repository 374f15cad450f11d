/* One decoding step through a LLaMA-architecture stack in a single call.
 *
 * Per layer (Touvron et al. 2023; the same arithmetic as septet.models.llama.Block):
 *   x += o(attend(rope(q), rope(k) -> cache, v -> cache)),  q, k, v = qkv(rmsnorm(x))
 *   x += down(silu(gate) * up),                             gate, up = gate_up(rmsnorm(x))
 * The matmuls are q4.c's kernels and attention is attn.c's; the norms, rotary, residual
 * and SwiGLU arithmetic run here on one thread (a few thousand numbers per row).
 *
 * Why this exists: at batch 1 SmolLM2-135M's eager step makes ~140 aten calls a layer. Each
 * costs a few microseconds of dispatch; together that was 15-38% of the eager step, and
 * torch.compile recovers part of it only after a ~15-50 s compile. Here the only per-token
 * overhead left is one operator call and five OpenMP regions per layer.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

static int linear(const septet_linear *l, const float *x, int M, float *y, int nthreads)
{
    int rc = l->kind == 4 ? septet_q4_1_mm(l->qs, l->d, l->mn, l->N, l->K, x, M, y, l->int8_act, nthreads)
           : l->kind == 8 ? septet_q8_0_mm(l->qs, l->d, l->N, l->K, x, M, y, l->int8_act, nthreads)
                          : 1;
    if (rc || !l->bias) return rc;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < l->N; n++) y[(size_t)m * l->N + n] += l->bias[n];
    return 0;
}

/* x · rsqrt(mean(x²) + eps) · w, as septet.nn.norms.RMSNorm */
static void rms_norm(const float *x, const float *w, int C, float eps, float *y)
{
    float ss = 0.0f;
    for (int j = 0; j < C; j++) ss += x[j] * x[j];
    const float r = 1.0f / sqrtf(ss / (float)C + eps);
    for (int j = 0; j < C; j++) y[j] = x[j] * r * w[j];
}

/* rotate n heads of D numbers in place by the angles cos/sin (D/2,) */
static void rope(float *h, int n, int D, const float *cos, const float *sin, int half)
{
    const int P = D / 2;
    for (int hh = 0; hh < n; hh++) {
        float *x = h + (size_t)hh * D;
        for (int i = 0; i < P; i++) {
            float *a = half ? x + i : x + 2 * i, *b = half ? x + i + P : x + 2 * i + 1;
            const float x1 = *a, x2 = *b;
            *a = x1 * cos[i] - x2 * sin[i];
            *b = x2 * cos[i] + x1 * sin[i];
        }
    }
}

int septet_llama_step(const septet_layer *layers, int n_layer, float *x, const septet_step_args *a)
{
    const int B = a->B, C = a->C, H = a->H, Hkv = a->Hkv, D = a->D, F = a->F, S = a->S;
    if (B <= 0 || C <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || D <= 0 || D % 2 || F <= 0 || a->pos < 0 ||
        a->pos >= S || (a->mask && a->mask_stride <= a->pos))
        return 1;
    const int QKV = (H + 2 * Hkv) * D, L = a->pos + 1, G = H / Hkv, P = D / 2;
    const float scale = 1.0f / sqrtf((float)D);
    const size_t n_h = (size_t)B * C, n_qkv = (size_t)B * QKV, n_att = (size_t)B * H * D,
                 n_gu = (size_t)B * 2 * F, n_act = (size_t)B * F, n_p = (size_t)B * H * L, n_vis = (size_t)B * L;
    float *buf = malloc(sizeof(float) * (2 * n_h + n_qkv + n_att + n_gu + n_act + n_p));
    uint8_t *vis = malloc(n_vis);
    if (!buf || !vis) {
        free(buf);
        free(vis);
        return 2;
    }
    float *h = buf, *y = h + n_h, *qkv = y + n_h, *att = qkv + n_qkv, *gu = att + n_att, *act = gu + n_gu,
          *p = act + n_act;
    for (int b = 0; b < B; b++)
        for (int s = 0; s < L; s++) vis[(size_t)b * L + s] = a->mask ? a->mask[(size_t)b * a->mask_stride + s] : 1;
    int rc = 0;
    for (int l = 0; l < n_layer && !rc; l++) {
        const septet_layer *ly = &layers[l];
        for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * C, ly->attn_norm, C, a->eps, h + (size_t)b * C);
        if ((rc = linear(&ly->qkv, h, B, qkv, a->nthreads))) break;
        for (int b = 0; b < B; b++) {
            float *row = qkv + (size_t)b * QKV; /* heads: H of q, Hkv of k, Hkv of v */
            rope(row, H + Hkv, D, a->cos + (size_t)b * P, a->sin + (size_t)b * P, a->rope_half);
            for (int g = 0; g < Hkv; g++) {
                const size_t slot = (((size_t)b * Hkv + g) * S + a->pos) * D;
                memcpy(ly->k + slot, row + (size_t)(H + g) * D, sizeof(float) * D);
                memcpy(ly->v + slot, row + (size_t)(H + Hkv + g) * D, sizeof(float) * D);
            }
        }
#pragma omp parallel for num_threads(a->nthreads) schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            const int b = bh / H, hh = bh % H;
            const size_t kv = ((size_t)b * Hkv + hh / G) * S * D;
            septet_attend_one(qkv + (size_t)b * QKV + (size_t)hh * D, ly->k + kv, ly->v + kv, vis + (size_t)b * L,
                              L, D, scale, p + (size_t)bh * L, att + (size_t)bh * D);
        }
        if ((rc = linear(&ly->o, att, B, y, a->nthreads))) break;
        for (size_t i = 0; i < n_h; i++) x[i] += y[i];
        for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * C, ly->mlp_norm, C, a->eps, h + (size_t)b * C);
        if ((rc = linear(&ly->gate_up, h, B, gu, a->nthreads))) break;
        for (int b = 0; b < B; b++)
            for (int j = 0; j < F; j++) {
                const float g = gu[(size_t)b * 2 * F + j], u = gu[(size_t)b * 2 * F + F + j];
                act[(size_t)b * F + j] = g / (1.0f + expf(-g)) * u;
            }
        if ((rc = linear(&ly->down, act, B, y, a->nthreads))) break;
        for (size_t i = 0; i < n_h; i++) x[i] += y[i];
    }
    free(buf);
    free(vis);
    return rc ? 10 + rc : 0;
}
