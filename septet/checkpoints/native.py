"""septet's own checkpoint format: one directory, written atomically, resumable bit-exactly on CPU.

    <path>/config.json                 the caller's config dict (must contain "family")
    <path>/model.safetensors           model weights; tied weights stored once (see below)
    <path>/tokenizer.json              optional, the caller's tokenizer JSON text
    <path>/training_state/             optional, only for resuming
        optimizer.safetensors          every tensor of optimizer.state_dict()
        state.json                     {"format", "train": caller's dict, "optimizer": the
                                       state_dict's non-tensor part with tensor references}
        rng.safetensors                torch CPU RNG state (+ one per CUDA device)

Tied weights: safetensors refuses tensors that share memory, so a tensor that is an exact
alias of an earlier one is stored once and its name is recorded in the file's metadata
("septet.aliases": {alias: stored_name}); load_checkpoint puts the alias key back, pointing
at the same tensor, so model.load_state_dict(strict=True) accepts the dict and a model that
ties the weights stays tied. Overlapping views that are not exact aliases are cloned.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from septet.errors import CheckpointError
from septet.fileio import atomic_dir

FORMAT = 1
TRAINING_STATE = "training_state"
_ALIASES = "septet.aliases"


@dataclass
class Checkpoint:
    path: Path
    config: dict
    model_state: dict[str, torch.Tensor]
    tokenizer_json: str | None = None
    optimizer_state: dict | None = None
    train_state: dict | None = None
    rng: dict[str, torch.Tensor] | None = None


# ---------------------------------------------------------------- RNG

def capture_rng() -> dict[str, torch.Tensor]:
    """The torch RNG states the project uses (numpy/python RNG are not used)."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda_{i}"] = s
    return states


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    """Restore states from capture_rng(); CUDA devices missing on this machine are skipped."""
    torch.set_rng_state(rng["torch_cpu"].to(torch.uint8).cpu())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            state = rng.get(f"cuda_{i}")
            if state is not None:
                torch.cuda.set_rng_state(state.to(torch.uint8).cpu(), i)


# ---------------------------------------------------------------- tensors

def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def _dedup(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU copies safe for save_file, and {alias: stored_name} for exact aliases."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise CheckpointError(f"state entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.numel() > 0 and t.device.type != "meta":
            key = _storage_key(t)
            twin = next(
                (n for n, o in seen.get(key, [])
                 if o.dtype == t.dtype and o.shape == t.shape and o.stride() == t.stride()
                 and o.storage_offset() == t.storage_offset()),
                None,
            )
            if twin is not None:
                aliases[name] = twin
                continue
            shared = key in seen
            seen.setdefault(key, []).append((name, t))
            # A different view of the same storage (e.g. a slice of a fused matrix) gets
            # its own copy: safetensors rejects shared memory.
            t = t.clone() if shared else t
        out[name] = t.cpu().contiguous()
    return out, aliases


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    out, aliases = _dedup(tensors)
    save_file(out, str(path), metadata={_ALIASES: json.dumps(aliases), "format": str(FORMAT)})


def _load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the {what} cannot be loaded (re-save the checkpoint)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads(meta.get(_ALIASES, "{}"))
    except Exception as e:  # safetensors raises its own error types for bad headers/sizes
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} is truncated or corrupt ({reason}); re-save it or load another checkpoint"
        ) from None
    for alias, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{path} metadata aliases {alias!r} to missing tensor {target!r}; re-save it")
        tensors[alias] = tensors[target]
    return tensors


# ---------------------------------------------------------------- optimizer state

