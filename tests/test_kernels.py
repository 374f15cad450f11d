"""septet's own CPU kernels (septet/kernels): the Q4_1 / Q8_0 matmuls compute either the fp32
matmul with the dequantised weight, or exactly llama.cpp's block arithmetic (int8
activations per block of 32, integer dot products), the
decode-attention kernel equals SDPA, the portable C path equals the AVX-512 one, and the
layers built on them behave like the torch-kernel layers (quantize_model, compile)."""

from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch
import torch.nn.functional as F

from septet import kernels
from septet.errors import ConfigError
from septet.inference.quant import BlockEmbedding, Int4Linear, quantize_linear, quantize_model


@pytest.fixture(autouse=True, scope="module")
def _built(septet_home):
    """Build (or find) the kernels under the session's SEPTET_HOME, not at collection time."""
    if not kernels.available():
        pytest.skip(f"septet kernels: {kernels.why_not()}")


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float64)


def _quantize_x(x: torch.Tensor):
    """llama.cpp's Q8_1 activations: per block of 32, d = amax/127, q = round(x/d) (ties to
    even, as the AVX path rounds), d and d·sum(q) kept at fp16 precision."""
    M, K = x.shape
    b = x.view(M, K // 32, 32)
    d = b.abs().amax(-1) / 127.0  # fp32, as the kernel computes it
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(b * inv[..., None])  # torch.round: half to even
    return q.double(), _fp16(d), _fp16(d * q.sum(-1))


def _reference_q4(x, layer):
    q, dx, sx = _quantize_x(x)
    qs = layer.qs.long()
    w = torch.cat((qs & 15, qs >> 4), dim=-1).double()  # (N, nb, 32)
    isum = torch.einsum("mbk,nbk->mnb", q, w)
    return (isum * layer.d.double()[None] * dx[:, None] + layer.m.double()[None] * sx[:, None]).sum(-1)


def _reference_q8(x, layer):
    q, dx, _ = _quantize_x(x)
    isum = torch.einsum("mbk,nbk->mnb", q, layer.qs.double())
    return (isum * layer.d.double()[None] * dx[:, None]).sum(-1)


@pytest.mark.parametrize("K", [32, 96, 160, 576])
@pytest.mark.parametrize("M", [1, 3, 8, 11])
def test_q4_1_and_q8_0_kernels_are_llamacpp_block_arithmetic(M, K):
    from septet.inference.quant.blocks import Q4Linear, Q8Linear

    g = torch.Generator().manual_seed(M * 1000 + K)
    N = 50  # not a multiple of the kernel's 16-row chunks
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g) * 3
    x[0, :32] = 0.0  # an all-zero block: scale 0
    for layer, ref in ((Q4Linear(w, int8_act=True), _reference_q4), (Q8Linear(w, int8_act=True), _reference_q8)):
        y = layer(x)
        want = ref(x, layer)
        scale = ref(x.abs(), layer).abs() if isinstance(layer, Q8Linear) else want.abs()
        assert y.dtype == torch.float32 and y.shape == (M, N)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * float(scale.max()))


@pytest.mark.parametrize("K", [32, 96, 160, 576])
@pytest.mark.parametrize("M", [1, 2, 3, 8, 11])
def test_fp32_activation_kernels_are_the_dequantised_fp32_matmul(M, K):
    """Default arithmetic: activations stay fp32 and each weight is d·q (+ m), so the kernel
    is the fp32 matmul with the dequantised weight, to fp32 rounding of the sums."""
    from septet.inference.quant.blocks import Q4Linear, Q8Linear

    g = torch.Generator().manual_seed(M * 1000 + K + 1)
    N = 50
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g) * 3
    for layer in (Q4Linear(w), Q8Linear(w)):
        assert not layer.int8_act
        y = layer._kernel(x)
        W = layer.dequantize().double()
        want, size = x.double() @ W.t(), x.double().abs() @ W.abs().t()
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert float(((y.double() - want).abs() / size).max()) < 1e-6
        # fp32 activations are not rounded to int8 (which the llama.cpp arithmetic is)
        assert not torch.allclose(y, Q4Linear(w, int8_act=True)._kernel(x) if isinstance(layer, Q4Linear)
                                  else Q8Linear(w, int8_act=True)._kernel(x), rtol=1e-5, atol=1e-5)


