"""Logit parity with Hugging Face transformers on tiny random models (fp32).

HF's LlamaForCausalLM and GPT2LMHeadModel are independent implementations: copying their
random weights into septet's LLaMA and GPT-3 (window=None) must give the same logits.
The HF -> septet name maps are septet.checkpoints.hf's, the ones load_hf uses."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from septet.checkpoints.hf import hf_gpt2_to_septet, hf_llama_to_septet  # noqa: E402
from septet.models import GPT3, GPT3Config, LLaMA, LLaMAConfig  # noqa: E402

V = 256


def _tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_randomise(model: torch.nn.Module, seed: int) -> None:
    """HF zero-initialises or one-initialises some tensors (norms, biases): make every
    tensor random so a wrongly mapped or dropped weight cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or ".ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    ours = dict(model.named_parameters())
    assert set(state) == set(ours), (set(state) ^ set(ours))
    with torch.no_grad():
        for name, t in state.items():
            assert ours[name].shape == t.shape, name
            ours[name].copy_(t)


# ----------------------------------------------------------------------------- LLaMA

def _llama_pair(tie: bool, n_kv: int = 2, seed: int = 0):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv, intermediate_size=192, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=128, tie_word_embeddings=tie, attention_bias=False,
        mlp_bias=False, hidden_act="silu", attn_implementation="eager")
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    _hf_randomise(hf, seed)
    ours = LLaMA(LLaMAConfig(vocab_size=V, n_layer=2, d_model=64, n_head=4, n_kv_head=n_kv,
                             d_ff=192, norm_eps=1e-6, rope_theta=10000.0, context=128,
                             rope_style="half", tie_embeddings=tie)).eval()
    state = hf_llama_to_septet(hf.state_dict(), ours.config)  # the loader's own name map
    _load(ours, state)
    return hf, ours


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("n_kv", [2, 4, 1])
def test_llama_logits_match_hf(tie, n_kv):
    hf, ours = _llama_pair(tie, n_kv)
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    toks = _tokens(2, 40, seed=1)
    with torch.no_grad():
        ref = hf(toks).logits
        got = ours(toks)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_llama_cached_decode_matches_hf():
    hf, ours = _llama_pair(False)
    toks = _tokens(1, 24, seed=2)
    with torch.no_grad():
        ref = hf(toks).logits
        cache = ours.new_cache(1, 32)
        got = torch.cat([ours(toks[:, :16], cache=cache)] +
                        [ours(toks[:, t:t + 1], cache=cache) for t in range(16, 24)], 1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- GPT-2

def _gpt2_pair(seed: int = 0):
    hf_cfg = transformers.GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager")
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    _hf_randomise(hf, seed)
    hf.tie_weights()  # make sure the head still is the (now random) embedding
    assert torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    ours = GPT3(GPT3Config(vocab_size=V, n_layer=2, d_model=64, n_head=4, context=64,
                           norm_eps=1e-5, window=None)).eval()
    # Conv1D (in, out) weights transposed and the fused c_attn split by the loader's map
    state = hf_gpt2_to_septet(hf.state_dict(), ours.config)
    _load(ours, state)
    return hf, ours


def test_gpt2_logits_match_hf():
    hf, ours = _gpt2_pair()
    toks = _tokens(2, 64, seed=3)
    with torch.no_grad():
        ref = hf(toks).logits
        got = ours(toks)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_gpt3_without_window_is_all_dense_gpt2():
    hf, ours = _gpt2_pair(seed=4)
    assert all(b.attn.window is None for b in ours.blocks)
    # the same weights with a band on the odd layers is GPT-3, and no longer GPT-2 once the
    # sequence outgrows the band (but still is within it)
    banded = GPT3(GPT3Config(vocab_size=V, n_layer=2, d_model=64, n_head=4, context=64,
                             norm_eps=1e-5, window=8)).eval()
    banded.load_state_dict(ours.state_dict())
    assert [b.attn.window for b in banded.blocks] == [None, 8]
    toks = _tokens(1, 64, seed=5)
    with torch.no_grad():
        ref = hf(toks).logits
        dense, sparse = ours(toks), banded(toks)
    torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse[:, :8], ref[:, :8], atol=1e-5, rtol=1e-5)
    assert (sparse[:, 8:] - ref[:, 8:]).abs().max() > 1e-3
