"""Training and evaluation data for the VLM bridges, built from easy-VQA and cached features.

Every example is token ids plus targets (-100 = no loss) plus the image ids whose frozen
encoder features it needs; batches are right-padded. Right padding is safe under a causal
LM: a real token never attends to a later pad, so no padding mask is needed; pads only
get -100 targets.

Formats (Flamingo §2.3 and App. B; BLIP-2 §4):
    Flamingo VQA         <image>Question: {q} Answer: {a}<EOC>        loss on " {a}<EOC>"
    Flamingo caption     <image>{caption}<EOC>                         loss on the caption
    Flamingo interleaved K VQA chunks of K different images in a row   loss on every answer
    BLIP-2 stage 1       the caption, as Q-Former text (LM token ids)
    BLIP-2 stage 2 VQA   [soft prompt] Question: {q} Answer: {a}</s>   loss on " {a}</s>"
    BLIP-2 caption       [soft prompt] A photo of {caption}</s>        loss on the caption

RICES (Flamingo App. A.2, after Yang et al. 2021): support examples are the training
images whose frozen visual features are most similar (cosine of mean-pooled tokens) to
the query image, ordered so the most similar one comes last, nearest the query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from septet.data.easyvqa import Question
from septet.errors import DataError

VQA_TEMPLATE = "Question: {} Answer:"  # the prompt of both papers' VQA evaluations
CAPTION_PROMPT = "A photo of"  # BLIP-2's captioning prompt ("a photo of")


class FeatureStore(Protocol):
    def get(self, image_ids: Sequence[int]) -> torch.Tensor: ...  # (B, N, D) float32


@dataclass
class VQAData:
    """One split: questions, a caption per image, and the frozen encoder's features."""

    questions: list[Question]
    captions: dict[int, str]  # image id -> "a red circle"
    features: FeatureStore
    answers: list[str]  # the closed answer set (easy-VQA: 13)
    by_image: dict[int, list[Question]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_image = {}
        for q in self.questions:
            self.by_image.setdefault(q.image_id, []).append(q)
        self.image_ids = sorted(self.by_image)


class StandardizedFeatures:
    """Features z-scored per channel with fixed train-split statistics.

    EfficientNet-Lite0's final ReLU6 map is sparse (92% zeros on easy-VQA) and shares a large
    common component across images (mean cosine 0.64 between pooled features; ~0.0 after
    z-scoring). Fed raw, the bridge's LayerNorms see nearly the same tokens for every image
    and a short CPU run learns the text prior only; centring and scaling each channel (a
    fixed affine map, part of the checkpoint, not trained) lets it tell images apart."""

    def __init__(self, store: FeatureStore, mean: torch.Tensor, std: torch.Tensor):
        self.store, self.mean, self.std = store, mean, std  # (D,), (D,)

    def get(self, image_ids: Sequence[int]) -> torch.Tensor:
        return (self.store.get(image_ids) - self.mean) / self.std  # (B, N, D)


def feature_stats(data: VQAData, n_images: int = 1000, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (D,) over the tokens of the first n_images images."""
    ids = data.image_ids[:n_images]
    x = torch.cat([data.features.get(ids[b:b + batch]).flatten(0, 1) for b in range(0, len(ids), batch)])
    return x.mean(0), x.std(0).clamp(min=1e-3)  # dead channels: scale by a constant, not by ~0


def standardized(data: VQAData, mean: torch.Tensor, std: torch.Tensor) -> VQAData:
    """The same split, its features seen through StandardizedFeatures."""
    return VQAData(data.questions, data.captions, StandardizedFeatures(data.features, mean, std), data.answers)


def load_easyvqa(split: str) -> VQAData:
    """easy-VQA `split` with its EfficientNet-Lite0 features (computed once, then cached)."""
    from septet.data.easyvqa import LITE0_PREPROCESS, EasyVQA, feature_cache
    from septet.models.vision import load_efficientnet_lite0

    ds = EasyVQA(split)  # type: ignore[arg-type]
    feats = feature_cache(ds, load_efficientnet_lite0(), encoder_name="efficientnet-lite0",
                          preprocess=LITE0_PREPROCESS, progress=True)
    return VQAData(ds.questions, {i: ds.caption(i) for i in ds.image_ids}, feats, ds.answers)


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) int64, right-padded
    targets: torch.Tensor  # (B, T) int64: the id predicted at each position, -100 = no loss
    image_ids: list[list[int]]  # per row, the images in order of their <image> tags


def pad_batch(rows: list[tuple[list[int], list[int]]], image_ids: list[list[int]], pad_id: int = 0) -> Batch:
    """rows of (input ids, per-position target ids) -> right-padded tensors."""
    T = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for r, (ids, tgt) in enumerate(rows):
        tokens[r, :len(ids)] = torch.tensor(ids)
        targets[r, :len(tgt)] = torch.tensor(tgt)
    return Batch(tokens, targets, image_ids)


def with_targets(prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
    """Input = prompt + answer; position t predicts input[t + 1]; only the answer is scored."""
    ids = prompt + answer
    tgt = [-100] * (len(prompt) - 1) + answer + [-100]
    return ids, tgt


class Formatter:
    """Turns questions and captions into token ids for one tokenizer (cached: the same few
    hundred strings recur)."""

    def __init__(self, encode, *, image_id: int | None, eoc_id: int | None, eos_id: int | None):
        self._encode = encode
        self.image_id, self.eoc_id, self.eos_id = image_id, eoc_id, eos_id
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self._encode(text))
        return self._cache[text]

    def question(self, q: str) -> list[int]:
        return self.encode(VQA_TEMPLATE.format(q))

    def answer(self, a: str) -> list[int]:
        return self.encode(" " + a)

    # Flamingo ------------------------------------------------------------------------
    def flamingo_chunk(self, q: Question | None, caption: str | None = None) -> tuple[list[int], list[int]]:
        """One image's chunk: ids and targets aligned to them (loss on answer/caption + <EOC>)."""
        if q is not None:
            prompt, answer = [self.image_id] + self.question(q.text), self.answer(q.answer)
        else:
            prompt, answer = [self.image_id], self.encode(caption or "")
        ids = prompt + answer + [self.eoc_id]
        # position t predicts ids[t + 1]; <EOC>'s own position predicts nothing (what follows
        # a chunk, the next <image>, is given, not generated)
        tgt = [-100] * (len(prompt) - 1) + answer + [self.eoc_id, -100]
        return ids, tgt

    @staticmethod
    def flamingo_sequence(chunks: list[tuple[list[int], list[int]]]) -> tuple[list[int], list[int]]:
        """Concatenate chunks (their targets are already aligned per chunk)."""
        return [i for c, _ in chunks for i in c], [x for _, t in chunks for x in t]

    # BLIP-2 --------------------------------------------------------------------------
    def blip_vqa(self, q: Question) -> tuple[list[int], list[int]]:
        return with_targets(self.question(q.text), self.answer(q.answer) + [self.eos_id])

    def blip_caption(self, caption: str) -> tuple[list[int], list[int]]:
        return with_targets(self.encode(CAPTION_PROMPT), self.encode(" " + caption) + [self.eos_id])


def sample_questions(data: VQAData, n: int, g: torch.Generator, alpha: float = 1.0) -> list[Question]:
    """n questions drawn with replacement. alpha < 1 flattens the answer distribution: an
    answer is drawn with probability proportional to (its question count)^alpha, then one
    of its questions uniformly (temperature sampling, as multilingual LMs balance languages,
    Conneau et al. 2020). easy-VQA's train questions are 74% yes/no and 13% colour; at
    alpha 0.5 they become 42% yes/no, 36% colour, 22% shape. alpha = 1 is uniform over questions."""
    if alpha == 1.0:
        idx = torch.randint(0, len(data.questions), (n,), generator=g).tolist()
        return [data.questions[i] for i in idx]
    if not 0.0 <= alpha <= 1.0:
        raise DataError(f"answer sampling alpha={alpha} must lie in [0, 1]")
    groups: dict[str, list[Question]] = {}
    for q in data.questions:
        groups.setdefault(q.answer, []).append(q)
    answers = sorted(groups)
    weights = torch.tensor([len(groups[a]) ** alpha for a in answers], dtype=torch.float64)
    picks = torch.multinomial(weights, n, replacement=True, generator=g).tolist()
    within = torch.rand(n, generator=g, dtype=torch.float64).tolist()
    return [groups[answers[a]][int(u * len(groups[answers[a]]))] for a, u in zip(picks, within)]


def sample_images(data: VQAData, n: int, g: torch.Generator, *, distinct_captions: bool = False) -> list[int]:
    """n image ids; with distinct_captions, no two share a caption (ITC's in-batch
    negatives must be true negatives: easy-VQA has only 24 captions)."""
    order = torch.randperm(len(data.image_ids), generator=g).tolist()
    out, seen = [], set()
    for i in order:
        img = data.image_ids[i]
        if distinct_captions and data.captions[img] in seen:
            continue
        seen.add(data.captions[img])
        out.append(img)
        if len(out) == n:
            break
    return out


def flamingo_vqa_batch(data: VQAData, fmt: Formatter, n: int, g: torch.Generator, alpha: float = 1.0) -> Batch:
    qs = sample_questions(data, n, g, alpha)
    return pad_batch([fmt.flamingo_sequence([fmt.flamingo_chunk(q)]) for q in qs], [[q.image_id] for q in qs])


def flamingo_caption_batch(data: VQAData, fmt: Formatter, n: int, g: torch.Generator) -> Batch:
    imgs = sample_images(data, n, g)
    rows = [fmt.flamingo_sequence([fmt.flamingo_chunk(None, data.captions[i])]) for i in imgs]
    return pad_batch(rows, [[i] for i in imgs])


def flamingo_interleaved_batch(data: VQAData, fmt: Formatter, n: int, k: int, g: torch.Generator,
                               alpha: float = 1.0) -> Batch:
    """n sequences of k image-question-answer chunks each (the few-shot format)."""
    rows, ids = [], []
    for _ in range(n):
        qs = sample_questions(data, k, g, alpha)
        rows.append(fmt.flamingo_sequence([fmt.flamingo_chunk(q) for q in qs]))
        ids.append([q.image_id for q in qs])
    return pad_batch(rows, ids)


def blip_stage2_batch(data: VQAData, fmt: Formatter, n_vqa: int, n_caption: int, g: torch.Generator,
                      alpha: float = 1.0) -> Batch:
    qs = sample_questions(data, n_vqa, g, alpha)
    imgs = sample_images(data, n_caption, g)
    rows = [fmt.blip_vqa(q) for q in qs] + [fmt.blip_caption(data.captions[i]) for i in imgs]
    return pad_batch(rows, [[q.image_id] for q in qs] + [[i] for i in imgs])


def text_batch(fmt: Formatter, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts as Q-Former input: (B, T) ids (right-padded with 0) and a (B, T) bool mask of
    real tokens."""
    ids = [fmt.encode(t) for t in texts]
    if any(not x for x in ids):
        raise DataError("a text for the Q-Former encodes to no tokens")
    T = max(len(x) for x in ids)
    text = torch.zeros(len(ids), T, dtype=torch.long)
    mask = torch.zeros(len(ids), T, dtype=torch.bool)
    for r, x in enumerate(ids):
        text[r, :len(x)], mask[r, :len(x)] = torch.tensor(x), True
    return text, mask


def caption_text_batch(data: VQAData, fmt: Formatter, image_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 text: the images' captions (see text_batch)."""
    return text_batch(fmt, [data.captions[i] for i in image_ids])


def media_for(data: VQAData, image_ids: list[list[int]]) -> torch.Tensor:
    """Per-row image lists (equal lengths) -> (B, M, 1, N, D) media for Flamingo."""
    M = len(image_ids[0])
    if any(len(r) != M for r in image_ids):
        raise DataError("every row of a Flamingo batch must hold the same number of images")
    flat = data.features.get([i for r in image_ids for i in r])  # (B·M, N, D)
    return flat.view(len(image_ids), M, 1, *flat.shape[1:])


class Rices:
    """Retrieval-based In-Context Example Selection over a support pool's features."""

    def __init__(self, pool: VQAData, batch: int = 256):
        self.pool = pool
        keys = [pool.features.get(pool.image_ids[b:b + batch]).mean(1) for b in range(0, len(pool.image_ids), batch)]
        self.keys = F.normalize(torch.cat(keys), dim=-1)  # (P, D)

    def select(self, query: torch.Tensor, k: int) -> list[int]:
        """query features (N, D) -> k pool image ids, most similar LAST."""
        if k == 0:
            return []
        sim = self.keys @ F.normalize(query.float().mean(0), dim=-1)  # (P,)
        top = sim.topk(min(k, len(sim))).indices.tolist()
        return [self.pool.image_ids[i] for i in reversed(top)]


__all__ = ["StandardizedFeatures", "feature_stats", "standardized", "Batch", "CAPTION_PROMPT", "Formatter", "Rices",
           "VQAData", "VQA_TEMPLATE", "blip_stage2_batch",
           "caption_text_batch", "flamingo_caption_batch", "flamingo_interleaved_batch", "flamingo_vqa_batch",
           "load_easyvqa", "media_for", "pad_batch", "sample_images", "sample_questions", "text_batch", "with_targets"]
