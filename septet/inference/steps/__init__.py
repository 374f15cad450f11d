"""The one-token decode step, in three implementations behind one signature:

    step(tokens (B, 1), positions (B, 1) or (1,), key_mask (B, S) or None, cache) -> logits (B, V)

- `eager`: the model's own forward over the new token (every model, any device);
- `fused` (steps/fused.py): every layer of a LLaMA stack on septet's block-weight kernels in
  one C call, the uncompiled default where it applies;
- `compiled` (steps/compiled.py): a static-shape step under torch.compile (`--compile`),
  replayed as a CUDA graph on a GPU.

`decode_step` picks one; `decode_path` says which. Only the engine (septet.inference.engine)
calls them.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...models.base import DecoderLM
from ...nn.attention import KVCache
from .compiled import static_decoder, supports_static_decode
from .fused import FusedDecoder, why_not_fused

StepFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", KVCache], torch.Tensor]


def decode_path(model: DecoderLM, compile: bool, max_len: int) -> str:
    """Which step `decode_step` gives: "compiled", "fused" or "eager" (the model's forward)."""
    if compile:
        return "compiled" if supports_static_decode(model, max_len) else "eager"
    return "fused" if why_not_fused(model) is None else "eager"


def decode_step(model: DecoderLM, compile: bool, max_len: int) -> StepFn:
    """The step for a cache of `max_len` slots: compiled where asked and exact for the model,
    else fused where the model is a LLaMA stack on septet's block weights, else eager."""
    path = decode_path(model, compile, max_len)
    if path == "fused":
        return FusedDecoder(model).step
    if path == "compiled":
        return static_decoder(model).step

    def eager(tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None,
              cache: KVCache) -> torch.Tensor:
        mask = None if key_mask is None else key_mask[:, :cache.pos + 1]
        return model(tokens, cache=cache, positions=positions, pad_mask=mask, last_only=True)[:, -1]
    return eager
