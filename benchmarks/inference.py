#!/usr/bin/env python
"""Inference speed and memory: septet vs HF transformers vs llama.cpp on the same GGUF.

    python benchmarks/inference.py                 # table (~5 min on an idle 2-core CPU)
    python benchmarks/inference.py --quick         # shorter decode, one timed repeat (~2 min)
    python benchmarks/inference.py --json > r.json # machine-readable (progress on stderr)
    python benchmarks/inference.py --rounds 3      # every engine 3 times, alternating order: medians
                                                   # and septet / llama.cpp paired within each round

Model: SmolLM2-135M-Instruct Q4_1 GGUF (`septet.assets.asset_file("smollm2")`), loaded by
- septet: `septet.load(path, dtype=...)` for every weight setting septet offers (fp32, bf16,
  and any quantized / compiled setting `septet.load` or `septet.inference` gains, found by
  feature detection; `--septet-settings` picks or adds some);
- transformers: the same GGUF dequantized to fp32 (without `accelerate`, as tests/test_gguf.py),
  greedy `model.generate` with its KV cache;
- llama.cpp (llama-cpp-python): the GGUF as is (Q4_1), n_threads=2, through the C API so
  batch 8 runs as 8 parallel sequences in one context (`n_seq_max=8`, one llama_batch per step).

Each engine runs in its own subprocess, so load time and peak RSS (VmHWM) are per engine.
Metrics, with the same token ids for every engine (septet's tokenizer; tests/test_llamacpp_parity
checks they equal llama.cpp's):
- load: wall seconds to a ready model from the fetched file (imports excluded, shown apart);
- prefill: tokens/s for one 512-token prompt (time to the first token: septet's generate
  path, transformers' forward with logits_to_keep=1, llama.cpp decoding one 512-token batch);
- decode b1 / b8: greedy decode tokens/s after the prompt (32-token prompts, 128 new tokens,
  EOS disabled), counting only the steps after the first token; b8 is the total over 8 rows;
- peak RSS of the process, and septet's in-memory weight bytes (the RSS target is 1.5x that).
Timings are the fastest of --reps repeats after one warm-up (all kept in the JSON's raw_s).
septet reports which decode step ran (`decode_path`, from `septet.inference.decode_path`:
fused, compiled, or eager = the model's forward).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as _md
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"decode_b1_vs_llamacpp": 1.0, "decode_b8_vs_llamacpp": 2.0, "prefill_vs_llamacpp": 1.5,
           "rss_vs_weight_bytes": 1.5, "load_s": 3.0}
TEXT = (
    "The lighthouse keeper had not spoken to another person in eleven weeks. Every morning he climbed "
    "the hundred and twelve steps to the lamp room, polished the great lens until it shone, and wrote "
    "the weather in a leather notebook. In the evenings he read old letters by candlelight. "
    "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0\n"
    "Der Zug nach München hatte wieder einmal Verspätung, also setzte sich Anna in das kleine Café. "
    "Wczoraj wieczorem pojechaliśmy nad jezioro, żeby obejrzeć zachód słońca. "
    "Invoice 2024-0317: 3 items at 19.99 each, 12 items at 4.50, total 447.68. "
)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), falling back to getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def best_time(fn, reps: int) -> tuple[float, list[float]]:
    """The fastest of `reps` timed calls after one warm-up: on a shared machine the fastest
    run is the one least disturbed by other processes (all runs are kept in raw_s)."""
    fn()  # warm-up
    ts = [fn() for _ in range(reps)]
    return min(ts), ts


# ------------------------------------------------------------------------------ septet


def septet_settings() -> list[dict]:
    """Septet's weight settings: fp32 / bf16 activations x none / int8 / int4 weights, each
    also with the compiled decode step (`Sampling(compile=True)`)."""
    out = [{"name": "fp32", "dtype": "float32"}, {"name": "bf16", "dtype": "bfloat16"}]
    for q in ("int8", "int4"):
        out.append({"name": q, "dtype": "float32", "load": {"quant": q}})
        out.append({"name": f"bf16+{q}", "dtype": "bfloat16", "load": {"quant": q}})
    # llama.cpp's arithmetic (activations quantised to int8 per block) on septet's kernels
    out.append({"name": "int4-a8", "dtype": "float32", "load": {"quant": "int4-a8"}})
    out += [{**s, "name": f"{s['name']}+compile", "sampling": {"compile": True}} for s in list(out)]
    # the same quantised settings on torch's own int8/int4 kernels instead of septet's
    out += [{**s, "name": f"{s['name']} (torch kernels)", "env": {"SEPTET_KERNELS": "0"}}
            for s in list(out) if "load" in s and s["name"].endswith("+compile") and "-a8" not in s["name"]]
    return out


def _septet_child(spec: dict) -> dict:
    os.environ.update(spec.get("env", {}))  # e.g. SEPTET_KERNELS=0: torch's int8/int4 kernels
    t0 = time.perf_counter()
    import torch

    import septet
    from septet import inference as gen

    torch.set_num_threads(spec["threads"])
    import_s = time.perf_counter() - t0
    rss_after_import = rss_bytes()
    dtype = getattr(torch, spec.get("dtype", "float32"))
    t0 = time.perf_counter()
    lm = septet.load(spec["path"], dtype=dtype, **spec.get("load", {}))
    load_s = time.perf_counter() - t0
    peak_after_load = peak_rss_bytes()
    model = lm.model
    seen, weight_bytes = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen and t.device.type != "meta":
            seen.add(t.data_ptr())
            weight_bytes += t.numel() * t.element_size()
    sampling_extra = spec.get("sampling", {})

    def stream(ids: list[int], n: int):
        s = gen.Sampling(max_new_tokens=n, temperature=0.0, **sampling_extra)
        return gen.generate_ids(model, ids, s)

    def prefill() -> float:
        t = time.perf_counter()
        next(iter(stream(spec["prompt"], 1)))
        return time.perf_counter() - t

    batch_api = next((getattr(gen, n) for n in ("generate_batch", "generate_ids_batch", "batch_generate")
                      if hasattr(gen, n)), None)

    def decode(prompts: list[list[int]], n: int) -> tuple[float, list[int]]:
        """Seconds for the n-1 steps after the first token; the first row's tokens."""
        if len(prompts) == 1:
            it = iter(stream(prompts[0], n))
            toks = [next(it)]
            t = time.perf_counter()
            toks += list(it)
            dt = time.perf_counter() - t
            assert len(toks) == n, f"septet stopped after {len(toks)} of {n} tokens"
            return dt, toks
        if batch_api is not None:  # returns the ids at the end: decode = t(n tokens) - t(1 token)
            s1 = gen.Sampling(max_new_tokens=1, temperature=0.0, **sampling_extra)
            sn = gen.Sampling(max_new_tokens=n, temperature=0.0, **sampling_extra)
            t = time.perf_counter()
            batch_api(model, prompts, s1)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            outs = batch_api(model, prompts, sn)
            tn = time.perf_counter() - t
            assert all(len(o) == n for o in outs), [len(o) for o in outs]
            return max(tn - t1, 1e-9), list(outs[0])
        # no batched generate API: the model's own batched KV cache, greedy
        with torch.inference_mode():
            B, T = len(prompts), len(prompts[0])
            cache = model.new_cache(B, T + n)
            x = torch.tensor(prompts)
            nxt = model(x, cache=cache)[:, -1].argmax(-1)
            toks = [int(nxt[0])]
            t = time.perf_counter()
            for _ in range(n - 1):
                nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
                toks.append(int(nxt[0]))
            return time.perf_counter() - t, toks

    decode_path = gen.decode_path(model, bool(sampling_extra.get("compile")), model.config.context)
    reps, n = spec["reps"], spec["new_tokens"]
    pre, pre_all = best_time(prefill, reps)
    d1, d1_all = best_time(lambda: decode(spec["prompts"][:1], n)[0], reps)
    _, head = decode(spec["prompts"][:1], n)
    B = spec["batch"]
    d8, d8_all = best_time(lambda: decode(spec["prompts"][:B], n)[0], reps)
    return {"engine": "septet", "setting": spec["name"], "load_s": load_s, "import_s": import_s,
            "prefill_tok_s": len(spec["prompt"]) / pre, "decode_b1_tok_s": (n - 1) / d1,
            "decode_b8_tok_s": B * (n - 1) / d8, "weight_bytes": weight_bytes,
            "rss_after_import": rss_after_import, "peak_rss_after_load": peak_after_load,
            "peak_rss": peak_rss_bytes(), "greedy_head": head[:32],
            "raw_s": {"prefill": pre_all, "decode_b1": d1_all, "decode_b8": d8_all}, "decode_path": decode_path,
            "batch_path": "model forward + KVCache (no batched generate API)" if batch_api is None
            else f"septet.generate.{batch_api.__name__}, decode = t({n} tokens) - t(1 token)"}


