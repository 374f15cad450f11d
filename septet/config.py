"""Model configs and the preset registry.

Each family file (septet/models/*.py) defines its own config dataclass, derived from
`DecoderConfig`, and registers its presets here with the paper's numbers. A config
round-trips through `config.json` as a plain dict with a "family" key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError


@dataclass
class DecoderConfig:
    """Fields every decoder-only LM has. Families add their own."""

    family: ClassVar[str] = "decoder"
    split_digits: ClassVar[bool] = False  # the tokenizer splits numbers into single digits

    vocab_size: int = 32000
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    n_kv_head: int = 0  # 0: same as n_head (MHA)
    d_head: int = 0  # 0: d_model // n_head
    d_ff: int = 0  # 0: family default
    context: int = 2048
    norm_eps: float = 1e-5
    z_loss: float = 0.0  # coefficient of log²Z added to the loss (PaLM: 1e-4)

    def __post_init__(self) -> None:
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.d_head == 0:
            self.d_head = self.d_model // self.n_head
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "d_head", "context"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"config field 'n_kv_head'={self.n_kv_head} must divide n_head={self.n_head}")

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}

    # fields whose 0 means "derive from the others" in __post_init__
    DERIVED: ClassVar[tuple[str, ...]] = ("n_kv_head", "d_head", "d_ff")

    def replace(self, **changes: Any) -> "DecoderConfig":
        """A copy with `changes`; fields that were derived (not set explicitly) are derived
        again, so replacing n_head also updates d_head and an MHA n_kv_head."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"'{unknown[0]}' is not a field of {self.family} configs "
                              f"({', '.join(sorted(names))})")
        rederived = dataclasses.replace(self, **{f: 0 for f in self.DERIVED})
        for f in self.DERIVED:
            if f not in changes and getattr(self, f) == getattr(rederived, f):
                changes[f] = 0
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Recipe:
    """The paper's training hyper-parameters for a preset (used as `septet train` defaults)."""

    optimizer: str = "adamw"  # adamw | adafactor
    lr: float = 3e-4
    schedule: str = "cosine"  # cosine | inverse_sqrt | constant
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    batch_tokens: int = 0  # paper's global batch in tokens (0: unpublished)
    train_tokens: int = 0  # paper's total training tokens (0: unpublished)


@dataclass(frozen=True)
class Preset:
    name: str
    config: DecoderConfig
    recipe: Recipe = field(default_factory=Recipe)
    note: str = ""  # e.g. "estimate: shape unpublished"; shown by `septet models`
    source: str = ""  # where the numbers come from


_PRESETS: dict[str, Preset] = {}
_FAMILIES: dict[str, type[DecoderConfig]] = {}


def register_family(cls: type[DecoderConfig]) -> type[DecoderConfig]:
    _FAMILIES[cls.family] = cls
    return cls


def register(preset: Preset) -> None:
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} registered twice")
    _PRESETS[preset.name] = preset


def registered_presets() -> dict[str, Preset]:
    """Every preset registered so far (septet.models registers them all on import)."""
    return dict(_PRESETS)


def registered_families() -> dict[str, type[DecoderConfig]]:
    return dict(_FAMILIES)
