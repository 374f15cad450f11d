"""Every task `--task` can name: the built-in ones registered (registry_tasks; easy-VQA for
VLM checkpoints), BIG-bench tasks by name, and task files by path."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..vlm import eval_task  # noqa: F401  (registers easy-vqa, for VLM checkpoints)
from . import registry_tasks  # noqa: F401  (registers the built-in tasks)
from .bigbench import load_bigbench, load_bigbench_path
from .tasks import load_jsonl, registered


def registered_tasks() -> dict[str, str]:
    """Registered names (and PREFIX:ARG families) with their descriptions."""
    names, families = registered()
    shown = {name: desc for name, (_, desc) in names.items()}
    shown.update({label: desc for _, label, desc in families.values()})
    return dict(sorted(shown.items()))


def get_task(spec: str):
    """What `--task` names: a registered name or PREFIX:ARG, bigbench:NAME[/SUB], a task.json
    or a .jsonl."""
    names, families = registered()
    if spec in names:
        return names[spec][0]()
    prefix, colon, arg = spec.partition(":")
    if colon and prefix in families:
        return families[prefix][0](arg)
    if spec.startswith("bigbench:"):
        return load_bigbench(spec[len("bigbench:"):])
    p = Path(spec)
    if p.suffix == ".jsonl":
        return load_jsonl(p)
    if p.name == "task.json" or p.suffix == ".json" or (p.is_dir() and (p / "task.json").is_file()):
        return load_bigbench_path(p)
    known = ", ".join(registered_tasks()) or "none"
    raise InputError(f"unknown task {spec!r}: not a registered task ({known}), not bigbench:NAME, "
                     "and not a .jsonl or task.json path")
