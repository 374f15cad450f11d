"""Generation engine: sampling filters, seeds, stop strings, streaming detokenisation,
cached == uncached, batched == unbatched."""

from __future__ import annotations

import pytest
import torch

from septet.api import LoadedModel
from septet.inference import (
    Sampling,
    TextStream,
    filter_logits,
    generate_batch,
    generate_batch_with_logits,
    generate_ids,
    optimize_for_inference,
    sample_next,
    stream_text,
)
from septet.inference.sampling import apply_repetition_penalty
from septet.models import build, get_preset
from septet.tokenizer import Tokenizer

NEG = float("-inf")


# ----------------------------------------------------------------------------- filters

def _kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert _kept(filter_logits(logits, Sampling(top_k=2))) == [1, 3]
    assert _kept(filter_logits(logits, Sampling(top_k=99))) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert _kept(filter_logits(logits, Sampling(top_p=0.5))) == [0]
    assert _kept(filter_logits(logits, Sampling(top_p=0.79))) == [0, 1]
    assert _kept(filter_logits(logits, Sampling(top_p=0.81))) == [0, 1, 2]
    out = filter_logits(logits, Sampling(top_p=0.81))
    torch.testing.assert_close(out.softmax(-1)[0, :3], torch.tensor([0.5, 0.3, 0.15]) / 0.95)


def test_min_p_is_relative_to_the_top_probability():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert _kept(filter_logits(probs.log(), Sampling(min_p=0.3))) == [0, 1, 2]  # >= 0.15
    assert _kept(filter_logits(probs.log(), Sampling(min_p=0.31))) == [0, 1]
    # temperature is applied first: a sharper distribution drops more
    assert _kept(filter_logits(probs.log(), Sampling(min_p=0.3, temperature=0.5))) == [0, 1]


def test_repetition_penalty_is_ctrl_style():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 3.0, -1.0]]
    # greedy with the penalty avoids a repeated token that would otherwise win
    logits = torch.tensor([[3.0, 2.0]])
    s = Sampling(temperature=0, repetition_penalty=2.0)
    assert sample_next(logits, s, None, torch.tensor([[True, False]])).item() == 1
    assert sample_next(logits, s, None, torch.tensor([[False, False]])).item() == 0


def test_sampling_rejects_bad_values():
    for bad in (dict(top_p=0.0), dict(min_p=1.5), dict(repetition_penalty=0.0), dict(temperature=-1)):
        with pytest.raises(ValueError):
            Sampling(**bad)


# ----------------------------------------------------------------------------- models

def _tiny(name: str, **over):
    torch.manual_seed(0)
    cfg = get_preset(name).config.replace(**{**dict(n_layer=2, d_model=64, n_head=4, vocab_size=256,
                                                    context=64), **over})
    model = build(cfg).eval()
    # larger weights than the init so the logits are far from uniform (no near-ties)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


MODELS = [("llama-tiny", dict(n_kv_head=2)), ("gpt3-tiny", dict(window=8))]


@pytest.fixture(scope="module", params=MODELS, ids=[m[0] for m in MODELS])
def tiny(request):
    name, over = request.param
    return _tiny(name, **over)


