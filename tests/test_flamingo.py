"""Flamingo: gate-at-zero identity, image-causal masking, frozen LM, Perceiver Resampler,
parity with IDEFICS's resampler and gated cross-attention, and a tiny end-to-end fit."""

from __future__ import annotations

import pytest
import torch

from septet.errors import InputError
from septet.inference.beam import beam_search
from septet.models import build, get_preset
from septet.models.flamingo import EOC_TOKEN, IMAGE_TOKEN, Flamingo, FlamingoConfig, add_media_tokens
from septet.nn.cross_attention import GatedXAttnDense, MaskedCrossAttention, image_causal_mask
from septet.nn.perceiver import PerceiverResampler

D_VIS = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(vocab: int = 128, tie: bool = False):
    cfg = get_preset("llama-tiny").config.replace(n_layer=3, d_model=64, n_head=4, n_kv_head=2,
                                                  vocab_size=vocab, context=64, tie_embeddings=tie)
    return build(cfg)


def tiny_flamingo(lm=None, every: int = 1) -> Flamingo:
    return Flamingo(lm or tiny_lm(), FlamingoConfig(
        d_visual=D_VIS, n_latents=4, resampler_layers=1, resampler_dim=32, resampler_heads=2,
        resampler_head_dim=16, xattn_every=every, xattn_heads=4, xattn_head_dim=16))


def open_gates(f: Flamingo, attn: float = 0.7, ffw: float = 0.5) -> None:
    with torch.no_grad():
        for layer in f.xattn:
            layer.attn_gate.fill_(attn)
            layer.ffw_gate.fill_(ffw)


def interleaved(f: Flamingo, B: int = 2, T: int = 12, tags=(2, 7), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, f.lm.config.vocab_size, (B, T), generator=g)
    for t in tags:
        tokens[:, t] = f.image_token_id
    media = torch.randn(B, len(tags), 1, 5, D_VIS, generator=g)
    return tokens, media


# ----------------------------------------------------------------------------- gate at zero

@pytest.mark.parametrize("every", [1, 2])
def test_untrained_flamingo_is_exactly_the_frozen_lm(every):
    torch.manual_seed(0)
    f = tiny_flamingo(every=every)
    tokens, media = interleaved(f)
    text = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        # text only, images given: the LM's logits bit for bit (plus two new-token columns)
        assert torch.equal(f(text, media)[..., :128], f.lm(text))
        # interleaved: the cross-attention runs, and its gates at 0 leave the LM's computation
        positions = torch.arange(12)
        plain = f.lm.head_logits(f.lm.hidden_states(f.embed(tokens, positions), positions))
        assert torch.equal(f(tokens, media)[..., :128], plain)
        open_gates(f)
        assert not torch.allclose(f(tokens, media)[..., :128], plain)


def test_untrained_flamingo_on_smollm2_is_exactly_smollm2():
    import septet

    loaded = septet.load("smollm2")
    torch.manual_seed(0)
    f = Flamingo(loaded.model, FlamingoConfig(d_visual=D_VIS, n_latents=4, resampler_layers=1,
                                              resampler_dim=32, resampler_heads=2, resampler_head_dim=16,
                                              xattn_every=7))
    tok = add_media_tokens(loaded.tokenizer, loaded.model.config.vocab_size)
    ids = tok.encode(f"{IMAGE_TOKEN}Question: what colour is it? Answer: red{EOC_TOKEN}")
    assert ids[0] == f.image_token_id and ids[-1] == f.eoc_token_id
    text = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.equal(f(text, torch.randn(1, 1, 1, 5, D_VIS))[..., :f.lm.config.vocab_size], f.lm(text))


# ----------------------------------------------------------------------------- masking

def brute_force_image_causal(tokens, image_id, n_images, before=None):
    B, T = tokens.shape
    mask = torch.zeros(B, T, n_images, dtype=torch.bool)
    for b in range(B):
        count = 0 if before is None else int(before[b])
        for t in range(T):
            if tokens[b, t] == image_id:
                count += 1
            if count > 0 and count - 1 < n_images:  # the last image at or before t
                mask[b, t, count - 1] = True
    return mask


def test_image_causal_mask_matches_its_definition():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        tokens = torch.randint(0, 4, (3, 15), generator=g)  # id 0 plays <image>
        n = int((tokens == 0).sum(1).max()) + 1
        assert torch.equal(image_causal_mask(tokens, 0, n), brute_force_image_causal(tokens, 0, n))
        before = torch.randint(0, 2, (3,), generator=g)
        n += 1
        assert torch.equal(image_causal_mask(tokens, 0, n, before),
                           brute_force_image_causal(tokens, 0, n, before))