def test_q4_1_weights_requantise_to_themselves():
    """A Q4_1 tensor (as GGUF stores it: fp16 d and m, every block spanning q = 0..15)
    dequantised and quantised again gives back its own nibbles, d and m exactly."""
    from septet.inference.quant.blocks import Q4Linear

    g = torch.Generator().manual_seed(0)
    N, K = 24, 128
    q = torch.randint(0, 16, (N, K // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(N, K // 32, generator=g) * 0.01 + 1e-4).half().float()
    m = (-torch.rand(N, K // 32, generator=g) * 0.1).half().float()
    layer = Q4Linear((q * d[..., None] + m[..., None]).view(N, K))
    got = torch.cat((layer.qs & 15, layer.qs >> 4), dim=-1).long()
    assert torch.equal(got, q)
    assert layer.d.dtype == layer.m.dtype == torch.float16
    assert torch.equal(layer.d.float(), d) and torch.equal(layer.m.float(), m)


def test_many_rows_take_the_dequantised_path():
    """From DEQUANT_MIN_ROWS rows (a prefill) the layer multiplies by its dequantised weight
    d·q + m: in bf16 for bf16 rows, in fp32 for fp32 rows; under the int8-activation
    arithmetic fp32 rows always take the kernel (llama.cpp's arithmetic for a prefill too)."""
    from septet.inference.quant.blocks import Q4Linear
    from septet.inference.quant.layers import DEQUANT_MIN_ROWS

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 64, generator=g), torch.randn(DEQUANT_MIN_ROWS, 64, generator=g)
    layer = Q4Linear(w)
    q = torch.cat((layer.qs & 15, layer.qs >> 4), dim=-1).double()
    exact = (q * layer.d.double()[..., None] + layer.m.double()[..., None]).view(48, 64)
    torch.testing.assert_close(layer.dequantize().double(), exact, rtol=1e-7, atol=0)
    torch.testing.assert_close(layer(x.bfloat16()), x.bfloat16() @ layer.dequantize().bfloat16().t())
    assert torch.equal(layer(x), x @ layer.dequantize().t())
    a8 = Q4Linear(w, int8_act=True)
    torch.testing.assert_close(a8(x).double(), _reference_q4(x, a8), rtol=1e-5, atol=1e-4)


def test_threads_do_not_change_results():
    from septet.inference.quant.blocks import Q4Linear

    w, x = torch.randn(200, 192), torch.randn(5, 192)
    before = torch.get_num_threads()
    for layer in (Q4Linear(w), Q4Linear(w, int8_act=True)):
        try:
            torch.set_num_threads(1)
            one = layer(x)
            torch.set_num_threads(2)
            two = layer(x)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(one, two)


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 24)])
def test_decode_attention_equals_sdpa(H, Hkv, D):
    g = torch.Generator().manual_seed(H + D)
    B, S = 3, 70
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, :40] = True
    mask[1, 5:33] = True  # left padding and unfilled slots
    mask[1, 20] = False
    mask[2, :S] = True
    got = torch.ops.septet.decode_attention(q, k, v, mask, D ** -0.5)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=H != Hkv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    mask[1] = False  # nothing visible: zeros, not NaN
    assert torch.equal(torch.ops.septet.decode_attention(q, k, v, mask, D ** -0.5)[1], torch.zeros(H, 1, D))


