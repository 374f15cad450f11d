"""The package's shape, checked from its source: no import cycles (lazy imports count), the
layers import only downwards, no `_private` names cross modules, family differences stay
in models/, and decoding goes through the one batch engine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "septet"


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(target module, imported names, line) for every septet import, at any depth; a
    TYPE_CHECKING block does not count."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("septet")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("septet"):
                continue
            for a in node.names:  # `from pkg import submodule` depends on the submodule only
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, [a.name], node.lineno))
    return out


def _owner(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


GRAPH = {m: {t for t, _, _ in _imports(m, f) if _owner(t) not in (None, m)} for m, f in MODULES.items()}
GRAPH = {m: {_owner(t) for t in ts} for m, ts in GRAPH.items()}


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(MODULES):
        if m not in index:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# what each layer may import inside septet (prefixes); everything above it is off limits
ALLOWED = {
    "septet.nn": ("septet.nn", "septet.errors"),
    # models/ never imports train/; the leaves it reads files with are allowed (vision.py
    # fetches EfficientNet's asset, clip.py reads its own checkpoints)
    # Flamingo's and BLIP-2's beam generation drive the engine (inference/ never imports them)
    "septet.models": ("septet.models", "septet.nn", "septet.config", "septet.errors", "septet.inference.beam",
                      "septet.inference.engine",
                      "septet.data.images", "septet.tokenizer", "septet.assets", "septet.checkpoints.native",
                      "septet.fileio"),
    "septet.kernels": ("septet.kernels", "septet.env", "septet.errors"),
    "septet.config": ("septet.errors",),
    "septet.env": (),
    "septet.errors": (),
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downwards(layer):
    bad = [f"{m} imports {t}" for m, ts in GRAPH.items() if m == layer or m.startswith(layer + ".")
           for t in ts if not any(t == a or t.startswith(a + ".") for a in ALLOWED[layer])]
    assert not bad, bad


def test_no_private_names_cross_modules():
    bad = []
    for m, f in MODULES.items():
        for target, names, line in _imports(m, f):
            if _owner(target) != m and any(n.startswith("_") and not n.startswith("__") for n in names):
                bad.append(f"{f.relative_to(ROOT.parent)}:{line} imports {names} from {target}")
    assert not bad, bad


def _family_checks(path: Path) -> list[int]:
    """Lines comparing a `.family` to a string (family ==, !=, in)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "family":
            lines.append(node.lineno)
    return lines


def test_family_checks_stay_in_models():
    # checkpoints/ maps families to foreign formats (GGUF's "llama", HF's architectures)
    bad = [f"{f.relative_to(ROOT.parent)}:{n}" for m, f in MODULES.items()
           if not m.startswith(("septet.models", "septet.checkpoints", "septet.config")) for n in _family_checks(f)]
    assert not bad, bad


def test_decoding_goes_through_the_batch_engine():
    """Outside the model and the engine nobody makes a KV cache or moves one's tensors."""
    bad = []
    for m, f in MODULES.items():
        if m.startswith(("septet.models", "septet.nn", "septet.inference")):
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "new_cache":
                bad.append(f"{f.relative_to(ROOT.parent)}:{node.lineno} makes a cache")
            targets = node.targets if isinstance(node, ast.Assign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in ("k", "v", "pos", "max_len") and \
                        isinstance(t.value, ast.Name) and "cache" in t.value.id:
                    bad.append(f"{f.relative_to(ROOT.parent)}:{node.lineno} sets {t.value.id}.{t.attr}")
    assert not bad, bad
