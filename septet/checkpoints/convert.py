"""One entry point for every checkpoint format septet reads, and one for export.

    load_any(path)            septet dir | HF dir | Meta LLaMA dir | .gguf file -> Loaded
    export(src, to, out)      any of those (or a Loaded) -> "hf" | "gguf" | "septet"
    build_on_meta(config)     the model for a config, without memory or random init
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write_text
from ..models import config_from_dict
from ..tokenizer import Tokenizer
from . import Loaded
from .hf import cast_state, read_json

ACCEPTED = ("a septet checkpoint directory (config.json with 'family'), "
            "an HF directory (config.json with 'architectures'/'model_type'), "
            "a Meta LLaMA directory (params.json + consolidated.00.pth), or a .gguf file")
TARGETS = ("hf", "gguf", "septet")

_TORCH_DTYPES = {"f32": torch.float32, "float32": torch.float32, "fp32": torch.float32,
                 "f16": torch.float16, "float16": torch.float16, "fp16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def detect_format(path: str | os.PathLike) -> str:
    """'septet' | 'hf' | 'meta' | 'gguf' for a checkpoint path, or a CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; pass {ACCEPTED}")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf"
        raise CheckpointError(f"{p} is a file but not a .gguf; pass {ACCEPTED}")
    if (p / "config.json").is_file():
        cfg = read_json(p / "config.json", "")
        if isinstance(cfg, dict) and isinstance(cfg.get("family"), str):
            return "septet"
        if isinstance(cfg, dict) and ("architectures" in cfg or "model_type" in cfg):
            return "hf"
        raise CheckpointError(f"{p / 'config.json'} has none of the fields 'family' (septet) or "
                              "'architectures'/'model_type' (HF); cannot tell the format")
    if (p / "params.json").is_file():
        return "meta"
    raise CheckpointError(f"{p} is not a checkpoint: expected {ACCEPTED}")


# A sink takes the model config and returns the function that receives each tensor
# (septet name, tensor) as it is read: see `load_any`.
TensorSink = Callable[[Any], Callable[[str, torch.Tensor], None]]

# in-place initialisers (nn.init's and Tensor's): on a meta tensor they change nothing
def load_septet(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Loaded:
    from .native import load_checkpoint

    ck = load_checkpoint(path)
    try:
        config = config_from_dict(ck.config, str(ck.path / "config.json"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    tokenizer = Tokenizer.load(ck.path) if ck.tokenizer_json is not None else None
    eos: tuple[int, ...] = ()
    if tokenizer is not None:
        try:
            eos = (tokenizer.eot_id,)
        except ConfigError:
            eos = ()
    chat = None
    if (ck.path / "chat_template.jinja").is_file():
        chat = (ck.path / "chat_template.jinja").read_text(encoding="utf-8")
    return Loaded(config=config, state_dict=cast_state(ck.model_state, dtype), tokenizer=tokenizer,
                  chat_template=chat, bos_id=eos[0] if eos else None, eos_ids=eos, add_bos=False,
                  source=str(ck.path), metadata={"format": "septet"})


def load_any(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
             sink: TensorSink | None = None) -> Loaded:
    """Load any supported checkpoint into septet's config + state dict + tokenizer.

    With a `sink`, the tensors are not collected: once the config is known, `sink(config)`
    gives a function that receives each (name, tensor) in turn, and the returned state
    dict is empty. A GGUF streams: each tensor is dequantised only when its turn comes
    (`quant_load.QuantizeOnLoad` quantises them on the way in). Other formats are read whole
    first, then handed over one by one, each dropped from the dict as it goes.
    """
    fmt = detect_format(path)
    if fmt == "gguf":
        try:
            from .gguf import load_gguf
        except ImportError as e:
            raise CheckpointError(f"{path}: GGUF loading is unavailable in this install ({e})") from None
        return load_gguf(path, dtype=dtype, sink=sink)
    if fmt == "septet":
        loaded = load_septet(path, dtype=dtype)
    elif fmt == "hf":
        from .hf import load_hf

        loaded = load_hf(path, dtype=dtype)
    else:
        from .meta import load_meta

        loaded = load_meta(path, dtype=dtype)
    if sink is not None:
        put = sink(loaded.config)
        state = loaded.state_dict
        for key in list(state):
            put(key, state.pop(key))
    return loaded


def export(src: str | os.PathLike | Loaded, to: str, out: str | os.PathLike, *,
           dtype: str | torch.dtype | None = None) -> Path:
    """Convert `src` (a path load_any accepts, or a Loaded) to format `to` at `out`.

    dtype: for "hf"/"septet" a torch dtype or "f32"/"f16"/"bf16" (default: as loaded, fp32);
    for "gguf" one of "f32", "f16", "q8_0" (default "f32").
    """
    if to not in TARGETS:
        raise CheckpointError(f"export target {to!r} is not supported; use one of {', '.join(TARGETS)}")
    loaded = src if isinstance(src, Loaded) else load_any(src)
    out = Path(out)
    if to == "gguf":
        from .export_gguf import DTYPES, save_gguf

        gdtype = "f32" if dtype is None else dtype
        if isinstance(gdtype, torch.dtype):
            gdtype = {torch.float32: "f32", torch.float16: "f16"}.get(gdtype, str(gdtype))
        if gdtype not in DTYPES:
            raise CheckpointError(f"GGUF export dtype {gdtype!r} is not supported; use one of {', '.join(DTYPES)}")
        return save_gguf(loaded.state_dict, loaded.config, out, tokenizer=loaded.tokenizer,
                         chat_template=loaded.chat_template, dtype=gdtype, bos_id=loaded.bos_id,
                         eos_id=loaded.eos_ids[0] if loaded.eos_ids else None, add_bos=loaded.add_bos,
                         pre=str(loaded.metadata.get("tokenizer.ggml.pre", "default")))
    tdtype = _torch_dtype(dtype)
    state = cast_state(loaded.state_dict, tdtype)
    if to == "hf":
        from .export_hf import save_hf

        return save_hf(state, loaded.config, out, tokenizer=loaded.tokenizer, chat_template=loaded.chat_template)
    from .native import save_checkpoint

    save_checkpoint(out, model_state=state, config=loaded.config.to_dict(),
                    tokenizer_json=loaded.tokenizer.to_json_str() if loaded.tokenizer is not None else None)
    if loaded.chat_template is not None:
        atomic_write_text(out / "chat_template.jinja", loaded.chat_template)
    return out


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _TORCH_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported here; use f32, f16 or bf16")
    return _TORCH_DTYPES[dtype]


__all__ = ["load_any", "export", "detect_format", "load_septet", "TensorSink",
           "ACCEPTED", "TARGETS"]
