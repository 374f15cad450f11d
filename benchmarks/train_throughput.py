#!/usr/bin/env python
"""Training throughput of septet's tiny presets against a plain nanoGPT-style reference.

    python benchmarks/train_throughput.py [--json] [--steps N]
        [--models llama,gpt3,palm] [--modes fp32-eager,bf16-compile]

For each preset (llama-tiny, gpt3-tiny, palm-tiny) and mode, one training step is
forward + loss + backward + AdamW step on a batch of B×T tokens (default 8×256). The
reference below is written from scratch in the nanoGPT style (one module, fused QKV
projection, F.scaled_dot_product_attention, loss on the logits) with the same shapes,
block structure, loss, optimizer and parameter groups as septet's model. Before timing,
septet's weights are copied into the reference and both must give the same loss, the
same loss after one AdamW step, and (bf16) the same loss within bf16 rounding —
otherwise the run stops: a throughput ratio between different computations means nothing.

Modes: fp32-eager, and bf16-compile = bf16 autocast with every transformer block compiled
(torch.compile, block by block for both implementations, as `septet train --compile`
does); embedding, head and loss run eagerly in fp32 in both.

Timing: warmup steps are excluded (they include torch.compile's compilation, which is
reported separately as the wall time of the first step). Timed steps of septet and the
reference alternate (A B A B ...) so background load on a shared machine hits both alike,
and tokens/s comes from the median step time.

MFU = tokens/s × model FLOPs per token ÷ the dense-matmul peak measured in this run
(septet.train.flops.measure_matmul_peak, fp32 for fp32 mode, bf16 for bf16 mode). Model
FLOPs per token = 6N + 12·L·H·Q·T (PaLM, Appendix B), N = parameters that take part in a
matmul: all parameters minus learned position tables and an untied input embedding.
Both implementations have the same N, so their MFU ratio equals their throughput ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from septet.models import (
    build,  # noqa: E402
    get_preset,
)
from septet.models.base import DecoderLM  # noqa: E402
from septet.nn.positions import LearnedPositions  # noqa: E402
from septet.train.flops import matmul_params, measure_matmul_peak, mfu, model_flops_per_token  # noqa: E402
from septet.train.optim import build_optimizer  # noqa: E402

PRESETS = {"llama": "llama-tiny", "gpt3": "gpt3-tiny", "palm": "palm-tiny"}
MODES = ("fp32-eager", "bf16-compile")
LR, WEIGHT_DECAY, BETAS, EPS = 1e-3, 0.1, (0.9, 0.95), 1e-8


# ================================================================ the reference model

@dataclass
class RefConfig:
    vocab: int
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_head: int
    d_ff: int
    context: int
    norm: str  # "rms" | "ln" | "ln_nobias"
    eps: float
    positions: str  # "learned" | "rope"
    mlp: str  # "gelu" | "swiglu"
    parallel: bool  # PaLM: x + attn(ln(x)) + mlp(ln(x))
    bias: bool  # biases in the linear layers
    tied: bool
    head_scale: float  # logits multiplier (PaLM: d^-1/2)
    window: int | None  # band of the odd layers (GPT-3); None: all dense
    rope_theta: float = 10000.0
    z_loss: float = 0.0


def ref_config(c) -> RefConfig:
    fam = c.family
    return RefConfig(
        vocab=c.vocab_size, n_layer=c.n_layer, d_model=c.d_model, n_head=c.n_head,
        n_kv_head=c.n_kv_head, d_head=c.d_head, d_ff=c.d_ff, context=c.context,
        norm={"llama": "rms", "gpt3": "ln", "palm": "ln_nobias"}[fam], eps=c.norm_eps,
        positions="learned" if fam == "gpt3" else "rope",
        mlp="gelu" if fam == "gpt3" else "swiglu",
        parallel=fam == "palm", bias=fam == "gpt3",
        tied=fam != "llama" or c.tie_embeddings,
        head_scale=c.d_model ** -0.5 if fam == "palm" else 1.0,
        window=getattr(c, "window", None), rope_theta=getattr(c, "rope_theta", 10000.0),
        z_loss=c.z_loss)


class Norm(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.norm == "ln" else None

    def forward(self, x):
        if self.kind == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.h, self.hkv, self.dh = cfg.n_head, cfg.n_kv_head, cfg.d_head
        self.c_attn = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.d_head, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.d_head, cfg.d_model, bias=cfg.bias)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([self.h * self.dh, self.hkv * self.dh, self.hkv * self.dh], dim=-1)
        q = q.view(B, T, self.h, self.dh).transpose(1, 2)
        k = k.view(B, T, self.hkv, self.dh).transpose(1, 2)
        v = v.view(B, T, self.hkv, self.dh).transpose(1, 2)
        if cos is not None:  # rotary in fp32, as septet does it
            q = (q.float() * cos + rotate_half(q.float()) * sin).type_as(v)
            k = (k.float() * cos + rotate_half(k.float()) * sin).type_as(v)
        gqa = self.h != self.hkv
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, self.h * self.dh))


class MLP(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "gelu":
            self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        else:
            self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.kind == "gelu":
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return self.c_proj(F.silu(self.w_gate(x)) * self.w_up(x))


class RefBlock(nn.Module):
    def __init__(self, cfg: RefConfig, banded: bool):
        super().__init__()
        self.parallel, self.banded = cfg.parallel, banded
        self.ln_1 = Norm(cfg)
        self.attn = SelfAttention(cfg)
        self.ln_2 = None if cfg.parallel else Norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, band):
        mask = band if self.banded else None
        if self.parallel:
            h = self.ln_1(x)
            return x + self.attn(h, cos, sin, mask) + self.mlp(h)
        x = x + self.attn(self.ln_1(x), cos, sin, mask)
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    """A decoder LM in the nanoGPT style; the family differences are the config flags."""

    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model) if cfg.positions == "learned" else None
        self.h = nn.ModuleList(RefBlock(cfg, cfg.window is not None and i % 2 == 1) for i in range(cfg.n_layer))
        self.ln_f = Norm(cfg)
        self.lm_head = None if cfg.tied else nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        T = cfg.context
        if cfg.positions == "rope":
            inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.d_head, 2, dtype=torch.float64) / cfg.d_head)
            ang = torch.arange(T).float()[:, None] * inv.float()
            ang = torch.cat((ang, ang), dim=-1)  # (T, D), "half" layout
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)
        else:
            self.cos = self.sin = None
        if cfg.window is not None:  # key j visible from query i iff i - window < j <= i
            i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
            self.register_buffer("band", (j <= i) & (j > i - cfg.window), persistent=False)
        else:
            self.band = None

    def forward(self, idx):
        B, T = idx.shape
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        cos = sin = None
        if self.cos is not None:
            cos, sin = self.cos[:T], self.sin[:T]
        band = None if self.band is None else self.band[:T, :T]
        for block in self.h:
            x = block(x, cos, sin, band)
        x = self.ln_f(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        return (x @ self.wte.weight.t()) * self.cfg.head_scale if self.cfg.head_scale != 1.0 \
            else x @ self.wte.weight.t()

    def loss(self, logits, targets):
        logits = logits.float().view(-1, logits.shape[-1])
        loss = F.cross_entropy(logits, targets.view(-1))
        if self.cfg.z_loss:
            loss = loss + self.cfg.z_loss * torch.logsumexp(logits, dim=-1).square().mean()
        return loss

    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW as septet's build_optimizer makes it (fused, the same parameter groups:
        matrices decay, embedding tables, norm gains and biases do not), so the ratio
        compares the models, not two optimizer implementations."""
        tables = {id(self.wte.weight)} | ({id(self.wpe.weight)} if self.wpe is not None else set())
        decay = [p for p in self.parameters() if p.dim() >= 2 and id(p) not in tables]
        other = [p for p in self.parameters() if p.dim() < 2 or id(p) in tables]
        return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                  {"params": other, "weight_decay": 0.0}],
                                 lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)


