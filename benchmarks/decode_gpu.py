#!/usr/bin/env python
"""Prefill and decode speed on a GPU: septet against HF transformers, same weights, one run.

    python benchmarks/decode_gpu.py [--json] [--batches 1,8] [--prompt 512] [--new 128]
        [--dtype bf16] [--hf-compile]

The model is SmolLM2-135M's shape (LLaMA: 30 layers, d 576, 9 heads, 3 K/V heads, d_ff
1536, 49152-token vocabulary, tied embeddings, RoPE theta 1e5) with random weights: speed
does not depend on the values, and a GPU machine here cannot fetch the real ones. septet's
weights are exported with `save_hf` and loaded by transformers' LlamaForCausalLM, and the
two must give the same fp32 logits before anything is timed.

Engines: septet eager; septet compiled (the static decode step, captured as a CUDA graph);
HF eager `generate` (its default dynamic cache); with --hf-compile also HF's static cache
with torch.compile (`cache_implementation="static"`), its own fastest documented setting.

Timing, per engine and batch size B (prompts of `--prompt` random tokens, greedy, no stop
token): t1 = generate 1 new token (prefill + one sample), tN = generate N new tokens. Prefill
tokens/s = B·P / t1, decode tokens/s = B·(N − 1) / (tN − t1). Each is the best of 3 after a
warm-up call (which includes compilation). Peak GPU memory is torch's max allocated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from septet.checkpoints.export_hf import save_hf  # noqa: E402
from septet.inference import Sampling, generate_batch, optimize_for_inference  # noqa: E402
from septet.models import build  # noqa: E402
from septet.models.llama import LLaMAConfig  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, n_layer=30, d_model=576, n_head=9, n_kv_head=3, d_ff=1536,
                    context=2048, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True)


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(run, B: int, P: int, N: int, reps: int = 3) -> dict:
    """run(n_new) generates n_new tokens for the batch; returns prefill and decode rates."""
    run(N)  # warm-up: compilation, CUDA-graph capture, allocator
    torch.cuda.reset_peak_memory_stats()
    t1 = min(timed(lambda: run(1)) for _ in range(reps))
    tn = min(timed(lambda: run(N)) for _ in range(reps))
    return {"prefill_tok_s": B * P / t1, "decode_tok_s": B * (N - 1) / max(tn - t1, 1e-9),
            "t1_s": t1, "tN_s": tn, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}


def septet_runner(model, prompts, compile_: bool):
    def run(n_new: int):
        s = Sampling(max_new_tokens=n_new, temperature=0.0, compile=compile_)
        out = generate_batch(model, prompts, s)
        assert all(len(o) == n_new for o in out), "septet stopped early"
    return run


def hf_runner(hf, prompts, static: bool):
    ids = torch.tensor(prompts, device="cuda")
    mask = torch.ones_like(ids)
    extra = {"cache_implementation": "static"} if static else {}

    def run(n_new: int):
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
        assert out.shape[1] == ids.shape[1] + n_new, "HF stopped early"
    return run


def parity(model, hf) -> float:
    """Max |logit difference| on one 64-token prompt, both in fp32 without TF32."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(5))
        x = x.cuda()
        with torch.no_grad():
            a = model(x).float()
            b = hf(x).logits.float()
        diff = (a - b).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    if not diff < 1e-3:
        raise SystemExit(f"septet and transformers disagree (max |Δlogit| {diff:.2e}); refusing to benchmark")
    return diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--hf-compile", action="store_true", help="also time HF's static cache + torch.compile")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (this benchmark is the GPU counterpart of benchmarks/inference.py)")
    from transformers import LlamaForCausalLM

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    cfg = LLaMAConfig(**SMOLLM2_135M)
    model = build(cfg).cuda().eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, cfg, Path(tmp) / "hf")
        hf = LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).cuda().eval()
    diff = parity(model, hf)
    log(f"# {torch.cuda.get_device_name()}: fp32 logits agree, max |Δ| {diff:.1e}")
    model.to(dtype)
    hf.to(dtype)
    optimize_for_inference(model)

    g = torch.Generator().manual_seed(7)
    results = []
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt), generator=g).tolist()
        engines = [("septet eager", septet_runner(model, prompts, False)),
                   ("septet compiled", septet_runner(model, prompts, True)),
                   ("HF eager", hf_runner(hf, prompts, False))]
        if args.hf_compile:
            engines.append(("HF static+compile", hf_runner(hf, prompts, True)))
        for name, run in engines:
            try:
                r = measure(run, B, args.prompt, args.new)
            except Exception as e:  # an anchor that fails is reported, not hidden
                r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            r.update(engine=name, batch=B)
            results.append(r)
            if "error" in r:
                log(f"{name:18s} B={B}: {r['error']}")
            else:
                log(f"{name:18s} B={B}: prefill {r['prefill_tok_s']:9.0f} tok/s  decode {r['decode_tok_s']:8.1f} tok/s"
                    f"  peak {r['peak_mem_gb']:.2f} GB")
    ratios = {}
    for r in results:
        base = next((x for x in results if x["engine"] == "HF eager" and x["batch"] == r["batch"]), None)
        if r["engine"].startswith("septet") and base and "error" not in base and "error" not in r:
            ratios[f"{r['engine']} / HF eager, B={r['batch']}"] = {
                "decode": r["decode_tok_s"] / base["decode_tok_s"],
                "prefill": r["prefill_tok_s"] / base["prefill_tok_s"]}
    out = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
           "prompt": args.prompt, "new_tokens": args.new, "parity_max_abs_logit_diff": diff,
           "results": results, "ratios": ratios}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in ratios.items():
            print(f"{k}: decode {v['decode']:.2f}x, prefill {v['prefill']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
