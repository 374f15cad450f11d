"""Check `septet eval --task bigbench:NAME` against BIG-bench's own harness.

BIG-bench's `JsonTask` (bigbench/api/json_task.py from the bigbench==1.0.0 sdist, the
same archive septet's `bigbench` asset comes from) builds the prompts, draws the items and
computes the metrics; septet only supplies log-probabilities (and greedy generations)
through BIG-bench's `bigbench.api.model.Model` interface, from `septet.eval.scoring.Scorer`
with BIG-bench's tokenisation (input and target encoded separately). The same model is
then run through `septet.eval.bigbench.evaluate` (what `septet eval` calls), and the two
are compared: the (prompt, choice) pairs each side scored, item by item, and every metric.

    python tools/bigbench_official.py --model smollm2 --task cause_and_effect,navigate \\
        --shots 0 --limit 40 [--json OUT.json]
    python tools/bigbench_official.py --prompts-only --shots 0,1,3 --limit 40   # every JSON task

`--prompts-only` needs no model: it compares the prompts and choices of every JSON task
(or of `--task`) with a stand-in model that scores nothing.

How the official code is imported (nothing is installed): the harness's Python files are
fetched into `$SEPTET_HOME/assets/bigbench-harness` by septet's own asset fetch, a second
selection of members from the same sources as the `bigbench` asset, tried in the same order:
the pinned bigbench==1.0.0 sdist (sha256-verified), GitHub's archive of google/BIG-bench at
the pinned commit (only with --allow-unverified: its sha256 is not pinned), or a local
BIG-bench checkout (--bigbench-dir / SEPTET_BIGBENCH_DIR naming it, its `bigbench` or its
`bigbench/benchmark_tasks`). They are then put on sys.path. Three of its module-level imports
are heavy packages the JSON-task code path never calls, so they are given stand-ins while
`bigbench` is imported, and removed from sys.modules again afterwards:
- `tensorflow` (json_task, json_utils): only `tf.logging.info` and `tf.io.gfile`
  {isdir, glob, GFile} are used, which the stand-in maps to os / glob / open;
- `t5.evaluation.metrics` (task_metrics): only the bleu / rouge / sequence_f1 metrics use it;
- `datasets.load_metric` (task_metrics): only the bleurt metric uses it.
The stand-ins for the last two raise if called, so a task using those metrics fails
loudly instead of being scored differently. numpy, scipy and scikit-learn are the real ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HARNESS_FILES = (
    "bigbench/__init__.py",
    "bigbench/api/__init__.py",
    "bigbench/api/json_task.py",
    "bigbench/api/json_utils.py",
    "bigbench/api/model.py",
    "bigbench/api/results.py",
    "bigbench/api/task.py",
    "bigbench/api/task_metrics.py",
    "bigbench/benchmark_tasks/__init__.py",
    "bigbench/models/__init__.py",
    "bigbench/models/model_utils.py",
)
HARNESS_MODULES = ("bigbench.api.json_task", "bigbench.api.model", "bigbench.api.task_metrics",
                   "bigbench.api.results", "bigbench.models.model_utils")


# ----------------------------------------------------------------------------- the official code

def harness_asset():
    """The harness's Python files, from the same sources as septet's `bigbench` asset (same
    requirement, sha256, commit and directory option, other members)."""
    from septet import assets

    base = assets.get_asset("bigbench")
    fallbacks = []
    for src in base.fallbacks:
        if isinstance(src, assets.GitHubArchive):
            fallbacks.append(dataclasses.replace(src, members=HARNESS_FILES, strip_prefix="",
                                                 expected_files=len(HARNESS_FILES)))
        elif isinstance(src, assets.LocalDir):  # named: the checkout, its bigbench/ or its benchmark_tasks/
            fallbacks.append(dataclasses.replace(src, what="a BIG-bench checkout (bigbench/api/json_task.py)",
                                                 roots=("", "..", "../.."), members=HARNESS_FILES,
                                                 expected_files=len(HARNESS_FILES)))
    return dataclasses.replace(base, name="bigbench-harness", aliases=(),
                               members=tuple(f"bigbench-1.0.0/{f}" for f in HARNESS_FILES),
                               strip_prefix="bigbench-1.0.0/", expected_files=len(HARNESS_FILES),
                               fallbacks=tuple(fallbacks),
                               description="BIG-bench's evaluation code (json_task.py and what it imports)")


def harness_root(src: str | Path | None = None, *, local_dir: str | Path | None = None,
                 allow_unverified: bool = False) -> Path:
    """A directory holding bigbench/api/json_task.py: `src`, $SEPTET_BIGBENCH_SRC (an
    extracted sdist or a BIG-bench checkout), or the fetched asset."""
    src = src or os.environ.get("SEPTET_BIGBENCH_SRC")
    if src:
        root = Path(src)
        if not (root / "bigbench" / "api" / "json_task.py").is_file():
            raise SystemExit(f"{root}: no bigbench/api/json_task.py there")
        return root
    from septet import assets

    return assets.fetch(harness_asset(), local_dir=local_dir, allow_unverified=allow_unverified)


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def _unavailable(what: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"{what} is a stand-in in tools/bigbench_official.py (the real package "
                                  "is not installed); this metric cannot be checked here")
    return fail


class _GFile:
    """tf.io.gfile.GFile as json_utils uses it: a context manager over open()."""

    def __init__(self, path, mode="r"):
        self._f = open(path, mode)

    def __enter__(self):
        return self._f

    def __exit__(self, *exc):
        self._f.close()

    def read(self, *a):
        return self._f.read(*a)


def _stand_ins() -> dict[str, types.ModuleType]:
    import glob as globmod
    import logging

    log = logging.getLogger("bigbench")
    gfile = types.SimpleNamespace(isdir=os.path.isdir, exists=os.path.exists, glob=globmod.glob, GFile=_GFile)
    tf_api = dict(logging=types.SimpleNamespace(info=log.info, warning=log.warning, error=log.error),
                  io=types.SimpleNamespace(gfile=gfile))
    v1, v2 = _module("tensorflow.compat.v1", **tf_api), _module("tensorflow.compat.v2", **tf_api)
    compat = _module("tensorflow.compat", v1=v1, v2=v2)
    tf = _module("tensorflow", compat=compat, **tf_api)
    metrics = _module("t5.evaluation.metrics", rouge=_unavailable("t5 rouge"), bleu=_unavailable("t5 bleu"),
                      sequence_accuracy=_unavailable("t5 sequence_accuracy"))
    evaluation = _module("t5.evaluation", metrics=metrics)
    t5 = _module("t5", evaluation=evaluation)
    datasets = _module("datasets", load_metric=_unavailable("datasets.load_metric (bleurt)"))
    return {"tensorflow": tf, "tensorflow.compat": compat, "tensorflow.compat.v1": v1,
            "tensorflow.compat.v2": v2, "t5": t5, "t5.evaluation": evaluation,
            "t5.evaluation.metrics": metrics, "datasets": datasets}


@contextlib.contextmanager
def _scoped_stand_ins(root: Path):
    """Stand-ins and the harness on sys.path only while bigbench is being imported."""
    stubs = _stand_ins()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


_HARNESS: types.SimpleNamespace | None = None


def import_harness(src: str | Path | None = None, **fetch_options) -> types.SimpleNamespace:
    """BIG-bench's json_task, model, task_metrics, results and model_utils modules
    (`fetch_options`: harness_root's local_dir, allow_unverified)."""
    global _HARNESS
    if _HARNESS is not None:
        return _HARNESS
    root = harness_root(src, **fetch_options)
    if "bigbench" in sys.modules:
        loaded = Path(getattr(sys.modules["bigbench"], "__file__", "") or "")
        if root.resolve() not in loaded.resolve().parents:
            raise SystemExit(f"another bigbench package is already imported ({loaded})")
    with _scoped_stand_ins(root):
        mods = {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in HARNESS_MODULES}
    _HARNESS = types.SimpleNamespace(root=root, **mods)
    return _HARNESS


# ----------------------------------------------------------------------------- septet as a BIG-bench Model

def septet_model(harness, scorer, *, name: str = "septet", max_new_tokens: int = 64):
    """A `bigbench.api.model.Model` whose log-probabilities and generations are septet's:
    `cond_log_prob` sums token log-probabilities with `Scorer.loglikelihood(boundary="separate")`
    (BIG-bench's HF model tokenises input and target separately), `generate_text` decodes
    greedily with `Scorer.generate_until` (up to `max_new_tokens`, as `septet eval`) and
    post-processes with BIG-bench's own model_utils.postprocess_output. Every call is recorded."""

    class SeptetBigBenchModel(harness.model.Model):
        def __init__(self):
            self.scorer = scorer
            self.scored: list[tuple[str, str]] = []  # every (input, target) pair, in call order
            self.generated: list[tuple[str, str]] = []  # (input, raw generation)

        def cond_log_prob(self, inputs, targets, absolute_normalization=False, batch_size=None):
            single = isinstance(inputs, str)
            ins = [inputs] if single else list(inputs)
            tgts = [targets] if single else list(targets)
            pairs = [(i, t) for i, ts in zip(ins, tgts) for t in ts]
            self.scored += pairs
            scored = self.scorer.loglikelihood(pairs, boundary="separate")
            out, at = [], 0
            for ts in tgts:
                row = [s.logprob for s in scored[at:at + len(ts)]]
                at += len(ts)
                if not absolute_normalization:
                    from scipy.special import logsumexp
                    row = list(np.array(row) - logsumexp(row))
                out.append(row)
            return out[0] if single else out

        def generate_text(self, inputs, max_length=0, stop_string=None, output_regex=None):
            single = isinstance(inputs, str)
            ins = [inputs] if single else list(inputs)
            texts = self.scorer.generate_until(ins, max_new_tokens=max_new_tokens)
            self.generated += list(zip(ins, texts))
            # BIGBenchHFModel's default max_length is 256 (characters after decoding)
            out = harness.model_utils.postprocess_output(texts, max_length or 256, stop_string, output_regex)
            return out[0] if single else out

        def model_data(self):
            model = getattr(scorer, "model", None)
            n = sum(p.numel() for p in model.parameters()) if model is not None else 0
            return harness.model.ModelData(
                model_family="septet", model_name=name, total_params=n, non_embedding_params=n,
                flop_matched_non_embedding_params=n, training_batch_size=0, training_steps=0,
                description="a septet model scored by septet.eval.scoring.Scorer",
                decoding_params={"greedy": True, "max_new_tokens": max_new_tokens})

    return SeptetBigBenchModel()


class RecordingScorer:
    """A Scorer proxy that records what septet's BIG-bench code asks it to score."""

    def __init__(self, scorer):
        self._scorer = scorer
        self.scored: list[tuple[str, str]] = []
        self.generated: list[str] = []

    def __getattr__(self, name):
        return getattr(self._scorer, name)

    def loglikelihood(self, pairs, **kw):
        self.scored += [tuple(p) for p in pairs]
        return self._scorer.loglikelihood(pairs, **kw)

    def generate_until(self, prompts, **kw):
        self.generated += list(prompts)
        return self._scorer.generate_until(prompts, **kw)


# ----------------------------------------------------------------------------- running both

def task_path(spec: str) -> Path:
    from septet import assets

    p = Path(spec)
    if p.is_dir() or p.suffix == ".json":
        return p / "task.json" if p.is_dir() else p
    return assets.fetch("bigbench") / spec / "task.json"


def run_official(harness, path: Path, model, shots: int, limit: int | None, seed: int = 42):
    """JsonTask(path, shot_list=[shots], max_examples=limit).evaluate_model(model): the
    ScoreData list (subtasks, then the aggregate) and the task object."""
    with contextlib.redirect_stdout(sys.stderr):  # it prints progress and duplicate warnings
        task = harness.json_task.JsonTask(str(path), shot_list=[shots], max_examples=limit, random_seed=seed)
        # no log_likelihood scoring of free-form targets: septet does not compute that metric
        scores = task.evaluate_model(model, random_seed=seed, generate_probs_for_targets=False)
    return task, scores


def official_items(harness, task, shots: int) -> list[dict]:
    """Per-item records of an evaluated JsonTask (leaf tasks in order)."""
    leaves = task.subtasks or [task]
    out = []
    for leaf in leaves:
        for s in leaf.shot_examples[shots]:
            item = {"task": leaf.name, "input": leaf.task_prefix + s["input"]}
            if "choice" in s:
                item["choice"] = list(s["choice"])
                if "log_prob" in s:
                    item["log_prob"] = [float(x) for x in s["log_prob"]]
                    pick = s["choice"][int(harness.task_metrics.argmax(s["log_prob"]))]
                    item["grade"] = float(s["target_scores"][pick])
            if "generative_response" in s:
                item["response"] = s["generative_response"]
            out.append(item)
    return out


def run_septet(spec_or_path, scorer, shots: int, limit: int | None):
    from septet.eval import bigbench

    p = Path(spec_or_path)
    task = bigbench.load_bigbench_path(p) if p.exists() else bigbench.load_bigbench(str(spec_or_path))
    rec = RecordingScorer(scorer)
    rows = bigbench.evaluate(task, rec, shots, limit=limit)
    return task, rows, rec


def compare(official_scores, official_model, rows, rec, shots: int) -> dict[str, Any]:
    """Pairs scored, prompts generated from, and every metric both sides report."""
    report: dict[str, Any] = {"pairs": len(official_model.scored),
                              "pairs_equal": official_model.scored == rec.scored,
                              "generations": len(official_model.generated),
                              "generation_prompts_equal": [i for i, _ in official_model.generated] == rec.generated}
    if not report["pairs_equal"]:
        report["first_pair_difference"] = _first_difference(official_model.scored, rec.scored)
    septet = {(r.notes.get("bigbench_name"), r.metric): r for r in rows}
    metrics = []
    for sd in official_scores:
        if sd.number_of_shots != shots:
            continue
        for m, v in sd.score_dict.items():
            r = septet.get((sd.subtask_description, m))
            if r is None:
                continue  # calibration metrics etc. septet does not compute
            metrics.append({"task": sd.subtask_description, "metric": m, "official": float(v),
                            "septet": r.value, "n": r.n, "equal": math.isclose(v, r.value, rel_tol=0, abs_tol=1e-9)})
    report["metrics"] = metrics
    report["all_equal"] = (report["pairs_equal"] and report["generation_prompts_equal"]
                           and bool(metrics) and all(m["equal"] for m in metrics))
    return report


def _first_difference(a: Sequence, b: Sequence) -> dict:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return {"index": i, "official": x, "septet": y}
    return {"index": min(len(a), len(b)), "official_len": len(a), "septet_len": len(b)}


def check_task(harness, spec: str, scorer, shots: int, limit: int | None, *, name: str = "septet",
               max_new_tokens: int = 64) -> dict[str, Any]:
    """Run one task both ways at one shot count and compare."""
    model = septet_model(harness, scorer, name=name, max_new_tokens=max_new_tokens)
    t0 = time.time()
    otask, scores = run_official(harness, task_path(spec), model, shots, limit)
    t1 = time.time()
    _, rows, rec = run_septet(spec, scorer, shots, limit)
    t2 = time.time()
    report = compare(scores, model, rows, rec, shots)
    items = official_items(harness, otask, shots)
    report.update(task=spec, shots=shots, limit=limit, seconds_official=round(t1 - t0, 1),
                  seconds_septet=round(t2 - t1, 1), items=len(items),
                  tied_items=sum(1 for it in items if "log_prob" in it
                                 and sum(x == max(it["log_prob"]) for x in it["log_prob"]) > 1))
    report["official_items"] = items
    return report


# ----------------------------------------------------------------------------- prompts only

class _NullModel:
    """Stands in for a model where only the prompts matter: scores 0, generates ''."""

    def __init__(self):
        self.scored, self.generated = [], []

    def cond_log_prob(self, inputs, targets, absolute_normalization=False):
        self.scored += [(i, t) for i, ts in zip(inputs, targets) for t in ts]
        return [[0.0] * len(ts) for ts in targets]

    def generate_text(self, inputs, max_length=0, stop_string=None, output_regex=None):
        self.generated += list(inputs)
        return ["" for _ in inputs]


def prompts_both_ways(harness, spec: str, shots: int, limit: int | None):
    """The (prompt, choice) pairs each side would score and the prompts each would generate
    from, for the leaves with a metric septet computes: (official pairs, septet pairs,
    official generation prompts, septet generation prompts, leaves septet skips).
    The official side is JsonTask's own evaluation (score=False) of a model that scores
    nothing, read back from its shot_examples."""
    from septet.eval import bigbench

    path = task_path(spec)
    with contextlib.redirect_stdout(sys.stderr):
        task = harness.json_task.JsonTask(str(path), shot_list=[shots], max_examples=limit)
        task.evaluate_model(_NullModel(), score=False, generate_probs_for_targets=False)
    ours = bigbench.load_bigbench_path(path)
    sub_limit = bigbench._sub_limit(ours, limit) if ours.subtasks else limit
    op, sp, og, sg, unsupported = [], [], [], [], []
    for oleaf, leaf in zip(task.subtasks or [task], ours.subtasks or [ours], strict=True):
        assert oleaf.name == leaf.name, (oleaf.name, leaf.name)
        if not any(m in bigbench.MC_METRICS + bigbench.GEN_METRICS for m in leaf.metrics):
            unsupported.append(leaf.name)  # septet eval refuses these (bleu, rouge, ... only)
            continue
        samples = oleaf.shot_examples[shots]
        inputs = [oleaf.task_prefix + s["input"] for s in samples]
        prompts = [(q, q.prompt(leaf)) for q in bigbench.queries(leaf, shots, sub_limit)]
        if "multiple_choice_grade" in leaf.metrics:
            op += [(i, c) for i, s in zip(inputs, samples) for c in s["choice"]]
            sp += [(p, c) for q, p in prompts for c in q.example.choices]
        if any(m in bigbench.GEN_METRICS for m in leaf.metrics):
            og += inputs
            sg += [p for _, p in prompts]
    return op, sp, og, sg, unsupported


def all_json_tasks() -> list[str]:
    from septet import assets

    root = assets.fetch("bigbench")
    return sorted(p.parent.name for p in root.glob("*/task.json"))


def prompts_only(harness, specs: list[str], shots_list: list[int], limit: int | None) -> dict:
    """Compare the prompts of many tasks. A task the official harness rejects (too few
    examples for the shots, a metric it does not know) must be rejected by septet too, and
    septet must not reject one the harness accepts (except for metrics it does not compute)."""
    from septet.errors import SeptetError
    from septet.eval import bigbench

    done, rejected, differ, unsupported = 0, [], [], set()
    for spec in specs:
        for k in shots_list:
            try:
                op, sp, og, sg, uns = prompts_both_ways(harness, spec, k, limit)
            except SeptetError as e:  # the harness (run first) accepted it
                differ.append({"task": spec, "shots": k, "septet_only_rejects": str(e)[:300]})
                print(f"DIFFER {spec} {k}-shot: only septet rejects it", file=sys.stderr)
                continue
            except ValueError as e:
                try:  # septet must refuse it too
                    ours = bigbench.load_bigbench_path(task_path(spec))
                    for leaf in ours.subtasks or [ours]:
                        bigbench.queries(leaf, k, bigbench._sub_limit(ours, limit) if ours.subtasks else limit)
                except SeptetError as ours_e:
                    rejected.append({"task": spec, "shots": k, "official": str(e)[:160], "septet": str(ours_e)[:160]})
                else:
                    differ.append({"task": spec, "shots": k, "official_only_rejects": str(e)[:300]})
                    print(f"DIFFER {spec} {k}-shot: only the harness rejects it", file=sys.stderr)
                continue
            unsupported.update(uns)
            if not (op or og):
                continue
            done += 1
            if op != sp or og != sg:
                differ.append({"task": spec, "shots": k, "mc": _first_difference(op, sp) if op != sp else None,
                               "gen": _first_difference(og, sg) if og != sg else None})
                print(f"DIFFER {spec} {k}-shot", file=sys.stderr)
    return {"compared": done, "differ": differ, "rejected_by_both": rejected,
            "unsupported_by_septet": sorted(unsupported)}


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="anything septet.load accepts (default smollm2)")
    ap.add_argument("--task", default="", help="comma-separated BIG-bench JSON task names (NAME or NAME/SUBTASK)")
    ap.add_argument("--shots", default="0")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bigbench-src", default=None, help="an extracted bigbench sdist (default: fetch it)")
    ap.add_argument("--bigbench-dir", default=None,
                    help="a BIG-bench checkout, used when the PyPI and GitHub sources are unreachable")
    ap.add_argument("--allow-unverified", action="store_true",
                    help="accept GitHub's archive of BIG-bench although its sha256 is not pinned")
    ap.add_argument("--prompts-only", action="store_true", help="compare prompts only, no model")
    ap.add_argument("--json", default=None, help="write the full report here")
    args = ap.parse_args(argv)
    shots = [int(s) for s in args.shots.split(",")]
    from septet.errors import SeptetError

    try:
        from septet import assets

        assets.fetch("bigbench", local_dir=args.bigbench_dir, allow_unverified=args.allow_unverified)
        harness = import_harness(args.bigbench_src, local_dir=args.bigbench_dir,
                                 allow_unverified=args.allow_unverified)
    except SeptetError as e:
        print(f"bigbench_official: error: {e}", file=sys.stderr)
        return 2
    specs = [s for s in args.task.split(",") if s]
    if args.prompts_only:
        report = prompts_only(harness, specs or all_json_tasks(), shots, args.limit)
        print(json.dumps({k: v if k in ("compared", "differ") else len(v) for k, v in report.items()}, indent=1))
        ok = not report["differ"]
    else:
        import torch

        import septet
        from septet.eval.scoring import Scorer

        if not specs:
            ap.error("--task is required unless --prompts-only")
        torch.manual_seed(0)
        lm = septet.load(args.model, quant=None)
        scorer = Scorer.from_loaded(lm, batch_size=args.batch_size)
        report = {"model": args.model, "bigbench_src": str(harness.root), "tasks": []}
        ok = True
        for spec in specs:
            for k in shots:
                r = check_task(harness, spec, scorer, k, args.limit, name=args.model,
                               max_new_tokens=args.max_new_tokens)
                report["tasks"].append(r)
                ok &= r["all_equal"]
                print(f"{spec} {k}-shot: {r['items']} items, {r['pairs']} scored pairs, pairs equal: "
                      f"{r['pairs_equal']}, ties: {r['tied_items']} "
                      f"({r['seconds_official']} s official, {r['seconds_septet']} s septet)")
                for m in r["metrics"]:
                    print(f"  {m['task']:45s} {m['metric']:28s} official {m['official']:.6f}  "
                          f"septet {m['septet']:.6f}  {'equal' if m['equal'] else 'DIFFERENT'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print("all equal" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's septet
    sys.exit(main())
