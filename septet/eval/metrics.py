"""Evaluation metrics: free-form answer scores, multiple-choice rules, BIG-bench's metrics,
and the mean ± standard error every reported number carries."""

from __future__ import annotations

import hashlib
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Score:
    """A reported number: the mean of n per-item values and its standard error."""

    value: float
    n: int
    stderr: float


def mean_stderr(values: Sequence[float]) -> Score:
    """Mean and standard error of the mean (sample std with n−1, over √n), as lm-eval reports."""
    n = len(values)
    if n == 0:
        return Score(float("nan"), 0, float("nan"))
    mean = sum(values) / n
    if n == 1:
        return Score(mean, 1, float("nan"))
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Score(mean, n, math.sqrt(var / n))


def mean_of_scores(scores: Sequence[Score]) -> Score:
    """The unweighted mean of several task scores (BIG-bench's subtask aggregate); the
    standard errors combine as independent: sqrt(Σ se²) / m."""
    m = len(scores)
    value = sum(s.value for s in scores) / m
    se = math.sqrt(sum(s.stderr ** 2 for s in scores)) / m if all(s.n > 1 for s in scores) else float("nan")
    return Score(value, sum(s.n for s in scores), se)


# ----------------------------------------------------------------------------- free-form answers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, drop punctuation and the articles a/an/the,
    collapse whitespace (Rajpurkar et al. 2016, the official v1.1 evaluation rules)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def accuracy(prediction: str, golds: Sequence[str]) -> float:
    """1 when the stripped prediction equals a stripped gold answer exactly."""
    p = prediction.strip()
    return float(any(p == g.strip() for g in golds))


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1 when the normalised prediction equals a normalised gold (TriviaQA, NQ in GPT-3)."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD/CoQA F1: the best over golds of the harmonic mean of precision and recall of
    normalised word tokens (bag-of-words overlap)."""
    return max((_f1(normalize_answer(prediction).split(), normalize_answer(g).split()) for g in golds),
               default=0.0)


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:  # both empty is a match; one empty is not (SQuAD v2 rule)
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


FREEFORM_METRICS = {"accuracy": accuracy, "exact_match": exact_match, "f1": token_f1}


# ----------------------------------------------------------------------------- multiple choice

MC_MODES = ("sum", "token", "char", "uncond")


def choice_scores(mode: str, logprobs: Sequence[float], n_tokens: Sequence[int], n_chars: Sequence[int],
                  uncond: Sequence[float] | None = None) -> list[float]:
    """What is compared across the choices of one item:
    - sum:    log P(c | ctx)
    - token:  log P(c | ctx) / tokens(c)       GPT-3 §2.4 (most tasks)
    - char:   log P(c | ctx) / characters(c)   LLaMA §3 (and lm-eval's acc_norm)
    - uncond: log P(c | ctx) − log P(c | "Answer:"), i.e. P(c|ctx)/P(c|answer prompt):
              GPT-3 §2.4 for ARC, OpenBookQA and RACE."""
    if mode == "sum":
        return list(logprobs)
    if mode == "token":
        return [lp / max(1, n) for lp, n in zip(logprobs, n_tokens)]
    if mode == "char":
        return [lp / max(1, n) for lp, n in zip(logprobs, n_chars)]
    if mode == "uncond":
        if uncond is None:
            raise ValueError("mode 'uncond' needs the unconditional log-likelihoods")
        return [lp - u for lp, u in zip(logprobs, uncond)]
    raise ValueError(f"unknown multiple-choice mode {mode!r}; one of {', '.join(MC_MODES)}")


def first_argmax(xs: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (deterministic)."""
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


# ----------------------------------------------------------------------------- BIG-bench
# The definitions of bigbench/api/task_metrics.py, written anew.

def bigbench_argmax(values: Sequence[float]) -> int:
    """BIG-bench's argmax: ties are broken pseudo-randomly but reproducibly, by the SHA-256
    of the float64 bytes of the whole score vector modulo the number of tied maxima."""
    arr = np.asarray(values, dtype=np.float64)
    tied = np.flatnonzero(arr == arr.max())
    pick = int(hashlib.sha256(arr.tobytes()).hexdigest(), 16) % len(tied)
    return int(tied[pick])


def bigbench_normalize(logprobs: Sequence[float]) -> list[float]:
    """log-probabilities renormalised over the choices (log-softmax), as JsonTask stores
    them unless the task sets absolute_normalization."""
    arr = np.asarray(logprobs, dtype=np.float64)
    m = arr.max()
    return list(arr - (m + np.log(np.exp(arr - m).sum())))


def multiple_choice_grade(choices: Sequence[str], log_probs: Sequence[float],
                          target_scores: dict[str, float]) -> float:
    """One item's multiple_choice_grade: the target score of the model's argmax choice
    (target scores may be fractional: partial credit). The task value is the mean."""
    return float(target_scores[choices[bigbench_argmax(log_probs)]])


def exact_str_match(response: str, targets: Sequence[str]) -> float:
    """One item's exact_str_match: 1 when the (post-processed) response is one of the targets
    verbatim; no normalisation at all."""
    return float(response in targets)


def case_insensitive_str_match(response: str, targets: Sequence[str]) -> float:
    """exact_str_match after stripping and lower-casing both sides."""
    return float(response.strip().lower() in [t.strip().lower() for t in targets])


# BIG-bench's response post-processing (bigbench/models/model_utils.py), before its
# generative metrics
DEFAULT_REGEX = r"[^\.\?\!\;\n]+"  # JsonTask's output_regex when a task sets neither it nor stop_string
MAX_CHARS = 256  # BIG-bench's HF model: its max_length, also the character cut of a response


def postprocess(text: str, stop_string: str | None, output_regex: str | None) -> str:
    """model_utils.postprocess_output: 256 characters, cut after stop_string, first regex match."""
    text = text[:MAX_CHARS]
    if stop_string:
        i = text.find(stop_string)
        if i > 0:  # BIG-bench ignores a stop string at position 0
            text = text[:i + len(stop_string)]
    if output_regex:
        pattern = re.compile(output_regex)
        if pattern.groups > 1:
            raise InputError(f"output_regex {output_regex!r} has {pattern.groups} groups; BIG-bench "
                             "allows at most one (use (?:...) for the others)")
        m = pattern.search(text)  # re.findall's first item: the match, or its one group
        text = "" if m is None else m.group(pattern.groups) or ""
    return text


def regex_is_line_bound(regex: str) -> bool:
    """Can no match of `regex` contain a newline? Conservative and syntactic: negated classes
    must exclude \\n; nothing else may be \\s, \\S, \\W, \\D, \\n or DOTALL."""
    negated = re.compile(r"\[\^((?:\\.|[^\]])*)\]")
    if not all("\\n" in body or "\n" in body for body in negated.findall(regex)):
        return False
    rest = negated.sub("", regex)
    return re.search(r"\\[sSWDn]|\(\?[a-zA-Z]*s", rest) is None
