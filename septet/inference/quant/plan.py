"""What to quantise and how: a frozen `QuantPlan`, and the functions that apply it to a model
(`quantize_model`) or to the parts of one as a checkpoint streams in (`on_load.QuantizeOnLoad`).

Every nn.Linear (after the model packs q/k/v and gate/up) becomes a weight-only layer; the
output head gets its own mode (int8 by default, as GGUF files keep the embedding at Q8_0)
and is refined (`head.RefinedHead`): its best logits per row are recomputed in fp32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ... import kernels
from ...errors import ConfigError
from ...models.base import DecoderLM
from .blocks import Q4Linear, Q8Linear
from .head import REFINE_TOP, BlockEmbedding, RefinedHead
from .layers import MODES, Int4Linear, Int8Linear, check_ops, weight_mode


@dataclass(frozen=True)
class QuantPlan:
    """mode: the body's layers (MODES); head: the output head's mode (None: the same as
    mode; under an "-a8" mode the head's activations are int8 too); group_size: inputs per
    int4 scale; refine: best logits per row the head recomputes in fp32 (0: none)."""

    mode: str
    head: str | None = "int8"
    group_size: int = 32
    refine: int = REFINE_TOP

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"quantisation {self.mode!r} is not one of {', '.join(MODES)}")
        if self.head_mode not in MODES:
            raise ConfigError(f"head quantisation {self.head_mode!r} is not one of {', '.join(MODES)}")
        if self.group_size <= 0 or self.refine < 0:
            raise ConfigError(f"group_size must be > 0 and refine >= 0, got {self.group_size}, {self.refine}")

    @property
    def head_mode(self) -> str:
        head = self.head or self.mode
        if self.mode.endswith("-a8") and not head.endswith("-a8"):
            head += "-a8"
        return head

    @classmethod
    def of(cls, plan: "QuantPlan | str", **fields) -> "QuantPlan":
        """A plan, or one made from a mode name and `fields`."""
        if isinstance(plan, str):
            return cls(plan, **fields)
        return dataclasses.replace(plan, **fields) if fields else plan


def septet_kernels(mode: str, group_size: int, in_features: int) -> bool:
    """Whether a `mode` layer uses septet's own kernels (septet.kernels: Q4_1 / Q8_0 blocks of
    32) rather than torch's: when they are available here (SEPTET_KERNELS=0 selects torch's,
    e.g. to compare the two) and the blocks fit (int4 groups of 32)."""
    if in_features % 32:
        return False
    if weight_mode(mode) == "int4" and group_size != 32:
        return False
    return kernels.available()


def quantize_linear(layer: nn.Linear | torch.Tensor, mode: str, group_size: int = 32) -> nn.Module:
    """An int8 / int4 layer computing what `layer` (or a bare (N, K) weight) does: septet's
    Q8Linear / Q4Linear where `septet_kernels` allows, else Int8Linear / Int4Linear (which
    have no int8-activation arithmetic: "-a8" modes need septet's kernels)."""
    if mode not in MODES:
        raise ConfigError(f"quantisation {mode!r} is not one of {', '.join(MODES)}")
    if isinstance(layer, nn.Linear):
        weight, bias = layer.weight, layer.bias
    else:
        weight, bias = layer, None
    wmode, a8 = weight_mode(mode), mode.endswith("-a8")
    if septet_kernels(mode, group_size, weight.shape[1]):
        cls = Q8Linear if wmode == "int8" else Q4Linear
        return cls(weight, bias, int8_act=a8)
    if a8:
        why = kernels.why_not() or f"a ({weight.shape[0]}, {weight.shape[1]}) weight is not in blocks of 32"
        raise ConfigError(f"--quant {mode} needs septet's kernels, which are not usable here ({why}); "
                          f"use --quant {wmode}")
    check_ops(wmode)
    if wmode == "int8":
        return Int8Linear(weight, bias)
    return Int4Linear(weight, bias, group_size=group_size)


def quantize_head(layer: nn.Linear, plan: QuantPlan) -> nn.Module:
    """An untied output head: quantised, and refined from its own int8 rows (see
    RefinedHead; an int4 head has no cheap float rows, so it is left as it is)."""
    fast = quantize_linear(layer, plan.head_mode, plan.group_size)
    if plan.refine and hasattr(fast, "rows"):  # int8 rows
        return RefinedHead(fast, None, top=plan.refine)
    return fast


def quantize_linears(model: nn.Module, root: nn.Module, plan: QuantPlan) -> None:
    """Replace every nn.Linear inside `root` (a part of `model`) by its quantised form; the
    model's own `lm_head` gets the head's mode."""
    # names, not modules: holding every float layer until the loop ends would keep the
    # whole unquantised part alive next to the quantised one (peak memory)
    targets = [(parent, name) for parent in root.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name in targets:
        layer = parent.get_submodule(name)
        if parent is model and name == "lm_head":
            parent.set_submodule(name, quantize_head(layer, plan))
        else:
            parent.set_submodule(name, quantize_linear(layer, plan.mode, plan.group_size))


def exact_logits(layer: nn.Module) -> bool:
    """Whether a head's logits are already the fp32 products of its own exact rows (septet's
    Q8_0 kernels with fp32 activations, fed fp32), so that recomputing its top rows from
    those rows (RefinedHead) would give the same numbers, up to summation order."""
    return hasattr(layer, "rows") and getattr(layer, "int8_act", True) is False


def holds_exactly(layer: nn.Module, w: torch.Tensor, chunk: int = 256) -> bool:
    """Whether `layer`'s exact rows (int8 layers have them) equal the float weight `w`."""
    if not hasattr(layer, "rows"):
        return False
    for r in range(0, w.shape[0], chunk):
        idx = torch.arange(r, min(r + chunk, w.shape[0]))
        if not torch.equal(layer.rows(idx), w[idx].float()):
            return False
    return True


def head_from_exact_rows(model: DecoderLM, fast: nn.Module, dtype: torch.dtype, plan: QuantPlan) -> None:
    """A tied head whose quantised layer `fast` holds the embedding exactly: the lookup reads
    its rows too (`BlockEmbedding`), the float table is dropped, and the head is refined
    only where its logits are not already exact."""
    model.set_submodule("tok_emb", BlockEmbedding(fast, dtype))
    top = 0 if dtype == torch.float32 and exact_logits(fast) else plan.refine
    model.set_quantized_head(RefinedHead(fast, None, top=top) if top else fast)


def quantize_tied_head(model: DecoderLM, plan: QuantPlan) -> None:
    """A tied head: quantise a copy of the embedding for the output matmul only, whose top
    logits are then recomputed from the embedding itself (RefinedHead).

    When the quantised copy holds the embedding exactly (a GGUF's Q8_0 token table, which
    re-quantises to itself in Q8_0 blocks), the float table carries nothing more: the
    lookup reads the blocks too and the float copy is dropped, the refinement reading the
    same exact rows."""
    if getattr(model, "lm_head", None) is not None or not hasattr(model, "tok_emb"):
        return
    w = model.tok_emb.weight.detach()
    scale = model.logit_scale
    fast = quantize_linear(w * scale if scale != 1.0 else w, plan.head_mode, plan.group_size)
    if scale == 1.0 and holds_exactly(fast, w):
        head_from_exact_rows(model, fast, w.dtype, plan)
        return
    model.set_quantized_head(RefinedHead(fast, model.tok_emb, scale=scale, top=plan.refine)
                             if plan.refine else fast)


def quantize_model(model: DecoderLM, plan: QuantPlan | str, **fields) -> DecoderLM:
    """Replace the model's linear layers (and a tied head) by weight-only layers, in place:
    `quantize_model(model, QuantPlan("int4"))`, or `quantize_model(model, "int4", group_size=64)`.

    The model becomes inference-only (its state_dict changes). Returns the model."""
    plan = QuantPlan.of(plan, **fields)
    model.prepare_for_inference()
    p = next(model.parameters())
    if p.device.type != "cpu":
        raise ConfigError(f"--quant {plan.mode} uses PyTorch's CPU kernels; load the model on the CPU")
    quantize_linears(model, model, plan)
    quantize_tied_head(model, plan)
    return model
