"""Checkpoint formats: HF directories, Meta LLaMA releases, GGUF export, load_any/export.

Every parity test builds a tiny random model, writes it in the foreign format, loads it
back through septet and compares logits (fp32)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from septet.checkpoints import Loaded  # noqa: E402
from septet.checkpoints.convert import export, load_any  # noqa: E402
from septet.checkpoints.export_hf import save_hf  # noqa: E402
from septet.checkpoints.hf import load_hf  # noqa: E402
from septet.checkpoints.meta import load_meta  # noqa: E402
from septet.errors import CheckpointError  # noqa: E402
from septet.models import GPT3, GPT3Config, LLaMA, LLaMAConfig, build  # noqa: E402
from septet.tokenizer import Tokenizer  # noqa: E402

V = 256


def _tokens(B: int = 2, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random norms and biases too, so a dropped or misplaced tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _septet(loaded: Loaded) -> torch.nn.Module:
    model = build(loaded.config).eval()
    model.load_state_dict(loaded.state_dict, strict=True)
    return model


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# ============================================================================ HF -> septet

def _hf_llama(tie: bool, seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=160, rms_norm_eps=1e-6, rope_theta=5000.0,
        max_position_embeddings=64, tie_word_embeddings=tie, hidden_act="silu")
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    _randomise(hf, seed)
    if tie:
        hf.tie_weights()
    return hf


def _hf_gpt2(seed: int = 0):
    cfg = transformers.GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=48, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    _randomise(hf, seed)
    hf.tie_weights()
    return hf


def _hf_logits(hf, toks):
    with torch.no_grad():
        return hf(toks).logits


@pytest.mark.parametrize("tie", [False, True])
def test_hf_llama_safetensors_parity(tmp_path, tie):
    hf = _hf_llama(tie)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_hf(tmp_path)
    c = loaded.config
    assert isinstance(c, LLaMAConfig)
    assert (c.n_head, c.n_kv_head, c.d_ff, c.context, c.rope_theta, c.tie_embeddings) == (4, 2, 160, 64, 5000.0, tie)
    toks = _tokens()
    with torch.no_grad():
        _close(_septet(loaded)(toks), _hf_logits(hf, toks))


def test_hf_llama_sharded_and_bin(tmp_path):
    hf = _hf_llama(False, seed=1)
    toks = _tokens(seed=1)
    ref = _hf_logits(hf, toks)
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    loaded = load_hf(tmp_path / "sharded")
    assert len(loaded.metadata["files"]) > 1
    with torch.no_grad():
        _close(_septet(loaded)(toks), ref)
    # legacy pickle weights (transformers 5 always writes safetensors: write the .bin ourselves)
    d = tmp_path / "bin"
    hf.config.save_pretrained(d)
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    loaded = load_hf(d)
    with torch.no_grad():
        _close(_septet(loaded)(toks), ref)


def test_hf_gpt2_parity(tmp_path):
    hf = _hf_gpt2()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_hf(tmp_path)
    assert isinstance(loaded.config, GPT3Config) and loaded.config.window is None
    assert loaded.config.context == 48
    toks = _tokens(T=48, seed=2)
    with torch.no_grad():
        _close(_septet(loaded)(toks), _hf_logits(hf, toks))


def test_hf_tokenizer_metadata(tmp_path):
    hf = _hf_llama(True, seed=3)
    hf.save_pretrained(tmp_path)
    tok = Tokenizer.train_bpe(["hello world " * 20, "the cat sat on the mat"], 300,
                              special_tokens=("<s>", "</s>"))
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    loaded = load_hf(tmp_path)
    assert loaded.tokenizer is not None and loaded.tokenizer.eot_token == "</s>"
    assert loaded.bos_id == 0 and loaded.add_bos is True
    assert loaded.eos_ids == (1, 7)
    assert "messages" in loaded.chat_template


# ============================================================================ Meta release

def _septet_llama(seed: int = 0, **kw) -> LLaMA:
    cfg = dict(vocab_size=V, n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=192, context=64,
               norm_eps=1e-5, rope_theta=10000.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = LLaMA(LLaMAConfig(**cfg)).eval()
    _randomise(m, seed)
    return m


def _to_meta_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Half layout -> interleaved, by explicit row indices: interleaved row 2i+p of a head is
    half row p*D/2+i (the rotation pair (i, i+D/2) becomes (2i, 2i+1))."""
    D = w.shape[0] // n_head
    idx = [h * D + p * (D // 2) + i for h in range(n_head) for i in range(D // 2) for p in range(2)]
    return w[torch.tensor(idx)]


def _write_meta(model: LLaMA, d, n_shards: int) -> None:
    c = model.config
    sd = model.state_dict()
    meta = {"tok_embeddings.weight": sd["tok_emb.weight"], "norm.weight": sd["norm_f.weight"],
            "output.weight": sd["lm_head.weight"], "rope.freqs": torch.zeros(c.d_head // 2)}
    for i in range(c.n_layer):
        o, p = f"blocks.{i}.", f"layers.{i}."
        meta[p + "attention.wq.weight"] = _to_meta_rows(sd[o + "attn.q_proj.weight"], c.n_head)
        meta[p + "attention.wk.weight"] = _to_meta_rows(sd[o + "attn.k_proj.weight"], c.n_kv_head)
        meta[p + "attention.wv.weight"] = sd[o + "attn.v_proj.weight"]
        meta[p + "attention.wo.weight"] = sd[o + "attn.o_proj.weight"]
        meta[p + "feed_forward.w1.weight"] = sd[o + "mlp.gate_proj.weight"]
        meta[p + "feed_forward.w2.weight"] = sd[o + "mlp.down_proj.weight"]
        meta[p + "feed_forward.w3.weight"] = sd[o + "mlp.up_proj.weight"]
        meta[p + "attention_norm.weight"] = sd[o + "attn_norm.weight"]
        meta[p + "ffn_norm.weight"] = sd[o + "mlp_norm.weight"]
    d.mkdir(parents=True, exist_ok=True)
    # d_ff = 192: 2·4·64/3 = 170 -> multiple_of 64 -> 192
    (d / "params.json").write_text(json.dumps({
        "dim": c.d_model, "n_layers": c.n_layer, "n_heads": c.n_head, "n_kv_heads": c.n_kv_head,
        "vocab_size": -1, "multiple_of": 64, "norm_eps": c.norm_eps, "max_seq_len": c.context}))
    dims = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    for r in range(n_shards):
        shard = {}
        for k, v in meta.items():
            dim = dims.get(k.split(".")[-2])
            shard[k] = v.clone() if dim is None else v.chunk(n_shards, dim=dim)[r].clone()
        torch.save(shard, d / f"consolidated.{r:02d}.pth")
    return meta


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_release_parity(tmp_path, n_shards):
    model = _septet_llama(seed=5)
    _write_meta(model, tmp_path, n_shards)
    loaded = load_meta(tmp_path)
    assert loaded.config.d_ff == 192 and loaded.config.vocab_size == V and loaded.config.n_kv_head == 2
    assert loaded.tokenizer is None and "tokenizer" in loaded.metadata["tokenizer_note"]
    toks = _tokens(seed=5)
    with torch.no_grad():
        ref = model(toks)
        _close(_septet(loaded)(toks), ref)


def test_meta_layout_is_interleaved_rope(tmp_path):
    """Independent check of the layout: Meta's raw q/k weights in a septet LLaMA that applies
    interleaved RoPE give the same logits as the half-layout original."""
    model = _septet_llama(seed=6)
    meta = _write_meta(model, tmp_path, 1)
    inter = LLaMA(model.config.replace(rope_style="interleaved")).eval()
    sd = dict(model.state_dict())
    for i in range(2):
        sd[f"blocks.{i}.attn.q_proj.weight"] = meta[f"layers.{i}.attention.wq.weight"]
        sd[f"blocks.{i}.attn.k_proj.weight"] = meta[f"layers.{i}.attention.wk.weight"]
    inter.load_state_dict(sd)
    toks = _tokens(seed=6)
    with torch.no_grad():
        _close(inter(toks), model(toks))


# ============================================================================ septet -> HF

def test_save_hf_llama_roundtrip(tmp_path):
    model = _septet_llama(seed=7, tie_embeddings=True, vocab_size=300)  # tokenizer padded 260 -> 300
    tok = Tokenizer.train_bpe(["abc abd abe " * 30], 260)
    save_hf(model, model.config, tmp_path / "out", tokenizer=tok, chat_template="{{ messages }}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    toks = _tokens(seed=7)
    with torch.no_grad():
        _close(_hf_logits(hf, toks), model(toks))
    back = load_hf(tmp_path / "out")
    assert back.tokenizer == tok and back.chat_template == "{{ messages }}"
    assert back.eos_ids == (tok.eot_id,)
    with torch.no_grad():
        _close(_septet(back)(toks), model(toks))
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert fast.encode("abc abd", add_special_tokens=False) == tok.encode("abc abd")


def test_save_hf_gpt3_roundtrip_and_window_error(tmp_path):
    torch.manual_seed(8)
    model = GPT3(GPT3Config(vocab_size=V, n_layer=2, d_model=64, n_head=4, context=32, window=None)).eval()
    _randomise(model, 8)
    save_hf(model.state_dict(), model.config.to_dict(), tmp_path / "gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    toks = _tokens(T=32, seed=8)
    with torch.no_grad():
        _close(_hf_logits(hf, toks), model(toks))
    banded = GPT3(model.config.replace(window=8))
    with pytest.raises(CheckpointError, match="window"):
        save_hf(banded, banded.config, tmp_path / "banded")
    assert not (tmp_path / "banded").exists()


# ============================================================================ GGUF export

def _undo_interleave(w: torch.Tensor, n_head: int) -> torch.Tensor:
    D = w.shape[0] // n_head
    idx = [h * D + p * (D // 2) + i for h in range(n_head) for i in range(D // 2) for p in range(2)]
    out = torch.empty_like(w)
    out[torch.tensor(idx)] = w
    return out


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_save_gguf(tmp_path, dtype):
    gguf = pytest.importorskip("gguf")
    from septet.checkpoints.export_gguf import gguf_names, save_gguf

    model = _septet_llama(seed=9, vocab_size=320)
    tok = Tokenizer.train_bpe(["one two three four " * 30], 270)
    path = save_gguf(model, model.config, tmp_path / "m.gguf", tokenizer=tok, chat_template="{{ x }}", dtype=dtype)
    r = gguf.GGUFReader(path)
    fields = r.fields
    for key in ("general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model",
                "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert key in fields, key
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 320  # padded to the model's vocab
    assert fields["tokenizer.ggml.token_type"].contents()[-1] == 5  # padding is UNUSED
    tensors = {t.name: t for t in r.tensors}
    c = model.config
    sd = model.state_dict()
    names = gguf_names(c)
    assert set(tensors) == set(names.values())
    for ours, theirs in names.items():
        t = tensors[theirs]
        want = sd[ours]
        assert tuple(int(x) for x in t.shape) == tuple(reversed(want.shape)), theirs
        if want.dim() == 1 or dtype == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, theirs
            got = torch.from_numpy(t.data.copy()).reshape(want.shape)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, theirs
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(want.shape)
        if ours.endswith("q_proj.weight"):
            got = _undo_interleave(got, c.n_head)
        elif ours.endswith("k_proj.weight"):
            got = _undo_interleave(got, c.n_kv_head)
        if dtype == "f32":
            assert torch.equal(got, want), theirs
        else:
            _close(got, want, atol=want.abs().max().item() / 100)

    try:
        from septet.checkpoints.gguf import load_gguf
    except ImportError:
        return
    back = load_gguf(path)
    toks = _tokens(seed=9)
    with torch.no_grad():
        _close(_septet(back)(toks), model(toks), atol=1e-5 if dtype == "f32" else 0.05)


# ============================================================================ load_any / export

def test_the_loaders_read_the_files_sampling_values(tmp_path):
    """An HF directory's generation_config.json reaches Loaded.generation (and so
    septet.load's generation_defaults); a directory without one recommends nothing."""
    _hf_llama(False, seed=10).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6,
                                                                         "top_p": 0.95}))
    assert load_any(tmp_path / "hf").generation == {"temperature": 0.6, "top_p": 0.95}
    (tmp_path / "hf" / "generation_config.json").unlink()
    assert load_any(tmp_path / "hf").generation == {}


def test_load_any_and_export(tmp_path):
    hf = _hf_llama(False, seed=10)
    hf.save_pretrained(tmp_path / "hf")
    toks = _tokens(seed=10)
    ref = _hf_logits(hf, toks)
    loaded = load_any(tmp_path / "hf")
    assert loaded.metadata["format"] == "hf"
    export(loaded, "septet", tmp_path / "septet")
    back = load_any(tmp_path / "septet")
    assert back.metadata["format"] == "septet"
    with torch.no_grad():
        _close(_septet(back)(toks), ref)
    export(tmp_path / "septet", "hf", tmp_path / "hf2")
    with torch.no_grad():
        _close(_septet(load_any(tmp_path / "hf2"))(toks), ref)
    model = _septet_llama(seed=11)
    _write_meta(model, tmp_path / "meta", 1)
    assert load_any(tmp_path / "meta").metadata["format"] == "meta"
    export(tmp_path / "meta", "gguf", tmp_path / "m.gguf", dtype="f16")
    assert (tmp_path / "m.gguf").stat().st_size > 0
    with pytest.raises(CheckpointError, match="export target"):
        export(loaded, "onnx", tmp_path / "x")
    (tmp_path / "weird.txt").write_text("x")
    with pytest.raises(CheckpointError, match="gguf"):
        load_any(tmp_path / "weird.txt")


# ============================================================================ errors

def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_any(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(tmp_path)

    hf = _hf_llama(False, seed=12)
    hf.save_pretrained(tmp_path / "ok")

    # unknown architecture
    d = tmp_path / "arch"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="architectures.*LlamaForCausalLM"):
        load_hf(d)
    # unsupported rope scaling
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    d = tmp_path / "rope"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                                               "rope_parameters": None}))
    with pytest.raises(CheckpointError, match="rope_scaling"):
        load_hf(d)

    # missing tensor
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "ok" / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    d = tmp_path / "missing"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf(d)

    # shape mismatch
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(32)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*shape"):
        load_hf(d)

    # truncated safetensors
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf(d)

    # a pickle that would run code: refused by weights_only, never executed
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        load_hf(d)
    assert not marker.exists()
    # the same through torch.save's zip format
    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_hf(d)
    assert not marker.exists()

    # Meta: missing shard and missing params
    model = _septet_llama(seed=13)
    _write_meta(model, tmp_path / "meta", 2)
    (tmp_path / "meta" / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        load_meta(tmp_path / "meta")
    (tmp_path / "meta" / "params.json").unlink()
    with pytest.raises(CheckpointError, match="params.json"):
        load_meta(tmp_path / "meta")