@torch.no_grad()
def copy_weights(src: DecoderLM, dst: RefGPT) -> None:
    """septet → reference, by structure (the reference fuses Q, K, V into one matrix)."""
    family = src.config.family
    dst.wte.weight.copy_(src.tok_emb.weight)
    if dst.wpe is not None:
        dst.wpe.weight.copy_(src.pos_emb.weight)
    for sb, rb in zip(src.blocks, dst.h):
        a = sb.attn
        rb.attn.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        rb.attn.c_proj.weight.copy_(a.o_proj.weight)
        if a.q_proj.bias is not None:
            rb.attn.c_attn.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            rb.attn.c_proj.bias.copy_(a.o_proj.bias)
        if family == "gpt3":
            norms = [(sb.ln_1, rb.ln_1), (sb.ln_2, rb.ln_2)]
            rb.mlp.c_fc.weight.copy_(sb.mlp.fc.weight)
            rb.mlp.c_fc.bias.copy_(sb.mlp.fc.bias)
            rb.mlp.c_proj.weight.copy_(sb.mlp.proj.weight)
            rb.mlp.c_proj.bias.copy_(sb.mlp.proj.bias)
        else:
            norms = [(sb.attn_norm, rb.ln_1), (sb.mlp_norm, rb.ln_2)] if family == "llama" else [(sb.ln, rb.ln_1)]
            rb.mlp.w_gate.weight.copy_(sb.mlp.gate_proj.weight)
            rb.mlp.w_up.weight.copy_(sb.mlp.up_proj.weight)
            rb.mlp.c_proj.weight.copy_(sb.mlp.down_proj.weight)
        for s, r in norms:
            r.weight.copy_(s.weight)
            if r.bias is not None:
                r.bias.copy_(s.bias)
    dst.ln_f.weight.copy_(src.norm_f.weight)
    if dst.ln_f.bias is not None:
        dst.ln_f.bias.copy_(src.norm_f.bias)
    if dst.lm_head is not None:
        dst.lm_head.weight.copy_(src.lm_head.weight)
    n_src = sum(p.numel() for p in src.parameters())
    n_dst = sum(p.numel() for p in dst.parameters())
    if n_src != n_dst:
        raise AssertionError(f"{family}: septet has {n_src} parameters, the reference {n_dst}")


