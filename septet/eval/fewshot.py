"""The GPT-3 few-shot protocol (Brown et al. 2020, §2 "Approach" and §2.4).

For each test item, K demonstrations are drawn at random (seeded) from the task's training
split, or when it has none from the other test items (never the item itself), and written
before the item, separated by newlines, after an optional task description:

    {description}{sep}{demo_1 prompt}{delim}{demo_1 answer}{sep}...{sep}{item prompt}

Multiple choice compares the log-likelihood of each answer under the task's mode (sum,
per token, per character, or against P(answer | "Answer:")). Free-form answers are decoded
greedily or by beam search up to a stop string and scored by accuracy, normalised exact
match and token F1. When K demonstrations do not fit the model's context for an item, K is
lowered for that item (GPT-3: "as many as fit") with a warning, and the results say so.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Callable

from ..errors import InputError
from .metrics import FREEFORM_METRICS, MC_MODES, choice_scores, first_argmax, mean_stderr
from .report import Row
from .scoring import Scorer
from .tasks import Doc, Task


@dataclass(frozen=True)
class Prompt:
    text: str  # the full context the model reads
    shots: int  # demonstrations it holds (may be fewer than asked)


def demonstrations(task: Task, index: int, k: int, seed: int) -> list[Doc]:
    """K demonstrations for test item `index`: a seeded draw without replacement from the
    training split, or from the other test items. The draw depends on (seed, index) only,
    so limiting or reordering the test set does not change any item's prompt."""
    pool = task.train if task.train else task.test[:index] + task.test[index + 1:]
    if k > len(pool):
        src = "training items" if task.train else "other test items"
        raise InputError(f"task {task.name} has {len(pool)} {src}, too few for {k} shots; "
                         f"use --shots up to {len(pool)}")
    return random.Random(f"{seed}:{index}").sample(pool, k)


def build_prompt(task: Task, doc: Doc, demos: list[Doc]) -> str:
    c = task.config
    parts = [c.description] if c.description else []
    parts += [d.prompt + c.target_delimiter + d.answer() for d in demos]
    parts.append(doc.prompt)
    return c.separator.join(parts)


def fit_prompt(task: Task, scorer: Scorer, doc: Doc, demos: list[Doc], answer_tokens: int,
               where: str) -> Prompt:
    """The prompt with as many of `demos` as fit: the model must read the prompt plus
    `answer_tokens` more. Dropping starts from the first (farthest) demonstration."""
    for k in range(len(demos), -1, -1):
        text = build_prompt(task, doc, demos[len(demos) - k:])
        if len(scorer.context_ids(text)) + answer_tokens <= scorer.context:
            return Prompt(text, k)
    raise InputError(f"{where} does not fit the model's context of {scorer.context} tokens even "
                     "with 0 shots; use a model with a longer context or a shorter item")


def _answer_tokens(task: Task, scorer: Scorer, doc: Doc) -> int:
    if doc.is_mc:
        # the model reads the prompt and all but the last answer token
        return max(len(scorer.encode(task.config.target_delimiter + c)) for c in doc.choices) - 1
    return task.config.max_new_tokens


def make_prompts(task: Task, scorer: Scorer, docs: list[Doc], k: int, seed: int) -> list[Prompt]:
    prompts = []
    for i, doc in enumerate(docs):
        demos = demonstrations(task, i, k, seed) if k else []
        prompts.append(fit_prompt(task, scorer, doc, demos, _answer_tokens(task, scorer, doc),
                                  f"item {i} of task {task.name}"))
    return prompts


def shot_notes(prompts: list[Prompt], k: int, task_name: str) -> dict:
    """Record (and warn about) items that ran with fewer than k demonstrations."""
    reduced = [p.shots for p in prompts if p.shots < k]
    if not reduced:
        return {}
    warnings.warn(f"{task_name}: {len(reduced)} of {len(prompts)} items did not fit the model's "
                  f"context with {k} shots and ran with as few as {min(reduced)}", stacklevel=2)
    return {"shots_reduced": len(reduced), "min_shots": min(reduced)}


