"""One training skeleton: the bookkeeping every septet trainer shares.

A trainer (the LM pretrainer in loop.py, the VLM bridge and CLIP trainers in septet.vlm,
and the fine-tuning and alignment trainers to come) supplies only what is its own:

    batches                 its data source; batches.state_dict() / load_state_dict() hold
                            the resumable position (a packing.PackedBatches, or SeededDraws)
    train_step() -> dict    one optimizer update, which draws its batch(es) from `batches`;
                            returns the metrics row, or {"spike": loss} to reject the update
                            with no parameter changed (a loss-spike guard, see below)
    evaluate() -> dict      validation metrics, merged into the row every eval_every steps
    snapshot() -> Snapshot  what a checkpoint holds: weights, config, optimizer, own state
    restore(ckpt)           put a Checkpoint's weights, optimizer and own state back

and constructs a `TrainingLoop` over itself, which owns the rest: the step counter
(`loop.step`, the updates done), the run directory with its step-NNNNNNNN checkpoints
(written atomically, the newest `keep_checkpoints` kept, each with a snapshot of the
trainer's config), the resume (weights, optimizer, data position and RNG, so a resumed run
is bit-exact), metrics.jsonl, the progress bar and loss.png. tests/test_run.py's `Toy` is
a complete trainer in 30 lines.

Spike hook: when train_step returns {"spike": loss}, the loop does PaLM's remedy
(septet.train.spike): it reloads the newest checkpoint but keeps the data position, so the
batches between that checkpoint and the spike are skipped; after `max_rewinds` rewinds, or
with no checkpoint to go back to, it stops with TrainingDiverged.

Under torchrun every rank runs the loop; snapshot() is called on all ranks (a sharded model
gathers collectively), and only the main rank writes checkpoints, metrics and the bar.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from septet.checkpoints.native import (
    Checkpoint,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from septet.errors import CheckpointError, ConfigError, SeptetError

from .metrics import MetricsLog, plot_loss_curve


class TrainingDiverged(SeptetError):
    pass


@dataclass
class Snapshot:
    """What a trainer hands the loop to checkpoint; the loop adds step, data position, RNG
    and the config snapshot."""

    model: dict[str, torch.Tensor]  # weights to save (all of them, or only the trained part)
    config: dict  # the model config, with a "family" field; written as config.json
    optimizer: dict | None = None  # optimizer.state_dict()
    tokenizer_json: str | None = None  # written as tokenizer.json
    state: dict = field(default_factory=dict)  # the trainer's own JSON-able state (e.g. a spike guard)


@dataclass
class LoopOptions:
    out: Path  # run directory: step-NNNNNNNN checkpoints, metrics.jsonl, loss.png
    steps: int  # optimizer updates in the whole run
    eval_every: int = 100  # call evaluate() every this many steps, and after the last
    ckpt_every: int = 100  # checkpoint every this many steps, and after the last
    keep_checkpoints: int = 2  # the newest this many checkpoints are kept
    save_at_start: bool = False  # checkpoint step 0 too (a rewind target before the first update)
    max_rewinds: int = 0  # loss-spike rewinds allowed before TrainingDiverged
    batches_per_step: int = 1  # data batches one step reads (gradient accumulation), for the spike log
    log_elapsed: bool = True  # add elapsed_s (seconds since the loop started) to each row
    progress: bool = True  # show a progress bar
    desc: str = "train"  # the progress bar's label
    show: tuple[str, ...] = ("loss",)  # row values on the progress bar (the latest of each)


class SeededDraws:
    """The data source of a trainer that samples each step's batch afresh: draw k comes from
    a generator seeded by (seed, k), so the draw counter is the whole resumable position."""

    def __init__(self, seed: int):
        self.seed = seed
        self.position = 0

    def next_generator(self) -> torch.Generator:
        self.position += 1
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def resume_point(out: str | Path, resume: bool, *, required: bool = True) -> Checkpoint | None:
    """The newest checkpoint in `out` (with training state) when `resume` is set, else None.
    With none there, --resume is an error if `required`, otherwise the run starts afresh."""
    if not resume:
        return None
    path = latest_checkpoint(out)
    if path is None:
        if required:
            raise ConfigError(f"--resume: no checkpoint in {out}; start without --resume")
        return None
    return load_checkpoint(path, with_training_state=True)


def check_same_config(ckpt: Checkpoint, config: dict, what: str = "config") -> None:
    if ckpt.config != config:
        raise ConfigError(f"{ckpt.path} was trained with another {what}; resume with the same flags "
                          "or pick a new --out")


def _plain(config: Any) -> dict:
    d = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


class TrainingLoop:
    def __init__(self, trainer: Any, opts: LoopOptions, *, config: Any, resume_from: Checkpoint | None = None,
                 is_main: bool = True, barrier: Callable[[], None] | None = None):
        """`config`: the trainer's config (a dataclass or dict), snapshotted into every
        checkpoint as train_state["train_config"]. `resume_from` (see resume_point) is
        restored here, so loop.step is the resumed step from the start."""
        if opts.steps < 1 or opts.eval_every < 1 or opts.ckpt_every < 1 or opts.keep_checkpoints < 1:
            raise ConfigError("steps, eval_every, ckpt_every and keep_checkpoints must be >= 1")
        self.trainer = trainer
        self.opts = opts
        self.out = Path(opts.out)
        self.config_snapshot = _plain(config)
        self.is_main = is_main
        self.barrier = barrier or (lambda: None)
        self.step = 0
        self.rewinds = 0
        self.resumed = resume_from is not None
        self.last_checkpoint: Path | None = None
        self.metrics: MetricsLog | None = None
        if resume_from is not None:
            self.restore(resume_from)
            self.last_checkpoint = resume_from.path

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Checkpoint the state after `step` updates, then drop all but the newest ones."""
        snap = self.trainer.snapshot()
        path = checkpoint_dir(self.out, self.step)
        if self.is_main:
            state = {"step": self.step, "data": self.trainer.batches.state_dict(), **snap.state,
                     "train_config": self.config_snapshot}
            save_checkpoint(path, model_state=snap.model, config=snap.config, tokenizer_json=snap.tokenizer_json,
                            optimizer_state=snap.optimizer, train_state=state)
            prune_checkpoints(self.out, self.opts.keep_checkpoints)
        self.barrier()
        self.last_checkpoint = path
        return path

    def restore(self, ckpt: Checkpoint) -> None:
        ts = ckpt.train_state or {}
        if "step" not in ts or "data" not in ts:
            raise CheckpointError(f"{ckpt.path} holds no step or data position; it cannot be resumed "
                                  "(start a new run from its weights instead)")
        self.trainer.restore(ckpt)
        self.step = int(ts["step"])
        self.trainer.batches.load_state_dict(ts["data"])
        restore_rng(ckpt.rng)

    def rewind(self, loss: float) -> None:
        """Back to the newest checkpoint, keeping the data position (PaLM's spike remedy)."""
        at = self.step + 1
        path = latest_checkpoint(self.out)
        if path is None or self.rewinds >= self.opts.max_rewinds:
            raise TrainingDiverged(
                f"loss spiked to {loss:.4g} at step {at} and "
                + ("no checkpoint exists to rewind to" if path is None else f"{self.rewinds} rewinds did not help")
                + "; lower --lr or raise --spike-factor")
        position = self.trainer.batches.state_dict()
        self.restore(load_checkpoint(path, with_training_state=True))
        self.trainer.batches.load_state_dict(position)
        self.rewinds += 1
        self.log({"event": "loss_spike", "at_step": at, "loss": loss, "rewound_to": self.step,
                  "skipped_batches": (at - self.step) * self.opts.batches_per_step})

    # ------------------------------------------------------------------ the loop
    def log(self, row: dict) -> None:
        """Append a row to metrics.jsonl (main rank, while fit() runs)."""
        if self.metrics is not None:
            self.metrics.log(row)

    def fit(self, start: dict | None = None) -> dict:
        """Train up to opts.steps; returns the last logged row ({} when nothing was left).
        `start`, logged as {"event": "start", ...} at the top of a fresh run, describes it."""
        o = self.opts
        if self.is_main:
            self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if self.resumed else None)
        if start is not None and not self.resumed:
            self.log({"event": "start", **start})
        if o.save_at_start and self.step == 0:
            self.save()
        self.rewinds = 0
        bar = tqdm(total=o.steps, initial=self.step, disable=not (self.is_main and o.progress), desc=o.desc,
                   unit="step", dynamic_ncols=True)
        shown: dict[str, str] = {}
        row: dict = {}
        t0 = time.perf_counter()
        try:
            while self.step < o.steps:
                out = self.trainer.train_step()
                if "spike" in out:
                    self.rewind(out["spike"])
                    bar.n = self.step
                    bar.refresh()
                    continue
                self.step += 1
                row = {"step": self.step, **out}
                if o.log_elapsed:
                    row["elapsed_s"] = time.perf_counter() - t0
                if self.step % o.eval_every == 0 or self.step == o.steps:
                    row.update(self.trainer.evaluate())
                self.log(row)
                shown.update({k: f"{row[k]:.4g}" for k in o.show if k in row})
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
                if self.step % o.ckpt_every == 0 or self.step == o.steps:
                    self.save()
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
        if self.is_main:
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png")
        return row


__all__ = ["LoopOptions", "SeededDraws", "Snapshot", "TrainingDiverged", "TrainingLoop", "check_same_config",
           "resume_point"]
