"""Chain-of-thought evaluation: GSM8K-style word problems and MMLU's CoT dev examples.

- Prompts follow Wei et al. 2022 ("Chain-of-Thought Prompting Elicits Reasoning"): the 8
  standard GSM8K exemplars as "Q: ...\\nA: <reasoning> The answer is N.", separated by blank
  lines, read from lm-evaluation-harness's gsm8k-cot.yaml (the `lm-eval-tasks` asset).
- The answer is the number after "The answer is", else the last number in the output;
  scored by exact match after dropping commas, "$" and a trailing period.
- PaLM (Chowdhery et al. 2022, reasoning section) adds an external calculator: while
  decoding, when the text ends in an arithmetic span "a op b =", the span is computed by a
  tiny parser (never eval) and the result is written into the output; decoding then
  continues from it. The injected tokens are fed through the model on top of the KV cache.
- MMLU chain-of-thought dev examples (lm-eval's mmlu/flan_cot_fewshot, 4-5 per subject):
  each is scored with the other examples of its subject as exemplars, never itself.

The problem source is pluggable: any JSONL of {"question", "answer"} (an answer may be a
GSM8K solution ending "#### N"). GSM8K's own test split is not carried by any asset here.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from ..errors import DataError, InputError
from ..inference import DecodeBatch, Sampling, check_prompt, new_token_budget, optimize_for_inference
from .metrics import mean_stderr

STOP = ("Q:", "\n\n")  # lm-eval stops at "Q:"; a blank line also ends one answer and saves time


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # GSM8K: the number; MMLU: the letter
    target: str = ""  # the worked answer, when the example serves as an exemplar
    subject: str = ""
    description: str = ""  # MMLU's "The following are multiple choice questions ..."


# ----------------------------------------------------------------------------- data

def gsm8k_exemplars(path: str | Path | None = None) -> list[Example]:
    """The 8 exemplars of Wei et al., from gsm8k-cot.yaml (default: the lm-eval-tasks asset)."""
    if path is None:
        from .. import assets

        path = assets.fetch("lm-eval-tasks", quiet=True) / "gsm8k" / "gsm8k-cot.yaml"
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}); fetch the lm-eval-tasks asset again") from None
    out = []
    for i, s in enumerate(read_fewshot_samples(text, path)):
        if set(s) != {"question", "target"}:
            raise DataError(f"{path}: fewshot sample {i} has fields {sorted(s)}, expected question "
                            "and target; use lm-eval's gsm8k-cot.yaml")
        m = re.search(r"The answer is (.+)\.$", s["target"])
        if m is None:
            raise DataError(f"{path}: fewshot sample {i} field 'target' does not end in "
                            "'The answer is N.'; use lm-eval's gsm8k-cot.yaml")
        out.append(Example(s["question"], normalize_number(m.group(1)), s["target"]))
    return out


def read_fewshot_samples(text: str, path: Path) -> list[dict[str, str]]:
    """The `fewshot_config: samples:` list of an lm-eval task YAML, read by a deliberately tiny
    reader (septet does not depend on PyYAML): a list of mappings whose values are plain or
    single-quoted scalars, possibly over several lines. Anything else is refused."""
    lines = text.splitlines()

    def fail(n: int, why: str) -> DataError:
        return DataError(f"{path}:{n + 1}: {why}; septet reads only plain or single-quoted "
                         "fewshot samples, as lm-eval's gsm8k-cot.yaml has them")

    try:
        top = lines.index("fewshot_config:")
        start = next(i for i in range(top + 1, len(lines)) if lines[i].strip() == "samples:")
    except (ValueError, StopIteration):
        raise DataError(f"{path}: no 'fewshot_config: samples:' section; use lm-eval's gsm8k-cot.yaml") from None
    samples: list[dict[str, list[str]]] = []
    item_indent = key_indent = -1
    key = None
    for n in range(start + 1, len(lines)):
        line = lines[n]
        if not line.strip():
            if key is not None:
                samples[-1][key].append("")  # a blank line folds to a newline
            continue
        indent = len(line) - len(line.lstrip(" "))
        body = line.strip()
        if item_indent < 0:
            item_indent, key_indent = indent, indent + 2
        if indent < item_indent or (indent == item_indent and not body.startswith("- ")):
            break  # the list is over
        if indent == item_indent or indent == key_indent:
            if indent == item_indent:
                samples.append({})
                body = body[2:]
            m = re.match(r"([A-Za-z_]+):(?: (.*))?$", body)
            if m is None:
                raise fail(n, f"expected 'key: value', got {body[:40]!r}")
            key = m.group(1)
            samples[-1][key] = [m.group(2) or ""]
        elif indent > key_indent and key is not None:
            samples[-1][key].append(body)
        else:
            raise fail(n, "unexpected indentation")
    return [{k: _scalar(v, lambda why: fail(start, why)) for k, v in s.items()} for s in samples]


def _scalar(parts: list[str], fail: Callable[[str], DataError]) -> str:
    """Fold the lines of one YAML flow scalar: line breaks become spaces, blank lines '\\n'."""
    text = ""
    for p in parts:
        text += "\n" if p == "" else (p if not text or text.endswith("\n") else " " + p)
    if text[:1] == "'":
        if len(text) < 2 or text[-1] != "'" or re.search(r"(?<!')'(?!')", text[1:-1]):
            raise fail(f"unterminated single-quoted value {text[:40]!r}")
        return text[1:-1].replace("''", "'")
    if text[:1] in "\"|>&*!%@`{[" or " #" in text or ": " in text:
        raise fail(f"unsupported YAML value {text[:40]!r}")
    return text


def load_problems(path: str | Path) -> list[Example]:
    """A JSONL of {"question": str, "answer": str | number}, one problem per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such problems file; pass a JSONL of question/answer objects")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg}); write one object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise DataError(f"{path}:{n}: field 'question' must be a non-empty string")
        answer = row.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{path}:{n}: field 'answer' must be a number or a string ending in it")
        gold = normalize_number(answer.split("####")[-1])  # GSM8K solutions end "#### N"
        if not re.fullmatch(r"-?\d+(\.\d+)?", gold):
            raise DataError(f"{path}:{n}: field 'answer' ({answer[-30:]!r}) has no final number; "
                            "end it with the numeric answer")
        out.append(Example(row["question"].strip(), gold))
    if not out:
        raise DataError(f"{path}: holds no problems; write one JSON object per line")
    return out


