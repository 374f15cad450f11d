"""The Python entry point: `septet.load(name_or_path)`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import config_from_dict, get_preset
from .errors import CheckpointError, ConfigError
from .generate import Sampling, generate_ids
from .models import build
from .models.base import DecoderLM
from .tokenizer import Tokenizer
from .train.checkpoint import latest_checkpoint, load_checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a training run directory (its newest checkpoint)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{p} is neither a checkpoint (no config.json) nor a training run "
                              "directory with step-* checkpoints; pass a path from `septet train --out`")
    return latest


@dataclass
class LoadedModel:
    model: DecoderLM
    tokenizer: Tokenizer | None
    path: Path | None = None

    def generate(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> str:
        return "".join(self.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed))

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """Yield text pieces as tokens arrive; a piece is emitted once it decodes to whole
        characters, so a multi-byte UTF-8 character is never split."""
        tok = self.tokenizer
        if tok is None:
            raise ConfigError("this model has no tokenizer; use generate_ids with token ids")
        ids = tok.encode(prompt) if prompt else []
        if not ids:
            ids = [tok.eot_id]  # an empty prompt starts a document, as in training
        out: list[int] = []
        emitted = ""
        for t in generate_ids(self.model, ids, Sampling(**sampling), eos_id=tok.eot_id):
            if t == tok.eot_id:
                break
            out.append(t)
            text = tok.decode(out)
            if not text.endswith("\ufffd"):
                yield text[len(emitted):]
                emitted = text

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


def load(name_or_path: str | Path, *, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a septet checkpoint (or a run directory), or build a preset with random weights."""
    p = Path(name_or_path)
    if p.exists():
        ck = load_checkpoint(resolve_checkpoint(p))
        config = config_from_dict(ck.config, str(ck.path / "config.json"))
        with torch.device("meta"):
            model = build(config)
        try:
            model.load_state_dict(ck.model_state, strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "mismatch"
            raise CheckpointError(f"{ck.path / 'model.safetensors'} does not match config.json "
                                  f"({first}); re-save the checkpoint") from None
        tok = Tokenizer.load(ck.path) if ck.tokenizer_json else None
        return LoadedModel(model.to(device=device, dtype=dtype).eval(), tok, ck.path)
    preset = get_preset(str(name_or_path))  # raises a clear error for unknown names
    model = build(preset.config).to(device=device, dtype=dtype).eval()
    return LoadedModel(model, None, None)
