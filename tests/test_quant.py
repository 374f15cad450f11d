"""Weight-only int8 / int4 layers: error within what the scales allow, the refined head's top
logits exact in fp32, the tiny model still agrees with fp32, and the real model still
answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from septet.errors import ConfigError
from septet.inference import Sampling, generate_ids
from septet.inference.quant import Int4Linear, Int8Linear, RefinedHead, quantize_linear, quantize_model
from septet.models import build, get_preset

BF16_EPS = 2.0 ** -8


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    """These are the torch-kernel layers (Int8Linear / Int4Linear); septet's own kernels
    have tests/test_kernels.py."""
    monkeypatch.setenv("SEPTET_KERNELS", "0")  # relative rounding of a bf16 number (activations, outputs)


def _weight(N=48, K=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g), torch.randn(5, K, generator=g)


def _bound(x, w, step):
    """|x·Wᵀ − y| allowed: half a quantisation step per weight (`step` (N, K)), plus bf16
    rounding of the activations and of the output."""
    ax = x.abs()
    quant = ax @ (step / 2).t()
    rounding = BF16_EPS * (ax @ (w.abs() + step).t()) + BF16_EPS * (x @ w.t()).abs()
    return quant + rounding + 1e-5


@pytest.mark.parametrize("rows", [5, 40])  # the kernel (decode) and the dequantised path (prefill)
def test_int8_linear_error_within_scales(rows):
    w, _ = _weight()
    x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(1))
    layer = Int8Linear(w)
    scale = w.abs().amax(1) / 127  # by hand: symmetric, one step per output row
    step = scale[:, None].expand_as(w)
    err = (layer(x) - x @ w.t()).abs()
    assert (err <= _bound(x, w, step)).all()
    assert err.max() > 0  # it is quantised


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [5, 40])
def test_int4_linear_error_within_scales(group, rows):
    w, _ = _weight()
    x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(2))
    layer = Int4Linear(w, group_size=group)
    wg = w.view(w.shape[0], -1, group)
    scale = (wg.amax(-1) - wg.amin(-1)) / 15  # by hand: 16 levels from min to max per group
    step = scale[..., None].expand_as(wg).reshape_as(w)
    err = (layer(x) - x @ w.t()).abs()
    assert (err <= _bound(x, w, step)).all()
    # the dequantised weight is within half a step (+ bf16 rounding of scale and zero)
    dq = layer.dequantize().float()
    assert ((dq - w).abs() <= step / 2 + 3 * BF16_EPS * (w.abs() + step)).all()


@pytest.mark.parametrize("N", [64, 96, 80, 16, 1024 + 48])  # full packing blocks, a shorter last one
def test_int4_keeps_one_packed_copy_and_dequantizes_it_exactly(monkeypatch, N):
    """The prefill weight is expanded from torch's own packed nibbles (no second copy):
    each weight is (q - 8)·scale + zero in fp32, rounded once to bf16. Packing in row
    blocks gives the bytes of one whole-matrix call."""
    from septet.inference.quant import layers

    monkeypatch.setattr(layers, "_ROWS_PER_BLOCK", 128)
    K, G = 64, 32
    w, _ = _weight(N, K)
    layer = Int4Linear(w, group_size=G)
    assert [name for name, _ in layer.named_buffers()] == ["qweight", "scales_zeros"]
    wg = w.view(N, K // G, G)
    lo = wg.amin(-1)
    scale = ((wg.amax(-1) - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(N, K)
    assert torch.equal(layer.qweight, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
    s, z = (layer.scales_zeros[..., i].float().t()[..., None] for i in (0, 1))
    expect = ((q.view(N, K // G, G) - 8) * s + z).view(N, K).to(torch.bfloat16)
    assert torch.equal(layer.dequantize(), expect)


def test_bias_and_batch_shapes_pass_through():
    lin = nn.Linear(64, 32)
    x = torch.randn(2, 3, 64)
    for mode in ("int8", "int4"):
        q = quantize_linear(lin, mode)
        y = q(x)
        assert y.shape == (2, 3, 32) and y.dtype == x.dtype
        torch.testing.assert_close(y, lin(x), atol=0.3, rtol=0.1)


def test_unsupported_shapes_are_clear_errors():
    with pytest.raises(ConfigError, match="group size"):
        Int4Linear(torch.randn(16, 100), group_size=32)
    with pytest.raises(ConfigError, match="out_features by 16"):  # torch's packing needs it
        Int4Linear(torch.randn(24, 64), group_size=32)
    with pytest.raises(ConfigError, match="not supported"):
        Int4Linear(torch.randn(16, 96), group_size=48)
    with pytest.raises(ConfigError, match="int8|int4"):
        quantize_model(build(get_preset("llama-tiny").config.replace(n_layer=1)), "int3")


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = get_preset("llama-tiny").config.replace(n_layer=2, d_model=128, n_head=4, n_kv_head=2,
                                                  vocab_size=512, context=128, tie_embeddings=True)
    model = build(cfg).eval()
    # a unit-scale embedding and 0.1 blocks: logits with clear winners (a random model at
    # init is all near-ties), yet the top token is not simply the input token (~20% differ)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 1.0 if name == "tok_emb.weight" else 0.1)
    return model


@pytest.mark.parametrize("mode,min_agree", [("int8", 0.95), ("int4", 0.85)])
def test_quantized_tiny_model_top1_agrees(mode, min_agree):
    ref = _tiny_model()
    q = quantize_model(_tiny_model(), mode)
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert isinstance(q.quant_head, RefinedHead)  # the tied head has its own quantised copy
    toks = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = ref(toks).argmax(-1)
        b = q(toks).argmax(-1)  # prefill path
        c = torch.cat([q(toks[:, :1])] + [q(toks[:, :t + 1])[:, -1:] for t in range(1, 8)], 1)
    agree = (a == b).float().mean().item()
    assert agree >= min_agree, agree
    assert (c.argmax(-1) == a[:, :8]).float().mean().item() >= min_agree - 0.1  # decode path
    # greedy generation runs through the quantised layers with a cache
    out = list(generate_ids(q, [1, 2, 3], Sampling(max_new_tokens=5, temperature=0)))
    assert len(out) == 5


def _near_tie_head(V=512, C=64, seed=0):
    """Rows whose logits tie to within the int8 head's error: an embedding where pairs of
    tokens differ by a little noise, so x·w of the pair differs by ~1e-3."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(V // 2, C, generator=g)
    w = torch.cat([base, base + 1e-3 * torch.randn(V // 2, C, generator=g)])
    return nn.Embedding.from_pretrained(w), torch.randn(40, C, generator=g)


@pytest.mark.parametrize("head", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refined_head_recomputes_its_top_logits_in_fp32(head, dtype):
    """The quantised head's best `top` logits per row are x·w in fp32 from the float
    rows, so its argmax is the float head's even where the quantised logits tie or flip;
    the rest stay the quantised ones. Logits are fp32 whatever the activations' dtype."""
    emb, x = _near_tie_head()
    emb = emb.to(dtype)
    fast = quantize_linear(emb.weight, head)
    refined = RefinedHead(fast, emb, top=8)
    exact = x.to(dtype).float() @ emb.weight.float().t()
    for rows in (3, 40):  # the kernel and the dequantised (prefill) path
        xr = x[:rows].to(dtype)
        y, y_fast = refined(xr), fast(xr).float()
        assert y.dtype == torch.float32 and y.shape == (rows, 512)
        top = y_fast.topk(8, dim=-1).indices
        # fp32 (up to the summation order); the pairs differ by ~1e-3
        torch.testing.assert_close(y.gather(-1, top), exact[:rows].gather(-1, top), rtol=1e-6, atol=1e-5)
        rest = torch.ones_like(y, dtype=torch.bool).scatter_(-1, top, False)
        assert torch.equal(y[rest], y_fast[rest])
        assert torch.equal(y.argmax(-1), exact[:rows].argmax(-1))
    # near-ties the quantised logits alone get wrong (the point of refining)
    assert not torch.equal(fast(x.to(dtype)).float().argmax(-1), exact.argmax(-1))


def test_refined_head_in_chunks_and_untied(monkeypatch):
    """Many rows are refined a chunk at a time (same values); an untied int8 head refines
    from its own int8 rows (exact arithmetic on the quantised weights)."""
    from septet.inference.quant import head as refined_head

    emb, x = _near_tie_head(seed=1)
    fast = quantize_linear(emb.weight, "int8")
    whole = RefinedHead(fast, emb, top=4)(x)
    monkeypatch.setattr(refined_head, "_REFINE_CHUNK", 4 * 64 * 3)  # 3 rows at a time
    assert torch.equal(RefinedHead(fast, emb, top=4)(x.view(2, 20, 64)), whole.view(2, 20, 512))
    lin = nn.Linear(64, 512)
    with torch.no_grad():
        lin.weight.copy_(emb.weight)
    fast = quantize_linear(lin, "int8")  # with a bias
    own = RefinedHead(fast, None, top=4)
    w8 = fast.qweight.float() * fast.scale.float()[:, None]
    y, top = own(x[:5]), fast(x[:5]).float().topk(4, dim=-1).indices
    want = x[:5] @ w8.t() + fast.bias.float()
    torch.testing.assert_close(y.gather(-1, top), want.gather(-1, top), rtol=1e-6, atol=1e-5)
    with pytest.raises(ConfigError, match="float rows"):
        RefinedHead(quantize_linear(emb.weight, "int4"), None)


def test_quantized_heads_refined_by_default():
    """Tied: refined from the embedding itself (no copy, nothing new in the state dict);
    untied int8: from its own rows; `refine=0` keeps the plain quantised head."""
    m = quantize_model(_tiny_model(), "int4")
    assert m.quant_head._rows[0] is m.tok_emb and m.quant_head.top == 64
    assert {k for k in m.state_dict() if k.startswith("quant_head")} == {"quant_head.fast.qweight",
                                                                          "quant_head.fast.scale"}
    assert isinstance(quantize_model(_tiny_model(), "int4", refine=0).quant_head, Int8Linear)
    torch.manual_seed(0)
    cfg = get_preset("llama-tiny").config.replace(n_layer=1, vocab_size=512, tie_embeddings=False)
    untied = quantize_model(build(cfg).eval(), "int8")
    assert isinstance(untied.lm_head, RefinedHead) and untied.lm_head._rows[0] is None
    assert isinstance(quantize_model(build(cfg).eval(), "int4", head="int4").lm_head, Int4Linear)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_smollm2_quantized_still_knows_paris(mode):
    import septet

    lm = septet.load("smollm2", quant=mode)
    text = lm.generate("The capital of France is", max_new_tokens=3, temperature=0)
    assert text.startswith(" Paris"), text
