"""easy-VQA accuracy of a VLM checkpoint, with the baselines a reader needs to judge it.

    Flamingo   k-shot (k in 0/4/8/32; Flamingo §3.1, App. A.2): k support chunks
               "<image>Question: q Answer: a<EOC>", then the query's "<image>Question: q
               Answer:"; support images drawn at random from the train split, or by RICES
               (most similar train images by frozen visual features); one random question
               of each support image.
    BLIP-2     zero-shot: soft prompt + "Question: {} Answer:" (BLIP-2 §4.2).
    majority   always the most frequent train answer.
    text-only  the same frozen LM, prompted "Question: {} Answer:" without any image.

Scoring: `ranked` = the answer among the 13 with the highest log-likelihood (the closed
set makes this exact); `generated` = beam search (Flamingo 3 beams, BLIP-2 5), counted
right when the decoded text equals the answer.

Evaluation unit: a random subset of test IMAGES with all their questions (about 9.7 per
image). Questions of one image share its support set, so the few-shot prefix is run once
per image into a KV cache and every question continues it — without this the 32-shot
column alone costs hours on a CPU.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..inference import DecodeBatch
from . import data as D
from .infer import VLM


@dataclass
class EvalConfig:
    shots: tuple[int, ...] = (0, 4, 8, 32)
    support: tuple[str, ...] = ("random", "rices")
    images: int = 55  # test images; all of their questions are asked
    generate_questions: int = 100  # free generation is slower: the first N questions only
    seed: int = 0


@dataclass
class Result:
    name: str  # e.g. "flamingo 4-shot rices"
    shots: int
    ranked: float
    n: int
    generated: float | None = None
    n_generated: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def test_subset(test: D.VQAData, n_images: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(test.image_ids), generator=g)[:n_images].tolist()
    return sorted(test.image_ids[i] for i in order)


def support_for(query_id: int, k: int, how: str, test: D.VQAData, pool: D.VQAData, rices: D.Rices | None,
                seed: int) -> list:
    """k support questions from `pool` for the query image (one per support image)."""
    if k == 0:
        return []
    g = torch.Generator().manual_seed(seed * 100_003 + query_id * 101 + k)
    if how == "rices":
        imgs = rices.select(test.features.get([query_id])[0], k)
    else:
        imgs = [pool.image_ids[i] for i in torch.randperm(len(pool.image_ids), generator=g)[:k].tolist()]
    return [pool.by_image[i][int(torch.randint(len(pool.by_image[i]), (1,), generator=g))] for i in imgs]


@torch.no_grad()
def rank_image(vlm: VLM, test: D.VQAData, pool: D.VQAData, query_id: int, support: list,
               cands: list[list[int]]) -> torch.Tensor:
    """(Q, C) log-likelihoods of the answers to every question about `query_id`."""
    qs = test.by_image[query_id]
    q_ids = [vlm.fmt.question(q.text) for q in qs]
    feats = test.features.get([query_id])  # (1, N, D)
    if vlm.arch == "flamingo":
        prefix = [t for s in support for t in vlm.fmt.flamingo_chunk(s)[0]] + [vlm.fmt.image_id]
        media = feats if not support else torch.cat((pool.features.get([s.image_id for s in support]), feats))
        return vlm.rank(vlm.prefix_batch(prefix, media[None, :, None]), q_ids, cands)  # (1, k + 1, 1, N, D)
    return _rank_shared_first_token(vlm, q_ids, cands, feats)


def _rank_shared_first_token(vlm, q_ids: list[list[int]], cands, media) -> torch.Tensor:
    """Prompts that all start with the same token ("Question") share it as the cached prefix."""
    out = torch.empty(len(q_ids), len(cands))
    groups: dict[int, list[int]] = {}
    for i, q in enumerate(q_ids):
        groups.setdefault(q[0], []).append(i)
    for first, rows in groups.items():
        out[rows] = vlm.rank(vlm.prefix_batch([first], media), [q_ids[i][1:] for i in rows], cands)
    return out


class TextOnly(VLM):
    """The frozen LM alone, in VLM's scoring interface: the text-only baseline."""

    def __init__(self, lm, tokenizer, eos_id: int):  # noqa: D107 - no bridge
        self.arch, self.vision, self._lm, self.tokenizer = "text", "", lm, tokenizer
        self.fmt = D.Formatter(tokenizer.encode, image_id=None, eoc_id=None, eos_id=eos_id)

    @property
    def lm(self):
        return self._lm

    @torch.no_grad()
    def prefix_batch(self, prefix, media) -> DecodeBatch:
        return DecodeBatch(self._lm, [prefix], max_new_tokens=0)