def _encode(obj, path: str, tensors: dict[str, torch.Tensor], allow_tensors: bool):
    """JSON-able form of a state_dict that round-trips exactly: tuples, non-string dict
    keys and tensors are tagged (tensors go to `tensors` under their path)."""
    if torch.is_tensor(obj):
        if not allow_tensors:
            raise CheckpointError(f"train_state entry {path!r} is a tensor; store a Python number or list")
        if path in tensors:
            raise CheckpointError(f"optimizer state key {path!r} is ambiguous; rename the state entry")
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors, allow_tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors, allow_tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors, allow_tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{path}/key", tensors, False),
                               _encode(v, f"{path}/{k}", tensors, allow_tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"state entry {path!r} has type {type(obj).__name__}, which a checkpoint cannot store")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"optimizer tensor {key!r} is missing from optimizer.safetensors; re-save it")
            return tensors[key]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def flatten_optimizer_state(state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Split an optimizer state_dict into (JSON-able structure, {key: tensor})."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(state, "opt", tensors, allow_tensors=True), tensors


def unflatten_optimizer_state(structure: dict, tensors: dict[str, torch.Tensor]) -> dict:
    return _decode(structure, tensors)


# ---------------------------------------------------------------- save / load

def save_checkpoint(
    path: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    config: dict,
    tokenizer_json: str | None,
    optimizer_state: dict | None = None,
    train_state: dict | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint directory atomically: a crash mid-save leaves the old one intact.

    training_state/ is written when optimizer_state or train_state is given; `rng`
    defaults to capture_rng() at the time of the call.
    """
    path = Path(path)
    if not isinstance(config, dict) or not isinstance(config.get("family"), str):
        raise CheckpointError(f"config for {path} needs a string 'family' field (e.g. 'llama')")
    if tokenizer_json is not None and not isinstance(tokenizer_json, str):
        raise CheckpointError(f"tokenizer_json for {path} must be the tokenizer's JSON text or None")
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    resumable = optimizer_state is not None or train_state is not None
    if resumable:
        opt_struct, opt_tensors = (None, {})
        if optimizer_state is not None:
            opt_struct, opt_tensors = flatten_optimizer_state(optimizer_state)
        state_json = {
            "format": FORMAT,
            "train": _encode(train_state or {}, "train", {}, allow_tensors=False),
            "optimizer": opt_struct,
        }
        state_text = json.dumps(state_json, indent=1, sort_keys=True) + "\n"
        rng = capture_rng() if rng is None else rng

    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(config_text, encoding="utf-8")
        _save_tensors(tmp / "model.safetensors", model_state)
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        if resumable:
            ts = tmp / TRAINING_STATE
            ts.mkdir()
            if optimizer_state is not None:
                _save_tensors(ts / "optimizer.safetensors", opt_tensors)
            _save_tensors(ts / "rng.safetensors", rng)
            (ts / "state.json").write_text(state_text, encoding="utf-8")


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or re-save the checkpoint") from None


def load_checkpoint(path: str | Path, *, with_training_state: bool = False) -> Checkpoint:
    """Load and validate a checkpoint directory (tensors on CPU)."""
    path = Path(path)
    if not path.is_dir():
        hint = ""
        old = path.parent / f".{path.name}.old"
        if old.is_dir():
            hint = f"; an interrupted save left the previous copy at {old}: rename it to {path.name}"
        raise CheckpointError(f"checkpoint directory {path} does not exist{hint}")
    config = _read_json(path / "config.json", "this is not a septet checkpoint (config.json holds the model family)")
    if not isinstance(config, dict) or not isinstance(config.get("family"), str):
        raise CheckpointError(f"{path / 'config.json'} has no 'family' field; add it (e.g. \"llama\") or re-save")
    model_state = _load_tensors(path / "model.safetensors", "model weights")

    tokenizer_json = None
    tok = path / "tokenizer.json"
    if tok.is_file():
        try:
            tokenizer_json = tok.read_text(encoding="utf-8")
            json.loads(tokenizer_json)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{tok} is not valid JSON ({e}); replace it with the model's tokenizer.json"
            ) from None

    ckpt = Checkpoint(path=path, config=config, model_state=model_state, tokenizer_json=tokenizer_json)
    if not with_training_state:
        return ckpt
    ts = path / TRAINING_STATE
    if not ts.is_dir():
        raise CheckpointError(
            f"{path} has no {TRAINING_STATE}/; it cannot be resumed (start a new run from it instead)"
        )
    state = _read_json(ts / "state.json", "the training state cannot be resumed; use another checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{ts / 'state.json'} has format {state.get('format') if isinstance(state, dict) else None!r}, "
            f"expected {FORMAT}; re-save it"
        )
    ckpt.train_state = _decode(state.get("train") or {}, {})
    if state.get("optimizer") is not None:
        opt_tensors = _load_tensors(ts / "optimizer.safetensors", "optimizer state")
        ckpt.optimizer_state = unflatten_optimizer_state(state["optimizer"], opt_tensors)
    ckpt.rng = _load_tensors(ts / "rng.safetensors", "RNG state")
    if "torch_cpu" not in ckpt.rng:
        raise CheckpointError(f"{ts / 'rng.safetensors'} has no 'torch_cpu' state; re-save the checkpoint")
    return ckpt


# ---------------------------------------------------------------- run directory layout

_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint after `step` updates lives: run_dir/step-00001000."""
    return Path(run_dir) / f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in run_dir, oldest first. Temporary and
    half-written directories are hidden names (".step-...tmp") and never match."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for d in run_dir.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / "config.json").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns what was removed."""
    if keep < 1:
        raise CheckpointError(f"prune_checkpoints keep={keep}; keep at least 1 checkpoint")
    removed = [p for _, p in list_checkpoints(run_dir)[:-keep]]
    for p in removed:
        shutil.rmtree(p)
    return removed


__all__ = [
    "Checkpoint", "capture_rng", "checkpoint_dir", "flatten_optimizer_state", "latest_checkpoint",
    "list_checkpoints", "load_checkpoint", "prune_checkpoints", "restore_rng", "save_checkpoint",
    "unflatten_optimizer_state",
]
