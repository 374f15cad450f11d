"""BLIP-2's Querying Transformer (Li et al. 2023, §3.1 and Fig. 2).

Two transformers share one stack of BERT-style (post-LayerNorm) layers:
- an image transformer: Q learned query embeddings, which cross-attend to the frozen
  image encoder's features (in every other layer: cross_attention_freq = 2);
- a text transformer: BERT-style word + position embeddings of the text.
Queries and text run as one sequence [queries; text] through SHARED self-attention; what
each may see of the other is decided by the self-attention mask, which differs per
pre-training objective (§3.2, Fig. 2 right — built by the three functions below). The
feed-forward layers are not shared: queries and text have their own, as in BLIP-2.

Masks are (B, S, S) bool, S = Q + T, True = may attend; row = attending position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from .norms import LayerNorm


@dataclass
class QFormerConfig:
    """Defaults: the paper's BERT-base-sized Q-Former with 32 queries."""

    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    d_ff: int = 3072
    n_query: int = 32
    d_visual: int = 1408  # the image encoder's width (EVA ViT-g: 1408; EfficientNet-Lite0: 1280)
    cross_attention_freq: int = 2  # cross-attention in layers 0, f, 2f, ...
    vocab_size: int = 30522  # the text side's word table
    max_text: int = 512  # learned text positions
    norm_eps: float = 1e-12  # BERT's

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "n_head", "d_ff", "n_query", "d_visual",
                     "cross_attention_freq", "vocab_size", "max_text"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"Q-Former config field '{name}' must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"Q-Former d_model={self.d_model} must be a multiple of n_head={self.n_head}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- masks

def _key_mask(n_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) True on real keys: every query, and the non-padding text."""
    B = text_mask.shape[0]
    queries = torch.ones(B, n_query, dtype=torch.bool, device=text_mask.device)
    return torch.cat((queries, text_mask.bool()), dim=1)


def itc_mask(n_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Uni-modal mask (ITC): queries see queries, text sees text; never each other, so the
    query outputs describe the image alone and the text [CLS] the text alone (§3.2)."""
    T = text_mask.shape[1]
    is_query = torch.arange(n_query + T, device=text_mask.device) < n_query  # (S,)
    same_side = is_query[:, None] == is_query[None, :]  # (S, S)
    return same_side[None] & _key_mask(n_query, text_mask)[:, None, :]  # (B, S, S)