def synthetic_problems(n: int, seed: int = 0) -> list[Example]:
    """Small two-step arithmetic word problems with known answers, for tests and demos."""
    rng = random.Random(seed)
    names, things = ["Ana", "Ben", "Cleo", "Dev", "Eli"], ["apples", "pens", "cards", "shells"]
    out = []
    for _ in range(n):
        who, what = rng.choice(names), rng.choice(things)
        a, b, c = rng.randint(5, 40), rng.randint(2, 9), rng.randint(2, 6)
        q = (f"{who} has {a} {what}. {who} buys {c} boxes with {b} {what} in each box. "
             f"How many {what} does {who} have now?")
        out.append(Example(q, str(a + b * c)))
    return out


def load_mmlu_cot(subjects: Sequence[str] | None = None, path: str | Path | None = None) -> list[Example]:
    """MMLU's chain-of-thought dev examples from lm-eval's flan_cot_fewshot/_cot_prompts.json
    (the same samples as its per-subject YAML files, in plain JSON): subject -> prompt."""
    if path is None:
        from .. import assets

        path = assets.fetch("lm-eval-tasks", quiet=True) / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"
    path = Path(path)
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read MMLU CoT prompts ({e}); fetch the lm-eval-tasks asset") from None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise DataError(f"{path}: expected an object of subject -> prompt strings")
    unknown = sorted(set(subjects or ()) - set(prompts))
    if unknown:
        raise InputError(f"unknown MMLU subject(s) {', '.join(unknown)}; known: {', '.join(sorted(prompts))}")
    out = []
    for subject in subjects or sorted(prompts):
        description, *items = prompts[subject].split("\n\nQ: ")
        for i, item in enumerate(items):
            question, sep, target = item.strip("\n").partition("\nA: ")
            letter = extract_choice(target)
            if not sep or letter is None:
                raise DataError(f"{path}: subject '{subject}' example {i} lacks 'A: ... The answer "
                                "is (X).'; fetch the lm-eval-tasks asset again")
            out.append(Example(question, letter, target, subject, description.strip()))
    return out


