"""Weight-only int8 / int4 linear layers on PyTorch's own CPU kernels.

Decoding one token reads every weight once and does ~2 FLOPs per weight, so on a CPU
its speed is set by how many bytes the weights take. Weight-only quantisation keeps the
activations in float and stores the matrices in 8 or 4 bits:

- int8: symmetric, one fp scale per output row; `aten._weight_int8pack_mm`.
- int4: asymmetric, a scale and a zero point per group of `group_size` inputs (the same
  scheme as GGUF's Q4_1, so a model read from a Q4_1 file re-quantises without loss at
  group 32); `aten._convert_weight_to_int4pack_for_cpu` packs the nibbles once, and
  `aten._weight_int4pack_mm_for_cpu` multiplies.

`quantize_model` swaps every nn.Linear (after `optimize_for_inference` has packed q/k/v
and gate/up) for one of these, and gives a tied output head its own quantised copy of
the embedding, leaving the embedding lookup itself exact.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)


def _check_ops(mode: str) -> None:
    name = "_weight_int8pack_mm" if mode == "int8" else "_weight_int4pack_mm_for_cpu"
    if not hasattr(torch.ops.aten, name):
        raise ConfigError(f"--quant {mode}: this PyTorch ({torch.__version__}) has no aten.{name} kernel")


# Measured on this project's CPU (AVX-512/AMX, torch 2.13): both kernels are fast only with
# bf16 activations (fp32 ones take a slow reference path, ~10x slower), and only for a few
# rows: from ~32 rows (a prefill) dequantising to bf16 and using the dense bf16 matmul
# (AMX) wins by ~10x. So activations run through these layers in bf16.
COMPUTE_DTYPE = torch.bfloat16
DEQUANT_MIN_ROWS = 32
_ROWS_PER_BLOCK = 4096


class _QuantLinear(nn.Module):
    out_features: int
    in_features: int

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The (N, K) weight this layer multiplies by, in the compute dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != COMPUTE_DTYPE:
            x2 = x2.to(COMPUTE_DTYPE)
        if x2.shape[0] >= DEQUANT_MIN_ROWS:
            y = torch.nn.functional.linear(x2, self.dequantize())
        else:
            y = self._kernel(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)


class Int8Linear(_QuantLinear):
    """y = x · (q · s)ᵀ + b with q (N, K) int8 and one scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q = torch.empty(weight.shape, dtype=torch.int8)
        scale = torch.empty(weight.shape[0])
        # in row blocks: a whole fp32 copy of a 49k x 576 head would briefly cost ~0.3 GB
        for r in range(0, weight.shape[0], _ROWS_PER_BLOCK):
            w = weight[r:r + _ROWS_PER_BLOCK].detach().float()
            s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (rows,)
            q[r:r + _ROWS_PER_BLOCK] = torch.round(w / s[:, None]).clamp(-127, 127)
            scale[r:r + _ROWS_PER_BLOCK] = s
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(COMPUTE_DTYPE))
        self.register_buffer("bias", None if bias is None else bias.detach().to(COMPUTE_DTYPE))

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(COMPUTE_DTYPE) * self.scale[:, None]

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(_QuantLinear):
    """y = x · Wᵀ + b with W[n, g·G:(g+1)·G] = q · scale[g, n] + min[g, n], q in 0..15.

    Holds the nibbles twice: packed for torch's kernel (few rows) and plainly, two per
    byte, for a fast dequantisation when many rows come (prefill)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32):
        super().__init__()
        N, K = weight.shape
        if group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"int4 group size {group_size} is not supported; use one of "
                              f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        if K % group_size or N % 8:
            raise ConfigError(f"int4 needs in_features divisible by the group size {group_size} "
                              f"and out_features by 8; a ({N}, {K}) weight is not; use int8 or "
                              "another group size")
        self.out_features, self.in_features, self.group_size = N, K, group_size
        w = weight.detach().float().view(N, K // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)  # (N, G)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(N, K)
        # torch's kernel computes (q − 8)·scale + zero, so its zero is the group's midpoint
        zero = lo + 8.0 * scale
        sz = torch.stack((scale.t(), zero.t()), dim=-1).to(COMPUTE_DTYPE)  # (G, N, 2)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", sz.contiguous())
        q8 = q.to(torch.uint8)
        self.register_buffer("nibbles", (q8[:, 0::2] | (q8[:, 1::2] << 4)).contiguous())  # (N, K/2)
        self.register_buffer("bias", None if bias is None else bias.detach().to(COMPUTE_DTYPE))

    def dequantize(self) -> torch.Tensor:
        N, K, G = self.out_features, self.in_features, self.group_size
        b = self.nibbles
        q = torch.stack((b & 15, b >> 4), dim=-1).view(N, K // G, G).to(COMPUTE_DTYPE)
        scale = self.scales_zeros[..., 0].t()[..., None]  # (N, K/G, 1)
        zero = self.scales_zeros[..., 1].t()[..., None]
        return ((q - 8) * scale + zero).view(N, K)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size,
                                                          self.scales_zeros)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4, group_size={self.group_size}")


def quantize_linear(layer: nn.Linear | torch.Tensor, mode: str, group_size: int = 32) -> nn.Module:
    """An Int8Linear / Int4Linear computing what `layer` (or a bare (N, K) weight) does."""
    if mode not in MODES:
        raise ConfigError(f"quantisation {mode!r} is not one of {', '.join(MODES)}")
    _check_ops(mode)
    if isinstance(layer, nn.Linear):
        weight, bias = layer.weight, layer.bias
    else:
        weight, bias = layer, None
    if mode == "int8":
        return Int8Linear(weight, bias)
    return Int4Linear(weight, bias, group_size=group_size)


def quantize_model(model: nn.Module, mode: str, *, group_size: int = 32,
                   head: str | None = "int8") -> nn.Module:
    """Replace the model's linear layers (and a tied head) by weight-only `mode` layers, in place.

    `head` is the mode of the output head (tied or not); by default int8, as GGUF files keep
    the embedding at Q8_0: on SmolLM2 a 4-bit head alone costs ~10 points of top-1
    agreement with fp32 for ~0.7 ms a token. None: the same as `mode`.
    The model becomes inference-only (its state_dict changes). Returns the model.
    """
    head_mode = head or mode
    if head_mode not in MODES:
        raise ConfigError(f"head quantisation {head_mode!r} is not one of {', '.join(MODES)}")
    from .generate import optimize_for_inference

    if mode not in MODES:
        raise ConfigError(f"quantisation {mode!r} is not one of {', '.join(MODES)}")
    _check_ops(mode)
    optimize_for_inference(model)
    p = next(model.parameters())
    if p.device.type != "cpu":
        raise ConfigError(f"--quant {mode} uses PyTorch's CPU kernels; load the model on the CPU")
    # names, not modules: holding every float layer until the loop ends would keep the
    # whole unquantised model alive next to the quantised one (peak memory)
    targets = [(parent, name) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name in targets:
        m = head_mode if parent is model and name == "lm_head" else mode
        setattr(parent, name, quantize_linear(getattr(parent, name), m, group_size))
    if getattr(model, "lm_head", None) is None and hasattr(model, "tok_emb"):
        # a tied head: quantise a copy of the embedding for the output matmul only
        w = model.tok_emb.weight.detach()
        scale = model.config.d_model ** -0.5 if model.config.family == "palm" else 1.0
        model.quant_head = quantize_linear(w * scale if scale != 1.0 else w, head_mode, group_size)
    model._quant = mode
    return model


__all__ = ["Int8Linear", "Int4Linear", "quantize_linear", "quantize_model", "MODES"]
