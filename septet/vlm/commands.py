"""The bodies of `septet vlm train`, `septet vqa` and `septet caption` (septet.vlm.cli only
declares their flags, so building the parser never imports torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from septet.errors import InputError


def vlm_train_config(args: argparse.Namespace):
    """The VLMTrainConfig that `septet vlm train` flags describe: one flag per field
    (septet.vlm.cli), --out defaulting to runs/ARCH and --json turning the progress bar off."""
    from septet import options

    from .train import VLMTrainConfig

    return options.build(VLMTrainConfig, args, out=Path(args.out or f"runs/{args.arch}"),
                         progress=args.progress and not args.json)


def cmd_vlm_train(args: argparse.Namespace) -> dict | None:
    from .train import train_vlm

    tc = vlm_train_config(args)
    summary = train_vlm(tc)
    if args.json:
        return summary
    acc = "" if summary["val_acc"] is None else (f"; 0-shot ranked accuracy on {summary['val_questions']} "
                                                  f"test questions {summary['val_acc']:.1%}")
    print(f"done: {summary['arch']} {summary['steps']} steps, loss {summary['loss']:.4f}{acc}; "
          f"checkpoint {summary['checkpoint']}")
    return None


def _load(args: argparse.Namespace):
    from .infer import load_vlm

    if not Path(args.model).exists():
        raise InputError(f"--model {args.model} does not exist; pass a directory from `septet vlm train --out`")
    from septet.data.images import load_image

    load_image(args.image)  # a non-image file fails here, in one line, before the LM loads
    vlm = load_vlm(args.model)
    if args.beams is not None and args.beams < 1:
        raise InputError(f"--beams must be >= 1, got {args.beams}")
    return vlm, vlm.encode_image(args.image)


def cmd_vqa(args: argparse.Namespace) -> dict | None:
    if not args.question.strip():
        raise InputError("--question is empty; ask something, e.g. 'what color is the shape?'")
    vlm, features = _load(args)
    choices = [c.strip() for c in args.choices.split(",") if c.strip()] if args.choices else None
    answer = vlm.answer(features, args.question.strip(), beams=args.beams, choices=choices)
    if args.json:
        return {"image": args.image, "question": args.question, "answer": answer}
    print(answer)
    return None


def cmd_caption(args: argparse.Namespace) -> dict | None:
    vlm, features = _load(args)
    text = vlm.caption(features, beams=args.beams)
    if args.json:
        return {"image": args.image, "caption": text}
    print(text)
    return None
