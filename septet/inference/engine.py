"""The one batch engine: every caller that decodes drives a `DecodeBatch`.

A `DecodeBatch` holds rows of different lengths in one KV cache, left-padded so that they
end together. It owns the padding, the cache (allocation, growth, dropping and reordering
rows, admitting a late row), the prefill and the one-token step; nobody else touches cache
tensors. Callers:

- `generate.generate_ids` / `generate_batch`: one prompt streamed, or many together
- `eval.scoring.Scorer`: log-likelihoods (`fork` + `extend`), greedy decoding (through
  generate_batch), beam search; `eval.cot`: a calculator's result fed with `extend`
- `serve.scheduler`: requests in flight, each with its own sampling, joining mid-batch
- `inference.beam.beam_search`: through `step` and `keep` (rows repeat as beams split)
- Flamingo and BLIP-2 (`conditioned`: an image-conditioned prefill), and VLM answer ranking

Each row computes what it would alone: padding keys are masked, and every row gets its own
positions (`DecoderLM.row_positions`). The decode loop, in `decode()`:

1. (optional) `admit(batch)` lets waiting rows join: each is prefilled alone into the
   batch's current slots, left-padded to end where the other rows are;
2. the batch's `sampler` draws one token per row from `logits` (B, V);
3. the tokens are yielded; the caller may `keep` only some rows (finished ones leave);
4. the surviving rows' tokens go through one step, giving the next `logits`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from ..errors import InputError
from ..models.base import DecoderLM
from ..nn.attention import KVCache
from .kv_cache import KernelKVCache
from .sampling import RowSampler, Sampling
from .steps import StepFn, decode_step

MIN_CACHE_BUCKET = 256


def optimize_for_inference(model: DecoderLM) -> DecoderLM:
    """Pack the model's q/k/v and gate/up weights once and freeze it (in place, idempotent);
    from here it is inference-only (see DecoderLM.prepare_for_inference). Returns it."""
    model.prepare_for_inference()
    return model


def check_prompt(model: DecoderLM, n: int) -> None:
    context = model.config.context
    if n == 0:
        raise InputError("the prompt is empty; give at least one token")
    if n >= context:
        raise InputError(f"prompt of {n} tokens leaves no room in the model's context of "
                         f"{context}; shorten it")


def new_token_budget(model: DecoderLM, prompt_len: int, max_new_tokens: int) -> int:
    """How many tokens a prompt of `prompt_len` may still grow by: its max, capped by the context."""
    return max(0, min(max_new_tokens, model.config.context - prompt_len))


def cache_slots(model: DecoderLM, n: int, compile: bool) -> int:
    """Slots to allocate for n tokens. The compiled step has one graph per cache length, so
    it gets powers of two from MIN_CACHE_BUCKET (capped at the context): a chat whose
    history grows to the full context compiles a handful of graphs, not one per turn, and
    attends to at most twice the slots it needs. The eager step gets exactly n."""
    if not compile:
        return n
    bucket = MIN_CACHE_BUCKET
    while bucket < n:
        bucket *= 2
    return max(n, min(model.config.context, bucket))


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device | str,
             pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch: tokens (B, P) padded on the left with
    `pad_id`, and each row's padding (B,). A row's own position at slot j is j - pad."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
    return tokens, torch.tensor([P - len(p) for p in prompts], device=device)


class DecodeBatch:
    """Rows decoding together in one KV cache.

    `DecodeBatch(model, prompts, max_new_tokens=n)` prefills every prompt (left-padded);
    `logits` (B, V) is then each row's next-token distribution. `budget` is how many tokens
    the longest prompt may add (max_new_tokens capped by the context); the cache holds
    prompt + budget slots. `sampling` (one for all rows, or one per row) makes a `sampler`
    for `decode()`; callers that choose tokens themselves (beam search, scoring) leave it out.
    """

    def __init__(self, model: DecoderLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 compile: bool = False, sampling: Sampling | Sequence[Sampling] | None = None,
                 pad_id: int = 0):
        if not prompts:
            raise InputError("no prompts to decode")
        for p in prompts:
            check_prompt(model, len(p))
        device = next(model.parameters()).device
        P = max(len(p) for p in prompts)
        budget = new_token_budget(model, P, max_new_tokens)
        tokens, pad = left_pad(prompts, device, pad_id)  # (B, P), (B,)
        cache = model.new_cache(len(prompts), cache_slots(model, P + budget, compile), cache_cls=KernelKVCache)
        self._setup(model, cache, pad, budget, compile=compile)
        positions = model.row_positions(self.pad, 0, P) if self.any_pad else None
        mask = self.key_mask[:, :P] if self.any_pad else None
        self.logits = model(tokens, cache=self.cache, positions=positions, pad_mask=mask,
                            last_only=True)[:, -1]  # (B, V)
        if sampling is not None:
            self.sampler = RowSampler(sampling, prompts, model.config.vocab_size, device)

    def _setup(self, model, cache: KVCache, pad: torch.Tensor, budget: int, *, compile: bool = False,
               row_inputs: dict[str, torch.Tensor] | None = None) -> None:
        """The state every batch has, whichever way it was made (prompts, a conditioned
        prefill, a fork); `logits` is set by the maker."""
        self.model, self.compile, self.cache, self.budget = model, compile, cache, budget
        self.device = pad.device
        self.pad = pad  # (B,) each row's left padding
        self.row_inputs = dict(row_inputs or {})
        # a DecoderLM fed token ids only: the step implementations apply
        self.plain = isinstance(model, DecoderLM) and not self.row_inputs
        self.sampler: RowSampler | None = None
        self._step: StepFn | None = None
        self._next: torch.Tensor | None = None  # the tokens decode() yielded last, per row
        self._masks()

    @classmethod
    def conditioned(cls, model, prefill: Callable[[KVCache], torch.Tensor], *, rows: int, slots: int,
                    budget: int, new_cache: Callable[[int, int], KVCache] | None = None,
                    row_inputs: dict[str, torch.Tensor] | None = None) -> "DecodeBatch":
        """Rows whose prompt is more than token ids (Flamingo's images, BLIP-2's soft prompt).

        The batch allocates `rows` x `slots` cache slots (`new_cache(rows, slots)`, default the
        model's) and `prefill(cache)` runs the prompts into it, returning the next-token
        logits (rows, V). Steps and feeds then call `model(tokens, cache=..., positions=...,
        pad_mask=..., last_only=..., **row_inputs)`: `row_inputs` are per-row tensors (e.g.
        Flamingo's visual tokens, (rows, ...)) that follow the rows through keep and fork.
        With none, steps take the usual step (fused where the model allows)."""
        out = object.__new__(cls)
        cache = new_cache(rows, slots) if new_cache is not None else \
            model.new_cache(rows, slots, cache_cls=KernelKVCache)
        pad = torch.zeros(rows, dtype=torch.long, device=next(model.parameters()).device)
        out._setup(model, cache, pad, budget, row_inputs=row_inputs)
        out.logits = prefill(cache)
        return out

    # ------------------------------------------------------------------ state
    @property
    def size(self) -> int:
        return self.pad.shape[0]

    @property
    def pos(self) -> int:
        """Slots filled so far: the same for every row (padding included)."""
        return self.cache.pos

    def _masks(self) -> None:
        """key_mask (B, S): False on each row's padding; any_pad: whether any row has some."""
        self.key_mask = torch.arange(self.cache.max_len, device=self.device)[None, :] >= self.pad[:, None]
        self.any_pad = bool((self.pad > 0).any())

    # ------------------------------------------------------------------ one step
    def step(self, tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Feed one token per row ((B,) ids) -> the next logits (B, V), also kept in `logits`."""
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        if not self.plain:  # conditioned rows: the model's own forward, with their inputs
            return self.extend(tokens[:, None])
        if self._step is None:
            self._step = decode_step(self.model, self.compile, self.cache.max_len)
        positions = self.model.row_positions(self.pad, self.cache.pos, 1)  # (B, 1), or (1,)
        # the compiled step always reads a mask over all slots; the others only for padding
        mask = self.key_mask if self.any_pad or self.compile else None
        self.logits = self._step(tokens[:, None], positions, mask, self.cache)
        self._next = None
        return self.logits

    def extend(self, tokens: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Feed L tokens per row ((B, L) ids) in one pass -> logits (B, L, V) with `all_logits`,
        else the last position's (B, V); `logits` becomes the last position's."""
        L = tokens.shape[1]
        if self.cache.pos + L > self.cache.max_len:
            self.grow(self.cache.pos + L)
        positions = self.model.row_positions(self.pad, self.cache.pos, L) if self.any_pad else None
        mask = self.key_mask[:, :self.cache.pos + L] if self.any_pad else None
        out = self.model(tokens, cache=self.cache, positions=positions, pad_mask=mask,
                         last_only=not all_logits, **self.row_inputs)  # (B, L or 1, V)
        self.logits = out[:, -1]
        self._next = None  # decode() does not step tokens fed here again
        return out if all_logits else self.logits

    # ------------------------------------------------------------------ rows
    def keep(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keep rows `rows` in that order (finished rows leave; beams may repeat a row)."""
        idx = rows if isinstance(rows, torch.Tensor) else torch.tensor(list(rows), dtype=torch.long)
        if idx.numel() == self.size and bool((idx.cpu() == torch.arange(self.size)).all()):
            return
        idx = idx.to(self.device)
        self.cache.reorder(idx)
        self.pad, self.logits = self.pad[idx], self.logits[idx]
        self.row_inputs = {k: v[idx] for k, v in self.row_inputs.items()}
        self._masks()
        if self._next is not None:
            self._next = self._next[idx]
        if self.sampler is not None:
            self.sampler.keep(idx)

    def fork(self, rows: torch.Tensor | Sequence[int], extra_slots: int) -> "DecodeBatch":
        """A new batch of rows `rows` (repeats allowed: one copy of a context per choice) with
        `extra_slots` more cache slots; this batch is unchanged."""
        idx = rows if isinstance(rows, torch.Tensor) else torch.tensor(list(rows), dtype=torch.long)
        idx = idx.to(self.device)
        out = object.__new__(DecodeBatch)
        out._setup(self.model, self.cache.select(idx, self.cache.pos + extra_slots), self.pad[idx], extra_slots,
                   compile=self.compile, row_inputs={k: v[idx] for k, v in self.row_inputs.items()})
        out.logits = self.logits[idx]
        return out

    def grow(self, max_len: int) -> None:
        """Room for `max_len` slots in every row."""
        if max_len > self.cache.max_len:
            if self.compile:
                raise InputError("a compiled batch cannot grow its cache (one graph per cache length)")
            self.cache.grow(max_len)
            self._masks()

    def can_admit(self, prompt_len: int) -> bool:
        """A late prompt joins if it fits in the slots the batch has filled so far (it is
        left-padded to end where the other rows are); a compiled or conditioned batch takes none."""
        return not self.compile and self.plain and prompt_len <= self.cache.pos

    def admit(self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling | None = None) -> None:
        """Prefill `prompt` alone into slots [pos - n, pos) of a one-row cache and append it
        as the last row; the cache grows if its budget needs more slots."""
        n, p = len(prompt), self.cache.pos
        if not self.can_admit(n):
            raise InputError(f"a prompt of {n} tokens cannot join a batch at slot {p}")
        self.grow(p + max_new_tokens)
        S = self.cache.max_len
        pad = torch.tensor([p - n], device=self.device)
        one = self.model.new_cache(1, S, cache_cls=KernelKVCache)
        one.reset(p - n)
        mask = torch.arange(S, device=self.device)[None, :] >= pad[:, None]  # (1, S)
        logits = self.model(torch.tensor([list(prompt)], device=self.device), cache=one,
                            positions=self.model.row_positions(pad, p - n, n), pad_mask=mask[:, :p],
                            last_only=True)[:, -1]  # (1, V)
        self.cache.append_rows(one)
        self.pad = torch.cat((self.pad, pad))
        self.logits = torch.cat((self.logits, logits))
        self._masks()
        if self.sampler is not None:
            self.sampler.add(sampling or Sampling(), prompt)

    # ------------------------------------------------------------------ the loop
    def decode(self, admit: Callable[["DecodeBatch"], None] | None = None) -> Iterator[list[int]]:
        """The decode loop (steps 1-4 of the module docstring). Yields each round's tokens, one
        per row; the caller may `keep` some rows before resuming, or feed the tokens itself
        with more after them (`extend`: the loop then samples from its logits). Ends when no
        row is left; a caller that has what it needs simply stops iterating."""
        if self.sampler is None:
            raise InputError("decode() needs a batch made with `sampling`")
        while self.size:
            if admit is not None:
                admit(self)
            self._next = self.sampler(self.logits)  # (B,)
            yield self._next.tolist()
            if not self.size:
                return
            if self._next is not None:
                self.step(self._next)
