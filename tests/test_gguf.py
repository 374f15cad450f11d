"""GGUF reading/loading: synthetic files (layouts, quantisations, malformed input), then the real
SmolLM2-135M-Instruct (config, tokenizer vs transformers, chat template, greedy text, logits
parity with transformers' own GGUF loader)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from septet.chat_template import CHATML_TEMPLATE, ChatTemplateError, render_chat  # noqa: E402
from septet.checkpoints.gguf import _permute_qk, _unpermute_qk, load_gguf, read_gguf  # noqa: E402
from septet.checkpoints.gguf_tokenizer import tokenizer_from_gguf  # noqa: E402
from septet.errors import CheckpointError, SeptetError  # noqa: E402
from septet.models.llama import LLaMA, LLaMAConfig  # noqa: E402
from septet.tokenizer import Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
TEXT = ("It was the best of times, it was the worst of times; it was the age of wisdom, "
        "it was the age of foolishness. Numbers 12345 and code: def f(x): return x * 2\n") * 20


# ------------------------------------------------------------------------------ synthetic


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    return Tokenizer.train_bpe([TEXT], vocab_size=300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))


def _tiny_model(vocab: int, tied: bool) -> LLaMA:
    torch.manual_seed(0)
    cfg = LLaMAConfig(vocab_size=vocab, n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128,
                      context=64, rope_theta=5000.0, norm_eps=1e-5, tie_embeddings=tied)
    m = LLaMA(cfg).eval()
    with torch.no_grad():
        for _name, p in m.named_parameters():  # larger than init so layout mistakes show in logits
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.2) + (1.0 if p.dim() == 1 else 0.0))
    return m


def _write_gguf(path: Path, model: LLaMA, tok: Tokenizer, qtype=Q.F32, *, arch: str = "llama",
                chat_template: str | None = CHATML_TEMPLATE, tok_model: str = "gpt2") -> Path:
    import json

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layer)
    w.add_context_length(c.context)
    w.add_embedding_length(c.d_model)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.d_head)
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre("gpt-2")
    spec = json.loads(tok.to_json_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == c.vocab_size
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    names = {"tok_emb.weight": "token_embd.weight", "norm_f.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"attn.q_proj.weight": "attn_q.weight", "attn.k_proj.weight": "attn_k.weight",
             "attn.v_proj.weight": "attn_v.weight", "attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight", "attn_norm.weight": "attn_norm.weight",
             "mlp_norm.weight": "ffn_norm.weight"}
    for key, t in model.state_dict().items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            name = f"blk.{i}.{layer[rest]}"
        else:
            name = names[key]
        t = t.float()
        if name.endswith("attn_q.weight"):
            t = _permute_qk(t, c.n_head)
        elif name.endswith("attn_k.weight"):
            t = _permute_qk(t, c.n_kv_head)
        arr = t.numpy().astype(np.float32)
        if arr.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _logits(model: LLaMA, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_qk_permutation_roundtrip():
    w = torch.randn(6 * 8, 5)
    assert torch.equal(_unpermute_qk(_permute_qk(w, 6), 6), w)
    # within a head, GGUF row 2i+j holds HF row j*D/2+i
    w = torch.arange(8.0)[:, None]
    assert _permute_qk(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def _roundtrip(model: LLaMA, qtype) -> LLaMA:
    """The model with every matrix passed through `qtype` and back: what a loader must reproduce."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() < 2 or qtype == Q.F32:
                continue
            if qtype == Q.F16:
                p.copy_(p.half().float())
            else:
                a = p.numpy().astype(np.float32)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)))
    return out


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0])
@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_llama_logits(tmp_path, tiny_tok, qtype, tied):
    atol = 1e-4
    model = _tiny_model(tiny_tok.vocab_size, tied)
    path = _write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", model, tiny_tok, qtype)
    loaded = load_gguf(path)
    assert loaded.config == model.config
    assert loaded.config.tie_embeddings is tied and ("lm_head.weight" in loaded.state_dict) is (not tied)
    m2 = LLaMA(loaded.config).eval()
    m2.load_state_dict(loaded.state_dict, strict=True)
    ids = tiny_tok.encode("it was the age of wisdom")
    exact, got = _logits(model, ids), _logits(m2, ids)
    ref = _logits(_roundtrip(model, qtype), ids)
    assert ref.abs().max() > 1.0  # the test has teeth
    torch.testing.assert_close(got, ref, atol=atol * ref.abs().max().item(), rtol=0)
    # and the quantised model is still close to the original (loose: quantisation error)
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < {Q.F32: 1e-5, Q.F16: 1e-2, Q.Q8_0: 0.15, Q.Q4_0: 0.8}[qtype], rel
    # the tokenizer rebuilt from metadata matches the one it was written from
    for s in ("it was the age of foolishness", "  two  spaces\nand 12345 digits", "<|im_start|>user\nhi<|im_end|>"):
        assert loaded.tokenizer.encode(s) == tiny_tok.encode(s)
        assert loaded.tokenizer.decode(loaded.tokenizer.encode(s)) == s
    assert loaded.bos_id == tiny_tok.token_to_id("<|im_start|>")
    assert tiny_tok.token_to_id("<|endoftext|>") in loaded.eos_ids
    assert tiny_tok.token_to_id("<|im_end|>") in loaded.eos_ids
    assert loaded.chat_template == CHATML_TEMPLATE and loaded.add_bos is False
    # bf16 target dtype
    if qtype == Q.F32 and tied:
        half = load_gguf(path, dtype=torch.bfloat16)
        assert all(t.dtype == torch.bfloat16 for t in half.state_dict.values())


