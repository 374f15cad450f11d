"""`septet vlm train`: train a Flamingo or BLIP-2 bridge between a frozen encoder and a
frozen LM on easy-VQA, resumably. Only the bridge's weights are trained and saved.

Flamingo (§3 and App. B.1.2): every step accumulates the gradients of a weighted sum of
per-dataset losses — single-image VQA pairs, captions and interleaved multi-image
sequences (the few-shot format; the paper's M3W/ALIGN/LTIP mixture, scaled down) — then
clips and takes one AdamW step. Weight decay 0.1 on the cross-attention matrices, none on
the Perceiver Resampler (App. B.1.2); warmup, then the schedule.

BLIP-2 (§3.2-3.4): stage 1 trains the Q-Former alone with ITC + ITM + ITG on captions;
stage 2 continues from it, adding the projection into the frozen LM, trained with the LM
loss on captions and VQA pairs. AdamW β2 = 0.98, weight decay 0.05, cosine.

CPU scale: the defaults are much smaller than the papers' bridges (16 latents and 2
resampler layers, not 64 and 6; cross-attention before every 6th LM block, as the larger
Flamingos sparsify it — every 4th at 9B, 7th at 80B; a 4-layer 256-wide Q-Former with
8 queries, not BERT-base with 32) so a run fits in tens of CPU minutes.

Determinism: step k's batches come from a generator seeded by (seed, k); a resumed run
restores bridge, optimizer, data position and RNG state (septet.train.run does the
bookkeeping), so it continues as if never stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from septet.checkpoints.native import Checkpoint, save_checkpoint
from septet.errors import ConfigError
from septet.models.blip2 import Blip2Config
from septet.models.flamingo import FlamingoConfig
from septet.nn.qformer import QFormerConfig
from septet.train.determinism import deterministic_training
from septet.train.run import LoopOptions, SeededDraws, Snapshot, TrainingLoop, check_same_config, resume_point
from septet.train.schedules import lr_at

from . import data as D
from .infer import ARCHS, FAMILY, NORM_MEAN, NORM_STD, VLM, build_bridge, eos_id_of, vision_spec

STAGE1_DIR = "stage1"  # BLIP-2: the run's stage-1 bridge, kept for retrieval


@dataclass
class VLMTrainConfig:
    arch: str = "flamingo"
    lm: str = "smollm2-135m-instruct"
    vision: str = "efficientnet-lite0"
    out: Path = Path("runs/vlm")
    steps: int = 300  # Flamingo: all steps; BLIP-2: stage-2 steps (after stage1_steps)
    stage1_steps: int = 200
    lr: float = 5e-4
    stage1_lr: float = 1e-3
    warmup: int = 20
    schedule: str = "cosine"
    weight_decay: float = -1.0  # < 0: the paper's (Flamingo 0.1, BLIP-2 0.05)
    grad_clip: float = 1.0
    seed: int = 0
    # per-step batches (Flamingo: one forward per dataset, gradients accumulated)
    vqa_batch: int = 12
    caption_batch: int = 4
    interleaved_batch: int = 2
    interleaved_images: int = 3
    answer_alpha: float = 1.0  # < 1: flatten the training answers' distribution (data.sample_questions)
    vqa_weight: float = 1.0
    caption_weight: float = 0.3
    interleaved_weight: float = 1.0
    stage1_batch: int = 16  # <= 24: captions in a stage-1 batch are distinct
    # bridge size
    n_latents: int = 16
    resampler_layers: int = 2
    resampler_dim: int = 256
    xattn_every: int = 6
    ff_mult: int = 2
    gate_lr_mult: float = 10.0  # Flamingo's tanh gates learn at lr x this (see _optimizer)
    standardize_features: bool = True  # z-score the frozen features (see data.StandardizedFeatures)
    qformer_dim: int = 256
    qformer_layers: int = 4
    n_query: int = 8
    # bookkeeping
    eval_every: int = 50
    eval_questions: int = 64
    ckpt_every: int = 50
    keep_checkpoints: int = 2
    threads: int = 1
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"--arch {self.arch!r} is unknown; use flamingo or blip2")
        for name in ("steps", "vqa_batch", "eval_every", "ckpt_every", "keep_checkpoints", "threads",
                     "interleaved_images", "n_latents", "resampler_layers", "xattn_every", "n_query"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vlm train {name}={getattr(self, name)} must be >= 1")
        if self.arch == "blip2" and not 2 <= self.stage1_batch <= 24:
            raise ConfigError("vlm train stage1_batch must lie in [2, 24]: ITC needs distinct captions")
        if not 0.0 <= self.answer_alpha <= 1.0:
            raise ConfigError(
                f"vlm train answer_alpha={self.answer_alpha} must lie in [0, 1] (1 = natural frequencies)"
            )
        if self.lr <= 0 or self.warmup < 0:
            raise ConfigError(f"vlm train lr={self.lr}, warmup={self.warmup}: need lr > 0 and warmup >= 0")

    @property
    def total_steps(self) -> int:
        return self.steps + (self.stage1_steps if self.arch == "blip2" else 0)

    def bridge_config(self, lm_vocab: int) -> dict:
        d_visual = vision_spec(self.vision).d_visual
        if self.arch == "flamingo":
            return FlamingoConfig(d_visual=d_visual, n_latents=self.n_latents, resampler_layers=self.resampler_layers,
                                  resampler_dim=self.resampler_dim, resampler_heads=4, resampler_head_dim=64,
                                  xattn_every=self.xattn_every, ff_mult=self.ff_mult).to_dict()
        heads = max(1, self.qformer_dim // 64)
        qc = QFormerConfig(d_model=self.qformer_dim, n_layer=self.qformer_layers, n_head=heads,
                           d_ff=4 * self.qformer_dim, n_query=self.n_query, d_visual=d_visual,
                           vocab_size=lm_vocab + 2, max_text=64)  # + [CLS], [DEC]
        return Blip2Config(qformer=qc, embed_dim=128).to_dict()


def _optimizer(tc: VLMTrainConfig, bridge: nn.Module) -> torch.optim.Optimizer:
    """AdamW; decay only matrices outside the resampler (Flamingo App. B.1.2: no decay on
    the Perceiver Resampler), never gains, biases, gates, queries or token rows.

    Flamingo's tanh gates get `gate_lr_mult` x the learning rate: Adam moves a scalar by at
    most ~lr per step, so at 1e-3 the gates sit near |0.03| after a few hundred steps (we
    measured it) and the frozen LM barely hears the image; the paper had 500k steps."""
    wd = tc.weight_decay if tc.weight_decay >= 0 else (0.1 if tc.arch == "flamingo" else 0.05)
    decay, rest, gates = [], [], []
    for name, p in bridge.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("_gate"):
            gates.append(p)
            continue
        no = p.ndim < 2 or "emb" in name or "query_tokens" in name or name.startswith("resampler.")
        (rest if no else decay).append(p)
    betas = (0.9, 0.999) if tc.arch == "flamingo" else (0.9, 0.98)
    groups = [{"params": decay, "weight_decay": wd, "lr_mult": 1.0},
              {"params": rest, "weight_decay": 0.0, "lr_mult": 1.0},
              {"params": gates, "weight_decay": 0.0, "lr_mult": tc.gate_lr_mult}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=betas, fused=False)


def _lr(tc: VLMTrainConfig, step: int) -> float:
    if tc.arch == "blip2" and step <= tc.stage1_steps:
        return lr_at(step, kind="cosine", peak=tc.stage1_lr, warmup=min(tc.warmup, tc.stage1_steps - 1),
                     total=max(tc.stage1_steps, 1))
    s = step - (tc.stage1_steps if tc.arch == "blip2" else 0)
    return lr_at(s, kind=tc.schedule, peak=tc.lr, warmup=min(tc.warmup, tc.steps - 1), total=tc.steps)


def flamingo_step(model, train: D.VQAData, fmt: D.Formatter, tc: VLMTrainConfig, g: torch.Generator) -> dict:
    """Forward/backward each dataset's batch; the gradients add up (weighted sum of losses)."""
    plan = [("vqa", tc.vqa_weight, lambda: D.flamingo_vqa_batch(train, fmt, tc.vqa_batch, g, tc.answer_alpha)),
            ("caption", tc.caption_weight, lambda: D.flamingo_caption_batch(train, fmt, tc.caption_batch, g)),
            ("interleaved", tc.interleaved_weight,
             lambda: D.flamingo_interleaved_batch(train, fmt, tc.interleaved_batch, tc.interleaved_images, g,
                                          tc.answer_alpha))]
    out, total = {}, 0.0
    for name, weight, make in plan:
        if weight <= 0 or (name == "caption" and tc.caption_batch < 1) or (
                name == "interleaved" and tc.interleaved_batch < 1):
            continue
        b = make()
        at = b.targets != -100  # (B, T)
        logits = model(b.tokens, D.media_for(train, b.image_ids), logits_at=at)  # (N, V + 2)
        loss = F.cross_entropy(logits.float(), b.targets[at])  # (,)
        (weight * loss).backward()
        out[f"loss_{name}"] = loss.item()
        total += weight * loss.item()
    out["loss"] = total
    return out


