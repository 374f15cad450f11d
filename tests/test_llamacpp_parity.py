"""Parity with llama.cpp (llama-cpp-python) on the real SmolLM2-135M-Instruct Q4_1 GGUF.

Three checks on the same ~700 teacher-forced positions (English, Polish and German prose,
Python code, chat turns rendered with the model's own chat template, numbers):

(a) septet's token ids equal llama.cpp's `Llama.tokenize(text, special=True)` exactly, both
    raw (no BOS) and with each side's own BOS convention (`LoadedModel.encode` vs
    `add_bos=True`, which llama.cpp honours only when the GGUF says `add_bos_token`);
(b) top-1 agreement of septet's next-token argmax with llama.cpp's is no lower than
    transformers' own agreement with llama.cpp on the same positions, minus MARGIN;
(c) the mean |septet log-prob - llama.cpp log-prob| of llama.cpp's top token is <= 0.1.

Why (b) compares against transformers instead of asserting ~100%: septet and transformers
dequantize Q4_1 to fp32 and multiply in fp32, while llama.cpp multiplies the 4-bit blocks
against activations it quantizes to 8 bits (Q8_1) on the fly. Positions whose top-2 logits
are within that error flip, so ~95% is what an exact fp32 implementation gets; transformers
is the independent fp32 implementation that calibrates it. See MARGIN below for the slack.

(d) the quantised settings, against llama.cpp on the original Q4_1 file, each as the
    full-sequence forward (the prefill path) and as the compiled one-token decode step
    `generate` uses, fed the same tokens:
    - `quant="int4"` (what `--quant auto` picks for this file, chat's default): septet's
      Q4_1 / Q8_0 kernels with fp32 activations, the fp32 function of the file's weights;
    - `quant="int4-a8"`: the same kernels quantising the activations to 8 bits per block as
      llama.cpp does;
    both: top-1 agreement no lower than transformers' (the issue's criterion, no margin) and
    mean |Δ log-prob| <= MAX_MEAN_ABS_LOGPROB; and int4 with bf16 activations (bf16 prefill
    through dequantised bf16 weights), whose bf16 rounding costs a few near-ties: agreement
    no lower than transformers' minus MARGIN.

`pytest -s -m slow tests/test_llamacpp_parity.py` prints the numbers. Runs in ~1 minute on
an idle 2-core CPU (most of it loading transformers' GGUF reader).

llama.cpp is built with `use_extra_bufts=False`: its AMX "extra buffer" kernels execute
AMX tile instructions whenever the CPU advertises AMX, and under some hypervisors (this
project's Sapphire Rapids VMs) the guest is not allowed to use them, so the first decode
dies with SIGILL. The plain CPU kernels are llama.cpp's reference path and Q4_1 has no
x86 repacked layout anyway, so the numbers are the same ones llama.cpp computes elsewhere.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

try:
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the machine
    llama_cpp = None


@pytest.fixture(scope="module", autouse=True)
def _needs_llama_cpp():
    """CI's slow tier installs llama-cpp-python (.ci/run), so there a missing module is a
    failure; elsewhere these tests skip. Checked here, not at import, so that collecting the
    default tier never needs llama.cpp."""
    if llama_cpp is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("llama-cpp-python is not installed but CI's slow tier needs it: "
                    ".ci/run installs `llama-cpp-python==0.3.36` before `pytest -m slow`")
    pytest.skip("llama-cpp-python is not installed (outside CI); "
                "`pip install llama-cpp-python==0.3.36 torch==2.13.0` to run the llama.cpp parity tests "
                "(builds llama.cpp from source: ~15 min on 2 cores)")


from septet.chat_template import render_chat  # noqa: E402

# (b) slack: septet and transformers run the same fp32 math on the same dequantized weights
# (test_gguf: |Δlogit| <= 1e-3), so they can only disagree with llama.cpp differently at
# positions whose top-2 gap is below ~1e-3, which are a handful in 700. One percentage point
# (~7 positions here) covers that; a real defect (a wrong layer, RoPE, norm or tokenization)
# costs tens of points. The test also prints how often septet and transformers disagree.
MARGIN = 0.01
FLOOR = 0.90  # the issue expects ~95%; below 90% something is wrong whatever transformers says
MAX_MEAN_ABS_LOGPROB = 0.1
MIN_POSITIONS = 500
# (d) int4 (tools/int4_parity.py has the ablations): re-quantising Q4_1 at group 32 gives
# back the file's nibbles exactly. The int8 head cost 3.5 points of top-1 (its weights
# re-quantised per row from Q8_0 blocks, its logits rounded to bf16) until it recomputed its
# top logits in fp32 (quant.RefinedHead). With torch's int4 kernel (bf16 activations, scales
# and outputs) the best was 0.948-0.949. septet's kernels measured, on the 2-core dev box
# (2026-11-30, torch 2.13, llama-cpp-python 0.3.36; transformers 0.9530 / 0.0504):
#   int4 (fp32 activations): prefill and compiled decode both 0.9530 / 0.0504 (transformers'
#     own figures: the same fp32 function up to summation order);
#   int4-a8 (activations quantised like llama.cpp's Q8_1): prefill 0.9554 / 0.0498, compiled
#     decode 0.9602 / 0.0483;
#   int4 with bf16 activations: 0.9445 / 0.0548 (prefill), 0.9517 / 0.0512 (decode).
# An unrefined head (0.918), a wrong nibble order, scale or zero fall far outside.
STRICT_SETTINGS = ("int4 (prefill)", "int4+compile (decode)", "int4 fused (decode)",
                   "int4-a8 (prefill)", "int4-a8+compile (decode)", "int4-a8 fused (decode)")

ENGLISH = (
    "The lighthouse keeper had not spoken to another person in eleven weeks. Every morning he "
    "climbed the hundred and twelve steps to the lamp room, polished the great lens until it "
    "shone, and wrote the weather in a leather notebook: wind from the north-west, visibility "
    "poor, a fishing boat passing close to the rocks at dawn. In the evenings he read old "
    "letters by candlelight and listened to the sea, which never said the same thing twice."
)
POLISH = (
    "Wczoraj wieczorem pojechaliśmy nad jezioro, żeby obejrzeć zachód słońca. Woda była "
    "spokojna, a nad trzcinami krążyły jaskółki. Babcia opowiadała, jak w młodości pływała "
    "łódką na drugi brzeg po świeże ryby i chleb z piekarni, która stoi tam do dziś. "
    "Zanim wróciliśmy do domu, zrobiło się zupełnie ciemno i na niebie pojawiły się gwiazdy."
)
GERMAN = (
    "Der Zug nach München hatte wieder einmal Verspätung, also setzte sich Anna in das kleine "
    "Café am Bahnhof und bestellte einen Kaffee mit warmer Milch. Draußen regnete es seit dem "
    "frühen Morgen. Sie öffnete ihr Notizbuch und begann, die Ideen für ihren nächsten Vortrag "
    "über erneuerbare Energien und die Zukunft der Städte aufzuschreiben."
)
PYTHON = '''import json
from pathlib import Path


def load_scores(path: Path) -> dict[str, float]:
    """Read a JSON file of {name: score} and drop entries below zero."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: float(s) for name, s in data.items() if float(s) >= 0}


