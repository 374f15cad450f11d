"""Weight-only int8 / int4 linear layers.

Two kernel sets: septet's own (septet.kernels: GGML's Q4_1 / Q8_0 blocks of 32; fp32
activations, or with the "-a8" modes int8 ones, llama.cpp's arithmetic; `Q4Linear` /
`Q8Linear`), used wherever they build and the blocks fit (`septet_kernels`), and PyTorch's
(`Int8Linear` / `Int4Linear` below, SEPTET_KERNELS=0; bf16 activations), described here.

Decoding one token reads every weight once and does ~2 FLOPs per weight, so on a CPU
its speed is set by how many bytes the weights take. Weight-only quantisation keeps the
activations in float and stores the matrices in 8 or 4 bits:

- int8: symmetric, one fp scale per output row; `aten._weight_int8pack_mm`.
- int4: asymmetric, a scale and a zero point per group of `group_size` inputs (the same
  scheme as GGUF's Q4_1, so a model read from a Q4_1 file re-quantises without loss at
  group 32); `aten._convert_weight_to_int4pack_for_cpu` packs the nibbles once, and
  `aten._weight_int4pack_mm_for_cpu` multiplies. The packed bytes are the only copy: the
  prefill path expands them to bf16 itself (`Int4Linear.dequantize`).

`quantize_model` swaps every nn.Linear (after `optimize_for_inference` has packed q/k/v
and gate/up) for one of these, and gives a tied output head its own quantised copy of
the embedding, leaving the embedding lookup itself exact.

The output head is where quantisation shows: its logits are what top-1 and sampling
read, and the kernels round them to bf16 (steps of 0.0625 at |logit| 8-16, 0.125 at 16-32)
on top of the int8 weights' error. So the head is a `RefinedHead`: the quantised matmul ranks the
whole vocabulary, then the `top` best logits of each row are recomputed in fp32 from the
float rows (a tied head's own embedding, which the model keeps anyway). What the int8
head costs in agreement with llama.cpp, and what refining mends: docs/benchmarks.md
("Figures moved out of docstrings").

`on_load.QuantizeOnLoad` does the same while a checkpoint is read: it takes the tensors one at a
time (`checkpoints.convert.load_any(..., sink=...)`) and quantises each transformer block
as soon as its weights are in, so the whole float model never exists at once (peak
memory); the result is the model `quantize_model` makes from the loaded float model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ...errors import ConfigError

# "-a8": activations quantised to int8 per block of 32 as well (llama.cpp's arithmetic for
# Q8_0 / Q4_1 weights; septet's kernels only). Without it the activations stay float.
MODES = ("int8", "int4", "int8-a8", "int4-a8")


def weight_mode(mode: str) -> str:
    """"int4-a8" -> "int4": the weights' format, whatever the activations."""
    return mode.removesuffix("-a8")


INT4_GROUP_SIZES = (32, 64, 128, 256)


def check_ops(mode: str) -> None:
    name = "_weight_int8pack_mm" if mode == "int8" else "_weight_int4pack_mm_for_cpu"
    if not hasattr(torch.ops.aten, name):
        raise ConfigError(f"--quant {mode}: this PyTorch ({torch.__version__}) has no aten.{name} kernel")


# Both aten kernels are fast only with bf16 activations (fp32 ones take a slow reference
# path), and only for a few rows: from DEQUANT_MIN_ROWS rows (a prefill) dequantising to
# bf16 and the dense bf16 matmul win (docs/benchmarks.md). So activations run in bf16.
COMPUTE_DTYPE = torch.bfloat16
DEQUANT_MIN_ROWS = 32
# quantise big matrices this many rows at a time: fp32 temporaries stay ~2 MB at d=576
_ROWS_PER_BLOCK = 1024