def test_read_gguf_infos(tmp_path, tiny_tok):
    model = _tiny_model(tiny_tok.vocab_size, True)
    path = _write_gguf(tmp_path / "t.gguf", model, tiny_tok, Q.Q8_0)
    info = read_gguf(path)
    assert info.version == 3 and info.metadata["general.architecture"] == "llama"
    assert info.metadata["llama.block_count"] == 2
    assert isinstance(info.metadata["tokenizer.ggml.tokens"], list)
    t = info.tensors["blk.0.ffn_up.weight"]
    assert t.shape == (128, 64) and t.type_name == "Q8_0" and t.nbytes == 128 * 64 // 32 * 34
    assert info.tensors["output_norm.weight"].type_name == "F32"


def test_wrong_architecture_and_tokenizer(tmp_path, tiny_tok):
    model = _tiny_model(tiny_tok.vocab_size, True)
    p = _write_gguf(tmp_path / "qwen.gguf", model, tiny_tok, arch="qwen2")
    with pytest.raises(CheckpointError, match="general.architecture.*qwen2"):
        load_gguf(p)
    p = _write_gguf(tmp_path / "spm.gguf", model, tiny_tok, tok_model="llama")
    with pytest.raises(CheckpointError, match="tokenizer type 'llama'.*not supported yet"):
        load_gguf(p)
    with pytest.raises(CheckpointError, match="pre-tokenizer 'nope'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"],
                             "tokenizer.ggml.pre": "nope"})


# ------------------------------------------------------------------------------ malformed


def _fails_fast(path: Path, match: str | None = None) -> str:
    """read_gguf+load_gguf raise CheckpointError naming the file, within a few seconds."""
    result: dict = {}

    def run():
        try:
            load_gguf(path)
            result["ok"] = True
        except BaseException as e:  # noqa: BLE001  (we inspect it below)
            result["exc"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout=20)
    assert not th.is_alive(), f"load_gguf hung on {path.name}"
    exc = result.get("exc")
    assert isinstance(exc, CheckpointError), f"{path.name}: expected CheckpointError, got {exc!r}"
    msg = str(exc)
    assert path.name in msg and "\n" not in msg
    if match:
        assert match in msg, msg
    return msg


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory, tiny_tok) -> bytes:
    p = _write_gguf(tmp_path_factory.mktemp("good") / "good.gguf", _tiny_model(tiny_tok.vocab_size, True),
                    tiny_tok, Q.Q8_0)
    return p.read_bytes()


