"""Beam search, once for every model: text LMs (GPT-3's free-form answers), Flamingo and BLIP-2.

The model is reached only through two callbacks, so one search serves any cache layout:
`step(tokens (K, 1)) -> logits (K, V)` continues every cache row by one token, and
`reorder(rows (K,))` makes cache row i continue the hypothesis that row `rows[i]` held
(KVCache.reorder; Flamingo's cache also moves its per-row image counts).

Rules (as in HF transformers' beam search, which follows Wu et al. 2016):
- each step ranks the 2K best (hypothesis, token) extensions; an extension that ends (a stop
  id, or `ends(seq)` true) becomes a finished hypothesis only if it ranks among the top K,
  the others stay live (up to K of them);
- a hypothesis of n generated tokens (its stop id counted) scores log P / lp(n);
- the search stops when the budget is spent (live hypotheses then finish as they are) or when
  no live hypothesis can beat the worst of K finished ones: log-probabilities only fall and
  lp grows with n, so a live score s can reach at most s / lp(max_new_tokens).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def gnmt_penalty(alpha: float) -> Callable[[int], float]:
    """lp(n) = ((5 + n) / 6)^α (Wu et al. 2016), the form T5 and GPT-3 (α 0.6) cite."""
    return lambda n: ((5.0 + n) / 6.0) ** alpha


def power_penalty(alpha: float = 1.0) -> Callable[[int], float]:
    """lp(n) = n^α; α = 1 ranks by mean log-probability per token."""
    return lambda n: float(n) ** alpha


def beam_search(first_logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor],
                reorder: Callable[[torch.Tensor], None], *, beams: int, max_new_tokens: int,
                stop_ids: set[int] | frozenset[int] = frozenset(),
                length_penalty: Callable[[int], float] = power_penalty(1.0),
                ends: Callable[[list[int]], bool] | None = None) -> list[int]:
    """The best continuation's token ids; a stop id that ended it is not included.

    first_logits (R, V): the prompt's next-token logits in R cache rows (R = 1, or R = K rows
    holding the same prompt); only row 0 is expanded. `ends(seq)` (optional) ends a
    hypothesis on its last token, e.g. when its text now contains a stop string; the token is
    kept and the caller cuts the text."""
    if beams < 1:
        raise ValueError(f"beams={beams} must be >= 1")
    K = beams
    device = first_logits.device
    seqs: list[list[int]] = [[] for _ in range(first_logits.shape[0])]
    scores = torch.full((first_logits.shape[0],), float("-inf"))
    scores[0] = 0.0
    finished: list[tuple[float, list[int]]] = []  # (normalised score, ids), best first
    logits = first_logits
    for i in range(max_new_tokens):
        logp = F.log_softmax(logits.float(), dim=-1).cpu()  # (rows, V)
        V = logp.shape[-1]
        cand = (scores[:, None] + logp).flatten()
        top = cand.topk(min(2 * K, cand.numel()))
        rows, toks, kept, kept_seqs = [], [], [], []
        last = i == max_new_tokens - 1
        for rank, (s, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            if s == float("-inf"):
                break
            r, t = divmod(flat, V)
            seq = seqs[r] + [t]
            if t in stop_ids or (ends is not None and ends(seq)):
                if rank < K:
                    finished.append((s / length_penalty(len(seq)), seq[:-1] if t in stop_ids else seq))
                continue
            if last:  # out of budget: a live hypothesis finishes as it is
                finished.append((s / length_penalty(len(seq)), seq))
            rows.append(r)
            toks.append(t)
            kept.append(s)
            kept_seqs.append(seq)
            if len(rows) == K:
                break
        finished.sort(key=lambda f: -f[0])
        del finished[K:]
        if last or not rows:
            break
        if len(finished) == K and kept[0] / length_penalty(max_new_tokens) <= finished[-1][0]:
            break
        while len(rows) < K:  # keep K rows (callers may hold K-row state): dead copies
            rows.append(rows[0])
            toks.append(toks[0])
            kept.append(float("-inf"))
            kept_seqs.append(kept_seqs[0])
        reorder(torch.tensor(rows, device=device))
        seqs, scores = kept_seqs, torch.tensor(kept)
        logits = step(torch.tensor(toks, device=device)[:, None])
    return finished[0][1] if finished else []