def evaluate(task: Task, scorer: Scorer, shots: int, *, seed: int = 1234, limit: int | None = None,
             mode: str | None = None, progress: Callable[[int], None] | None = None) -> list[Row]:
    """Rows for one task at one shot count. `mode` overrides the task's MC scoring mode."""
    docs = task.test[:limit] if limit else task.test
    index_docs = list(enumerate(docs))
    prompts = make_prompts(task, scorer, docs, shots, seed)
    notes = shot_notes(prompts, shots, task.name)
    mc = [(i, d) for i, d in index_docs if d.is_mc]
    gen = [(i, d) for i, d in index_docs if not d.is_mc]
    rows: list[Row] = []
    if mc:
        rows += _multiple_choice(task, scorer, mc, prompts, shots, mode or task.config.mode, notes, progress)
    if gen:
        rows += _free_form(task, scorer, gen, prompts, shots, notes, progress)
    return rows


def _multiple_choice(task, scorer, items, prompts, shots, mode, notes, progress) -> list[Row]:
    """Accuracy under every mode (the cost is the same), the task's mode as primary."""
    c = task.config
    if mode not in MC_MODES:
        raise InputError(f"--mode {mode!r} is not one of {', '.join(MC_MODES)}")
    pairs = [(prompts[i].text, c.target_delimiter + ch) for i, d in items for ch in d.choices]
    scored = scorer.loglikelihood(pairs, boundary=c.boundary, progress=progress)
    uncond = None
    if mode == "uncond":  # P(c | "Answer:") does not depend on the item's context: K-free
        upairs = [(c.uncond_prompt, c.target_delimiter + ch) for _, d in items for ch in d.choices]
        uncond = [s.logprob for s in scorer.loglikelihood(upairs, boundary=c.boundary)]
    correct: dict[str, list[float]] = {m: [] for m in MC_MODES if m != "uncond" or uncond}
    at = 0
    for _, d in items:
        n = len(d.choices)
        part = scored[at:at + n]
        lps = [s.logprob for s in part]
        for m in correct:
            cs = choice_scores(m, lps, [s.n_tokens for s in part], [s.n_chars for s in part],
                               uncond[at:at + n] if uncond else None)
            correct[m].append(float(first_argmax(cs) == d.gold))
        at += n
    name = task.name
    rows = [Row.of(name, shots, "acc", mean_stderr(correct[mode]), primary=True,
                   notes={**notes, "mode": mode})]
    rows += [Row.of(name, shots, f"acc_{m}", mean_stderr(v), notes=notes) for m, v in correct.items()]
    return rows


def _free_form(task, scorer, items, prompts, shots, notes, progress) -> list[Row]:
    c = task.config
    contexts = [prompts[i].text for i, _ in items]
    if c.beams > 1:
        outputs = []
        for ctx in contexts:
            outputs.append(scorer.beam_search(ctx, beams=c.beams, length_penalty=c.length_penalty,
                                              stop=c.stop, max_new_tokens=c.max_new_tokens))
            if progress:
                progress(1)
    else:
        outputs = scorer.generate_until(contexts, stop=c.stop, max_new_tokens=c.max_new_tokens,
                                        progress=progress)
    rows = []
    for metric, fn in FREEFORM_METRICS.items():
        values = [fn(out, d.targets) for out, (_, d) in zip(outputs, items)]
        rows.append(Row.of(task.name, shots, metric, mean_stderr(values), primary=metric == c.metric,
                           notes={**notes, "decoding": f"beam {c.beams}" if c.beams > 1 else "greedy"}))
    return rows


def n_units(task: Task, limit: int | None) -> int:
    """Progress units one shot count of this task reports: scored choices + generations."""
    docs = task.test[:limit] if limit else task.test
    return sum(len(d.choices) if d.is_mc else 1 for d in docs)
