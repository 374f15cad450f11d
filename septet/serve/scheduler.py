"""One worker thread owns the model and decodes the requests in flight as one batch.

Requests that arrive together are prefilled together; a request that arrives while a batch
decodes joins it at the next step (`DecodeBatch.admit`: its prompt is prefilled alone into
the batch's current slots, left-padded so that it ends where the other rows are), unless
its prompt is longer than the batch's history so far, in which case it starts the next
batch. Each row keeps its own sampling (temperature, top-p, seed, repetition penalty), stop
strings and token budget; a row that finishes, or whose client leaves, leaves the batch
(`DecodeBatch.keep`), and the batch ends when its last row does. With `--compile` batches
do not take new rows (each new shape would be a new graph). Throughput: docs/serving.md.

A batch of one computes exactly what `septet.inference.generate_ids` does (same prefill,
same step, same sampling calls), so a lone request's answer equals `septet generate`'s.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

import torch

from ..api import LoadedModel
from ..inference import DecodeBatch, TextStream, optimize_for_inference
from ..inference.repetition import RepetitionGuard
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

    def send(self, item: str | BaseException) -> None:
        """A text piece for the client, or the error that ended the request."""
        self._out.put(item)

    def end(self) -> None:
        self._out.put(_END)


class _Row:
    """What one request needs besides the batch's row: its job, text stream and loop guard."""

    def __init__(self, job: Job, lm: LoadedModel):
        self.job = job
        self.stream = TextStream(lm.tokenizer, job.req.stop)
        self.guard = RepetitionGuard() if job.req.repetition_guard else None


class Scheduler:
    def __init__(self, lm: LoadedModel, max_batch: int = 8, window: float = 0.01):
        self.lm, self.max_batch, self.window = lm, max_batch, window
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "joined": 0}  # GET /health
        self._queue: queue.Queue[Job] = queue.Queue()
        self._waiting: list[Job] = []  # taken from the queue, but could not join the running batch
        self._deadline = 0.0
        threading.Thread(target=self._run, name="septet-scheduler", daemon=True).start()

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

    @torch.inference_mode()
    def _serve(self, jobs: list[Job]) -> None:
        rows = [_Row(j, self.lm) for j in jobs]
        everyone = list(jobs)  # every request of this batch, joined ones too
        try:
            model = optimize_for_inference(self.lm.model)
            batch = DecodeBatch(model, [j.req.ids for j in jobs],
                                max_new_tokens=max(j.req.sampling.max_new_tokens for j in jobs),
                                compile=jobs[0].req.sampling.compile, sampling=[j.req.sampling for j in jobs])
            self._generate(batch, rows, everyone)
        except BaseException as e:  # a bug: every open request hears of it; the worker lives on
            for job in everyone:  # (a finished one has ended its stream: it never reads this)
                job.send(e)

    def _admit(self, batch: DecodeBatch, rows: list[_Row], everyone: list[Job]) -> None:
        """Let waiting requests join the running batch, while there is room."""
        while batch.size < self.max_batch:
            job = self._take(block=False)
            if job is None:
                return
            if not batch.can_admit(len(job.req.ids)):
                self._waiting.append(job)
                return
            try:
                batch.admit(job.req.ids, job.req.sampling.max_new_tokens, job.req.sampling)
            except Exception as e:  # only this request fails; the batch goes on
                job.send(e)
                continue
            rows.append(_Row(job, self.lm))
            everyone.append(job)
            self.stats["requests"] += 1
            self.stats["joined"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], batch.size)

    def _generate(self, batch: DecodeBatch, rows: list[_Row], everyone: list[Job]) -> None:
        stop_ids = self.lm.stop_ids()
        context = self.lm.model.config.context
        for tokens in batch.decode(admit=lambda b: self._admit(b, rows, everyone)):
            keep = [k for k, (row, t) in enumerate(zip(rows, tokens)) if self._emit(row, t, stop_ids, context)]
            rows[:] = [rows[k] for k in keep]
            batch.keep(keep)

    @staticmethod
    def _emit(row: _Row, t: int, stop_ids: set[int], context: int) -> bool:
        """Hand token t of a row's job to its client; False when the job is finished. A reply
        caught in a loop (the row's RepetitionGuard) ends as "stop"; what was sent stays sent."""
        job, ts = row.job, row.stream
        job.completion_tokens += 1
        done = job.cancelled.is_set()
        if t in stop_ids:
            job.finish_reason, done = "stop", True
        else:
            piece = ts.push(t)
            if piece:
                job.send(piece)
            if ts.stopped or (row.guard is not None and row.guard.push(t)):
                job.finish_reason, done = "stop", True
        if not done and (job.completion_tokens >= job.req.sampling.max_new_tokens
                         or len(job.req.ids) + job.completion_tokens >= context):
            done = True
        if done:
            if not ts.stopped:  # text held back (a partial character, a possible stop string)
                rest = ts.finish()
                if rest:
                    job.send(rest)
            job.end()
        return not done