def test_greedy_is_deterministic_and_seed_reproducible(tiny):
    prompt = [1, 2, 3, 4]
    g1 = list(generate_ids(tiny, prompt, Sampling(max_new_tokens=12, temperature=0)))
    g2 = list(generate_ids(tiny, prompt, Sampling(max_new_tokens=12, temperature=0)))
    assert g1 == g2 and len(g1) == 12
    s = Sampling(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = list(generate_ids(tiny, prompt, s))
    b = list(generate_ids(tiny, prompt, s))
    c = list(generate_ids(tiny, prompt, Sampling(max_new_tokens=16, temperature=1.0, top_k=50,
                                                 top_p=0.95, seed=8)))
    assert a == b and a != c


def test_stop_id_ends_generation(tiny):
    prompt = [5, 6, 7]
    full = list(generate_ids(tiny, prompt, Sampling(max_new_tokens=10, temperature=0)))
    stopped = list(generate_ids(tiny, prompt, Sampling(max_new_tokens=10, temperature=0),
                                stop_ids={full[3]}))
    assert stopped == full[:full.index(full[3]) + 1]


def test_cached_steps_equal_the_uncached_forward(tiny):
    # prompt 5 + 20 new tokens = 25 > the gpt3 band of 8: banded layers are exercised
    prompt = [3, 1, 4, 1, 5]
    [ids], [logits] = generate_batch_with_logits(tiny, [prompt], Sampling(max_new_tokens=20, temperature=0))
    seq = prompt + ids
    with torch.no_grad():
        full = tiny(torch.tensor([seq]))[0]  # (T, V)
    ref = full[len(prompt) - 1:len(seq) - 1]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert ids == ref.argmax(-1).tolist()


def test_batched_rows_equal_single_runs(tiny):
    prompts = [[7, 8, 9], list(range(10, 24)), [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    s = Sampling(max_new_tokens=12, temperature=0)
    rows, logits = generate_batch_with_logits(tiny, prompts, s)
    for p, r, lg in zip(prompts, rows, logits):
        [alone], [lg1] = generate_batch_with_logits(tiny, [p], s)
        assert r == alone
        assert r == list(generate_ids(tiny, p, s))
        torch.testing.assert_close(lg, lg1, atol=1e-4, rtol=1e-4)


def test_batched_stop_ids_end_rows_independently(tiny):
    prompts = [[1, 2], [3, 4, 5, 6]]
    s = Sampling(max_new_tokens=8, temperature=0)
    free = generate_batch(tiny, prompts, s)
    stop = free[0][2]
    rows = generate_batch(tiny, prompts, s, stop_ids={stop})
    for f, r in zip(free, rows):
        expect = f[:f.index(stop) + 1] if stop in f else f
        assert r == expect


def test_batched_rows_end_when_until_says_so(tiny):
    """`until(row, ids)` ends a row on its ids so far (the scorer's stop strings): row 0
    after three tokens, row 1 once it has produced the token row 0 produced first."""
    prompts = [[1, 2], [3, 4, 5, 6]]
    s = Sampling(max_new_tokens=8, temperature=0)
    free = generate_batch(tiny, prompts, s)
    first = free[0][0]
    rows = generate_batch(tiny, prompts, s, until=lambda r, ids: len(ids) == 3 if r == 0 else ids[-1] == first)
    assert rows[0] == free[0][:3]
    assert rows[1] == (free[1][:free[1].index(first) + 1] if first in free[1] else free[1])


def test_packed_inference_model_computes_the_same(tiny):
    name = "llama-tiny" if tiny.config.family == "llama" else "gpt3-tiny"
    over = dict(MODELS)[name]
    fresh = _tiny(name, **over)
    toks = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = fresh(toks)
        optimize_for_inference(fresh)
        after = fresh(toks)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_prompt_too_long_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="context"):
        list(generate_ids(tiny, [1] * 64, Sampling(max_new_tokens=4)))
    with pytest.raises(ValueError, match="empty"):
        list(generate_ids(tiny, [], Sampling(max_new_tokens=4)))


def test_cache_is_sized_to_prompt_plus_new_tokens(tiny, monkeypatch):
    sizes = []
    real = type(tiny).new_cache

    def spy(self, batch, max_len=None, **kw):
        sizes.append(max_len)
        return real(self, batch, max_len, **kw)

    monkeypatch.setattr(type(tiny), "new_cache", spy)
    list(generate_ids(tiny, [1, 2, 3], Sampling(max_new_tokens=5, temperature=0)))
    assert sizes == [8]


# ----------------------------------------------------------------------------- text

class ByteTok:
    """A tokenizer whose tokens are arbitrary byte strings, so one can split a character."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        self.calls: list[int] = []

    def decode(self, ids, skip_special_tokens=False) -> str:
        ids = list(ids)
        self.calls.append(len(ids))
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _stream(pieces: list[bytes], stops=()) -> tuple[list[str], ByteTok]:
    tok = ByteTok(pieces)
    return list(stream_text(tok, range(len(pieces)), stop_strings=stops)), tok


def test_utf8_character_split_across_tokens_is_never_split():
    text = "né 😀 ok"
    raw = text.encode()
    pieces = [raw[i:i + 1] for i in range(len(raw))]  # one byte per token
    out, _ = _stream(pieces)
    assert "".join(out) == text
    assert all("\ufffd" not in p for p in out)
    assert "😀" in out  # the 4-byte emoji arrives whole, once


def test_streaming_decodes_a_short_window_per_token():
    pieces = [b"ab "] * 300
    out, tok = _stream(pieces)
    assert "".join(out) == "ab " * 300
    assert max(tok.calls) <= 2  # never the whole output


def test_stop_string_split_across_tokens():
    out, _ = _stream([b"Hel", b"lo ", b"EN", b"D! more"], stops=["END"])
    assert "".join(out) == "Hello "
    # a tail that only looked like a stop string is released
    out, _ = _stream([b"a", b"E", b"N", b"x", b"y"], stops=["END"])
    assert "".join(out) == "aENxy"
    assert out[0] == "a"  # "E" was held back until "x" resolved it


def test_stop_string_inside_one_token_and_first_of_several():
    out, _ = _stream([b"one two", b" three"], stops=["three", "two"])
    assert "".join(out) == "one "


def test_text_stream_pushes_pieces_in_order():
    ts = TextStream(ByteTok([b"x", "é".encode()[:1], "é".encode()[1:], b"y"]), ["zz"])
    assert [ts.push(i) for i in range(4)] == ["x", "", "é", "y"]
    assert ts.finish() == ""


@pytest.fixture(scope="module")
def tiny_lm(small_corpus) -> LoadedModel:
    tok = Tokenizer.train_bpe([small_corpus.read_text()[:50_000]], 300)
    model = _tiny("llama-tiny", n_kv_head=2, vocab_size=300)
    return LoadedModel(model, tok, name="tiny")


def test_loaded_model_stop_strings_and_kwargs(tiny_lm):
    free = tiny_lm.generate("HAMLET.", max_new_tokens=20, temperature=0)
    assert len(free) > 4
    stop = free[2:4]
    cut = tiny_lm.generate("HAMLET.", max_new_tokens=20, temperature=0, stop=[stop])
    assert cut == free[:free.index(stop)]
    sampled = tiny_lm.generate("HAMLET.", max_new_tokens=10, temperature=0.9, seed=3, min_p=0.05,
                               repetition_penalty=1.3)
    again = tiny_lm.generate("HAMLET.", max_new_tokens=10, temperature=0.9, seed=3, min_p=0.05,
                             repetition_penalty=1.3)
    assert sampled == again
    batch = tiny_lm.generate_batch(["HAMLET.", "To be"], max_new_tokens=20, temperature=0)
    assert batch[0] == free
    assert batch[1] == tiny_lm.generate("To be", max_new_tokens=20, temperature=0)


# ----------------------------------------------------------------------------- static decode

def test_static_step_equals_the_eager_cached_step():
    """septet.decode's step (write at a slot tensor, attend to all slots under a key mask)
    computes what the eager cached forward does, padding and per-row positions included."""
    from septet.inference.steps.compiled import _step

    model = _tiny("llama-tiny", n_kv_head=2)
    prompts = [[7, 8, 9], list(range(10, 20))]
    B, P, S = 2, 10, 24
    pad = torch.tensor([P - 3, 0])
    tokens = torch.zeros(B, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p)
    key_mask = torch.arange(S)[None] >= pad[:, None]  # (B, S)
    positions = (torch.arange(P)[None] - pad[:, None]).clamp(min=0)
    with torch.no_grad():
        eager, static = model.new_cache(B, S), model.new_cache(B, S)
        model(tokens, cache=eager, positions=positions, pad_mask=key_mask[:, :P])
        model(tokens, cache=static, positions=positions, pad_mask=key_mask[:, :P])
        nxt = torch.tensor([[11], [21]])
        for _ in range(6):
            pos = (eager.pos - pad)[:, None]
            ref = model(nxt, cache=eager, positions=pos, pad_mask=key_mask[:, :eager.pos + 1])[:, -1]
            got = _step(model, nxt, pos, key_mask, static.k, static.v, torch.tensor([static.pos]))
            static.advance(1)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            nxt = ref.argmax(-1, keepdim=True)
        n = eager.pos
        for a, b in zip(static.k + static.v, eager.k + eager.v):
            torch.testing.assert_close(a[:, :, :n], b[:, :, :n])


def test_static_decode_is_used_only_where_it_is_exact():
    from septet.inference.steps.compiled import supports_static_decode

    assert supports_static_decode(_tiny("llama-tiny"), 64)
    assert supports_static_decode(_tiny("palm-tiny"), 64)
    assert not supports_static_decode(_tiny("gpt3-tiny", window=8), 64)  # banded layers
    assert supports_static_decode(_tiny("gpt3-tiny", window=8), 8)  # the band covers the cache
    assert not supports_static_decode(_tiny("lamda-tiny"), 64)  # T5 relative bias


def test_compiled_generation_equals_eager():
    model = _tiny("llama-tiny", n_layer=1, n_kv_head=2)
    prompts = [[7, 8, 9], list(range(10, 20))]
    eager = generate_batch(model, prompts, Sampling(max_new_tokens=6, temperature=0))
    compiled = generate_batch(model, prompts, Sampling(max_new_tokens=6, temperature=0, compile=True))
    assert compiled == eager
    one = list(generate_ids(model, prompts[1], Sampling(max_new_tokens=6, temperature=0, compile=True)))
    assert one == eager[1]
    # other prompt lengths in the same cache bucket reuse the graph: no recompilation
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    for p in ([1, 2], list(range(30, 45))):
        got = list(generate_ids(model, p, Sampling(max_new_tokens=5, temperature=0, compile=True)))
        assert got == list(generate_ids(model, p, Sampling(max_new_tokens=5, temperature=0)))
    assert counters["stats"]["unique_graphs"] == before
