"""The vision-language verbs: `septet vlm train`, `septet vqa`, `septet caption`, `septet train-clip`."""

from __future__ import annotations

import argparse
from typing import Callable


def add_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Register this package's verbs with the main parser (see septet.cli.build_parser)."""
    _add_train_clip(verb)
    _add_vlm(verb)


def _add_vlm(verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb("vlm", _cmd_vlm, "vision-language models: `septet vlm train --arch flamingo|blip2`")
    sub = p.add_subparsers(dest="vlm_verb", required=True, metavar="VERB")
    t = sub.add_parser("train", help="train a Flamingo or BLIP-2 bridge on easy-VQA (resumable)")
    t.defer(_vlm_train_flags)
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


def _vlm_train_flags(p: argparse.ArgumentParser) -> None:
    """`septet vlm train`'s flags: one per VLMTrainConfig field (septet.options)."""
    from septet import options
    from septet.train.schedules import KINDS

    from .infer import ARCHS
    from .train import VLMTrainConfig

    options.add_flags(p, VLMTrainConfig, choices={"arch": ARCHS, "schedule": KINDS}, flags={
        "arch": options.Flag(required=True),
        "lm": options.Flag(help="the frozen LM (asset name or checkpoint)"),
        "vision": options.Flag(help="the frozen image encoder"),
        "out": options.Flag(default=None, help="run directory (default runs/ARCH)"),
        "resume": options.Flag(help="continue from the newest checkpoint in --out"),
    })


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
    # the flags come from septet.vlm.clip_train.CLIPTrainConfig, imported (with torch) only
    # when this verb is parsed: `septet --help` and the other verbs must not import torch
    p = verb("train-clip", _cmd_train_clip,
             "contrastive (CLIP) pretraining of a small ViT + text encoder on easy-VQA captions (resumable)")
    p.defer(_train_clip_flags)


def _train_clip_flags(p: argparse.ArgumentParser) -> None:
    """`septet train-clip`'s flags: one per CLIPTrainConfig field, and --set for the model sizes."""
    from septet import options

    from .clip_train import SIZE_FIELDS, CLIPTrainConfig

    options.add_flags(p, CLIPTrainConfig, flags={
        "lr": options.Flag(help="peak learning rate"),
        "weight_decay": options.Flag(help="CLIP's"),
        "train_images": options.Flag(help="use the first N train images (0: all)"),
        "eval_images": options.Flag(help="evaluate on the first N test images (0: all)"),
        "resume": options.Flag(help="continue from the newest checkpoint in --out"),
    })
    p.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                   help=f"a model size, e.g. --set vit_layers=6 ({', '.join(SIZE_FIELDS)}); "
                        "the same as --vit-layers 6")


def _cmd_train_clip(args: argparse.Namespace):
    from .clip_train import cmd_train_clip

    return cmd_train_clip(args)