def blip2_step(bridge, train: D.VQAData, fmt: D.Formatter, tc: VLMTrainConfig, step: int, g: torch.Generator) -> dict:
    if step <= tc.stage1_steps:
        imgs = D.sample_images(train, tc.stage1_batch, g, distinct_captions=True)
        text, mask = D.caption_text_batch(train, fmt, imgs)
        losses = bridge.stage1(train.features.get(imgs), text, mask)
        losses.total.backward()
        return {"stage": 1, "loss": losses.total.item(), "loss_itc": losses.itc.item(),
                "loss_itm": losses.itm.item(), "loss_itg": losses.itg.item()}
    n_cap = tc.caption_batch if tc.caption_weight > 0 else 0
    b = D.blip_stage2_batch(train, fmt, tc.vqa_batch, n_cap, g, tc.answer_alpha)
    feats = train.features.get([r[0] for r in b.image_ids])  # (B, N, D)
    at = b.targets != -100  # (B, T)
    logits = bridge.model(feats, b.tokens, logits_at=at)  # (N, V)
    loss = F.cross_entropy(logits.float(), b.targets[at])
    loss.backward()
    return {"stage": 2, "loss": loss.item()}


@torch.no_grad()
def quick_accuracy(vlm: VLM, data: D.VQAData, questions: list) -> float:
    """0-shot ranked accuracy over the closed answer set (cheap: a validation signal)."""
    cands = [vlm.fmt.answer(a) for a in data.answers]
    right = 0
    for q in questions:
        f = data.features.get([q.image_id])  # (1, N, D)
        prompt, media = vlm._prompt(vlm.fmt.question(q.text), f)
        scores = vlm.rank(vlm.prefix_batch(prompt[:1], media), [prompt[1:]], cands)
        right += data.answers[int(scores[0].argmax())] == q.answer
    return right / max(len(questions), 1)


