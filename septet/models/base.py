"""What every decoder-only family shares: the forward skeleton, the loss, the cache.

A family file supplies its blocks and three small hooks — how tokens become vectors,
what per-call position context its attention needs, how vectors become logits — and
reads like the paper's architecture section. Everything else lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig
from ..errors import InputError
from ..nn.attention import Attention, AttnContext, KVCache
from ..nn.fused import CrossEntropyZLoss
from ..nn.mlp import GatedMLP
from ..nn.moe import MoE


@dataclass
class LossParts:
    total: torch.Tensor  # what to backpropagate
    ce: torch.Tensor  # mean next-token cross-entropy
    z: torch.Tensor  # PaLM's z-loss term (already scaled), 0 if unused
    aux: torch.Tensor  # MoE balance term (already scaled), 0 if unused


class DecoderLM(nn.Module):
    """Decoder-only LM: embed → blocks → final norm → logits.

    forward(tokens (B, T) int64, *, cache=None, positions=None) -> logits (B, T, V).
    `positions` (T,) or (B, T) default to cache.pos + arange(T).
    """

    config: DecoderConfig
    blocks: nn.ModuleList
    norm_f: nn.Module

    # --- family hooks (defaults: a token table, rotary angles when the model has `rope`)
    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(tokens)  # (B, T, C)

    def attn_context(self, positions: torch.Tensor, n_keys: int) -> AttnContext:
        rope = getattr(self, "rope", None)
        if rope is None:
            return AttnContext()
        cos, sin = rope.cos_sin(positions)
        return AttnContext(cos=cos, sin=sin, rope_style=rope.style)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        """What a tied head multiplies its embedding products by (PaLM: 1/√d)."""
        return 1.0

    def row_positions(self, pad: torch.Tensor, start: int, T: int) -> torch.Tensor:
        """Positions of cache slots [start, start + T) for rows left-padded by `pad` (B,):
        each row's own, (B, T), so a padded row computes what it would alone."""
        slots = torch.arange(start, start + T, device=pad.device)
        return (slots[None, :] - pad[:, None]).clamp(min=0)

    def exact_under_key_mask(self, n_slots: int) -> bool:
        """Whether one query attending to all `n_slots` cache slots under a key mask computes
        what the causal forward does (a static-shape decode step relies on it): not for a
        layer whose window is shorter than the cache."""
        return all(m.window is None or m.window >= n_slots for m in self.modules() if isinstance(m, Attention))

    # --- shared -------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """`pad_mask` (B, cache.pos + T) bool marks real keys (left-padded batches);
        `last_only` computes the logits of the last position only (B, 1, V)."""
        if positions is None:
            positions = self.default_positions(tokens.shape[1], cache, tokens.device)
        x = self.embed(tokens, positions)  # (B, T, C)
        x = self.hidden_states(x, positions, cache=cache, pad_mask=pad_mask, last_only=last_only)
        return self.head_logits(x)  # (B, T, V)

    def default_positions(self, T: int, cache: KVCache | None, device: torch.device) -> torch.Tensor:
        """cache.pos + arange(T), checked against the context length."""
        start = cache.pos if cache is not None else 0
        if start + T > self.config.context:
            raise InputError(f"input of {start + T} tokens exceeds the model's context of "
                             f"{self.config.context}; shorten the prompt")
        return torch.arange(start, start + T, device=device)  # (T,)

    def hidden_states(self, x: torch.Tensor, positions: torch.Tensor, *, cache: KVCache | None = None,
                      pad_mask: torch.Tensor | None = None, last_only: bool = False,
                      before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                      ) -> torch.Tensor:
        """Input vectors x (B, T, C), already embedded, through the blocks and the final norm.

        The entry point for models that feed a frozen LM more than token ids: BLIP-2 prepends
        soft-prompt vectors, Flamingo runs its gated cross-attention `before_block(i, x)`."""
        T = x.shape[1]
        start = cache.pos if cache is not None else 0
        ctx = self.attn_context(positions, start + T)
        if pad_mask is not None:
            ctx = ctx._replace(pad_mask=pad_mask)
        for i, block in enumerate(self.blocks):
            if before_block is not None:
                x = before_block(i, x)
            x = block(x, ctx, cache)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.norm_f(x)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) -> logits (B, T, V)."""
        quant = self._modules.get("quant_head")
        if quant is not None:  # a quantised copy of a tied head (set_quantized_head)
            return quant(x)
        return self.logits(x)

    # --- inference ------------------------------------------------------------------
    inference_ready = False  # True once prepare_for_inference has run

    def prepare_for_inference(self) -> None:
        """Pack each attention's q/k/v and each gated MLP's gate/up into one layer, once, and
        freeze the model: it is inference-only from here (its state_dict keys change)."""
        if self.inference_ready:
            return
        pack_for_inference(self)
        self.eval()
        self.requires_grad_(False)
        self.inference_ready = True

    def set_quantized_head(self, head: nn.Module) -> None:
        """Compute a tied head's logits with `head` (a quantised copy of the embedding)."""
        self.quant_head = head

    def new_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, cache_cls: type[KVCache] = KVCache) -> KVCache:
        c = self.config
        p = next(self.parameters())
        return cache_cls(c.n_layer, batch, c.n_kv_head, max_len or c.context, c.d_head,
                         dtype=dtype or p.dtype, device=device or p.device)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def aux_loss_coef(self) -> float:
        return 0.0

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> LossParts:
        """Next-token cross-entropy (+ PaLM z-loss, + MoE balance) in fp32.
        PaLM §5: z_loss = 1e-4 · log²Z keeps the softmax normaliser near 1."""
        flat = logits.float().reshape(-1, logits.shape[-1])  # (B·T, V)
        tgt = targets.reshape(-1)
        zero = flat.new_zeros(())
        z = zero
        if torch.compiler.is_compiling():  # plain form; the compiler fuses it
            ce = F.cross_entropy(flat, tgt, ignore_index=ignore_index)
            if self.config.z_loss:
                valid = tgt != ignore_index
                lse = torch.logsumexp(flat, dim=-1)
                z = self.config.z_loss * (lse.square() * valid).sum() / valid.sum()
        else:  # one log-softmax for both terms, hand-written backward
            ce, log_z_sq = CrossEntropyZLoss.apply(flat, tgt, ignore_index)
            if self.config.z_loss:
                z = self.config.z_loss * log_z_sq
        aux = zero
        coef = self.aux_loss_coef()
        if coef:
            aux = coef * sum(m.balance_loss for m in self.moe_layers()) / max(1, len(self.moe_layers()))
        return LossParts(total=ce + z + aux, ce=ce, z=z, aux=aux)