def itm_mask(n_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Bi-directional mask (ITM): every position sees every real position, so the query
    outputs capture image-text interaction (§3.2)."""
    S = n_query + text_mask.shape[1]
    keys = _key_mask(n_query, text_mask)  # (B, S)
    return keys[:, None, :].expand(-1, S, -1).clone()


def itg_mask(n_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Multi-modal causal mask (ITG): queries see queries only (not the text they must help
    generate); a text token sees all queries and the text before it and itself (§3.2)."""
    T = text_mask.shape[1]
    S = n_query + T
    pos = torch.arange(S, device=text_mask.device)
    is_query = pos < n_query
    # row i, key j: query rows see query keys; text rows see query keys and text keys j <= i
    allowed = is_query[None, :] | (~is_query[:, None] & (pos[None, :] <= pos[:, None]))  # (S, S)
    return allowed[None] & _key_mask(n_query, text_mask)[:, None, :]


# ----------------------------------------------------------------------------- layers

class PostNormAttention(nn.Module):
    """BERT attention: LayerNorm(x + Dense(MHA(q = x, kv = source))). Biases everywhere."""

    def __init__(self, d_model: int, d_source: int, n_head: int, eps: float):
        super().__init__()
        self.n_head = n_head
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_source, d_model)
        self.v_proj = nn.Linear(d_source, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.norm = LayerNorm(d_model, eps)

    def forward(self, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C), source (B, S, D_src), mask (B, T, S) bool or None -> (B, T, C)."""
        B, T, C = x.shape
        H = self.n_head
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(source).view(B, -1, H, C // H).transpose(1, 2)  # (B, H, S, Dh)
        v = self.v_proj(source).view(B, -1, H, C // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.norm(x + self.o_proj(y.transpose(1, 2).reshape(B, T, C)))


class PostNormFFN(nn.Module):
    """BERT feed-forward: LayerNorm(x + Linear(GELU(Linear(x))))."""

    def __init__(self, d_model: int, d_ff: int, eps: float):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.norm = LayerNorm(d_model, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.proj(F.gelu(self.fc(x))))


class QFormerLayer(nn.Module):
    """Shared self-attention over [queries; text] → (queries only) cross-attention to the
    image → a query FFN for the queries and a text FFN for the text."""

    def __init__(self, c: QFormerConfig, cross_attention: bool):
        super().__init__()
        self.self_attn = PostNormAttention(c.d_model, c.d_model, c.n_head, c.norm_eps)
        self.cross_attn = PostNormAttention(c.d_model, c.d_visual, c.n_head, c.norm_eps) if cross_attention else None
        self.query_ffn = PostNormFFN(c.d_model, c.d_ff, c.norm_eps)
        self.text_ffn = PostNormFFN(c.d_model, c.d_ff, c.norm_eps)

    def forward(self, x: torch.Tensor, n_query: int, mask: torch.Tensor | None,
                image: torch.Tensor | None) -> torch.Tensor:
        h = self.self_attn(x, x, mask)  # (B, Q + T, C)
        q, t = h[:, :n_query], h[:, n_query:]
        if self.cross_attn is not None and n_query:
            q = self.cross_attn(q, image, None)  # only the queries read the image
        parts = []
        if n_query:
            parts.append(self.query_ffn(q))
        if t.shape[1]:
            parts.append(self.text_ffn(t))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class QFormer(nn.Module):
    """forward(image (B, N, D_vis) | None, text (B, T) | None, mask (B, S, S) | None)
    -> hidden states (B, S, C) of [queries; text], S = Q + T.

    image=None runs the text transformer alone (no queries, S = T); text=None the queries
    alone. mask=None lets every position see every position.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = c = config
        self.query_tokens = nn.Parameter(torch.randn(1, c.n_query, c.d_model) * 0.02)  # (1, Q, C)
        self.word_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_text, c.d_model)
        self.emb_norm = LayerNorm(c.d_model, c.norm_eps)
        self.layers = nn.ModuleList(QFormerLayer(c, i % c.cross_attention_freq == 0) for i in range(c.n_layer))
        self._init_weights()

    def _init_weights(self) -> None:
        # BERT's init: N(0, 0.02) for matrices and tables, zero biases, unit norms
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) word + learned position vectors."""
        T = text.shape[1]
        if T > self.config.max_text:
            raise InputError(f"text of {T} tokens exceeds the Q-Former's {self.config.max_text} positions")
        return self.word_emb(text) + self.pos_emb(torch.arange(T, device=text.device))

    def encode(self, x: torch.Tensor, n_query: int, mask: torch.Tensor | None,
               image: torch.Tensor | None) -> torch.Tensor:
        """Already-embedded [queries; text] (B, S, C) through the embedding norm and the layers."""
        if n_query and image is None:
            raise InputError("the queries need image features to cross-attend to")
        x = self.emb_norm(x)
        for layer in self.layers:
            x = layer(x, n_query, mask, image)
        return x

    def forward(self, image: torch.Tensor | None, text: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        if image is not None:
            if image.shape[-1] != self.config.d_visual:
                raise InputError(f"image features are {image.shape[-1]} wide; this Q-Former was built "
                                 f"for {self.config.d_visual}")
            parts.append(self.query_tokens.expand(image.shape[0], -1, -1))
        if text is not None:
            parts.append(self.embed_text(text))
        if not parts:
            raise InputError("the Q-Former needs image features, text, or both")
        n_query = self.config.n_query if image is not None else 0
        return self.encode(torch.cat(parts, dim=1), n_query, mask, image)
