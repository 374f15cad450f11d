"""Position-wise feed-forward layers used by the seven models."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fused import pack_linears


class GeluMLP(nn.Module):
    """GPT-2/GPT-3: Linear → GELU (tanh approximation, as GPT-2 shipped) → Linear."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SquaredReLU(nn.Module):
    """Primer (So et al. 2021): ReLU(xW)² W₂."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class GatedMLP(nn.Module):
    """GLU family (Shazeer 2020): down(act(gate(x)) · up(x)). Three matrices, no biases."""

    act: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.gate_up_proj: nn.Module | None = None  # gate and up packed into one layer (pack_gate_up)

    def pack_gate_up(self) -> None:
        """Pack gate and up into one layer for inference (one matmul); the two are dropped."""
        if self.gate_up_proj is None and isinstance(self.gate_proj, nn.Linear):
            self.gate_up_proj = pack_linears([self.gate_proj, self.up_proj])
            self.gate_proj = self.up_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(type(self).act(gate) * up)
        return self.down_proj(type(self).act(self.gate_proj(x)) * self.up_proj(x))


class SwiGLU(GatedMLP):
    """PaLM, LLaMA: Swish (SiLU) gate."""

    act = staticmethod(F.silu)


class GeGLU(GatedMLP):
    """LaMDA's gated-GELU: GELU gate."""

    act = staticmethod(F.gelu)


def llama_ffn_dim(d_model: int, multiple_of: int = 256) -> int:
    """LLaMA's hidden size: 2/3 · 4d (same FLOPs as a 4d GELU MLP), rounded up to `multiple_of`."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