def evaluate_vlm(vlm: VLM, test: D.VQAData, pool: D.VQAData, ec: EvalConfig,
                 progress: Callable[[str], None] | None = None) -> list[Result]:
    """Ranked (and, at 0 shots, generated) accuracy of one VLM over the test subset."""
    images = test_subset(test, ec.images, ec.seed)
    cands = [vlm.fmt.answer(a) for a in test.answers]
    settings = [(0, "-")] if vlm.arch != "flamingo" else [
        (k, how) for k in ec.shots for how in (("-",) if k == 0 else ec.support)]
    rices = D.Rices(pool) if any(how == "rices" for _, how in settings) else None
    results = []
    for k, how in settings:
        t0, right, n = time.perf_counter(), 0, 0
        for img in images:
            support = support_for(img, k, how, test, pool, rices, ec.seed)
            scores = rank_image(vlm, test, pool, img, support, cands)
            for q, row in zip(test.by_image[img], scores):
                right += test.answers[int(row.argmax())] == q.answer
                n += 1
        name = f"{vlm.arch} {k}-shot" + ("" if how == "-" else f" {how}")
        res = Result(name, k, right / n, n, seconds=time.perf_counter() - t0)
        if k == 0:
            res.generated, res.n_generated = generation_accuracy(vlm, test, images, ec.generate_questions)
        results.append(res)
        if progress:
            progress(f"{name}: ranked {res.ranked:.1%} (n={n})")
    return results


@torch.no_grad()
def generation_accuracy(vlm: VLM, test: D.VQAData, images: list[int], limit: int) -> tuple[float, int]:
    qs = [q for img in images for q in test.by_image[img]][:limit]
    right = sum(vlm.answer(test.features.get([q.image_id]), q.text).strip().lower() == q.answer for q in qs)
    return right / max(len(qs), 1), len(qs)


def baselines(lm, tokenizer, eos_id: int, train: D.VQAData, test: D.VQAData, ec: EvalConfig) -> list[Result]:
    """Majority answer and the text-only LM on the same test subset."""
    images = test_subset(test, ec.images, ec.seed)
    qs = [q for img in images for q in test.by_image[img]]
    majority = Counter(q.answer for q in train.questions).most_common(1)[0][0]
    out = [Result(f"majority answer ('{majority}')", 0, sum(q.answer == majority for q in qs) / len(qs), len(qs))]
    text = TextOnly(lm, tokenizer, eos_id)
    cands = [text.fmt.answer(a) for a in test.answers]
    t0, right = time.perf_counter(), 0
    for img in images:
        q_ids = [text.fmt.question(q.text) for q in test.by_image[img]]
        scores = _rank_shared_first_token(text, q_ids, cands, None)
        right += sum(test.answers[int(r.argmax())] == q.answer for q, r in zip(test.by_image[img], scores))
    out.append(Result("text-only LM 0-shot", 0, right / len(qs), len(qs), seconds=time.perf_counter() - t0))
    return out


__all__ = ["EvalConfig", "Result", "TextOnly", "baselines", "evaluate_vlm", "generation_accuracy", "rank_image",
           "support_for", "test_subset"]
