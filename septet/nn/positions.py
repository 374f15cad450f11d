"""Position information: learned absolute (GPT-3), rotary (PaLM, LLaMA), T5 relative bias (LaMDA)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LearnedPositions(nn.Module):
    """One learned vector per absolute position (GPT-2/GPT-3)."""

    def __init__(self, context: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(context, dim))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # (skipped while compiling: reading a value back would split the graph; an
        # out-of-range index still fails there, with the indexing error)
        if not torch.compiler.is_compiling() and int(positions.max()) >= self.weight.shape[0]:
            raise ValueError(
                f"position {int(positions.max())} is past the model's context of "
                f"{self.weight.shape[0]} tokens; shorten the input"
            )
        return self.weight[positions]  # (..., T, C)


class RoPE(nn.Module):
    """Rotary position embedding (Su et al. 2021).

    Two layouts exist in the wild and checkpoints differ: 'half' rotates the pair
    (x[i], x[i + D/2]) — HF LLaMA, GPT-NeoX — and 'interleaved' rotates (x[2i], x[2i+1]) —
    the original paper, Meta's LLaMA release, GGUF. Both encode the same geometry.
    """

    def __init__(self, d_head: int, theta: float = 10000.0, style: str = "half"):
        super().__init__()
        if d_head % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {d_head}")
        if style not in ("half", "interleaved"):
            raise ValueError(f"RoPE style must be 'half' or 'interleaved', got {style!r}")
        self.style, self.d_head, self.theta = style, d_head, theta
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        # not a buffer: D/2 numbers, and a model built on the meta device then loaded from
        # a checkpoint needs none restored; memoised per device (decoding calls it per token)
        cached = self._inv_freq.get(device)
        if cached is not None:
            return cached
        exponent = torch.arange(0, self.d_head, 2, dtype=torch.float64, device=device) / self.d_head
        out = (1.0 / self.theta ** exponent).float()
        if device.type != "meta" and not torch.compiler.is_compiling():
            self._inv_freq[device] = out
        return out

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles for `positions` (T,) or (B, T): each (…, T, D/2), fp32."""
        angles = positions.float()[..., None] * self.inv_freq(positions.device)  # (..., T, D/2)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate x (B, H, T, D) by angles cos/sin of shape (T, D/2) or (B, T, D/2)."""
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    if style == "half":
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.to(x.dtype)


def relative_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int,
                    bidirectional: bool) -> torch.Tensor:
    """T5's bucketing of (key − query) offsets: exact for small offsets, log-spaced after.

    Half the buckets cover offsets 0..n/2−1 one by one; the rest grow logarithmically up
    to `max_distance`, beyond which everything shares the last bucket (Raffel et al. 2020).
    """
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).long() * num_buckets
        n = relative.abs()
    else:
        n = (-relative).clamp(min=0)  # a decoder only looks back
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(is_small, n, large)


class T5RelativeBias(nn.Module):
    """A learned scalar per (head, bucket) added to attention logits; shared by all layers."""

    def __init__(self, n_head: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = False):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bidirectional = bidirectional
        self.weight = nn.Parameter(torch.zeros(num_buckets, n_head))

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos (T,) or (B, T), k_pos (S,) -> additive bias (1 or B, H, T, S)."""
        rel = k_pos - q_pos[..., None]  # (..., T, S)
        buckets = relative_bucket(rel, self.num_buckets, self.max_distance, self.bidirectional)
        bias = self.weight[buckets].movedim(-1, -3)  # (..., H, T, S)
        return bias if bias.dim() == 4 else bias[None]
