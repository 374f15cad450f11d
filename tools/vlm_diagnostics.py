#!/usr/bin/env python
"""Where a VLM bridge's easy-VQA errors come from (the numbers in docs/vision-language.md).

    python tools/vlm_diagnostics.py probe                 # what the frozen features hold
    python tools/vlm_diagnostics.py errors RUN [--images 200]

probe: a linear classifier (AdamW, 300 full-batch steps) on the frozen EfficientNet-Lite0
features of the 4,000 train images, mean-pooled over the 7 x 7 grid and z-scored, predicting
each image's colour (8) and shape (3); accuracy on the 1,000 test images. If the probe is
near 100%, the features carry what the questions ask, and a bridge's errors come from
elsewhere.

errors: a trained bridge's 0-shot ranked answers on random test images (seed 1), error
rates per kind of question: colour and shape answers, and yes/no questions about a colour
or a shape, affirmative or negated ("is there not ...", "is no ... present?"), plus the most
frequent (truth, answer) confusions.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import torch

COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")


def probe() -> None:
    from septet.vlm import data as D

    torch.manual_seed(0)
    splits = {s: D.load_easyvqa(s) for s in ("train", "test")}
    feats, labels = {}, {}
    for name, data in splits.items():
        ids = data.image_ids
        feats[name] = torch.cat([data.features.get(ids[b:b + 250]).mean(1) for b in range(0, len(ids), 250)])
        labels[name] = [data.captions[i].split()[1:] for i in ids]  # "a red circle" -> [red, circle]
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-3
    x = {k: (v - mu) / sd for k, v in feats.items()}
    for what, pos in (("colour", 0), ("shape", 1)):
        classes = sorted({lab[pos] for lab in labels["train"]})
        y = {k: torch.tensor([classes.index(lab[pos]) for lab in v]) for k, v in labels.items()}
        head = torch.nn.Linear(x["train"].shape[1], len(classes))
        opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-2)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(head(x["train"]), y["train"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (head(x["test"]).argmax(-1) == y["test"]).float().mean().item()
        print(f"{what}: test accuracy {acc:.2%} over {len(y['test'])} images ({len(classes)} classes)")


def kind(question: str, answer: str) -> str:
    if answer not in ("yes", "no"):
        return "colour answer" if answer in COLOURS else "shape answer"
    about = "colour" if re.search(r"\b(" + "|".join(COLOURS) + r")\b", question) else "shape"
    negated = re.search(r"\b(not|no)\b", question) is not None
    return f"yes/no about a {about}, {'negated' if negated else 'affirmative'}"


def errors(run: str, n_images: int) -> None:
    from septet.vlm import data as D
    from septet.vlm.evaluate import rank_image, test_subset
    from septet.vlm.infer import load_vlm

    vlm = load_vlm(run)
    test = vlm.view(D.load_easyvqa("test"))
    cands = [vlm.fmt.answer(a) for a in test.answers]
    total, wrong, confusions = Counter(), Counter(), Counter()
    for img in test_subset(test, n_images, 1):
        scores = rank_image(vlm, test, test, img, [], cands)  # (questions, 13)
        for q, row in zip(test.by_image[img], scores):
            pred, k = test.answers[int(row.argmax())], kind(q.text, q.answer)
            total[k] += 1
            if pred != q.answer:
                wrong[k] += 1
                confusions[(q.answer, pred)] += 1
    n = sum(total.values())
    print(f"{run}: {n} questions on {n_images} test images, accuracy {1 - sum(wrong.values()) / n:.2%}")
    for k in sorted(total):
        print(f"  {k:38s} {total[k]:5d} questions ({total[k] / n:5.1%})  errors {wrong[k] / total[k]:6.1%}")
    print("  most frequent (truth, answer):", confusions.most_common(6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe")
    e = sub.add_parser("errors")
    e.add_argument("run")
    e.add_argument("--images", type=int, default=200)
    e.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(getattr(args, "threads", 1))
    if args.cmd == "probe":
        probe()
    else:
        errors(args.run, args.images)


if __name__ == "__main__":
    main()
