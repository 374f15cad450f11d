#!/usr/bin/env python
"""septet's CPU matmul kernels against PyTorch's, layer by layer, at decoding shapes.

    python benchmarks/kernels.py [--json] [--threads 2] [--rows 1,8]

For each of SmolLM2-135M's matrix shapes (packed q/k/v, attention output, packed gate/up,
down, the 49,152-row head) and each activation row count: the time of one multiply by
septet's Q4_1 layer (`septet.kernels.linear.Q4Linear`; fp32 activations, and "-a8": int8
activations as llama.cpp) and by torch's int4 layer (`septet.quant.Int4Linear`:
`aten._weight_int4pack_mm_for_cpu`, bf16 activations), and of septet's Q8_0 layer against
torch's int8 one (`aten._weight_int8pack_mm`), all on the
same random weight, interleaved (A B A B ...) so background load hits both alike; median of
--reps calls. Also the one-token attention (`septet::decode_attention`) against SDPA on a
256-slot cache with 64 slots filled. The ratio is torch's time / septet's (> 1: septet
faster). The same weight is multiplied again and again, so it stays in cache (except the
head's): a model's decode step streams every weight from memory once per token, which on a
bandwidth-poor machine gains less than these ratios; benchmarks/inference.py measures that.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from septet import kernels  # noqa: E402
from septet.inference.quant import Int4Linear, Int8Linear  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "head": (49152, 576)}


def _median_pair(fa, fb, reps: int) -> tuple[float, float]:
    for _ in range(3):
        fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        sys.exit(f"septet kernels unavailable: {kernels.why_not()}")
    from septet.inference.quant.blocks import Q4Linear, Q8Linear

    g = torch.Generator().manual_seed(0)
    rows = []
    for M in (int(r) for r in args.rows.split(",")):
        for name, (N, K) in SHAPES.items():
            w = torch.randn(N, K, generator=g) * 0.02
            x = torch.randn(M, K, generator=g)
            xb = x.bfloat16()
            reps = max(5, args.reps // 10) if name == "head" else args.reps
            t4, t8 = Int4Linear(w), Int8Linear(w)
            pairs = {"int4": (Q4Linear(w), t4), "int4-a8": (Q4Linear(w, int8_act=True), t4),
                     "int8": (Q8Linear(w), t8), "int8-a8": (Q8Linear(w, int8_act=True), t8)}
            with torch.inference_mode():
                for kind, (ours, theirs) in pairs.items():
                    ts, tt = _median_pair(lambda ours=ours, x=x: ours(x), lambda theirs=theirs, xb=xb: theirs(xb), reps)
                    rows.append({"op": f"{kind} {name}", "rows": M, "shape": [N, K], "septet_us": ts * 1e6,
                                 "torch_us": tt * 1e6, "torch_over_septet": tt / ts})
        B, H, Hkv, S, D = M, 9, 3, 256, 64
        q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
        mask = torch.zeros(B, S, dtype=torch.bool)
        mask[:, :64] = True
        m4 = mask[:, None, None, :]
        ts, tt = _median_pair(
            lambda q=q, k=k, v=v, mask=mask, D=D: torch.ops.septet.decode_attention(q, k, v, mask, D ** -0.5),
            lambda q=q, k=k, v=v, m4=m4: F.scaled_dot_product_attention(q, k, v, attn_mask=m4, enable_gqa=True),
            args.reps)
        rows.append({"op": "attention (64 of 256 slots)", "rows": M, "shape": [H, Hkv, S, D],
                     "septet_us": ts * 1e6, "torch_us": tt * 1e6, "torch_over_septet": tt / ts})
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{args.threads} threads", "results": rows}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['date']}  {report['machine']}")
    print("| op | activation rows | septet µs | torch µs | torch / septet |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['op']} | {r['rows']} | {r['septet_us']:.1f} | {r['torch_us']:.1f} "
              f"| {r['torch_over_septet']:.2f} |")


if __name__ == "__main__":
    main()
