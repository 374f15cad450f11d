"""The `septet eval` verb: few-shot evaluation of any septet model, written as a results
JSON, a markdown table and a plot of each task's metric against the number of shots."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import is_dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError


def evaluate_task(task, scorer, shots: int, *, limit: int | None, seed: int | None, mode: str | None,
                  progress: Callable[[int], None] | None, lm=None):
    """Rows of one task object at one shot count. A task type other than the two built in
    can join by having `evaluate(scorer, shots, limit=, seed=, progress=) -> list[Row]` and
    `n_units(shots, limit) -> int`; one that decodes with the model itself (chain of thought,
    HumanEval: see registry_tasks) sets `wants_model = True` and gets the LoadedModel `lm`
    in place of the scorer. An optional `max_shots` caps the shot counts it is run at."""
    from . import bigbench, fewshot
    from .tasks import Task

    if getattr(task, "wants_model", False):
        return task.evaluate(lm, shots, limit=limit, seed=seed, progress=progress)

    if isinstance(task, Task):
        return fewshot.evaluate(task, scorer, shots, seed=1234 if seed is None else seed, limit=limit,
                                mode=mode, progress=progress)
    if isinstance(task, bigbench.BigBenchTask):
        return bigbench.evaluate(task, scorer, shots, limit=limit,
                                 seed=bigbench.SEED if seed is None else seed, progress=progress)
    return task.evaluate(scorer, shots, limit=limit, seed=seed, progress=progress)


def task_units(task, shots: int, limit: int | None, seed: int | None) -> int:
    from . import bigbench, fewshot
    from .tasks import Task

    if isinstance(task, Task):
        return fewshot.n_units(task, limit)
    if isinstance(task, bigbench.BigBenchTask):
        return bigbench.n_units(task, shots, limit, bigbench.SEED if seed is None else seed)
    return task.n_units(shots, limit)


def task_label(spec: str, task) -> str:
    return getattr(task, "label", None) or getattr(task, "name", None) or spec


def cmd_eval(args: argparse.Namespace) -> Any:
    from tqdm import tqdm

    from ..api import load
    from ..vlm.eval_task import cmd_eval_vlm, is_vlm_model  # a VLM checkpoint is not an LM: its own path
    from .catalog import get_task
    from .report import markdown_table, results_json, write_report
    from .scoring import Scorer
    from .tasks import parse_shots
    if is_vlm_model(args.model):
        return cmd_eval_vlm(args)
    shots = parse_shots(args.shots)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    specs = [s.strip() for s in args.task.split(",") if s.strip()]
    if not specs:
        raise InputError("--task is empty; name a task, e.g. bigbench:cause_and_effect")
    if args.bigbench_dir is not None:  # fills the cache from it, if PyPI and GitHub are unreachable
        if not any(s.startswith("bigbench:") for s in specs):
            raise InputError("--bigbench-dir applies to bigbench:NAME tasks only; drop it or add such a task")
        from .. import assets

        assets.fetch("bigbench", local_dir=args.bigbench_dir, quiet=args.json)
    tasks = [(spec, get_task(spec)) for spec in specs]  # fail on a bad task before loading the model
    if args.calculator:
        if not any(hasattr(t, "with_calculator") for _, t in tasks):
            raise InputError("--calculator applies to chain-of-thought tasks only "
                             "(gsm8k-cot:PATH, mmlu-cot); drop it or add such a task")
        tasks = [(spec, t.with_calculator() if hasattr(t, "with_calculator") else t) for spec, t in tasks]
    if args.compile:  # tasks that decode with the model themselves (chain of thought) take it too
        tasks = [(spec, replace(t, compile=True) if hasattr(t, "compile") and is_dataclass(t) else t)
                 for spec, t in tasks]
    notes = []
    plan = []  # (spec, task, the shot counts it runs at)
    for spec, task in tasks:
        cap = getattr(task, "max_shots", None)
        ks = [k for k in shots if cap is None or k <= cap]
        if len(ks) < len(shots):  # e.g. HumanEval: the prompt is the function, 0-shot only
            skipped = ",".join(str(k) for k in shots if k not in ks)
            why = "is 0-shot only" if cap == 0 else f"allows at most {cap} shots"
            notes.append(f"{task_label(spec, task)} {why}; skipping --shots {skipped}")
        if ks:
            plan.append((spec, task, ks))
    if not plan:
        raise InputError(f"--shots {args.shots}: no task allows these shot counts; " + "; ".join(notes))
    total = sum(task_units(t, k, args.limit, args.seed) for _, t, ks in plan for k in ks)
    lm = load(args.model, dtype=args.dtype, device=args.device)
    if lm.tokenizer is None:
        raise InputError(f"--model {args.model}: a preset has random weights and no tokenizer; pass a "
                         "checkpoint directory from `septet train` or a model like smollm2")
    scorer = Scorer.from_loaded(lm, batch_size=args.batch_size, compile=args.compile)
    rows = []
    started = time.time()
    bar = tqdm(total=total, unit="req", desc="eval", disable=args.json or args.no_progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for spec, task, ks in plan:
                for k in ks:
                    bar.set_description(f"{task_label(spec, task)} {k}-shot")
                    rows += evaluate_task(task, scorer, k, limit=args.limit, seed=args.seed,
                                          mode=args.mode, progress=bar.update, lm=lm)
    finally:
        bar.close()
    notes += [str(w.message) for w in caught]  # reduced shots and the like, kept in the results
    if not args.json:
        for note in notes:
            print(f"septet: warning: {note}", file=sys.stderr)
    meta = {"model": lm.name or args.model, "model_arg": args.model, "tasks": specs, "shots": shots,
            "limit": args.limit, "seed": args.seed, "dtype": args.dtype,
            "seconds": round(time.time() - started, 1), "warnings": notes}
    out = Path(args.out) if args.out else Path("eval_results") / _safe(lm.name or args.model)
    paths = write_report(out, rows, meta)
    if args.json:
        return {**results_json(rows, meta), "files": {k: str(v) for k, v in paths.items()}}
    print(markdown_table(rows), end="")
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return None


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "model"


def _registry_flags(p: argparse.ArgumentParser) -> None:
    from ..api import DTYPES
    from .metrics import MC_MODES

    p.add_argument("--mode", choices=MC_MODES, default=None,
                   help="multiple-choice scoring for JSONL tasks (default: the task's, else per-token)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")


def add_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Register this package's verbs with the main parser (see septet.cli.build_parser)."""
    e = verb("eval", cmd_eval, "evaluate a model few-shot (GPT-3 protocol, BIG-bench, JSONL tasks)")
    e.add_argument("--model", required=True, help="asset name (smollm2), checkpoint or run dir, HF/Meta dir, .gguf")
    e.add_argument("--task", required=True,
                   help="bigbench:NAME[/SUBTASK], a task.json, a .jsonl file, humaneval, "
                        "gsm8k-cot:PROBLEMS.jsonl, mmlu-cot[:SUBJECT]; comma-separated for several")
    e.add_argument("--bigbench-dir", default=None, metavar="DIR",
                   help="a directory holding BIG-bench's benchmark_tasks (or a checkout above it), used when "
                        "the bigbench asset is not cached and PyPI and GitHub are unreachable "
                        "(default: $SEPTET_BIGBENCH_DIR)")
    e.add_argument("--shots", default="0", help="comma-separated demonstration counts, e.g. 0,1,5")
    e.add_argument("--limit", type=int, default=None, help="evaluate at most N items per task (per shot count)")
    e.add_argument("--seed", type=int, default=None,
                   help="seed of the demonstration draws (default: BIG-bench's 42 for BIG-bench, 1234 otherwise)")
    e.add_argument("--out", default=None, help="directory for results.json/.md/.png (default eval_results/MODEL)")
    e.defer(_registry_flags)  # their choices come from modules that import torch
    e.add_argument("--calculator", action="store_true",
                   help="chain-of-thought tasks: compute 'a op b =' spans while decoding (PaLM)")
    e.add_argument("--batch-size", type=int, default=32, help="continuations scored per forward pass")
    e.add_argument("--compile", action="store_true",
                   help="greedy generation through the compiled static decode step (same tokens, faster)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--no-progress", action="store_true")