def test_decoding_attention_takes_the_kernel(monkeypatch):
    """One fp32 query over a padded cache goes through septet's kernel (bit for bit its
    output, which SDPA's is not), with SDPA's result to rounding; an attention layer decoding
    into the engine's cache takes that path (fails if it is bypassed)."""
    from septet.inference import kv_cache
    from septet.nn.attention import Attention, AttnContext

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 6, 1, 32, generator=g), torch.randn(2, 2, 40, 32, generator=g),
               torch.randn(2, 2, 40, 32, generator=g))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :7] = False
    with torch.no_grad():
        got = kv_cache.kernel_attend_one(q, k, v, mask)
    assert torch.equal(got, torch.ops.septet.decode_attention(q, k, v, mask, 32 ** -0.5))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
    torch.testing.assert_close(got, sdpa, rtol=1e-5, atol=1e-6)

    calls = []
    real = kv_cache.kernel_attend_one
    monkeypatch.setattr(kv_cache, "kernel_attend_one", lambda *a: calls.append(1) or real(*a))
    attn = Attention(64, 4, 2, 16).eval()
    cache = kv_cache.KernelKVCache(1, 2, 2, 12, 16)
    x = torch.randn(2, 11, 64, generator=g)
    with torch.no_grad():
        attn(x, AttnContext(pad_mask=mask[:, :11]), cache)
        cache.advance(11)
        y = attn(x[:, -1:], AttnContext(pad_mask=mask[:, :12]), cache)
    assert calls == [1] and y.shape == (2, 1, 64)


def test_portable_c_path_equals_the_avx512_path(tmp_path):
    """The C kernels without AVX-512 VNNI (what another CPU compiles) give the same numbers."""
    so = tmp_path / "portable.so"
    cc = subprocess.run(["gcc", "-O2", "-march=x86-64", "-fopenmp", "-shared", "-fPIC", "-std=gnu11",
                         *map(str, kernels.C_SOURCES), "-o", str(so), "-lm"], capture_output=True, text=True)
    if cc.returncode != 0:
        pytest.skip(f"cannot compile the portable path: {cc.stderr[-200:]}")
    lib = ctypes.CDLL(str(so))
    assert lib.septet_kernel_isa() == 0
    from septet.inference.quant.blocks import Q4Linear, Q8Linear

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(40, 160, generator=g), torch.randn(3, 160, generator=g)
    p = ctypes.c_void_p
    for a8 in (False, True):
        q4, q8 = Q4Linear(w, int8_act=a8), Q8Linear(w, int8_act=a8)
        y4, y8 = torch.empty(3, 40), torch.empty(3, 40)
        assert lib.septet_q4_1_mm(p(q4.qs.data_ptr()), p(q4.d.data_ptr()), p(q4.m.data_ptr()), 40, 160,
                                  p(x.data_ptr()), 3, p(y4.data_ptr()), int(a8), 1) == 0
        assert lib.septet_q8_0_mm(p(q8.qs.data_ptr()), p(q8.d.data_ptr()), 40, 160, p(x.data_ptr()), 3,
                                  p(y8.data_ptr()), int(a8), 1) == 0
        torch.testing.assert_close(y4, q4(x), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(y8, q8(x), rtol=1e-5, atol=1e-4)
    qh, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 10, 32), torch.randn(2, 2, 10, 32)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    out = torch.empty_like(qh)
    lib.septet_decode_attention.argtypes = [p, p, p, p, p] + [ctypes.c_int] * 5 + [ctypes.c_float, ctypes.c_int]
    assert lib.septet_decode_attention(qh.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(),
                                       2, 4, 2, 10, 32, 32 ** -0.5, 1) == 0
    torch.testing.assert_close(out, torch.ops.septet.decode_attention(qh, k, v, mask, 32 ** -0.5))


