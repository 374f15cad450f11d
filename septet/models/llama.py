"""LLaMA (Touvron et al. 2023).

- pre-normalisation with RMSNorm (fp32), a final RMSNorm
- SwiGLU MLP, hidden = 2/3·4d rounded up to a multiple of 256
- RoPE (θ = 10000) on q and k in every layer; no biases; untied output head
- grouped-query attention is allowed (n_kv_head < n_head), as in today's open
  LLaMA-architecture checkpoints (LLaMA-2 70B, SmolLM2); the 2023 presets use MHA
- init is unpublished; we use N(0, 0.02) with scaled residual projections (as GPT-2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig, Preset, Recipe, register, register_family
from ..errors import ConfigError
from ..nn.attention import Attention, AttnContext, KVCache
from ..nn.mlp import SwiGLU, llama_ffn_dim
from ..nn.norms import RMSNorm
from ..nn.positions import RoPE
from .base import DecoderLM, init_normal


@register_family
@dataclass
class LLaMAConfig(DecoderConfig):
    family = "llama"
    split_digits = True  # LLaMA §2.1: numbers split into digits
    vocab_size: int = 32000
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_style: str = "half"  # HF layout; Meta .pth and GGUF checkpoints are converted on load
    tie_embeddings: bool = False  # LLaMA unties; some descendants (SmolLM2) tie

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_ff == 0:
            self.d_ff = llama_ffn_dim(self.d_model)
        if self.rope_style not in ("half", "interleaved"):
            raise ConfigError(f"config field 'rope_style' is {self.rope_style!r}; use 'half' or 'interleaved'")


class Block(nn.Module):
    """x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, c: LLaMAConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c.d_model, c.n_head, c.n_kv_head, c.d_head, bias=False, layer_idx=layer_idx)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c.d_model, c.d_ff)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx, cache)
        return x + self.mlp(self.mlp_norm(x))


class LLaMA(DecoderLM):
    def __init__(self, config: LLaMAConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.rope = RoPE(c.d_head, c.rope_theta, style=c.rope_style)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm_f = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_normal(self, std=0.02, residual_std=0.02 / math.sqrt(2 * c.n_layer))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return x @ self.tok_emb.weight.t()
        return self.lm_head(x)  # (B, T, V)


def _preset(name: str, d_model: int, n_head: int, n_layer: int, lr: float, tokens: float) -> None:
    cfg = LLaMAConfig(n_layer=n_layer, d_model=d_model, n_head=n_head)
    recipe = Recipe(optimizer="adamw", lr=lr, schedule="cosine", warmup_steps=2000,
                    batch_tokens=4 * 2**20, train_tokens=int(tokens))
    register(Preset(name, cfg, recipe, source="Touvron et al. 2023, Table 2"))


_preset("llama-7b", 4096, 32, 32, 3.0e-4, 1.0e12)
_preset("llama-13b", 5120, 40, 40, 3.0e-4, 1.0e12)
_preset("llama-33b", 6656, 52, 60, 1.5e-4, 1.4e12)
_preset("llama-65b", 8192, 64, 80, 1.5e-4, 1.4e12)
register(Preset(
    "llama-tiny",
    LLaMAConfig(vocab_size=4096, n_layer=6, d_model=256, n_head=8, n_kv_head=4, context=256),
    Recipe(optimizer="adamw", lr=1e-3, warmup_steps=50, batch_tokens=8192),
    note="CPU-sized; grouped-query attention (4 K/V heads)",
))
