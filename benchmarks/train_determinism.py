#!/usr/bin/env python
"""What deterministic training costs: `septet train` with its default reproducible mode
(MKL_CBWR=AUTO,STRICT and torch's deterministic kernels) against SEPTET_DETERMINISTIC=0.

    python benchmarks/train_determinism.py [--model llama-tiny] [--steps 12] [--rounds 3] [--json]

MKL reads its mode once per process, so each setting runs as its own `septet train`
subprocess; the two alternate (on, off, on, off, ...) so drifting machine load hits both
alike. Throughput is the median `tokens_per_s` of each run's steps after the first two
(warmup), from its metrics.jsonl; the ratio on/off is reported per round and as the median.
The reproducible runs must also give the same losses as each other, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(model: str, steps: int, out: Path, deterministic: bool, threads: int) -> tuple[float, list[float]]:
    env = {**os.environ, "SEPTET_DETERMINISTIC": "1" if deterministic else "0",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "septet.cli", "train", "--model", model, "--steps", str(steps),
           "--out", str(out), "--no-progress", "--eval-every", str(steps), "--ckpt-every", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"septet train failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    speed = statistics.median(r["tokens_per_s"] for r in rows[2:])
    return speed, [r["loss"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rounds, losses = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            on, on_loss = run(args.model, args.steps, Path(tmp) / f"on{r}", True, args.threads)
            off, _ = run(args.model, args.steps, Path(tmp) / f"off{r}", False, args.threads)
            rounds.append({"on_tok_s": on, "off_tok_s": off, "ratio": on / off})
            losses.append(on_loss)
            print(f"round {r + 1}: deterministic {on:.0f} tok/s, default MKL {off:.0f} tok/s, "
                  f"ratio {on / off:.3f}", file=sys.stderr)
    result = {"model": args.model, "steps": args.steps, "threads": args.threads, "rounds": rounds,
              "median_ratio": statistics.median(r["ratio"] for r in rounds),
              "deterministic_runs_identical": all(x == losses[0] for x in losses)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"deterministic / default: median {result['median_ratio']:.3f} over {args.rounds} rounds; "
              f"reproducible runs identical: {result['deterministic_runs_identical']}")


if __name__ == "__main__":
    main()
