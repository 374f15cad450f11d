/* What septet's C kernels share: the instruction-set switch and the entry points that
 * ops.cpp registers as torch operators (and tests call through ctypes). */
#ifndef SEPTET_KERNELS_H
#define SEPTET_KERNELS_H

#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define SEPTET_VNNI 1
#else
#define SEPTET_VNNI 0
#endif

/* q4.c: y (M, N) = x (M, K) · Wᵀ for Q4_1 / Q8_0 block weights (0 on success) */
int septet_q4_1_mm(const uint8_t *qs, const _Float16 *d, const _Float16 *mn, int N, int K,
                   const float *x, int M, float *y, int int8_act, int nthreads);
int septet_q8_0_mm(const int8_t *qs, const _Float16 *d, int N, int K, const float *x, int M,
                   float *y, int int8_act, int nthreads);

/* attn.c: one query head over L cached slots (p: L floats of scratch) */
void septet_attend_one(const float *qh, const float *kb, const float *vb, const uint8_t *mr, int L,
                       int D, float scale, float *p, float *oh);
int septet_decode_attention(const float *q, const float *k, const float *v, const uint8_t *mask,
                            float *out, int B, int H, int Hkv, int S, int D, float scale, int nthreads);

/* step.c: one decoding step through a LLaMA-architecture stack */
typedef struct {
    int kind;     /* 4: Q4_1 (qs, d, mn), 8: Q8_0 (qs, d) */
    int int8_act; /* llama.cpp's int8-activation arithmetic instead of fp32 */
    int N, K;
    const void *qs;
    const _Float16 *d, *mn;
    const float *bias; /* (N,) or NULL */
} septet_linear;

typedef struct {
    const float *attn_norm, *mlp_norm; /* RMSNorm weights (C,) */
    septet_linear qkv, o, gate_up, down;
    float *k, *v; /* this layer's cache (B, Hkv, S, D) */
} septet_layer;

typedef struct {
    int B, C, H, Hkv, D, F, S;
    int pos;                  /* the slot this step writes; keys 0..pos are attended */
    const float *cos, *sin;   /* (B, D/2) rotary angles of each row's position */
    const uint8_t *mask;      /* (B, mask_stride): 0 hides key s of row b; NULL: all visible */
    int mask_stride;
    float eps;
    int rope_half;            /* 1: rotate (x[i], x[i + D/2]) (HF), 0: (x[2i], x[2i + 1]) */
    int nthreads;
} septet_step_args;

int septet_llama_step(const septet_layer *layers, int n_layer, float *x, const septet_step_args *a);

#endif