# ------------------------------------------------------------------------------ transformers


def _hf_child(spec: dict) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    import_s = time.perf_counter() - t0
    rss_after_import = rss_bytes()
    path = Path(spec["path"])
    t0 = time.perf_counter()
    try:
        import accelerate  # noqa: F401

        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        cfg = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        model.load_state_dict(tensors, strict=False)
        model.tie_weights()
        del tensors
    load_s = time.perf_counter() - t0
    gc = model.generation_config
    gc.eos_token_id = None  # EOS disabled: always max_new_tokens
    gc.pad_token_id = 0
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None

    class Clock(BaseStreamer):  # put() gets the prompt, then each step's new tokens
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def prefill() -> float:
        x = torch.tensor([spec["prompt"]])
        with torch.inference_mode():
            t = time.perf_counter()
            model(x, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t

    def decode(prompts, n):
        x = torch.tensor(prompts)
        clock = Clock()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, streamer=clock)
        assert out.shape[1] == x.shape[1] + n, out.shape
        # times[0]: prompt echoed, times[1]: first new token (after prefill), times[-1]: last token
        return clock.times[-1] - clock.times[1], out[0, x.shape[1]:].tolist()

    reps, n, B = spec["reps"], spec["new_tokens"], spec["batch"]
    pre, pre_all = best_time(prefill, reps)
    d1, d1_all = best_time(lambda: decode(spec["prompts"][:1], n)[0], reps)
    _, head = decode(spec["prompts"][:1], n)
    d8, d8_all = best_time(lambda: decode(spec["prompts"][:B], n)[0], reps)
    return {"engine": "transformers", "setting": "fp32", "load_s": load_s, "import_s": import_s,
            "prefill_tok_s": len(spec["prompt"]) / pre, "decode_b1_tok_s": (n - 1) / d1,
            "decode_b8_tok_s": B * (n - 1) / d8, "rss_after_import": rss_after_import,
            "peak_rss": peak_rss_bytes(), "greedy_head": head[:32],
            "raw_s": {"prefill": pre_all, "decode_b1": d1_all, "decode_b8": d8_all},
            "version": transformers.__version__}


