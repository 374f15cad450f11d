"""Byte-level BPE tokenizers, trained or loaded, behind one small class.

We wrap HF `tokenizers` (a fast Rust implementation) rather than hand-rolling BPE so
training on a few MB takes seconds and tokenizer.json files from real checkpoints load as-is.

Byte-level means the base alphabet is all 256 bytes: every string is encodable, nothing maps
to <unk>, and `decode(encode(s)) == s` for any unicode text (whitespace runs, CRLF, emoji).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from septet.errors import CheckpointError, ConfigError
from septet.fileio import atomic_write_text

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# End-of-text names used by common checkpoint families, tried in order by `from_hf`.
_EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class Tokenizer:
    """Text <-> token ids. Construct with `train_bpe`, `load` or `from_hf`."""

    def __init__(self, hf: tokenizers.Tokenizer, *, eot_token: str | None = EOT) -> None:
        self.hf = hf
        self.eot_token = eot_token

    # ------------------------------------------------------------------ construction

    @classmethod
    def train_bpe(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        split_digits: bool = False,
        special_tokens: Sequence[str] = (EOT,),
    ) -> "Tokenizer":
        """Train a byte-level BPE tokenizer on `texts` (deterministic for the same inputs).

        split_digits isolates every digit before BPE, as PaLM and LLaMA do, so numbers are
        spelled digit by digit and arithmetic sees consistent pieces.
        """
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        minimum = len(alphabet) + len(special_tokens)
        if vocab_size < minimum:
            raise ConfigError(
                f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum} "
                f"(256 bytes + {len(special_tokens)} special tokens); pass a larger vocab_size"
            )
        hf = tokenizers.Tokenizer(models.BPE())
        # add_prefix_space=False keeps the round trip exact: no space is invented at the start.
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if split_digits:
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        else:
            hf.pre_tokenizer = byte_level
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            initial_alphabet=alphabet,
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        eot = EOT if EOT in special_tokens else (special_tokens[0] if special_tokens else None)
        return cls(hf, eot_token=eot)

    @classmethod
    def from_hf(cls, hf: tokenizers.Tokenizer, *, eot_token: str | None = None) -> "Tokenizer":
        """Wrap an existing HF tokenizer; eot_token=None picks the first known end-of-text name."""
        if eot_token is None:
            eot_token = next((t for t in _EOT_CANDIDATES if hf.token_to_id(t) is not None), None)
        return cls(hf, eot_token=eot_token)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer.json, or the tokenizer.json inside a checkpoint directory."""
        file = _resolve(path)
        if not file.is_file():
            raise CheckpointError(
                f"tokenizer file '{file}' does not exist; "
                "pass a tokenizer.json or a checkpoint directory containing one"
            )
        try:
            text = file.read_text(encoding="utf-8")
            json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"tokenizer file '{file}' is not valid JSON ({e}); re-save or re-download it") from e
        try:
            hf = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception for schema errors
            raise CheckpointError(
                f"tokenizer file '{file}' is JSON but not a tokenizers tokenizer ({e}); re-save or re-download it"
            ) from e
        return cls.from_hf(hf)

    # ------------------------------------------------------------------ use

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no BOS/EOS templates; callers place <|endoftext|> themselves.
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel on the Rust side (much faster than a Python loop)."""
        texts = list(texts)
        fast = getattr(self.hf, "encode_batch_fast", None)  # skips offset tracking; newer versions
        encs = (fast or self.hf.encode_batch)(texts, add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        # Specials are kept by default so decode(encode(s)) == s even when s contains one.
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token, the document separator in packed streams."""
        tid = self.hf.token_to_id(self.eot_token) if self.eot_token else None
        if tid is None:
            raise ConfigError(
                f"tokenizer has no end-of-text token (looked for {self.eot_token or list(_EOT_CANDIDATES)}); "
                "train with special_tokens including '<|endoftext|>' or pass eot_token"
            )
        return tid

    # ------------------------------------------------------------------ persistence

    def to_json_str(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write tokenizer.json (into `path` itself, or inside it if it is a directory)."""
        file = _resolve(path)
        atomic_write_text(file, self.to_json_str())
        return file

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_json_str() == other.to_json_str()

    __hash__ = None  # type: ignore[assignment]  # mutable wrapper; equality is by content

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_token={self.eot_token!r})"


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / TOKENIZER_FILE if p.is_dir() else p
