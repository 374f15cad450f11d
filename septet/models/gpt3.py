"""GPT-3 (Brown et al. 2020): the GPT-2 architecture with alternating dense and locally
banded attention layers (the Sparse Transformer pattern).

- learned absolute positions, pre-LayerNorm blocks, a final LayerNorm
- GELU MLP with d_ff = 4·d_model, biases everywhere, tied input/output embeddings
- init N(0, 0.02); residual output projections N(0, 0.02/√(2·n_layer))
- even layers dense, odd layers banded; the band width is unpublished — GPT-Neo's
  replication uses 256, our default. `window=None` makes every layer dense (= GPT-2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig, Preset, Recipe, register, register_family
from ..errors import ConfigError
from ..nn.attention import Attention, AttnContext, KVCache
from ..nn.mlp import GeluMLP
from ..nn.norms import LayerNorm
from ..nn.positions import LearnedPositions
from .base import DecoderLM, init_normal


@register_family
@dataclass
class GPT3Config(DecoderConfig):
    family = "gpt3"
    vocab_size: int = 50257
    window: int | None = 256  # band width of the odd (sparse) layers; None: all dense

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model
        if self.window is not None and self.window < 1:
            raise ConfigError(f"config field 'window' is {self.window}; use a positive band width or null")


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, c: GPT3Config, layer_idx: int):
        super().__init__()
        window = c.window if layer_idx % 2 == 1 else None
        self.ln_1 = LayerNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c.d_model, c.n_head, c.n_kv_head, c.d_head, bias=True,
                              window=window, layer_idx=layer_idx)
        self.ln_2 = LayerNorm(c.d_model, c.norm_eps)
        self.mlp = GeluMLP(c.d_model, c.d_ff, bias=True)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), ctx, cache)
        return x + self.mlp(self.ln_2(x))


class GPT3(DecoderLM):
    def __init__(self, config: GPT3Config):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = LearnedPositions(c.context, c.d_model)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm_f = LayerNorm(c.d_model, c.norm_eps)
        init_normal(self, std=0.02, residual_std=0.02 / math.sqrt(2 * c.n_layer))

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(tokens) + self.pos_emb(positions)  # (B, T, C)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.tok_emb.weight.t()  # tied head, (B, T, V)


def _preset(name: str, n_layer: int, d_model: int, n_head: int, d_head: int,
            batch_tokens: float, lr: float, note: str = "") -> None:
    cfg = GPT3Config(n_layer=n_layer, d_model=d_model, n_head=n_head, d_head=d_head)
    # Adam β=(0.9, 0.95), clip 1.0, wd 0.1; warmup 375M tokens, cosine to 10% over 260B tokens
    warmup = max(1, round(375e6 / batch_tokens))
    recipe = Recipe(optimizer="adamw", lr=lr, schedule="cosine", warmup_steps=warmup,
                    batch_tokens=int(batch_tokens), train_tokens=int(300e9))
    register(Preset(name, cfg, recipe, note=note, source="Brown et al. 2020, Table 2.1"))


_preset("gpt3-125m", 12, 768, 12, 64, 0.5e6, 6.0e-4)
_preset("gpt3-350m", 24, 1024, 16, 64, 0.5e6, 3.0e-4)
_preset("gpt3-760m", 24, 1536, 16, 96, 0.5e6, 2.5e-4)
# Table 2.1 prints 24 heads of 128 for d=2048, which is inconsistent (24·128 = 3072) and
# would give 1.5B parameters; 16 heads of 128 keeps d_head and the published 1.3B.
_preset("gpt3-1.3b", 24, 2048, 16, 128, 1e6, 2.0e-4,
        note="16 heads of 128: the paper's 24x128 contradicts d_model=2048")
_preset("gpt3-2.7b", 32, 2560, 32, 80, 1e6, 1.6e-4)
_preset("gpt3-6.7b", 32, 4096, 32, 128, 2e6, 1.2e-4)
_preset("gpt3-13b", 40, 5120, 40, 128, 2e6, 1.0e-4)  # the paper prints 5140, a typo
_preset("gpt3-175b", 96, 12288, 96, 128, 3.2e6, 0.6e-4)

register(Preset(
    "gpt3-tiny",
    GPT3Config(vocab_size=4096, n_layer=6, d_model=256, n_head=8, context=256, window=64),
    Recipe(optimizer="adamw", lr=1e-3, warmup_steps=50, batch_tokens=8192),
    note="CPU-sized; window 64 so banding is active at context 256",
))
