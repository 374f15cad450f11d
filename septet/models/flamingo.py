"""Flamingo (Alayrac et al. 2022): a frozen LM that reads interleaved images and text.

- A frozen vision encoder turns each image (or video frame) into a grid of visual tokens;
  this module takes those tokens as tensors, so any encoder serves
  (EfficientNet-Lite0: (B, 49, 1280)).
- A Perceiver Resampler (§2.1, septet.nn.perceiver) maps each image or video to a fixed
  R = 64 visual tokens.
- GATED XATTN-DENSE layers (§2.2, septet.nn.cross_attention) are inserted before every
  k-th block of the frozen LM (k = 1 at 3B, 4 at 9B, 7 at 80B) with tanh gates at 0, so the
  untrained model is exactly the frozen LM.
- Image-causal masking (§2.3): a text token cross-attends only to the last image before it.
- Interleaved input (§2.3): "<image>" marks each image's place and "<EOC>" (end of chunk)
  ends each image's text. These two tokens are new: they get their own small embedding
  (and output) rows, the only trainable part of the language side; the LM's own weights
  stay frozen, so no gradient hooks are needed.
- Training updates the resampler, the cross-attention layers and the two new rows only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from ..inference.beam import beam_search
from ..inference.engine import DecodeBatch
from ..nn.attention import KVCache
from ..nn.cross_attention import GatedXAttnDense, image_causal_mask
from ..nn.perceiver import PerceiverResampler
from ..tokenizer import Tokenizer
from .base import DecoderLM
from .bridge import FrozenLMBridge

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<EOC>"
NEW_TOKENS = (IMAGE_TOKEN, EOC_TOKEN)  # appended to the LM's vocabulary in this order


@dataclass
class FlamingoConfig:
    """The bridge's hyper-parameters; the LM brings its own config.

    Defaults follow the paper (64 latents, 6 resampler layers, FFW ×4, a cross-attention
    layer before every LM block as at 3B). 0 in a derived field means: take it from the
    encoder or the LM (resampler_dim = d_visual; heads and head width = the LM's).
    """

    d_visual: int = 1280  # width of the frozen encoder's tokens (EfficientNet-Lite0: 1280)
    n_latents: int = 64
    resampler_layers: int = 6
    resampler_dim: int = 0
    resampler_heads: int = 8
    resampler_head_dim: int = 64
    resampler_act: str = "gelu"
    max_frames: int = 8  # temporal embeddings for videos of up to this many frames
    xattn_every: int = 1  # a GATED XATTN-DENSE before blocks 0, k, 2k, ...
    xattn_heads: int = 0
    xattn_head_dim: int = 0
    ff_mult: int = 4
    xattn_norm: str = "layernorm"  # "rmsnorm" + xattn_ffw "swiglu": IDEFICS's LLaMA-host form
    xattn_ffw: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("d_visual", "n_latents", "resampler_layers", "resampler_heads",
                     "resampler_head_dim", "max_frames", "xattn_every", "ff_mult"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"Flamingo config field '{name}' must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return {"family": "flamingo", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlamingoConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"family"})
        if unknown:
            raise ConfigError(f"'{unknown[0]}' is not a Flamingo config field ({', '.join(sorted(names))})")
        return cls(**{k: v for k, v in d.items() if k != "family"})


# the paper's three sizes differ, on the bridge side, in how often cross-attention is inserted
PAPER_XATTN_EVERY = {"flamingo-3b": 1, "flamingo-9b": 4, "flamingo-80b": 7}


def add_media_tokens(tokenizer: Tokenizer, lm_vocab_size: int) -> Tokenizer:
    """A copy of `tokenizer` with "<image>" and "<EOC>" at ids lm_vocab_size and +1.

    A tokenizer smaller than the LM's table (padded vocabularies) is filled up with unused
    placeholder tokens first, so the new ids land right after the LM's rows."""
    hf = type(tokenizer.hf).from_str(tokenizer.hf.to_str())
    have = hf.get_vocab_size(with_added_tokens=True)
    if have > lm_vocab_size:
        raise ConfigError(f"the tokenizer has {have} tokens but the LM only {lm_vocab_size} embedding "
                          "rows; use the LM's own tokenizer")
    if any(hf.token_to_id(t) is not None for t in NEW_TOKENS):
        raise ConfigError(f"the tokenizer already has {IMAGE_TOKEN} or {EOC_TOKEN}; pass the LM's original one")
    hf.add_special_tokens([f"<|septet_unused_{i}|>" for i in range(lm_vocab_size - have)])
    hf.add_special_tokens(list(NEW_TOKENS))
    out = Tokenizer(hf, eot_token=tokenizer.eot_token)
    if out.token_to_id(IMAGE_TOKEN) != lm_vocab_size or out.token_to_id(EOC_TOKEN) != lm_vocab_size + 1:
        raise ConfigError("could not place <image> and <EOC> right after the LM's vocabulary")
    return out


class FlamingoCache(KVCache):
    """The LM's KV cache plus, per row, how many <image> tags the cached prefix held, so a
    continuation chunk knows which image its tokens follow."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, d_head: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(n_layer, batch, n_kv_head, max_len, d_head, dtype=dtype, device=device)
        self.images_seen = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)

    def reset(self, pos: int = 0) -> None:
        super().reset(pos)
        if pos == 0:
            self.images_seen.zero_()

    def reorder(self, rows: torch.Tensor) -> None:
        super().reorder(rows)
        self.images_seen = self.images_seen[rows]

    def select(self, rows: torch.Tensor, max_len: int | None = None) -> "FlamingoCache":
        out = super().select(rows, max_len)
        out.images_seen = self.images_seen[rows]
        return out

    def append_rows(self, other: KVCache) -> None:
        super().append_rows(other)
        self.images_seen = torch.cat((self.images_seen, other.images_seen))


def as_media(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) one image, (B, M, N, D) M images, or (B, M, F, N, D) -> (B, M, F, N, D)."""
    if x.dim() == 3:
        return x[:, None, None]
    if x.dim() == 4:
        return x[:, :, None]
    if x.dim() == 5:
        return x
    raise InputError(f"media must be (batch, tokens, dim), (batch, images, tokens, dim) or "
                     f"(batch, images, frames, tokens, dim); got shape {tuple(x.shape)}")


class Flamingo(FrozenLMBridge):
    """A frozen DecoderLM with a Perceiver Resampler and gated cross-attention layers.

    forward(tokens (B, T), media (B, M, F, N, D_vis) | None, *, visual=None, cache=None,
            positions=None, pad_mask=None, last_only=False) -> logits (B, T, V + 2).
    Token ids V and V + 1 (V = the LM's vocabulary) are <image> and <EOC>; the m-th <image>
    tag of a row stands for media[:, m]. `visual` (B, M, R, D) passes already-resampled
    tokens instead of `media` (generation resamples once).
    """

    bridge_name = "Flamingo"

    def __init__(self, lm: DecoderLM, config: FlamingoConfig):
        super().__init__()
        self.config = config
        lm.requires_grad_(False)  # frozen: only the bridge and the two new rows train
        self.lm = lm.eval()
        c = lm.config
        self.image_token_id, self.eoc_token_id = c.vocab_size, c.vocab_size + 1
        self.vocab_size = c.vocab_size + len(NEW_TOKENS)
        d_res = config.resampler_dim or config.d_visual
        self.resampler = PerceiverResampler(
            d_res, n_latents=config.n_latents, n_layers=config.resampler_layers,
            n_head=config.resampler_heads, d_head=config.resampler_head_dim, ff_mult=config.ff_mult,
            max_frames=config.max_frames, d_input=config.d_visual, act=config.resampler_act)
        heads = config.xattn_heads or c.n_head
        d_head = config.xattn_head_dim or c.d_head
        self.xattn = nn.ModuleList(
            GatedXAttnDense(c.d_model, d_res, heads, d_head, config.ff_mult * c.d_model,
                            norm=config.xattn_norm, ffw=config.xattn_ffw, eps=c.norm_eps)
            for _ in range(math.ceil(c.n_layer / config.xattn_every)))
        # new rows start at the mean of the LM's rows (plus a little noise to tell them apart)
        table = lm.tok_emb.weight.detach()
        self.new_tok_emb = nn.Parameter(self._init_rows(table))  # (2, C)
        head = getattr(lm, "lm_head", None)
        # a tied LM reads its output rows from the input table; so do the new tokens
        self.new_head = None if head is None else nn.Parameter(self._init_rows(head.weight.detach()))

    @staticmethod
    def _init_rows(table: torch.Tensor) -> torch.Tensor:
        mean = table.float().mean(0, keepdim=True).expand(len(NEW_TOKENS), -1)
        return (mean + 0.02 * torch.randn_like(mean)).to(table.dtype)

    def train(self, mode: bool = True) -> "Flamingo":
        super().train(mode)
        self.lm.eval()  # the frozen LM never switches to training behaviour
        return self

    # --- pieces -------------------------------------------------------------------
    def resample(self, media: torch.Tensor) -> torch.Tensor:
        """media (see `as_media`) -> visual tokens (B, M, R, D)."""
        return self.resampler(as_media(media))

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The LM's embedding, with the new tokens' rows taken from `new_tok_emb`."""
        V = self.lm.config.vocab_size
        is_new = tokens >= V  # (B, T)
        known = tokens.masked_fill(is_new, 0)
        x = self.lm.embed(known, positions)  # (B, T, C), incl. any position vectors
        if bool(is_new.any()):
            rows = self.new_tok_emb[(tokens - V).clamp(min=0)].to(x.dtype)  # (B, T, C)
            # swap the placeholder's token vector for the new row, keep position vectors
            x = torch.where(is_new[..., None], x - self.lm.tok_emb(known) + rows, x)
        return x

    def output_rows(self) -> torch.Tensor:
        return self.new_tok_emb if self.new_head is None else self.new_head  # (2, C)

    def new_cache(self, batch: int, max_len: int | None = None) -> FlamingoCache:
        c = self.lm.config
        p = self.lm.tok_emb.weight
        return FlamingoCache(c.n_layer, batch, c.n_kv_head, max_len or c.context, c.d_head,
                             dtype=p.dtype, device=p.device)

    # --- forward ------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, media: torch.Tensor | None = None, *,
                visual: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None,
                last_only: bool = False, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """`logits_at` (B, T) bool: return only those positions' logits, (N, V + 2) — training
        needs them at the answer tokens only, and the 49k-row head is a fifth of the LM."""
        if tokens.dim() != 2:
            raise InputError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        if bool((tokens < 0).any()) or bool((tokens >= self.vocab_size).any()):
            raise InputError(f"token ids must lie in [0, {self.vocab_size})")
        if media is not None and visual is not None:
            raise InputError("pass media or already-resampled visual tokens, not both")
        if visual is None and media is not None:
            visual = self.resample(media)  # (B, M, R, D)
        tags = (tokens == self.image_token_id).sum(dim=1)  # (B,) <image> tags in this chunk
        before = cache.images_seen if isinstance(cache, FlamingoCache) else None
        total = tags if before is None else tags + before
        n_media = 0 if visual is None else visual.shape[1]
        if bool((total > n_media).any()):
            raise InputError(f"a row holds {int(total.max())} <image> tags but only {n_media} images "
                             "were given; pass one image per tag")
        if positions is None:
            positions = self.lm.default_positions(tokens.shape[1], cache, tokens.device)
        x = self.embed(tokens, positions)  # (B, T, C)
        hook = None
        if visual is not None:
            mask = image_causal_mask(tokens, self.image_token_id, n_media, before)  # (B, T, M)
            hook = self._cross_attention(visual, mask)
        h = self.lm.hidden_states(x, positions, cache=cache, pad_mask=pad_mask,
                                  last_only=last_only, before_block=hook)  # (B, T, C)
        if isinstance(cache, FlamingoCache):
            cache.images_seen += tags
        if logits_at is not None:
            h = h[logits_at]  # (N, C)
        new_logits = h @ self.output_rows().to(h.dtype).t()  # (B, T, 2) or (N, 2)
        return torch.cat((self.lm.head_logits(h), new_logits), dim=-1)  # (B, T, V + 2) or (N, V + 2)

    def _cross_attention(self, visual: torch.Tensor, mask: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """The LM's `before_block` hook: a GATED XATTN-DENSE before blocks 0, k, 2k, ..."""
        every = self.config.xattn_every

        def before_block(i: int, y: torch.Tensor) -> torch.Tensor:
            return self.xattn[i // every](y, visual, mask) if i % every == 0 else y

        return before_block


    def loss(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy in fp32 over targets != ignore_index."""
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=ignore_index)

    # --- generation ---------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: Sequence[int], media: torch.Tensor | None, *, beams: int = 3,
                 max_new_tokens: int = 10, stop_ids: Sequence[int] | None = None) -> list[int]:
        """Beam search (the paper decodes open-ended answers with 3 beams) from one prompt with its media
        (1, M, F, N, D); stops at <EOC> by default. Returns the new ids without the stop."""
        if not prompt:
            raise InputError("the prompt is empty; give at least one token")
        stop = set(stop_ids) if stop_ids is not None else {self.eoc_token_id}
        visual = None if media is None else self.resample(media).expand(beams, -1, -1, -1)
        n_new = min(max_new_tokens, self.lm.config.context - len(prompt))
        if n_new <= 0:
            return []
        device = self.lm.tok_emb.weight.device
        tokens = torch.tensor([list(prompt)] * beams, device=device)
        batch = DecodeBatch.conditioned(
            self, lambda cache: self(tokens, visual=visual, cache=cache, last_only=True)[:, -1],  # (K, V + 2)
            rows=beams, slots=len(prompt) + n_new, budget=n_new, new_cache=self.new_cache,
            row_inputs={} if visual is None else {"visual": visual})
        return beam_search(batch.logits, lambda t: batch.step(t[:, 0]), batch.keep, beams=beams,
                           max_new_tokens=n_new, stop_ids=stop)
