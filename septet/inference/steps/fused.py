"""Decode steps of LLaMA-architecture models as one call into septet's C kernels.

An eager decode step makes thousands of small aten calls around the matmuls and attention
(norms, rotary, cache writes, views, casts, SwiGLU), a large share of a small model's step
(profiles: docs/benchmarks.md); torch.compile removes part of it after a compile that a
chat user waits through. `septet::llama_decode` (septet/kernels/step.c) runs all layers in one call on
the same block-weight matmul and attention kernels: the embedding, final norm and head stay
the model's own modules.

The fused step applies where it computes what the model does: a `LLaMA` whose blocks are
the plain LLaMA block (RMSNorm, packed q/k/v, GQA attention without a window, SwiGLU with
packed gate/up) and whose linear layers are Q4_1 / Q8_0 block layers (`--quant int4/int8`,
or `auto` on a 4/8-bit GGUF), in fp32 on a CPU with the kernels built. Anything else keeps
the model's own forward. SEPTET_FUSED_DECODE=0 turns it off.
"""

from __future__ import annotations

import torch

from ... import env, kernels
from ...models.base import DecoderLM
from ...models.llama import Block, LLaMA
from ...nn.attention import KVCache
from ...nn.mlp import SwiGLU
from ...nn.norms import RMSNorm
from ..quant.blocks import Q4Linear, Q8Linear

_EMPTY = torch.empty(0)


def why_not_fused(model: DecoderLM) -> str | None:
    """None when `FusedDecoder` computes exactly what `model` does, else the reason it does not."""
    if not env.fused_decode_enabled():
        return "SEPTET_FUSED_DECODE=0"
    if not isinstance(model, LLaMA) or type(model).hidden_states is not DecoderLM.hidden_states:
        return f"{type(model).__name__} is not a plain LLaMA stack"
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        return "the model is not on the CPU"
    if any(type(b) is not Block for b in model.blocks):
        return "a block is not LLaMA's"
    for b in model.blocks:
        a, mlp = b.attn, b.mlp
        if type(mlp) is not SwiGLU or type(b.attn_norm) is not RMSNorm or type(b.mlp_norm) is not RMSNorm:
            return "a block's MLP or norms differ from LLaMA's"
        if a.window is not None or a.qkv_proj is None or mlp.gate_up_proj is None:
            return "q/k/v or gate/up are not packed (septet.inference.optimize_for_inference)"
        if b.attn_norm.eps != b.mlp_norm.eps or b.attn_norm.eps != model.blocks[0].attn_norm.eps:
            return "the norms' eps differ between layers"
        for lin in (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if type(lin) not in (Q4Linear, Q8Linear):
                return "the linear layers are not Q4_1 / Q8_0 blocks (--quant int4 or int8)"
        for w in (b.attn_norm.weight, b.mlp_norm.weight):
            if w.dtype != torch.float32:
                return "the norms are not fp32"
    if not kernels.available():
        return f"septet's kernels are not available: {kernels.why_not()}"
    return None


def _linear(layer: Q4Linear | Q8Linear) -> tuple[list[torch.Tensor], list[int]]:
    bias = _EMPTY if layer.bias is None else layer.bias
    if isinstance(layer, Q4Linear):
        return [layer.qs, layer.d, layer.m, bias], [4, int(layer.int8_act)]
    return [layer.qs, layer.d, _EMPTY, bias], [8, int(layer.int8_act)]


class FusedDecoder:
    """step(tokens (B, 1), positions (B, 1), key_mask (B, >= pos + 1) or None, cache) -> (B, V).

    Holds references to the model's weight tensors, taken when it is made: make a new one
    after changing the model's layers (the engine makes one per batch)."""

    def __init__(self, model: DecoderLM):
        reason = why_not_fused(model)
        if reason is not None:
            raise ValueError(f"no fused decode step for this model: {reason}")
        self.model = model
        self.weights: list[torch.Tensor] = []
        self.kinds: list[int] = []
        for b in model.blocks:
            self.weights.append(b.attn_norm.weight.detach())
            for lin in (b.attn.qkv_proj, b.attn.o_proj):
                w, k = _linear(lin)
                self.weights += w
                self.kinds += k
            self.weights.append(b.mlp_norm.weight.detach())
            for lin in (b.mlp.gate_up_proj, b.mlp.down_proj):
                w, k = _linear(lin)
                self.weights += w
                self.kinds += k
        c = model.config
        self.n_head, self.eps = c.n_head, float(model.blocks[0].attn_norm.eps)
        self.rope_half = model.rope.style == "half"

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None,
             cache: KVCache) -> torch.Tensor:
        m, pos = self.model, cache.pos
        if pos >= cache.max_len:
            raise ValueError(f"KV cache full: {pos + 1} tokens > {cache.max_len} slots; "
                             "allocate a larger cache or shorten the input")
        B = tokens.shape[0]
        x = m.embed(tokens, positions).reshape(B, -1)  # (B, C)
        cos, sin = m.rope.cos_sin(positions.reshape(B))  # each (B, D/2)
        mask = None if key_mask is None else key_mask[:, :pos + 1]
        x = torch.ops.septet.llama_decode(x, self.weights, self.kinds, cache.k, cache.v, pos, cos, sin, mask,
                                          self.n_head, self.eps, self.rope_half)  # (B, C)
        cache.advance(1)
        return m.head_logits(m.norm_f(x[:, None]))[:, -1]  # (B, V)
