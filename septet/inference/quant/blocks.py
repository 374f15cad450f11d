"""Linear layers on septet's q4_1 / q8_0 kernels (septet/kernels/q4.c).

- `Q4Linear`: 4-bit weights in GGML's Q4_1 form (blocks of 32 inputs, W = d·q + m,
  q in 0..15, d and m per block). A Q4_1 GGUF tensor re-quantises to itself: Q4_1's own
  quantiser makes every block span q = 0..15, so its min and (max − min)/15 are its d and m.
- `Q8Linear`: 8-bit weights in Q8_0 form (W = d·q, q in −127..127, d per block of 32), the
  form SmolLM2's GGUF stores its embedding in; used for the output head.

Two arithmetics (`int8_act`):
- fp32 activations (default): the kernels expand each weight block to fp32 in registers, so
  the result is the fp32 matmul with the dequantised weight at 4-bit memory traffic. From
  DEQUANT_MIN_ROWS rows (a prefill) the layer expands the weight to fp32 and uses the dense
  matmul instead, where the work is in the multiplies rather than in reading weights.
- int8 activations (`quant="int4-a8"`): the kernels quantise the activations per block of
  32 to int8 as llama.cpp does and multiply in integers, for any number of rows: septet then
  computes llama.cpp's arithmetic (on SmolLM2 its top-1 agreement with llama.cpp is above
  transformers' own).
Either way the weights are read once for up to 8 rows. With bf16 activations and
DEQUANT_MIN_ROWS rows or more (a bf16 prefill) they expand the weight to bf16 and use the
dense matmul, faster there and the bf16 model's own rounding anyway. The kernels are torch operators
(septet/kernels/ops.cpp), so torch.compile keeps each as one call in the compiled decode
step; build them with `septet.kernels.available()` before constructing these layers.
"""

from __future__ import annotations

import torch

from ...errors import ConfigError
from .layers import COMPUTE_DTYPE, DEQUANT_MIN_ROWS, QuantLinear

QK = 32
DENSE_CHUNK = 1 << 21  # weights expanded at a time on the dense (many-row) path: 8 MB in fp32


def _check_shape(weight: torch.Tensor, what: str) -> tuple[int, int]:
    N, K = weight.shape
    if K % QK:
        raise ConfigError(f"{what} needs in_features divisible by {QK}; a ({N}, {K}) weight is not; "
                          "use septet.inference.quant.quantize_linear, which falls back to torch's kernels")
    return N, K


