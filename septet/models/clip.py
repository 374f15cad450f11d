"""CLIP (Radford et al. 2021): an image encoder and a text encoder trained so that matching
(image, text) pairs have the highest cosine similarity in the batch.

- image encoder: septet's ViT; its [CLS] output (or mean token) is the image vector
- text encoder: a GPT-2-style causal Transformer (CLIP §2.4 "masked self-attention ... so
  the text encoder can be initialised from a pre-trained LM"); the text vector is the
  final-LayerNorm output at the end-of-text token. Blocks are GPT-3's dense blocks.
- both vectors are linearly projected (no bias) into one embedding space and L2-normalised;
  logits = exp(t) · cosine, with the temperature learned as t = log(1/τ), τ initialised
  to 0.07 and exp(t) clipped at 100 (CLIP §2.5)
- loss: symmetric cross-entropy over the batch's image->text and text->image logits (InfoNCE)

Tokenizer: captions here are a handful of words from a closed vocabulary ("a teal
triangle"), so a word-level vocabulary (HF `tokenizers` WordLevel, lower-cased, split on
whitespace and punctuation) is exact and tiny; byte-level BPE would only add pieces. It is
saved as a normal tokenizer.json and wrapped in septet's Tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
import torch
import torch.nn.functional as F
from tokenizers import normalizers, pre_tokenizers
from torch import nn

from septet.errors import CheckpointError, ConfigError, InputError
from septet.nn.attention import AttnContext
from septet.nn.norms import LayerNorm
from septet.nn.positions import LearnedPositions
from septet.tokenizer import Tokenizer

from .base import init_normal
from .gpt3 import Block, GPT3Config
from .vision import ViT, ViTConfig

PAD, UNK, SOT, EOT = "[PAD]", "[UNK]", "[SOT]", "[EOT]"


def caption_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """Word-level tokenizer over the words of `texts`: [PAD]=0, [UNK]=1, [SOT]=2, [EOT]=3,
    then the words in sorted order (deterministic for the same texts)."""
    norm = normalizers.Lowercase()
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, SOT, EOT, *words])}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=UNK))
    hf.normalizer = norm
    hf.pre_tokenizer = pre
    hf.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    hf.add_special_tokens([PAD, UNK, SOT, EOT])
    return Tokenizer(hf, eot_token=EOT)


def encode_texts(tok: Tokenizer, texts: Sequence[str], context: int) -> torch.Tensor:
    """[SOT] words [EOT], right-padded with [PAD] -> (B, context) int64. Over-long texts are
    cut to fit, keeping [EOT] last, since the text vector is read there."""
    sot, eot, pad = tok.token_to_id(SOT), tok.token_to_id(EOT), tok.token_to_id(PAD)
    if None in (sot, eot, pad):
        raise ConfigError(f"tokenizer lacks {SOT}/{EOT}/{PAD}; build it with caption_tokenizer")
    out = torch.full((len(texts), context), pad, dtype=torch.long)
    for i, ids in enumerate(tok.encode_batch(list(texts))):
        ids = [sot, *ids[: context - 2], eot]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


@dataclass
class TextConfig:
    vocab_size: int = 64
    context: int = 16
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    norm_eps: float = 1e-5


class TextEncoder(nn.Module):
    """tokens (B, T) -> one vector per text (B, D): the output at the first [EOT]."""

    def __init__(self, config: TextConfig, eot_id: int):
        super().__init__()
        self.config = c = config
        self.eot_id = eot_id
        block_cfg = GPT3Config(vocab_size=c.vocab_size, n_layer=c.n_layer, d_model=c.d_model, n_head=c.n_head,
                               context=c.context, norm_eps=c.norm_eps, window=None)  # all dense, causal
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = LearnedPositions(c.context, c.d_model)
        self.blocks = nn.ModuleList(Block(block_cfg, i) for i in range(c.n_layer))
        self.norm_f = LayerNorm(c.d_model, c.norm_eps)
        init_normal(self, std=0.02, residual_std=0.02 / math.sqrt(2 * c.n_layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        is_eot = tokens == self.eot_id
        if not bool(is_eot.any(dim=1).all()):
            raise InputError("every text needs an end-of-text token; encode texts with encode_texts")
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device))  # (B, T, D)
        ctx = AttnContext()  # causal; the padding after [EOT] is never seen by [EOT]
        for block in self.blocks:
            x = block(x, ctx, None)
        x = self.norm_f(x)
        at = is_eot.int().argmax(dim=1)  # (B,) first [EOT]
        return x[torch.arange(B, device=x.device), at]  # (B, D)


@dataclass
class CLIPConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def to_dict(self) -> dict:
        return {"family": "clip", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        try:
            return cls(vision=ViTConfig(**d["vision"]), text=TextConfig(**d["text"]), embed_dim=d["embed_dim"],
                       init_temperature=d["init_temperature"], max_logit_scale=d["max_logit_scale"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"CLIP config is malformed ({e}); re-save the checkpoint") from None


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig, eot_id: int):
        super().__init__()
        self.config = c = config
        self.vision = ViT(c.vision)
        self.text = TextEncoder(c.text, eot_id)
        self.image_proj = nn.Linear(c.vision.d_model, c.embed_dim, bias=False)
        self.text_proj = nn.Linear(c.text.d_model, c.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=c.vision.d_model ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=c.text.d_model ** -0.5)
        # t = log(1/τ): optimising the log keeps the scale positive and its steps relative
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / c.init_temperature)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> unit vectors (B, E)."""
        return F.normalize(self.image_proj(self.vision.pool(self.vision(images))), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) -> unit vectors (B, E)."""
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """logits_per_image (B_img, B_txt) = scale · cosine similarity."""
        return self.scale() * self.encode_image(images) @ self.encode_text(tokens).t()


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a square (B, B) logits matrix, image rows x text columns.

    `positives` (B, B) bool marks every matching pair; None means the diagonal only (CLIP).
    With repeated captions in a batch (easy-VQA has 24 distinct ones) the off-diagonal
    duplicates are true matches, not negatives, so each row's target spreads uniformly over
    its positives; on an all-distinct batch this is exactly CLIP's loss."""
    B = logits.shape[0]
    if positives is None:
        target = torch.arange(B, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    p = positives.float()
    return 0.5 * (F.cross_entropy(logits, p / p.sum(1, keepdim=True))
                  + F.cross_entropy(logits.t(), p.t() / p.t().sum(1, keepdim=True)))


def load_clip(path: str | Path) -> tuple[CLIP, Tokenizer]:
    """A CLIP checkpoint written by `septet train-clip` (a step dir or the run dir: newest)."""
    from septet.checkpoints.native import latest_checkpoint, load_checkpoint

    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        path = latest_checkpoint(path) or path
    ckpt = load_checkpoint(path)
    if ckpt.config.get("family") != "clip":
        raise CheckpointError(f"{path} holds a {ckpt.config.get('family')!r} model, not a CLIP checkpoint")
    if ckpt.tokenizer_json is None:
        raise CheckpointError(f"{path} has no tokenizer.json; re-save the CLIP checkpoint")
    tok = Tokenizer(tokenizers.Tokenizer.from_str(ckpt.tokenizer_json), eot_token=EOT)
    model = CLIP(CLIPConfig.from_dict(ckpt.config), tok.eot_id)
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit its config ({str(e).splitlines()[0]})") from None
    return model.eval(), tok


__all__ = ["CLIP", "CLIPConfig", "TextConfig", "TextEncoder", "caption_tokenizer", "contrastive_loss",
           "encode_texts", "load_clip"]