# ------------------------------------------------------------------------------ llama.cpp


def _llamacpp_child(spec: dict) -> dict:
    t0 = time.perf_counter()
    import llama_cpp as L
    import numpy as np

    import_s = time.perf_counter() - t0
    rss_after_import = rss_bytes()
    L.llama_backend_init()  # its log goes to this child's stderr, which the parent keeps for errors
    threads, B, n, P = spec["threads"], spec["batch"], spec["new_tokens"], len(spec["prompt"])
    t0 = time.perf_counter()
    mp = L.llama_model_default_params()
    if hasattr(mp, "use_extra_bufts"):
        mp.use_extra_bufts = spec["extra_bufts"]
    model = L.llama_model_load_from_file(spec["path"].encode(), mp)
    assert model, "llama.cpp could not load the model"
    vocab = L.llama_model_get_vocab(model)
    V = L.llama_vocab_n_tokens(vocab)

    def context(n_ctx: int, n_seq: int):
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        ctx = L.llama_init_from_model(model, cp)
        assert ctx, "llama.cpp could not create a context"
        return ctx

    ctx1 = context(1024, 1)
    load_s = time.perf_counter() - t0
    batch = L.llama_batch_init(512, 0, B)

    def fill(items):  # items: (token, pos, seq, want_logits)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        batch.n_tokens = len(items)

    def run(ctx, items) -> None:
        fill(items)
        rc = L.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"

    def argmax(ctx, i: int) -> int:
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(V,)).argmax())

    def clear(ctx):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)

    def prefill() -> float:
        clear(ctx1)
        t = time.perf_counter()
        run(ctx1, [(tok, p, 0, p == P - 1) for p, tok in enumerate(spec["prompt"])])
        argmax(ctx1, P - 1)
        return time.perf_counter() - t

    def decode(ctx, prompts) -> tuple[float, list[int]]:
        clear(ctx)
        T = len(prompts[0])
        run(ctx, [(tok, p, s, p == T - 1) for s, pr in enumerate(prompts) for p, tok in enumerate(pr)])
        nxt = [argmax(ctx, s * T + T - 1) for s in range(len(prompts))]
        toks = [nxt[0]]
        t = time.perf_counter()
        for step in range(n - 1):
            run(ctx, [(tok, T + step, s, True) for s, tok in enumerate(nxt)])
            nxt = [argmax(ctx, s) for s in range(len(prompts))]
            toks.append(nxt[0])
        return time.perf_counter() - t, toks

    reps = spec["reps"]
    pre, pre_all = best_time(prefill, reps)
    d1, d1_all = best_time(lambda: decode(ctx1, spec["prompts"][:1])[0], reps)
    _, head = decode(ctx1, spec["prompts"][:1])
    L.llama_free(ctx1)
    ctx8 = context(B * 256, B)  # 256 positions per sequence (32-token prompt + up to 224 new)
    d8, d8_all = best_time(lambda: decode(ctx8, spec["prompts"][:B])[0], reps)
    L.llama_free(ctx8)
    L.llama_batch_free(batch)
    L.llama_model_free(model)
    return {"engine": "llama.cpp", "setting": "Q4_1" + ("" if spec["extra_bufts"] else " (no extra bufts)"),
            "load_s": load_s, "import_s": import_s, "prefill_tok_s": P / pre,
            "decode_b1_tok_s": (n - 1) / d1, "decode_b8_tok_s": B * (n - 1) / d8,
            "rss_after_import": rss_after_import, "peak_rss": peak_rss_bytes(), "greedy_head": head[:32],
            "raw_s": {"prefill": pre_all, "decode_b1": d1_all, "decode_b8": d8_all},
            "batch_path": f"{B} sequences in one context (n_seq_max={B}), one llama_batch per step",
            "version": _md.version("llama_cpp_python")}