def pack_for_inference(module: nn.Module) -> None:
    """Pack q/k/v and gate/up of every attention and gated MLP inside `module` (a model, or
    one block of it while a checkpoint streams in)."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.pack_qkv()
        elif isinstance(m, GatedMLP):
            m.pack_gate_up()


def init_normal(module: nn.Module, std: float = 0.02, residual_std: float | None = None,
                residual_names: tuple[str, ...] = ("o_proj", "proj", "down_proj", "w_down")) -> None:
    """GPT-2/GPT-3 init: N(0, std) for weights, zeros for biases, and the residual output
    projections at std/√(2·n_layer) so the residual stream's variance does not grow with depth."""
    for name, p in module.named_parameters():
        parts = name.split(".")
        leaf = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
        if p.dim() < 2:
            continue  # norms keep ones, biases are zeroed below
        s = residual_std if residual_std is not None and leaf in residual_names else std
        nn.init.normal_(p, mean=0.0, std=s)
    for _name, m in module.named_modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-embedding). Tied weights count once; non-embedding excludes the token
    and learned position tables (Kaplan et al. 2020), but keeps an untied output head."""
    seen: set[int] = set()
    total = emb = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if name.startswith(("tok_emb", "pos_emb")):
            emb += p.numel()
    return total, total - emb
