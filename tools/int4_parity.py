"""Where septet's int4 setting loses agreement with llama.cpp on SmolLM2, by ablation.

    python tools/int4_parity.py collect [--hf]        # llama.cpp (and transformers) once
    python tools/int4_parity.py score [--kl] [--jitter N] [--decode] [VARIANT ...]
                                                      # top-1 agreement / mean |Δ log p|
    python tools/int4_parity.py speed [--compile] [VARIANT ...]  # decode tokens/s, 1 thread
    python tools/int4_parity.py weights               # int4 weight vs the GGUF's, per tensor

`collect` runs llama.cpp (llama-cpp-python, plain CPU kernels, `logits_all=True`) on the
texts of tests/test_llamacpp_parity.py, teacher-forced, and keeps per position its top-8
tokens and their log-probs in CACHE (and, with --hf, transformers' fp32 argmax and
log-prob of llama.cpp's top token, the calibration the parity test uses). `score` then
loads septet variants and compares them with that cache: top-1 agreement with llama.cpp's
argmax and the mean |log p_septet(top) − log p_llama.cpp(top)| over the same positions —
the two numbers of tests/test_llamacpp_parity.py. Every variant runs the full-sequence
forward (the prefill path); add --decode to also feed the tokens one at a time through a
KV cache (the per-token kernels `generate` uses).

Variants (`score --list`): `fp32` (no quantisation), `int4` (what `septet.load(quant=
"int4")` gives), and emulations that change one thing at a time — each linear layer
replaced by an fp32 matmul with chosen weights (exact GGUF values, or the int4 / int8 ones
septet keeps) and chosen roundings of its input and output (bf16 or none).

Run with `nice -n 19` and OMP_NUM_THREADS=1 on a shared machine.

Findings (2-core dev box, torch 2.13, llama-cpp-python 0.3.36, 829 positions;
transformers fp32 0.9530 / 0.0504; "jit" = mean top-1 over 4 runs with `--jitter`):

    variant                                   top-1   |Δ|     KL(fp32)  jit
    fp32 septet                               0.9530  0.0504  0         0.9527
    int4 before (int8 head, bf16 logits)      0.9180  0.0688  2.7e-3    0.9225
      head: int8-per-row weights only (emu)   0.9300  0.0624  1.6e-3    0.9294
      head: bf16 logits only (emu)            0.9409  0.0541  4.4e-4    0.9421
      head: bf16 weights / bf16 input (emu)   0.953   0.050   2e-5      0.953 / 0.951
      int4 body + exact fp32 head             0.9530  0.0540  6.3e-4    0.9493
      int4 body + dense bf16 head             0.9361  0.0562  1.1e-3    0.9376
      int4 body + int4 head                   0.8166  0.1934  4.8e-2    0.8176
    int4 now (int8 head, top-64 refined)      0.9530  0.0539  8.5e-4    0.9493
      refined top-16                          0.9530  0.0539  1.1e-3    0.9493
      int4 head, top-64 refined               0.9530  0.0547  8.0e-3    0.9493
    body: int4 weights, bf16 scale/zero (emu) 0.9530  0.0524  2.0e-4    0.9527
      fp16 or fp32 scale/zero (emu)           0.9530  0.0504  ~0        0.9527
      bf16 activations in (emu)               0.9481  0.0521  1.3e-4    0.9530
      bf16 outputs (emu)                      0.9554  0.0510  2.6e-4    0.9511
      all three (emu)                         0.9469  0.0535  6.1e-4    0.9502
    int4, dtype bf16, before / now            0.9264 / 0.9493 (jit 0.9306 / 0.9496)
      now, eager decode path                  0.9445  0.0551            0.9490

So the head was the defect: per-row int8 weights re-quantised from Q8_0 blocks and bf16
logits. The requantised nibbles equal the file's (`weights`: 0 of 106M differ), so
copying them would change nothing; scales/zeros in bf16 move a weight by up to 4.6% of
its block scale (fp16: 0.3%) but torch's int4 kernel takes bf16 only with bf16
activations: fp32 or fp16 ones (which it accepts, with fp32 / fp16 scales) run 27-56x
slower per matmul on this CPU. Refining the head costs ~0.4 ms a token (topk over the
vocabulary 0.16 ms), within the noise of compiled decode tokens/s here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CACHE = Path(os.environ.get("INT4_PARITY_CACHE", "/tmp/septet-int4-parity.pt"))


def _smol_path() -> Path:
    from septet import assets

    return Path(assets.asset_file("smollm2", progress=False, quiet=True))


def _texts(lm) -> dict[str, str]:
    import test_llamacpp_parity as t

    from septet.chat_template import render_chat

    return {"english": t.ENGLISH, "polish": t.POLISH, "german": t.GERMAN, "python": t.PYTHON,
            "chat": render_chat(lm.chat_template, t.CHAT, add_generation_prompt=False, name="smollm2"),
            "numbers": t.NUMBERS}


# ----------------------------------------------------------------------------- collect

def collect(args) -> None:
    import numpy as np
    import test_llamacpp_parity as t

    import septet

    t.llama_cpp = __import__("llama_cpp")
    path = _smol_path()
    lm = septet.load(str(path), dtype=torch.float32)
    texts = _texts(lm)
    llm = t._llama(str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=args.threads,
                   n_threads_batch=args.threads, logits_all=True)
    hf = None
    if args.hf:
        from hf_reference import hf_model_from_gguf

        hf = hf_model_from_gguf(path)
    out = {}
    for name, text in texts.items():
        ids = lm.encode(text)
        llm.reset()
        llm.eval(ids)
        lp = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64)).log_softmax(-1)
        top_lp, top = lp.topk(8, dim=-1)
        rec = {"ids": ids, "top": top, "top_lp": top_lp.float()}
        if hf is not None:
            with torch.inference_mode():
                ref = hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)
            rec["hf_argmax"] = ref.argmax(-1)
            rec["hf_top_lp"] = ref.gather(-1, top[:, :1])[:, 0].float()
        out[name] = rec
        print(f"{name:8s} {len(ids)} positions", flush=True)
    torch.save(out, CACHE)
    print(f"saved {CACHE}")
    if hf is not None:
        print(_line("transformers (fp32)", *_score_hf(out)))


def _score_hf(ref) -> tuple[float, float, int]:
    agree = n = 0
    diffs = []
    for rec in ref.values():
        agree += (rec["hf_argmax"] == rec["top"][:, 0]).sum().item()
        n += len(rec["ids"])
        diffs.append((rec["hf_top_lp"] - rec["top_lp"][:, 0]).abs())
    return agree / n, torch.cat(diffs).mean().item(), n


def _line(name: str, agree: float, mean: float, n: int, extra: str = "") -> str:
    return f"{name:30s} top-1 {agree:.4f}  |Δ log p| mean {mean:.4f}  ({n} positions){extra}"


# ----------------------------------------------------------------------------- variants

def _round(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None else x.to(dtype).float()


class Emu(nn.Module):
    """y = round_out(round_in(x) · Wᵀ), in fp32, W given (N, K) fp32."""

    def __init__(self, w: torch.Tensor, x_dtype=None, out_dtype=None):
        super().__init__()
        self.w, self.x_dtype, self.out_dtype = w, x_dtype, out_dtype

    def forward(self, x):
        y = torch.nn.functional.linear(_round(x.float(), self.x_dtype), self.w)
        return _round(y, self.out_dtype).to(x.dtype)


def _int4_weight(w: torch.Tensor, sz_dtype=torch.bfloat16, round_w=None, group=32) -> torch.Tensor:
    """The weight septet's Int4Linear multiplies by (fp32): requantised per group of 32 from
    `w` (nibbles as Int4Linear computes them) with scale and zero rounded to `sz_dtype`,
    evaluated as (q − 8)·scale + zero in fp32, then optionally rounded (`round_w`)."""
    N, K = w.shape
    g = w.float().view(N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).clamp_(min=1e-12)
    q = g.sub(lo[..., None]).div(scale[..., None]).round().clamp(0, 15)
    s = _round(scale, sz_dtype)
    z = _round(lo + 8.0 * scale, sz_dtype)
    out = ((q - 8.0) * s[..., None] + z[..., None]).view(N, K)
    return _round(out, round_w)


def _int8_row_weight(w: torch.Tensor) -> torch.Tensor:
    from septet.inference.quant import Int8Linear

    return Int8Linear(w).dequantize().float()


def _float_model(dtype=torch.float32):
    import septet
    from septet.inference import optimize_for_inference

    lm = septet.load(str(_smol_path()), dtype=dtype)
    optimize_for_inference(lm.model)
    return lm


# A variant: body=(weights, x rounding, out rounding), head=(weights, x, out) or a real model.
BF = torch.bfloat16
EMULATED = {
    # name: (body weight, body x, body out, head weight, head x, head out)
    "emu:exact": ("exact", None, None, "exact", None, None),
    "emu:body-int4w": ("int4", None, None, "exact", None, None),
    "emu:body-int4w-fp16sz": ("int4-fp16sz", None, None, "exact", None, None),
    "emu:body-int4w-fp32sz": ("int4-fp32sz", None, None, "exact", None, None),
    "emu:body-bf16x": ("exact", BF, None, "exact", None, None),
    "emu:body-bf16out": ("exact", None, BF, "exact", None, None),
    "emu:body-int4-bf16x-out": ("int4", BF, BF, "exact", None, None),
    "emu:head-int8row": ("exact", None, None, "int8row", None, None),
    "emu:head-bf16w": ("exact", None, None, "bf16", None, None),
    "emu:head-bf16x": ("exact", None, None, "exact", BF, None),
    "emu:head-bf16out": ("exact", None, None, "exact", None, BF),
    "emu:head-int8row-bf16x-out": ("exact", None, None, "int8row", BF, BF),
    "emu:all-as-int4": ("int4", BF, BF, "int8row", BF, BF),
    "emu:all-as-int4-head-fp32out": ("int4", BF, BF, "int8row", BF, None),
    "emu:all-as-int4-head-exact": ("int4", BF, BF, "exact", None, None),
}
REAL = {
    "fp32": "septet.load(dtype=fp32), no quantisation",
    "int4": "septet.load(quant='int4') (dtype fp32), as it comes (head refined)",
    "int4-bf16": "septet.load(quant='int4', dtype=bf16)",
    "int8": "septet.load(quant='int8') (int8 per row is lossy for Q4_1 weights)",
    "int4-nohead": "int4 body, the tied fp32 embedding as head (no quant_head)",
    "int4-bf16head": "int4 body, a dense bf16 head",
    "int4:dtype=D,head=H,refine=K": "dtype fp32|bf16, head int8|int4|bf16, top-K recomputed in fp32 "
                                    "from the tied embedding (0: none, the head before the fix; "
                                    "impl=proto: the tool's own prototype)",
}


def _weights(kind: str, w: torch.Tensor) -> torch.Tensor:
    if kind == "exact":
        return w.float()
    if kind == "int4":
        return _int4_weight(w)
    if kind == "int4-fp16sz":
        return _int4_weight(w, torch.float16)
    if kind == "int4-fp32sz":
        return _int4_weight(w, None)
    if kind == "int8row":
        return _int8_row_weight(w)
    if kind == "bf16":
        return w.to(BF).float()
    raise ValueError(kind)


def _emulated(lm, spec):
    """A copy of the float model's structure whose linears are Emu layers (weights shared
    where exact)."""
    bw, bx, bo, hw, hx, ho = spec
    model = _clone_modules(lm.model)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                setattr(mod, name, Emu(_weights(bw, child.weight.detach()), bx, bo))
    model.quant_head = Emu(_weights(hw, model.tok_emb.weight.detach()), hx, ho)
    return model


def _clone_modules(model: nn.Module) -> nn.Module:
    """A copy of `model` sharing every tensor (modules copied, parameters not)."""
    import copy

    memo = {id(p): p for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _real(name: str):
    import septet

    path = str(_smol_path())
    if name == "fp32":
        return _float_model().model
    if name == "int4":
        return septet.load(path, quant="int4").model
    if name == "int4-bf16":
        return septet.load(path, quant="int4", dtype=torch.bfloat16).model
    if name == "int8":
        return septet.load(path, quant="int8").model
    if name == "int4-nohead":
        m = septet.load(path, quant="int4").model
        del m.quant_head
        return m
    if name == "int4-bf16head":
        m = septet.load(path, quant="int4").model
        w = m.tok_emb.weight.detach().to(BF)
        m.quant_head = _DenseHead(w)
        return m
    if name.startswith("int4:"):  # int4:dtype=bf16,head=int4,refine=16
        from septet.inference.quant import RefinedHead, quantize_linear

        opts = dict(kv.split("=") for kv in name[5:].split(",") if kv)
        dtype = {"fp32": torch.float32, "bf16": BF}[opts.get("dtype", "fp32")]
        m = septet.load(path, quant="int4", dtype=dtype).model
        head = opts.get("head", "int8")
        fast = m.quant_head.fast if isinstance(m.quant_head, RefinedHead) else m.quant_head
        if head == "bf16":
            fast = _DenseHead(m.tok_emb.weight.detach().to(BF))
        elif head != "int8":
            fast = quantize_linear(m.tok_emb.weight.detach(), head)
        k = int(opts.get("refine", 0))
        if not k:
            m.quant_head = fast
        elif head == "bf16" or opts.get("impl") == "proto":  # the prototype of RefinedHead
            m.quant_head = _Refined(fast, m.tok_emb.weight, k)
        else:
            m.quant_head = RefinedHead(fast, m.tok_emb, top=k)
        return m
    raise SystemExit(f"unknown variant {name!r}; see --list")


class _Refined(nn.Module):
    """The fast head's logits, with its top-k recomputed in fp32 from the exact rows (the
    prototype of septet.quant.RefinedHead, for heads that are not septet's own layers)."""

    def __init__(self, fast, weight, k):
        super().__init__()
        self.fast, self.weight, self.k = fast, weight, k

    def forward(self, x):
        y = self.fast(x).float()
        idx = y.topk(self.k, dim=-1).indices  # (..., k)
        rows = torch.nn.functional.embedding(idx, self.weight).float()  # (..., k, C)
        exact = torch.matmul(rows, x.float()[..., None])[..., 0]
        return y.scatter_(-1, idx, exact)


