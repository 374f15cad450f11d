"""A GPT-4-style text decoder, as a SKETCH: OpenAI disclosed only "a Transformer
pre-trained for next-token prediction, then RLHF". The survey repeats an unconfirmed
rumour of eight experts of ~220B parameters each; this family builds that idea as a
sparse mixture-of-experts decoder:

- LLaMA-style pre-RMSNorm blocks with RoPE and grouped-query attention
- every MLP is a mixture of 8 SwiGLU experts with top-2 routing (Shazeer et al. 2017,
  Fedus et al. 2021), plus the Switch balance loss (coefficient 0.01)
None of these choices is disclosed; presets say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig, Preset, Recipe, register, register_family
from ..nn.attention import Attention, AttnContext, KVCache
from ..nn.moe import MoE
from ..nn.norms import RMSNorm
from ..nn.positions import RoPE
from .base import DecoderLM, init_normal


@register_family
@dataclass
class GPT4Config(DecoderConfig):
    family = "gpt4"
    vocab_size: int = 100277
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    n_expert: int = 8
    top_k: int = 2
    balance_coef: float = 0.01
    capacity_factor: float | None = None  # None: dropless routing

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model


class MoEBlock(nn.Module):
    """x + Attn(RMSNorm(x)), then x + MoE(RMSNorm(x))."""

    def __init__(self, c: GPT4Config, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c.d_model, c.n_head, c.n_kv_head, c.d_head, bias=False, layer_idx=layer_idx)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = MoE(c.d_model, c.d_ff, c.n_expert, c.top_k, c.capacity_factor)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx, cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT4(DecoderLM):
    def __init__(self, config: GPT4Config):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.rope = RoPE(c.d_head, c.rope_theta, style="half")
        self.blocks = nn.ModuleList(MoEBlock(c, i) for i in range(c.n_layer))
        self.norm_f = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_normal(self, std=0.02, residual_std=0.02 / math.sqrt(2 * c.n_layer))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)  # (B, T, V)

    def aux_loss_coef(self) -> float:
        return self.config.balance_coef


_SKETCH = "sketch of an unconfirmed rumour, not a disclosed architecture"
register(Preset(
    "gpt4-moe-8x220b",
    GPT4Config(n_layer=120, d_model=12288, n_head=96, n_kv_head=8, d_ff=49152, context=8192),
    Recipe(optimizer="adamw", lr=6e-5, warmup_steps=2000),
    note=f"{_SKETCH}: 8 experts, ~1.8T parameters in all",
    source="survey: 8 models of 220B each (unconfirmed)",
))
register(Preset(
    "gpt4-moe-tiny",
    GPT4Config(vocab_size=4096, n_layer=4, d_model=256, n_head=8, n_kv_head=4, d_ff=512, context=256),
    Recipe(optimizer="adamw", lr=1e-3, warmup_steps=50, batch_tokens=8192),
    note=f"CPU-sized; {_SKETCH}",
))
