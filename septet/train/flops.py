"""Model FLOPs and model FLOPs utilisation (MFU), as defined in PaLM Appendix B.

PaLM: model FLOPs per token = 6N + 12·L·H·Q·T, with N parameters, L layers, H heads,
Q head dim, T sequence length; MFU = tokens/s × that ÷ peak FLOP/s. "Model" FLOPs
count only what the model needs (forward + backward = 3 × forward, 2 FLOPs per
multiply-add), never rematerialisation, so MFU is comparable across implementations.

Which N: PaLM's own numbers use the total parameter count. 238.3k tokens/s on 6144
TPU v4 (275 TFLOP/s bf16 each) is 46.2% MFU only with N = 540.35B, the full count
including the 256k × 18432 embedding; without it the figure would be 45.8%. That
embedding is tied to the output head, so it does take part in one matmul per token.
The rule we use: N = parameters that take part in a matmul per token, i.e. all
parameters minus pure lookup tables (an untied input embedding, learned position
embeddings). `matmul_params(model)` computes it. The attention term uses the full T
(no halving for causal masking), as PaLM does.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn


def attention_flops_per_token(n_layer: int, n_head: int, d_head: int, seq_len: int) -> int:
    """12·L·H·Q·T: QKᵀ and attention·V (2·2·Q·T FLOPs per head forward) × 3 for backward."""
    return 12 * n_layer * n_head * d_head * seq_len


def model_flops_per_token(n_params_matmul: int, n_layer: int, n_head: int, d_head: int, seq_len: int) -> int:
    """6N + 12·L·H·Q·T (PaLM Appendix B); N as explained in the module docstring."""
    return 6 * n_params_matmul + attention_flops_per_token(n_layer, n_head, d_head, seq_len)


def matmul_params(model: nn.Module, tied_head: bool = False) -> int:
    """Parameters that take part in a matmul per token: all of them, minus nn.Embedding
    tables not shared with another module. A model that reuses its token embedding as the
    output head inside forward (F.linear(x, emb.weight), no second module) passes
    tied_head=True so the largest embedding table counts, as PaLM's N does."""
    total = sum(p.numel() for p in model.parameters())
    users: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    tables = {
        id(m.weight): m.weight.numel() for m in model.modules()
        if isinstance(m, nn.Embedding) and users.get(id(m.weight), 0) == 1
    }
    if tied_head and tables:
        tables.pop(max(tables, key=tables.get))
    return total - sum(tables.values())


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation as a fraction (0.462 for PaLM-540B)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be positive")
    return tokens_per_s * flops_per_token / peak_flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    size: int | None = None,
    seconds: float = 1.0,
) -> float:
    """Achievable dense-matmul FLOP/s on this device: time repeated size×size matmuls
    (2·size³ FLOPs each) for about `seconds` after a warmup. A measured stand-in for
    the datasheet peak when the hardware's is unknown (CPUs); report which was used.
    Default size: 1024 on a CPU; 8192 on a GPU, where smaller products leave the tensor
    cores idle for part of each launch and understate the peak."""
    device = torch.device(device)
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(2):  # warmup: thread pools, kernels, caches
        torch.mm(a, b)
    _sync(device)
    flops_each = 2.0 * size**3
    count = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds or count == 0:
        torch.mm(a, b)
        count += 1
        if count % 4 == 0 or device.type != "cuda":
            _sync(device)
            elapsed = time.perf_counter() - start
    _sync(device)
    elapsed = time.perf_counter() - start
    return count * flops_each / max(elapsed, 1e-9)


class Throughput:
    """An exponential moving average of tokens/s over training steps."""

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Throughput alpha={alpha} must be in (0, 1]")
        self.alpha = alpha
        self.tokens_per_s: float | None = None

    def update(self, tokens: int, seconds: float) -> float:
        rate = tokens / max(seconds, 1e-9)
        if self.tokens_per_s is None or not math.isfinite(self.tokens_per_s):
            self.tokens_per_s = rate
        else:
            self.tokens_per_s += self.alpha * (rate - self.tokens_per_s)
        return self.tokens_per_s


__all__ = [
    "Throughput", "attention_flops_per_token", "matmul_params", "measure_matmul_peak",
    "mfu", "model_flops_per_token",
]
