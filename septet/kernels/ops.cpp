// The q4.c kernels as PyTorch operators (septet::q4_1_mm, septet::q8_0_mm; `int8_act` picks
// llama.cpp's int8-activation arithmetic over the fp32 one), so that a call
// costs what an aten op costs (~4 us here; a Python-registered op took 8-76 us, and the
// decode step makes ~120 of these calls a token) and torch.compile keeps each as one node.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

extern "C" int septet_q4_1_mm(const void *qs, const void *d, const void *mn, int N, int K,
                              const void *x, int M, void *y, int int8_act, int nthreads);
extern "C" int septet_q8_0_mm(const void *qs, const void *d, int N, int K, const void *x, int M,
                              void *y, int int8_act, int nthreads);

extern "C" int septet_decode_attention(const float *q, const float *k, const float *v,
                                       const uint8_t *mask, float *out, int B, int H, int Hkv, int S,
                                       int D, float scale, int nthreads);

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
  int rc = septet_q4_1_mm(qs.data_ptr(), d.data_ptr(), m.data_ptr(), qs.size(0), x.size(1), x.data_ptr(),
                          x.size(0), y.data_ptr(), int8_act, at::get_num_threads());
  TORCH_CHECK(rc == 0, "septet_q4_1_mm failed with ", rc);
  return y;
}

at::Tensor q8_0_mm(const at::Tensor &x, const at::Tensor &qs, const at::Tensor &d, bool int8_act) {
  check(x, qs, d, 32, at::kChar);
  auto y = at::empty({x.size(0), qs.size(0)}, x.options());
  int rc = septet_q8_0_mm(qs.data_ptr(), d.data_ptr(), qs.size(0), x.size(1), x.data_ptr(), x.size(0),
                          y.data_ptr(), int8_act, at::get_num_threads());
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

}  // namespace

TORCH_LIBRARY(septet, lib) {
  lib.def("q4_1_mm(Tensor x, Tensor qs, Tensor d, Tensor m, bool int8_act) -> Tensor");
  lib.def("q8_0_mm(Tensor x, Tensor qs, Tensor d, bool int8_act) -> Tensor");
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(septet, CPU, lib) {
  lib.impl("q4_1_mm", &q4_1_mm);
  lib.impl("q8_0_mm", &q8_0_mm);
  lib.impl("decode_attention", &decode_attention);
}
