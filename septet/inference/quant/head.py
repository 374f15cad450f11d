"""The output head of a quantised model: a quantised matmul ranks the vocabulary, then
each row's best logits are recomputed in fp32 from float (or exact int8) weight rows.

Why: the head's logits are what top-1 and sampling read, and a quantised head's weight
error plus its kernel's bf16 output rounding cost agreement with llama.cpp; recomputing the
top few in fp32 is cheap and mends both (figures: docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError

# logits recomputed per row by default: a few already give fp32's top-1; more also mend the
# probabilities sampling reads, at about the same cost (docs/benchmarks.md)
REFINE_TOP = 64
# (rows, k, C) fp32 gathered at a time: ~4 MB (28 rows of a 64 x 576 top)
_REFINE_CHUNK = 1 << 20


class RefinedHead(nn.Module):
    """An output head: a quantised layer (`fast`) ranks the vocabulary, then the `top`
    best logits of each row are recomputed in fp32 from float weight rows.

    `rows` gives those rows: the tied embedding (nn.Embedding; not a copy, and not
    registered here, so the state dict and the weight count do not change), or None for
    the fast layer's own int8 rows (an untied Int8Linear head: exact arithmetic on the
    quantised weights, which mends the bf16 rounding of the logits but not the weights).
    `scale` multiplies the recomputed logits (PaLM's tied head). The logits come back in
    fp32 whatever the input dtype: bf16 would undo the recomputation."""

    def __init__(self, fast: nn.Module, rows: nn.Embedding | None = None, *, scale: float = 1.0,
                 top: int = REFINE_TOP):
        super().__init__()
        if rows is None and not hasattr(fast, "rows"):
            raise ConfigError("a refined head needs float rows (a tied embedding) or an int8 head")
        self.fast, self.scale = fast, scale
        self.top = max(1, min(top, fast.out_features))
        self.out_features, self.in_features = fast.out_features, fast.in_features
        self._rows = (rows,)  # a tuple: the embedding stays the model's own submodule only

    def _exact(self, idx: torch.Tensor) -> torch.Tensor:
        """Float rows `idx` (..., k) of the head's weight -> (..., k, C) fp32."""
        emb = self._rows[0]
        if emb is not None:
            return nn.functional.embedding(idx, emb.weight).float()
        return self.fast.rows(idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fast(x).float()
        shape = y.shape
        y2, x2 = y.view(-1, shape[-1]), x.reshape(-1, x.shape[-1])
        step = max(1, _REFINE_CHUNK // (self.top * self.in_features))
        for r in range(0, y2.shape[0], step):  # one pass when decoding (a row or a few)
            yr = y2[r:r + step]
            idx = yr.topk(self.top, dim=-1, sorted=False).indices  # (n, k)
            exact = torch.bmm(self._exact(idx), x2[r:r + step].float()[:, :, None])[..., 0]
            if self.scale != 1.0:
                exact = exact * self.scale
            if self.fast.bias is not None:
                exact = exact + self.fast.bias[idx].float()
            yr.scatter_(-1, idx, exact)
        return y

    def extra_repr(self) -> str:
        src = "tied embedding" if self._rows[0] is not None else "own int8 rows"
        return f"top={self.top} recomputed in fp32 from the {src}"


class BlockEmbedding(nn.Module):
    """A token embedding read from a quantised layer's exact rows (see plan.quantize_tied_head);
    the layer stays registered where it is (the head), not here."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        self._layer = (layer,)
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = layer.out_features, layer.in_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._layer[0].rows(tokens).to(self.dtype)  # (..., C)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantised head"
