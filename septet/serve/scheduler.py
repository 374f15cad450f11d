"""One worker thread owns the model and decodes the requests in flight as one batch.

Requests that arrive together are prefilled together; a request that arrives while a batch
decodes joins it at the next step (its prompt is prefilled alone into the batch's current
slots, left-padded so that it ends where the other rows are), unless its prompt is longer
than the batch's history so far, in which case it starts the next batch. The fused step
reads each weight once for up to 8 rows: through the server on SmolLM2 (2 cores, greedy,
128 tokens each) eight requests sent at once ran at 2.25-2.99x the tokens/s of one in six
rounds (benchmarks/serve_throughput.py; docs/serving.md). Each row keeps its own sampling
(temperature, top-p, seed, repetition penalty), stop strings and token budget; a row that
finishes, or whose client leaves, is dropped from the batch (`KVCache.reorder`), and the
batch ends when its last row does. With `--compile` batches do not take new rows (each new
shape would be a new graph).

A batch of one computes exactly what `septet.generate.generate_ids` does (same prefill, same
step, same sampling calls), so a lone request's answer equals `septet.generate`'s.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

import torch

from ..api import LoadedModel
from ..generate import (TextStream, cache_slots, decode_step, left_pad, optimize_for_inference, row_positions,
                        sample_next, seen_tokens)
from .openai import Request

_END = object()


class Job:
    """One request in flight: iterate it for text pieces; afterwards `finish_reason` ("stop":
    an end-of-text token or a stop string; "length": its max tokens or the context's end)
    and `completion_tokens`. `close()` asks the worker to drop it (a client that left)."""

    def __init__(self, req: Request):
        self.req = req
        self.finish_reason = "length"
        self.completion_tokens = 0
        self._out: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.cancelled.set()


class _Row:
    """What one request needs besides the shared cache: its text stream and sampling state."""

    def __init__(self, job: Job, lm: LoadedModel, device: torch.device):
        s = job.req.sampling
        self.job = job
        self.stream = TextStream(lm.tokenizer, job.req.stop)
        self.gen = None if s.seed is None else torch.Generator(device=device).manual_seed(s.seed)
        self.seen = seen_tokens([job.req.ids], lm.model.config.vocab_size, device) \
            if s.repetition_penalty != 1.0 else None


class _Batch:
    """The rows decoding together: one KV cache whose slot `cache.pos` is written by every
    row, each row left-padded by `pad` so its own positions start at 0."""

    def __init__(self, lm: LoadedModel, jobs: list[Job], compile: bool):
        model = lm.model
        optimize_for_inference(model)
        self.lm, self.compile = lm, compile
        self.device = device = next(model.parameters()).device
        tokens, self.pad = left_pad([j.req.ids for j in jobs], device)  # (B, P), (B,)
        B, P = tokens.shape
        S = cache_slots(model, P + max(j.req.sampling.max_new_tokens for j in jobs), compile)
        self.key_mask = torch.arange(S, device=device)[None, :] >= self.pad[:, None]  # (B, S)
        positions = row_positions(model, self.pad, 0, P)  # (B, P), or (P,) slots for relative bias
        self.rows = [_Row(j, lm, device) for j in jobs]
        self.cache = model.new_cache(B, S)
        # a batch of one runs generate_ids' own calls (no positions, no mask), so it is exact
        self.logits = model(tokens, cache=self.cache, positions=positions if B > 1 else None,
                            pad_mask=self.key_mask[:, :P] if self.any_pad() else None, last_only=True)[:, -1]
        self.step = decode_step(model, compile, B, S)

    def any_pad(self) -> bool:
        return bool((self.pad > 0).any())

    def keep(self, ks: list[int]) -> None:
        if len(ks) < len(self.rows):
            idx = torch.tensor(ks, device=self.device)
            self.cache.reorder(idx)
            self.key_mask, self.pad, self.logits = self.key_mask[idx], self.pad[idx], self.logits[idx]
            self.rows = [self.rows[k] for k in ks]

    def can_join(self, job: Job) -> bool:
        return not self.compile and len(job.req.ids) <= self.cache.pos

    @torch.inference_mode()
    def join(self, job: Job) -> None:
        """Prefill `job` alone into slots [pos - n, pos) of a one-row cache, then append it."""
        model, cache, dev = self.lm.model, self.cache, self.device
        n, p = len(job.req.ids), cache.pos
        need = p + job.req.sampling.max_new_tokens
        if need > cache.max_len:  # make room for its budget: more (empty) slots for every row
            extra = need - cache.max_len
            cache.k = [torch.cat((t, t.new_zeros(*t.shape[:2], extra, t.shape[3])), dim=2) for t in cache.k]
            cache.v = [torch.cat((t, t.new_zeros(*t.shape[:2], extra, t.shape[3])), dim=2) for t in cache.v]
            cache.max_len = need
        S = cache.max_len
        one = model.new_cache(1, S)
        one.pos = p - n
        mask = torch.arange(S, device=dev)[None, :] >= p - n  # (1, S)
        logits = model(torch.tensor([job.req.ids], device=dev), cache=one,
                       positions=row_positions(model, torch.tensor([p - n], device=dev), p - n, n),
                       pad_mask=mask[:, :p], last_only=True)[:, -1]  # (1, V)
        cache.k = [torch.cat((a, b)) for a, b in zip(cache.k, one.k)]
        cache.v = [torch.cat((a, b)) for a, b in zip(cache.v, one.v)]
        self.key_mask = torch.cat((torch.arange(S, device=dev)[None, :] >= self.pad[:, None], mask))
        self.pad = torch.cat((self.pad, torch.tensor([p - n], device=dev)))
        self.logits = torch.cat((self.logits, logits))
        self.rows.append(_Row(job, self.lm, dev))

    @torch.inference_mode()
    def advance(self, tokens: list[int]) -> None:
        """One decoding step for every row: tokens[k] is row k's newest token."""
        pos = row_positions(self.lm.model, self.pad, self.cache.pos, 1)  # (B, 1) each row's own
        # the compiled step's default mask has the batch's first size: pass it once rows go
        mask = self.key_mask if self.any_pad() or self.compile else None
        self.logits = self.step(torch.tensor(tokens, device=self.device)[:, None], pos, mask, self.cache)


class Batcher:
    def __init__(self, lm: LoadedModel, max_batch: int = 8, window: float = 0.01):
        self.lm, self.max_batch, self.window = lm, max_batch, window
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "joined": 0}  # GET /health
        self._queue: queue.Queue[Job] = queue.Queue()
        self._waiting: list[Job] = []  # taken from the queue, but could not join the running batch
        self._deadline = 0.0
        threading.Thread(target=self._run, name="septet-batcher", daemon=True).start()

    def submit(self, req: Request) -> Job:
        job = Job(req)
        self._queue.put(job)
        return job

    def _take(self, block: bool) -> Job | None:
        if self._waiting:
            return self._waiting.pop(0)
        try:
            return self._queue.get(timeout=max(0.0, self._deadline - time.monotonic())) if block \
                else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        while True:
            jobs = [self._waiting.pop(0) if self._waiting else self._queue.get()]
            # requests sent together reach the queue a few ms apart: wait that long for them
            self._deadline = time.monotonic() + self.window
            while len(jobs) < self.max_batch:
                job = self._take(block=True)
                if job is None:
                    break
                jobs.append(job)
            self.stats["requests"] += len(jobs)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
            self._serve(jobs)

    def _serve(self, jobs: list[Job]) -> None:
        batch = None
        try:
            batch = _Batch(self.lm, jobs, compile=jobs[0].req.sampling.compile)
            self._generate(batch)
        except BaseException as e:  # a bug: every open request hears of it; the worker lives on
            joined = [r.job for r in batch.rows if r.job not in jobs] if batch is not None else []
            for job in jobs + joined:  # (a finished one has ended its stream: it never reads this)
                job._out.put(e)

    def _admit(self, batch: _Batch) -> None:
        """Let waiting requests join the running batch, while there is room."""
        while len(batch.rows) < self.max_batch:
            job = self._take(block=False)
            if job is None:
                return
            if not batch.can_join(job):
                self._waiting.append(job)
                return
            try:
                batch.join(job)
            except Exception as e:  # only this request fails; the batch goes on
                job._out.put(e)
                continue
            self.stats["requests"] += 1
            self.stats["joined"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch.rows))

    @torch.inference_mode()
    def _generate(self, batch: _Batch) -> None:
        stop_ids = self.lm._stop_ids()
        context = self.lm.model.config.context
        while True:
            self._admit(batch)
            keep, nxt = [], []
            for k, row in enumerate(batch.rows):
                s = row.job.req.sampling
                t = int(sample_next(batch.logits[k:k + 1], s, row.gen, row.seen))
                if self._emit(row.job, row.stream, t, stop_ids, context):
                    keep.append(k)
                    nxt.append(t)
                    if row.seen is not None:
                        row.seen[0, t] = True
            if not keep:
                return
            batch.keep(keep)
            batch.advance(nxt)

    @staticmethod
    def _emit(job: Job, ts: TextStream, t: int, stop_ids: set[int], context: int) -> bool:
        """Hand token t of `job` to its client; False when the job is finished."""
        job.completion_tokens += 1
        done = job.cancelled.is_set()
        if t in stop_ids:
            job.finish_reason, done = "stop", True
        else:
            piece = ts.push(t)
            if piece:
                job._out.put(piece)
            if ts.stopped:
                job.finish_reason, done = "stop", True
        if not done and (job.completion_tokens >= job.req.sampling.max_new_tokens
                         or len(job.req.ids) + job.completion_tokens >= context):
            done = True
        if done:
            if not ts.stopped:  # text held back (a partial character, a possible stop string)
                rest = ts.finish()
                if rest:
                    job._out.put(rest)
            job._out.put(_END)
        return not done
