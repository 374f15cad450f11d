"""The vision-language verbs: `septet vlm train`, `septet vqa`, `septet caption`, `septet train-clip`."""

from __future__ import annotations

import argparse
from typing import Callable


def add_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Register this package's verbs with the main parser (see septet.cli.build_parser)."""
    _add_train_clip(verb)
    _add_vlm(verb)


# VLMTrainConfig fields settable from the command line (None = the dataclass default)
TRAIN_FLAGS = {
    "steps": int, "stage1_steps": int, "lr": float, "stage1_lr": float, "warmup": int, "schedule": str,
    "weight_decay": float, "seed": int, "vqa_batch": int, "caption_batch": int, "interleaved_batch": int,
    "interleaved_images": int, "answer_alpha": float, "vqa_weight": float, "caption_weight": float, "interleaved_weight": float,
    "stage1_batch": int, "n_latents": int, "resampler_layers": int, "resampler_dim": int, "xattn_every": int,
    "ff_mult": int, "gate_lr_mult": float, "qformer_dim": int, "qformer_layers": int, "n_query": int, "eval_every": int,
    "eval_questions": int, "ckpt_every": int, "threads": int,
}


def _add_vlm(verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb("vlm", _cmd_vlm, "vision-language models: `septet vlm train --arch flamingo|blip2`")
    sub = p.add_subparsers(dest="vlm_verb", required=True, metavar="VERB")
    t = sub.add_parser("train", help="train a Flamingo or BLIP-2 bridge on easy-VQA (resumable)")
    t.add_argument("--arch", required=True, choices=["flamingo", "blip2"])
    t.add_argument("--lm", default="smollm2-135m-instruct", help="the frozen LM (asset name or checkpoint)")
    t.add_argument("--vision", default="efficientnet-lite0", help="the frozen image encoder")
    t.add_argument("--out", default=None, help="run directory (default runs/ARCH)")
    for name, kind in TRAIN_FLAGS.items():
        t.add_argument("--" + name.replace("_", "-"), type=kind, default=None, metavar=kind.__name__.upper(),
                       help="default: septet.vlm.train.VLMTrainConfig")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true", help="machine-readable output")

    q = verb("vqa", _cmd_vqa, "ask a trained VLM a question about an image (PNG/JPEG, any size)")
    q.add_argument("--model", required=True, help="a VLM checkpoint or run directory from `septet vlm train`")
    q.add_argument("--image", required=True)
    q.add_argument("--question", required=True)
    q.add_argument("--choices", default=None, help="comma-separated answers to rank instead of generating")
    q.add_argument("--beams", type=int, default=None, help="default: Flamingo 3, BLIP-2 5 (the papers')")

    c = verb("caption", _cmd_caption, "caption an image with a trained VLM")
    c.add_argument("--model", required=True, help="a VLM checkpoint or run directory from `septet vlm train`")
    c.add_argument("--image", required=True)
    c.add_argument("--beams", type=int, default=None)


def _cmd_vlm(args: argparse.Namespace):
    from .commands import cmd_vlm_train

    return cmd_vlm_train(args)


def _cmd_vqa(args: argparse.Namespace):
    from .commands import cmd_vqa

    return cmd_vqa(args)


def _cmd_caption(args: argparse.Namespace):
    from .commands import cmd_caption

    return cmd_caption(args)


def _add_train_clip(verb: Callable[..., argparse.ArgumentParser]) -> None:
    # unset flags (None) keep the defaults of septet.vlm.clip_train.CLIPTrainConfig, which
    # is imported only when the verb runs: building the parser must not import torch
    p = verb("train-clip", _cmd_train_clip,
             "contrastive (CLIP) pretraining of a small ViT + text encoder on easy-VQA captions (resumable)")
    p.add_argument("--out", default=None, help="run directory (default runs/clip-easyvqa)")
    p.add_argument("--steps", type=int, default=None, help="default 2000")
    p.add_argument("--batch-size", type=int, default=None, help="default 128")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, default 5e-4")
    p.add_argument("--warmup", type=int, default=None, help="default 100")
    p.add_argument("--weight-decay", type=float, default=None, help="default 0.2 (CLIP)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--train-images", type=int, default=None, help="use the first N train images (default: all)")
    p.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N test images (default: all)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                   help="a model size, e.g. --set vit_layers=6 (image_size, patch_size, vit_layers, vit_dim, "
                        "vit_heads, text_layers, text_dim, text_heads, embed_dim)")
    p.add_argument("--no-progress", action="store_true")


def _cmd_train_clip(args: argparse.Namespace):
    from .clip_train import cmd_train_clip

    return cmd_train_clip(args)