def test_text_before_any_image_gets_zero_cross_attention():
    torch.manual_seed(0)
    attn = MaskedCrossAttention(64, 32, 4, 16)
    x, visual = torch.randn(2, 9, 64), torch.randn(2, 2, 4, 32)
    tokens = torch.ones(2, 9, dtype=torch.long)
    tokens[0, 3] = tokens[0, 6] = tokens[1, 5] = 0
    y = attn(x, visual, image_causal_mask(tokens, 0, 2))
    assert torch.equal(y[0, :3], torch.zeros(3, 64)) and torch.equal(y[1, :5], torch.zeros(5, 64))
    assert y[0, 3:].abs().amin(dim=-1).gt(0).all()


def test_text_before_the_first_image_equals_the_lm_when_only_attention_is_open():
    torch.manual_seed(0)
    f = tiny_flamingo()
    open_gates(f, attn=0.9, ffw=0.0)  # the dense FFW applies to every token (paper): keep it shut
    tokens, media = interleaved(f, tags=(4, 8))
    positions = torch.arange(tokens.shape[1])
    with torch.no_grad():
        plain = f.lm.head_logits(f.lm.hidden_states(f.embed(tokens, positions), positions))
        out = f(tokens, media)[..., :128]
    assert torch.equal(out[:, :4], plain[:, :4])
    assert not torch.allclose(out[:, 4:], plain[:, 4:])


def test_changing_image_two_does_not_touch_tokens_before_it():
    torch.manual_seed(0)
    f = tiny_flamingo()
    open_gates(f)
    tokens, media = interleaved(f, tags=(2, 7))
    with torch.no_grad():
        a = f(tokens, media)
        changed = media.clone()
        changed[:, 1] = torch.randn_like(changed[:, 1])
        b = f(tokens, changed)
    assert torch.equal(a[:, :7], b[:, :7])  # before the second <image>: identical
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    # and by gradients: the loss on the first 7 positions does not depend on image 2
    media = media.clone().requires_grad_(True)
    f(tokens, media)[:, :7].sum().backward()
    assert torch.equal(media.grad[:, 1], torch.zeros_like(media.grad[:, 1]))
    assert media.grad[:, 0].abs().sum() > 0


