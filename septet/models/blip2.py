"""BLIP-2 (Li et al. 2023): a Q-Former bridges a frozen image encoder and a frozen LM.

- Frozen image encoder features (B, N, D_vis) (the paper: ViT's second-to-last layer) go
  through a LayerNorm — trained with the bridge — then into the Q-Former
  (septet.nn.qformer): Q learned queries that cross-attend to them.
- Stage 1, vision-language representation learning (§3.2), trains the Q-Former with three
  objectives that share its weights but not its self-attention mask:
    ITC  image-text contrastive: query outputs vs the text's [CLS] output, both projected
         to 256-d and normalised; similarity = the max over the queries; learnable
         temperature; in-batch negatives.                         (uni-modal mask)
    ITM  image-text matching: a binary head on every query output, logits averaged over
         queries; one hard negative text per image and one hard negative image per text,
         sampled in proportion to the ITC similarity.              (bi-directional mask)
    ITG  image-grounded text generation: [DEC] replaces [CLS]; the text is generated from
         what the queries extracted.                               (multi-modal causal mask)
- Stage 2, vision-to-language generative learning (§3.3): a linear layer projects the Q
  query outputs to the LM's width; they are prepended to the frozen decoder's input
  embeddings as soft prompts and trained with the LM loss on the text.
- Zero-shot VQA prompts the LM with "Question: {} Answer:" and decodes by beam search (5);
  image-text retrieval ranks by ITC and re-ranks the top k by ITM (§4: k = 128).

Text ids given to stage 1 carry no special token at the start: [CLS] and [DEC] are the
LAST TWO rows of the Q-Former's word table (vocab_size − 2, vocab_size − 1) and the model
puts them in place itself. A padding mask marks the real text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, InputError
from ..inference.beam import beam_search
from ..inference.engine import DecodeBatch
from ..nn.norms import LayerNorm
from ..nn.qformer import QFormer, QFormerConfig, itc_mask, itg_mask, itm_mask
from .base import DecoderLM
from .bridge import FrozenLMBridge

VQA_PROMPT = "Question: {} Answer:"  # the paper's zero-shot VQA prompt for decoder LMs (OPT)


@dataclass
class Blip2Config:
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    embed_dim: int = 256  # ITC projection
    temp: float = 0.07  # initial ITC temperature (learned)

    def __post_init__(self) -> None:
        if isinstance(self.qformer, dict):
            self.qformer = QFormerConfig(**self.qformer)
        if self.embed_dim <= 0 or self.temp <= 0:
            raise ConfigError("BLIP-2 config fields 'embed_dim' and 'temp' must be positive")

    def to_dict(self) -> dict[str, Any]:
        return {"family": "blip2", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Blip2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"family"})
        if unknown:
            raise ConfigError(f"'{unknown[0]}' is not a BLIP-2 config field ({', '.join(sorted(names))})")
        return cls(**{k: v for k, v in d.items() if k != "family"})


@dataclass
class Stage1Losses:
    total: torch.Tensor
    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor


def _with_first(text: torch.Tensor, text_mask: torch.Tensor, first_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend [CLS] or [DEC] to (B, T) ids and their (B, T) mask."""
    col = torch.full_like(text[:, :1], first_id)
    return torch.cat((col, text), dim=1), torch.cat((torch.ones_like(text_mask[:, :1]), text_mask), dim=1)


