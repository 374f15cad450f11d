"""Image-text retrieval with a BLIP-2 checkpoint: rank by ITC, re-rank the top k by ITM.

BLIP-2 §4.4 (after ALBEF/BLIP): the image-text contrastive similarity (max over the
queries) ranks every candidate, then the k best (k = 128 in the paper) are re-ranked by
the image-text matching head's match probability, which lets text and queries attend to
each other and so is the sharper, costlier judge.

On easy-VQA's test split the texts are the captions "a {colour} {shape}": 24 distinct
ones for 1,000 images, each caption true of ~42 images. Reported, with ITC alone and with
the ITM re-rank:
    image -> text  R@1, R@5: the image's own caption among the top 1 / 5 of the 24
                   (chance 4.2% / 20.8%), over the images;
    text -> image  R@1, R@10: some true image among the top 1 / 10 of all test images, and
                   P@10: the share of the top 10 that are true, over the 24 captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from septet.errors import InputError

from . import data as D
from .infer import VLM

RERANK_K = 128


@dataclass
class RetrievalScore:
    metric: str  # e.g. "i2t_R@1_itm"
    value: float
    n: int  # queries


def _stage1(vlm: VLM):
    if vlm.arch != "blip2":
        raise InputError(f"retrieval needs BLIP-2's ITC / ITM heads; this checkpoint is {vlm.arch}")
    return vlm.bridge.stage1


@torch.no_grad()
def ranked(vlm: VLM, features: torch.Tensor, texts: list[str], *, rerank: bool, k: int = RERANK_K,
           batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """(image -> text, text -> image) orders, best first: (Ni, Nt') and (Nt, Ni'). By ITC
    alone (everything, by similarity), or ITC's top k re-ranked by ITM (the top k only:
    `Blip2Stage1.retrieve_texts` / `retrieve_images`)."""
    s1 = _stage1(vlm)
    text, mask = D.text_batch(vlm.fmt, texts)
    if rerank:
        return s1.retrieve_texts(features, text, mask, k), s1.retrieve_images(text, mask, features, k)
    img = torch.cat([s1.image_embeds(features[b:b + batch]) for b in range(0, features.shape[0], batch)])
    sim = s1.similarity(img, s1.text_embeds(text, mask))  # (Ni, Nt)
    return sim.argsort(dim=1, descending=True, stable=True), sim.t().argsort(dim=1, descending=True, stable=True)


def evaluate_retrieval(vlm: VLM, test: D.VQAData, images: list[int], k: int = RERANK_K) -> list[RetrievalScore]:
    """The module docstring's metrics over `images` (test image ids) and their captions."""
    captions = sorted({test.captions[i] for i in images})
    truth = torch.tensor([captions.index(test.captions[i]) for i in images])  # (Ni,)
    feats = test.features.get(images)  # (Ni, N, D)
    out = []
    if k < 10:
        raise InputError(f"retrieval re-ranks the top k = {k} by ITM; R@10 needs k >= 10")
    for rerank, tag in ((False, "itc"), (True, "itm")):
        i2t, t2i = ranked(vlm, feats, captions, rerank=rerank, k=k)  # (Ni, >= 5), (Nt, >= 10)
        hit = i2t == truth[:, None]  # where the own caption landed
        for r in (1, 5):
            out.append(RetrievalScore(f"i2t_R@{r}_{tag}", hit[:, :r].any(1).float().mean().item(), len(images)))
        right = truth[t2i] == torch.arange(len(captions))[:, None]  # (Nt, Ni)
        for r in (1, 10):
            out.append(RetrievalScore(f"t2i_R@{r}_{tag}", right[:, :r].any(1).float().mean().item(), len(captions)))
        out.append(RetrievalScore(f"t2i_P@10_{tag}", right[:, :10].float().mean().item(), len(captions)))
    return out


__all__ = ["RERANK_K", "RetrievalScore", "evaluate_retrieval", "ranked"]