class _DenseHead(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        return torch.nn.functional.linear(x.to(self.w.dtype), self.w).to(x.dtype)


def build_variant(name: str, cache: dict):
    if name in EMULATED:
        if "float" not in cache:
            cache["float"] = _float_model()
        return _emulated(cache["float"], EMULATED[name])
    return _real(name)


# ----------------------------------------------------------------------------- score

@torch.inference_mode()
def _logprobs(model, ids: list[int], decode: bool) -> torch.Tensor:
    x = torch.tensor([ids])
    if not decode:
        return model(x)[0].double().log_softmax(-1)
    cache = model.new_cache(1, len(ids))
    rows = [model(x[:, t:t + 1], cache=cache)[0, -1] for t in range(len(ids))]
    return torch.stack(rows).double().log_softmax(-1)


def score_model(model, ref, decode: bool = False, fp32: dict | None = None) -> tuple[float, float, int, str]:
    """Top-1 agreement and mean |Δ log p(top)| against llama.cpp; with `fp32` (name -> fp32
    septet log-probs) also the mean KL(fp32 septet || variant), which sees the whole
    distribution that sampling draws from, not only the top token."""
    agree = n = 0
    diffs, kls = [], []
    for name, rec in ref.items():
        lp = _logprobs(model, rec["ids"], decode)
        top = rec["top"][:, :1]
        agree += (lp.argmax(-1) == top[:, 0]).sum().item()
        n += top.shape[0]
        diffs.append((lp.gather(-1, top)[:, 0].float() - rec["top_lp"][:, 0]).abs())
        if fp32 is not None:
            p = fp32[name].double()
            kls.append((p.exp() * (p - lp)).sum(-1))
    extra = f"  KL(fp32||it) {torch.cat(kls).mean().item():.2e}" if kls else ""
    return agree / n, torch.cat(diffs).mean().item(), n, extra


def _jittered(model, ref, n: int, eps: float = 1e-3, decode: bool = False) -> list[float]:
    """Top-1 agreement with the embedding output scaled by (1 + eps·N(0, 1)), n seeds.

    A few dozen of the positions are near-ties in llama.cpp's own logits, so one run's
    agreement is one draw: the exact fp32 model scores 0.9530 alone, 0.9526 on average
    under this jitter, while the int4 models that also score 0.9530 alone average ~0.949.
    The mean over seeds tells real differences of a few positions from luck."""
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        h = model.tok_emb.register_forward_hook(
            lambda mod, inp, y, g=g: y * (1 + eps * torch.randn(y.shape, generator=g)).to(y.dtype))
        try:
            out.append(score_model(model, ref, decode=decode)[0])
        finally:
            h.remove()
    return out


def score(args) -> None:
    if args.list:
        for k, v in REAL.items():
            print(f"{k:34s} {v}")
        for k, v in EMULATED.items():
            print(f"{k:34s} body w/x/out {v[0]}/{v[1]}/{v[2]}, head w/x/out {v[3]}/{v[4]}/{v[5]}")
        return
    ref = torch.load(CACHE)
    if "hf_argmax" in next(iter(ref.values())):
        print(_line("transformers (fp32)", *_score_hf(ref)))
    cache: dict = {}
    fp32 = None
    if args.kl:
        m = _float_model().model
        fp32 = {name: _logprobs(m, rec["ids"], False).float() for name, rec in ref.items()}
        del m
    for name in args.variants or ["fp32", "int4"]:
        t0 = time.perf_counter()
        model = build_variant(name, cache)
        a, d, n, extra = score_model(model, ref, fp32=fp32)
        if args.jitter:
            a_j = _jittered(model, ref, args.jitter)
            extra += f"  jittered top-1 mean {sum(a_j) / len(a_j):.4f} ({min(a_j):.4f}..{max(a_j):.4f})"
        print(_line(name, a, d, n, extra + f"  [{time.perf_counter() - t0:.0f} s]"), flush=True)
        if args.decode:
            a, d, n, extra = score_model(model, ref, decode=True, fp32=fp32)
            if args.jitter:
                a_j = _jittered(model, ref, args.jitter, decode=True)
                extra += f"  jittered top-1 mean {sum(a_j) / len(a_j):.4f} ({min(a_j):.4f}..{max(a_j):.4f})"
            print(_line(name + " (decode)", a, d, n, extra), flush=True)
        del model


# ----------------------------------------------------------------------------- speed

def _clock() -> float:
    """CPU seconds of this process: with one thread, robust to other jobs sharing the
    cores (wall time is not, on a busy machine); INT4_PARITY_WALL=1 for wall time."""
    return time.perf_counter() if os.environ.get("INT4_PARITY_WALL") else time.process_time()


@torch.inference_mode()
def decode_tps(model, n: int = 64, prompt: int = 16, step=None, slots: int = 0) -> float:
    """Greedy decode of n tokens after a short prompt: tokens/s. `step`: a
    `generate.decode_step` (compiled) with `slots` cache slots."""
    cache = model.new_cache(1, slots or prompt + n + 1)
    x = torch.arange(100, 100 + prompt)[None]
    logits = model(x, cache=cache)[:, -1]
    tok = logits.argmax(-1, keepdim=True)
    t0 = _clock()
    for i in range(n):
        if step is None:
            logits = model(tok, cache=cache, last_only=True)[:, -1]
        else:
            logits = step(tok, torch.tensor([[prompt + i]]), None, cache)
        tok = logits.argmax(-1, keepdim=True)
    return n / (_clock() - t0)


@torch.inference_mode()
def head_ms(model, reps: int = 50) -> float:
    """Median ms of the output head alone on one row."""
    x = torch.randn(1, 1, model.config.d_model, dtype=next(model.parameters()).dtype)
    ts = []
    for _ in range(reps):
        t0 = _clock()
        model.head_logits(x)
        ts.append(_clock() - t0)
    return sorted(ts)[reps // 2] * 1e3


def speed(args) -> None:
    from septet.inference import decode_step

    cache: dict = {}
    models = {name: build_variant(name, cache) for name in args.variants or ["int4"]}
    slots = 256
    steps = {name: decode_step(m, True, slots) if args.compile else None for name, m in models.items()}
    if args.compile:  # compile outside the timed rounds
        for name, m in models.items():
            decode_tps(m, 2, step=steps[name], slots=slots)
    runs: dict[str, list[float]] = {k: [] for k in models}
    heads: dict[str, list[float]] = {k: [] for k in models}
    for _r in range(args.rounds):
        for name, model in models.items():  # interleaved: drift in machine load hits all alike
            runs[name].append(decode_tps(model, args.tokens, step=steps[name], slots=slots))
            heads[name].append(head_ms(model))
    mode = "compiled" if args.compile else "eager"
    for name, v in runs.items():
        v, h = sorted(v), sorted(heads[name])
        print(f"{name:34s} {mode} decode {v[len(v) // 2]:6.1f} tok/s (median of {len(v)}; min {v[0]:.1f}, "
              f"max {v[-1]:.1f}); head alone {h[len(h) // 2]:.2f} ms")


# ----------------------------------------------------------------------------- weights

def weights(args) -> None:
    """Per tensor: max |septet int4 weight − GGUF weight| (the kernel's view: nibbles, bf16
    scale and zero), relative to the block scale; and how many nibbles differ."""
    from septet.checkpoints.gguf import read_gguf, read_tensor

    info = read_gguf(_smol_path())
    worst = {}
    for name, t in info.tensors.items():
        if t.type_name != "Q4_1":
            continue
        w = read_tensor(info, name)
        raw = _q4_1_fields(info, t)
        for label, sz in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)):
            e = (_int4_weight(w, sz) - w).abs()
            rel = (e.view(-1, 32) / raw["d"].clamp(min=1e-12)).amax().item()
            a = worst.setdefault(label, [0.0, 0.0, ""])
            if e.max().item() > a[0]:
                a[0], a[2] = e.max().item(), name
            a[1] = max(a[1], rel)
        g = w.view(-1, 32)
        lo, hi = g.amin(-1), g.amax(-1)
        q = g.sub(lo[:, None]).div((hi - lo)[:, None] / 15).round().clamp(0, 15)
        bad = (q != raw["q"]).sum().item()
        worst.setdefault("nibbles", [0, 0, ""])[0] += bad
        worst["nibbles"][1] += q.numel()
    for label in ("bf16", "fp16", "fp32"):
        m, rel, where = worst[label]
        print(f"scale/zero in {label}: max |Δw| {m:.3g} ({where}), max |Δw| / block scale {rel:.3g}")
    bad, total, _ = worst["nibbles"]
    print(f"requantised nibbles that differ from the file's: {bad} of {total}")