@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, generator: torch.Generator | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM's hard negatives (§3.2, after ALBEF): for each image a text, for each text an
    image, drawn with probability softmax(ITC similarity) over the OTHER pairs of the batch,
    so the more confusable a pair, the likelier it is to be trained on.
    sim_i2t (B, B) -> (negative text per image (B,), negative image per text (B,))."""
    B = sim_i2t.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=sim_i2t.device)

    def draw(sim: torch.Tensor) -> torch.Tensor:
        w = F.softmax(sim.float(), dim=1).masked_fill(eye, 0)
        w = w + 1e-12 * ~eye  # never all zero, never the positive
        return torch.multinomial(w, 1, generator=generator).squeeze(1)

    return draw(sim_i2t), draw(sim_i2t.t())


class Blip2Stage1(nn.Module):
    """The Q-Former with its stage-1 heads.

    forward(image (B, N, D_vis), text (B, T), text_mask (B, T) bool) -> Stage1Losses.
    """

    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        qc = config.qformer
        self.cls_id, self.dec_id = qc.vocab_size - 2, qc.vocab_size - 1
        self.vision_norm = LayerNorm(qc.d_visual)  # "second-to-last layer, then a LayerNorm"
        self.qformer = QFormer(qc)
        self.vision_proj = nn.Linear(qc.d_model, config.embed_dim)
        self.text_proj = nn.Linear(qc.d_model, config.embed_dim)
        self.itm_head = nn.Linear(qc.d_model, 2)
        # ITG's BERT-style LM head: transform, then the word table (tied) plus a bias
        self.lm_transform = nn.Linear(qc.d_model, qc.d_model)
        self.lm_norm = LayerNorm(qc.d_model, qc.norm_eps)
        self.lm_bias = nn.Parameter(torch.zeros(qc.vocab_size))
        self.temp = nn.Parameter(torch.tensor(config.temp))
        for m in (self.vision_proj, self.text_proj, self.itm_head, self.lm_transform):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    # --- embeddings used by ITC and retrieval -------------------------------------
    def image_embeds(self, image: torch.Tensor) -> torch.Tensor:
        """(B, N, D_vis) -> (B, Q, E) normalised query features (the queries see no text)."""
        q = self.qformer(self.vision_norm(image))  # (B, Q, C)
        return F.normalize(self.vision_proj(q), dim=-1)

    def text_embeds(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, E) normalised [CLS] feature (the text sees no queries)."""
        ids, mask = _with_first(text, text_mask, self.cls_id)
        h = self.qformer(None, ids, itc_mask(0, mask))  # (B, T + 1, C)
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)

    def similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """img (Bi, Q, E), txt (Bt, E) -> (Bi, Bt): max over queries of q·t, over the temperature."""
        sim = torch.einsum("iqe,te->iqt", img, txt).amax(dim=1)  # (Bi, Bt)
        return sim / self.temp.clamp(0.001, 0.5)

    # --- the three objectives -------------------------------------------------------
    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> Stage1Losses:
        B = image.shape[0]
        if B < 2:
            raise InputError("stage-1 training needs at least 2 image-text pairs per batch "
                             "(ITC and ITM use in-batch negatives)")
        text_mask = text_mask.bool()
        image = self.vision_norm(image)
        Q = self.config.qformer.n_query
        ids, mask = _with_first(text, text_mask, self.cls_id)

        # ITC: one pass over [queries; text] with the uni-modal mask
        h = self.qformer(image, ids, itc_mask(Q, mask))  # (B, Q + T + 1, C)
        img = F.normalize(self.vision_proj(h[:, :Q]), dim=-1)  # (B, Q, E)
        txt = F.normalize(self.text_proj(h[:, Q]), dim=-1)  # (B, E): the [CLS] output
        sim_i2t = self.similarity(img, txt)  # (B, B)
        labels = torch.arange(B, device=image.device)
        itc = (F.cross_entropy(sim_i2t, labels) + F.cross_entropy(sim_i2t.t(), labels)) / 2

        # ITM: positives, plus hard negatives drawn in proportion to the ITC similarity
        neg_text, neg_image = sample_hard_negatives(sim_i2t)
        images = torch.cat((image, image[neg_image], image))  # (3B, N, D_vis)
        pair_ids = torch.cat((ids, ids, ids[neg_text]))
        pair_mask = torch.cat((mask, mask, mask[neg_text]))
        match = torch.cat((torch.ones(B), torch.zeros(2 * B))).long().to(image.device)
        itm = F.cross_entropy(self.itm_logits(images, pair_ids, pair_mask), match)

        # ITG: [DEC] + text under the multi-modal causal mask
        dec_ids, dec_mask = _with_first(text, text_mask, self.dec_id)
        h = self.qformer(image, dec_ids, itg_mask(Q, dec_mask))
        logits = self.itg_logits(h[:, Q:-1])  # (B, T, V): position t predicts text[t]
        targets = text.masked_fill(~text_mask, -100)
        itg = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              ignore_index=-100)
        return Stage1Losses(total=itc + itm + itg, itc=itc, itm=itm, itg=itg)

    def itm_logits(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normed image (B, N, D), [CLS]-led ids and mask (B, T + 1) -> (B, 2), averaged over queries."""
        Q = self.config.qformer.n_query
        h = self.qformer(image, ids, itm_mask(Q, mask))
        return self.itm_head(h[:, :Q]).mean(dim=1)

    def itg_logits(self, h: torch.Tensor) -> torch.Tensor:
        x = self.lm_norm(F.gelu(self.lm_transform(h)))
        return x @ self.qformer.word_emb.weight.t() + self.lm_bias

    # --- retrieval ------------------------------------------------------------------
    @torch.no_grad()
    def itm_score(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B,) probability that image i and text i match."""
        ids, mask = _with_first(text, text_mask.bool(), self.cls_id)
        return F.softmax(self.itm_logits(self.vision_norm(image), ids, mask).float(), dim=-1)[:, 1]

    @torch.no_grad()
    def retrieve_texts(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                       k: int = 128) -> torch.Tensor:
        """For each image (Ni, N, D), the indices (Ni, min(k, Nt)) of its best texts: the top k
        by ITC similarity, re-ranked by ITM."""
        sim = self.similarity(self.image_embeds(image), self.text_embeds(text, text_mask))  # (Ni, Nt)
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (Ni, k)
        out = []
        for i in range(image.shape[0]):
            c = top[i]
            score = self.itm_score(image[i:i + 1].expand(len(c), -1, -1), text[c], text_mask[c])
            out.append(c[score.argsort(descending=True, stable=True)])
        return torch.stack(out)

    @torch.no_grad()
    def retrieve_images(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor,
                        k: int = 128) -> torch.Tensor:
        """For each text, the indices (Nt, min(k, Ni)) of its best images (ITC top k, ITM re-rank)."""
        sim = self.similarity(self.image_embeds(image), self.text_embeds(text, text_mask)).t()  # (Nt, Ni)
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out = []
        for t in range(text.shape[0]):
            c = top[t]
            score = self.itm_score(image[c], text[t:t + 1].expand(len(c), -1),
                                   text_mask[t:t + 1].expand(len(c), -1))
            out.append(c[score.argsort(descending=True, stable=True)])
        return torch.stack(out)


class Blip2(FrozenLMBridge):
    """Stage 2: Q-Former query outputs, projected, as soft prompts of a frozen decoder LM.

    forward(image (B, N, D_vis), tokens (B, T), *, cache=None, pad_mask=None, last_only=False)
    -> logits (B, T, V) at the text positions (position t predicts tokens[t + 1]).
    """

    bridge_name = "BLIP-2"

    def __init__(self, lm: DecoderLM, config: Blip2Config, stage1: Blip2Stage1 | None = None):
        super().__init__()
        self.config = config
        lm.requires_grad_(False)
        self.lm = lm.eval()
        qc = config.qformer
        # stage 2 starts from the stage-1 Q-Former (and its image LayerNorm) when given
        self.vision_norm = stage1.vision_norm if stage1 is not None else LayerNorm(qc.d_visual)
        self.qformer = stage1.qformer if stage1 is not None else QFormer(qc)
        self.proj = nn.Linear(qc.d_model, lm.config.d_model)

    def train(self, mode: bool = True) -> "Blip2":
        super().train(mode)
        self.lm.eval()
        return self

    def soft_prompt(self, image: torch.Tensor) -> torch.Tensor:
        """(B, N, D_vis) -> (B, Q, C_lm): the queries read the image (no text), projected."""
        return self.proj(self.qformer(self.vision_norm(image)))

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, *, cache=None,
                pad_mask: torch.Tensor | None = None, last_only: bool = False,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """`pad_mask` (B, Q + T) marks real keys; the soft prompt's Q slots come first.
        `logits_at` (B, T) bool over the text: return only those positions' logits (N, V)."""
        prompt = self.soft_prompt(image)  # (B, Q, C)
        Q, T = prompt.shape[1], tokens.shape[1]
        positions = self.lm.default_positions(Q + T, cache, tokens.device)  # (Q + T,)
        pos_emb = getattr(self.lm, "pos_emb", None)
        if pos_emb is not None:  # learned absolute positions (GPT-3) belong to the prompt too
            prompt = prompt + pos_emb(positions[:Q])
        x = torch.cat((prompt.to(self.lm.tok_emb.weight.dtype), self.lm.embed(tokens, positions[Q:])), dim=1)
        h = self.lm.hidden_states(x, positions, cache=cache, pad_mask=pad_mask, last_only=last_only)
        if logits_at is not None:
            return self.lm.head_logits(h[:, Q:][logits_at])  # (N, V)
        logits = self.lm.head_logits(h)  # (B, Q + T, V) or (B, 1, V)
        return logits if last_only else logits[:, Q:]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """LM loss on the text only (the soft prompt has no targets)."""
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=ignore_index)


    @torch.no_grad()
    def generate(self, image: torch.Tensor, prompt: Sequence[int], *, beams: int = 5,
                 max_new_tokens: int = 10, stop_ids: Sequence[int] = ()) -> list[int]:
        """Beam search from one image (1, N, D_vis) and a text prompt (e.g. the ids of
        VQA_PROMPT.format(question)); returns the new ids without the stop id."""
        if image.shape[0] != 1:
            raise InputError("generate takes one image (1, tokens, dim) at a time")
        if not prompt:
            raise InputError("the prompt is empty; give at least one token")
        Q = self.config.qformer.n_query
        n_new = min(max_new_tokens, self.lm.config.context - Q - len(prompt))
        if n_new <= 0:
            return []
        tokens = torch.tensor([list(prompt)] * beams, device=image.device)
        # the soft prompt and the prompt in one prefill; then plain LM steps (fused where it applies)
        batch = DecodeBatch.conditioned(
            self.lm, lambda cache: self(image.expand(beams, -1, -1), tokens, cache=cache, last_only=True)[:, -1],
            rows=beams, slots=Q + len(prompt) + n_new, budget=n_new)
        return beam_search(batch.logits, lambda t: batch.step(t[:, 0]), batch.keep, beams=beams,
                           max_new_tokens=n_new, stop_ids=set(stop_ids))


