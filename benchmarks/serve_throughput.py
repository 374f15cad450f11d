#!/usr/bin/env python
"""`septet serve` under concurrent load: one request alone vs N sent at once, alternating.

    python benchmarks/serve_throughput.py                # SmolLM2, 8 at once, 128 tokens, 2 rounds
    python benchmarks/serve_throughput.py --model runs/llama-tiny --concurrent 4 --rounds 3

Starts `septet serve` in a subprocess on a free port, waits for /health, then per round
sends one greedy /v1/completions request alone and N different ones from N threads at
once, and prints the tokens/s of each (end to end: HTTP, prefill and decode) and their
ratio. The server's /health counters at the end say how many batches the requests ran in.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

PROMPTS = ["The lighthouse keeper had not spoken to another person in", "Once upon a time in a small village",
           "The history of the Roman Empire", "def fibonacci(n):", "In the year 2050, cities",
           "The recipe for a good bread", "Mountains are formed when", "The best way to learn a language"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(url: str, prompt: str, n: int, out: list) -> None:
    body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    out.append(json.loads(urllib.request.urlopen(req, timeout=900).read())["usage"]["completion_tokens"])


def timed(url: str, prompts: list[str], n: int) -> tuple[int, float]:
    out: list[int] = []
    threads = [threading.Thread(target=ask, args=(url, p, n, out)) for p in prompts]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(out), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "septet.cli", "serve", "--model", args.model,
                               "--port", str(port), "--quiet"])
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"septet serve exited with {server.returncode}")
                time.sleep(0.5)
        prompts = (PROMPTS * (args.concurrent // len(PROMPTS) + 1))[:args.concurrent]
        timed(url, prompts[:1], 8)  # warm-up
        ratios = []
        for r in range(args.rounds):
            n1, t1 = timed(url, prompts[:1], args.new_tokens)
            nn, tn = timed(url, prompts, args.new_tokens)
            ratios.append((nn / tn) / (n1 / t1))
            print(f"round {r + 1}: 1 request {n1 / t1:.1f} tok/s; {args.concurrent} at once {nn / tn:.1f} tok/s "
                  f"in all ({nn} tokens in {tn:.2f} s); ratio {ratios[-1]:.2f}x", flush=True)
        print("server:", urllib.request.urlopen(url + "/health").read().decode())
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
