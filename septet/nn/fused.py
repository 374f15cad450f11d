"""Fused forms of two hot patterns on the training / prefill path.

Each computes the same function as its plain form (to float rounding) in fewer kernels
and passes over memory, which is much of a small model's step on a CPU. Nothing here
has parameters, so checkpoints and module names are unaffected. The plain forms stay
for decoding (few tokens: concatenating weights would cost more than it saves) and, for
the loss, under torch.compile, whose code generator fuses the plain form itself.
(Measured and not kept: a hand-written RMSNorm backward and a fused SwiGLU gate/up
matmul, within noise on the tiny presets, benchmarks/train_throughput.py.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# below this many tokens per call (decoding), separate matmuls beat a weight concat
MIN_FUSE_TOKENS = 64


def should_fuse(x: torch.Tensor) -> bool:
    """Concatenate weights when the call processes many tokens (not when decoding)."""
    return x.numel() // x.shape[-1] >= MIN_FUSE_TOKENS


def linear_cat(x: torch.Tensor, layers: list[nn.Linear]) -> torch.Tensor:
    """torch.cat([layer(x) for layer in layers], -1) as one matmul: layers that read the
    same input (q, k, v) share one pass over x, forward and backward."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias)


class CrossEntropyZLoss(torch.autograd.Function):
    """From one log-softmax over logits (N, V) with targets (N,), the mean next-token
    cross-entropy and the mean log²Z (PaLM's z-loss before its coefficient), both over
    rows whose target is not ignore_index (0/0 = nan if none is). log Z is read off the
    log-softmax (logit − log p), so the vocabulary is not swept a second time, and the
    backward is softmax · per-row scale − one-hot: two passes over (N, V)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        logp = torch.log_softmax(logits, dim=-1)
        valid = targets != ignore_index
        n = valid.sum()
        tgt = targets.where(valid, 0)[:, None]
        nll = logp.gather(1, tgt).squeeze(1).neg_()
        lse = logits[:, 0] - logp[:, 0]  # log Z per row
        w = valid.to(logits.dtype)
        ce = (nll * w).sum() / n
        z2 = (lse.square() * w).sum() / n
        ctx.save_for_backward(logp, tgt, w, lse, n)
        return ce, z2

    @staticmethod
    def backward(ctx, g_ce: torch.Tensor, g_z2: torch.Tensor):
        logp, tgt, w, lse, n = ctx.saved_tensors
        scale = w / n  # d(mean over valid rows)/d(row)
        # d ce/dx = softmax − onehot(target);  d log²Z/dx = 2·logZ·softmax
        row = scale * (g_ce + 2 * g_z2 * lse)
        grad = logp.exp().mul_(row[:, None])
        grad.scatter_add_(1, tgt, (-g_ce * scale)[:, None].to(grad.dtype))
        return grad, None, None


def pack_linears(layers: list[nn.Linear]) -> nn.Linear:
    """One frozen linear layer computing `layers` side by side (outputs concatenated):
    q/k/v or gate/up packed once for inference."""
    w = torch.cat([layer.weight.detach() for layer in layers])
    has_bias = layers[0].bias is not None
    packed = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta")
    packed.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        packed.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]), requires_grad=False)
    return packed