# ----------------------------------------------------------------------------- HF weights

_LAYER_PARTS = {
    "attention.attention.query": "self_attn.q_proj",
    "attention.attention.key": "self_attn.k_proj",
    "attention.attention.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.o_proj",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.attention.query": "cross_attn.q_proj",
    "crossattention.attention.key": "cross_attn.k_proj",
    "crossattention.attention.value": "cross_attn.v_proj",
    "crossattention.output.dense": "cross_attn.o_proj",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate_query.dense": "query_ffn.fc",
    "output_query.dense": "query_ffn.proj",
    "output_query.LayerNorm": "query_ffn.norm",
    "intermediate.dense": "text_ffn.fc",
    "output.dense": "text_ffn.proj",
    "output.LayerNorm": "text_ffn.norm",
}
_TOP = {
    "layernorm.weight": "emb_norm.weight",
    "layernorm.bias": "emb_norm.bias",
    "query_tokens": "query_tokens",
    "embeddings.word_embeddings.weight": "word_emb.weight",
    "embeddings.position_embeddings.weight": "pos_emb.weight",
}


def load_hf_qformer_state_dict(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Blip2QFormerModel names (plus the top-level `query_tokens` and the
    text `embeddings.*` of Blip2 models, prefixes "qformer." stripped) -> septet QFormer names.
    Buffers (position_ids) are skipped; any other unknown name is an error."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        key = name.removeprefix("qformer.")
        if key.endswith("position_ids"):
            continue
        if key in _TOP:
            out[_TOP[key]] = tensor
            continue
        parts = key.split(".")
        if len(parts) >= 5 and parts[0] == "encoder" and parts[1] == "layer" and parts[2].isdigit():
            inner, leaf = ".".join(parts[3:-1]), parts[-1]
            if inner in _LAYER_PARTS and leaf in ("weight", "bias"):
                out[f"layers.{parts[2]}.{_LAYER_PARTS[inner]}.{leaf}"] = tensor
                continue
        raise CheckpointError(f"Q-Former weight '{name}' has no septet counterpart")
    return out
