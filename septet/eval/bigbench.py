"""BIG-bench JSON tasks (Srivastava et al. 2022), prompted and scored as BIG-bench's own
`JsonTask` (bigbench/api/json_task.py, bigbench==1.0.0) does it; written anew from
reading that file.

What that means, in order:
- defaults: example_input_prefix "\\nQ: ", example_output_prefix "\\nA: ", choice_prefix
  "\\n  choice: ", append_choices_to_input true, few_shot_example_separator "\\n",
  task_prefix "", random seed 42;
- an example's input becomes input_prefix + input [+ choice_prefix + choices joined by
  choice_prefix] + output_prefix, the appended choices in the order of a fresh
  RandomState(42).permutation of the sorted choice strings (the same for every example
  with the same choices count);
- K-shot: one RandomState(42) per shot count picks the queries (a permutation; the first
  `limit` when limited) and, per query, K demonstrations among the other examples and
  one target of each; demonstrations are input + target, joined by the separator; the
  task prefix goes once in front;
- multiple choice scores every target_scores key by its summed log-probability (inputs
  and targets tokenised separately, as BIG-bench's HF model does), renormalises over the
  choices, and multiple_choice_grade averages the target score of the argmax choice
  (ties broken by BIG-bench's hash rule); generative tasks decode greedily, truncate the
  text to 256 characters, cut it after stop_string, take the first output_regex match
  (default `[^.?!;\\n]+` when the task sets neither) and exact_str_match compares it
  verbatim with the targets;
- a task with subtasks evaluates each (limit split evenly: limit // subtasks) and
  reports the unweighted mean over subtasks of every metric, plus BIG-bench's
  normalized_aggregate_score (each subtask's preferred score rescaled from its
  [random, max] range to [0, 100], averaged).
Deviations, on purpose: decoding is greedy (BIG-bench's HF model samples with top-k 40);
generation stops early once the answer is settled (stop string seen, 256 characters, or
a newline after the first regex match for regexes that cannot span lines); an empty
input is read after an end-of-text token (BIG-bench's scorer drops the first target
token instead); a prompt that does not fit the context loses its oldest demonstrations
(BIG-bench cuts tokens from the left).
"""

from __future__ import annotations

import difflib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError, InputError
from .metrics import (
    DEFAULT_REGEX,
    MAX_CHARS,
    Score,
    bigbench_normalize,
    case_insensitive_str_match,
    exact_str_match,
    mean_of_scores,
    mean_stderr,
    multiple_choice_grade,
    postprocess,
    regex_is_line_bound,
)
from .report import Row
from .scoring import Scorer
from .tasks import MAX_TASK_BYTES

SEED = 42  # JsonTask's default random_seed
MC_METRICS = ("multiple_choice_grade",)
GEN_METRICS = ("exact_str_match", "case_insensitive_str_match")
# each metric's [low, high] for the normalized aggregate (json_task.SCORE_RANGES)
SCORE_RANGE = {"exact_str_match": (0.0, 1.0), "case_insensitive_str_match": (0.0, 1.0),
               "multiple_choice_grade": (0.0, 1.0)}


@dataclass
class Example:
    input: str  # formatted: prefixes and appended choices included
    targets: list[str]  # free-form targets; for multiple choice, the best-scored choice
    choices: list[str] | None  # target_scores keys in file order
    target_scores: dict[str, float] | None
    raw: dict  # the example as read, for BIG-bench's "other examples" equality


@dataclass
class BigBenchTask:
    name: str  # BIG-bench's name ("parent:child" for a subtask)
    label: str  # how results name it ("bigbench:parent/child")
    path: Path
    metrics: list[str] = field(default_factory=list)
    preferred: str = ""
    examples: list[Example] = field(default_factory=list)
    task_prefix: str = ""
    separator: str = "\n"
    stop_string: str | None = None
    output_regex: str | None = None
    absolute_normalization: bool = False
    low_score: float = 0.0
    subtasks: list["BigBenchTask"] = field(default_factory=list)


# ----------------------------------------------------------------------------- loading

