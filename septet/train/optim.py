"""Optimizers: AdamW (GPT-3, LLaMA) and unfactored Adafactor (PaLM).

PaLM (Chowdhery et al. 2022, sec. 5) trained with "Adafactor without factorization",
which the paper calls effectively Adam with *parameter scaling*: the update is multiplied
by the RMS of the parameter, so the learning rate is relative to the parameter's scale.
Its hyper-parameters: β1 = 0.9, β2(k) = 1 − k^−0.8, update clipping at RMS 1.0 and a
"dynamic weight decay of lr^2.0".
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from septet.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Matrices (ndim >= 2) decay; embeddings (any name containing "emb"), norm gains,
    biases and other 1-D tensors do not: decaying a gain or a token vector towards zero
    changes what the layer computes rather than regularising it (GPT-2/nanoGPT practice,
    kept by LLaMA). Tied parameters appear once (named_parameters de-duplicates).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and "emb" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def beta2_at(step: int, decay_rate: float = 0.8) -> float:
    """Adafactor's second-moment decay β2(k) = 1 − k^−decay_rate (k counts from 1).

    β2(1) = 0, so the first estimate is exactly g² and no bias correction is needed;
    PaLM found this more stable than a fixed 0.99 because rare embedding tokens get
    poorly estimated second moments over short windows.
    """
    return 1.0 - float(step) ** (-decay_rate)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


class Adafactor(torch.optim.Optimizer):
    """Unfactored Adafactor with PaLM's settings.

    Per parameter p with gradient g, at its own step k (1-based, kept in state):
        v   = β2(k)·v + (1 − β2(k))·(g² + eps1)          second moment, full (unfactored)
        u   = g / sqrt(v);  u /= max(1, RMS(u) / clip_threshold)      update clipping
        m   = β1·m + (1 − β1)·u;  m̂ = m / (1 − β1^k)
        p  -= lr · max(eps2, RMS(p)) · m̂                  parameter scaling (relative lr)
        p  -= weight_decay · lr^weight_decay_power · p     decoupled; PaLM: 1 · lr²
    Choice: m is bias-corrected as in Adam (PaLM describes the optimizer as Adam with
    parameter scaling), so a step-1 update has RMS lr·RMS(p); T5X's Adafactor leaves it
    uncorrected, which only shrinks the first ~20 steps. Parameter scale uses p before
    the update. State tensors are fp32 whatever the parameter dtype (bf16 second moments
    lose the small values that matter), and the update is computed in fp32.

    `weight_decay` is a multiplier on lr^power, not an AdamW-style rate: PaLM is
    weight_decay=1.0, weight_decay_power=2.0; param_groups() sets 0.0 for norms/biases.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        beta1: float = 0.9,
        decay_rate: float = 0.8,
        clip_threshold: float = 1.0,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        weight_decay: float = 1.0,
        weight_decay_power: float = 2.0,
    ) -> None:
        if lr < 0:
            raise ConfigError(f"Adafactor lr={lr} is negative; use a learning rate >= 0")
        if not 0.0 <= beta1 < 1.0:
            raise ConfigError(f"Adafactor beta1={beta1} is outside [0, 1); PaLM uses 0.9")
        defaults = dict(
            lr=lr, beta1=beta1, decay_rate=decay_rate, clip_threshold=clip_threshold,
            eps1=eps1, eps2=eps2, weight_decay=weight_decay,
            weight_decay_power=weight_decay_power,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ConfigError("Adafactor does not support sparse gradients; use dense embeddings")
                self._update_param(p, group)
        return loss

    def _update_param(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if group["beta1"] > 0:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        k = state["step"]
        lr = group["lr"]
        g = p.grad.float()
        p32 = p.float()

        beta2 = beta2_at(k, group["decay_rate"])
        v = state["exp_avg_sq"]
        v.mul_(beta2).add_(g.square().add_(group["eps1"]), alpha=1.0 - beta2)
        u = g / v.sqrt()
        if u.numel() > 0:
            u.div_(torch.clamp(_rms(u) / group["clip_threshold"], min=1.0))

        beta1 = group["beta1"]
        if beta1 > 0:
            m = state["exp_avg"]
            m.mul_(beta1).add_(u, alpha=1.0 - beta1)
            u = m / (1.0 - beta1**k)

        scale = torch.clamp(_rms(p32), min=group["eps2"]) if p.numel() > 0 else 1.0
        new = p32 - (lr * scale) * u
        wd = group["weight_decay"] * lr ** group["weight_decay_power"]
        if wd != 0:
            new.sub_(p32, alpha=wd)
        p.copy_(new)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to each parameter's dtype; put our moments back to
        # fp32 from the saved values so a bf16 run resumes bit-exactly.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)


OPTIMIZERS = ("adamw", "adafactor")


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Build "adamw" (GPT-3/LLaMA: betas (0.9, 0.95), eps 1e-8, wd 0.1) or "adafactor" (PaLM).

    For "adafactor", betas[0] is β1, betas[1] and eps are unused (β2 follows 1 − k^−0.8,
    eps1/eps2 are Adafactor's), and weight_decay multiplies lr²: pass 1.0 for PaLM.
    """
    groups = param_groups(model, weight_decay)
    key = name.lower()
    if key == "adamw":
        # fused: one kernel updates every parameter. Without it torch runs ~8 small ops per
        # parameter tensor (passing fused=False also turns off its multi-tensor default), a
        # large share of a tiny model's CPU step, and on a GPU those per-tensor launches made a
        # 125M-parameter step CPU-bound (docs/benchmarks.md).
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    if key == "adafactor":
        return Adafactor(groups, lr=lr, beta1=betas[0], weight_decay=weight_decay)
    raise ConfigError(f"optimizer {name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")


__all__ = ["Adafactor", "beta2_at", "build_optimizer", "param_groups"]
