"""Quantising a model while its checkpoint streams in (`QuantizeOnLoad`), so the float model
never exists whole: what `septet.load(..., quant=...)` uses. The result is the model
`plan.quantize_model` makes from the loaded float model, under the same `QuantPlan`."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from ...models.base import DecoderLM, pack_for_inference
from .blocks import Q8Linear
from .layers import weight_mode
from .plan import (
    QuantPlan,
    head_from_exact_rows,
    quantize_head,
    quantize_linear,
    quantize_linears,
    quantize_tied_head,
    septet_kernels,
)


class QuantizeOnLoad:
    """Quantise a model while its checkpoint streams in, one tensor at a time.

        model = build(config) on the meta device
        put = QuantizeOnLoad(model, QuantPlan("int4"))
        for name, tensor in checkpoint: put(name, tensor)   # names of model.state_dict()
        put.finish()   # the model, as quantize_model(float model, "int4") would leave it

    The tensors are grouped in units: each element of an outermost ModuleList / ModuleDict
    (a transformer block), else the module that holds them (the embedding, the final norm,
    an untied head). When a unit's last tensor arrives it is loaded (`assign`: the
    checkpoint's tensors are used without copies), its q/k/v and gate/up are packed as
    `DecoderLM.prepare_for_inference` packs them and its linear layers are quantised, so
    only the float weights of units still being read are alive. Tensors that are not
    quantised (embedding, norms) stay as given, cast to `dtype`. Quantisation works per
    output row (int8) or per row and group (int4), so packing before or after it gives
    the same bytes: the result equals the quantise-after-load model. (A unit that holds
    other units, such as a tensor of the model itself, is only loaded, and quantised with
    whatever is left at `finish`.)
    """

    def __init__(self, model: DecoderLM, plan: QuantPlan | str, *, dtype: torch.dtype | None = None,
                 source: str = ""):
        self.model, self.plan, self.dtype = model, QuantPlan.of(plan), dtype
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
                and self.model.logit_scale == 1.0 and weight_mode(self.plan.head_mode) == "int8"
                and septet_kernels(self.plan.head_mode, self.plan.group_size, self._shapes[key][1]))

    def _tied_head_from_blocks(self, key: str, blocks: tuple[torch.Tensor, torch.Tensor]) -> None:
        qs, d = blocks
        if (qs.shape[0], qs.shape[1] * 32) != self._shapes[key]:
            raise self._error(f"'{key}' has shape {[qs.shape[0], qs.shape[1] * 32]}, the model expects "
                              f"{list(self._shapes[key])}")
        fast = Q8Linear.from_blocks(qs, d, int8_act=self.plan.head_mode.endswith("-a8"))
        head_from_exact_rows(self.model, fast, self.dtype or torch.float32, self.plan)

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
            raise ConfigError(f"--quant {self.plan.mode} uses PyTorch's CPU kernels; load the model on the CPU")
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
                layer = quantize_head(module, self.plan)
            else:
                layer = quantize_linear(module, self.plan.mode, self.plan.group_size)
            parent.set_submodule(name, layer)
            return
        pack_for_inference(module)  # this unit's q/k/v and gate/up
        quantize_linears(self.model, module, self.plan)
        if module is getattr(self.model, "tok_emb", None):
            quantize_tied_head(self.model, self.plan)

    def finish(self) -> DecoderLM:
        """The quantised model, once every tensor has been given."""
        if self._missing:
            keys = sorted(k for ks in self._missing.values() for k in ks)
            raise self._error(f"missing '{keys[0]}' and {len(keys) - 1} more" if len(keys) > 1
                              else f"missing '{keys[0]}'")
        model = self.model
        # packs and quantises whatever no unit did (nothing, for a stack of blocks), and
        # marks the model inference-only
        model.prepare_for_inference()
        quantize_linears(model, model, self.plan)
        if getattr(model, "quant_head", None) is None:
            quantize_tied_head(model, self.plan)
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
