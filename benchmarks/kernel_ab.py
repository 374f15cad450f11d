#!/usr/bin/env python
"""A/B of two builds of septet's C kernels on one token's matmuls, interleaved in one process.

    python benchmarks/kernel_ab.py                          # default build vs -DPREFETCH_ROWS=0
    python benchmarks/kernel_ab.py --b "-DPREFETCH_ROWS=8" --rounds 20 --int8-act

Builds septet/kernels/*.c twice (A: as shipped, B: with the extra compiler flags given) as
plain shared libraries and calls them through ctypes on the matmuls of one SmolLM2-135M
decoding step: 30 layers of qkv (960x576), o (576x576), gate_up (3072x576), down (576x1536)
in Q4_1 and the 49152x576 Q8_0 head, batch 1, random weights (~96 MB, as the real model: more
than a cache holds, so each token streams its weights from memory). The two builds alternate
round by round, so machine drift hits both alike; prints the median ms per token of each and
the median of the per-round ratios B / A.
"""

from __future__ import annotations

import argparse
import ctypes
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from septet.kernels import C_SOURCES  # noqa: E402

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def build(flags: list[str], out: Path) -> ctypes.CDLL:
    cmd = ["gcc", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", *flags,
           *map(str, C_SOURCES), "-o", str(out), "-lm"]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(out))


def weights(n_layer: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    mats = []
    for N, K in LAYER * n_layer:
        qs = torch.randint(0, 256, (N, K // 32, 16), dtype=torch.uint8, generator=g)
        d = (torch.rand(N, K // 32, generator=g) * 0.01).half()
        m = (-torch.rand(N, K // 32, generator=g) * 0.01).half()
        mats.append((qs, d, m, N, K))
    head = (torch.randint(-127, 128, (vocab, 18, 32), dtype=torch.int8, generator=g),
            (torch.rand(vocab, 18, generator=g) * 0.01).half())
    return mats, head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--b", default="-DPREFETCH_ROWS=0", help="extra gcc flags of build B")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=5, help="tokens timed per round and build")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int8-act", action="store_true", help="llama.cpp's int8-activation arithmetic")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="septet-ab-"))
    libs = {"A (as shipped)": build([], tmp / "a.so"), f"B ({args.b})": build(shlex.split(args.b), tmp / "b.so")}
    mats, (hq, hd) = weights(30, 49152)
    x = {K: torch.randn(1, K) for K in (576, 1536)}
    y = torch.empty(1, 49152)
    p, a8, th = ctypes.c_void_p, int(args.int8_act), args.threads

    def token(lib) -> None:
        for qs, d, m, N, K in mats:
            rc = lib.septet_q4_1_mm(p(qs.data_ptr()), p(d.data_ptr()), p(m.data_ptr()), N, K,
                                    p(x[K].data_ptr()), 1, p(y.data_ptr()), a8, th)
            assert rc == 0
        assert lib.septet_q8_0_mm(p(hq.data_ptr()), p(hd.data_ptr()), 49152, 576, p(x[576].data_ptr()), 1,
                                  p(y.data_ptr()), a8, th) == 0

    times: dict[str, list[float]] = {k: [] for k in libs}
    for _ in range(args.rounds):
        for name, lib in libs.items():
            token(lib)  # warm-up: the other build's weights were the last ones read
            t = time.perf_counter()
            for _ in range(args.tokens):
                token(lib)
            times[name].append((time.perf_counter() - t) / args.tokens * 1e3)
    (na, ta), (nb, tb) = times.items()
    print(f"{args.rounds} rounds x {args.tokens} tokens, {th} threads, "
          f"{'int8' if a8 else 'fp32'} activations; ms per token (median, min):")
    for name, t in times.items():
        print(f"  {name}: {statistics.median(t):.2f}, {min(t):.2f}")
    print(f"  B / A, median of per-round ratios: {statistics.median(b / a for a, b in zip(ta, tb)):.3f}")


if __name__ == "__main__":
    main()
