"""`septet train`: pretrain a decoder LM from a preset on a corpus, resumably.

One loop serves a laptop CPU and a torchrun job: under torchrun the model is sharded
with FSDP2 and each rank reads its slice of the same global batches, so the loss curve
matches a single-process run. The bookkeeping (checkpoints holding the complete training
state, --resume, metrics.jsonl, the loss-spike rewind) is septet.train.run's; this file
supplies the model, the data and one optimizer update.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .. import assets
from ..checkpoints.native import Checkpoint
from ..config import DecoderConfig
from ..data.corpus import corpus_fingerprint, load_documents
from ..data.packing import PackedBatches, PackedCorpus, cached_pack, iter_eval_batches
from ..errors import ConfigError
from ..models import build, config_from_dict, describe, get_preset
from ..models.base import DecoderLM
from ..tokenizer import Tokenizer
from . import parallel
from .determinism import deterministic_training
from .flops import measure_matmul_peak, mfu, model_flops_per_token
from .optim import build_optimizer
from .run import LoopOptions, Snapshot, TrainingLoop, resume_point
from .schedules import lr_at
from .spike import SpikeGuard


@dataclass
class TrainConfig:
    model: str  # preset name (e.g. llama-tiny)
    out: Path  # run directory: checkpoints, metrics.jsonl, loss.png
    data: str | None = None  # text file or directory of them; None: Shakespeare
    steps: int = 600  # optimizer updates
    batch_size: int = 16  # sequences per micro-batch, across all ranks
    grad_accum: int = 1  # micro-batches per optimizer update
    seq_len: int | None = None  # tokens per sequence; None: the model's context
    lr: float | None = None  # peak learning rate; None: the preset's recipe
    optimizer: str | None = None  # adamw | adafactor; None: the preset's recipe
    schedule: str | None = None  # cosine | inverse_sqrt | constant; None: the preset's recipe
    warmup: int | None = None  # warmup steps; None: the recipe's, at most a tenth of the run
    weight_decay: float | None = None  # None: the preset's recipe
    grad_clip: float | None = None  # global gradient-norm clip; None: the preset's recipe
    seed: int = 1337  # model initialisation and data order
    eval_every: int = 100  # validation loss every this many steps (and after the last)
    eval_batches: int = 16  # validation batches per evaluation
    ckpt_every: int = 100  # checkpoint every this many steps (and after the last)
    keep_checkpoints: int = 2  # the newest this many checkpoints are kept
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute block activations in the backward pass
    resume: bool = False  # continue from the newest checkpoint in --out
    spike_factor: float = 2.0  # a loss above this x the recent median is a spike; 0 disables the guard
    spike_window: int = 50  # steps in the spike guard's median
    max_rewinds: int = 5  # loss-spike rewinds allowed before giving up
    val_fraction: float = 0.05  # share of the corpus held out for validation
    peak_flops: float | None = None  # for MFU; None: the measured matmul peak
    device: str | None = None  # cpu | cuda | ...; None: the best available
    progress: bool = True  # show a progress bar
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields (--set FIELD=VALUE)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the corpus's token frequencies: the loss of the best model that
    ignores context. A trained LM must beat it."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _tokenizer_for(config: DecoderConfig, docs: list[str], cache: Path) -> Tokenizer:
    """Train (or reuse a cached) byte-level BPE sized to the model's vocabulary, splitting
    digits where the paper's tokenizer does (PaLM, LLaMA)."""
    split = config.split_digits
    key = f"{corpus_fingerprint(docs)[:16]}-v{config.vocab_size}-d{int(split)}"
    path = cache / "tokenizers" / f"{key}.json"
    if path.is_file():
        return Tokenizer.load(path)
    tok = Tokenizer.train_bpe(docs, config.vocab_size, split_digits=split)
    tok.save(path)
    return tok


