"""Autoregressive generation: one prefill pass into a preallocated KV cache, then one
token per step.

- sampling: greedy, temperature, top-k, top-p, min-p, CTRL repetition penalty, seeded
- `generate_ids` streams one prompt; `generate_batch` runs prompts of different lengths
  together (left padding + a key padding mask + per-row positions, so every row computes
  what it would alone)
- `TextStream` turns ids into text incrementally: it decodes only a short trailing window
  per token, never splits a UTF-8 character, and applies stop strings (held back while a
  tail could still become one; the stop string itself is not emitted)
- `optimize_for_inference` packs q/k/v and gate/up weights once; decoding runs
  septet.fused_decode's one-call step on LLaMA stacks with block weights (`--quant`), or with
  `Sampling(compile=True)` septet.decode's static-shape compiled step (one graph per
  cache-length bucket)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import InputError
from .decode import static_decoder, supports_static_decode
from .fused_decode import FusedDecoder, why_not_fused
from .models.base import DecoderLM


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


# ----------------------------------------------------------------------------- model prep

def _pack_linears(layers: Sequence[nn.Linear]) -> nn.Linear:
    w = torch.cat([layer.weight.detach() for layer in layers])
    has_bias = layers[0].bias is not None
    packed = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta")
    packed.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        packed.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]),
                                   requires_grad=False)
    return packed


def optimize_for_inference(model: DecoderLM) -> DecoderLM:
    """Pack each attention's q/k/v and each gated MLP's gate/up into one linear layer, once.

    Decoding then runs one matmul where it ran three (two), without concatenating weights
    per call. In place and idempotent; the separate layers are dropped (no extra memory),
    so the model is inference-only from here (its state_dict keys change).
    """
    from .nn.attention import Attention
    from .nn.mlp import GatedMLP

    if getattr(model, "_inference_ready", False):
        return model
    for m in model.modules():
        if isinstance(m, Attention) and m.qkv_proj is None and isinstance(m.q_proj, nn.Linear):
            m.qkv_proj = _pack_linears([m.q_proj, m.k_proj, m.v_proj])
            m.q_proj = m.k_proj = m.v_proj = None
        elif isinstance(m, GatedMLP) and m.gate_up_proj is None and isinstance(m.gate_proj, nn.Linear):
            m.gate_up_proj = _pack_linears([m.gate_proj, m.up_proj])
            m.gate_proj = m.up_proj = None
    model.eval()
    model.requires_grad_(False)
    model._inference_ready = True
    return model


def decode_path(model: DecoderLM, compile: bool, max_len: int) -> str:
    """Which step `decode_step` gives: "compiled", "fused" or "eager" (the model's forward)."""
    if compile:
        return "compiled" if supports_static_decode(model, max_len) else "eager"
    return "fused" if why_not_fused(model) is None else "eager"


def decode_step(model: DecoderLM, compile: bool, batch: int, max_len: int):
    """The one-token step as step(tokens (B, 1), positions (B, 1), key_mask (B, S) or None,
    cache) -> logits (B, V).

    Compiled, it is septet.decode's static-shape step (one graph for every step) where that
    is exact for the model. Uncompiled, it is septet.fused_decode's one-call step where the
    model is a LLaMA stack on septet's block-weight kernels, else the model's own forward."""
    path = decode_path(model, compile, max_len)
    if path == "fused":
        return FusedDecoder(model).step
    if path == "compiled":
        dec = static_decoder(model)

        def step(tokens, positions, key_mask, cache):
            if key_mask is None:
                key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=tokens.device)
            return dec.step(tokens, positions, key_mask, cache)
        return step

    def eager(tokens, positions, key_mask, cache):
        mask = None if key_mask is None else key_mask[:, :cache.pos + 1]
        return model(tokens, cache=cache, positions=positions, pad_mask=mask, last_only=True)[:, -1]
    return eager


MIN_CACHE_BUCKET = 256


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


