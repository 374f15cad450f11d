"""Autoregressive generation on the batch engine: one prompt streamed token by token, or
many prompts of different lengths together (each row computes what it would alone)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..models.base import DecoderLM
from .engine import DecodeBatch, check_prompt, new_token_budget
from .sampling import Sampling

Until = Callable[[int, list[int]], bool]  # (row, its ids so far) -> the row is finished


@torch.inference_mode()
def generate_ids(model: DecoderLM, prompt: list[int], s: Sampling,
                 stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield new token ids one at a time until max_new_tokens, a stop id or the context end.
    The stop id itself is yielded last. The cache holds prompt + max_new_tokens slots."""
    stop = set(stop_ids)
    check_prompt(model, len(prompt))
    if new_token_budget(model, len(prompt), s.max_new_tokens) == 0:
        return
    batch = DecodeBatch(model, [prompt], max_new_tokens=s.max_new_tokens, compile=s.compile, sampling=s)
    for i, (token,) in enumerate(batch.decode()):
        yield token
        if token in stop or i == batch.budget - 1:
            return


@torch.inference_mode()
def generate_batch(model: DecoderLM, prompts: Sequence[Sequence[int]], s: Sampling,
                   stop_ids: Iterable[int] = (), pad_id: int = 0, until: Until | None = None) -> list[list[int]]:
    """Generate for several prompts at once; returns one id list per prompt (a stop id ends
    its row and is included; so does `until(row, ids)` turning true on the row's ids so far,
    e.g. once their text holds a stop string). Prompts are left-padded to the longest;
    padding keys are masked and every row gets its own positions, so each row computes what
    it would alone. Finished rows stay in the batch (their tokens are ignored), so a seeded
    batch draws the same numbers whichever rows finish first."""
    return _batch(model, prompts, s, stop_ids, pad_id, until, keep_logits=False)[0]


@torch.inference_mode()
def generate_batch_with_logits(model: DecoderLM, prompts: Sequence[Sequence[int]], s: Sampling,
                               stop_ids: Iterable[int] = (), pad_id: int = 0,
                               ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """`generate_batch`, and per row the (n, V) fp32 logits its n tokens were sampled from."""
    return _batch(model, prompts, s, stop_ids, pad_id, None, keep_logits=True)


def _batch(model: DecoderLM, prompts: Sequence[Sequence[int]], s: Sampling, stop_ids: Iterable[int],
           pad_id: int, until: Until | None, keep_logits: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
    outs: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    if not prompts:
        return outs, []
    for p in prompts:
        check_prompt(model, len(p))
    if new_token_budget(model, max(len(p) for p in prompts), s.max_new_tokens) == 0:
        return outs, [torch.empty(0) for _ in prompts]
    stop = set(stop_ids)
    batch = DecodeBatch(model, prompts, max_new_tokens=s.max_new_tokens, compile=s.compile,
                        sampling=s, pad_id=pad_id)
    done = [False] * len(prompts)
    for i, tokens in enumerate(batch.decode()):
        for r, t in enumerate(tokens):
            if not done[r]:
                outs[r].append(t)
                if keep_logits:
                    logits[r].append(batch.logits[r].float().clone())
                done[r] = t in stop or (until is not None and until(r, outs[r]))
        if all(done) or i == batch.budget - 1:
            break
    return outs, [torch.stack(r) if r else torch.empty(0) for r in logits]
