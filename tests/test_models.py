"""Model families: sizes against the papers, causality, KV-cache decoding, tying, losses,
initialisation, overfitting, and the config registry."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from septet.errors import ConfigError, SeptetError
from septet.models import GPT3, GPT3Config, LLaMAConfig, build, config_from_dict, describe, get_preset, presets
from septet.nn.moe import MoE

TINY = ["gpt3-tiny", "palm-tiny", "llama-tiny", "lamda-tiny", "gpt4-moe-tiny"]

# Published sizes, in billions (GPT-3: Brown et al. Table 2.1; PaLM: Chowdhery et al.
# Table 1; LLaMA: the released checkpoints' exact counts).
PUBLISHED = {
    "llama-7b": 6.7, "llama-13b": 13.0, "llama-33b": 32.5, "llama-65b": 65.2,
    "palm-8b": 8.63, "palm-62b": 62.50, "palm-540b": 540.35,
    "gpt3-125m": 0.125, "gpt3-350m": 0.350, "gpt3-760m": 0.760, "gpt3-1.3b": 1.3,
    "gpt3-2.7b": 2.7, "gpt3-6.7b": 6.7, "gpt3-13b": 13.0, "gpt3-175b": 175.0,
}


def _tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build(get_preset(name).config)
    if hasattr(model, "rel_bias"):  # LaMDA starts with a zero bias: make the path matter
        with torch.no_grad():
            model.rel_bias.weight.normal_(0.0, 1.0)
    return model.eval()


def _tokens(vocab: int, B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_paper(name):
    d = describe(get_preset(name).config)
    assert d["params"] == pytest.approx(PUBLISHED[name] * 1e9, rel=0.02), d


def test_lamda_137b_non_embedding():
    d = describe(get_preset("lamda-137b").config)
    assert d["non_embedding_params"] == pytest.approx(137e9, rel=0.02), d


def test_meta_build_allocates_nothing():
    for name in ("palm-540b", "gpt3-175b", "gpt4-moe-8x220b"):
        model = build(get_preset(name).config, device="meta")
        assert all(p.is_meta for p in model.parameters())
        assert all(b.is_meta for b in model.buffers())


def test_count_is_independent_of_counter():
    """describe() agrees with a direct count of unique parameters, done here."""
    for name in TINY:
        model = build(get_preset(name).config, device="meta")
        unique = {id(p): p.numel() for p in model.parameters()}
        assert describe(model.config)["params"] == sum(unique.values())


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_are_small(name):
    n = describe(get_preset(name).config)["params"]
    assert 5e6 <= n <= 20e6, n


def test_gpt4_active_params():
    c = get_preset("gpt4-moe-tiny").config
    d = describe(c)
    expert = c.n_layer * c.n_expert * 3 * c.d_model * c.d_ff
    assert d["active_params"] == d["params"] - expert + expert * c.top_k // c.n_expert


# ----------------------------------------------------------------------------- causality / cache

@pytest.mark.parametrize("name", TINY)
def test_causality(name):
    model = _tiny(name)
    V = model.config.vocab_size
    T, t = 80, 50
    toks = _tokens(V, 2, T, seed=1)
    toks2 = toks.clone()
    toks2[:, t + 1:] = _tokens(V, 2, T - t - 1, seed=2)
    with torch.no_grad():
        a, b = model(toks), model(toks2)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("chunks", [[70] + [1] * 10, [5, 1, 1, 3, 66, 4]])
def test_kv_cache_decode_equals_full_forward(name, chunks):
    model = _tiny(name)
    T = sum(chunks)  # 80 > gpt3-tiny's window of 64: its banded layers are exercised
    toks = _tokens(model.config.vocab_size, 2, T, seed=3)
    with torch.no_grad():
        full = model(toks)
        cache = model.new_cache(2, max_len=96)
        outs, s = [], 0
        for n in chunks:
            outs.append(model(toks[:, s:s + n], cache=cache))
            s += n
    assert cache.pos == T
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)


def test_gpt3_tiny_window_is_active_in_cache_test():
    c = get_preset("gpt3-tiny").config
    assert c.window is not None and c.window < 80


# ----------------------------------------------------------------------------- tying

def _final_hidden(model, toks):
    store = {}
    h = model.norm_f.register_forward_hook(lambda m, i, o: store.setdefault("h", o))
    logits = model(toks)
    h.remove()
    return store["h"], logits


@pytest.mark.parametrize("name,scaled", [("gpt3-tiny", False), ("palm-tiny", True), ("lamda-tiny", False)])
def test_tied_head_is_the_embedding(name, scaled):
    model = _tiny(name).train()
    W = model.tok_emb.weight
    V, C = W.shape
    # no second (V, C) matrix anywhere
    big = [n for n, p in model.named_parameters() if p.shape == (V, C)]
    assert big == ["tok_emb.weight"]
    toks = _tokens(V, 2, 16, seed=4) % (V // 2)  # only the lower half of the vocabulary
    h, logits = _final_hidden(model, toks)
    scale = C ** -0.5 if scaled else 1.0
    torch.testing.assert_close(logits, (h @ W.t()) * scale, atol=1e-4, rtol=1e-4)
    # the head's gradient lands in the embedding: rows of tokens never fed in get one
    model.loss(logits, _tokens(V, 2, 16, seed=5)).total.backward()
    assert W.grad[V // 2:].abs().sum() > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    h, logits = _final_hidden(model, toks)
    torch.testing.assert_close(logits, (h @ model.tok_emb.weight.t()) * scale, atol=1e-4, rtol=1e-4)


def test_llama_ties_only_when_asked():
    base = get_preset("llama-tiny").config
    untied = build(base)
    assert untied.lm_head is not None
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    tied = build(base.replace(tie_embeddings=True))
    assert tied.lm_head is None
    assert describe(base)["params"] - describe(base.replace(tie_embeddings=True))["params"] \
        == base.vocab_size * base.d_model
    toks = _tokens(base.vocab_size, 1, 8, seed=6) % 100
    h, logits = _final_hidden(tied, toks)
    torch.testing.assert_close(logits, h @ tied.tok_emb.weight.t())
    tied.loss(logits, toks).total.backward()
    assert tied.tok_emb.weight.grad[100:].abs().sum() > 0  # head gradient reaches embedding
    h, logits = _final_hidden(untied, toks)
    untied.loss(logits, toks).total.backward()
    assert untied.tok_emb.weight.grad[100:].abs().sum() == 0  # untied: embedding rows only


# ----------------------------------------------------------------------------- losses

def test_palm_z_loss_value():
    model = _tiny("palm-tiny")
    V = model.config.vocab_size
    toks = _tokens(V, 2, 12, seed=7)
    tgt = _tokens(V, 2, 12, seed=8)
    tgt[0, :3] = -100  # ignored positions do not count
    with torch.no_grad():
        logits = model(toks)
    parts = model.loss(logits, tgt)
    flat = logits.double().reshape(-1, V)
    valid = tgt.reshape(-1) != -100
    lse = torch.log(torch.exp(flat[valid] - flat[valid].max(-1, keepdim=True).values).sum(-1)) \
        + flat[valid].max(-1).values
    z_ref = 1e-4 * (lse ** 2).mean()
    ce_ref = F.cross_entropy(flat, tgt.reshape(-1))
    assert parts.z.item() == pytest.approx(z_ref.item(), rel=1e-5)
    assert parts.ce.item() == pytest.approx(ce_ref.item(), rel=1e-5)
    assert parts.total.item() == pytest.approx((ce_ref + z_ref).item(), rel=1e-5)
    assert parts.aux.item() == 0.0


def test_gpt4_balance_term_in_loss():
    model = _tiny("gpt4-moe-tiny")
    c = model.config
    inputs = []
    hooks = [m.register_forward_hook(lambda mod, i, o: inputs.append((mod, i[0])))
             for m in model.modules() if isinstance(m, MoE)]
    toks = _tokens(c.vocab_size, 2, 20, seed=9)
    with torch.no_grad():
        logits = model(toks)
    for h in hooks:
        h.remove()
    assert len(inputs) == c.n_layer
    balances = []
    for mod, x in inputs:  # Switch balance loss, recomputed by hand from the router
        x = x.reshape(-1, c.d_model)
        probs = (x @ mod.router.weight.t()).softmax(-1)
        top = probs.topk(c.top_k, -1).indices
        f = torch.stack([(top == e).float().sum() for e in range(c.n_expert)]) / top.numel()
        balances.append(c.n_expert * (f * probs.mean(0)).sum())
    parts = model.loss(logits, toks)
    aux_ref = c.balance_coef * torch.stack(balances).mean()
    assert parts.aux.item() == pytest.approx(aux_ref.item(), rel=1e-4)
    assert parts.aux.item() > 0
    assert parts.total.item() == pytest.approx((parts.ce + parts.aux).item(), rel=1e-6)
    assert parts.z.item() == 0.0
    for name in ("gpt3-tiny", "llama-tiny"):
        m = build(get_preset(name).config.replace(n_layer=1))
        assert m.loss(m(toks[:, :4] % 100), toks[:, :4] % 100).aux.item() == 0.0


# ----------------------------------------------------------------------------- overfit

# (family preset, AdamW lr, max steps). Each preset is cut to 2 layers to keep the
# test fast on 2 CPU cores; widths, vocabulary and every family-specific part stay.
# GPT-3's tied N(0, 0.02) embedding diverges at 3e-3 on this batch, so it trains at its
# preset's 1e-3. Typical steps needed: gpt3 ~21, palm ~4, llama ~24, lamda ~7, gpt4 ~18.
OVERFIT = [("gpt3-tiny", 1e-3, 80), ("palm-tiny", 3e-3, 40), ("llama-tiny", 3e-3, 80),
           ("lamda-tiny", 3e-3, 40), ("gpt4-moe-tiny", 3e-3, 60)]


@pytest.mark.parametrize("name,lr,steps", OVERFIT)
def test_overfits_one_batch(name, lr, steps):
    torch.manual_seed(10)
    model = build(get_preset(name).config.replace(n_layer=2)).train()
    toks = _tokens(model.config.vocab_size, 2, 33, seed=11)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    first = None
    for _ in range(steps):
        parts = model.loss(model(toks[:, :-1]), toks[:, 1:])
        first = first if first is not None else parts.ce.item()
        if parts.ce.item() < 0.5:
            break
        opt.zero_grad()
        parts.total.backward()
        opt.step()
    assert first > math.log(model.config.vocab_size) - 1.5  # started near chance
    assert parts.ce.item() < 0.5, (name, parts.ce.item())


# ----------------------------------------------------------------------------- init

def test_gpt3_init_statistics():
    c = GPT3Config(vocab_size=2048, n_layer=12, d_model=768, n_head=12, context=256)  # 125M shape
    torch.manual_seed(12)
    model = GPT3(c)
    resid = 0.02 / math.sqrt(2 * c.n_layer)
    seen_resid = seen_other = 0
    for name, p in model.named_parameters():
        if p.dim() < 2:
            if name.endswith("bias"):
                assert torch.count_nonzero(p) == 0, name
            continue
        want = resid if name.endswith(("attn.o_proj.weight", "mlp.proj.weight")) else 0.02
        seen_resid += want == resid
        seen_other += want != resid
        assert p.std().item() == pytest.approx(want, rel=0.03), name
        assert abs(p.mean().item()) < want * 0.02, name
    assert seen_resid == 2 * c.n_layer and seen_other > 4 * c.n_layer


def test_palm_embedding_std_one():
    torch.manual_seed(13)
    model = build(get_preset("palm-tiny").config)
    assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("name", ["gpt3-tiny", "gpt3-175b"])
def test_gpt3_alternates_dense_and_banded(name):
    c = get_preset(name).config
    model = build(c, device="meta")
    assert c.window is not None
    for i, block in enumerate(model.blocks):
        assert block.attn.window == (c.window if i % 2 else None), i
    dense = build(c.replace(window=None, n_layer=4), device="meta")
    assert all(b.attn.window is None for b in dense.blocks)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("name", sorted(presets()))
def test_config_round_trip(name):
    cfg = get_preset(name).config
    back = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert type(back) is type(cfg) and back == cfg


def test_config_round_trip_non_default_fields():
    cfg = LLaMAConfig(vocab_size=300, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                      tie_embeddings=True, rope_theta=50000.0, rope_style="interleaved")
    assert config_from_dict(cfg.to_dict()) == cfg


def _err(fn) -> str:
    with pytest.raises(ConfigError) as ei:
        fn()
    assert isinstance(ei.value, SeptetError)
    return str(ei.value)


def test_config_errors_name_the_field():
    d = get_preset("llama-tiny").config.to_dict()
    assert "bogus_field" in _err(lambda: config_from_dict({**d, "bogus_field": 1}))
    assert "n_layer" in _err(lambda: config_from_dict({**d, "n_layer": "12"}))
    assert "n_layer" in _err(lambda: config_from_dict({**d, "n_layer": 12.5}))
    assert "n_head" in _err(lambda: config_from_dict({**d, "n_head": -1}))
    no_family = {k: v for k, v in d.items() if k != "family"}
    assert "family" in _err(lambda: config_from_dict(no_family))
    assert "family" in _err(lambda: config_from_dict({**d, "family": "gpt5"}))
    assert "myconf.json" in _err(lambda: config_from_dict({**d, "oops": 1}, source="myconf.json"))


def test_unknown_preset_suggests_close_name():
    msg = _err(lambda: get_preset("llama-7"))
    assert "llama-7" in msg and "llama-7b" in msg
    msg = _err(lambda: build("palm-8"))
    assert "palm-8b" in msg
