"""`septet train`: pretrain a decoder LM from a preset on a corpus, resumably.

One loop serves a laptop CPU and a torchrun job: under torchrun the model is sharded
with FSDP2 and each rank reads its slice of the same global batches, so the loss curve
matches a single-process run. Checkpoints hold the complete training state (weights,
optimizer, data position, spike-guard history, RNG), so --resume continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    set_model_state_dict, set_optimizer_state_dict,
)
from tqdm import tqdm

from .. import assets
from ..config import DecoderConfig, config_from_dict, get_preset
from ..data.corpus import corpus_fingerprint, load_documents
from ..data.packing import Batcher, PackedCorpus, cached_pack, iter_eval_batches
from ..errors import ConfigError, SeptetError
from ..models import build, describe
from ..models.base import DecoderLM
from ..tokenizer import Tokenizer
from . import parallel
from .checkpoint import (capture_rng, checkpoint_dir, latest_checkpoint, load_checkpoint,
                         prune_checkpoints, restore_rng, save_checkpoint)
from .flops import measure_matmul_peak, mfu, model_flops_per_token
from .metrics import MetricsLog, plot_loss_curve
from .optim import build_optimizer
from .schedules import lr_at
from .spike import SpikeGuard


@dataclass
class TrainConfig:
    model: str  # preset name
    out: Path
    data: str | None = None  # None: Shakespeare
    steps: int = 600
    batch_size: int = 16  # sequences per micro-batch, across all ranks
    grad_accum: int = 1
    seq_len: int | None = None  # default: the model's context
    lr: float | None = None  # defaults for these come from the preset's recipe
    optimizer: str | None = None
    schedule: str | None = None
    warmup: int | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    seed: int = 1337
    eval_every: int = 100
    eval_batches: int = 16
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False
    activation_checkpointing: bool = False
    resume: bool = False
    spike_factor: float = 2.0  # 0 disables the guard
    spike_window: int = 50
    max_rewinds: int = 5
    val_fraction: float = 0.05
    peak_flops: float | None = None  # None: measured matmul peak
    device: str | None = None
    progress: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields


class TrainingDiverged(SeptetError):
    pass


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the corpus's token frequencies: the loss of the best model that
    ignores context. A trained LM must beat it."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _tokenizer_for(config: DecoderConfig, docs: list[str], cache: Path) -> Tokenizer:
    """Train (or reuse a cached) byte-level BPE sized to the model's vocabulary. PaLM and
    LLaMA split digits."""
    split = config.family in ("palm", "llama")
    key = f"{corpus_fingerprint(docs)[:16]}-v{config.vocab_size}-d{int(split)}"
    path = cache / "tokenizers" / f"{key}.json"
    if path.is_file():
        return Tokenizer.load(path)
    tok = Tokenizer.train_bpe(docs, config.vocab_size, split_digits=split)
    tok.save(path)
    return tok


class Trainer:
    def __init__(self, tc: TrainConfig):
        self.tc = tc
        self.d = parallel.init_distributed(tc.device)
        self.out = Path(tc.out)
        if tc.steps < 1 or tc.batch_size < 1 or tc.grad_accum < 1:
            raise ConfigError("--steps, --batch-size and --grad-accum must be >= 1")
        if tc.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"--dtype {tc.dtype!r}: use fp32 or bf16")
        resume_from = latest_checkpoint(self.out) if tc.resume else None
        if tc.resume and resume_from is None:
            raise ConfigError(f"--resume: no checkpoint in {self.out}; start without --resume")
        self.ckpt = load_checkpoint(resume_from, with_training_state=True) if resume_from else None

        # --- model config and tokenizer
        if self.ckpt is not None:
            self.config = config_from_dict(self.ckpt.config, str(resume_from / "config.json"))
        else:
            self.config = get_preset(tc.model).config.replace(**tc.overrides) if tc.overrides \
                else get_preset(tc.model).config
        self.recipe = get_preset(tc.model).recipe
        docs = load_documents(tc.data)
        cache = assets.cache_root()
        if self.ckpt is not None and self.ckpt.tokenizer_json:
            self.tokenizer = Tokenizer.load(resume_from)
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
        self.batcher = Batcher(self.data.train, self.seq_len, tc.batch_size, seed=tc.seed,
                               rank=self.d.rank, world_size=self.d.world_size)
        self.guard = SpikeGuard(tc.spike_factor, tc.spike_window)
        self.step = 0
        if self.ckpt is not None:
            self._restore(self.ckpt)
        self.peak = tc.peak_flops or measure_matmul_peak(
            torch.bfloat16 if tc.dtype == "bf16" else torch.float32, self.d.device, seconds=0.5)
        self.peak *= self.d.world_size

    # ------------------------------------------------------------------ helpers
    def _barrier(self) -> None:
        if self.d.enabled:
            dist.barrier()

    def _autocast(self):
        if self.tc.dtype == "bf16":
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sd_options(self) -> StateDictOptions:
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def save(self) -> Path:
        model_sd = get_model_state_dict(self.model, options=self._sd_options())
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=self._sd_options())
        path = checkpoint_dir(self.out, self.step)
        if self.d.is_main:
            state = {"step": self.step, "data": self.batcher.state_dict(),
                     "guard": self.guard.state_dict(), "seq_len": self.seq_len,
                     "train_config": {k: (str(v) if isinstance(v, Path) else v)
                                      for k, v in dataclasses.asdict(self.tc).items()}}
            save_checkpoint(path, model_state=model_sd, config=self.config.to_dict(),
                            tokenizer_json=self.tokenizer.to_json_str(), optimizer_state=optim_sd,
                            train_state=state, rng=capture_rng())
            prune_checkpoints(self.out, self.tc.keep_checkpoints)
        self._barrier()
        return path

    def _restore(self, ckpt) -> None:
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, ckpt.model_state, options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, ckpt.optimizer_state, options=opts)
        ts = ckpt.train_state
        self.step = int(ts["step"])
        self.batcher.load_state_dict(ts["data"])
        self.guard.load_state_dict(ts["guard"])
        restore_rng(ckpt.rng)

    def lr_for(self, step: int) -> float:
        return lr_at(step, kind=self.schedule, peak=self.lr, warmup=self.warmup,
                     total=self.tc.steps, min_ratio=self.recipe.min_lr_ratio)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for x, y in iter_eval_batches(self.data.val, self.seq_len, self.tc.batch_size, self.tc.eval_batches):
            with self._autocast():
                logits = self.model(x.to(self.d.device))
            losses.append(self.model.loss(logits, y.to(self.d.device)).ce.float())
        self.model.train()
        return float(torch.stack(losses).mean())

    def train_step(self) -> dict[str, float]:
        """One optimizer update over grad_accum micro-batches. Returns logged values, or
        {"spike": loss} when the guard rejected the update (no parameters changed)."""
        lr = self.lr_for(self.step + 1)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        parts_sum = torch.zeros(3)
        for _ in range(self.tc.grad_accum):
            x, y = self.batcher.next_batch()
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
        self.step += 1
        row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        if self.config.z_loss:
            row["z_loss"] = float(parts_mean[1])
        moe = self.model.moe_layers()
        if moe:
            row["moe_balance_loss"] = float(parts_mean[2])
            row["moe_dropped_fraction"] = sum(m.last_stats.get("dropped_fraction", 0.0) for m in moe) / len(moe)
        return row

    def rewind(self, spike_loss: float, log: MetricsLog | None) -> None:
        """PaLM's remedy: back to the last checkpoint, keeping the data position — the
        batches between that checkpoint and the spike are thereby skipped."""
        path = latest_checkpoint(self.out)
        if path is None or self.rewinds >= self.tc.max_rewinds:
            raise TrainingDiverged(
                f"loss spiked to {spike_loss:.4g} at step {self.step + 1} and "
                + ("no checkpoint exists to rewind to" if path is None else
                   f"{self.rewinds} rewinds did not help") + "; lower --lr or raise --spike-factor")
        data_pos = self.batcher.state_dict()
        spike_step = self.step + 1
        self._restore(load_checkpoint(path, with_training_state=True))
        self.batcher.load_state_dict(data_pos)
        self.rewinds += 1
        if log is not None:
            log.log({"event": "loss_spike", "at_step": spike_step, "loss": spike_loss,
                     "rewound_to": self.step, "skipped_batches": (spike_step - self.step) * self.tc.grad_accum})

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        tc = self.tc
        main = self.d.is_main
        log = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if tc.resume else None) if main else None
        entropy = unigram_entropy(self.data.train, self.tokenizer.vocab_size)
        if main and not tc.resume:
            log.log({"event": "start", "model": tc.model, "params": self.n_params,
                     "train_tokens": int(len(self.data.train)), "val_tokens": int(len(self.data.val)),
                     "vocab_size": self.tokenizer.vocab_size, "unigram_entropy": entropy,
                     "world_size": self.d.world_size, "peak_flops": self.peak})
        if self.step == 0:
            self.save()  # a rewind target before the first update
        self.rewinds = 0
        tokens_per_step = tc.batch_size * tc.grad_accum * self.seq_len
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (main and tc.progress),
                   desc=f"train {tc.model}", unit="step", dynamic_ncols=True)
        val_loss = None
        self.model.train()
        while self.step < tc.steps:
            t0 = time.perf_counter()
            row = self.train_step()
            if "spike" in row:
                self.rewind(row["spike"], log)
                bar.n = self.step
                bar.refresh()
                continue
            dt = time.perf_counter() - t0
            row["tokens_per_s"] = tokens_per_step / dt
            row["mfu"] = mfu(row["tokens_per_s"], self.flops_per_token, self.peak)
            if self.step % tc.eval_every == 0 or self.step == tc.steps:
                val_loss = row["val_loss"] = self.evaluate()
            if main:
                log.log(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                mfu=f"{100 * row['mfu']:.1f}%",
                                **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
            if self.step % tc.ckpt_every == 0 or self.step == tc.steps:
                self.save()
        bar.close()
        summary = {"steps": self.step, "val_loss": val_loss, "unigram_entropy": entropy,
                   "checkpoint": str(checkpoint_dir(self.out, self.step)), "out": str(self.out)}
        if main:
            log.close()
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png")
        return summary


def train(tc: TrainConfig) -> dict[str, Any]:
    trainer = Trainer(tc)
    try:
        return trainer.run()
    finally:
        parallel.shutdown_distributed()