# ----------------------------------------------------------------------------- answers

def normalize_number(text: str) -> str:
    """'$1,234.50.' -> '1234.5'; a non-number comes back stripped of the same decoration."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return s
    if value.denominator == 1:
        return str(value.numerator)
    return s.rstrip("0") if "." in s else s


_ANSWER = re.compile(r"The answer is\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The number after the first "The answer is", else the last number in the text."""
    m = _ANSWER.search(text)
    if m is None:
        numbers = _NUMBER.findall(text)
        return normalize_number(numbers[-1]) if numbers else None
    return normalize_number(m.group(1))


def extract_choice(text: str) -> str | None:
    """The letter of "The answer is (X)", else the last "(X)" in the text."""
    m = re.search(r"answer is \(?([A-J])\)", text)
    if m:
        return m.group(1)
    letters = re.findall(r"\(([A-J])\)", text)
    return letters[-1] if letters else None


# ----------------------------------------------------------------------------- calculator

_CALC_TOKEN = re.compile(r"\s*(?:\$?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)|([-+*/x×()]))")
_CALC_CHARS = set("0123456789.,$+-*/x×() ")


def calculate(expr: str) -> Fraction | None:
    """Evaluate plain arithmetic (numbers, + - * / and x or × for times, parentheses) with
    exact fractions; None for anything else, a lone number, or division by zero."""
    tokens: list[str | Fraction] = []
    pos = 0
    while pos < len(expr.rstrip()):
        m = _CALC_TOKEN.match(expr, pos)
        if m is None or len(tokens) >= 64:
            return None
        num, op = m.groups()
        if num is not None:
            if len(num) > 18:
                return None
            tokens.append(Fraction(num.replace(",", "")))
        else:
            tokens.append({"x": "*", "×": "*"}.get(op, op))
        pos = m.end()
    if not any(isinstance(t, str) and t in "+-*/" for t in tokens):
        return None  # "= 5" after a lone number is a statement, not a calculation
    i = 0

    def peek() -> str | Fraction | None:
        return tokens[i] if i < len(tokens) else None

    def take() -> str | Fraction | None:
        nonlocal i
        i += 1
        return tokens[i - 1] if i <= len(tokens) else None

    def expression(depth: int) -> Fraction:  # term (('+'|'-') term)*
        value = term(depth)
        while peek() in ("+", "-"):
            value = value + term(depth) if take() == "+" else value - term(depth)
        return value

    def term(depth: int) -> Fraction:  # factor (('*'|'/') factor)*
        value = factor(depth)
        while peek() in ("*", "/"):
            value = value * factor(depth) if take() == "*" else value / factor(depth)
        return value

    def factor(depth: int) -> Fraction:  # '-' factor | number | '(' expression ')'
        t = take()
        if t == "-" and depth < 16:
            return -factor(depth)
        if isinstance(t, Fraction):
            return t
        if t == "(" and depth < 16:
            value = expression(depth + 1)
            if take() != ")":
                raise ValueError("unbalanced")
            return value
        raise ValueError("not arithmetic")

    try:
        value = expression(0)
    except (ValueError, ZeroDivisionError):
        return None
    if i != len(tokens) or abs(value) > 10**15:
        return None
    return value


def format_number(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.4f}".rstrip("0").rstrip(".")


