// The C kernels as PyTorch operators (septet::q4_1_mm, septet::q8_0_mm: `int8_act` picks
// llama.cpp's int8-activation arithmetic over the fp32 one; septet::decode_attention;
// septet::llama_decode, a whole decoding step of a LLaMA stack), so that a call
// costs what an aten op costs (~4 us here; a Python-registered op took 8-76 us, and the
// decode step makes ~120 of these calls a token) and torch.compile keeps each as one node.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <vector>

extern "C" {
#include "kernels.h"
}

namespace {

void check(const at::Tensor &x, const at::Tensor &qs, const at::Tensor &d, int64_t per_block,
           at::ScalarType qtype) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "septet kernels: x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(qs.dim() == 3 && qs.size(2) == per_block && qs.scalar_type() == qtype && qs.is_contiguous(),
              "septet kernels: bad block tensor");
  TORCH_CHECK(x.size(1) == qs.size(1) * 32, "septet kernels: x has ", x.size(1), " inputs, weight ",
              qs.size(1) * 32);
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.numel() == qs.size(0) * qs.size(1),
              "septet kernels: bad scales");
}

at::Tensor q4_1_mm(const at::Tensor &x, const at::Tensor &qs, const at::Tensor &d, const at::Tensor &m,
                   bool int8_act) {
  check(x, qs, d, 16, at::kByte);
  TORCH_CHECK(m.scalar_type() == at::kHalf && m.is_contiguous() && m.numel() == d.numel(),
              "septet kernels: bad minimums");
  auto y = at::empty({x.size(0), qs.size(0)}, x.options());
  int rc = septet_q4_1_mm(qs.data_ptr<uint8_t>(), reinterpret_cast<const _Float16 *>(d.data_ptr()),
                          reinterpret_cast<const _Float16 *>(m.data_ptr()), qs.size(0), x.size(1), x.data_ptr<float>(),
                          x.size(0), y.data_ptr<float>(), int8_act, at::get_num_threads());
  TORCH_CHECK(rc == 0, "septet_q4_1_mm failed with ", rc);
  return y;
}

at::Tensor q8_0_mm(const at::Tensor &x, const at::Tensor &qs, const at::Tensor &d, bool int8_act) {
  check(x, qs, d, 32, at::kChar);
  auto y = at::empty({x.size(0), qs.size(0)}, x.options());
  int rc = septet_q8_0_mm(qs.data_ptr<int8_t>(), reinterpret_cast<const _Float16 *>(d.data_ptr()), qs.size(0),
                          x.size(1), x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), int8_act, at::get_num_threads());
  TORCH_CHECK(rc == 0, "septet_q8_0_mm failed with ", rc);
  return y;
}

at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                            const at::Tensor &mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes() &&
                  mask.dim() == 2 && mask.scalar_type() == at::kBool,
              "septet decode_attention: q (B, H, 1, D), k, v (B, Hkv, S, D), mask (B, S) bool");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "septet decode_attention: float32 only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && mask.size(0) == B && mask.size(1) == S && H % Hkv == 0,
              "septet decode_attention: shapes do not match");
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), mc = mask.contiguous();
  auto out = at::empty({B, H, 1, D}, q.options());
  int rc = septet_decode_attention(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                                   reinterpret_cast<const uint8_t *>(mc.data_ptr<bool>()), out.data_ptr<float>(),
                                   B, H, Hkv, S, D, static_cast<float>(scale), at::get_num_threads());
  TORCH_CHECK(rc == 0, "septet_decode_attention failed with ", rc);
  return out;
}

// One block-weight linear of the fused step: tensors w[i..i+4) = qs, d, mn (or empty), bias
// (or empty), checked against the kind and the expected (N, K).
septet_linear linear_arg(at::TensorList w, size_t i, int64_t kind, int64_t int8_act, int64_t N, int64_t K,
                         const char *what) {
  const at::Tensor &qs = w[i], &d = w[i + 1], &mn = w[i + 2], &bias = w[i + 3];
  TORCH_CHECK(kind == 4 || kind == 8, "septet llama_decode: ", what, ": kind must be 4 (Q4_1) or 8 (Q8_0)");
  for (const at::Tensor *t : {&qs, &d, &mn, &bias})
    TORCH_CHECK(t->device().is_cpu(), "septet llama_decode: ", what, ": every tensor must be on the CPU");
  TORCH_CHECK(K % 32 == 0 && qs.dim() == 3 && qs.size(0) == N && qs.size(1) == K / 32 &&
                  qs.size(2) == (kind == 4 ? 16 : 32) && qs.scalar_type() == (kind == 4 ? at::kByte : at::kChar) &&
                  qs.is_contiguous(),
              "septet llama_decode: ", what, ": blocks must be (", N, ", ", K / 32, ", ", kind == 4 ? 16 : 32, ")");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.numel() == N * (K / 32),
              "septet llama_decode: ", what, ": bad scales");
  TORCH_CHECK(kind == 8 ? mn.numel() == 0
                        : mn.scalar_type() == at::kHalf && mn.is_contiguous() && mn.numel() == d.numel(),
              "septet llama_decode: ", what, ": bad minimums");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == N),
              "septet llama_decode: ", what, ": bad bias");
  septet_linear l;
  l.kind = static_cast<int>(kind);
  l.int8_act = static_cast<int>(int8_act);
  l.N = static_cast<int>(N);
  l.K = static_cast<int>(K);
  l.qs = qs.data_ptr();
  l.d = reinterpret_cast<const _Float16 *>(d.data_ptr());
  l.mn = kind == 4 ? reinterpret_cast<const _Float16 *>(mn.data_ptr()) : nullptr;
  l.bias = bias.numel() ? bias.data_ptr<float>() : nullptr;
  return l;
}

