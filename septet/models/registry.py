"""Looking up presets and families by name. Importing septet.models (this package's
__init__) registers every family and preset before any of these run."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import DecoderConfig, Preset, registered_families, registered_presets
from ..errors import ConfigError


def presets() -> dict[str, Preset]:
    return registered_presets()


def get_preset(name: str) -> Preset:
    presets_ = registered_presets()
    if name not in presets_:
        import difflib

        close = difflib.get_close_matches(name, presets_, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "run `septet models` for the list"
        raise ConfigError(f"unknown model preset '{name}': {hint}")
    return presets_[name]


def config_from_dict(d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
    """Rebuild a config from its dict; errors name `source` and the offending field."""
    families = registered_families()
    if not isinstance(d, dict) or "family" not in d:
        raise ConfigError(f"{source}: missing field 'family' (one of {', '.join(sorted(families))})")
    fam = d["family"]
    if fam not in families:
        raise ConfigError(f"{source}: field 'family' is {fam!r}; expected one of {', '.join(sorted(families))}")
    cls = families[fam]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - {"family"})
    if unknown:
        raise ConfigError(f"{source}: unknown field '{unknown[0]}' for family {fam}; remove it")
    kwargs = {k: v for k, v in d.items() if k != "family"}
    for f in dataclasses.fields(cls):
        if f.name in kwargs and not _type_ok(kwargs[f.name], str(f.type)):
            raise ConfigError(f"{source}: field '{f.name}' must be {f.type}, got {kwargs[f.name]!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ConfigError) as e:
        raise ConfigError(f"{source}: {e}") from None


_SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _type_ok(value: Any, annotation: str) -> bool:
    """Check a JSON value against a field annotation such as 'int', 'float | None'.
    bool is not accepted where a number is expected (JSON true is not 1)."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None" and value is None:
            return True
        kinds = _SCALARS.get(part)
        if kinds and isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
            return True
    return False