class Trainer:
    """The LM pretrainer: a septet.train.run trainer (batches, train_step, evaluate,
    snapshot, restore) around a decoder LM, its packed corpus and its optimizer."""

    def __init__(self, tc: TrainConfig):
        deterministic_training()  # before the model exists: MKL reads its mode at its first call
        self.tc = tc
        self.d = parallel.init_distributed(tc.device)
        self.out = Path(tc.out)
        if tc.steps < 1 or tc.batch_size < 1 or tc.grad_accum < 1:
            raise ConfigError("--steps, --batch-size and --grad-accum must be >= 1")
        if tc.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"--dtype {tc.dtype!r}: use fp32 or bf16")
        ckpt = resume_point(self.out, tc.resume)

        # --- model config and tokenizer
        if ckpt is not None:
            self.config = config_from_dict(ckpt.config, str(ckpt.path / "config.json"))
        else:
            self.config = get_preset(tc.model).config.replace(**tc.overrides) if tc.overrides \
                else get_preset(tc.model).config
        self.recipe = get_preset(tc.model).recipe
        docs = load_documents(tc.data)
        cache = assets.cache_root()
        if ckpt is not None and ckpt.tokenizer_json:
            self.tokenizer = Tokenizer.load(ckpt.path)
        else:
            # rank 0 trains the tokenizer; the others wait and read the same file
            if self.d.is_main:
                _tokenizer_for(self.config, docs, cache)
            self._barrier()
            self.tokenizer = _tokenizer_for(self.config, docs, cache)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ConfigError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's "
                              f"vocab_size is {self.config.vocab_size}; raise vocab_size")
        self.seq_len = tc.seq_len or self.config.context
        if self.seq_len > self.config.context:
            raise ConfigError(f"--seq-len {self.seq_len} exceeds the model's context {self.config.context}")
        if self.d.is_main:
            cached_pack(docs, self.tokenizer, cache / "packed", tc.val_fraction)
        self._barrier()
        self.data: PackedCorpus = cached_pack(docs, self.tokenizer, cache / "packed", tc.val_fraction)
        self.data.check(self.seq_len, tc.batch_size)

        # --- model, parallelism, optimizer
        torch.manual_seed(tc.seed)
        self.model: DecoderLM = build(self.config).to(self.d.device)
        sizes = describe(self.config)
        self.n_params = sizes["params"]
        n_matmul = sizes.get("active_params", sizes["params"])
        # model FLOPs count matmuls only: drop pure lookup tables (learned positions, and the
        # token table when the head is a separate matrix)
        if hasattr(self.model, "pos_emb"):
            n_matmul -= self.model.pos_emb.weight.numel()
        if getattr(self.model, "lm_head", None) is not None:
            n_matmul -= self.model.tok_emb.weight.numel()
        c = self.config
        self.flops_per_token = model_flops_per_token(n_matmul, c.n_layer, c.n_head, c.d_head, self.seq_len)
        if tc.activation_checkpointing:
            parallel.apply_activation_checkpointing(self.model)
        if tc.compile:
            parallel.apply_compile(self.model)
        if self.d.enabled:
            parallel.apply_fsdp(self.model, self.d)
        r = self.recipe
        self.lr = tc.lr if tc.lr is not None else r.lr
        self.opt_name = tc.optimizer or r.optimizer
        self.schedule = tc.schedule or r.schedule
        self.warmup = tc.warmup if tc.warmup is not None else min(r.warmup_steps, max(1, tc.steps // 10))
        self.grad_clip = tc.grad_clip if tc.grad_clip is not None else r.grad_clip
        wd = tc.weight_decay if tc.weight_decay is not None else r.weight_decay
        self.optimizer = build_optimizer(self.model, self.opt_name, self.lr, wd, betas=r.betas)
        self.batches = PackedBatches(self.data.train, self.seq_len, tc.batch_size, seed=tc.seed,
                               rank=self.d.rank, world_size=self.d.world_size)
        self.guard = SpikeGuard(tc.spike_factor, tc.spike_window)
        opts = LoopOptions(out=self.out, steps=tc.steps, eval_every=tc.eval_every, ckpt_every=tc.ckpt_every,
                           keep_checkpoints=tc.keep_checkpoints, save_at_start=True, max_rewinds=tc.max_rewinds,
                           batches_per_step=tc.grad_accum, log_elapsed=False, progress=tc.progress,
                           desc=f"train {tc.model}", show=("loss", "tokens_per_s", "mfu", "val_loss"))
        self.loop = TrainingLoop(self, opts, config=tc, resume_from=ckpt, is_main=self.d.is_main,
                                 barrier=self._barrier)
        self.peak = tc.peak_flops or measure_matmul_peak(
            torch.bfloat16 if tc.dtype == "bf16" else torch.float32, self.d.device, seconds=0.5)
        self.peak *= self.d.world_size

    @property
    def step(self) -> int:
        """Optimizer updates done."""
        return self.loop.step

    # ------------------------------------------------------------------ helpers
    def _barrier(self) -> None:
        if self.d.enabled:
            dist.barrier()

    def _autocast(self):
        if self.tc.dtype == "bf16":
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr_for(self, step: int) -> float:
        return lr_at(step, kind=self.schedule, peak=self.lr, warmup=self.warmup,
                     total=self.tc.steps, min_ratio=self.recipe.min_lr_ratio)

    # ------------------------------------------------------------------ the trainer interface
    def snapshot(self) -> Snapshot:
        # full (gathered) state dicts: a collective under FSDP, so every rank calls this
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return Snapshot(model=get_model_state_dict(self.model, options=opts), config=self.config.to_dict(),
                        optimizer=get_optimizer_state_dict(self.model, self.optimizer, options=opts),
                        tokenizer_json=self.tokenizer.to_json_str(),
                        state={"guard": self.guard.state_dict(), "seq_len": self.seq_len})

    def restore(self, ckpt: Checkpoint) -> None:
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, ckpt.model_state, options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, ckpt.optimizer_state, options=opts)
        self.guard.load_state_dict(ckpt.train_state["guard"])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        losses = []
        for x, y in iter_eval_batches(self.data.val, self.seq_len, self.tc.batch_size, self.tc.eval_batches):
            with self._autocast():
                logits = self.model(x.to(self.d.device))
            losses.append(self.model.loss(logits, y.to(self.d.device)).ce.float())
        self.model.train()
        return {"val_loss": float(torch.stack(losses).mean())}

    def train_step(self) -> dict[str, float]:
        """One optimizer update over grad_accum micro-batches. Returns logged values, or
        {"spike": loss} when the guard rejected the update (no parameters changed)."""
        t0 = time.perf_counter()
        lr = self.lr_for(self.step + 1)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        parts_sum = torch.zeros(3)
        for _ in range(self.tc.grad_accum):
            x, y = self.batches.next_batch()
            x, y = x.to(self.d.device), y.to(self.d.device)
            with self._autocast():
                logits = self.model(x)  # (b, T, V)
            parts = self.model.loss(logits, y)
            (parts.total / self.tc.grad_accum).backward()
            parts_sum += torch.stack([parts.ce, parts.z, parts.aux]).detach().float().cpu()
        parts_mean = parallel.all_reduce_mean(parts_sum / self.tc.grad_accum, self.d)
        loss = float(parts_mean[0])
        if self.guard.is_spike(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return {"spike": loss}
        grad_norm = parallel.grad_norm_clip(self.model, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.record(loss)
        row = {"loss": loss, "lr": lr, "grad_norm": grad_norm}
        if self.config.z_loss:
            row["z_loss"] = float(parts_mean[1])
        moe = self.model.moe_layers()
        if moe:
            row["moe_balance_loss"] = float(parts_mean[2])
            row["moe_dropped_fraction"] = sum(m.last_stats.get("dropped_fraction", 0.0) for m in moe) / len(moe)
        row["tokens_per_s"] = self.tc.batch_size * self.tc.grad_accum * self.seq_len / (time.perf_counter() - t0)
        row["mfu"] = mfu(row["tokens_per_s"], self.flops_per_token, self.peak)
        return row

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        tc = self.tc
        entropy = unigram_entropy(self.data.train, self.tokenizer.vocab_size)
        start = {"model": tc.model, "params": self.n_params, "train_tokens": int(len(self.data.train)),
                 "val_tokens": int(len(self.data.val)), "vocab_size": self.tokenizer.vocab_size,
                 "unigram_entropy": entropy, "world_size": self.d.world_size, "peak_flops": self.peak}
        self.model.train()
        last = self.loop.fit(start)
        return {"steps": self.step, "val_loss": last.get("val_loss"), "unigram_entropy": entropy,
                "checkpoint": str(self.loop.last_checkpoint), "out": str(self.out)}


def train(tc: TrainConfig) -> dict[str, Any]:
    trainer = Trainer(tc)
    try:
        return trainer.run()
    finally:
        parallel.shutdown_distributed()
