"""Autoregressive sampling with a KV cache: one prefill pass, then one token per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .models.base import DecoderLM


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (keeps at least one)
        drop = probs.cumsum(-1) - probs >= s.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(model: DecoderLM, prompt: list[int], s: Sampling,
                 eos_id: int | None = None, stop_ids: set[int] | None = None) -> Iterator[int]:
    """Yield new token ids one at a time until max_new_tokens, a stop id or the context end.
    The stop id itself is yielded last."""
    stop = set(stop_ids or ()) | ({eos_id} if eos_id is not None else set())
    context = model.config.context
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if len(prompt) >= context:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the model's "
                         f"context of {context}; shorten it")
    device = next(model.parameters()).device
    generator = None
    if s.seed is not None:
        generator = torch.Generator(device=device).manual_seed(s.seed)
    n_new = min(s.max_new_tokens, context - len(prompt))
    cache = model.new_cache(1, len(prompt) + n_new)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[:, -1]  # (1, V)
    for i in range(n_new):
        nxt = sample_next(logits, s, generator)  # (1,)
        token = int(nxt)
        yield token
        if token in stop or i == n_new - 1:
            return
        logits = model(nxt[:, None], cache=cache)[:, -1]