CHILDREN = {"septet": _septet_child, "transformers": _hf_child, "llama.cpp": _llamacpp_child}


# ------------------------------------------------------------------------------ parent


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in sh("lscpu").splitlines()
                  if ln.startswith("Model name")), platform.processor())
    info = {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    for pkg in ("torch", "transformers", "llama_cpp_python"):
        try:
            info[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            info[pkg] = None
    info["git"] = sh(f"git -C {shlex.quote(str(ROOT))} rev-parse --short HEAD")
    if sh(f"git -C {shlex.quote(str(ROOT))} status --porcelain -- septet"):
        info["git"] += " (septet/ has uncommitted changes)"
    return info


def run_child(spec: dict, timeout: float) -> tuple[dict | None, str]:
    """(result, '') or (None, why)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if p.returncode != 0:
        why = (f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0
               else f"exit {p.returncode}")
        tail = " | ".join(p.stderr.strip().splitlines()[-3:])
        return None, f"{why}: {tail}"[:400]
    try:
        return json.loads(p.stdout.strip().splitlines()[-1]), ""
    except (json.JSONDecodeError, IndexError):
        return None, f"no result on stdout: {p.stdout[-300:]!r}"


def run_jobs(jobs: list[tuple[str, dict]], timeout: float) -> list[dict]:
    """Each engine / setting in its own subprocess, in the order given."""
    results = []
    for name, spec in jobs:
        label = f"{name} {spec.get('name', '')}".strip()
        log(f"[{_dt.datetime.now():%H:%M:%S}] {label} ... (load {sh('cat /proc/loadavg')})")
        t = time.perf_counter()
        res, why = run_child(spec, timeout)
        if res is None and name == "llama.cpp" and "SIGILL" in why:
            # AMX "extra buffer" kernels on a CPU that advertises AMX to a guest that may not use it
            log(f"  llama.cpp died ({why[:60]}); retrying with use_extra_bufts=False")
            res, why = run_child({**spec, "extra_bufts": False}, timeout)
            if res is not None:
                res["note"] = "default llama.cpp (extra buffer types, AMX) died with SIGILL on this machine"
        if res is None:
            res = {"engine": name, "setting": spec.get("name", ""), "error": why}
        log(f"  done in {time.perf_counter() - t:.0f} s")
        results.append(res)
    return results


METRICS = ("load_s", "prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "peak_rss")


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    k = len(xs) // 2
    return xs[k] if len(xs) % 2 else (xs[k - 1] + xs[k]) / 2


def _key(r: dict) -> tuple[str, str]:
    return r["engine"], r.get("setting", "")


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One result per engine / setting: each metric the median over the rounds it ran in (in
    the first round's order); an engine that failed in every round keeps its first error."""
    out = []
    for first in rounds[0]:
        runs = [r for rnd in rounds for r in rnd if _key(r) == _key(first) and "error" not in r]
        if not runs:
            out.append(first)
            continue
        merged = dict(runs[0])
        for m in METRICS:
            merged[m] = _median([r[m] for r in runs])
        merged["rounds_ok"] = len(runs)
        out.append(merged)
    return out


def paired_ratios(rounds: list[list[dict]]) -> dict[str, dict[str, list[float]]]:
    """setting -> metric -> septet / llama.cpp within each round (engines run minutes apart in
    one round, hours apart across sessions: the in-round ratio is the fair comparison)."""
    out: dict[str, dict[str, list[float]]] = {}
    for rnd in rounds:
        ref = next((r for r in rnd if r["engine"] == "llama.cpp" and "error" not in r), None)
        if ref is None:
            continue
        for r in rnd:
            if r["engine"] != "septet" or "error" in r:
                continue
            per = out.setdefault(r["setting"], {})
            for m in ("decode_b1_tok_s", "decode_b8_tok_s", "prefill_tok_s"):
                per.setdefault(m, []).append(round(r[m] / ref[m], 3))
    return out


def prompts(path: str, prompt_tokens: int, batch: int, short: int) -> tuple[list[int], list[list[int]]]:
    from septet.checkpoints.gguf import read_gguf  # metadata only: no weights in the parent
    from septet.checkpoints.gguf_tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(read_gguf(path).metadata, source=path)[0]
    ids = tok.encode(TEXT)
    long = (ids * (prompt_tokens // len(ids) + 2))[:prompt_tokens]
    # `batch` different short prompts: windows of the text
    shorts = [(ids * 3)[i * 7: i * 7 + short] for i in range(batch)]
    return long, shorts


def fmt_table(results: list[dict]) -> str:
    llama = next((r for r in results if r["engine"] == "llama.cpp" and "error" not in r), None)
    hf = next((r for r in results if r["engine"] == "transformers" and "error" not in r), None)
    gb = 1e9
    head = ("| engine | setting | load s | prefill tok/s | decode b1 tok/s | decode b8 tok/s | peak RSS GB "
            "| weights GB | b1 / llama.cpp | b8 / llama.cpp | prefill / llama.cpp | b1 / HF | b8 / HF | prefill / HF |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ratio(a, b, key):
        return f"{a[key] / b[key]:.2f}x" if a and b and b.get(key) else "–"

    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r.get('setting', '')} | failed: {r['error'][:120]} |" + " |" * 12)
            continue
        is_s = r["engine"] == "septet"
        lines.append(
            f"| {r['engine']} | {r['setting']} | {r['load_s']:.2f} | {r['prefill_tok_s']:.0f} | "
            f"{r['decode_b1_tok_s']:.1f} | {r['decode_b8_tok_s']:.1f} | {r['peak_rss'] / gb:.2f} | "
            + (f"{r['weight_bytes'] / gb:.3f}" if "weight_bytes" in r else "–") + " | "
            + " | ".join(ratio(r, ref, k) if is_s else "–" for ref in (llama, hf)
                         for k in ("decode_b1_tok_s", "decode_b8_tok_s", "prefill_tok_s"))
            + " |")
    return "\n".join(lines)


def verdict(results: list[dict]) -> list[str]:
    llama = next((r for r in results if r["engine"] == "llama.cpp" and "error" not in r), None)
    ours = [r for r in results if r["engine"] == "septet" and "error" not in r]
    if not ours:
        return ["no septet result"]
    out = []

    def best(key, lower=False):
        return (min if lower else max)(ours, key=lambda r: r[key])

    if llama:
        for key, tkey in (("decode_b1_tok_s", "decode_b1_vs_llamacpp"), ("decode_b8_tok_s", "decode_b8_vs_llamacpp"),
                          ("prefill_tok_s", "prefill_vs_llamacpp")):
            r = best(key)
            x = r[key] / llama[key]
            out.append(f"{'MET ' if x >= TARGETS[tkey] else 'MISS'} {key} >= {TARGETS[tkey]}x llama.cpp: "
                       f"best septet {r['setting']} {x:.2f}x")
    rs = min(ours, key=lambda r: r["peak_rss"] / r["weight_bytes"])
    x = rs["peak_rss"] / rs["weight_bytes"]
    out.append(f"{'MET ' if x <= TARGETS['rss_vs_weight_bytes'] else 'MISS'} peak RSS <= 1.5x weight bytes: "
               f"best {rs['setting']} {x:.2f}x ({rs['peak_rss'] / 1e9:.2f} GB for {rs['weight_bytes'] / 1e9:.3f} GB; "
               f"{rs['rss_after_import'] / 1e9:.2f} GB of it is the process after `import torch, septet`)")
    r = best("load_s", lower=True)
    out.append(f"{'MET ' if r['load_s'] <= TARGETS['load_s'] else 'MISS'} load <= 3 s: best {r['setting']} "
               f"{r['load_s']:.2f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--quick", action="store_true", help="32 new tokens and 1 timed repeat")
    ap.add_argument("--engines", default="septet,transformers,llama.cpp")
    ap.add_argument("--septet-settings", default="auto",
                    help="'auto' (everything detected), or comma-separated names from auto, or "
                         "NAME=JSON entries, e.g. 'int8={\"dtype\":\"bfloat16\",\"load\":{\"quantize\":\"int8\"}}'")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (--quick: 32)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="timed repeats (default 3; --quick: 1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per engine subprocess")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every engine this many times, in alternating order, and report medians "
                         "(this VM's speed drifts by 10-30%% over minutes; rounds pair the engines in time)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILDREN[spec["engine"]](spec)))
        return

    from septet import assets

    n_new = args.new_tokens or (32 if args.quick else 128)
    reps = args.reps or (1 if args.quick else 3)
    path = str(assets.asset_file("smollm2", progress=False, quiet=True))
    long, shorts = prompts(path, args.prompt_tokens, args.batch, 32)
    common = {"path": path, "prompt": long, "prompts": shorts, "new_tokens": n_new, "reps": reps,
              "batch": args.batch, "threads": args.threads}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    report = {"command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
              "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "uptime_before": sh("uptime"), "machine": machine(),
              "params": {k: v for k, v in common.items() if k not in ("prompt", "prompts", "path")}
              | {"prompt_tokens": len(long), "short_prompt_tokens": len(shorts[0]), "model": Path(path).name},
              "results": []}
    jobs = []
    if "septet" in engines:
        auto = septet_settings()
        if args.septet_settings == "auto":
            chosen = auto
        else:
            chosen = []
            for item in args.septet_settings.split(","):
                name, _, js = item.partition("=")
                chosen.append({"name": name, **json.loads(js)} if js else
                              next(s for s in auto if s["name"] == name))
        jobs += [("septet", {**common, **s, "engine": "septet"}) for s in chosen]
    if "transformers" in engines:
        jobs.append(("transformers", {**common, "engine": "transformers"}))
    if "llama.cpp" in engines:
        jobs.append(("llama.cpp", {**common, "engine": "llama.cpp", "extra_bufts": True}))

    rounds: list[list[dict]] = []
    for rnd in range(args.rounds):
        order = jobs if rnd % 2 == 0 else jobs[::-1]
        if args.rounds > 1:
            log(f"round {rnd + 1} of {args.rounds}")
        rounds.append(run_jobs(order, args.timeout))
    report["uptime_after"] = sh("uptime")
    report["results"] = combine_rounds(rounds) if len(rounds) > 1 else rounds[0]
    if len(rounds) > 1:
        report["rounds"] = rounds
        report["paired_ratios"] = paired_ratios(rounds)

    ref = next((r for r in report["results"] if r["engine"] == "llama.cpp" and "error" not in r), None)
    for r in report["results"]:
        if ref and "greedy_head" in r:
            same = 0
            for a, b in zip(r["greedy_head"], ref["greedy_head"]):
                if a != b:
                    break
                same += 1
            r["greedy_prefix_equal_to_llamacpp"] = same
    report["verdict"] = verdict(report["results"])
    if args.json:
        print(json.dumps(report, indent=1))
        return
    m = report["machine"]
    print(f"{report['date']}  {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers "
          f"{m['transformers']}, llama-cpp-python {m['llama_cpp_python']}, septet {m['git']}")
    print(f"load before: {report['uptime_before']}\nload after:  {report['uptime_after']}")
    try:
        busy = float(report["uptime_before"].split("load average:")[1].split(",")[0])
    except (IndexError, ValueError):
        busy = 0.0
    if busy > 0.5 * (m["cores"] or 1):
        print(f"WARNING: 1-min load {busy} on {m['cores']} cores: other processes compete for the CPU; "
              "llama.cpp's spinning threads suffer most, so ratios (and MET/MISS) are not meaningful")
    print(f"command: {report['command']}")
    print(f"prefill {len(long)} tokens; decode {n_new} new tokens after {len(shorts[0])}-token prompts, "
          f"greedy, EOS off; fastest of {reps} after a warm-up"
          + (f"; each figure the median of {args.rounds} rounds" if args.rounds > 1 else "") + "\n")
    print(fmt_table(report["results"]))
    print()
    for r in report["results"]:
        extra = [f"{k}: {r[k]}" for k in ("note", "decode_path", "batch_path", "greedy_prefix_equal_to_llamacpp",
                                            "rounds_ok") if k in r]
        if "import_s" in r:
            extra.append(f"import {r['import_s']:.1f} s, RSS after import {r['rss_after_import'] / 1e9:.2f} GB")
        if "peak_rss_after_load" in r:
            extra.append(f"peak RSS after load {r['peak_rss_after_load'] / 1e9:.2f} GB")
        print(f"- {r['engine']} {r.get('setting', '')}: " + "; ".join(extra))
    if "paired_ratios" in report:
        print(f"\nseptet / llama.cpp within each of the {args.rounds} rounds (median first):")
        for setting, per in report["paired_ratios"].items():
            print(f"- {setting}: " + "; ".join(f"{m.replace('_tok_s', '')} {_median(v):.2f}x ({', '.join(map(str, v))})"
                                               for m, v in per.items()))
    print()
    print("\n".join(report["verdict"]))


if __name__ == "__main__":
    main()