def test_compiled_layer_equals_eager():
    from septet.inference.quant.blocks import Q4Linear, Q8Linear

    torch._dynamo.reset()
    layers = torch.nn.Sequential(Q4Linear(torch.randn(64, 96)), torch.nn.SiLU(), Q8Linear(torch.randn(32, 64)),
                                 Q4Linear(torch.randn(32, 32), int8_act=True))
    x = torch.randn(2, 96)
    with torch.no_grad():
        eager = layers(x)
        compiled = torch.compile(layers, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_quantize_model_uses_the_kernels_unless_told_not_to(monkeypatch):
    from septet.inference.quant.blocks import Q4Linear, Q8Linear
    from septet.models import build, get_preset

    cfg = get_preset("llama-tiny").config.replace(n_layer=1, vocab_size=256)
    torch.manual_seed(0)
    m = quantize_model(build(cfg).eval(), "int4")
    assert isinstance(m.blocks[0].attn.qkv_proj, Q4Linear) and not m.blocks[0].attn.qkv_proj.int8_act
    assert isinstance(m.lm_head.fast, Q8Linear)  # untied: refined from its own int8 rows
    a8 = quantize_model(build(cfg).eval(), "int4-a8")
    assert a8.blocks[0].attn.qkv_proj.int8_act and a8.lm_head.fast.int8_act
    assert isinstance(quantize_linear(torch.randn(16, 64), "int4", group_size=64), Int4Linear)  # not Q4_1 blocks
    monkeypatch.setenv("SEPTET_KERNELS", "0")
    assert isinstance(quantize_linear(torch.randn(16, 64), "int4"), Int4Linear)
    with pytest.raises(ConfigError, match="int4-a8 needs septet's kernels.*SEPTET_KERNELS=0.*--quant int4"):
        quantize_linear(torch.randn(16, 64), "int4-a8")


def test_a_tied_embedding_held_exactly_by_the_head_is_read_from_it(monkeypatch):
    """quantize_model: when the int8 head's Q8_0 blocks reproduce the embedding exactly (a
    table that came from Q8_0), the lookup reads them and the float table is dropped, with
    the same embeddings and logits; a table they only approximate stays as it is."""
    from septet.inference.quant.blocks import Q8Linear
    from septet.models import build, get_preset

    cfg = get_preset("llama-tiny").config.replace(n_layer=1, vocab_size=96, d_model=64, n_head=4, n_kv_head=2,
                                                  tie_embeddings=True)
    torch.manual_seed(0)
    model = build(cfg).eval()
    exact = Q8Linear(model.tok_emb.weight.detach()).dequantize()
    with torch.no_grad():
        model.tok_emb.weight.copy_(exact)  # as a Q8_0 GGUF's token table dequantises
    toks = torch.randint(0, 96, (2, 9))
    import copy

    from septet.inference.quant import plan

    twin = copy.deepcopy(model)
    q = quantize_model(model, "int8")
    assert isinstance(q.tok_emb, BlockEmbedding)
    monkeypatch.setattr(plan, "holds_exactly", lambda layer, w: False)
    kept = quantize_model(twin, "int8")  # the same, keeping the float table
    assert isinstance(kept.tok_emb, torch.nn.Embedding)
    with torch.no_grad():
        assert torch.equal(q.tok_emb(toks), F.embedding(toks, exact))
        for t in (toks, toks[:, :1]):  # prefill and decode paths
            torch.testing.assert_close(q(t), kept(t), rtol=1e-6, atol=1e-6)
    monkeypatch.undo()
    torch.manual_seed(0)
    other = quantize_model(build(cfg).eval(), "int8")  # a random float table: not held exactly
    assert isinstance(other.tok_emb, torch.nn.Embedding)


def test_a_failing_compiler_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SEPTET_HOME", str(tmp_path))
    with pytest.raises(OSError, match="failed"):
        kernels._build("false", "false")
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind


@pytest.mark.parametrize("dtype,want", [("f32", None), ("q8_0", "int8")])
def test_auto_quant_follows_the_file(tmp_path, dtype, want):
    """`quant="auto"` (the chat / generate default) keeps what a GGUF already is: a float
    file loads unquantised, an 8-bit one on the int8 layers."""
    from septet.api import native_quant
    from septet.checkpoints.export_gguf import save_gguf
    from septet.models import build, get_preset

    torch.manual_seed(0)
    cfg = get_preset("llama-tiny").config.replace(n_layer=1, vocab_size=256, d_model=64, n_head=4,
                                                  n_kv_head=2)
    path = save_gguf(build(cfg).eval(), cfg, tmp_path / "m.gguf", dtype=dtype)
    assert native_quant(path) == want
    assert native_quant(tmp_path) is None  # not a GGUF file


def test_smollm2_auto_loads_on_the_4bit_kernels():
    """SmolLM2's file is Q4_1 (embedding Q8_0): auto gives Q4Linear blocks and a Q8_0 head
    that still answers "Paris" (fp32 activations; llama.cpp's int8 ones do not)."""
    import septet
    from septet.inference.quant.blocks import Q4Linear, Q8Linear

    lm = septet.load("smollm2", quant="auto")
    assert isinstance(lm.model.blocks[0].attn.qkv_proj, Q4Linear)
    # the file's Q8_0 token table serves lookup and head; no float copy of it is kept, and
    # with fp32 activations the head's logits are exact, so nothing re-checks its top rows
    assert isinstance(lm.model.quant_head, Q8Linear) and not lm.model.quant_head.int8_act
    assert isinstance(lm.model.tok_emb, BlockEmbedding) and lm.model.tok_emb._layer[0] is lm.model.quant_head
    a8 = septet.load("smollm2", quant="int4-a8").model
    assert isinstance(a8.quant_head.fast, Q8Linear) and a8.quant_head.fast.int8_act  # refined: int8 activations
    assert all(t.numel() < 49152 * 576 for t in lm.model.parameters())
    assert "Paris" in lm.generate("The capital of France is", max_new_tokens=3, temperature=0)


def test_the_dense_path_expands_a_large_weight_in_chunks(monkeypatch):
    """Many rows multiply by the dequantised weight a chunk of output rows at a time (a
    49k-row head is not expanded whole); the result is the one-piece product's."""
    from septet.inference.quant import blocks as linear
    from septet.inference.quant.blocks import Q4Linear, Q8Linear
    from septet.inference.quant.layers import DEQUANT_MIN_ROWS

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(100, 64, generator=g), torch.randn(DEQUANT_MIN_ROWS, 64, generator=g)
    for layer in (Q4Linear(w), Q8Linear(w)):
        whole = x @ layer.dequantize().t()
        monkeypatch.setattr(linear, "DENSE_CHUNK", 64 * 7)  # 7 rows a chunk: 15 chunks, a short last one
        # the same products; BLAS may pick another kernel (summation order) for a 7-row matrix
        torch.testing.assert_close(layer(x), whole, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(layer(x.bfloat16()), x.bfloat16() @ layer.dequantize().bfloat16().t())
        monkeypatch.undo()


def test_q8_0_blocks_are_taken_as_they_are():
    """Q8Linear.from_blocks (a GGUF's Q8_0 token table) holds exactly what quantising their
    dequantised weight gives, and refuses blocks of the wrong form."""
    from septet.inference.quant.blocks import Q8Linear

    ref = Q8Linear(torch.randn(40, 96, generator=torch.Generator().manual_seed(0)))
    got = Q8Linear.from_blocks(ref.qs.clone(), ref.d.clone())
    assert torch.equal(got.qs, Q8Linear(got.dequantize()).qs) and torch.equal(got.d, ref.d)
    x = torch.randn(3, 96)
    assert torch.equal(got(x), ref(x)) and (got.out_features, got.in_features) == (40, 96)
    with pytest.raises(ConfigError, match="q8_0 blocks must be"):
        Q8Linear.from_blocks(ref.qs.float(), ref.d)
