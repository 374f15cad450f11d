"""Tasks: what an item looks like, a JSONL format users can write, and the name registry.

A JSONL task file holds one JSON object per line, either

    {"context": "Q: 2+2?\\nA:", "choices": ["3", "4"], "gold": 1}     multiple choice
    {"input": "Q: capital of France?\\nA:", "target": "Paris"}       free-form ("target"
                                                                     may be a list)

Optional per line: "split": "train" (a demonstration pool for few-shot; the rest is
test). An optional first line {"task": {...}} sets how the task is scored, with the
fields of `TaskConfig` (e.g. {"task": {"mode": "char", "separator": "\\n\\n"}}).

`get_task(spec)` resolves what a user types after `--task`: a registered name, a
`bigbench:NAME[/SUBTASK]`, a BIG-bench task.json path or a .jsonl path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from ..errors import DataError, InputError
from .metrics import FREEFORM_METRICS, MC_MODES

MAX_TASK_BYTES = 512 << 20  # a task file larger than this is not a task file


@dataclass(frozen=True)
class Doc:
    """One evaluation item, already in prompt form."""

    prompt: str  # what the model reads before the answer, e.g. "Q: ...\nA:"
    choices: tuple[str, ...] = ()  # multiple choice: candidate answers (without the delimiter)
    gold: int = -1  # index of the correct choice
    targets: tuple[str, ...] = ()  # free-form: accepted answers

    @property
    def is_mc(self) -> bool:
        return bool(self.choices)

    def answer(self) -> str:
        """The answer a demonstration shows."""
        return self.choices[self.gold] if self.is_mc else self.targets[0]


@dataclass(frozen=True)
class TaskConfig:
    """How a task is prompted and scored (GPT-3 §2 defaults)."""

    description: str = ""  # written once before the demonstrations
    separator: str = "\n"  # between demonstrations (GPT-3: newlines)
    target_delimiter: str = " "  # between a prompt and its answer
    mode: str = "token"  # multiple choice: sum | token | char | uncond (see metrics.choice_scores)
    uncond_prompt: str = "Answer:"  # the context of P(c | "Answer:") for mode "uncond"
    metric: str = "exact_match"  # free-form primary metric: accuracy | exact_match | f1
    stop: tuple[str, ...] = ("\n",)  # free-form answers end at these strings
    max_new_tokens: int = 32
    beams: int = 1  # GPT-3 used 4 (with length_penalty 0.6); 1 = greedy
    length_penalty: float = 0.6
    boundary: str = "joint"  # tokenisation of context|answer (see scoring.py)

    def check(self, where: str) -> "TaskConfig":
        if self.mode not in MC_MODES:
            raise DataError(f"{where}: mode {self.mode!r} is not one of {', '.join(MC_MODES)}")
        if self.metric not in FREEFORM_METRICS:
            raise DataError(f"{where}: metric {self.metric!r} is not one of {', '.join(FREEFORM_METRICS)}")
        if self.beams < 1 or self.max_new_tokens < 1:
            raise DataError(f"{where}: beams and max_new_tokens must be >= 1")
        if self.boundary not in ("joint", "separate"):
            raise DataError(f"{where}: boundary {self.boundary!r} is not 'joint' or 'separate'")
        return self


@dataclass
class Task:
    name: str
    test: list[Doc]
    train: list[Doc] = field(default_factory=list)
    config: TaskConfig = field(default_factory=TaskConfig)


# ----------------------------------------------------------------------------- JSONL

def load_jsonl(path: str | Path, name: str | None = None) -> Task:
    """A user task file (format in the module docstring), checked line by line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"task file {p} does not exist; pass a .jsonl file, a task.json or a task name")
    if p.stat().st_size > MAX_TASK_BYTES:
        raise DataError(f"{p}: {p.stat().st_size} bytes is larger than a task file can be "
                        f"({MAX_TASK_BYTES} bytes)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    config = TaskConfig()
    test: list[Doc] = []
    train: list[Doc] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                            "write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object like {{\"context\", \"choices\", \"gold\"}} "
                            f"or {{\"input\", \"target\"}}, got {type(obj).__name__}")
        if "task" in obj and not (test or train):
            config = _parse_config(obj["task"], where)
            continue
        doc = parse_doc(obj, where)
        split = obj.get("split", "test")
        if split not in ("train", "test"):
            raise DataError(f"{where}: field 'split' is {split!r}; use \"train\" or \"test\"")
        (train if split == "train" else test).append(doc)
    if not test:
        raise DataError(f"{p}: no test items; add lines like {{\"input\": ..., \"target\": ...}}")
    return Task(name or p.stem, test, train, config)