class QuantLinear(nn.Module):
    """A weight-only quantised layer: `_kernel` for a few rows (decoding), the dequantised
    weight and a dense matmul for many (`_dense`)."""

    out_features: int
    in_features: int
    kernel_dtype = COMPUTE_DTYPE  # what `_kernel` takes and returns

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The (N, K) weight this layer multiplies by, in the compute dtype."""
        raise NotImplementedError

    def _dense(self, x2: torch.Tensor) -> bool:
        return x2.shape[0] >= DEQUANT_MIN_ROWS

    def _dense_dtype(self, x2: torch.Tensor) -> torch.dtype:
        return COMPUTE_DTYPE

    def _dense_matmul(self, x2: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return torch.nn.functional.linear(x2.to(dt), self.dequantize().to(dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._dense(x2):
            y = self._dense_matmul(x2, self._dense_dtype(x2))
        else:
            y = self._kernel(x2.to(self.kernel_dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)


class Int8Linear(QuantLinear):
    """y = x · (q · s)ᵀ + b with q (N, K) int8 and one scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q = torch.empty(weight.shape, dtype=torch.int8)
        scale = torch.empty(weight.shape[0])
        # in row blocks (_ROWS_PER_BLOCK): a whole fp32 copy of a 49k x 576 head would
        # briefly cost ~0.3 GB
        for r in range(0, weight.shape[0], _ROWS_PER_BLOCK):
            w = weight[r:r + _ROWS_PER_BLOCK].detach().float()
            s = (torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_()) / 127.0).clamp_(min=1e-12)  # max |w|
            q[r:r + _ROWS_PER_BLOCK] = w.div(s[:, None]).round_().clamp_(-127, 127)
            scale[r:r + _ROWS_PER_BLOCK] = s
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(COMPUTE_DTYPE))
        self.register_buffer("bias", None if bias is None else bias.detach().to(COMPUTE_DTYPE))

    def dequantize(self) -> torch.Tensor:
        # int8 x bf16 promotes to bf16 in one pass (|q| <= 127 is exact in bf16)
        return torch.mul(self.qweight, self.scale[:, None])

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Weight rows `idx` (...,) -> (..., K) fp32, exact (for a refined head)."""
        return self.qweight[idx].float() * self.scale[idx].float()[..., None]

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _unpack_int4(packed: torch.Tensor, N: int, K: int, bn: int, half: bool) -> torch.Tensor:
    """The (N, K) int32 nibbles in `packed` (torch's CPU int4pack layout `bn`, `half`; see
    `_int4_layout`). For tests and the layout probe; the forward pass never unpacks."""
    out = torch.empty(K, N, dtype=torch.int32)
    for n0, n1, size, h in _int4_segments(N, bn, half):
        p = packed[n0:n1].reshape((n1 - n0) // size, K, size // 2).transpose(0, 1)  # (K, nb, size/2)
        o = out[:, n0:n1].view(K, (n1 - n0) // size, *((2, size // 2) if h else (size // 2, 2)))
        lo, hi = (o[:, :, 0], o[:, :, 1]) if h else (o[..., 0], o[..., 1])
        lo.copy_(p & 15)
        hi.copy_(p >> 4)
    return out.t().contiguous()


def _int4_segments(N: int, bn: int, half: bool) -> list[tuple[int, int, int, bool]]:
    """Row ranges of one packing pattern: (n0, n1, block rows, half). Full blocks of `bn`
    rows, then one shorter block that torch always packs in row pairs."""
    full = N // bn * bn
    segs = [(0, full, bn, half)] if full else []
    if N > full:
        segs.append((full, N, N - full, False))
    return segs


@functools.lru_cache(maxsize=None)
def _int4_layout() -> tuple[int, bool] | None:
    """How `aten._convert_weight_to_int4pack_for_cpu` lays out nibbles on this machine.

    It depends on the CPU kernels torch dispatches to (AVX-512, AVX2, plain): rows go in
    blocks of `bn` (64 / 32 / ...); block b keeps, for each input k, bn/2 bytes whose byte j
    holds rows (j, j + bn/2) as (low, high) nibble when `half`, rows (2j, 2j+1) otherwise;
    a last block shorter than bn always uses row pairs. Probed once by packing a random
    matrix; None when no known layout reproduces it (Int4Linear then keeps its own
    plain copy of the nibbles for the prefill path)."""
    g = torch.Generator().manual_seed(0)
    for bn in (64, 32, 16):
        N, K = 2 * bn + 16, 64  # two full blocks and a short one
        q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        except (RuntimeError, AttributeError):
            return None
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (N, K // 2):
            return None
        for half in (True, False):
            if torch.equal(_unpack_int4(packed, N, K, bn, half), q):
                return bn, half
    return None


class Int4Linear(QuantLinear):
    """y = x · Wᵀ + b with W[n, g·G:(g+1)·G] = q · scale[g, n] + min[g, n], q in 0..15.

    Keeps the nibbles once, packed for torch's kernel (few rows). For many rows (prefill)
    `dequantize` expands that same packed form to a bf16 weight: the packing is only a
    fixed interleave of rows (`_int4_layout`), so no second, plain copy is needed."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32):
        super().__init__()
        N, K = weight.shape
        if group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"int4 group size {group_size} is not supported; use one of "
                              f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        if K % group_size or N % 16:
            raise ConfigError(f"int4 needs in_features divisible by the group size {group_size} "
                              f"and out_features by 16; a ({N}, {K}) weight is not; use int8 or "
                              "another group size")
        self.out_features, self.in_features, self.group_size = N, K, group_size
        self._layout = _int4_layout()
        packed = torch.empty(N, K // 2, dtype=torch.uint8)
        sz = torch.empty(K // group_size, N, 2, dtype=COMPUTE_DTYPE)
        plain = None if self._layout is not None else torch.empty(N, K // 2, dtype=torch.uint8)
        # in row blocks (a multiple of every packing block, so the bytes are those of one
        # call on the whole matrix): a 4-bit 49k x 576 head would otherwise briefly hold
        # ~0.3 GB of fp32 and int32 temporaries
        for r in range(0, N, _ROWS_PER_BLOCK):
            rows = slice(r, min(N, r + _ROWS_PER_BLOCK))
            w = weight[rows].detach().float().view(-1, K // group_size, group_size)
            lo, hi = w.amin(-1), w.amax(-1)  # (n, G)
            scale = ((hi - lo) / 15.0).clamp_(min=1e-12)
            q = w.sub(lo[..., None]).div_(scale[..., None]).round_().clamp_(0, 15)
            q = q.to(torch.int32).view(-1, K)
            del w
            packed[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            # torch's kernel computes (q − 8)·scale + zero, so its zero is the group's midpoint
            sz[:, rows, 0] = scale.t().to(COMPUTE_DTYPE)
            sz[:, rows, 1] = (lo + 8.0 * scale).t().to(COMPUTE_DTYPE)
            if plain is not None:
                q8 = q.to(torch.uint8)
                plain[rows] = q8[:, 0::2] | (q8[:, 1::2] << 4)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_zeros", sz)
        if plain is not None:
            self.register_buffer("nibbles", plain)  # (N, K/2), low nibble first
        self.register_buffer("bias", None if bias is None else bias.detach().to(COMPUTE_DTYPE))

    def dequantize(self) -> torch.Tensor:
        """(N, K) bf16, as a transposed view of a (K, N) matrix: expanding the packed
        nibbles along N keeps their runs contiguous, and the scales broadcast over inputs.
        Each weight is (q − 8)·scale + zero in fp32, rounded once to bf16, as the kernel
        computes it."""
        N, K, G = self.out_features, self.in_features, self.group_size
        # (K/G, N) each, contiguous (strided operands make addcmul ~2x slower)
        scale = self.scales_zeros[..., 0].float()
        low = self.scales_zeros[..., 1].float() - 8.0 * scale  # the weight at q = 0
        if self._layout is None:
            b = self.nibbles
            q = torch.stack((b & 15, b >> 4), dim=-1).view(N, K // G, G)
            out = torch.empty(N, K // G, G, dtype=COMPUTE_DTYPE)
            torch.addcmul(low.t()[..., None], q, scale.t()[..., None], out=out)
            return out.view(N, K)
        bn, half = self._layout
        out = torch.empty(K, N, dtype=COMPUTE_DTYPE)
        for n0, n1, size, h in _int4_segments(N, bn, half):
            nb = (n1 - n0) // size
            # packed rows n0..n1 are nb blocks of (K, size/2) bytes
            p = self.qweight[n0:n1].reshape(nb, K // G, G, size // 2).permute(1, 2, 0, 3)
            split = (nb, 2, size // 2) if h else (nb, size // 2, 2)
            o = out[:, n0:n1].view(K // G, G, *split)
            s = scale[:, n0:n1].reshape(K // G, 1, *split)
            z = low[:, n0:n1].reshape(K // G, 1, *split)
            for nib, q in enumerate((p & 15, p >> 4)):
                pick = (slice(None),) * 3 + ((nib, slice(None)) if h else (slice(None), nib))
                torch.addcmul(z[pick], q, s[pick], out=o[pick])
        return out.t()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size,
                                                          self.scales_zeros)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4, group_size={self.group_size}")
