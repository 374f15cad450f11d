"""`septet train-clip`: contrastive image-text pretraining of a small ViT and text encoder
on easy-VQA captions, so a vision encoder can be built from nothing, as Flamingo (NFNet,
§3.1 / App. B.1.3) and BLIP-2 (CLIP / EVA ViT) started from contrastive encoders.

Recipe (CLIP §2.5, scaled down): AdamW β = (0.9, 0.98), eps 1e-6, decoupled weight decay
0.2 on matrices only (not gains, biases, embeddings or the temperature), cosine schedule
with linear warmup, gradient clipping at 1.0, symmetric InfoNCE with a learned temperature.

Evaluation on held-out easy-VQA test images: zero-shot classification over the 24
possible captions (image -> text top-1; chance 1/24) and text -> image recall@1 within a
pool of test images (does the nearest image to each caption carry that caption).

Determinism: step k's batch is drawn from a generator seeded by (seed, k), so a resumed
run sees the same batches; septet.train.run brings model, optimizer, data position and RNG
state back from the checkpoint and trims metrics.jsonl to the resumed step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from septet import options
from septet.checkpoints.native import Checkpoint
from septet.data.easyvqa import EasyVQA
from septet.data.images import Preprocess
from septet.errors import ConfigError
from septet.models.clip import CLIP, CLIPConfig, TextConfig, caption_tokenizer, contrastive_loss, encode_texts
from septet.models.vision import ViTConfig
from septet.train.determinism import deterministic_training
from septet.train.optim import build_optimizer
from septet.train.run import LoopOptions, SeededDraws, Snapshot, TrainingLoop, check_same_config, resume_point
from septet.train.schedules import lr_at


@dataclass
class CLIPTrainConfig:
    out: Path = Path("runs/clip-easyvqa")
    steps: int = 2000
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.2
    grad_clip: float = 1.0
    seed: int = 0
    # model
    image_size: int = 64  # easy-VQA's native size
    patch_size: int = 8
    vit_layers: int = 4
    vit_dim: int = 128
    vit_heads: int = 4
    text_layers: int = 2
    text_dim: int = 128
    text_heads: int = 4
    embed_dim: int = 128
    # data: 0 = the whole split
    train_images: int = 0
    eval_images: int = 0
    eval_every: int = 200
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train-clip {name}={getattr(self, name)} must be >= 1")
        if self.batch_size < 2:
            raise ConfigError("train-clip batch_size must be >= 2: the other pairs are the negatives")
        if self.lr <= 0 or self.warmup < 0 or self.warmup >= self.steps:
            raise ConfigError(f"train-clip lr={self.lr}, warmup={self.warmup}: need lr > 0 and 0 <= warmup < steps")

    def model_config(self, vocab_size: int) -> CLIPConfig:
        vision = ViTConfig(image_size=self.image_size, patch_size=self.patch_size, n_layer=self.vit_layers,
                           d_model=self.vit_dim, n_head=self.vit_heads)
        text = TextConfig(vocab_size=vocab_size, context=8, n_layer=self.text_layers, d_model=self.text_dim,
                          n_head=self.text_heads)
        return CLIPConfig(vision=vision, text=text, embed_dim=self.embed_dim)

    def preprocess(self) -> Preprocess:
        # the whole 64 x 64 render (no crop margin: shapes can touch the border), in [-1, 1]
        return Preprocess(size=self.image_size, resize=self.image_size)


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, S, S) normalised
    captions: list[str]
    label: torch.Tensor  # (N,) index of the caption among EasyVQA.all_captions()


def load_split(split: str, n: int, preprocess: Preprocess, root: Path | None = None) -> Split:
    ds = EasyVQA(split, root)  # type: ignore[arg-type]
    ids = ds.image_ids[:n] if n else ds.image_ids
    captions = [ds.caption(i) for i in ids]
    index = {c: k for k, c in enumerate(EasyVQA.all_captions())}
    images = preprocess.batch([ds.image_path(i) for i in ids])
    return Split(images, captions, torch.tensor([index[c] for c in captions]))


@torch.no_grad()
def evaluate(model: CLIP, tokens_all: torch.Tensor, data: Split, batch: int = 256) -> dict[str, float]:
    """i2t_acc: zero-shot top-1 over the 24 captions; t2i_r1: share of the captions present
    in `data` whose nearest image carries them."""
    was_training = model.training
    model.eval()
    img = torch.cat([model.encode_image(data.images[b:b + batch]) for b in range(0, len(data.label), batch)])
    txt = model.encode_text(tokens_all)  # (24, E)
    sim = img @ txt.t()  # (N, 24)
    i2t = (sim.argmax(1) == data.label).float().mean().item()
    present = data.label.unique()
    t2i = (data.label[sim[:, present].argmax(0)] == present).float().mean().item()
    model.train(was_training)
    return {"i2t_acc": i2t, "t2i_r1": t2i, "chance_i2t": 1.0 / tokens_all.shape[0]}


class CLIPTrainer:
    """A septet.train.run trainer: one contrastive step on a random batch of train images."""

    def __init__(self, tc: CLIPTrainConfig, data_root: Path | None = None):
        tc.validate()
        deterministic_training()  # before the model exists: MKL reads its mode at its first call
        torch.manual_seed(tc.seed)
        self.tc = tc
        pre = tc.preprocess()
        self.train = load_split("train", tc.train_images, pre, data_root)
        self.test = load_split("test", tc.eval_images, pre, data_root)
        all_captions = EasyVQA.all_captions()
        self.tok = caption_tokenizer(all_captions)
        self.config = tc.model_config(self.tok.vocab_size)
        self.model = CLIP(self.config, self.tok.eot_id)
        self.tokens_all = encode_texts(self.tok, all_captions, self.config.text.context)  # (24, T)
        self.opt = build_optimizer(self.model, "adamw", tc.lr, tc.weight_decay, betas=(0.9, 0.98), eps=1e-6)
        self.batches = SeededDraws(tc.seed)
        opts = LoopOptions(out=Path(tc.out), steps=tc.steps, eval_every=tc.eval_every, ckpt_every=tc.ckpt_every,
                           keep_checkpoints=tc.keep_checkpoints, progress=tc.progress, desc="train-clip")
        self.loop = TrainingLoop(self, opts, config=tc, resume_from=resume_point(tc.out, tc.resume, required=False))

    def snapshot(self) -> Snapshot:
        return Snapshot(model=self.model.state_dict(), config=self.config.to_dict(), optimizer=self.opt.state_dict(),
                        tokenizer_json=self.tok.to_json_str(), state={"seed": self.tc.seed})

    def restore(self, ckpt: Checkpoint) -> None:
        check_same_config(ckpt, self.config.to_dict(), "model config")
        self.model.load_state_dict(ckpt.model_state)
        self.opt.load_state_dict(ckpt.optimizer_state)

    def train_step(self) -> dict:
        tc = self.tc
        lr = lr_at(self.loop.step + 1, kind="cosine", peak=tc.lr, warmup=tc.warmup, total=tc.steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        n = len(self.train.label)
        idx = torch.randperm(n, generator=self.batches.next_generator())[:min(tc.batch_size, n)]
        labels = self.train.label[idx]
        logits = self.model(self.train.images[idx], self.tokens_all[labels])  # (B, B)
        loss = contrastive_loss(logits, labels[:, None] == labels[None, :])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.step()
        return {"loss": loss.item(), "lr": lr, "temperature": 1.0 / self.model.scale().item()}

    def evaluate(self) -> dict:
        return {f"val_{k}": v for k, v in evaluate(self.model, self.tokens_all, self.test).items()}


def train_clip(tc: CLIPTrainConfig, *, data_root: Path | None = None) -> dict:
    """Train (or resume) and return a summary: final loss, retrieval metrics, checkpoint."""
    trainer = CLIPTrainer(tc, data_root)
    trainer.model.train()
    last = trainer.loop.fit()
    final = evaluate(trainer.model, trainer.tokens_all, trainer.test)
    return {"steps": trainer.loop.step, "loss": last.get("loss", math.nan), **final,
            "checkpoint": str(trainer.loop.last_checkpoint), "metrics": str(Path(tc.out) / "metrics.jsonl"),
            "train_images": len(trainer.train.label), "eval_images": len(trainer.test.label)}


# ---------------------------------------------------------------------------- CLI

SIZE_FIELDS = ("image_size", "patch_size", "vit_layers", "vit_dim", "vit_heads", "text_layers", "text_dim",
               "text_heads", "embed_dim")


def clip_train_config(args) -> CLIPTrainConfig:
    """The CLIPTrainConfig that `septet train-clip` flags describe: one flag per field
    (septet.vlm.cli), --set FIELD=INT for a model size, --json turning the progress bar off."""
    sizes = {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep or key not in SIZE_FIELDS or not value.strip().isdigit():
            raise ConfigError(f"--set {pair!r}: expected FIELD=INT with FIELD one of {', '.join(SIZE_FIELDS)}")
        sizes[key] = int(value)
    return options.build(CLIPTrainConfig, args, progress=args.progress and not args.json, **sizes)


def cmd_train_clip(args) -> dict | None:
    """`septet train-clip` (its flags are declared in septet.vlm.cli, which stays torch-free)."""
    tc = clip_train_config(args)
    summary = train_clip(tc)
    if args.json:
        return summary
    print(f"done: {summary['steps']} steps, loss {summary['loss']:.4f}; held-out zero-shot caption accuracy "
          f"{summary['i2t_acc']:.1%} (chance {summary['chance_i2t']:.1%}), text->image R@1 "
          f"{summary['t2i_r1']:.1%}; checkpoint {summary['checkpoint']}")
    return None


__all__ = ["CLIPTrainConfig", "CLIPTrainer", "SIZE_FIELDS", "Split", "clip_train_config", "cmd_train_clip",
           "evaluate", "load_split", "train_clip"]