def parse_doc(obj: dict, where: str) -> Doc:
    """One item: {"context", "choices", "gold"} or {"input", "target"}."""
    if "context" in obj or "choices" in obj:
        context = _field(obj, "context", str, where)
        choices = _field(obj, "choices", list, where)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a list of at least 2 strings")
        gold = _field(obj, "gold", int, where)
        if isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise DataError(f"{where}: field 'gold' is {gold!r} but there are {len(choices)} choices; "
                            "gold is the 0-based index of the correct choice")
        return Doc(context, tuple(choices), gold)
    if "input" in obj:
        text = _field(obj, "input", str, where)
        target = obj.get("target")
        targets = [target] if isinstance(target, str) else target
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise DataError(f"{where}: field 'target' must be a string or a non-empty list of strings")
        return Doc(text, targets=tuple(targets))
    raise DataError(f"{where}: an item needs \"context\"+\"choices\"+\"gold\" (multiple choice) or "
                    f"\"input\"+\"target\" (free-form); found fields {sorted(obj)}")


def _field(obj: dict, key: str, kind: type, where: str):
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _parse_config(raw, where: str) -> TaskConfig:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: field 'task' must be an object of settings")
    known = {f.name: f.type for f in fields(TaskConfig)}
    kw = {}
    for key, value in raw.items():
        if key not in known:
            raise DataError(f"{where}: unknown task setting '{key}'; known: {', '.join(known)}")
        default = getattr(TaskConfig(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise DataError(f"{where}: task setting '{key}' must be a list of strings")
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(value) is not type(default):
            raise DataError(f"{where}: task setting '{key}' must be {type(default).__name__}")
        kw[key] = value
    return replace(TaskConfig(), **kw).check(where)


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, tuple[Callable[[], object], str]] = {}
_FAMILIES: dict[str, tuple[Callable[[str], object], str, str]] = {}  # prefix -> (loader, shown, desc)


def register_task(name: str, loader: Callable[[], object], description: str = "") -> None:
    """Make `--task NAME` load `loader()` (a Task, or any task object the CLI knows)."""
    _REGISTRY[name] = (loader, description)


def register_task_family(prefix: str, loader: Callable[[str], object], description: str = "",
                         argument: str = "ARG") -> None:
    """Make `--task PREFIX:ARG` load `loader(ARG)`, e.g. gsm8k-cot:problems.jsonl."""
    _FAMILIES[prefix] = (loader, f"{prefix}:{argument}", description)


def registered() -> tuple[dict[str, tuple[Callable[[], object], str]],
                        dict[str, tuple[Callable[[str], object], str, str]]]:
    """The tasks registered so far, (names, families); septet.eval.catalog registers the
    built-in ones and looks names up."""
    return dict(_REGISTRY), dict(_FAMILIES)


def parse_shots(text: str) -> list[int]:
    try:
        shots = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--shots {text!r}: expected comma-separated counts like 0,1,5") from None
    if not shots or any(k < 0 for k in shots):
        raise InputError(f"--shots {text!r}: expected non-negative counts like 0,1,5")
    return sorted(set(shots))
