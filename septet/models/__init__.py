"""Model families. Importing this package registers every family and its presets."""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import DecoderConfig
from ..errors import ConfigError
from .base import DecoderLM, LossParts, count_params
from .gpt3 import GPT3, GPT3Config
from .gpt4 import GPT4, GPT4Config
from .lamda import LaMDA, LaMDAConfig
from .llama import LLaMA, LLaMAConfig
from .palm import PaLM, PaLMConfig
from .registry import config_from_dict, get_preset, presets

MODELS: dict[type[DecoderConfig], type[DecoderLM]] = {
    GPT3Config: GPT3, PaLMConfig: PaLM, LLaMAConfig: LLaMA, LaMDAConfig: LaMDA, GPT4Config: GPT4,
}


def build(config: DecoderConfig | str, *, device: torch.device | str | None = None) -> DecoderLM:
    """Instantiate a model from a config (or a preset name). device="meta" allocates nothing."""
    if isinstance(config, str):
        config = get_preset(config).config
    cls = MODELS.get(type(config))
    if cls is None:
        raise ConfigError(f"no model for config type {type(config).__name__}")
    if device is None:
        return cls(config)
    with torch.device(device):
        return cls(config)


_INIT_FUNCS = frozenset({
    "normal_", "uniform_", "trunc_normal_", "zero_", "zeros_", "ones_", "fill_", "constant_",
    "random_", "exponential_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
    "xavier_normal_", "orthogonal_", "eye_", "dirac_", "sparse_",
})


class _SkipMetaInit(TorchFunctionMode):
    """Turns random initialisation of meta tensors into a no-op. Meta tensors have no
    values, yet torch runs `normal_` on them through its Python reference implementation,
    whose first call imports torch._dynamo: seconds and tens of MB on a model load."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INIT_FUNCS:
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def build_on_meta(config) -> torch.nn.Module:
    """`build(config)` on the meta device (shapes only), skipping the random init: what a
    checkpoint loader fills with the file's tensors."""
    with torch.device("meta"), _SkipMetaInit():
        return build(config)


def describe(config: DecoderConfig) -> dict:
    """Parameter counts of a config, computed on the meta device (nothing allocated)."""
    model = build(config, device="meta")
    total, non_emb = count_params(model)
    out = {"params": total, "non_embedding_params": non_emb}
    if isinstance(config, GPT4Config):
        # active parameters per token: top_k of n_expert experts run
        expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.w_" in n)
        out["active_params"] = total - expert + expert * config.top_k // config.n_expert
    return out


__all__ = ["build", "build_on_meta", "config_from_dict", "describe", "get_preset", "presets", "count_params",
           "DecoderLM", "LossParts", "MODELS",
           "GPT3", "GPT3Config", "PaLM", "PaLMConfig", "LLaMA", "LLaMAConfig",
           "LaMDA", "LaMDAConfig", "GPT4", "GPT4Config", "nn"]