class Counter:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, word: str) -> None:
        self.counts[word] = self.counts.get(word, 0) + 1
'''
CHAT = [
    {"role": "system", "content": "You are a concise assistant that answers in one or two sentences."},
    {"role": "user", "content": "Why is the sky blue during the day?"},
    {"role": "assistant", "content": "Air molecules scatter short blue wavelengths of sunlight much more "
                                     "than red ones, so blue light reaches your eyes from every direction."},
    {"role": "user", "content": "And why is it red at sunset?"},
    {"role": "assistant", "content": "At sunset light crosses far more air, so most blue is scattered "
                                     "away before it arrives and the remaining reds and oranges dominate."},
]
NUMBERS = (
    "Invoice 2024-0317: 3 items at 19.99 each, 12 items at 4.50, and 1 item at 249.00. "
    "Subtotal 363.97, tax 23% = 83.71, total 447.68. Due date: 2024-04-15. "
    "Sequence: 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144. Pi is about 3.14159265, e is 2.71828."
)
# extra strings for (a) only: whitespace, emoji, CJK, accents, special tokens mid-text
TOKENIZER_ONLY = [
    "Emoji 😀👍🏽 and CJK 漢字かな, accents: naïve café",
    "  leading spaces,\ttabs\r\nCRLF and trailing   ",
    "<|im_start|>user\nHi!<|im_end|>\n<|endoftext|>after",
    "Zażółć gęślą jaźń. Pchnąć w tę łódź jeża lub ośm skrzyń fig!",
    "x**2 + 1_000_000 == 0x1F; ||| ~~~ \n\n\n",
]


def _llama(path: str, **kw):
    """A llama_cpp.Llama with the plain CPU kernels (see the module docstring)."""
    orig = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = orig()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=path, verbose=False, **kw)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = orig


def _hf_model(path):
    from hf_reference import hf_model_from_gguf

    return hf_model_from_gguf(path)


@pytest.fixture(scope="module")
def smol_path(septet_home):
    from septet import assets

    return assets.asset_file("smollm2", progress=False, quiet=True)


@pytest.fixture(scope="module")
def lm(smol_path):
    import septet

    return septet.load(str(smol_path), dtype=torch.float32)


@pytest.fixture(scope="module")
def texts(lm) -> dict[str, str]:
    return {"english": ENGLISH, "polish": POLISH, "german": GERMAN, "python": PYTHON,
            "chat": render_chat(lm.chat_template, CHAT, add_generation_prompt=False, name="smollm2"),
            "numbers": NUMBERS}


@pytest.fixture(scope="module")
def llm(smol_path):
    return _llama(str(smol_path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2,
                  n_threads_batch=2, logits_all=True)


@pytest.fixture(scope="module")
def logits(lm, llm, smol_path, texts):
    """name -> (ids, septet log-probs, llama.cpp log-probs, transformers log-probs), fp64 (T, V)."""
    hf = _hf_model(smol_path)
    out = {}
    for name, text in texts.items():
        ids = lm.encode(text)
        assert len(ids) < llm.n_ctx()
        llm.reset()
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))
        x = torch.tensor([ids])
        with torch.inference_mode():
            ours = lm.model(x)[0].double()
            ref = hf(x).logits[0].double()
        out[name] = (ids, ours.log_softmax(-1), theirs.log_softmax(-1), ref.log_softmax(-1))
    n = sum(len(v[0]) for v in out.values())
    assert n >= MIN_POSITIONS, f"only {n} positions; lengthen the texts"
    return out


def test_tokenizer_ids_match_llamacpp(lm, llm, texts):
    meta = llm.metadata.get("tokenizer.ggml.add_bos_token")
    if meta is not None:  # both read the same GGUF flag
        assert lm.add_bos == (str(meta).lower() == "true"), meta
    n = 0
    for text in [*texts.values(), *TOKENIZER_ONLY]:
        b = text.encode("utf-8")
        raw = llm.tokenize(b, add_bos=False, special=True)
        assert lm.tokenizer.encode(text) == raw, text[:60]
        # each side's own BOS convention: LoadedModel.encode vs llama.cpp's add_special
        assert lm.encode(text) == llm.tokenize(b, add_bos=True, special=True), text[:60]
        n += len(raw)
    print(f"\n(a) tokenizer: {len(texts) + len(TOKENIZER_ONLY)} texts, {n} ids, all equal to llama.cpp's "
          f"(add_bos={lm.add_bos})")


def test_top1_agreement_with_llamacpp(logits):
    agree_s = agree_hf = agree_s_hf = n = 0
    rows = []
    for name, (ids, ours, theirs, ref) in logits.items():
        top = theirs.argmax(-1)
        a_s = (ours.argmax(-1) == top).sum().item()
        a_hf = (ref.argmax(-1) == top).sum().item()
        agree_s_hf += (ours.argmax(-1) == ref.argmax(-1)).sum().item()
        agree_s, agree_hf, n = agree_s + a_s, agree_hf + a_hf, n + len(ids)
        rows.append(f"    {name:8s} {len(ids):4d} positions  septet {a_s / len(ids):.3f}  "
                    f"transformers {a_hf / len(ids):.3f}")
    s, h = agree_s / n, agree_hf / n
    print("\n(b) top-1 agreement with llama.cpp over", n, "teacher-forced positions:\n" + "\n".join(rows))
    print(f"    total    septet {s:.4f}  transformers {h:.4f}  (margin {MARGIN}); "
          f"septet vs transformers {agree_s_hf / n:.4f}")
    assert s >= h - MARGIN, (s, h)
    assert s >= FLOOR, s


def test_top_token_logprob_matches_llamacpp(logits):
    diffs, diffs_hf = [], []
    for _ids, ours, theirs, ref in logits.values():
        top = theirs.argmax(-1, keepdim=True)
        diffs.append((ours.gather(-1, top) - theirs.gather(-1, top)).abs().flatten())
        diffs_hf.append((ref.gather(-1, top) - theirs.gather(-1, top)).abs().flatten())
    d, dh = torch.cat(diffs), torch.cat(diffs_hf)
    print(f"\n(c) |log p(llama.cpp top token)| septet - llama.cpp: mean {d.mean():.4f}, "
          f"p95 {d.quantile(0.95):.4f}, max {d.max():.4f} over {d.numel()} positions "
          f"(transformers: mean {dh.mean():.4f})")
    assert d.mean().item() <= MAX_MEAN_ABS_LOGPROB


@pytest.fixture(scope="module")
def int4_logits(smol_path, logits):
    """setting -> {name: (llama.cpp log-probs, septet log-probs)} for the int4 settings."""
    import septet
    from septet.inference import decode_step
    from septet.inference.steps.fused import FusedDecoder

    slots = max(len(ids) for ids, *_ in logits.values())
    out: dict[str, dict] = {}
    for quant, dtype in (("int4", torch.bfloat16), ("int4", torch.float32), ("int4-a8", torch.float32)):
        tag = quant + ("+bf16" if dtype == torch.bfloat16 else "")
        model = septet.load(str(smol_path), quant=quant, dtype=dtype).model
        steps = {"+compile": decode_step(model, True, slots)}
        if dtype == torch.float32:  # septet.fused_decode's one-call step (the uncompiled default)
            steps[" fused"] = decode_step(model, False, slots)
            assert isinstance(getattr(steps[" fused"], "__self__", None), FusedDecoder)
        with torch.inference_mode():
            for name, (ids, _, theirs, _) in logits.items():
                x = torch.tensor([ids])
                prefill = model(x)[0].double().log_softmax(-1)
                out.setdefault(f"{tag} (prefill)", {})[name] = (theirs, prefill)
                # the decode steps (the compiled one is one graph for every text): position 0,
                # then a token a step
                for kind, step in steps.items():
                    cache = model.new_cache(1, slots)
                    rows = [model(x[:, :1], cache=cache)[0, -1]]
                    for t in range(1, len(ids)):
                        rows.append(step(x[:, t:t + 1], torch.tensor([[t]]), None, cache)[0])
                    decode = torch.stack(rows).double().log_softmax(-1)
                    out.setdefault(f"{tag}{kind} (decode)", {})[name] = (theirs, decode)
        del model
    return out


def test_int4_parity_with_llamacpp(int4_logits, logits):
    agree_hf = n_hf = 0
    for ids, _, theirs, ref in logits.values():
        agree_hf += (ref.argmax(-1) == theirs.argmax(-1)).sum().item()
        n_hf += len(ids)
    h = agree_hf / n_hf
    lines = []
    for setting, per_text in int4_logits.items():
        agree = n = 0
        diffs = []
        for theirs, ours in per_text.values():
            top = theirs.argmax(-1, keepdim=True)
            agree += (ours.argmax(-1) == top[:, 0]).sum().item()
            n += top.shape[0]
            diffs.append((ours.gather(-1, top) - theirs.gather(-1, top)).abs().flatten())
        d = torch.cat(diffs)
        lines.append((setting, agree / n, d.mean().item(), d.quantile(0.95).item(), n))
    print("\n(d) " + "\n    ".join(f"{s:28s} top-1 agreement with llama.cpp {a:.4f}, |Δ log p| mean {m:.4f} "
                                    f"p95 {p:.4f} over {n} positions" for s, a, m, p, n in lines)
          + f"\n    {'transformers (fp32)':28s} top-1 agreement with llama.cpp {h:.4f} (margin {MARGIN})")
    for setting, agree, mean, _, _ in lines:
        assert agree >= (h if setting in STRICT_SETTINGS else h - MARGIN), (setting, agree, h)
        assert agree >= FLOOR, (setting, agree)
        assert mean <= MAX_MEAN_ABS_LOGPROB, (setting, mean)


def _llamacpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("gguf_dtype", ["f32", "f16", "q8_0"])
def test_llamacpp_runs_a_septet_exported_gguf(tmp_path, smol_path, gguf_dtype):
    """`septet export --to gguf` writes a file llama.cpp loads and decodes greedily to the
    same tokens as septet does from that same file, and tokenizes text the same way."""
    import septet
    from septet.checkpoints.convert import export
    from septet.inference import Sampling, generate_ids

    out = export(smol_path, "gguf", tmp_path / f"smollm2-{gguf_dtype}.gguf", dtype=gguf_dtype)
    mine = septet.load(str(out), dtype=torch.float32)
    n = 24
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        ids = mine.encode(prompt)
        ours = list(generate_ids(mine.model, ids, Sampling(max_new_tokens=n, temperature=0)))
        llm = _llama(str(out), n_ctx=256, n_threads=2, logits_all=False)
        # the export keeps the source's pre-tokenizer, so llama.cpp splits text the same way
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == mine.tokenizer.encode(prompt)
        theirs = _llamacpp_greedy(llm, ids, n)
        del llm
        # q8_0: llama.cpp also quantizes activations to 8 bits, so a late near-tie may flip
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), n)
        need = n if gguf_dtype != "q8_0" else 12
        print(f"{gguf_dtype} {prompt!r}: identical greedy prefix {agree}/{n}")
        assert agree >= need, (gguf_dtype, prompt, ours, theirs)
