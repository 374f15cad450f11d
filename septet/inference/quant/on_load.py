"""Quantising a model while its checkpoint streams in (`QuantizeOnLoad`), so the float model
never exists whole: what `septet.load(..., quant=...)` uses. The layers and the whole-model
path are in septet.quant; the result here is the model `quant.quantize_model` makes."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, CheckpointError
from .quant import (BlockEmbedding, RefinedHead, _check_modes, _exact_logits, _quantize_head, _quantize_linears,
                    _quantize_tied_head, quantize_linear, septet_kernels, weight_mode)
from .refined_head import REFINE_TOP


class QuantizeOnLoad:
    """Quantise a model while its checkpoint streams in, one tensor at a time.

        model = build(config) on the meta device
        put = QuantizeOnLoad(model, "int4")
        for name, tensor in checkpoint: put(name, tensor)   # names of model.state_dict()
        put.finish()   # the model, as quantize_model(float model, "int4") would leave it

    The tensors are grouped in units: each element of an outermost ModuleList / ModuleDict
    (a transformer block), else the module that holds them (the embedding, the final norm,
    an untied head). When a unit's last tensor arrives it is loaded (`assign`: the
    checkpoint's tensors are used without copies), its q/k/v and gate/up are packed as
    `generate.optimize_for_inference` packs them and its linear layers are quantised, so
    only the float weights of units still being read are alive. Tensors that are not
    quantised (embedding, norms) stay as given, cast to `dtype`. Quantisation works per
    output row (int8) or per row and group (int4), so packing before or after it gives
    the same bytes: the result equals the quantise-after-load model. (A unit that holds
    other units, such as a tensor of the model itself, is only loaded, and quantised with
    whatever is left at `finish`.)
    """

    def __init__(self, model: nn.Module, mode: str, *, group_size: int = 32,
                 head: str | None = "int8", refine: int = REFINE_TOP, dtype: torch.dtype | None = None,
                 source: str = ""):
        self.head_mode = _check_modes(mode, head)
        self.model, self.mode, self.group_size, self.dtype = model, mode, group_size, dtype
        self.refine = refine
        self.source = source or "checkpoint"
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._unit_of: dict[str, str] = {}
        self._missing: dict[str, set[str]] = {}  # unit -> keys still to come
        self._got: dict[str, dict[str, torch.Tensor]] = {}
        self._untrimmed = 0  # bytes of float weights quantised since the last malloc_trim
        for key, t in model.state_dict(keep_vars=True).items():
            unit = _unit_name(model, key)
            self._shapes[key] = tuple(t.shape)
            self._unit_of[key] = unit
            self._missing.setdefault(unit, set()).add(key)
        # a unit is quantised when complete only if no other unit's tensors live inside it
        self._whole = {u for u in self._missing
                       if all(self._unit_of[k] == u for k in self._unit_of if _inside(k, u))}

    def _error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: weights do not match the config ({what})")

    def takes_blocks(self, key: str, type_name: str) -> bool:
        """Whether `key` may come as a GGUF's Q8_0 blocks instead of floats (see
        `checkpoints.gguf.load_gguf`): the tied token embedding, when the head would be
        Q8_0 blocks on septet's kernels anyway. Its blocks then serve as they are for the
        lookup and the head (`BlockEmbedding`), and the float table is never made (113 MB
        for SmolLM2 in fp32, the load's largest tensor). fp32 loads only: what
        `quantize_model` makes of the loaded fp32 model is then the same (a bf16 table is
        re-quantised from its rounded values instead)."""
        return (key == "tok_emb.weight" and type_name == "Q8_0" and getattr(self.model, "lm_head", None) is None
                and self.dtype in (None, torch.float32)
                and self.model.config.family != "palm" and weight_mode(self.head_mode) == "int8"
                and septet_kernels(self.head_mode, self.group_size, self._shapes[key][1]))

    def _tied_head_from_blocks(self, key: str, blocks: tuple[torch.Tensor, torch.Tensor]) -> None:
        from .kernels.linear import Q8Linear

        qs, d = blocks
        if (qs.shape[0], qs.shape[1] * 32) != self._shapes[key]:
            raise self._error(f"'{key}' has shape {[qs.shape[0], qs.shape[1] * 32]}, the model expects "
                              f"{list(self._shapes[key])}")
        fast = Q8Linear.from_blocks(qs, d, int8_act=self.head_mode.endswith("-a8"))
        self.model.tok_emb = BlockEmbedding(fast, self.dtype or torch.float32)
        top = 0 if _exact_logits(fast) else self.refine  # an fp32 load (takes_blocks)
        self.model.quant_head = RefinedHead(fast, None, top=top) if top else fast

    def __call__(self, key: str, tensor: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> None:
        unit = self._unit_of.get(key)
        if unit is None:
            raise self._error(f"unexpected key '{key}'")
        if key not in self._missing.get(unit, ()):
            raise self._error(f"'{key}' given twice")
        if isinstance(tensor, tuple):  # Q8_0 blocks, as `takes_blocks` asked
            self._tied_head_from_blocks(key, tensor)
            self._missing[unit].discard(key)
            if not self._missing[unit]:
                del self._missing[unit]
            return
        if tuple(tensor.shape) != self._shapes[key]:
            raise self._error(f"'{key}' has shape {list(tensor.shape)}, the model expects "
                              f"{list(self._shapes[key])}")
        if tensor.device.type != "cpu":
            raise ConfigError(f"--quant {self.mode} uses PyTorch's CPU kernels; load the model on the CPU")
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        self._got.setdefault(unit, {})[key] = tensor
        self._missing[unit].discard(key)
        if not self._missing[unit]:
            del self._missing[unit]
            tensors = self._got.pop(unit)
            self._untrimmed += sum(t.numel() * t.element_size() for t in tensors.values())
            self._finish_unit(unit, tensors)
            del tensors
            if self._untrimmed >= _TRIM_EVERY:
                # give the unit's freed temporaries back now: glibc keeps freed heap memory
                # (and raises its mmap threshold after big frees), so without this the
                # garbage of every unit adds up until the load ends (~90 MB on SmolLM2)
                malloc_trim()
                self._untrimmed = 0

    def _finish_unit(self, unit: str, tensors: dict[str, torch.Tensor]) -> None:
        from .generate import optimize_for_inference

        module = self.model.get_submodule(unit)
        n = len(unit) + 1 if unit else 0
        bad = module.load_state_dict({k[n:]: v for k, v in tensors.items()}, strict=False,
                                     assign=True).unexpected_keys
        assert not bad, bad  # keys were checked against this very model
        tensors.clear()
        if unit not in self._whole:
            return  # finish() quantises it, once what lives inside it is loaded too
        if isinstance(module, nn.Linear):  # a linear that is a unit of its own (an untied head)
            parent_name, _, name = unit.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            if parent is self.model and name == "lm_head":
                layer = _quantize_head(module, self.head_mode, self.group_size, self.refine)
            else:
                layer = quantize_linear(module, self.mode, self.group_size)
            setattr(parent, name, layer)
            return
        optimize_for_inference(module)  # packs this unit's q/k/v and gate/up
        module.__dict__.pop("_inference_ready", None)  # the model's flag, set by finish()
        _quantize_linears(self.model, module, self.mode, self.head_mode, self.group_size, self.refine)
        if module is getattr(self.model, "tok_emb", None):
            _quantize_tied_head(self.model, self.head_mode, self.group_size, self.refine)

    def finish(self) -> nn.Module:
        """The quantised model, once every tensor has been given."""
        from .generate import optimize_for_inference

        if self._missing:
            keys = sorted(k for ks in self._missing.values() for k in ks)
            raise self._error(f"missing '{keys[0]}' and {len(keys) - 1} more" if len(keys) > 1
                              else f"missing '{keys[0]}'")
        model = self.model
        # packs and quantises whatever no unit did (nothing, for a stack of blocks), and
        # sets the model's inference flags
        optimize_for_inference(model)
        _quantize_linears(model, model, self.mode, self.head_mode, self.group_size, self.refine)
        if model._modules.get("quant_head") is None:
            _quantize_tied_head(model, self.head_mode, self.group_size, self.refine)
        model._quant = self.mode
        return model


def _inside(key: str, unit: str) -> bool:
    return not unit or key.startswith(unit + ".")


def _unit_name(model: nn.Module, key: str) -> str:
    """The unit a state-dict key belongs to: the path to the element of the outermost
    ModuleList / ModuleDict on the way (a block), else to the module holding the tensor."""
    parts = key.split(".")
    mod: Any = model
    for i, part in enumerate(parts[:-1]):
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            return ".".join(parts[:i + 1])
        mod = mod._modules.get(part)
        if mod is None:
            break
    return ".".join(parts[:-1])


_TRIM_EVERY = 16 << 20


def malloc_trim() -> None:
    """Return the C heap's free memory to the OS (glibc; a no-op elsewhere). ~1 ms."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            import ctypes
            import ctypes.util

            name = ctypes.util.find_library("c")
            try:
                lib = ctypes.CDLL(name) if name else None
                _LIBC = lib.malloc_trim if lib is not None else False
            except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
                _LIBC = False
    if _LIBC:
        _LIBC(0)


_LIBC: Any = None


__all__ = ["QuantizeOnLoad", "malloc_trim"]
