"""Flamingo's Perceiver Resampler (Alayrac et al. 2022, §2.1).

A frozen vision encoder gives a variable number of visual tokens per image (a grid whose
size follows the image) or per video (frames × grid). The language model's cross-attention
wants a small fixed set. The resampler keeps R learned latent queries and lets them attend,
layer after layer, to the visual tokens — so whatever comes in, R tokens come out.

Per the paper:
- learned temporal embeddings are added per frame, no spatial ones (the grid's order is
  left for the encoder to have encoded); frames are then flattened into one token set;
- the keys and values of each attention are the visual tokens concatenated with the latents
  themselves, so latents also exchange information with each other;
- attention and FFW sit on residual connections of the latents.
The open reproductions (OpenFlamingo, IDEFICS) also normalise the visual tokens and the
latents separately before attention and the output once at the end; we do the same, which
lets `tests/test_flamingo.py` check parity with IDEFICS's resampler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from .norms import LayerNorm

_ACTS = {"gelu": F.gelu, "relu": F.relu}


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to concat(visual tokens, latents) (keys/values). No biases."""

    def __init__(self, d_model: int, n_head: int, d_head: int):
        super().__init__()
        self.n_head, self.d_head = n_head, d_head
        # two norms: visual tokens and latents come from different distributions
        self.media_norm = LayerNorm(d_model)
        self.latent_norm = LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, n_head * d_head, bias=False)
        self.k_proj = nn.Linear(d_model, n_head * d_head, bias=False)
        self.v_proj = nn.Linear(d_model, n_head * d_head, bias=False)
        self.o_proj = nn.Linear(n_head * d_head, d_model, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (B, S, D), latents (B, R, D) -> update for the latents (B, R, D)."""
        B, R, _ = latents.shape
        H, Dh = self.n_head, self.d_head
        media, latents = self.media_norm(media), self.latent_norm(latents)
        kv_in = torch.cat((media, latents), dim=1)  # (B, S + R, D)
        q = self.q_proj(latents).view(B, R, H, Dh).transpose(1, 2)  # (B, H, R, Dh)
        k = self.k_proj(kv_in).view(B, -1, H, Dh).transpose(1, 2)  # (B, H, S + R, Dh)
        v = self.v_proj(kv_in).view(B, -1, H, Dh).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: every latent sees everything
        return self.o_proj(y.transpose(1, 2).reshape(B, R, H * Dh))


class PerceiverFFW(nn.Module):
    """LayerNorm → Linear(D, mult·D) → activation → Linear(mult·D, D), no biases."""

    def __init__(self, d_model: int, d_ff: int, act: str):
        super().__init__()
        if act not in _ACTS:
            raise ConfigError(f"resampler activation {act!r} is not one of {', '.join(_ACTS)}")
        self.act = act
        self.norm = LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_ff, bias=False)
        self.proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_ACTS[self.act](self.fc(self.norm(x))))


class PerceiverLayer(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_head: int, d_ff: int, act: str):
        super().__init__()
        self.attn = PerceiverAttention(d_model, n_head, d_head)
        self.ffw = PerceiverFFW(d_model, d_ff, act)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ffw(latents)


class PerceiverResampler(nn.Module):
    """(B, T_media, F, N, D_in) visual tokens -> (B, T_media, R, D) resampled tokens.

    T_media images or videos per sample, F frames each (1 for a still image), N tokens per
    frame (any number), R = `n_latents` fixed. `d_input` ≠ `d_model` adds a linear map from
    the encoder's width (a CPU-size convenience: the paper resamples at the encoder's width).
    """

    def __init__(self, d_model: int, *, n_latents: int = 64, n_layers: int = 6, n_head: int = 8,
                 d_head: int = 64, ff_mult: int = 4, max_frames: int = 8, d_input: int = 0,
                 act: str = "gelu"):
        super().__init__()
        self.d_model, self.n_latents, self.max_frames = d_model, n_latents, max_frames
        d_input = d_input or d_model
        self.d_input = d_input
        self.input_proj = nn.Linear(d_input, d_model, bias=False) if d_input != d_model else None
        self.latents = nn.Parameter(torch.randn(n_latents, d_model))  # (R, D)
        # one learned vector per frame index, added to every token of that frame
        self.time_emb = nn.Parameter(torch.randn(max_frames, d_model) * 0.02)  # (F_max, D)
        self.layers = nn.ModuleList(PerceiverLayer(d_model, n_head, d_head, ff_mult * d_model, act)
                                    for _ in range(n_layers))
        self.norm = LayerNorm(d_model)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        if media.dim() != 5:
            raise InputError(f"resampler input must be (batch, media, frames, tokens, dim), got shape "
                             f"{tuple(media.shape)}")
        B, M, Fr, N, D_in = media.shape
        if D_in != self.d_input:
            raise InputError(f"visual tokens are {D_in} wide; this resampler was built for {self.d_input}")
        if Fr > self.max_frames:
            raise InputError(f"{Fr} frames per video exceed the resampler's {self.max_frames} temporal "
                             "embeddings; sample fewer frames or build with a larger max_frames")
        x = media if self.input_proj is None else self.input_proj(media)
        x = x + self.time_emb[:Fr, None, :].to(x.dtype)  # (B, M, F, N, D): per-frame time
        x = x.reshape(B * M, Fr * N, self.d_model)  # frames flattened into one token set
        latents = self.latents.to(x.dtype).expand(B * M, -1, -1)  # (B·M, R, D)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents).view(B, M, self.n_latents, self.d_model)