def row_positions(model: DecoderLM, pad: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Positions of slots [start, start + T) for left-padded rows (`pad` (B,)): each row's own,
    (B, T); relative-bias models (T5 buckets see only key − query offsets) take the slot
    indices themselves, (T,)."""
    slots = torch.arange(start, start + T, device=pad.device)
    if getattr(model, "rel_bias", None) is not None:
        return slots
    return (slots[None, :] - pad[:, None]).clamp(min=0)


def seen_tokens(prompts: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """(B, V) bool: the ids each prompt holds, where the repetition penalty starts."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seen[i, torch.tensor(list(p), dtype=torch.long, device=device)] = True
    return seen


def check_prompt(model: DecoderLM, n: int) -> None:
    context = model.config.context
    if n == 0:
        raise InputError("the prompt is empty; give at least one token")
    if n >= context:
        raise InputError(f"prompt of {n} tokens leaves no room in the model's context of "
                         f"{context}; shorten it")


def _generator(s: Sampling, device: torch.device) -> torch.Generator | None:
    if s.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(s.seed)


# ----------------------------------------------------------------------------- generation

@torch.inference_mode()
def generate_ids(model: DecoderLM, prompt: list[int], s: Sampling,
                 eos_id: int | None = None, stop_ids: Iterable[int] | None = None) -> Iterator[int]:
    """Yield new token ids one at a time until max_new_tokens, a stop id or the context end.
    The stop id itself is yielded last. The cache holds prompt + max_new_tokens slots."""
    stop = set(stop_ids or ()) | ({eos_id} if eos_id is not None else set())
    check_prompt(model, len(prompt))
    n_new = min(s.max_new_tokens, model.config.context - len(prompt))
    if n_new <= 0:
        return
    device = next(model.parameters()).device
    generator = _generator(s, device)
    cache = model.new_cache(1, cache_slots(model, len(prompt) + n_new, s.compile))
    tokens = torch.tensor([prompt], device=device)
    seen = seen_tokens([prompt], model.config.vocab_size, device) if s.repetition_penalty != 1.0 else None
    logits = model(tokens, cache=cache, last_only=True)[:, -1]  # (1, V)
    step = decode_step(model, s.compile, 1, cache.max_len)
    for i in range(n_new):
        nxt = sample_next(logits, s, generator, seen)  # (1,)
        token = nxt.item()
        yield token
        if token in stop or i == n_new - 1:
            return
        if seen is not None:
            seen[0, token] = True
        logits = step(nxt[:, None], torch.tensor([[cache.pos]], device=device), None, cache)


@torch.inference_mode()
def generate_batch(model: DecoderLM, prompts: Sequence[Sequence[int]], s: Sampling,
                   stop_ids: Iterable[int] | None = None, pad_id: int = 0,
                   return_logits: bool = False):
    """Generate for several prompts at once; returns one id list per prompt (a stop id ends
    its row and is included). Prompts are left-padded to the longest; padding keys are
    masked and every row gets its own positions, so each row computes what it would alone.
    With return_logits, also returns per row the (n, V) logits its tokens were sampled from."""
    if not prompts:
        return ([], []) if return_logits else []
    stop = set(stop_ids or ())
    lengths = [len(p) for p in prompts]
    for n in lengths:
        check_prompt(model, n)
    B, P = len(prompts), max(lengths)
    n_new = min(s.max_new_tokens, model.config.context - P)
    outs: list[list[int]] = [[] for _ in prompts]
    rows_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    if n_new <= 0:
        return (outs, [torch.empty(0)] * B) if return_logits else outs
    device = next(model.parameters()).device
    generator = _generator(s, device)
    S = cache_slots(model, P + n_new, s.compile)
    tokens, pad = left_pad(prompts, device, pad_id)  # (B, P), (B,)
    slots = torch.arange(S, device=device)
    key_mask = slots[None, :] >= pad[:, None]  # (B, S): False on each row's padding
    any_pad = bool((pad > 0).any())
    positions = row_positions(model, pad, 0, P)  # (B, P), or (P,) slots for relative bias
    # only the real prompt ids count, not the padding
    seen = seen_tokens(prompts, model.config.vocab_size, device) if s.repetition_penalty != 1.0 else None
    cache = model.new_cache(B, S)
    mask = key_mask[:, :P] if any_pad else None
    logits = model(tokens, cache=cache, positions=positions, pad_mask=mask, last_only=True)[:, -1]
    step = decode_step(model, s.compile, B, S)
    done = [False] * B
    for i in range(n_new):
        nxt = sample_next(logits, s, generator, seen)  # (B,)
        ids = nxt.tolist()
        for r, t in enumerate(ids):
            if not done[r]:
                outs[r].append(t)
                if return_logits:
                    rows_logits[r].append(logits[r].float().clone())
                if t in stop:
                    done[r] = True
        if all(done) or i == n_new - 1:
            break
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        pos = row_positions(model, pad, P + i, 1)
        logits = step(nxt[:, None], pos, key_mask if any_pad else None, cache)
    if return_logits:
        return outs, [torch.stack(r) if r else torch.empty(0) for r in rows_logits]
    return outs


# ----------------------------------------------------------------------------- text

class TextStream:
    """Incremental detokenisation with stop strings.

    `push(id)` returns the text that is now final ('' while a multi-byte character is
    incomplete or a tail might still grow into a stop string); `finish()` returns what is
    left. Each push decodes only the tokens since the last clean character boundary (plus
    one step of context, for tokenizers that drop a leading space), so the work per token
    is O(1) amortised, not O(length).
    """

    def __init__(self, tokenizer, stop_strings: Iterable[str] = ()):
        self.tok = tokenizer
        self.stops = tuple(x for x in stop_strings if x)
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this are already turned into text
        self.held = ""  # text held back: a possible start of a stop string
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if now.endswith("\ufffd"):
            return self._filter("")  # an incomplete character: wait for more bytes
        piece = now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._filter(piece)

    def _filter(self, piece: str) -> str:
        text = self.held + piece
        if not self.stops:
            self.held = ""
            return text
        cut = min((i for i in (text.find(x) for x in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.held = ""
            return text[:cut]
        hold = 0
        for x in self.stops:  # the longest tail of text that starts some stop string
            for k in range(min(len(x) - 1, len(text)), hold, -1):
                if text.endswith(x[:k]):
                    hold = k
                    break
        self.held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def finish(self) -> str:
        """The rest: an undecodable tail as U+FFFD, and held text (it never became a stop string)."""
        if self.stopped:
            return ""
        tail = ""
        if self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            tail = self._decode(self.ids[self.prefix:])[len(before):]
            self.prefix = self.read = len(self.ids)
        out = self._filter(tail)
        out, self.held = out + self.held, ""
        return out


def stream_text(tokenizer, ids: Iterable[int], stop_ids: Iterable[int] = (),
                stop_strings: Iterable[str] = ()) -> Iterator[str]:
    """Text pieces for a stream of token ids; a stop id ends it (and is not decoded)."""
    stop = set(stop_ids)
    ts = TextStream(tokenizer, stop_strings)
    for t in ids:
        if t in stop:
            break
        piece = ts.push(t)
        if piece:
            yield piece
        if ts.stopped:
            return
    rest = ts.finish()
    if rest:
        yield rest
