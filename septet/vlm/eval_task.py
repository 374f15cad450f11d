"""`septet eval --model VLM_CKPT --task easy-vqa --shots 0,4,8,32`.

The task is registered with septet.eval like any other, but a VLM checkpoint is not an LM
the eval CLI can load, so `septet eval` hands VLM checkpoints to `cmd_eval_vlm` here
(detected by config.json's family). It reports, per shot count, Flamingo's ranked accuracy
with random and RICES support (0 shots: also free generation), BLIP-2's zero-shot accuracy,
and the majority-answer and text-only baselines on the same questions; the report files are
the usual results.json / results.md / results.png of septet.eval.report.

`--task easy-vqa-retrieval` (BLIP-2 only) reports image -> text and text -> image recall
over the same test images and their captions, ranked by ITC and re-ranked by ITM
(septet.vlm.retrieval), with the run's stage-1 bridge (`RUN/stage1`), as BLIP-2 retrieves
with its first-stage model (§4.4): stage 2 trains the Q-Former for the LM alone.

`--limit N` evaluates N random test images with all their questions (default 55 images,
about 530 questions); `--seed` picks them and the random support sets.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from septet.errors import InputError
from septet.eval.tasks import register_task

TASK = "easy-vqa"
RETRIEVAL = "easy-vqa-retrieval"


class EasyVQATask:
    """What `--task easy-vqa` resolves to. Only VLM checkpoints can run it."""

    name = label = TASK
    wants_model = True

    def n_units(self, shots: int, limit: int | None) -> int:
        return 0

    def evaluate(self, lm, shots: int, *, limit=None, seed=None, progress=None):
        raise InputError("--task easy-vqa needs a vision-language checkpoint from `septet vlm train` as --model")


register_task(TASK, EasyVQATask, "easy-VQA accuracy of a VLM checkpoint (Flamingo k-shot, BLIP-2 0-shot) "
                                 "with majority and text-only baselines")


class EasyVQARetrievalTask(EasyVQATask):
    name = label = RETRIEVAL

    def evaluate(self, lm, shots: int, *, limit=None, seed=None, progress=None):
        raise InputError(
            f"--task {RETRIEVAL} needs a BLIP-2 checkpoint from `septet vlm train --arch blip2` as --model"
        )


register_task(RETRIEVAL, EasyVQARetrievalTask, "image-text retrieval recall of a BLIP-2 checkpoint on easy-VQA "
                                               "(ITC, then ITM re-ranking)")


def stage1_checkpoint(model: str) -> tuple[Path, str | None]:
    """The checkpoint BLIP-2 retrieves with: the run's stage-1 bridge when there is one
    (RUN/stage1, or next to a step-* checkpoint), else `model` itself with a note."""
    from .train import STAGE1_DIR

    p = Path(model)
    for cand in (p / STAGE1_DIR, p.parent / STAGE1_DIR):
        if (cand / "config.json").is_file():
            return cand, None
    return p, (f"{model} has no {STAGE1_DIR}/ checkpoint next to it; retrieving with its own ITC / ITM heads, "
               "which stage-2 training (if any) has drifted from")


def is_vlm_model(model: str) -> bool:
    from .infer import is_vlm_checkpoint

    return Path(model).exists() and is_vlm_checkpoint(model)


def _row(task: str, shots: int, metric: str, value: float, n: int, primary: bool = False, notes=None):
    from septet.eval.report import Row

    stderr = math.sqrt(value * (1 - value) / n) if n else float("nan")  # binomial
    return Row(task, shots, metric, value, n, stderr, primary, dict(notes or {}))


def cmd_eval_vlm(args: argparse.Namespace):
    """`septet eval` on a VLM checkpoint (same flags; see the module docstring)."""
    from septet.eval.report import markdown_table, results_json, write_report
    from septet.eval.tasks import parse_shots

    from . import data as D
    from .evaluate import EvalConfig
    from .infer import load_vlm

    specs = [s.strip() for s in args.task.split(",") if s.strip()]
    if not specs or set(specs) - {TASK, RETRIEVAL}:
        raise InputError(f"--model {args.model} is a vision-language checkpoint; the tasks it runs are "
                         f"{TASK} and {RETRIEVAL}")
    shots = parse_shots(args.shots)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    ec = EvalConfig(shots=tuple(shots), images=args.limit or EvalConfig.images,
                    seed=0 if args.seed is None else args.seed)
    from septet.api import load, resolve_checkpoint
    from septet.checkpoints.native import load_checkpoint

    lm_name = load_checkpoint(resolve_checkpoint(args.model)).config["lm"]
    loaded = load(lm_name)
    vlm = load_vlm(args.model, lm=loaded)
    notes = []
    if vlm.arch != "flamingo" and any(k > 0 for k in shots):
        notes.append("BLIP-2 is evaluated zero-shot only (its soft prompt holds one image); skipping shots > 0")
    if vlm.arch != "blip2" and RETRIEVAL in specs:
        raise InputError(f"--task {RETRIEVAL} needs BLIP-2's ITC / ITM heads; {args.model} is {vlm.arch}")
    say = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    started = time.time()
    rows = []
    if TASK in specs:
        rows += _vqa_rows(vlm, loaded, ec, say)
    if RETRIEVAL in specs:
        from .evaluate import test_subset
        from .retrieval import evaluate_retrieval

        path, note = stage1_checkpoint(args.model)
        if note:
            notes.append(note)
        retriever = vlm if path == Path(args.model) else load_vlm(path, lm=loaded)
        test = retriever.view(D.load_easyvqa("test"))
        for r in evaluate_retrieval(retriever, test, test_subset(test, ec.images, ec.seed)):
            rows.append(_row(RETRIEVAL, 0, r.metric, r.value, r.n, primary=r.metric == "i2t_R@1_itm",
                             notes={"checkpoint": str(path)}))
        say(f"{RETRIEVAL}: " + ", ".join(f"{r.metric} {r.value:.1%}" for r in rows if r.task == RETRIEVAL))
    meta = {"model": str(args.model), "arch": vlm.arch, "lm": lm_name, "tasks": specs, "shots": shots,
            "test_images": ec.images, "seed": ec.seed, "seconds": round(time.time() - started, 1), "warnings": notes}
    out = Path(args.out) if args.out else Path("eval_results") / f"{vlm.arch}-{'-'.join(specs)}"
    paths = write_report(out, rows, meta)
    if args.json:
        return {**results_json(rows, meta), "files": {k: str(v) for k, v in paths.items()}}
    for note in notes:
        print(f"septet: warning: {note}", file=sys.stderr)
    print(markdown_table(rows), end="")
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return None


def _vqa_rows(vlm, loaded, ec, say) -> list:
    from . import data as D
    from .evaluate import baselines, evaluate_vlm
    from .infer import eos_id_of

    test, train = vlm.view(D.load_easyvqa("test")), vlm.view(D.load_easyvqa("train"))
    rows = []
    for r in evaluate_vlm(vlm, test, train, ec, progress=say):
        how = r.name.split()[-1] if r.name.endswith(("random", "rices")) else ""
        rows.append(_row(TASK, r.shots, "acc_ranked" + (f"_{how}" if how else ""), r.ranked, r.n,
                         primary=how in ("", "rices")))
        if r.generated is not None:
            rows.append(_row(TASK, r.shots, "acc_generated", r.generated, r.n_generated))
    for b in baselines(loaded.model, loaded.tokenizer, eos_id_of(loaded), train, test, ec):
        rows.append(_row(f"{TASK} baseline: {b.name}", 0, "acc", b.ranked, b.n))
    return rows


__all__ = ["EasyVQARetrievalTask", "EasyVQATask", "RETRIEVAL", "TASK", "cmd_eval_vlm", "is_vlm_model",
           "stage1_checkpoint"]