def test_kv_cached_continuation_matches_the_full_forward():
    torch.manual_seed(0)
    f = tiny_flamingo()
    open_gates(f)
    tokens, media = interleaved(f, tags=(2, 7))
    with torch.no_grad():
        full = f(tokens, media)
        visual = f.resample(media)
        cache = f.new_cache(2, 12)
        parts = [f(tokens[:, :5], visual=visual, cache=cache), f(tokens[:, 5:9], visual=visual, cache=cache)]
        parts += [f(tokens[:, i:i + 1], visual=visual, cache=cache) for i in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_more_image_tags_than_images_is_an_input_error():
    f = tiny_flamingo()
    tokens, media = interleaved(f, tags=(2, 7))
    with pytest.raises(InputError, match="<image> tags"):
        f(tokens, media[:, :1])
    with pytest.raises(InputError, match="<image> tags"):
        f(tokens)


# ----------------------------------------------------------------------------- frozen LM

@pytest.mark.parametrize("tie", [False, True])
def test_only_the_bridge_and_the_new_rows_train(tie):
    torch.manual_seed(0)
    f = tiny_flamingo(tiny_lm(tie=tie))
    open_gates(f)
    tokens, media = interleaved(f)
    tokens[:, -1] = f.eoc_token_id
    logits = f(tokens, media)
    f.loss(logits[:, :-1], tokens[:, 1:]).backward()
    for name, p in f.lm.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    trainable = dict((n, p) for n, p in f.named_parameters() if p.requires_grad)
    assert trainable and all(not n.startswith("lm.") for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None, name
    assert f.new_tok_emb.grad[0].abs().sum() > 0  # the <image> row learns through its input
    assert (f.new_head is None) == tie
    out_rows = f.new_tok_emb if tie else f.new_head
    assert out_rows.grad[1].abs().sum() > 0  # <EOC> learns as a target
    f.train()
    assert not f.lm.training and f.resampler.training


def test_add_media_tokens_places_the_new_ids_after_the_lm_vocabulary():
    import tokenizers

    from septet.tokenizer import Tokenizer

    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = add_media_tokens(Tokenizer(hf, eot_token=None), 6)  # 3 real tokens, a 6-row table
    assert tok.token_to_id(IMAGE_TOKEN) == 6 and tok.token_to_id(EOC_TOKEN) == 7
    assert tok.encode(f"a {IMAGE_TOKEN} b {EOC_TOKEN}") == [0, 6, 1, 7]
    assert Tokenizer(hf, eot_token=None).token_to_id(IMAGE_TOKEN) is None  # the original is untouched


# ----------------------------------------------------------------------------- resampler

def test_resampler_gives_a_fixed_number_of_tokens_whatever_the_input_size():
    torch.manual_seed(0)
    r = PerceiverResampler(32, n_latents=6, n_layers=2, n_head=2, d_head=16, max_frames=4, d_input=D_VIS)
    for n_tokens in (1, 7, 49):
        assert r(torch.randn(2, 3, 2, n_tokens, D_VIS)).shape == (2, 3, 6, 32)


def test_resampler_adds_one_temporal_embedding_per_frame():
    torch.manual_seed(0)
    r = PerceiverResampler(32, n_latents=6, n_layers=2, n_head=2, d_head=16, max_frames=4)
    media = torch.randn(2, 1, 3, 5, 32)
    with torch.no_grad():
        out = r(media)
        manual = media + r.time_emb[:3, None, :]  # frame f of every image gets time_emb[f]
        r.time_emb.zero_()
        torch.testing.assert_close(r(manual), out)
        # without temporal embeddings the frames are an unordered set: swapping is invisible
        torch.testing.assert_close(r(media.flip(2)), r(media))
    with pytest.raises(InputError, match="frames"):
        r(torch.randn(1, 1, 5, 5, 32))


# ----------------------------------------------------------------------------- IDEFICS parity

def _idefics_config(D: int, hidden: int):
    from transformers import IdeficsConfig

    cfg = IdeficsConfig(hidden_size=hidden, intermediate_size=96, num_attention_heads=4, rms_norm_eps=1e-6,
                        vision_config={"embed_dim": D})
    cfg._attn_implementation = "sdpa"
    return cfg


def _randomise(module) -> None:
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def test_resampler_matches_idefics_perceiver_resampler():
    """IDEFICS's resampler (qk layer norms off, its default) is the paper's form with a ReLU
    FFW and no temporal embeddings; septet's with act="relu" and one frame matches it."""
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    D = 32
    theirs = IdeficsPerceiverResampler(_idefics_config(D, 48), D, 2, 4, 8, 5).eval()
    _randomise(theirs)
    ours = PerceiverResampler(D, n_latents=5, n_layers=2, n_head=4, d_head=8, ff_mult=4, max_frames=1, act="relu")
    names = {"context_layer_norm": "attn.media_norm", "latents_layer_norm": "attn.latent_norm",
             "q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj",
             "output_proj": "attn.o_proj", "ln": "ffw.norm", "fc": "ffw.fc", "c_proj": "ffw.proj"}
    state = {"latents": theirs.latents, "time_emb": torch.zeros(1, D),
             "norm.weight": theirs.layer_norm.weight, "norm.bias": theirs.layer_norm.bias}
    for name, p in theirs.blocks.named_parameters():
        i, _, mod, leaf = name.split(".")
        state[f"layers.{i}.{names[mod]}.{leaf}"] = p
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 11, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(x[:, None, None])[:, 0], theirs(x), rtol=1e-5, atol=1e-5)


def test_gated_xattn_dense_matches_idefics_gated_cross_attention():
    """IDEFICS's layer on a LLaMA host is GATED XATTN-DENSE with RMSNorm and SwiGLU;
    septet's with norm="rmsnorm", ffw="swiglu" matches it, masking and open gates included."""
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer

    D, C = 32, 48
    theirs = IdeficsGatedCrossAttentionLayer(_idefics_config(D, C), layer_idx=0).eval()
    _randomise(theirs)
    with torch.no_grad():
        theirs.alpha_cross_attn.fill_(0.8)
        theirs.alpha_dense.fill_(-0.6)
    ours = GatedXAttnDense(C, D, 4, C // 4, 96, norm="rmsnorm", ffw="swiglu", eps=1e-6)
    t = theirs.state_dict()
    ours.load_state_dict({
        "attn_norm.weight": t["input_layernorm.weight"], "ffw_norm.weight": t["post_attention_layernorm.weight"],
        "attn_gate": t["alpha_cross_attn"], "ffw_gate": t["alpha_dense"],
        **{f"attn.{k}_proj.weight": t[f"cross_attn.{k}_proj.weight"] for k in "qkvo"},
        **{f"ffw.{k}.weight": t[f"mlp.{k}.weight"] for k in ("gate_proj", "up_proj", "down_proj")},
    }, strict=True)
    tokens = torch.ones(2, 9, dtype=torch.long)
    tokens[0, 2] = tokens[0, 6] = tokens[1, 4] = 0
    mask = image_causal_mask(tokens, 0, 2)  # (B, T, M)
    x, visual = torch.randn(2, 9, C), torch.randn(2, 2, 3, D)
    has = mask.any(-1)
    key_mask = (mask.repeat_interleave(3, dim=-1) | ~has[..., None])[:, None]  # (B, 1, T, M·R)
    with torch.no_grad():
        ref = theirs(x, image_hidden_states=visual.reshape(2, 6, D), image_attention_mask=key_mask,
                     cross_attention_gate=has.long())
        torch.testing.assert_close(ours(x, visual, mask), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- beam search

def test_beam_search_with_enough_beams_is_exhaustive():
    """A fixed bigram model over 4 tokens (3 = stop): with more beams than prefixes, beam
    search returns the best sequence by log-prob / length, as enumeration does."""
    import itertools

    g = torch.Generator().manual_seed(5)
    table = torch.randn(4, 4, generator=g) * 2  # next-token logits given the last token
    start = torch.randn(4, generator=g) * 2
    logp, start_lp = table.log_softmax(-1), start.log_softmax(-1)
    K, L = 64, 3
    best, best_seq = float("-inf"), None
    candidates = [(list(body), list(body) + [3]) for n in range(1, L + 1)
                  for body in itertools.product(range(3), repeat=n - 1)]
    # out of budget, unfinished hypotheses of full length compete as they are
    candidates += [(list(body), list(body)) for body in itertools.product(range(3), repeat=L)]
    for out_ids, seq in candidates:
        s = start_lp[seq[0]] + sum(logp[a, b] for a, b in zip(seq, seq[1:]))
        if s / len(seq) > best:
            best, best_seq = float(s / len(seq)), out_ids

    def step(t):
        return table[t[:, 0]]

    out = beam_search(start.expand(K, -1), step, lambda idx: None, beams=K, max_new_tokens=L, stop_ids={3})
    assert out == best_seq


def test_flamingo_generate_with_one_beam_is_greedy():
    torch.manual_seed(0)
    f = tiny_flamingo()
    open_gates(f)
    prompt = [f.image_token_id, 5, 6, 7]
    media = torch.randn(1, 1, 1, 5, D_VIS)
    out = f.generate(prompt, media, beams=1, max_new_tokens=5, stop_ids=[])
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(f(torch.tensor([ids]), media)[0, -1].argmax()))
    assert out == ids[len(prompt):]
    assert len(f.generate(prompt, media, beams=3, max_new_tokens=4)) <= 4


# ----------------------------------------------------------------------------- end to end

def test_tiny_flamingo_learns_the_colour_in_the_features():
    """Random features carry a colour id (a prototype vector plus noise); the frozen LM alone
    cannot know it. Training only the bridge reaches near-perfect answers in 40 steps."""
    torch.manual_seed(0)
    f = tiny_flamingo()
    C = 4
    protos = torch.randn(C, D_VIS) * 2
    g = torch.Generator().manual_seed(1)

    def batch(B):
        colour = torch.randint(0, C, (B,), generator=g)
        media = protos[colour][:, None, None, None, :] + 0.5 * torch.randn(B, 1, 1, 6, D_VIS, generator=g)
        tokens = torch.tensor([f.image_token_id, 5, 6, 7, 0, f.eoc_token_id]).repeat(B, 1)
        tokens[:, 4] = 10 + colour  # "<image> q q q <answer> <EOC>"
        targets = torch.full_like(tokens, -100)
        targets[:, 3], targets[:, 4] = tokens[:, 4], f.eoc_token_id
        return tokens, media, targets, colour

    opt = torch.optim.AdamW(f.trainable_parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(40):
        tokens, media, targets, _ = batch(32)
        loss = f.loss(f(tokens, media), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens, media, _, colour = batch(128)
    with torch.no_grad():
        answer = f(tokens, media)[:, 3].argmax(-1)
    assert (answer == 10 + colour).float().mean() > 0.9
    assert all(layer.attn_gate.abs().item() > 0 for layer in f.xattn)


def test_bridge_weights_round_trip_without_the_lm():
    from septet.errors import CheckpointError

    torch.manual_seed(0)
    lm = tiny_lm()
    f = tiny_flamingo(lm)
    open_gates(f)
    state = f.bridge_state_dict()
    assert state and not any(k.startswith("lm.") for k in state)
    g = tiny_flamingo(lm)
    g.load_bridge_state_dict(state)
    tokens, media = interleaved(f)
    with torch.no_grad():
        assert torch.equal(g(tokens, media), f(tokens, media))
    with pytest.raises(CheckpointError, match="bridge weights"):
        g.load_bridge_state_dict({k: v for k, v in state.items() if not k.startswith("xattn.0.")})
