"""The `septet` command. Every verb takes --json; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, SeptetError
from .options import LazyParser


def _fmt_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def cmd_models(args: argparse.Namespace) -> Any:
    from .models import describe, presets

    rows = []
    for name, p in sorted(presets().items(), key=lambda kv: (kv[1].config.family, kv[0])):
        c = p.config
        sizes = describe(c)
        rows.append({"name": name, "family": c.family, **sizes, "layers": c.n_layer,
                     "d_model": c.d_model, "heads": c.n_head, "kv_heads": c.n_kv_head,
                     "d_head": c.d_head, "d_ff": c.d_ff, "context": c.context,
                     "vocab_size": c.vocab_size, "note": p.note, "source": p.source})
    rows.sort(key=lambda r: (r["family"], r["params"]))
    if args.json:
        return rows
    head = f"{'preset':18} {'family':7} {'params':>9} {'non-emb':>9} {'layers':>6} {'d_model':>7} " \
           f"{'heads':>5} {'kv':>4} {'context':>7}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        note = r["note"]
        if "active_params" in r:
            note = f"{_fmt_count(r['active_params'])} active/token; {note}"
        print(f"{r['name']:18} {r['family']:7} {_fmt_count(r['params']):>9} "
              f"{_fmt_count(r['non_embedding_params']):>9} {r['layers']:>6} {r['d_model']:>7} "
              f"{r['heads']:>5} {r['kv_heads']:>4} {r['context']:>7}  {note}")
    return None


def train_config(args: argparse.Namespace):
    """The TrainConfig that `septet train` flags describe: one flag per field (septet.options),
    --out defaulting to runs/MODEL and --json turning the progress bar off."""
    from . import options
    from .api import DTYPES
    from .train.loop import TrainConfig

    short = {dtype: name for name, dtype in reversed(DTYPES.items())}  # bfloat16 -> bf16
    return options.build(TrainConfig, args, out=Path(args.out or f"runs/{args.model}"),
                         dtype=short[DTYPES[args.dtype]], progress=args.progress and not args.json)


def cmd_train(args: argparse.Namespace) -> Any:
    from .models import get_preset
    from .train.loop import train

    tc = train_config(args)
    get_preset(tc.model).config.replace(**tc.overrides)  # bad name or field: fail before data work
    summary = train(tc)
    if not args.json:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"done: {summary['steps']} steps, validation loss {summary['val_loss']:.4f} "
                  f"(unigram entropy {summary['unigram_entropy']:.4f}); checkpoint {summary['checkpoint']}")
        return None
    return summary


# `septet generate`'s sampling where neither a flag nor the model's own defaults give one
GENERATE_FALLBACK = {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


def cmd_generate(args: argparse.Namespace) -> Any:
    from .api import load

    lm = load(args.model, quant=_quant(args), dtype=args.dtype)
    if lm.tokenizer is None:
        raise ConfigError(f"--model {args.model}: a preset has random weights and no tokenizer; "
                          "pass a checkpoint directory from `septet train` or a model like smollm2")
    from .generation_config import sampling_for

    kw = sampling_for(lm, GENERATE_FALLBACK, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    kw.update(max_new_tokens=args.max_new_tokens, seed=args.seed, compile=args.compile, stop=args.stop)
    if args.json:
        text = lm.generate(args.prompt, **kw)
        return {"model": lm.name, "prompt": args.prompt, "text": text,
                "prompt_ids": lm.encode(args.prompt), "ids": lm.tokenizer.encode(text) if text else []}
    from .inference import check_prompt

    check_prompt(lm.model, max(1, len(lm.encode(args.prompt))))  # fail before echoing the prompt
    sys.stdout.write(args.prompt)
    for piece in lm.stream(args.prompt, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return None


def cmd_chat(args: argparse.Namespace) -> Any:
    from .api import load
    from .chat import ChatSession, run_repl

    lm = load(args.model, quant=_quant(args), dtype=args.dtype)
    session = ChatSession(lm, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          repetition_guard=args.repetition_guard)
    if args.compile:
        session.sampling["compile"] = True
    if args.json:  # one turn per stdin line, one JSON answer per line
        for line in sys.stdin:
            if line.strip():
                print(json.dumps({"user": line.strip(), "assistant": "".join(session.reply(line.strip()))}))
        return None
    run_repl(session)
    return None


def cmd_serve(args: argparse.Namespace) -> Any:
    from .api import load
    from .serve import SeptetServer

    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {args.max_batch}")
    lm = load(args.model, quant=_quant(args), dtype=args.dtype)
    if lm.tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer, so it cannot serve text; load a checkpoint that has one")
    try:
        server = SeptetServer(lm, args.host, args.port, model_name=args.name, verbose=not args.quiet,
                              compile=args.compile, max_batch=args.max_batch)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}; "
                          "pick another --port") from None
    print(f"septet serve: {server.model_name} at {server.url} (chat page at /, OpenAI API at /v1)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return None


def cmd_export(args: argparse.Namespace) -> Any:
    from .api import model_path
    from .checkpoints.convert import export

    out = export(model_path(args.model), args.to, args.out, dtype=args.dtype)
    if args.json:
        return {"model": args.model, "to": args.to, "out": str(out)}
    print(f"wrote {args.to} model to {out}")
    return None


def cmd_fetch(args: argparse.Namespace) -> Any:
    from . import assets

    if args.name is None:
        rows = [{"name": a.name, "aliases": list(a.aliases), "package": a.requirement,
                 "sources": [s.label for s in assets.sources(a)],
                 "fetched": assets.is_fetched(a), "description": a.description}
                for a in assets.list_assets()]
        if args.json:
            return rows
        for r in rows:
            mark = "fetched" if r["fetched"] else "-"
            print(f"{r['name']:24} {r['package']:32} {mark:8} {r['description']}")
        return None
    path = assets.fetch(args.name, progress=not args.json, quiet=args.json, local_dir=args.bigbench_dir,
                        allow_unverified=args.allow_unverified)
    if args.json:
        return {"name": args.name, "path": str(path)}
    print(path)
    return None


def cmd_env(args: argparse.Namespace) -> Any:
    from . import env

    rows = [{"name": name, "value": value, "doc": " ".join(env.VARIABLES[name].split())}
            for name, value in env.values().items()]
    if args.json:
        return rows
    for r in rows:
        value = "(unset)" if r["value"] is None else repr(r["value"])
        print(f"{r['name']} {value}\n    {r['doc']}")
    return None


def _quant(args: argparse.Namespace) -> str | None:
    return None if args.quant == "none" else args.quant


def _inference_flags(p: LazyParser) -> None:
    p.defer(_registry_inference_flags)  # their choices come from modules that import torch
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (a 15-50 s first call; faster tokens for models "
                        "without the fused step: LLaMA on --quant int4/int8 is faster without it)")


def _export_targets() -> tuple[str, ...]:
    from .checkpoints.convert import TARGETS

    return TARGETS


def _registry_inference_flags(p: argparse.ArgumentParser) -> None:
    from .api import DTYPES
    from .inference.quant import MODES

    p.add_argument("--quant", choices=("auto", "none", *MODES), default="auto",
                   help="weight-only quantised linear layers on septet's CPU kernels (LLaMA-family "
                        "models then decode through septet's fused one-call step). auto (default): a GGUF "
                        "file's own 4 / 8-bit blocks, kept as they are "
                        "(septet.api.native_quant), other files unquantised; -a8: activations quantised "
                        "to 8 bits per block too, llama.cpp's arithmetic")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weight dtype")


def _train_flags(p: argparse.ArgumentParser) -> None:
    """`septet train`'s flags: one per TrainConfig field, choices from their registries."""
    from . import options
    from .api import DTYPES
    from .models import presets
    from .train.loop import TrainConfig
    from .train.optim import OPTIMIZERS
    from .train.schedules import KINDS

    options.add_flags(p, TrainConfig, choices={"schedule": KINDS, "dtype": DTYPES, "optimizer": OPTIMIZERS}, flags={
        "model": options.Flag(help="preset name: " + ", ".join(sorted(presets()))),
        "data": options.Flag(help="corpus: 'shakespeare' (default), a file, a directory or a .jsonl"),
        "out": options.Flag(default=None, help="run directory (default runs/MODEL)"),
        "overrides": options.Flag(aliases=("--set",), metavar="FIELD=VALUE",
                                  help="override a model config field, e.g. --set n_layer=4 (repeatable)"),
        "compile": options.Flag(help="torch.compile each block"),
        "resume": options.Flag(help="continue from the newest checkpoint in --out"),
        "device": options.Flag(help="cpu or cuda (default: cuda if available)"),
    })


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="septet", description=__doc__)
    sub = ap.add_subparsers(dest="verb", required=True, parser_class=LazyParser)

    def verb(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(fn=fn)
        return p

    verb("models", cmd_models, "list every preset with its parameter count")

    t = verb("train", cmd_train, "pretrain a model from a preset (resumable; torchrun-ready)")
    t.defer(_train_flags)

    verb("env", cmd_env, "the SEPTET_* environment variables: each one's value here and what it does")

    c = verb("chat", cmd_chat, "chat with a model (default: SmolLM2-135M-Instruct)")
    c.add_argument("--model", default="smollm2", help="asset name, checkpoint, HF/Meta dir or .gguf")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=None,
                   help="default: the model's recommended value (SmolLM2: 0.2), else 0.7")
    c.add_argument("--top-p", type=float, default=None,
                   help="default: the model's recommended value (SmolLM2: 0.9), else 0.9")
    c.add_argument("--no-repetition-guard", dest="repetition_guard", action="store_false",
                   help="let an answer that repeats one phrase over and over run to --max-new-tokens")
    c.add_argument("--seed", type=int, default=None)
    _inference_flags(c)

    g = verb("generate", cmd_generate, "sample text from a model")
    g.add_argument("--model", required=True,
                   help="asset name (smollm2), checkpoint or run directory, HF/Meta dir, .gguf")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=None,
                   help="default: the model's recommended value (SmolLM2: 0.2), else 0.8")
    g.add_argument("--top-k", type=int, default=None, help="default: the model's, else 0 (off)")
    g.add_argument("--top-p", type=float, default=None, help="default: the model's, else 1 (off)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None,
                   help="keep tokens with p >= MIN_P x the top p (default: the model's, else 0: off)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="CTRL penalty for seen tokens (default: the model's, else 1: off)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text where it first contains TEXT (repeatable)")
    _inference_flags(g)

    s = verb("serve", cmd_serve, "serve a model over an OpenAI-compatible HTTP API, with a chat page")
    s.add_argument("--model", default="smollm2", help="asset name, checkpoint, HF/Meta dir or .gguf")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", default=None, help="the model id clients see (default: the model's name)")
    s.add_argument("--quiet", action="store_true", help="no request log on stderr")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    _inference_flags(s)

    x = verb("export", cmd_export, "convert a model to an HF directory, a GGUF file or a septet checkpoint")
    x.add_argument("--model", required=True, help="asset name, checkpoint or run dir, HF/Meta dir, .gguf")
    x.defer(lambda p: p.add_argument("--to", required=True, choices=_export_targets()))
    x.add_argument("--out", required=True, help="output directory (hf, septet) or .gguf file")
    x.add_argument("--dtype", default=None, help="hf/septet: f32, f16, bf16; gguf: f32, f16, q8_0")

    f = verb("fetch", cmd_fetch, "download a registry asset into the cache (no NAME: list them)")
    f.add_argument("name", nargs="?", default=None)
    f.add_argument("--bigbench-dir", default=None, metavar="DIR",
                   help="bigbench: a directory holding BIG-bench's benchmark_tasks (or a checkout above it), "
                        "copied when PyPI and GitHub are unreachable (default: $SEPTET_BIGBENCH_DIR)")
    f.add_argument("--allow-unverified", action="store_true",
                   help="accept a source whose sha256 septet does not pin (bigbench: GitHub's archive)")

    from septet.eval.cli import add_verbs as add_eval_verbs
    from septet.vlm.cli import add_verbs as add_vlm_verbs

    add_eval_verbs(verb)
    add_vlm_verbs(verb)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except SeptetError as e:
        print(f"septet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("septet: interrupted", file=sys.stderr)
        return 130
    if args.json and result is not None:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