# ================================================================ one training step

class Runner:
    """Holds a model, its optimizer and a (possibly compiled) forward+loss function."""

    def __init__(self, model: nn.Module, optimizer, loss_fn, bf16: bool, compile_: bool):
        self.model, self.opt, self.bf16 = model, optimizer, bf16
        device_type = next(model.parameters()).device.type
        self.loss_fn = loss_fn

        def forward_loss(x, y):
            if self.bf16:
                with torch.autocast(device_type, dtype=torch.bfloat16):
                    logits = model(x)
            else:
                logits = model(x)
            return loss_fn(logits, y)  # the loss in fp32, outside autocast (as septet train)

        self.forward_loss = forward_loss
        if compile_:  # block by block, as `septet train --compile` does; identical blocks share a graph
            for block in (model.blocks if isinstance(model, DecoderLM) else model.h):
                block.compile()

    def step(self, x, y) -> float:
        loss = self.forward_loss(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def eval_loss(self, x, y) -> float:
        return float(self.forward_loss(x, y))


def make_pair(cfg, bf16: bool, compile_: bool, device: torch.device,
              seed: int = 0) -> tuple[Runner, Runner, DecoderLM]:
    torch.manual_seed(seed)
    model = build(cfg)
    model.train()
    ref = RefGPT(ref_config(cfg))
    copy_weights(model, ref)
    model.to(device)
    ref.to(device).train()
    s = Runner(model, build_optimizer(model, "adamw", LR, WEIGHT_DECAY, betas=BETAS, eps=EPS),
               lambda logits, y: model.loss(logits, y).total, bf16, compile_)
    r = Runner(ref, ref.optimizer(), ref.loss, bf16, compile_)
    return s, r, model


def verify(name: str, cfg, batch: tuple[torch.Tensor, torch.Tensor], batch2, device: torch.device) -> dict:
    """Same weights ⇒ same loss (fp32: to ~1e-5, GPU kernels' reduction order 1e-4; bf16
    autocast: to bf16 rounding), and the same loss after one AdamW step (gradients and
    parameter groups agree)."""
    s, r, _ = make_pair(cfg, bf16=False, compile_=False, device=device)
    l0s, l0r = s.step(*batch), r.step(*batch)
    l1s, l1r = s.eval_loss(*batch2), r.eval_loss(*batch2)
    sb, rb, _ = make_pair(cfg, bf16=True, compile_=False, device=device)
    lbs, lbr = sb.eval_loss(*batch), rb.eval_loss(*batch)
    out = {"fp32_loss": [l0s, l0r], "fp32_loss_after_step": [l1s, l1r], "bf16_loss": [lbs, lbr]}
    tol = 1e-5 if device.type == "cpu" else 1e-4
    ok = (math.isclose(l0s, l0r, rel_tol=tol) and math.isclose(l1s, l1r, rel_tol=10 * tol)
          and math.isclose(lbs, lbr, rel_tol=2e-2))
    out["ok"] = ok
    if not ok:
        raise SystemExit(f"{name}: septet and the reference disagree, refusing to benchmark: {out}")
    return out


def make_batches(vocab: int, batch: int, seq: int, device: torch.device, n: int = 4, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        data = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append((data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)))
    return out


def flops_per_token(model: DecoderLM, seq: int) -> tuple[int, int]:
    c = model.config
    tied = getattr(model, "lm_head", None) is None
    n = matmul_params(model, tied_head=tied)
    n -= sum(m.weight.numel() for m in model.modules() if isinstance(m, LearnedPositions))
    return model_flops_per_token(n, c.n_layer, c.n_head, c.d_head, seq), n


def bench(name: str, cfg, mode: str, batches, steps: int, warmup: int, device: torch.device) -> dict:
    bf16, compile_ = mode.startswith("bf16"), mode.endswith("compile")
    s, r, model = make_pair(cfg, bf16, compile_, device)
    first = {}
    for label, runner in (("septet", s), ("reference", r)):
        t0 = time.perf_counter()
        runner.step(*batches[0])  # compiles forward and backward when compile_
        first[label] = time.perf_counter() - t0
        for i in range(1, warmup):
            runner.step(*batches[i % len(batches)])
    times = {"septet": [], "reference": []}
    for i in range(steps):  # alternate so background load hits both alike
        order = (("septet", s), ("reference", r)) if i % 2 == 0 else (("reference", r), ("septet", s))
        for label, runner in order:
            x, y = batches[i % len(batches)]
            t0 = time.perf_counter()
            runner.step(x, y)
            times[label].append(time.perf_counter() - t0)
    tokens = batches[0][0].numel()
    out = {"model": name, "mode": mode}
    for label in ("septet", "reference"):
        med = statistics.median(times[label])
        out[label] = {"tokens_per_s": tokens / med, "step_s_median": med,
                      "step_s_min": min(times[label]), "step_s_max": max(times[label]),
                      "first_step_s": first[label]}
    out["ratio"] = out["septet"]["tokens_per_s"] / out["reference"]["tokens_per_s"]
    return out


def sized(name: str, size: str, seq: int):
    """The preset's config, or (size "small") its family at GPT-3 Small's shape (12 layers,
    d 768, 12 heads; Brown et al. Table 2.1) with a 32k vocabulary: big enough that a GPU
    step is not dominated by kernel launches. The family's K/V sharing ratio and its own
    d_ff rule are kept."""
    c = get_preset(name).config
    if size == "tiny":
        return c
    kv = 1 if c.n_kv_head == 1 else 12 * c.n_kv_head // c.n_head
    return c.replace(n_layer=12, d_model=768, n_head=12, n_kv_head=kv, vocab_size=32768,
                     context=max(seq, 1024))


def machine_info(device: torch.device) -> dict:
    model_name = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    info = {"cpu": model_name, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "loadavg": os.getloadavg(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per implementation (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (incl. compilation)")
    ap.add_argument("--models", default="llama,gpt3,palm")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny",
                    help="tiny: the -tiny presets; small: each family at GPT-3 Small's shape")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible to torch")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in models:
        if m not in PRESETS:
            ap.error(f"--models: unknown {m!r}; choose from {','.join(PRESETS)}")
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown {m!r}; choose from {','.join(MODES)}")
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else \
        (lambda *a: print(*a, flush=True))
    t_start = time.perf_counter()
    info = machine_info(device)
    log(f"# {info.get('gpu', info['cpu'])}, {info['cores']} cores, torch {info['torch']}, "
        f"{info['threads']} threads, load {info['loadavg'][0]:.2f}")
    peaks = {}
    if "fp32-eager" in modes:
        peaks["fp32"] = max(measure_matmul_peak(torch.float32, device, seconds=0.5) for _ in range(3))
    if "bf16-compile" in modes:
        peaks["bf16"] = max(measure_matmul_peak(torch.bfloat16, device, seconds=0.5) for _ in range(3))
    log("# matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))

    results, checks = [], {}
    for m in models:
        name = PRESETS[m] if args.size == "tiny" else f"{m}-small"
        cfg = sized(PRESETS[m], args.size, args.seq)
        batches = make_batches(cfg.vocab_size, args.batch, args.seq, device)
        checks[name] = verify(name, cfg, batches[0], batches[1], device)
        log(f"# {name}: same weights, same loss: septet {checks[name]['fp32_loss'][0]:.6f} "
            f"reference {checks[name]['fp32_loss'][1]:.6f} (after one step "
            f"{checks[name]['fp32_loss_after_step'][0]:.6f} / {checks[name]['fp32_loss_after_step'][1]:.6f})")
        fpt, n_matmul = flops_per_token(build(cfg, device="meta"), args.seq)
        for mode in modes:
            res = bench(name, cfg, mode, batches, args.steps, args.warmup + (1 if "compile" in mode else 0),
                        device)
            peak = peaks["bf16" if mode.startswith("bf16") else "fp32"]
            res["flops_per_token"], res["n_matmul_params"], res["peak_flops"] = fpt, n_matmul, peak
            for label in ("septet", "reference"):
                res[label]["mfu"] = mfu(res[label]["tokens_per_s"], fpt, peak)
            results.append(res)
            log(f"{name:10s} {mode:13s} septet {res['septet']['tokens_per_s']:8.0f} tok/s "
                f"(MFU {100 * res['septet']['mfu']:5.1f}%)  reference {res['reference']['tokens_per_s']:8.0f} tok/s "
                f"(MFU {100 * res['reference']['mfu']:5.1f}%)  ratio {res['ratio']:.3f}"
                + (f"  compile {res['septet']['first_step_s']:.1f}s / {res['reference']['first_step_s']:.1f}s"
                   if "compile" in mode else ""))
    total = time.perf_counter() - t_start
    out = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
           "machine": info, "size": args.size, "batch": args.batch, "seq_len": args.seq, "steps": args.steps,
           "warmup": args.warmup, "peaks": peaks, "verification": checks, "results": results,
           "loadavg_end": os.getloadavg(), "total_s": total}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print()
        print("| model | mode | septet tok/s | reference tok/s | ratio | septet MFU | reference MFU "
              "| compile s (septet / ref) |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for res in results:
            comp = (f"{res['septet']['first_step_s']:.1f} / {res['reference']['first_step_s']:.1f}"
                    if "compile" in res["mode"] else "–")
            print(f"| {res['model']} | {res['mode']} | {res['septet']['tokens_per_s']:.0f} | "
                  f"{res['reference']['tokens_per_s']:.0f} | {res['ratio']:.3f} | "
                  f"{100 * res['septet']['mfu']:.1f}% | {100 * res['reference']['mfu']:.1f}% | {comp} |")
        print("\npeaks: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
              + f"; batch {args.batch}x{args.seq}; median of {args.steps} steps; total {total:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
