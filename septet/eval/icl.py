"""In-context learning, appearing in a model septet trains itself.

GPT-3's claim is that a language model picks up a task from K demonstrations in its
prompt, without any weight update, and does better the more it is shown. Here that is made
visible at toy scale:

- The corpus: documents of lines "key value", keys from a fixed set of 8 made-up
  syllables, values from 8 colour words, and a key -> value map drawn at random for EVERY
  document: the document first draws a favourite value, then gives each key the favourite
  with probability 3/4 and a uniformly random value otherwise. What a key means in one
  document says nothing about the next, so the only way to predict a value is to read the
  document so far: which value it favours, and whether this key was shown already.
- Training: septet's own trainer (septet.train) on that corpus, a 2-layer LLaMA.
- Evaluation: the GPT-3 protocol of septet.eval.fewshot, unchanged. An episode is one fresh
  map, as a Task whose training split holds one "key value" line per key and whose test
  items query every key as multiple choice over the 8 values (per-token normalised
  log-likelihood). K demonstrations are drawn per item with a seed and joined by newlines.
  Accuracy is averaged over many episodes.

Two reference readers bound what a model can do (`reader_accuracy`): one that only counts
which value the demonstrations favour (a single attention layer can learn this), and a
perfect one that also recalls a shown key's value (this takes an induction head: find the
earlier line with the same key, copy what followed). Both score 1/8 at K=0; the perfect
reader reaches 100% at K=8, when every key has been shown. A model that ignores its
context stays at 1/8 for every K.

    python -m septet.eval.icl --out runs/icl --steps 1200     # writes icl.json/.md/.png
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .metrics import Score, mean_of_scores
from .tasks import Doc, Task, TaskConfig

KEYS = ("ka", "mo", "ri", "te", "zu", "pa", "lo", "ne")
VALUES = ("red", "blue", "green", "gold", "pink", "gray", "teal", "lime")
SHOTS = (0, 1, 2, 4, 8)
DOMINANT = 0.75
# a 164k-parameter LLaMA: two layers are the least that can form an induction head
# (one layer finds the previous occurrence's successor, the other copies it)
TINY = {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "vocab_size": 320, "context": 128}


def reader_accuracy(k: int, *, use_keys: bool = True, trials: int = 20_000, seed: int = 0) -> float:
    """Accuracy of an idealised reader of K demonstrations, by simulation of the episodes.
    With `use_keys` it answers a key it was shown from the demonstration (perfect recall)
    and otherwise, like the reader without, guesses the most frequent demonstrated value
    (the document's favourite, most likely); with no demonstrations it guesses at random."""
    rng = random.Random(f"reader:{seed}")
    right = 0
    for _ in range(trials):
        mapping = random_mapping(rng)
        shown = rng.sample(KEYS, k)
        query = rng.choice(KEYS)
        if use_keys and query in shown:
            right += 1
            continue
        counts = {v: 0 for v in VALUES}
        for key in shown:
            counts[mapping[key]] += 1
        top = max(counts.values())
        guess = rng.choice([v for v in VALUES if counts[v] == top])
        right += guess == mapping[query]
    return right / trials


# ----------------------------------------------------------------------------- data

def random_mapping(rng: random.Random) -> dict[str, str]:
    """A fresh key -> value map: each key gets the document's favourite value (itself drawn at
    random) with probability DOMINANT, else a uniformly random value."""
    favourite = rng.choice(VALUES)
    return {k: favourite if rng.random() < DOMINANT else rng.choice(VALUES) for k in KEYS}


def document(rng: random.Random, lines: int) -> str:
    """One document: a fresh random mapping, shown through `lines` random keys."""
    mapping = random_mapping(rng)
    return "\n".join(f"{k} {mapping[k]}" for k in (rng.choice(KEYS) for _ in range(lines)))


def write_corpus(path: Path, n_docs: int, *, lines: int = 24, seed: int = 0) -> Path:
    """A JSONL corpus ({"text": ...} per line) that `septet train --data` reads."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": document(rng, lines)}) + "\n")
    return path


def episode(rng: random.Random, name: str) -> Task:
    """One mapping as a GPT-3-protocol task: demonstrations from `train`, every key queried."""
    mapping = random_mapping(rng)
    docs = [Doc(k, VALUES, VALUES.index(mapping[k])) for k in KEYS]
    config = TaskConfig(separator="\n", target_delimiter=" ", mode="token")
    return Task(name, test=list(docs), train=list(docs), config=config)


# ----------------------------------------------------------------------------- train and evaluate

def train_model(out: Path, *, steps: int, batch_size: int = 32, seq_len: int = 64, lr: float = 3e-3,
                n_docs: int = 4000, seed: int = 0, snapshots: int = 1, progress: bool = False,
                model: dict | None = None) -> list[Path]:
    """Train the tiny model on a fresh corpus with septet.train; returns the checkpoints
    (step 0, the untrained model, then `snapshots` evenly spaced ones ending at `steps`).
    `model` overrides fields of TINY, e.g. {"d_model": 32}."""
    from ..checkpoints.native import list_checkpoints
    from ..train.loop import TrainConfig, train

    if steps < 1 or snapshots < 1:
        raise InputError(f"steps ({steps}) and snapshots ({snapshots}) must be >= 1")
    corpus = write_corpus(out / "corpus.jsonl", n_docs, seed=seed)
    every = max(1, steps // snapshots)
    tc = TrainConfig(model="llama-tiny", out=out / "run", data=str(corpus), steps=steps,
                     batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=max(1, steps // 20),
                     seed=seed, eval_every=steps, eval_batches=4, ckpt_every=every,
                     keep_checkpoints=snapshots + 2, progress=progress, overrides={**TINY, **(model or {})},
                     peak_flops=1e11,  # skip measuring the matmul peak: MFU is not the point here
                     spike_factor=0.0)
    train(tc)
    return [p for _, p in list_checkpoints(out / "run")]


@dataclass(frozen=True)
class CurvePoint:
    shots: int
    score: Score  # accuracy over all episodes' items
    ideal: float  # the perfect reader's accuracy


def accuracy_curve(lm, *, shots=SHOTS, episodes: int = 40, seed: int = 0) -> list[CurvePoint]:
    """Accuracy at each K over `episodes` fresh mappings (8 queries each), by the GPT-3
    protocol: septet.eval.fewshot draws the demonstrations and scores the choices."""
    from .fewshot import evaluate
    from .scoring import Scorer

    scorer = Scorer.from_loaded(lm, batch_size=64)
    rng = random.Random(f"icl-eval:{seed}")  # other mappings than any training document's draw
    tasks = [episode(rng, f"icl-episode-{i}") for i in range(episodes)]
    points = []
    for k in shots:
        per_episode = []
        for i, task in enumerate(tasks):
            rows = evaluate(task, scorer, k, seed=seed * 100_003 + i)
            acc = next(r for r in rows if r.metric == "acc")
            per_episode.append(Score(acc.value, acc.n, acc.stderr))
        points.append(CurvePoint(k, mean_of_scores(per_episode), reader_accuracy(k)))
    return points


# ----------------------------------------------------------------------------- report

def markdown(curves: dict[int, list[CurvePoint]]) -> str:
    """Rows: training step; columns: K. Cells: accuracy ± standard error."""
    shots = [p.shots for p in next(iter(curves.values()))]
    lines = ["| training step | " + " | ".join(f"K={k}" for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    for step, points in curves.items():
        cells = [f"{p.score.value:.3f} ± {p.score.stderr:.3f}" for p in points]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    for name, use_keys in (("reader of the favourite value only", False), ("perfect reader", True)):
        cells = [f"{reader_accuracy(k, use_keys=use_keys):.3f}" for k in shots]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[int, list[CurvePoint]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for step, points in curves.items():
        ax.errorbar([p.shots for p in points], [p.score.value for p in points],
                    yerr=[p.score.stderr for p in points], marker="o", capsize=3, label=f"step {step}")
    shots = [p.shots for p in next(iter(curves.values()))]
    ax.plot(shots, [reader_accuracy(k) for k in shots], "k--", label="perfect reader")
    ax.plot(shots, [reader_accuracy(k, use_keys=False) for k in shots], "k-.",
            label="reader of the favourite value only")
    ax.axhline(1 / len(VALUES), color="gray", linestyle=":", label="chance (1/8)")
    ax.set_xticks(shots)
    ax.set_xlabel("K demonstrations in the prompt")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("in-context learning, 2-layer septet model, random key→value maps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..api import load

    ap = argparse.ArgumentParser(prog="python -m septet.eval.icl", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for the run and icl.json/.md/.png")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--snapshots", type=int, default=3, help="checkpoints evaluated besides step 0")
    ap.add_argument("--episodes", type=int, default=50, help="fresh mappings per K (8 queries each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    checkpoints = train_model(out, steps=args.steps, seed=args.seed, snapshots=args.snapshots,
                              progress=True)
    curves = {}
    for path in checkpoints:
        step = int(path.name.split("-")[-1])
        curves[step] = accuracy_curve(load(path), episodes=args.episodes, seed=args.seed)
        print(f"step {step}: " + ", ".join(f"K={p.shots} {p.score.value:.3f}" for p in curves[step]),
              file=sys.stderr)
    table = markdown(curves)
    (out / "icl.md").write_text(table, encoding="utf-8")
    (out / "icl.json").write_text(json.dumps({
        "steps": args.steps, "episodes": args.episodes, "seed": args.seed, "model": TINY,
        "curves": {str(s): [{"shots": p.shots, "acc": p.score.value, "stderr": p.score.stderr,
                             "n": p.score.n, "ideal": p.ideal} for p in pts] for s, pts in curves.items()},
    }, indent=2), encoding="utf-8")
    plot(curves, out / "icl.png")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
