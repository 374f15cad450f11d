"""Corpus loading, packing and the resumable PackedBatches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from septet.data.corpus import corpus_fingerprint, load_documents
from septet.data.packing import PackedBatches, PackedCorpus, cached_pack, iter_eval_batches, pack_documents
from septet.errors import ConfigError, DataError
from septet.tokenizer import Tokenizer

# ------------------------------------------------------------------------------- corpus


def test_load_file_dir_and_jsonl(tmp_path):
    (tmp_path / "b.txt").write_text("second\r\nline", encoding="utf-8")
    (tmp_path / "a.md").write_bytes("\ufefffirst 🎉".encode("utf-8"))  # BOM is dropped
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.jsonl").write_text(
        json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth\u2028x"}, ensure_ascii=False) + "\n"
    )
    (tmp_path / "ignored.csv").write_text("no")
    (tmp_path / ".hidden.txt").write_text("no")

    assert load_documents(str(tmp_path / "b.txt")) == ["second\r\nline"]
    assert load_documents(str(sub / "c.jsonl")) == ["third", "fourth\u2028x"]
    assert load_documents(str(tmp_path)) == ["first 🎉", "second\r\nline", "third", "fourth\u2028x"]


def test_missing_path_and_empty_corpus(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"data path '{missing}' does not exist; pass --data"):
        load_documents(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\t ")
    with pytest.raises(DataError, match=f"corpus '{empty}' is empty"):
        load_documents(str(empty))
    with pytest.raises(DataError, match="is empty"):
        load_documents(str(empty / "blank.txt"))


def test_bad_jsonl_line_and_encoding(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        load_documents(str(f))
    f.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r'd\.jsonl:2: expected an object with a string field "text"'):
        load_documents(str(f))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\ncaf\xe9")
    with pytest.raises(DataError, match=r"latin\.txt' is not valid UTF-8 \(line 2"):
        load_documents(str(latin))
    odd = tmp_path / "data.csv"
    odd.write_text("x")
    with pytest.raises(DataError, match="unsupported suffix"):
        load_documents(str(odd))


def test_fingerprint():
    assert corpus_fingerprint(["ab", "c"]) != corpus_fingerprint(["a", "bc"])
    assert corpus_fingerprint(["x"]) == corpus_fingerprint(iter(["x"]))


# ------------------------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(["to be or not to be, that is the question. " * 20], vocab_size=300)


def test_pack_separators_and_val_split(tok):
    docs = ["alpha beta gamma " * 20, "delta epsilon " * 40, "x"]
    packed = pack_documents(docs, tok, val_fraction=0.1)
    eot = tok.eot_id
    assert packed.train.dtype == np.uint16 and packed.val.dtype == np.uint16
    ids = tok.encode_batch(docs)
    expected_train, expected_val = [], []
    for d in ids:
        n_val = int(len(d) * 0.1)
        expected_train += [eot] + d[: len(d) - n_val]
        if n_val:
            expected_val += [eot] + d[len(d) - n_val :]
    assert packed.train.tolist() == expected_train
    assert packed.val.tolist() == expected_val
    assert int((packed.train == eot).sum()) == 3 and int((packed.val == eot).sum()) == 2  # "x" is too short
    # the two splits together hold every token of every document exactly once
    assert len(packed.train) + len(packed.val) == sum(len(d) for d in ids) + 5
    assert pack_documents(docs, tok, val_fraction=0.1).train.tolist() == expected_train  # deterministic


def test_check_reports_counts(tok):
    packed = PackedCorpus(train=np.arange(100, dtype=np.uint16), val=np.arange(10, dtype=np.uint16))
    packed.check(seq_len=9)
    with pytest.raises(DataError, match="validation split has 10 tokens but seq_len=16 needs at least 17"):
        packed.check(seq_len=16)
    with pytest.raises(DataError, match="training split has 100 tokens .* needs at least 161"):
        packed.check(seq_len=8, batch_size=20)


def test_cached_pack(tok, tmp_path):
    docs = ["some words here " * 30, "and more words " * 30]
    first = cached_pack(docs, tok, tmp_path, val_fraction=0.05)
    entries = list(tmp_path.glob("pack-*"))
    assert len(entries) == 1
    second = cached_pack(docs, tok, tmp_path, val_fraction=0.05)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert isinstance(second.train, np.memmap)  # served from disk
    cached_pack(docs, tok, tmp_path, val_fraction=0.1)
    assert len(list(tmp_path.glob("pack-*"))) == 2


# ------------------------------------------------------------------------------- batches

TOKENS = np.arange(1000, dtype=np.uint16)  # token value == position, so windows are easy to read


def _take(b: PackedBatches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [b.next_batch() for _ in range(n)]


def test_batches_are_shifted_windows():
    b = PackedBatches(TOKENS, seq_len=10, batch_size=4, seed=0)
    x, y = b.next_batch()
    assert x.dtype == torch.int64 and x.shape == (4, 10) and y.shape == (4, 10)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.all(x[:, 0] % 10 == 0)  # windows start on multiples of seq_len
    assert torch.equal(y, x + 1)


def test_determinism_and_seed():
    a = _take(PackedBatches(TOKENS, 10, 4, seed=1), 5)
    b = _take(PackedBatches(TOKENS, 10, 4, seed=1), 5)
    c = _take(PackedBatches(TOKENS, 10, 4, seed=2), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_every_window_once_per_epoch():
    b = PackedBatches(TOKENS, seq_len=10, batch_size=4, seed=3)
    assert b.n_windows == 99 and b.batches_per_epoch == 24  # 3 tail windows skipped per epoch
    for epoch in range(2):
        starts = torch.cat([x[:, 0] for x, _ in _take(b, b.batches_per_epoch)]).tolist()
        assert len(set(starts)) == len(starts) == 96
        assert b.state_dict()["epoch"] == epoch + 1


def test_resume_from_state_dict():
    a = PackedBatches(TOKENS, 10, 4, seed=5)
    _take(a, 30)  # crosses an epoch boundary
    state = a.state_dict()
    assert state == {"epoch": 1, "batch_in_epoch": 6, "seed": 5}
    expected = _take(a, 40)
    b = PackedBatches(TOKENS, 10, 4, seed=999)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(expected, _take(b, 40)))


def test_skip_equals_next():
    a, b = PackedBatches(TOKENS, 10, 4, seed=7), PackedBatches(TOKENS, 10, 4, seed=7)
    _take(a, 37)
    b.skip(37)
    assert a.state_dict() == b.state_dict()
    assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_ranks_concatenate_to_global_batch():
    one = PackedBatches(TOKENS, 10, 4, seed=11)
    ranks = [PackedBatches(TOKENS, 10, 4, seed=11, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):
        x, y = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert parts[0][0].shape == (2, 10)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_packed_batches_config_errors():
    with pytest.raises(ConfigError, match="not divisible by world_size=3"):
        PackedBatches(TOKENS, 10, 4, seed=0, world_size=3)
    with pytest.raises(DataError, match="has 50 tokens"):
        PackedBatches(TOKENS[:50], 10, 8, seed=0)


def test_global_rng_untouched():
    torch.manual_seed(0)
    np.random.seed(0)
    expected_t, expected_n = torch.rand(1), np.random.rand()
    torch.manual_seed(0)
    np.random.seed(0)
    _take(PackedBatches(TOKENS, 10, 4, seed=0), 30)
    assert torch.equal(torch.rand(1), expected_t) and np.random.rand() == expected_n


def test_eval_batches_in_order():
    batches = list(iter_eval_batches(TOKENS[:95], seq_len=10, batch_size=4))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 1]  # 9 windows; last batch is partial
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == list(range(0, 90, 10))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(list(iter_eval_batches(TOKENS, 10, 4, max_batches=2))) == 2


def test_default_corpus_reads_asset_files_sorted(tmp_path, monkeypatch):
    import septet.assets

    (tmp_path / "b_gut.txt").write_text("bee")
    (tmp_path / "a_gut.txt").write_text("ay")
    (tmp_path / ".septet-asset.json").write_text("{}")
    monkeypatch.setattr(septet.assets, "fetch", lambda name, **kw: tmp_path)
    assert load_documents(None) == ["ay", "bee"]
    assert load_documents("shakespeare") == ["ay", "bee"]