def _q4_1_fields(info, t) -> dict[str, torch.Tensor]:
    import numpy as np

    with open(info.path, "rb") as f:
        raw = np.frombuffer(os.pread(f.fileno(), t.nbytes, t.offset), dtype=np.uint8).reshape(-1, 20)
    d = torch.from_numpy(raw[:, 0:2].copy().view("<f2").astype(np.float32))
    qs = torch.from_numpy(raw[:, 4:].astype(np.int64))
    q = torch.cat([qs & 15, qs >> 4], dim=1).float()
    return {"d": d, "q": q}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--hf", action="store_true", help="also transformers' fp32 numbers")
    c.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("score")
    s.add_argument("variants", nargs="*")
    s.add_argument("--decode", action="store_true")
    s.add_argument("--list", action="store_true")
    s.add_argument("--kl", action="store_true", help="also the KL divergence from fp32 septet")
    s.add_argument("--jitter", type=int, default=0, metavar="N",
                   help="also the mean top-1 over N runs with a 1e-3 jitter of the embedding")
    b = sub.add_parser("speed")
    b.add_argument("variants", nargs="*")
    b.add_argument("--rounds", type=int, default=5)
    b.add_argument("--tokens", type=int, default=64)
    b.add_argument("--compile", action="store_true", help="the compiled decode step (generate --compile)")
    sub.add_parser("weights")
    args = p.parse_args()
    {"collect": collect, "score": score, "speed": speed, "weights": weights}[args.cmd](args)


if __name__ == "__main__":
    main()
