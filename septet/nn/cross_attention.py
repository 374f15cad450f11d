"""Flamingo's GATED XATTN-DENSE layer and its image-causal mask (Alayrac et al. 2022, §2.2–2.3).

Between the frozen LM's blocks, text tokens cross-attend to the resampled visual tokens:

    y = y + tanh(α_xattn) · CrossAttn(q = y, kv = visual)
    y = y + tanh(α_dense) · FFW(y)

with α initialised to 0, so at initialisation the layer is the identity and the whole
model computes exactly what the frozen LM computes (§2.2) — training starts from the LM's
own behaviour and opens the gates gradually, instead of disrupting it with random layers.

Which visual tokens a text token may see is the image-causal mask of §2.3: only those of
the LAST image that precedes it (the image whose `<image>` tag is at or before it), and
none for text before the first image. Earlier images still reach a token indirectly,
through the LM's self-attention over earlier text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .mlp import GeluMLP, SwiGLU
from .norms import LayerNorm, RMSNorm


def image_causal_mask(tokens: torch.Tensor, image_token_id: int, n_images: int,
                      images_before: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) token ids -> (B, T, n_images) bool: True where token t may see image j.

    Image j is the one whose `<image>` tag is the (j+1)-th in the sequence; a token sees the
    image of the last tag at or before it (so the tag itself sees its own image).
    `images_before` (B,) counts tags already consumed by earlier chunks (a KV-cached prefix).
    """
    seen = torch.cumsum(tokens == image_token_id, dim=1)  # (B, T) tags at or before t
    if images_before is not None:
        seen = seen + images_before[:, None]
    last = seen - 1  # index of the last image so far; -1 = none yet
    return last[..., None] == torch.arange(n_images, device=tokens.device)  # (B, T, M)


class MaskedCrossAttention(nn.Module):
    """Queries from text (B, T, C); keys/values from visual tokens (B, M, R, D_vis) of M images.

    `mask` (B, T, M) says which images each text token sees (at most one: image-causal).
    A token that sees none gets exactly zero output rather than an average over nothing.
    """

    def __init__(self, d_model: int, d_visual: int, n_head: int, d_head: int):
        super().__init__()
        self.n_head, self.d_head = n_head, d_head
        self.q_proj = nn.Linear(d_model, n_head * d_head, bias=False)
        self.k_proj = nn.Linear(d_visual, n_head * d_head, bias=False)
        self.v_proj = nn.Linear(d_visual, n_head * d_head, bias=False)
        self.o_proj = nn.Linear(n_head * d_head, d_model, bias=False)

    def forward(self, x: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        M, R = visual.shape[1], visual.shape[2]
        H, Dh = self.n_head, self.d_head
        kv_in = visual.reshape(B, M * R, visual.shape[-1])  # (B, M·R, D_vis)
        q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(kv_in).view(B, M * R, H, Dh).transpose(1, 2)  # (B, H, M·R, Dh)
        v = self.v_proj(kv_in).view(B, M * R, H, Dh).transpose(1, 2)
        has_image = mask.any(dim=-1)  # (B, T)
        # every visual token of image j inherits the token-to-image decision; rows with no
        # image are opened to everything (no all -inf softmax) and zeroed afterwards
        key_mask = mask.repeat_interleave(R, dim=-1) | ~has_image[..., None]  # (B, T, M·R)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None])  # (B, H, T, Dh)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh))
        return y * has_image[..., None].to(y.dtype)


_NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}
_FFWS = {"gelu": GeluMLP, "swiglu": SwiGLU}


class GatedXAttnDense(nn.Module):
    """y += tanh(α₁)·XAttn(norm(y), visual); y += tanh(α₂)·FFW(norm(y)); α₁ = α₂ = 0 at init.

    `norm` / `ffw` pick the sublayers' form: the paper's LayerNorm + GELU MLP ("layernorm",
    "gelu"), or the LLaMA-host form IDEFICS uses ("rmsnorm", "swiglu"). One scalar gate per
    sublayer and layer, as in the paper.
    """

    def __init__(self, d_model: int, d_visual: int, n_head: int, d_head: int, d_ff: int, *,
                 norm: str = "layernorm", ffw: str = "gelu", eps: float = 1e-5):
        super().__init__()
        if norm not in _NORMS:
            raise ConfigError(f"cross-attention norm {norm!r} is not one of {', '.join(_NORMS)}")
        if ffw not in _FFWS:
            raise ConfigError(f"cross-attention FFW {ffw!r} is not one of {', '.join(_FFWS)}")
        self.attn_norm = _NORMS[norm](d_model, eps)
        self.attn = MaskedCrossAttention(d_model, d_visual, n_head, d_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffw_norm = _NORMS[norm](d_model, eps)
        self.ffw = _FFWS[ffw](d_model, d_ff, bias=False)
        self.ffw_gate = nn.Parameter(torch.zeros(1))

    def forward(self, y: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """y (B, T, C), visual (B, M, R, D_vis), mask (B, T, M) -> (B, T, C)."""
        g_attn, g_ffw = torch.tanh(self.attn_gate).to(y.dtype), torch.tanh(self.ffw_gate).to(y.dtype)
        y = y + g_attn * self.attn(self.attn_norm(y), visual, mask)
        return y + g_ffw * self.ffw(self.ffw_norm(y))
