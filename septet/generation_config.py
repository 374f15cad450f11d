"""A model's own sampling defaults: what its authors recommend decoding it with.

Where they come from, first found wins:
1. the checkpoint: an HF directory's `generation_config.json` (`temperature`, `top_p`,
   `top_k`, `min_p`, `repetition_penalty`; `do_sample: false` means greedy, as in
   transformers), or a GGUF file's `general.sampling.*` keys (`temp`, `top_p`, `top_k`,
   `min_p`; the ones llama.cpp reads);
2. septet's asset registry: `Asset.generation`, for files that carry none (SmolLM2's GGUF);
3. nothing: an empty dict, and each front end keeps its own fallback.

The checkpoint loaders read 1. while they read the file (`Loaded.generation`);
`generation_defaults(found, name)` adds 2. at load time (`septet.load`), and the result is kept
on the LoadedModel as `generation_defaults`: a dict of `Sampling` keywords.
`sampling_for(lm, fallback, **explicit)` is how chat, serve and generate pick their values:
an explicit value (a flag, a request field) wins, then the model's default, then the front
end's fallback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .errors import CheckpointError, SeptetError

KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p"}
_INT_KEYS = ("top_k",)


def _clean(raw: Mapping[str, Any], where: str) -> dict[str, float | int]:
    """Only the sampling keys, as numbers; a value of the wrong type is a one-line error."""
    out: dict[str, float | int] = {}
    for key in KEYS:
        v = raw.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CheckpointError(f"{where}: '{key}' must be a number, got {v!r}")
        out[key] = int(v) if key in _INT_KEYS else float(v)
    return out


def from_hf_dir(directory: Path) -> dict[str, float | int]:
    """The sampling values in an HF directory's generation_config.json ({} if none)."""
    f = Path(directory) / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    out = _clean(raw, str(f))
    if raw.get("do_sample") is False:  # transformers decodes greedily, whatever temperature says
        out = {"temperature": 0.0, **{k: v for k, v in out.items() if k == "repetition_penalty"}}
    return out


def from_gguf_metadata(metadata: Mapping[str, Any]) -> dict[str, float | int]:
    """The `general.sampling.*` values of a GGUF header ({} if none)."""
    raw = {ours: metadata[key] for key, ours in _GGUF_KEYS.items() if key in metadata}
    out = _clean(raw, "GGUF general.sampling")
    if out.get("top_k", 0) < 0:  # some files write -1 for "off"
        out["top_k"] = 0
    return out


def from_asset(name: str) -> dict[str, float | int]:
    """The values septet's registry keeps with asset `name` ({} if it is not an asset)."""
    from . import assets

    try:
        asset = assets.get_asset(name)
    except SeptetError:
        return {}
    return _clean(dict(asset.generation), f"asset {asset.name}")


def generation_defaults(found: Mapping[str, float | int], name: str | None = None) -> dict[str, float | int]:
    """The model's recommended sampling values: what its checkpoint carries (`found`, read by
    the loader: `Loaded.generation`), else those of registry asset `name` (the name it was
    loaded by), else {}."""
    return dict(found) if found else from_asset(name) if name else {}


def sampling_for(lm: Any, fallback: Mapping[str, Any], **explicit: Any) -> dict[str, Any]:
    """Sampling keywords: `fallback`, overridden by the model's defaults, overridden by each
    `explicit` value that is not None."""
    out = dict(fallback)
    out.update(lm.generation_defaults)
    out.update({k: v for k, v in explicit.items() if v is not None})
    return out
