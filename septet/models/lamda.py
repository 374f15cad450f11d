"""LaMDA (Thoppilan et al. 2022): a decoder-only Transformer with T5-style relative
attention bias and gated-GELU MLPs, pre-trained on dialog-heavy data.

Published: 137B = 64 layers, d_model 8192, d_ff 65536, 128 heads of 128; 32k
SentencePiece vocabulary. Unpublished, and our explicit choices:
- norm placement and kind: pre-norm with RMSNorm (T5's bias-free, mean-free LayerNorm)
- one relative-bias table (32 buckets, max distance 128) shared by all layers, as in T5
- tied input/output embeddings; init N(0, 0.02) with scaled residual projections (GPT-2
  style), since LaMDA's recipe (optimizer, init) is unpublished and this one trains well
  under AdamW; T5's N(0, 1) embeddings with 1/√d logits suit Adafactor's relative steps
- the 2B and 8B shapes (the paper gives only their sizes): labelled estimates
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig, Preset, Recipe, register, register_family
from ..nn.attention import Attention, AttnContext, KVCache
from ..nn.mlp import GeGLU
from ..nn.norms import RMSNorm
from ..nn.positions import T5RelativeBias
from .base import DecoderLM, init_normal


@register_family
@dataclass
class LaMDAConfig(DecoderConfig):
    family = "lamda"
    vocab_size: int = 32000
    norm_eps: float = 1e-6
    rel_buckets: int = 32
    rel_max_distance: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_ff == 0:
            self.d_ff = 8 * self.d_model  # the 137B ratio


class Block(nn.Module):
    """x + Attn(RMSNorm(x)) with the shared relative bias, then x + GeGLU(RMSNorm(x))."""

    def __init__(self, c: LaMDAConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c.d_model, c.n_head, c.n_kv_head, c.d_head, bias=False, layer_idx=layer_idx)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = GeGLU(c.d_model, c.d_ff)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx, cache)
        return x + self.mlp(self.mlp_norm(x))


class LaMDA(DecoderLM):
    def __init__(self, config: LaMDAConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.rel_bias = T5RelativeBias(c.n_head, c.rel_buckets, c.rel_max_distance)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm_f = RMSNorm(c.d_model, c.norm_eps)
        init_normal(self, std=0.02, residual_std=0.02 / math.sqrt(2 * c.n_layer))
        nn.init.zeros_(self.rel_bias.weight)

    def attn_context(self, positions: torch.Tensor, n_keys: int) -> AttnContext:
        k_pos = torch.arange(n_keys, device=positions.device)
        return AttnContext(bias=self.rel_bias(positions, k_pos))  # (1|B, H, T, S)

    def row_positions(self, pad: torch.Tensor, start: int, T: int) -> torch.Tensor:
        # T5 buckets see only key - query offsets, and a left-padded row's offsets between its
        # own slots are the same as unpadded: the slot indices serve every row, (T,)
        return torch.arange(start, start + T, device=pad.device)

    def exact_under_key_mask(self, n_slots: int) -> bool:
        return False  # the bias is computed for the filled keys only (attn_context's n_keys)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.tok_emb.weight.t()  # tied head, (B, T, V)


_SRC = "Thoppilan et al. 2022, Table 27"
_RECIPE = Recipe(optimizer="adamw", lr=1e-4, warmup_steps=2000, batch_tokens=256 * 1024,
                 train_tokens=int(2.81e12))
register(Preset("lamda-137b", LaMDAConfig(n_layer=64, d_model=8192, n_head=128, d_head=128,
                                          d_ff=65536), _RECIPE, source=_SRC))
register(Preset("lamda-2b", LaMDAConfig(n_layer=32, d_model=2048, n_head=16, d_head=128, d_ff=8192),
                _RECIPE, note="estimate: the paper publishes only the size", source=_SRC))
register(Preset("lamda-8b", LaMDAConfig(n_layer=32, d_model=4096, n_head=32, d_head=128, d_ff=16384),
                _RECIPE, note="estimate: the paper publishes only the size", source=_SRC))
register(Preset(
    "lamda-tiny",
    LaMDAConfig(vocab_size=4096, n_layer=6, d_model=256, n_head=8, d_ff=1024, context=256),
    Recipe(optimizer="adamw", lr=1e-3, warmup_steps=50, batch_tokens=8192),
    note="CPU-sized",
))
