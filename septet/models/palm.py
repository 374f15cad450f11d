"""PaLM (Chowdhery et al. 2022).

- parallel block: y = x + Attn(LN(x)) + MLP(LN(x)), one LayerNorm feeding both branches
- multi-query attention: every query head shares one key/value head (head dim 256)
- RoPE; SwiGLU MLP with d_ff = 4·d_model; no biases anywhere, LayerNorms included
- input and output embeddings shared; embeddings ~ N(0, 1), so the output logits are
  scaled by 1/√d_model; other weights use fan-in scaling, N(0, 1/fan_in)
- z-loss 1e-4·log²Z encourages the softmax normaliser to stay near 1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig, Preset, Recipe, register, register_family
from ..nn.attention import Attention, AttnContext, KVCache
from ..nn.mlp import SwiGLU
from ..nn.norms import LayerNorm
from ..nn.positions import RoPE
from .base import DecoderLM


@register_family
@dataclass
class PaLMConfig(DecoderConfig):
    family = "palm"
    split_digits = True  # PaLM §2: SentencePiece with digits split
    vocab_size: int = 256000
    n_kv_head: int = 1
    d_head: int = 256
    z_loss: float = 1e-4
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model


class ParallelBlock(nn.Module):
    """Attention and MLP read the same normalised input; their outputs add to the residual.
    PaLM reports ~15% faster training at scale, since the two input matmuls fuse."""

    def __init__(self, c: PaLMConfig, layer_idx: int):
        super().__init__()
        self.ln = LayerNorm(c.d_model, c.norm_eps, bias=False)
        self.attn = Attention(c.d_model, c.n_head, c.n_kv_head, c.d_head, bias=False, layer_idx=layer_idx)
        self.mlp = SwiGLU(c.d_model, c.d_ff)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVCache | None) -> torch.Tensor:
        h = self.ln(x)
        return x + self.attn(h, ctx, cache) + self.mlp(h)


class PaLM(DecoderLM):
    def __init__(self, config: PaLMConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.rope = RoPE(c.d_head, c.rope_theta, style="half")
        self.blocks = nn.ModuleList(ParallelBlock(c, i) for i in range(c.n_layer))
        self.norm_f = LayerNorm(c.d_model, c.norm_eps, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)

    @property
    def logit_scale(self) -> float:
        return self.config.d_model ** -0.5  # §2: the shared embedding's logits scaled by 1/√d

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.tok_emb.weight.t()) * self.logit_scale  # (B, T, V)


# Adafactor (unfactored), lr 1e-2 for 10k steps then 1/√step, clip 1.0; for Adafactor the
# weight_decay field multiplies lr², so 1.0 is PaLM's "weight decay lr²"
_RECIPE = Recipe(optimizer="adafactor", lr=1e-2, schedule="inverse_sqrt", warmup_steps=10000,
                 weight_decay=1.0, betas=(0.9, 0.0), batch_tokens=2048 * 2048,
                 train_tokens=int(780e9))
_SRC = "Chowdhery et al. 2022, Table 1"
register(Preset("palm-8b", PaLMConfig(n_layer=32, d_model=4096, n_head=16), _RECIPE, source=_SRC))
register(Preset("palm-62b", PaLMConfig(n_layer=64, d_model=8192, n_head=32), _RECIPE, source=_SRC))
register(Preset("palm-540b", PaLMConfig(n_layer=118, d_model=18432, n_head=48), _RECIPE, source=_SRC))
register(Preset(
    "palm-tiny",
    PaLMConfig(vocab_size=4096, n_layer=6, d_model=256, n_head=8, d_head=32, context=256),
    Recipe(optimizer="adafactor", lr=1e-2, schedule="inverse_sqrt", warmup_steps=100,
           weight_decay=1.0, betas=(0.9, 0.0), batch_tokens=8192),
    note="CPU-sized",
))
