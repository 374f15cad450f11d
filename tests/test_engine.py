"""septet.inference.engine.DecodeBatch: every row of a batch computes what its sequence
computes alone, whatever happens to the batch (padding, rows leaving, repeating, joining,
forks, multi-token feeds), on a RoPE model and on LaMDA's relative bias."""

from __future__ import annotations

import pytest
import torch

from septet.errors import InputError
from septet.inference import DecodeBatch, Sampling
from septet.models import build, get_preset

TOL = dict(rtol=1e-4, atol=1e-4)


def _model(preset: str, **changes):
    torch.manual_seed(0)
    cfg = get_preset(preset).config.replace(n_layer=2, d_model=32, n_head=4, vocab_size=200, context=96, **changes)
    model = build(cfg).eval()
    if preset.startswith("lamda"):
        with torch.no_grad():  # a bias large enough that a wrong offset shows in the logits
            model.rel_bias.weight.normal_(0, 2.0)
    return model


@pytest.fixture(params=["llama-tiny", "lamda-tiny"])
def model(request):
    return _model(request.param)


def alone(model, ids: list[int]) -> torch.Tensor:
    """The next-token logits of `ids` run alone, without a cache: (V,)."""
    return model(torch.tensor([ids]))[0, -1]


@torch.inference_mode()
def test_padded_rows_step_and_join_as_if_alone(model):
    a, b, late = list(range(5, 25)), list(range(30, 36)), list(range(50, 58))
    batch = DecodeBatch(model, [a, b], max_new_tokens=4)
    assert batch.any_pad and batch.pos == 20
    for row, ids in zip(batch.logits, (a, b)):
        torch.testing.assert_close(row, alone(model, ids), **TOL)
    batch.admit(late, max_new_tokens=30)  # 8 tokens ending at slot 20; its budget grows the cache
    assert batch.size == 3 and batch.cache.max_len == 50
    torch.testing.assert_close(batch.logits[2], alone(model, late), **TOL)
    batch.step([1, 2, 3])
    for row, ids in zip(batch.logits, (a + [1], b + [2], late + [3])):
        torch.testing.assert_close(row, alone(model, ids), **TOL)
    batch.keep([2, 0])  # row b leaves; the others go on in a new order
    batch.step([7, 8])
    for row, ids in zip(batch.logits, (late + [3, 7], a + [1, 8])):
        torch.testing.assert_close(row, alone(model, ids), **TOL)


@torch.inference_mode()
def test_repeated_rows_diverge_like_beams(model):
    prompt = list(range(3, 13))
    batch = DecodeBatch(model, [prompt], max_new_tokens=5)
    batch.keep([0, 0, 0])  # one hypothesis becomes three
    batch.step([4, 5, 6])
    batch.keep([2, 0])
    batch.step([9, 9])
    for row, ids in zip(batch.logits, (prompt + [6, 9], prompt + [4, 9])):
        torch.testing.assert_close(row, alone(model, ids), **TOL)


@torch.inference_mode()
def test_fork_and_extend_score_continuations(model):
    ctxs = [list(range(5, 17)), list(range(40, 45))]
    prefilled = DecodeBatch(model, ctxs, max_new_tokens=0)
    assert prefilled.cache.max_len == 12  # no room asked for: exactly the prompts
    rows = prefilled.fork([0, 1, 1], extra_slots=3)
    conts = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    logits = rows.extend(conts, all_logits=True)  # (3, 3, V)
    for r, g in enumerate([0, 1, 1]):
        full = model(torch.tensor([ctxs[g] + conts[r].tolist()]))[0, -3:]
        torch.testing.assert_close(logits[r], full, **TOL)
    assert prefilled.size == 2 and prefilled.pos == 12  # the source batch is unchanged


@torch.inference_mode()
def test_decode_loop_rows_leave_and_extend_replaces_the_step():
    model = _model("llama-tiny")
    prompts = [list(range(5, 15)), list(range(20, 23))]
    batch = DecodeBatch(model, prompts, max_new_tokens=6, sampling=Sampling(max_new_tokens=6, temperature=0))
    seqs = [list(p) for p in prompts]
    live = [0, 1]
    for i, tokens in enumerate(batch.decode()):
        for r, t in zip(live, tokens):
            torch.testing.assert_close(batch.logits[live.index(r)], alone(model, seqs[r]), **TOL)
            assert t == int(alone(model, seqs[r]).argmax())
            seqs[r].append(t)
        if i == 1:  # row 1 finishes; row 0 is fed its token and two more at once
            batch.keep([0])
            live = [0]
            batch.extend(torch.tensor([[tokens[0], 7, 8]]))
            seqs[0] += [7, 8]
        if i == 3:
            break
    assert len(seqs[0]) == 10 + 2 + 2 + 2 and len(seqs[1]) == 3 + 2


def test_bad_use_is_a_clear_error():
    model = _model("llama-tiny")
    with pytest.raises(InputError, match="no prompts"):
        DecodeBatch(model, [], max_new_tokens=3)
    with pytest.raises(InputError, match="empty"):
        DecodeBatch(model, [[]], max_new_tokens=3)
    with torch.inference_mode():
        batch = DecodeBatch(model, [[1, 2, 3]], max_new_tokens=3)
        with pytest.raises(InputError, match="cannot join"):
            batch.admit(list(range(10)), max_new_tokens=2)  # longer than the batch's history
        with pytest.raises(InputError, match="sampling"):
            next(batch.decode())