def calculator_injection(text: str) -> tuple[str, str] | None:
    """If `text` ends with "<arithmetic> =" (or "= "), return (span, text to insert)."""
    m = re.search(r"=( ?)$", text)
    if m is None:
        return None
    head = text[:m.start()][-96:]
    j = len(head)
    while j > 0 and head[j - 1] in _CALC_CHARS:
        j -= 1
    span = head[j:]
    # the longest tail of the span that is arithmetic, starting at the start of a number
    for s in range(len(span)):
        if span[s] in "0123456789($" and (s == 0 or span[s - 1] not in "0123456789.,"):
            value = calculate(span[s:])
            if value is not None:
                return span[s:].strip(), ("" if m.group(1) else " ") + format_number(value)
    return None


# ----------------------------------------------------------------------------- generation

class TextCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str: ...


@dataclass
class CotOutput:
    text: str
    n_tokens: int
    injections: list[tuple[str, str]] = field(default_factory=list)  # (span, inserted text)


@torch.inference_mode()
def generate_cot(model, tokenizer: TextCodec, prompt: list[int], *, sampling: Sampling,
                 stop: Sequence[str] = STOP, stop_ids: set[int] = frozenset(),
                 calculator: bool = False) -> CotOutput:
    """Decode one answer token by token with a KV cache. With `calculator`, after every
    token whose text ends an "a op b =" span, the result's tokens are appended and fed
    through the model in one cached step, so decoding continues after them. Injected tokens
    count towards max_new_tokens."""
    check_prompt(model, len(prompt))
    budget = new_token_budget(model, len(prompt), sampling.max_new_tokens)
    out = CotOutput("", 0)
    if budget <= 0:
        return out
    batch = DecodeBatch(model, [prompt], max_new_tokens=budget, compile=sampling.compile, sampling=sampling)
    ids: list[int] = []
    text = ""
    for (token,) in batch.decode():
        if token in stop_ids:
            break
        ids.append(token)
        extra: list[int] = []
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if calculator and not any(s in text for s in stop):
            hit = calculator_injection(text)
            extra = tokenizer.encode(hit[1])[:budget - len(ids)] if hit is not None else []
            if extra:
                ids += extra
                out.injections.append((hit[0], tokenizer.decode(extra)))
                text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0 or len(ids) >= budget:
            text = text[:cut] if cut >= 0 else text
            break
        if extra:  # the calculator's result: the token and the result in one cached pass,
            # whose last logits the loop samples from next (instead of the one-token step)
            batch.extend(torch.tensor([[token] + extra], device=batch.device))
    out.text, out.n_tokens = text, len(ids)
    return out


def _qa(question: str, answer: str = "") -> str:
    return f"Q: {question}\nA:" + (f" {answer}" if answer else "")


