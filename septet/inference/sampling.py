"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p and CTRL's
repetition penalty, seeded; `RowSampler` keeps each row's sampling state for a batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    min_p: float = 0.0  # 0: off; keep tokens with p >= min_p · p_max
    repetition_penalty: float = 1.0  # 1: off; CTRL: logit/θ if > 0 else logit·θ for seen tokens
    compile: bool = False  # torch.compile the one-token decode step

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


# ----------------------------------------------------------------------------- sampling

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): for tokens already present (`seen` (B, V) bool), divide a
    positive logit by `penalty` and multiply a negative one by it."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: removed tokens get -inf. (B, V) fp32."""
    logits = logits.float()
    if s.temperature > 0 and s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (keeps at least one)
        drop = probs.cumsum(-1) - probs >= s.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if s.min_p > 0.0:
        probs = logits.softmax(-1)
        keep = probs >= s.min_p * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if seen is not None and s.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    if s.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, s).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def seen_tokens(prompts: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """(B, V) bool: the ids each prompt holds, where the repetition penalty starts."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seen[i, torch.tensor(list(p), dtype=torch.long, device=device)] = True
    return seen


def _generator(s: Sampling, device: torch.device) -> torch.Generator | None:
    if s.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(s.seed)


class RowSampler:
    """The sampling state of a batch's rows: `sampler(logits (B, V)) -> (B,)` ids.

    Made with one `Sampling`, every row shares it and one generator, and the batch is drawn
    in one call (so a seeded batch draws what `generate_batch` always drew); made with one per
    row, or once a row joins (`add`), each row draws alone from its own seeded generator.
    Rows the repetition penalty applies to remember the ids they hold (prompt and output).
    """

    def __init__(self, sampling: Sampling | Sequence[Sampling], prompts: Sequence[Sequence[int]],
                 vocab_size: int, device: torch.device):
        self.device, self.vocab_size = device, vocab_size
        self.shared = isinstance(sampling, Sampling)
        self.samplings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(self.samplings) != len(prompts):
            raise InputError(f"{len(self.samplings)} samplings for {len(prompts)} prompts")
        if isinstance(sampling, Sampling):
            self.generators = [_generator(sampling, device)]
        else:
            self.generators = [_generator(s, device) for s in self.samplings]
        penalised = any(s.repetition_penalty != 1.0 for s in self.samplings)
        self.seen = seen_tokens(prompts, vocab_size, device) if penalised else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.shared:
            out = sample_next(logits, self.samplings[0], self.generators[0], self.seen)
        else:
            out = torch.cat([sample_next(logits[k:k + 1], s, g, None if self.seen is None else self.seen[k:k + 1])
                             for k, (s, g) in enumerate(zip(self.samplings, self.generators))])
        if self.seen is not None:
            self.seen[torch.arange(out.shape[0], device=out.device), out] = True
        return out

    def keep(self, rows: torch.Tensor) -> None:
        idx = rows.tolist()
        self.samplings = [self.samplings[k] for k in idx]
        if not self.shared:
            self.generators = [self.generators[k] for k in idx]
        if self.seen is not None:
            self.seen = self.seen[rows]

    def add(self, sampling: Sampling, prompt: Sequence[int]) -> None:
        """A row that joins the batch, with its own sampling and generator."""
        if self.shared:  # rows drew from one generator until now: they keep it
            self.generators = self.generators * len(self.samplings)
            self.shared = False
        self.samplings.append(sampling)
        self.generators.append(_generator(sampling, self.device))
        if sampling.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(len(self.samplings) - 1, self.vocab_size, dtype=torch.bool, device=self.device)
        if self.seen is not None:
            self.seen = torch.cat((self.seen, seen_tokens([prompt], self.vocab_size, self.device)))
