"""The KV cache inference allocates: the model's `KVCache`, with septet's decode-attention
kernel for one query over padded rows (it reads only the filled slots)."""

from __future__ import annotations

import torch

from .. import kernels
from ..nn.attention import KVCache


def kernel_attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      pad_mask: torch.Tensor) -> torch.Tensor | None:
    """septet's kernel for q (B, H, 1, D) over k, v (B, H_kv, S, D) where it applies (fp32 on
    a CPU, no autograd, kernels built), else None (the caller uses SDPA)."""
    if q.device.type == "cpu" and q.dtype == torch.float32 and not q.requires_grad and kernels.enabled():
        return torch.ops.septet.decode_attention(q, k, v, pad_mask, q.shape[-1] ** -0.5)
    return None


class KernelKVCache(KVCache):
    """A KVCache whose one-query attention over padded rows runs `kernel_attend_one`."""

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   pad_mask: torch.Tensor) -> torch.Tensor | None:
        return kernel_attend_one(q, k, v, pad_mask)