_NAME = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)?$")


def load_bigbench(spec: str) -> BigBenchTask:
    """`NAME` or `NAME/SUBTASK` from the bigbench asset, fetched on first use from the first of
    its sources that works (PyPI, GitHub, a local directory: septet.assets); when none can be
    reached, septet.assets.AssetUnavailable says why for each, in one line."""
    from .. import assets

    if not _NAME.match(spec):
        raise InputError(f"bigbench task {spec!r}: expected bigbench:NAME or bigbench:NAME/SUBTASK "
                         "with letters, digits, _ and -")
    root = assets.fetch("bigbench")
    path = root / spec / "task.json"
    if not path.is_file():
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
        if "/" in spec:
            parent = spec.split("/")[0]
            if (root / parent).is_dir():
                names = [f"{parent}/{p.name}" for p in sorted((root / parent).iterdir()) if p.is_dir()]
        close = difflib.get_close_matches(spec, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else \
            f"; {len(names)} JSON tasks are in {root} (programmatic BIG-bench tasks are not)"
        raise InputError(f"unknown BIG-bench task {spec!r}{hint}")
    return _load(path, parent=None, label=f"bigbench:{spec}")


def load_bigbench_path(path: str | Path) -> BigBenchTask:
    """A task.json (or a directory holding one) anywhere on disk."""
    p = Path(path)
    if p.is_dir():
        p = p / "task.json"
    if not p.is_file():
        raise DataError(f"BIG-bench task file {p} does not exist")
    return _load(p, parent=None, label=str(p.parent.name or p))


def _read_json(path: Path) -> dict:
    if path.stat().st_size > MAX_TASK_BYTES:
        raise DataError(f"{path}: larger than a task file can be ({MAX_TASK_BYTES} bytes)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a BIG-bench task is a JSON object, got {type(data).__name__}")
    return data


def _str_field(data: dict, key: str, default: str, where: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _load(path: Path, parent: BigBenchTask | None, label: str) -> BigBenchTask:
    data = _read_json(path)
    where = str(path)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: missing field 'name' (every BIG-bench task has one)")
    name = name.encode("ascii", errors="replace").decode()  # as JsonTask does
    task = BigBenchTask(name=f"{parent.name}:{name}" if parent else name, label=label, path=path)
    if "examples" not in data:
        subs = sorted(p for p in path.parent.iterdir() if (p / "task.json").is_file())
        if not subs:
            raise DataError(f"{where}: a task needs 'examples' or subtask directories with task.json")
        task.subtasks = [_load(s / "task.json", task, f"{label}/{s.name}") for s in subs]
        return task
    metrics = data.get("metrics")
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise DataError(f"{where}: field 'metrics' must be a list of metric names")
    task.metrics = metrics
    task.preferred = _str_field(data, "preferred_score", "", where)
    task.task_prefix = str(data.get("task_prefix", ""))
    task.separator = _str_field(data, "few_shot_example_separator", "\n", where)
    task.absolute_normalization = bool(data.get("absolute_normalization", False))
    stop, regex = data.get("stop_string"), data.get("output_regex")
    if stop is not None and not isinstance(stop, str):
        raise DataError(f"{where}: field 'stop_string' must be a string")
    if regex is not None:
        if not isinstance(regex, str):
            raise DataError(f"{where}: field 'output_regex' must be a string")
        try:
            groups = re.compile(regex).groups
        except re.error as e:
            raise DataError(f"{where}: output_regex {regex!r} does not compile ({e})") from None
        if groups > 1:
            raise DataError(f"{where}: output_regex {regex!r} has {groups} groups; BIG-bench allows "
                            "at most one (write the others as (?:...))")
    task.stop_string, task.output_regex = stop, regex
    if stop is None and regex is None:
        task.output_regex = DEFAULT_REGEX
    fmt = dict(input_prefix=_str_field(data, "example_input_prefix", "\nQ: ", where),
               output_prefix=_str_field(data, "example_output_prefix", "\nA: ", where),
               choice_prefix=_str_field(data, "choice_prefix", "\n  choice: ", where),
               append=bool(data.get("append_choices_to_input", True)))
    raw = data["examples"]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field 'examples' must be a non-empty list")
    seen, distinct = set(), []
    for ex in raw:  # JsonTask drops exact duplicates, keeping the first
        key = json.dumps(ex)
        if key not in seen:
            seen.add(key)
            distinct.append(ex)
    needs_scores = any(m in MC_METRICS for m in metrics)
    needs_target = any(m in GEN_METRICS for m in metrics)
    task.examples = [_format(ex, f"{where}, examples[{i}]", needs_scores, needs_target, **fmt)
                     for i, ex in enumerate(distinct)]
    if task.preferred == "multiple_choice_grade":  # the random-guess baseline
        task.low_score = float(np.mean([np.mean(list(e.target_scores.values())) for e in task.examples]))
    return task


def _format(ex, where: str, needs_scores: bool, needs_target: bool, *, input_prefix: str,
            output_prefix: str, choice_prefix: str, append: bool) -> Example:
    """JsonTask's default_format_fn, with the checks it makes and a few it does not."""
    if not isinstance(ex, dict):
        raise DataError(f"{where}: an example must be a JSON object")
    text = ex.get("input")
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'input' must be a string")
    scores = ex.get("target_scores")
    target = ex.get("target")
    if scores is None and target is None:
        raise DataError(f"{where}: an example needs 'target' or 'target_scores'")
    if needs_scores and scores is None:
        raise DataError(f"{where}: multiple_choice_grade needs 'target_scores' in every example")
    if needs_target and target is None:
        raise DataError(f"{where}: exact_str_match needs 'target' in every example")
    if target is not None:
        targets = [target] if isinstance(target, str) else target
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise DataError(f"{where}: field 'target' must be a string or a non-empty list of strings")
    choices = None
    if scores is not None:
        if (not isinstance(scores, dict) or not scores
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values())):
            raise DataError(f"{where}: field 'target_scores' must map each choice to a number")
        scores = {k: float(v) for k, v in scores.items()}
        if append:  # a fresh RandomState per example: the same permutation for equal counts
            keys = sorted(scores)
            order = np.random.RandomState(SEED).permutation(len(keys))
            text = text + choice_prefix + choice_prefix.join(keys[i] for i in order)
        best, worst = max(scores.values()), min(scores.values())
        if target is None:
            if (len(scores) == 1 and best == 0) or (len(scores) > 1 and best <= worst):
                raise DataError(f"{where}: target_scores has no choice scored above the others")
            targets = [next(k for k, v in scores.items() if v == best)]
        choices = list(scores)
    return Example(input_prefix + text + output_prefix, list(targets), choices, scores, ex)


# ----------------------------------------------------------------------------- few-shot prompts

@dataclass
class Query:
    example: Example
    demos: list[str]  # demonstration strings, input + one target each, in prompt order

    def prompt(self, task: BigBenchTask, k: int | None = None) -> str:
        """task_prefix + the last k demonstrations + the query, joined by the separator."""
        demos = self.demos if k is None else self.demos[len(self.demos) - k:]
        body = task.separator.join(demos + [self.example.input])
        return task.task_prefix + body


def queries(task: BigBenchTask, shots: int, limit: int | None = None, seed: int = SEED) -> list[Query]:
    """make_nshot_dataset's draws, reproduced call for call on a RandomState(seed)."""
    exs = task.examples
    n = min(limit, len(exs)) if limit else len(exs)
    rng = np.random.RandomState(seed)
    if shots == 0:
        if n < len(exs):
            return [Query(exs[i], []) for i in rng.choice(len(exs), n, replace=False)]
        return [Query(e, []) for e in exs]
    if len(exs) < shots + 1:
        raise InputError(f"BIG-bench task {task.name} has {len(exs)} distinct examples, too few for "
                         f"{shots} shots; use --shots up to {len(exs) - 1}")
    out = []
    for qi in rng.choice(len(exs), n, replace=False):
        query = exs[qi]
        others = [e for e in exs if e.raw != query.raw]
        picks = rng.choice(len(others), shots, replace=False)
        demos = []
        for j in picks:
            e = others[j]
            demos.append(e.input + e.targets[rng.choice(len(e.targets))])
        out.append(Query(query, demos))
    return out


# ----------------------------------------------------------------------------- evaluation

def _settled(task: BigBenchTask) -> Callable[[str], bool]:
    """When more generated text can no longer change the post-processed response."""
    line_bound = task.output_regex is not None and regex_is_line_bound(task.output_regex)

    def done(text: str) -> bool:
        if len(text) >= MAX_CHARS:
            return True
        if task.stop_string and text.find(task.stop_string) > 0:
            return True
        if line_bound and task.stop_string is None:
            m = re.search(task.output_regex, text)
            return m is not None and "\n" in text[m.end():]
        return False
    return done


def _fit(task: BigBenchTask, scorer: Scorer, qs: list[Query], shots: int, answer_tokens) -> tuple[list[str], dict]:
    """Prompts, dropping the oldest demonstrations of those that do not fit the context."""
    prompts, reduced = [], []
    for _i, q in enumerate(qs):
        need = answer_tokens(q)
        for k in range(len(q.demos), -1, -1):
            text = q.prompt(task, k)
            if len(scorer.context_ids(text)) + need <= scorer.context:
                break
        else:
            raise InputError(f"an example of BIG-bench task {task.name} does not fit the model's context "
                             f"of {scorer.context} tokens even with 0 shots; use a longer-context model")
        if k < shots:
            reduced.append(k)
        prompts.append(text)
    if not reduced:
        return prompts, {}
    warnings.warn(f"{task.name}: {len(reduced)} of {len(qs)} prompts did not fit the model's context "
                  f"with {shots} shots and ran with as few as {min(reduced)}", stacklevel=2)
    return prompts, {"shots_reduced": len(reduced), "min_shots": min(reduced)}


def evaluate(task: BigBenchTask, scorer: Scorer, shots: int, *, limit: int | None = None,
             seed: int = SEED, max_new_tokens: int = 64,
             progress: Callable[[int], None] | None = None) -> list[Row]:
    """Rows for one BIG-bench task (aggregated over its subtasks) at one shot count."""
    if task.subtasks:
        rows = []
        for sub in task.subtasks:
            rows += evaluate(sub, scorer, shots, limit=_sub_limit(task, limit), seed=seed,
                             max_new_tokens=max_new_tokens, progress=progress)
        return rows + _aggregate(task, rows, shots)
    return _evaluate_leaf(task, scorer, shots, limit, seed, max_new_tokens, progress)


def _sub_limit(task: BigBenchTask, limit: int | None) -> int | None:
    """JsonTask's max_examples rule: each subtask gets limit // subtasks examples."""
    if not limit:
        return None
    if limit < len(task.subtasks):
        raise InputError(f"--limit {limit} is smaller than the {len(task.subtasks)} subtasks of "
                         f"{task.name}; BIG-bench gives each subtask limit // subtasks examples")
    return limit // len(task.subtasks)


def _check_metrics(task: BigBenchTask) -> None:
    if not any(m in MC_METRICS + GEN_METRICS for m in task.metrics):
        raise InputError(f"BIG-bench task {task.name} uses only metrics septet does not compute "
                         f"({', '.join(task.metrics)}); supported: multiple_choice_grade, exact_str_match, "
                         "case_insensitive_str_match")


def _evaluate_leaf(task, scorer, shots, limit, seed, max_new_tokens, progress) -> list[Row]:
    _check_metrics(task)
    qs = queries(task, shots, limit, seed)
    per_item: dict[str, list[float]] = {}
    notes: dict = {}
    if "multiple_choice_grade" in task.metrics:
        prompts, notes = _fit(task, scorer, qs, shots, lambda q: max(
            len(scorer.encode(c)) for c in q.example.choices) - 1)
        pairs = [(p, c) for p, q in zip(prompts, qs) for c in q.example.choices]
        scored = scorer.loglikelihood(pairs, boundary="separate", progress=progress)
        at, grades = 0, []
        for q in qs:
            n = len(q.example.choices)
            absolute = [s.logprob for s in scored[at:at + n]]
            at += n
            lps = absolute if task.absolute_normalization else bigbench_normalize(absolute)
            grades.append(multiple_choice_grade(q.example.choices, lps, q.example.target_scores))
        per_item["multiple_choice_grade"] = grades
    gen = [m for m in task.metrics if m in GEN_METRICS]
    if gen:
        prompts, gen_notes = _fit(task, scorer, qs, shots, lambda q: max_new_tokens)
        notes = notes or gen_notes
        texts = scorer.generate_until(prompts, max_new_tokens=max_new_tokens, done=_settled(task),
                                      progress=progress)
        responses = [postprocess(t, task.stop_string, task.output_regex) for t in texts]
        fns = {"exact_str_match": exact_str_match, "case_insensitive_str_match": case_insensitive_str_match}
        for m in gen:
            per_item[m] = [fns[m](r, q.example.targets) for r, q in zip(responses, qs)]
    skipped = [m for m in task.metrics if m not in per_item]
    if skipped:
        notes = {**notes, "metrics_not_computed": skipped}
    primary = task.preferred if task.preferred in per_item else next(iter(per_item))
    return [Row.of(task.label, shots, m, mean_stderr(v), primary=m == primary,
                   notes={**notes, "bigbench_name": task.name})
            for m, v in per_item.items()]


def _aggregate(task: BigBenchTask, rows: list[Row], shots: int) -> list[Row]:
    """results.add_aggregate_scores: per-metric means over the direct subtasks and the
    normalized aggregate of their preferred scores."""
    direct = {s.label: s for s in task.subtasks}
    by_sub: dict[str, dict[str, Row]] = {}
    for r in rows:
        if r.task in direct:
            by_sub.setdefault(r.task, {})[r.metric] = r
    metrics: list[str] = []
    for sub_rows in by_sub.values():
        metrics += [m for m in sub_rows if m not in metrics]
    out = []
    normalized = []
    for label, sub_rows in by_sub.items():
        sub = direct[label]
        pref = sub_rows.get(sub.preferred) or next(r for r in sub_rows.values() if r.primary)
        low = sub.low_score if pref.metric == sub.preferred else 0.0
        high = SCORE_RANGE.get(pref.metric, (0.0, 1.0))[1]
        normalized.append(Score(100 * (pref.value - low) / (high - low), pref.n, 100 * pref.stderr / (high - low)))
    all_mc = all(direct[label].preferred == "multiple_choice_grade" for label in by_sub)
    for m in metrics:
        scores = [Score(r[m].value, r[m].n, r[m].stderr) for r in by_sub.values() if m in r]
        out.append(Row.of(task.label, shots, m, mean_of_scores(scores),
                          primary=all_mc and m == "multiple_choice_grade",
                          notes={"bigbench_name": task.name, "subtasks": len(scores)}))
    out.append(Row.of(task.label, shots, "normalized_aggregate_score", mean_of_scores(normalized),
                      primary=not all_mc, notes={"bigbench_name": task.name, "subtasks": len(normalized)}))
    for r in rows:  # subtasks are reported, not plotted
        r.notes.setdefault("subtask_of", task.label)
    return out


def n_units(task: BigBenchTask, shots: int, limit: int | None, seed: int = SEED) -> int:
    """Progress units of one shot count: scored choices plus generations (also checks early
    that the task has enough examples for the shots and subtasks for the limit)."""
    if task.subtasks:
        return sum(n_units(s, shots, _sub_limit(task, limit), seed) for s in task.subtasks)
    _check_metrics(task)
    qs = queries(task, shots, limit, seed)
    units = 0
    if "multiple_choice_grade" in task.metrics:
        units += sum(len(q.example.choices) for q in qs)
    if any(m in GEN_METRICS for m in task.metrics):
        units += len(qs)
    return units