def test_malformed_files(tmp_path, good_bytes):
    import struct

    def write(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    _fails_fast(write("empty.gguf", b""), "too short")
    rng = np.random.default_rng(0)
    _fails_fast(write("random.gguf", rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()), "not a GGUF")
    _fails_fast(write("magic.gguf", b"GGML" + good_bytes[4:]), "not a GGUF")
    _fails_fast(write("version.gguf", good_bytes[:4] + struct.pack("<I", 99) + good_bytes[8:]), "version 99")
    info = read_gguf(write("ok.gguf", good_bytes))
    data_start = info.data_offset
    for cut in (10, 30, 200, data_start // 2, data_start - 1, data_start + 100, len(good_bytes) - 1):
        _fails_fast(write(f"cut{cut}.gguf", good_bytes[:cut]), "truncated" if cut >= 24 else None)
    huge = 2**62
    _fails_fast(write("ntensors.gguf", good_bytes[:8] + struct.pack("<Q", huge) + good_bytes[16:]), "tensors")
    _fails_fast(write("nkv.gguf", good_bytes[:16] + struct.pack("<Q", huge) + good_bytes[24:]), "metadata entries")
    _fails_fast(write("keylen.gguf", good_bytes[:24] + struct.pack("<Q", huge) + good_bytes[32:]), "metadata key #0")
    # a token-list array claiming 2^40 strings
    key = b"tokenizer.ggml.tokens"
    at = good_bytes.index(key) + len(key) + 4 + 4  # skip value type (9) and element type (8)
    _fails_fast(write("arrlen.gguf", good_bytes[:at] + struct.pack("<Q", 2**40) + good_bytes[at + 8:]))
    # a tensor offset pointing past the end of the file
    name = b"output_norm.weight"
    at = good_bytes.index(name) + len(name)
    n_dims = struct.unpack_from("<I", good_bytes, at)[0]
    off_at = at + 4 + 8 * n_dims + 4
    _fails_fast(write("offset.gguf", good_bytes[:off_at] + struct.pack("<Q", 1 << 40) + good_bytes[off_at + 8:]),
                "truncated")
    # unknown tensor type
    _fails_fast(write("dtype.gguf", good_bytes[:off_at - 4] + struct.pack("<I", 250) + good_bytes[off_at:]),
                "unknown ggml type 250")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


# ------------------------------------------------------------------------------ chat template


def test_render_chat_chatml_and_errors():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ünïcode"}]
    out = render_chat(CHATML_TEMPLATE, msgs)
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                   "<|im_start|>user\nHi ünïcode<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(None, msgs, add_generation_prompt=False).endswith("<|im_end|>\n")
    assert render_chat("{{ messages | tojson }}", msgs[:1]) == '[{"role": "system", "content": "Be brief."}]'
    with pytest.raises(ChatTemplateError, match="line 2"):
        render_chat("ok\n{% for %}", msgs, name="bad.jinja")
    with pytest.raises(ChatTemplateError, match="no system"):
        render_chat("{{ raise_exception('no system') }}", msgs)
    with pytest.raises(SeptetError):  # sandbox: no access to Python internals
        render_chat("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", msgs)
    assert render_chat("{{ strftime_now('%Y') }}", msgs).isdigit()


# ------------------------------------------------------------------------------ real SmolLM2


@pytest.fixture(scope="module")
def smol_path(septet_home) -> Path:
    from septet import assets

    return assets.asset_file("smollm2", progress=False, quiet=True)


@pytest.fixture(scope="module")
def smol(smol_path):
    loaded = load_gguf(smol_path)
    model = LLaMA(loaded.config).eval()
    model.load_state_dict(loaded.state_dict, strict=True)
    return loaded, model


STRINGS = [
    "The capital of France is",
    "Zażółć gęślą jaźń. Pchnąć w tę łódź jeża lub ośm skrzyń fig!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # recursion\n",
    "Emoji 😀👍🏽 and CJK 漢字かな, accents: naïve café",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "  leading spaces,\ttabs\r\nCRLF and trailing   ",
    "Numbers: 3.14159, 2024-01-31, 1,000,000 and x**2",
]


def test_smollm2_config_and_tokenizer(smol):
    loaded, _ = smol
    c = loaded.config
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.context == 8192
    assert loaded.state_dict["tok_emb.weight"].shape == (49152, 576)
    tok = loaded.tokenizer
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    assert loaded.bos_id == 1 and 2 in loaded.eos_ids and loaded.add_bos is False
    for s in STRINGS:
        assert tok.decode(tok.encode(s)) == s
    # SmolLM2 splits numbers into single digits ('smollm' pre-tokenizer)
    digits = tok.encode("12345")
    assert [tok.decode([i]) for i in digits] == list("12345")
    assert tok.encode("<|im_start|>user") == [1, tok.encode("user")[0]]


def test_smollm2_chat_template(smol):
    loaded, _ = smol
    msgs = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello!"}]
    out = render_chat(loaded.chat_template, msgs, name=loaded.source)
    assert out == ("<|im_start|>system\nYou are a pirate.<|im_end|>\n"
                   "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    # without a system message the template inserts SmolLM's default one
    out = render_chat(loaded.chat_template, msgs[1:], name=loaded.source)
    assert out.startswith("<|im_start|>system\n") and "<|im_start|>user\nHello!<|im_end|>\n" in out


def test_smollm2_greedy_paris(smol):
    loaded, model = smol
    ids = loaded.tokenizer.encode("The capital of France is")
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(4):
            x = torch.cat([x, model(x)[:, -1:].argmax(-1)], dim=1)
    text = loaded.tokenizer.decode(x[0, len(ids):].tolist())
    assert text.startswith(" Paris"), text


# transformers' own GGUF path: an independent reader, dequantizer and Q/K un-permutation


@pytest.fixture(scope="module")
def hf_tokenizer(smol_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


@pytest.fixture(scope="module")
def hf_model(smol_path):
    from hf_reference import hf_model_from_gguf

    return hf_model_from_gguf(smol_path)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smol, hf_tokenizer):
    tok = smol[0].tokenizer
    for s in STRINGS:
        assert tok.encode(s) == hf_tokenizer.encode(s, add_special_tokens=False), s


PROMPTS = [
    "Once upon a time, in a small village at the edge of a great forest, there lived a clever fox "
    "who loved to read books about the stars, the ocean and the mountains far away.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite a Python "
    "function that returns the n-th Fibonacci number, with a docstring.<|im_end|>\n<|im_start|>assistant\n",
    "Dzień dobry! Jak się masz? Dzisiaj jest piękna pogoda, więc pójdziemy na spacer do parku 🌳.",
]


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smol, hf_model):
    loaded, model = smol
    worst = 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([loaded.tokenizer.encode(prompt)])
        assert 30 <= ids.shape[1] <= 80
        with torch.no_grad():
            ours, theirs = model(ids), hf_model(ids).logits
        worst = max(worst, (ours - theirs).abs().max().item())
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    print(f"max |Δlogit| septet vs transformers: {worst:.2e}")
