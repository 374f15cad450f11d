"""Byte-level BPE: lossless round trips, digit splitting, persistence, determinism."""

from __future__ import annotations

import json
import random

import pytest
import tokenizers

from septet.errors import CheckpointError, ConfigError
from septet.tokenizer import Tokenizer


def _corpus(seed: int = 0, n: int = 400) -> list[str]:
    """English-ish lines full of numbers, so BPE learns multi-digit merges when allowed."""
    rng = random.Random(seed)
    words = "the king shall speak of love and war in the year at noon to his lord".split()
    lines = []
    for _ in range(n):
        line = " ".join(rng.choice(words) for _ in range(8))
        lines.append(f"{line} 12345 {rng.randint(0, 99999)} 2023 {rng.randint(100, 999)}.\n")
    return ["".join(lines[i : i + 20]) for i in range(0, n, 20)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(_corpus(), vocab_size=400)


TRICKY = [
    "",
    "hello world",
    "  leading and trailing spaces   ",
    "multiple     spaces\tand\t\ttabs",
    "windows\r\nline\r\nendings\r\n",
    "\n\n\nblank lines\n\n",
    "emoji 🎉🙂👍🏽 and ZWJ 👨‍👩‍👧",
    "CJK 日本語の文章と中文",
    "accents: café naïve Ærø",
    "control \x00\x01\x7f and U+2028 \u2028 here",
    "<|endoftext|> inside text",
    "12345 and 3.14159",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_batch_matches_single(tok):
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_special_token_and_sizes(tok):
    assert tok.eot_id == tok.token_to_id("<|endoftext|>")
    assert 256 < tok.vocab_size <= 400
    assert all(0 <= i < tok.vocab_size for i in tok.encode("".join(TRICKY)))


def test_digit_splitting():
    corpus = _corpus()
    split = Tokenizer.train_bpe(corpus, vocab_size=400, split_digits=True)
    merged = Tokenizer.train_bpe(corpus, vocab_size=400, split_digits=False)
    assert len(split.encode("12345")) == 5
    assert len(merged.encode("12345")) < 5
    assert split.decode(split.encode("x 12345 y")) == "x 12345 y"


def test_deterministic():
    a = Tokenizer.train_bpe(_corpus(), vocab_size=400, split_digits=True)
    b = Tokenizer.train_bpe(iter(_corpus()), vocab_size=400, split_digits=True)
    assert a.to_json_str() == b.to_json_str()


def test_save_load(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(path)
    assert loaded == tok
    assert loaded.eot_id == tok.eot_id
    assert Tokenizer.load(tmp_path) == tok  # a checkpoint directory works too
    text = "round trip after load 🎉\r\n"
    assert loaded.encode(text) == tok.encode(text)


def test_from_hf(tok):
    hf = tokenizers.Tokenizer.from_str(tok.to_json_str())
    wrapped = Tokenizer.from_hf(hf)
    assert wrapped.eot_id == tok.eot_id and wrapped == tok


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="bad.json.*not valid JSON"):
        Tokenizer.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(CheckpointError, match="wrong.json.*not a tokenizers tokenizer"):
        Tokenizer.load(wrong)


def test_vocab_too_small():
    with pytest.raises(ConfigError, match="vocab_size=100"):
        Tokenizer.train_bpe(["abc"], vocab_size=100)


def test_missing_eot_is_clear():
    t = Tokenizer.train_bpe(["abc abc"], vocab_size=300, special_tokens=())
    with pytest.raises(ConfigError, match="end-of-text"):
        _ = t.eot_id