class _BlockLinear(QuantLinear):
    """septet's kernels take fp32 activations; many rows switch to the dequantised dense
    matmul, except under llama.cpp's int8-activation arithmetic (module docstring)."""

    kernel_dtype = torch.float32
    bias: torch.Tensor | None
    int8_act: bool

    def _dense(self, x2: torch.Tensor) -> bool:
        if x2.dtype == torch.float32 and self.int8_act:
            return False
        return x2.shape[0] >= DEQUANT_MIN_ROWS

    def _dense_dtype(self, x2: torch.Tensor) -> torch.dtype:
        return torch.float32 if x2.dtype == torch.float32 else COMPUTE_DTYPE

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """(N, K) fp32 (or those `rows`): each weight as the kernels expand it."""
        raise NotImplementedError

    def _dense_matmul(self, x2: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """x · Wᵀ with W expanded DENSE_CHUNK elements at a time: a whole fp32 copy of a
        49k-row head would be 113 MB for one prefill."""
        step = max(1, DENSE_CHUNK // self.in_features)
        x = x2.to(dt)
        if self.out_features <= step:
            return torch.nn.functional.linear(x, self.dequantize().to(dt))
        y = torch.empty(x.shape[0], self.out_features, dtype=dt, device=x.device)
        for r in range(0, self.out_features, step):
            y[:, r:r + step] = torch.nn.functional.linear(x, self.dequantize(slice(r, r + step)).to(dt))
        return y

    def _act(self) -> str:
        return ", int8 activations" if self.int8_act else ""


class Q4Linear(_BlockLinear):
    """y = x · Wᵀ + b, W in Q4_1 blocks of 32 inputs (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows_per_block: int = 256,
                 int8_act: bool = False):
        super().__init__()
        self.int8_act = int8_act
        N, K = _check_shape(weight, "q4_1")
        self.out_features, self.in_features = N, K
        qs = torch.empty(N, K // QK, QK // 2, dtype=torch.uint8)
        d = torch.empty(N, K // QK, dtype=torch.float16)  # fp16 scales, as GGML's blocks
        m = torch.empty(N, K // QK, dtype=torch.float16)
        for r in range(0, N, rows_per_block):  # fp32 temporaries of a few MB at a time
            w = weight[r:r + rows_per_block].detach().float().view(-1, K // QK, QK)
            lo, hi = w.amin(-1), w.amax(-1)
            scale = (hi - lo) / 15.0
            inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
            q = w.sub(lo[..., None]).mul_(inv[..., None]).round_().clamp_(0, 15).to(torch.uint8)
            qs[r:r + rows_per_block] = q[..., :QK // 2] | (q[..., QK // 2:] << 4)
            d[r:r + rows_per_block], m[r:r + rows_per_block] = scale, lo
        self.register_buffer("qs", qs)
        self.register_buffer("d", d)
        self.register_buffer("m", m)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """(N, K) fp32 (or those `rows`): each weight d·q + m."""
        qs, d, m = self.qs[rows], self.d[rows], self.m[rows]
        q = torch.cat((qs & 15, qs >> 4), dim=-1)  # (n, K/32, 32)
        return torch.addcmul(m[..., None].float(), q, d[..., None].float()).view(-1, self.in_features)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.septet.q4_1_mm(x.contiguous(), self.qs, self.d, self.m, self.int8_act)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, q4_1{self._act()}"



class Q8Linear(_BlockLinear):
    """y = x · Wᵀ + b, W in Q8_0 blocks of 32 inputs (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows_per_block: int = 256,
                 int8_act: bool = False):
        super().__init__()
        self.int8_act = int8_act
        N, K = _check_shape(weight, "q8_0")
        self.out_features, self.in_features = N, K
        qs = torch.empty(N, K // QK, QK, dtype=torch.int8)
        d = torch.empty(N, K // QK, dtype=torch.float16)
        for r in range(0, N, rows_per_block):
            w = weight[r:r + rows_per_block].detach().float().view(-1, K // QK, QK)
            scale = w.abs().amax(-1) / 127.0
            inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
            qs[r:r + rows_per_block] = w.mul(inv[..., None]).round_().clamp_(-127, 127).to(torch.int8)
            d[r:r + rows_per_block] = scale
        self.register_buffer("qs", qs)
        self.register_buffer("d", d)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_blocks(cls, qs: torch.Tensor, d: torch.Tensor, int8_act: bool = False) -> "Q8Linear":
        """The layer holding Q8_0 blocks as a GGUF stores them, taken as they are: qs
        (N, K/32, 32) int8 and d (N, K/32) fp16; no bias."""
        if qs.dtype != torch.int8 or qs.dim() != 3 or qs.shape[2] != QK or d.dtype != torch.float16 \
                or tuple(d.shape) != tuple(qs.shape[:2]):
            raise ConfigError(f"q8_0 blocks must be int8 (N, K/32, 32) and fp16 (N, K/32); got "
                              f"{tuple(qs.shape)} {qs.dtype}, {tuple(d.shape)} {d.dtype}")
        layer = cls.__new__(cls)
        _BlockLinear.__init__(layer)
        layer.int8_act = int8_act
        layer.out_features, layer.in_features = qs.shape[0], qs.shape[1] * QK
        layer.register_buffer("qs", qs.contiguous())
        layer.register_buffer("d", d.contiguous())
        layer.register_buffer("bias", None)
        return layer

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        return torch.mul(self.qs[rows], self.d[rows][..., None].float()).view(-1, self.in_features)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Weight rows `idx` (...,) -> (..., K) fp32, exact (for a refined head)."""
        return (self.qs[idx].float() * self.d[idx][..., None].float()).flatten(-2)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.septet.q8_0_mm(x.contiguous(), self.qs, self.d, self.int8_act)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, q8_0{self._act()}"