class BridgeTrainer:
    """A septet.train.run trainer for a Flamingo or BLIP-2 bridge: only the bridge (and the
    feature statistics it was trained with) is checkpointed."""

    def __init__(self, tc: VLMTrainConfig, vlm: VLM, train: D.VQAData, val: D.VQAData, config: dict,
                 extra: dict[str, torch.Tensor]):
        self.tc, self.vlm, self.bridge, self.train, self.val = tc, vlm, vlm.bridge, train, val
        self.config, self.extra = config, extra
        self.opt = _optimizer(tc, self.bridge)
        self.batches = SeededDraws(tc.seed)
        self.val_qs = D.sample_questions(val, tc.eval_questions, torch.Generator().manual_seed(1234))
        opts = LoopOptions(out=Path(tc.out), steps=tc.total_steps, eval_every=tc.eval_every, ckpt_every=tc.ckpt_every,
                           keep_checkpoints=tc.keep_checkpoints, progress=tc.progress, desc=f"vlm train {tc.arch}",
                           show=("loss", "val_acc"))
        self.loop = TrainingLoop(self, opts, config=tc, resume_from=resume_point(tc.out, tc.resume, required=False))

    def weights(self) -> dict[str, torch.Tensor]:
        return {**self.bridge.bridge_state_dict(), **self.extra}

    def snapshot(self) -> Snapshot:
        return Snapshot(model=self.weights(), config=self.config, optimizer=self.opt.state_dict(),
                        state={"seed": self.tc.seed})

    def restore(self, ckpt: Checkpoint) -> None:
        check_same_config(ckpt, self.config)
        self.bridge.load_bridge_state_dict({k: v for k, v in ckpt.model_state.items() if k not in self.extra})
        self.opt.load_state_dict(ckpt.optimizer_state)

    def train_step(self) -> dict:
        tc, step = self.tc, self.loop.step + 1
        lr = _lr(tc, step)
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        g = self.batches.next_generator()
        self.opt.zero_grad(set_to_none=True)
        if tc.arch == "flamingo":
            row = flamingo_step(self.bridge, self.train, self.vlm.fmt, tc, g)
        else:
            row = blip2_step(self.bridge, self.train, self.vlm.fmt, tc, step, g)
        params = [p for p in self.bridge.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip).item() if params else 0.0
        self.opt.step()
        if tc.arch == "blip2" and step == tc.stage1_steps:
            # stage 2 goes on training the Q-Former for the LM only, which un-aligns the ITC /
            # ITM heads; BLIP-2 retrieves with the stage-1 model (§4.4), so keep it
            save_checkpoint(Path(tc.out) / STAGE1_DIR, model_state=self.weights(), config=self.config,
                            tokenizer_json=None)
        return {**row, "lr": lr, "grad_norm": grad_norm}

    def evaluate(self) -> dict:
        generative = self.tc.arch == "flamingo" or self.loop.step > self.tc.stage1_steps
        if not (generative and self.val_qs):
            return {}
        self.bridge.eval()
        acc = quick_accuracy(self.vlm, self.val, self.val_qs)
        self.bridge.train()
        return {"val_acc": acc}


