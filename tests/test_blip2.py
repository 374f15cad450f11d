"""BLIP-2: Q-Former masks against their definitions, parity with transformers'
Blip2QFormerModel, the stage-1 objectives and retrieval, the stage-2 soft prompt on a
frozen LM, beam-search generation, and a tiny end-to-end fit."""

from __future__ import annotations

import pytest
import torch

from septet.models import build, get_preset
from septet.models.blip2 import (
    VQA_PROMPT,
    Blip2,
    Blip2Config,
    Blip2Stage1,
    load_hf_qformer_state_dict,
    sample_hard_negatives,
)
from septet.nn.qformer import QFormer, QFormerConfig, itc_mask, itg_mask, itm_mask

D_VIS = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_qformer_config(**changes) -> QFormerConfig:
    fields = dict(d_model=32, n_layer=4, n_head=4, d_ff=64, n_query=3, d_visual=D_VIS, vocab_size=50, max_text=16)
    return QFormerConfig(**{**fields, **changes})


def tiny_lm():
    cfg = get_preset("llama-tiny").config.replace(n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                                  vocab_size=128, context=64)
    return build(cfg)


def text_batch(B: int = 4, T: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 48, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) right padding
    return text, mask


# ----------------------------------------------------------------------------- masks

def brute_force(kind: str, n_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    B, T = text_mask.shape
    S = n_query + T
    out = torch.zeros(B, S, S, dtype=torch.bool)
    for b in range(B):
        for i in range(S):
            for j in range(S):
                key_real = j < n_query or bool(text_mask[b, j - n_query])
                i_q, j_q = i < n_query, j < n_query
                if kind == "itc":  # queries and text never see each other
                    ok = i_q == j_q
                elif kind == "itm":  # everything sees everything
                    ok = True
                else:  # itg: queries see queries; text sees queries and text up to itself
                    ok = j_q or (not i_q and j <= i)
                out[b, i, j] = ok and key_real
    return out


@pytest.mark.parametrize("kind, fn", [("itc", itc_mask), ("itm", itm_mask), ("itg", itg_mask)])
def test_qformer_masks_match_their_definitions(kind, fn):
    for seed in range(3):
        _, text_mask = text_batch(B=3, T=5, seed=seed)
        for n_query in (0, 1, 4):
            assert torch.equal(fn(n_query, text_mask), brute_force(kind, n_query, text_mask))


def test_itc_mask_keeps_queries_and_text_apart():
    """Under the uni-modal mask the query outputs ignore the text and the text ignores the
    image: one joint pass equals the two separate passes retrieval uses."""
    torch.manual_seed(0)
    m = Blip2Stage1(Blip2Config(qformer=tiny_qformer_config(), embed_dim=8)).eval()
    image = torch.randn(4, 7, D_VIS)
    text, text_mask = text_batch()
    ids = torch.cat((torch.full((4, 1), m.cls_id), text), dim=1)
    mask = torch.cat((torch.ones(4, 1, dtype=torch.bool), text_mask), dim=1)
    with torch.no_grad():
        h = m.qformer(m.vision_norm(image), ids, itc_mask(3, mask))
        joint_img = torch.nn.functional.normalize(m.vision_proj(h[:, :3]), dim=-1)
        joint_txt = torch.nn.functional.normalize(m.text_proj(h[:, 3]), dim=-1)
        torch.testing.assert_close(joint_img, m.image_embeds(image), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(joint_txt, m.text_embeds(text, text_mask), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- HF parity

def _hf_qformer():
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

    cfg = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                             encoder_hidden_size=D_VIS, use_qformer_text_input=True, vocab_size=50,
                             max_position_embeddings=16, cross_attention_frequency=2)
    model, emb = Blip2QFormerModel(cfg).eval(), Blip2TextEmbeddings(cfg).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # random everything, norms included, so every weight matters
        for p in list(model.parameters()) + list(emb.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model, emb, torch.randn(1, 3, 32, generator=g)


def test_qformer_matches_transformers_blip2_qformer():
    hf, hf_emb, query_tokens = _hf_qformer()
    state = {**hf.state_dict(), "query_tokens": query_tokens,
             **{f"embeddings.{k}": v for k, v in hf_emb.state_dict().items()}}
    ours = QFormer(tiny_qformer_config()).eval()
    ours.load_state_dict(load_hf_qformer_state_dict(state), strict=True)
    assert [i for i, layer in enumerate(ours.layers) if layer.cross_attn is not None] == [0, 2]
    image = torch.randn(2, 7, D_VIS)
    text, text_mask = text_batch(B=2, T=5)
    with torch.no_grad():
        embeds = hf_emb(input_ids=text, query_embeds=query_tokens.expand(2, -1, -1))  # (B, Q + T, C)
        for fn in (itc_mask, itm_mask, itg_mask):
            mask = fn(3, text_mask)
            ref = hf(query_embeds=embeds, query_length=3, attention_mask=mask[:, None],
                     encoder_hidden_states=image).last_hidden_state
            torch.testing.assert_close(ours(image, text, mask), ref, rtol=1e-5, atol=1e-5)
        # queries alone (stage 2, and the image side of ITC)
        ref = hf(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
        torch.testing.assert_close(ours(image), ref, rtol=1e-5, atol=1e-5)


def test_hf_mapping_rejects_unknown_names():
    from septet.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no septet counterpart"):
        load_hf_qformer_state_dict({"encoder.layer.0.attention.attention.rotary.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- stage 1

def test_hard_negatives_follow_the_itc_similarity_and_never_pick_the_positive():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g)
    for _ in range(20):
        neg_t, neg_i = sample_hard_negatives(sim, g)
        assert (neg_t != torch.arange(6)).all() and (neg_i != torch.arange(6)).all()
    peaked = torch.full((4, 4), -50.0)
    peaked[0, 2] = peaked[1, 3] = peaked[2, 0] = peaked[3, 1] = 50.0  # image i ~ text π(i)
    neg_t, neg_i = sample_hard_negatives(peaked, g)
    assert neg_t.tolist() == [2, 3, 0, 1] and neg_i.tolist() == [2, 3, 0, 1]


def test_stage1_losses_train_every_part():
    torch.manual_seed(0)
    m = Blip2Stage1(Blip2Config(qformer=tiny_qformer_config(), embed_dim=8))
    text, text_mask = text_batch()
    losses = m(torch.randn(4, 7, D_VIS), text, text_mask)
    for part in (losses.itc, losses.itm, losses.itg):
        assert part.ndim == 0 and torch.isfinite(part) and part > 0
    losses.total.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    assert m.temp.grad.abs() > 0


def test_retrieval_reranks_the_itc_top_k_by_itm():
    torch.manual_seed(0)
    m = Blip2Stage1(Blip2Config(qformer=tiny_qformer_config(), embed_dim=8)).eval()
    image = torch.randn(3, 7, D_VIS)
    text, text_mask = text_batch(B=5)
    ranked = m.retrieve_texts(image, text, text_mask, k=3)  # (3 images, top 3 texts)
    sim = m.similarity(m.image_embeds(image), m.text_embeds(text, text_mask))
    for i in range(3):
        top = set(sim[i].topk(3).indices.tolist())
        assert set(ranked[i].tolist()) == top
        scores = m.itm_score(image[i:i + 1].expand(3, -1, -1), text[ranked[i]], text_mask[ranked[i]])
        assert (scores[:-1] >= scores[1:]).all()
    assert m.retrieve_images(text, text_mask, image, k=2).shape == (5, 2)


# ----------------------------------------------------------------------------- stage 2

def test_stage2_trains_only_the_bridge_and_shares_the_stage1_qformer():
    torch.manual_seed(0)
    config = Blip2Config(qformer=tiny_qformer_config(), embed_dim=8)
    stage1 = Blip2Stage1(config)
    m = Blip2(tiny_lm(), config, stage1)
    assert m.qformer is stage1.qformer and m.vision_norm is stage1.vision_norm
    tokens = torch.randint(0, 128, (2, 5))
    logits = m(torch.randn(2, 7, D_VIS), tokens)
    assert logits.shape == (2, 5, 128)
    m.loss(logits[:, :-1], tokens[:, 1:]).backward()
    for name, p in m.lm.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("lm.") for n in trainable)
    assert m.proj.weight.grad.abs().sum() > 0 and m.qformer.query_tokens.grad.abs().sum() > 0
    # the text FFN has nothing to do in stage 2 (queries only): no gradient, but no harm
    m.train()
    assert not m.lm.training


def test_soft_prompt_is_prepended_to_the_lm_input():
    torch.manual_seed(0)
    m = Blip2(tiny_lm(), Blip2Config(qformer=tiny_qformer_config(), embed_dim=8))
    image, tokens = torch.randn(2, 7, D_VIS), torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        prompt = m.soft_prompt(image)  # (B, Q, C_lm)
        x = torch.cat((prompt, m.lm.tok_emb(tokens)), dim=1)
        positions = torch.arange(8)
        ref = m.lm.head_logits(m.lm.hidden_states(x, positions))[:, 3:]
        assert torch.equal(m(image, tokens), ref)


def test_stage2_generate_with_one_beam_is_greedy():
    torch.manual_seed(0)
    m = Blip2(tiny_lm(), Blip2Config(qformer=tiny_qformer_config(), embed_dim=8)).eval()
    image, prompt = torch.randn(1, 7, D_VIS), [5, 6, 7]
    out = m.generate(image, prompt, beams=1, max_new_tokens=5)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(m(image, torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]
    beams = m.generate(image, prompt, beams=4, max_new_tokens=4, stop_ids=[ids[4]])
    assert len(beams) <= 4 and ids[4] not in beams
    assert VQA_PROMPT.format("what shape is it?") == "Question: what shape is it? Answer:"


def test_tiny_blip2_learns_the_colour_in_the_features():
    """Stage 2 on a frozen tiny LM: the soft prompt must carry the colour id encoded in
    random features to the answer position; a few dozen steps suffice."""
    torch.manual_seed(0)
    lm = tiny_lm()
    # at its N(0, 0.02) init a random LM hardly moves information between positions (its
    # attention updates are ~1e-4 of the stream) nor commits to a token; a trained one does.
    # Scale attention values/outputs and the head so the frozen LM behaves more like one.
    with torch.no_grad():
        lm.lm_head.weight.mul_(30)
        for block in lm.blocks:
            block.attn.v_proj.weight.mul_(10)
            block.attn.o_proj.weight.mul_(10)
    m = Blip2(lm, Blip2Config(qformer=tiny_qformer_config(n_layer=2), embed_dim=8))
    C = 4
    protos = torch.randn(C, D_VIS) * 2
    g = torch.Generator().manual_seed(1)

    def batch(B):
        colour = torch.randint(0, C, (B,), generator=g)
        image = protos[colour][:, None, :] + 0.5 * torch.randn(B, 6, D_VIS, generator=g)
        tokens = torch.tensor([5, 6, 7, 0]).repeat(B, 1)  # "Question ... Answer: <colour>"
        tokens[:, 3] = 10 + colour
        targets = torch.full_like(tokens, -100)
        targets[:, 2] = tokens[:, 3]  # the loss is on the answer only
        return image, tokens, targets, colour

    opt = torch.optim.AdamW(m.trainable_parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(40):
        image, tokens, targets, _ = batch(32)
        loss = m.loss(m(image, tokens), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    image, tokens, _, colour = batch(128)
    with torch.no_grad():
        answer = m(image, tokens)[:, 2].argmax(-1)
    assert (answer == 10 + colour).float().mean() > 0.9
    assert m.generate(image[:1], [5, 6, 7], beams=3, max_new_tokens=1) == [10 + int(colour[0])]


def test_tiny_stage1_learns_to_match_colours_by_itc():
    """Stage 1 on random features carrying a colour id and captions naming it: ITC alone
    retrieves the right caption after 40 steps, and ITG learns to write it."""
    torch.manual_seed(0)
    m = Blip2Stage1(Blip2Config(qformer=tiny_qformer_config(n_layer=2), embed_dim=16))
    C = 4
    protos = torch.randn(C, D_VIS) * 2
    captions = torch.tensor([[5, 10 + c, 6] for c in range(C)])  # "a <colour> shape"
    every = torch.ones_like(captions, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)

    def images(colour):
        return protos[colour][:, None, :] + 0.5 * torch.randn(len(colour), 6, D_VIS, generator=g)

    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(40):
        colour = torch.randperm(C, generator=g)  # distinct captions: in-batch negatives are true ones
        losses = m(images(colour), captions[colour], every[colour])
        first = first or losses.itg.item()
        opt.zero_grad()
        losses.total.backward()
        opt.step()
    assert losses.itg.item() < first / 2
    m.eval()
    colour = torch.randint(0, C, (32,), generator=g)
    with torch.no_grad():
        sim = m.similarity(m.image_embeds(images(colour)), m.text_embeds(captions, every))
    assert (sim.argmax(dim=1) == colour).float().mean() > 0.9


def test_stage2_bridge_weights_round_trip_without_the_lm():
    torch.manual_seed(0)
    lm, config = tiny_lm(), Blip2Config(qformer=tiny_qformer_config(), embed_dim=8)
    a, b = Blip2(lm, config), Blip2(lm, config)
    b.load_bridge_state_dict(a.bridge_state_dict())
    image, tokens = torch.randn(2, 7, D_VIS), torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        assert torch.equal(a(image, tokens), b(image, tokens))
