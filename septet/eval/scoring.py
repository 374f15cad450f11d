"""Log-likelihood scoring and deterministic decoding for evaluation.

Everything the evaluation harness asks of a model goes through a `Scorer`:

- `loglikelihood(pairs)`: log P(continuation | context) for many (context, continuation)
  pairs, batched. Pairs that share a context (the choices of one multiple-choice item)
  share one prefill: the context runs once into a KV cache, the cache rows are copied
  once per continuation, and all continuations of all contexts in a batch run together.
- `rolling_loglikelihood(text)`: the log-likelihood of a whole text in windows of at most
  the model's context (perplexity).
- `generate_until(contexts, stop)`: batched greedy decoding that ends each row at a stop
  string; `beam_search(context)`: GPT-3's free-form decoding (beam 4, length penalty 0.6).

Tokenisation boundary. The same text can tokenise differently whole and in parts, so a
pair is split one of two ways (`boundary`):
- "joint" (default; lm-evaluation-harness's convention): trailing whitespace of the
  context moves to the continuation ("A:" + " Paris" rather than "A: " + "Paris", which
  a BPE never produces), the context is encoded alone and the continuation's tokens are
  the tokens of context+continuation beyond the context's count. Scores then match
  lm-eval's for the same model.
- "separate" (BIG-bench's reference scorer, `huggingface_models._gpt_batch_tokenize`):
  context and continuation are encoded independently and concatenated.
An empty context is replaced by one end-of-text token (a document start), so the first
continuation token is still scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import InputError
from ..inference import DecodeBatch, Sampling, beam_search, generate_batch, gnmt_penalty, optimize_for_inference
from ..models.base import DecoderLM

BOUNDARIES = ("joint", "separate")


@dataclass(frozen=True)
class LogLik:
    """The score of one continuation."""

    logprob: float  # sum of log P(token | prefix) over the continuation's tokens
    n_tokens: int
    n_chars: int
    is_greedy: bool  # every token was the argmax: greedy decoding would produce it


class Scorer:
    """A model + tokenizer with the scoring and decoding calls evaluation needs.

    `encode(text) -> ids` must not add special tokens; `bos_id` is prepended to every
    input when `add_bos`; `prefix_id` stands in for an empty context.
    """

    def __init__(self, model: DecoderLM, encode: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], *, prefix_id: int, bos_id: int | None = None,
                 add_bos: bool = False, stop_ids: Sequence[int] = (), batch_size: int = 32,
                 logits_budget: int = 1 << 26, compile: bool = False):
        self.model = model.eval()
        self.encode, self.decode = encode, decode
        self.prefix_id, self.bos_id, self.add_bos = prefix_id, bos_id, add_bos
        self.stop_ids = set(stop_ids)
        self.batch_size = max(1, batch_size)  # continuation rows per forward pass
        # max elements of one (rows, T, V) logits tensor or of one copied (rows, ...) KV cache
        self.logits_budget = logits_budget
        self.compile = compile  # greedy decoding through the compiled decode step
        self.context = model.config.context
        self.vocab = model.config.vocab_size
        p = next(model.parameters())
        self.device = p.device

    @classmethod
    def from_loaded(cls, lm, *, batch_size: int = 32, compile: bool = False) -> "Scorer":
        """From a `septet.load(...)` result (its weights get packed for inference, as for
        generation: see septet.inference.optimize_for_inference)."""
        tok = lm.need_tokenizer()
        optimize_for_inference(lm.model)
        eot = tok.hf.token_to_id(tok.eot_token) if tok.eot_token else None
        prefix = eot if eot is not None else lm.bos_id
        if prefix is None:
            raise InputError(f"{lm.name}: the tokenizer has neither an end-of-text nor a BOS token "
                             "to start an empty context with")
        return cls(lm.model, tok.encode, lambda ids: tok.decode(ids, skip_special_tokens=True),
                   prefix_id=prefix, bos_id=lm.bos_id, add_bos=lm.add_bos,
                   stop_ids=set(lm.eos_ids) | ({eot} if eot is not None else set()),
                   batch_size=batch_size, compile=compile)

    # ------------------------------------------------------------------ tokenisation
    def context_ids(self, context: str) -> list[int]:
        return self._with_bos(self.encode(context) if context else [])

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids or [self.prefix_id]

    def split(self, context: str, continuation: str, boundary: str = "joint") -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) under the module's boundary convention."""
        if boundary == "separate":
            return self.context_ids(context), self.encode(continuation) if continuation else []
        if boundary != "joint":
            raise InputError(f"boundary {boundary!r} is not one of {', '.join(BOUNDARIES)}")
        stripped = context.rstrip()
        moved = context[len(stripped):]
        ctx = self.encode(stripped) if stripped else []
        whole = self.encode(stripped + moved + continuation)
        return self._with_bos(ctx), whole[len(ctx):]

    # ------------------------------------------------------------------ log-likelihood
    def loglikelihood(self, pairs: Sequence[tuple[str, str]], *, boundary: str = "joint",
                      truncate: bool = False,
                      progress: Callable[[int], None] | None = None) -> list[LogLik]:
        """Score every (context, continuation); pairs with equal context ids share a prefill.
        `truncate` drops the oldest context tokens of an over-long pair (lm-eval does);
        otherwise an over-long pair is an InputError."""
        encoded = [self.split(c, x, boundary) for c, x in pairs]
        raw = self.loglikelihood_ids(encoded, truncate=truncate, progress=progress)
        return [LogLik(lp, len(cont), len(x), greedy)
                for (lp, greedy), (_, cont), (_, x) in zip(raw, encoded, pairs)]

    def loglikelihood_ids(self, pairs: Sequence[tuple[list[int], list[int]]], *, truncate: bool = False,
                          progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        """(sum logprob, is_greedy) of each continuation id list given its context ids."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}  # context ids -> indices of its pairs
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                out[i] = (0.0, True)
                continue
            ctx = self._fit(list(ctx), len(cont), truncate)
            groups.setdefault(tuple(ctx), []).append(i)
        # longest contexts first: similar lengths batch together, the first batch shows OOM early
        order = sorted(groups.items(), key=lambda kv: -len(kv[0]))
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        rows = 0
        for ctx, idx in order:
            if batch and rows + len(idx) > self.batch_size:
                self._run_batch(batch, pairs, out, progress)
                batch, rows = [], 0
            batch.append((ctx, idx))
            rows += len(idx)
        if batch:
            self._run_batch(batch, pairs, out, progress)
        return out  # type: ignore[return-value]

    def _fit(self, ctx: list[int], n_cont: int, truncate: bool) -> list[int]:
        # the model reads ctx + cont[:-1]: it must fit the context window
        excess = len(ctx) + n_cont - 1 - self.context
        if excess <= 0:
            return ctx
        if not truncate or n_cont > self.context:
            raise InputError(f"context of {len(ctx)} + continuation of {n_cont} tokens exceeds the "
                             f"model's context of {self.context}; use fewer shots or a shorter text")
        return ctx[excess:]

    @torch.inference_mode()
    def _run_batch(self, batch, pairs, out, progress) -> None:
        """One prefill of G contexts (left-padded), then all R continuations at once."""
        dev = self.device
        ctxs = [list(c) for c, _ in batch]
        prefilled = DecodeBatch(self.model, ctxs, max_new_tokens=0)  # (G, V) next-token logits
        P = prefilled.pos
        row_group = [g for g, (_, idx) in enumerate(batch) for _ in idx]
        rows = [i for _, idx in batch for i in idx]
        conts = [list(pairs[i][1]) for i in rows]
        lp_first, greedy_first = self._token_logprobs(
            prefilled.logits[torch.tensor(row_group, device=dev)][:, None],  # (R, 1, V)
            torch.tensor([[c[0]] for c in conts], device=dev))
        results = [(lp_first[r, 0].item(), bool(greedy_first[r, 0])) for r in range(len(rows))]
        L = max(len(c) for c in conts) - 1  # continuation tokens still to feed
        if L > 0:
            # chunk rows so their (rows, L, V) logits and copied caches stay within the budget
            c = self.model.config
            cache_row = 2 * c.n_layer * c.n_kv_head * c.d_head * (P + L)  # k and v of one row
            step = max(1, self.logits_budget // max(L * self.vocab, cache_row))
            for a in range(0, len(rows), step):
                part = list(range(a, min(a + step, len(rows))))
                sums, greedy = self._score_rest(prefilled, [row_group[r] for r in part], [conts[r] for r in part])
                for j, r in enumerate(part):
                    results[r] = (results[r][0] + sums[j], results[r][1] and greedy[j])
        for r, i in enumerate(rows):
            out[i] = results[r]
        if progress:
            progress(len(rows))

    def _score_rest(self, prefilled: DecodeBatch, row_group: list[int],
                    conts: list[list[int]]) -> tuple[list[float], list[bool]]:
        """Continuation tokens 2..n of each row, fed after its group's cached context."""
        dev = self.device
        R, L = len(conts), max(len(c) for c in conts) - 1
        rows = prefilled.fork(row_group, extra_slots=L)  # one copy of the context per choice
        inp = torch.zeros(R, L, dtype=torch.long, device=dev)  # right-padded: causal, so harmless
        tgt = torch.zeros(R, L, dtype=torch.long, device=dev)
        valid = torch.zeros(R, L, dtype=torch.bool, device=dev)
        for r, c in enumerate(conts):
            n = len(c) - 1
            inp[r, :n] = torch.tensor(c[:-1])
            tgt[r, :n] = torch.tensor(c[1:])
            valid[r, :n] = True
        logits = rows.extend(inp, all_logits=True)  # (R, L, V)
        lp, greedy = self._token_logprobs(logits, tgt)  # (R, L) each
        sums = (lp * valid).sum(-1)
        all_greedy = (greedy | ~valid).all(-1)
        return sums.tolist(), all_greedy.tolist()

    @staticmethod
    def _token_logprobs(logits: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (R, T, V), tgt (R, T) -> log P(tgt) (R, T) in fp32, and tgt == argmax (R, T)."""
        logits = logits.float()
        lp = logits.gather(-1, tgt[..., None])[..., 0] - logits.logsumexp(-1)
        return lp, logits.argmax(-1) == tgt

    # ------------------------------------------------------------------ perplexity
    def rolling_loglikelihood(self, text: str, *, stride: int | None = None) -> LogLik:
        """log P(text) token by token, in windows of at most the model's context.

        The first token is predicted from the end-of-text prefix. Each window scores
        `stride` new tokens (default: a full context, i.e. disjoint windows as in
        lm-eval) conditioned on the tokens before them inside the window; a smaller
        stride gives every token more context at more compute."""
        ids = self.encode(text) if text else []
        if not ids:
            return LogLik(0.0, 0, len(text), True)
        full = self.context_ids("") + ids
        start = len(full) - len(ids)  # index in `full` of the first scored token
        stride = min(stride or self.context, self.context)
        pairs = []
        for a in range(start, len(full), stride):
            b = min(a + stride, len(full))
            s = max(0, b - 1 - self.context)  # the window reads full[s : b-1]
            pairs.append((full[s:a], full[a:b]))
        scored = self.loglikelihood_ids(pairs)
        return LogLik(sum(lp for lp, _ in scored), len(ids), len(text), all(g for _, g in scored))

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def generate_until(self, contexts: Sequence[str], *, stop: Sequence[str] = (),
                       max_new_tokens: int = 32, done: Callable[[str], bool] | None = None,
                       progress: Callable[[int], None] | None = None) -> list[str]:
        """Greedy continuations of `contexts`, batched; a row ends at a stop string (cut
        off), an end-of-text token, `done(text)`, or after max_new_tokens."""
        return self.generate_ids_until([self.context_ids(c) for c in contexts], stop=stop,
                                       max_new_tokens=max_new_tokens, done=done, progress=progress)

    @torch.inference_mode()
    def generate_ids_until(self, prompts: Sequence[list[int]], *, stop: Sequence[str] = (),
                           max_new_tokens: int = 32, done: Callable[[str], bool] | None = None,
                           progress: Callable[[int], None] | None = None) -> list[str]:
        """`generate_until` for prompts already tokenised (BOS included where wanted);
        prompts of similar length share a batch."""
        outs: list[str] = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for a in range(0, len(order), self.batch_size):
            idx = order[a:a + self.batch_size]
            texts = self._greedy_batch([list(prompts[i]) for i in idx], stop, max_new_tokens, done)
            for i, t in zip(idx, texts):
                outs[i] = t
            if progress:
                progress(len(idx))
        return outs

    def _greedy_batch(self, prompts, stop, max_new_tokens, done) -> list[str]:
        P = max(len(p) for p in prompts)
        if P >= self.context:
            raise InputError(f"prompt of {P} tokens leaves no room in the model's context of "
                             f"{self.context}; use fewer shots")
        texts = [""] * len(prompts)

        def ended(r: int, ids: list[int]) -> bool:
            if ids[-1] in self.stop_ids:  # the text so far is the answer
                return True
            texts[r] = self.decode(ids)
            cut = _cut_at_stop(texts[r], stop)
            if cut is not None:
                texts[r] = cut
                return True
            return done is not None and done(texts[r])

        generate_batch(self.model, prompts, Sampling(max_new_tokens=max_new_tokens, temperature=0.0,
                                                     compile=self.compile), until=ended)
        return texts

    @torch.inference_mode()
    def beam_search(self, context: str, *, beams: int = 4, length_penalty: float = 0.6,
                    stop: Sequence[str] = (), max_new_tokens: int = 32) -> str:
        """The best continuation under beam search (GPT-3 §3 free-form tasks: beam 4, α 0.6).

        septet.inference.beam's search with GNMT's length penalty lp(n) = ((5 + n) / 6)^α (Wu et al.
        2016), the form T5 and GPT-3 cite. A hypothesis ends at an end-of-text token or when
        its text contains a stop string (the text is cut there)."""
        prompt = self.context_ids(context)
        if len(prompt) >= self.context:
            raise InputError(f"prompt of {len(prompt)} tokens leaves no room in the model's context "
                             f"of {self.context}; use fewer shots")
        batch = DecodeBatch(self.model, [prompt], max_new_tokens=max_new_tokens)  # K rows once split
        ends = (lambda seq: _cut_at_stop(self.decode(seq), stop) is not None) if any(stop) else None
        ids = beam_search(batch.logits, lambda tokens: batch.step(tokens[:, 0]), batch.keep,
                          beams=beams, max_new_tokens=batch.budget,
                          stop_ids=set(self.stop_ids), length_penalty=gnmt_penalty(length_penalty), ends=ends)
        text = self.decode(ids)
        cut = _cut_at_stop(text, stop)
        return text if cut is None else cut


def _cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """`text` up to its first stop string, or None when it holds none."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(cuts)] if cuts else None


def logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))