def train_vlm(tc: VLMTrainConfig, *, train: D.VQAData | None = None, val: D.VQAData | None = None,
              lm=None) -> dict:
    """Train (or resume) a bridge; returns a summary. `train`/`val`/`lm` default to easy-VQA
    train/test with cached features and `septet.load(tc.lm)`; tests pass tiny ones."""
    tc.validate()
    deterministic_training()  # before features and models: MKL reads its mode at its first call
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    if lm is None:
        from septet.api import load

        lm = load(tc.lm)
    if lm.tokenizer is None:
        raise ConfigError(f"--lm {tc.lm}: the frozen LM needs a tokenizer (a preset has none); use smollm2")
    train = train or D.load_easyvqa("train")
    val = val or D.load_easyvqa("test")
    norm = D.feature_stats(train) if tc.standardize_features else None
    bridge_cfg = tc.bridge_config(lm.model.config.vocab_size)
    bridge = build_bridge(tc.arch, bridge_cfg, lm.model)
    vlm = VLM(tc.arch, bridge, lm.tokenizer, eos_id=eos_id_of(lm), vision=tc.vision, feature_norm=norm)
    config = {"family": FAMILY, "arch": tc.arch, "lm": tc.lm, "vision": tc.vision, "bridge": bridge_cfg,
              "feature_norm": norm is not None}
    extra = {} if norm is None else {NORM_MEAN: norm[0], NORM_STD: norm[1]}
    trainer = BridgeTrainer(tc, vlm, vlm.view(train), vlm.view(val), config, extra)
    bridge.train()
    last = trainer.loop.fit()
    bridge.eval()
    return {"arch": tc.arch, "steps": trainer.loop.step, "loss": last.get("loss", math.nan),
            "val_acc": last.get("val_acc"), "val_questions": len(trainer.val_qs),
            "checkpoint": str(trainer.loop.last_checkpoint), "metrics": str(Path(tc.out) / "metrics.jsonl"),
            "trainable_parameters": sum(p.numel() for p in bridge.trainable_parameters())}


__all__ = ["STAGE1_DIR", "BridgeTrainer", "VLMTrainConfig", "blip2_step", "flamingo_step", "quick_accuracy",
           "train_vlm"]