def _evaluate(lm, items: Sequence[Example], prompt_for: Callable[[Example, int], str], shots: int,
              extract: Callable[[str], str | None], *, calculator: bool, max_new_tokens: int,
              limit: int | None, progress: Callable[[int], None] | None = None,
              compile: bool = False, batch: int = 1) -> dict:
    """Greedy chain-of-thought on each item (PaLM and Wei et al. decode greedily); K is
    reduced with a warning, as GPT-3 did, when the prompt would not fit the context."""
    if lm.tokenizer is None:
        raise InputError(f"{lm.name or 'this model'} has no tokenizer; load a checkpoint to run CoT")
    model = optimize_for_inference(lm.model)
    tok = lm.tokenizer
    stop_ids = set(lm.eos_ids) | ({tok.eot_id} if tok.eot_token else set())
    context = model.config.context
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, compile=compile)
    chosen = list(items[:limit] if limit is not None else items)
    prompts, used = [], []
    for index, item in enumerate(chosen):
        k = shots
        ids = lm.encode(prompt_for(item, k))
        while len(ids) + max_new_tokens > context and k > 0:
            k -= 1
            ids = lm.encode(prompt_for(item, k))
        if k < shots:
            warnings.warn(f"item {index}: {shots} shots do not fit the context of {context} tokens "
                          f"with {max_new_tokens} new tokens; using {k}", stacklevel=3)
        prompts.append(ids)
        used.append(k)
    if calculator or batch <= 1:  # one item at a time (the calculator edits each sequence)
        outputs = []
        for ids in prompts:
            outputs.append(generate_cot(model, tok, ids, sampling=sampling, stop_ids=stop_ids,
                                        calculator=calculator))
            if progress:
                progress(1)
    else:  # the same greedy tokens, several items per forward pass (septet.eval.scoring)
        from .scoring import Scorer

        scorer = Scorer.from_loaded(lm, batch_size=batch, compile=compile)
        texts = scorer.generate_ids_until(prompts, stop=STOP, max_new_tokens=max_new_tokens,
                                          progress=progress)
        # n_tokens: the tokens of the kept text (the batched decoder does not report how
        # many it generated past a stop string); the one-at-a-time loop counts generated ids
        outputs = [CotOutput(text, len(tok.encode(text))) for text in texts]
    records = []
    for index, (item, k, gen) in enumerate(zip(chosen, used, outputs)):
        prediction = extract(gen.text)
        records.append({"index": index, "question": item.question, "gold": item.answer,
                        "shots": k, "completion": gen.text, "prediction": prediction,
                        "correct": prediction == item.answer, "n_tokens": gen.n_tokens,
                        "injections": [list(x) for x in gen.injections]})
    score = mean_stderr([float(r["correct"]) for r in records])
    return {"metric": "exact_match", "value": score.value, "n": score.n, "stderr": score.stderr,
            "records": records}


def run_gsm8k_cot(lm, problems: Sequence[Example], *, shots: int = 8, calculator: bool = False,
                  limit: int | None = None, max_new_tokens: int = 256,
                  exemplars: Sequence[Example] | None = None,
                  progress: Callable[[int], None] | None = None, compile: bool = False,
                  batch: int = 1) -> dict:
    """Exact match of chain-of-thought answers to arithmetic word problems, with the first
    `shots` of the 8 standard exemplars. `lm`: a septet.api.LoadedModel."""
    demos = list(exemplars) if exemplars is not None else gsm8k_exemplars()
    if not 0 <= shots <= len(demos):
        raise InputError(f"shots must be between 0 and {len(demos)} (the exemplars), got {shots}")

    def prompt_for(item: Example, k: int) -> str:
        return "\n\n".join([_qa(d.question, d.target) for d in demos[:k]] + [_qa(item.question)])

    return _evaluate(lm, problems, prompt_for, shots, extract_answer, calculator=calculator,
                     max_new_tokens=max_new_tokens, limit=limit, progress=progress, compile=compile,
                     batch=batch)


def run_mmlu_cot(lm, examples: Sequence[Example], *, shots: int = 4, calculator: bool = False,
                 limit: int | None = None, max_new_tokens: int = 256,
                 progress: Callable[[int], None] | None = None, compile: bool = False,
                 batch: int = 1) -> dict:
    """Exact match of the chosen letter on MMLU CoT dev examples; each item's exemplars are
    the first `shots` other examples of its subject (lm-eval's flan_cot_fewshot uses 4)."""
    by_subject: dict[str, list[Example]] = {}
    for e in examples:
        by_subject.setdefault(e.subject, []).append(e)

    def prompt_for(item: Example, k: int) -> str:
        others = [e for e in by_subject[item.subject] if e is not item][:k]
        parts = [_qa(e.question, e.target) for e in others] + [_qa(item.question, "Let's think step by step.")]
        return "\n\n".join(([item.description] if item.description else []) + parts)

    return _evaluate(lm, examples, prompt_for, shots, extract_choice, calculator=calculator,
                     max_new_tokens=max_new_tokens, limit=limit, progress=progress, compile=compile,
                     batch=batch)
