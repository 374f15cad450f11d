"""Mixture of experts: a top-k router over N SwiGLU experts with a load-balancing loss.

Experts are stored as stacked weights (E, d, f) so the layer is one module with three
parameters, cheap to shard. By default routing is dropless: every token reaches its k
experts. With a `capacity_factor` each expert takes at most ceil(cf · N·k / E)
assignments; overflow assignments are dropped (the token keeps its residual path) and the
dropped fraction is reported in `last_stats`, never silently.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MoE(nn.Module):
    def __init__(self, d_model: int, d_ff: int, n_expert: int, top_k: int,
                 capacity_factor: float | None = None):
        super().__init__()
        if not 1 <= top_k <= n_expert:
            raise ValueError(f"top_k={top_k} must be in [1, n_expert={n_expert}]")
        self.n_expert, self.top_k = n_expert, top_k
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(d_model, n_expert, bias=False)
        self.w_gate = nn.Parameter(torch.empty(n_expert, d_model, d_ff))
        self.w_up = nn.Parameter(torch.empty(n_expert, d_model, d_ff))
        self.w_down = nn.Parameter(torch.empty(n_expert, d_ff, d_model))
        for w, fan_in in ((self.w_gate, d_model), (self.w_up, d_model), (self.w_down, d_ff)):
            nn.init.normal_(w, std=fan_in ** -0.5)
        # set by forward: the auxiliary loss and routing statistics of the last call
        self.balance_loss = torch.zeros(())
        self.last_stats: dict[str, float] = {}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> top-k expert ids (N, k), their renormalised weights (N, k), and
        the Switch-Transformer balance loss E · Σ_e f_e · P_e (Fedus et al. 2021), where
        f_e is the fraction of assignments sent to e and P_e its mean router probability."""
        probs = F.softmax(self.router(x).float(), dim=-1)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(-1, keepdim=True)
        counts = torch.bincount(experts.flatten(), minlength=self.n_expert).float()
        frac = counts / experts.numel()
        balance = self.n_expert * (frac * probs.mean(0)).sum()
        return experts, weights, balance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        N = x.shape[0]
        experts, weights, self.balance_loss = self.route(x)
        flat_expert = experts.flatten()  # (N·k,) assignment → expert
        flat_token = torch.arange(N, device=x.device).repeat_interleave(self.top_k)
        flat_weight = weights.flatten()
        order = torch.argsort(flat_expert, stable=True)  # group assignments by expert
        counts = torch.bincount(flat_expert, minlength=self.n_expert).tolist()
        capacity = None
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * N * self.top_k / self.n_expert)
        out = torch.zeros_like(x)
        dropped, start = 0, 0
        for e, n in enumerate(counts):
            idx = order[start:start + n]
            start += n
            if capacity is not None and n > capacity:  # first come, first served
                dropped += n - capacity
                idx = idx[:capacity]
            if idx.numel() == 0:
                continue
            tok = flat_token[idx]
            h = x[tok]  # (n_e, C)
            h = (F.silu(h @ self.w_gate[e]) * (h @ self.w_up[e])) @ self.w_down[e]
            out.index_add_(0, tok, h * flat_weight[idx, None].to(h.dtype))
        self.last_stats = {"dropped_fraction": dropped / max(1, N * self.top_k),
                           "max_expert_load": max(counts) / max(1, N * self.top_k)}
        return out.view(shape)