const float *vector_arg(const at::Tensor &t, int64_t n, const char *what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
              "septet llama_decode: ", what, " must be ", n, " contiguous float32 numbers on the CPU");
  return t.data_ptr<float>();
}

// x (B, C): the embedded new tokens; returns the last layer's output (before the final
// norm). Per layer, `weights` holds 18 tensors (attention norm, qkv x4, o x4, MLP norm,
// gate_up x4, down x4) and `kinds` 8 numbers (kind, int8_act for each linear). Writes
// slot `pos` of every layer's k / v (B, Hkv, S, D).
at::Tensor llama_decode(const at::Tensor &x, at::TensorList weights, at::IntArrayRef kinds, at::TensorList k,
                        at::TensorList v, int64_t pos, const at::Tensor &cos, const at::Tensor &sin,
                        const std::optional<at::Tensor> &mask, int64_t n_head, double eps, bool rope_half) {
  const size_t L = k.size();
  TORCH_CHECK(L > 0 && v.size() == L && weights.size() == 18 * L && kinds.size() == 8 * L,
              "septet llama_decode: need 18 weights and 8 kinds per layer and one k, v per layer");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "septet llama_decode: x must be (B, C) float32 on the CPU");
  TORCH_CHECK(k[0].dim() == 4 && weights[10].dim() == 3, "septet llama_decode: k must be (B, Hkv, S, D) and "
              "gate_up blocks 3-D");
  const int64_t B = x.size(0), C = x.size(1), Hkv = k[0].size(1), S = k[0].size(2), D = k[0].size(3);
  TORCH_CHECK(n_head > 0 && n_head % Hkv == 0 && D % 2 == 0, "septet llama_decode: bad head counts");
  TORCH_CHECK(pos >= 0 && pos < S, "septet llama_decode: slot ", pos, " is outside the cache of ", S);
  const int64_t QKV = (n_head + 2 * Hkv) * D, F = weights[10].size(0) / 2;
  std::vector<septet_layer> layers(L);
  for (size_t l = 0; l < L; l++) {
    for (const at::Tensor *c : {&k[l], &v[l]})
      TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == at::kFloat && c->is_contiguous() && c->dim() == 4 &&
                      c->size(0) == B &&
                      c->size(1) == Hkv && c->size(2) == S && c->size(3) == D,
                  "septet llama_decode: layer ", l, ": cache must be contiguous float32 (B, Hkv, S, D) on the CPU");
    const size_t i = 18 * l;
    const int64_t *kd = kinds.data() + 8 * l;
    septet_layer &ly = layers[l];
    ly.attn_norm = vector_arg(weights[i], C, "attention norm weight");
    ly.qkv = linear_arg(weights, i + 1, kd[0], kd[1], QKV, C, "qkv");
    ly.o = linear_arg(weights, i + 5, kd[2], kd[3], C, n_head * D, "o");
    ly.mlp_norm = vector_arg(weights[i + 9], C, "MLP norm weight");
    ly.gate_up = linear_arg(weights, i + 10, kd[4], kd[5], 2 * F, C, "gate_up");
    ly.down = linear_arg(weights, i + 14, kd[6], kd[7], C, F, "down");
    ly.k = k[l].data_ptr<float>();
    ly.v = v[l].data_ptr<float>();
  }
  septet_step_args a;
  a.B = B, a.C = C, a.H = n_head, a.Hkv = Hkv, a.D = D, a.F = F, a.S = S, a.pos = pos;
  a.cos = vector_arg(cos, B * D / 2, "cos");
  a.sin = vector_arg(sin, B * D / 2, "sin");
  at::Tensor m;
  a.mask = nullptr, a.mask_stride = 0;
  if (mask) {
    m = mask->contiguous();
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) > pos,
                "septet llama_decode: mask must be (B, > pos) bool");
    a.mask = reinterpret_cast<const uint8_t *>(m.data_ptr<bool>());
    a.mask_stride = m.size(1);
  }
  a.eps = static_cast<float>(eps);
  a.rope_half = rope_half;
  a.nthreads = at::get_num_threads();
  auto out = x.contiguous().clone();
  int rc = septet_llama_step(layers.data(), static_cast<int>(L), out.data_ptr<float>(), &a);
  TORCH_CHECK(rc == 0, "septet_llama_step failed with ", rc);
  return out;
}

}  // namespace

TORCH_LIBRARY(septet, lib) {
  lib.def("q4_1_mm(Tensor x, Tensor qs, Tensor d, Tensor m, bool int8_act) -> Tensor");
  lib.def("q8_0_mm(Tensor x, Tensor qs, Tensor d, bool int8_act) -> Tensor");
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  lib.def("llama_decode(Tensor x, Tensor[] weights, int[] kinds, Tensor(a!)[] k, Tensor(b!)[] v, int pos, "
          "Tensor cos, Tensor sin, Tensor? mask, int n_head, float eps, bool rope_half) -> Tensor");
}

TORCH_LIBRARY_IMPL(septet, CPU, lib) {
  lib.impl("q4_1_mm", &q4_1_mm);
  lib.impl("q8_0_mm", &q8_0_mm);
  lib.impl("decode_attention", &decode_attention);
  lib.impl("llama_decode", &llama_decode);
}
