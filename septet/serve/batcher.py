"""One worker thread owns the model and runs the requests that are waiting as one batch.

Requests that arrive together (or while a batch runs) are decoded together: the fused step
reads each weight once for up to 8 rows. Through the server on SmolLM2 (2 cores, greedy,
128 tokens each) one request ran at 84-89 tok/s, eight sent at once at 215-251 tok/s in all
(benchmarks/serve_throughput.py; docs/serving.md). Each row keeps its own sampling (temperature, top-p,
seed, repetition penalty), stop strings and token budget; a row that finishes, or whose
client leaves, is dropped from the batch (`KVCache.reorder`), and the batch ends when its
last row does. Batching is static: a request that arrives mid-batch waits for the next one.

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
from ..generate import TextStream, cache_slots, decode_step, optimize_for_inference, sample_next
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


class Batcher:
    def __init__(self, lm: LoadedModel, max_batch: int = 8, window: float = 0.01):
        self.lm, self.max_batch, self.window = lm, max_batch, window
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}  # shown by GET /health
        self._queue: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._run, name="septet-batcher", daemon=True).start()

    def submit(self, req: Request) -> Job:
        job = Job(req)
        self._queue.put(job)
        return job

    def _run(self) -> None:
        while True:
            jobs = [self._queue.get()]
            # requests sent together reach the queue a few ms apart: wait that long for them
            deadline = time.monotonic() + self.window
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self.stats["requests"] += len(jobs)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
            try:
                self._generate(jobs)
            except BaseException as e:  # a bug: every open request hears of it; the worker lives on
                for job in jobs:
                    job._out.put(e)

    @torch.inference_mode()
    def _generate(self, jobs: list[Job]) -> None:
        lm = self.lm
        model, tok = lm.model, lm.tokenizer
        optimize_for_inference(model)
        stop_ids = lm._stop_ids()
        device = next(model.parameters()).device
        B = len(jobs)
        lengths = [len(j.req.ids) for j in jobs]
        P = max(lengths)
        compile = jobs[0].req.sampling.compile  # the server's setting: the same for every request
        S = cache_slots(model, P + max(j.req.sampling.max_new_tokens for j in jobs), compile)
        pad = torch.tensor([P - n for n in lengths], device=device)  # (B,) left padding
        tokens = torch.zeros(B, P, dtype=torch.long, device=device)
        for r, j in enumerate(jobs):
            tokens[r, P - lengths[r]:] = torch.tensor(j.req.ids, device=device)
        key_mask = torch.arange(S, device=device)[None, :] >= pad[:, None]  # (B, S)
        positions = (torch.arange(P, device=device)[None, :] - pad[:, None]).clamp(min=0)  # (B, P)
        gens = [None if j.req.sampling.seed is None else
                torch.Generator(device=device).manual_seed(j.req.sampling.seed) for j in jobs]
        seen = []
        for j in jobs:
            s = None
            if j.req.sampling.repetition_penalty != 1.0:
                s = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
                s[0, torch.tensor(j.req.ids, device=device)] = True
            seen.append(s)
        streams = [TextStream(tok, j.req.stop) for j in jobs]
        cache = model.new_cache(B, S)
        any_pad = bool((pad > 0).any())
        logits = model(tokens, cache=cache, positions=positions if B > 1 else None,
                       pad_mask=key_mask[:, :P] if any_pad else None, last_only=True)[:, -1]  # (B, V)
        step = decode_step(model, compile, B, S)
        live = list(range(B))  # the rows still in the batch, as indices into jobs
        while True:
            keep, nxt = [], []
            for k, r in enumerate(live):
                job, s = jobs[r], jobs[r].req.sampling
                t = int(sample_next(logits[k:k + 1], s, gens[r], seen[r]))
                if self._emit(job, streams[r], t, stop_ids, model.config.context):
                    keep.append(k)
                    nxt.append(t)
                    if seen[r] is not None:
                        seen[r][0, t] = True
            if not keep:
                return
            if len(keep) < len(live):  # drop the finished rows from the batch
                rows = torch.tensor(keep, device=device)
                cache.reorder(rows)
                key_mask, pad = key_mask[rows], pad[rows]
                live = [live[k] for k in keep]
                any_pad = bool((pad > 0).any())
            pos = (cache.pos - pad)[:, None]  # (B', 1) each row's own position
            # (the compiled step's default mask has the batch's first size: pass it once rows go)
            mask = key_mask if any_pad or compile else None
            logits = step(torch.tensor(nxt, device=device)[:, None], pos, mask, cache)

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
