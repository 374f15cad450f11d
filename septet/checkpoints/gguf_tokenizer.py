"""Rebuild a checkpoint's tokenizer from GGUF metadata (`tokenizer.ggml.*`).

A GGUF carries no tokenizer.json: only the vocabulary, the merges (or scores), per-token types
and a pre-tokenizer name. We rebuild an HF `tokenizers.Tokenizer` that tokenizes the way
llama.cpp does, per `tokenizer.ggml.model`:
- 'gpt2': split text with llama.cpp's regex chain for the pre-tokenizer name (each regex applied
  in turn to the pieces the previous one left, matches kept as pieces of their own), then
  byte-level BPE;
- 'llama' (SentencePiece): spaces as U+2581 with one prepended, score-ordered merges, byte fallback;
- 'gemma4': spaces as U+2581, lines split off, BPE over raw UTF-8 pieces, byte fallback.
Other types (bert/WPM, t5/UGM, rwkv, ...) raise CheckpointError naming the type. Checked against
llama.cpp's own reference tokenizations by tests/test_conformance.py.

Token types (llama.cpp): 1 normal, 2 unknown, 3 control (`<|im_start|>`: special, matched
whole in text), 4 user-defined (matched whole, not special), 5 unused, 6 byte.
"""

from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

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
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"  # CJK ideographs, kana and more, Hangul
_DEEPSEEK_LLM = (
    r"[\r\n]",
    r"\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    r"\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    r"\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    r"\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    r"\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    r"\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    r"\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    r"\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    r"\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    r"\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\x{10400}-\x{1044f}\x{104b0}-\x{104d3}\x{104d8}-\x{104fb}"
    r"\x{10c80}-\x{10cb2}\x{10cc0}-\x{10cf2}\x{118a0}-\x{118df}\x{1e900}-\x{1e943}]+",
    r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")

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
    "qwen35": ((_QWEN35,), False),
    "gpt-4o": ((_GPT4O,), False),
    "falcon": (_FALCON, False),
    "deepseek-llm": (_DEEPSEEK_LLM, False),
    "deepseek-coder": (_DEEPSEEK_CODER, False),
}
CONTROL, USER_DEFINED = 3, 4
SPACE = "\u2581"  # SentencePiece's visible space
# tokenizer.ggml.model values we rebuild; the rest (bert/WPM, t5/UGM, rwkv, ...) raise CheckpointError
TOKENIZER_TYPES = ("gpt2", "llama", "gemma4")
_SUPPORTED_TYPES = "byte-level BPE ('gpt2'), SentencePiece BPE ('llama') and Gemma 4 BPE ('gemma4')"


def _where(source: str) -> str:
    return f"GGUF file '{source}'" if source else "GGUF metadata"


def _bad(source: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{_where(source)}: {msg}; re-download it (`septet fetch smollm2` for the bundled model)")


def _token_id(meta: dict[str, Any], key: str, n: int, source: str) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        raise _bad(source, f"metadata '{key}' is {v!r}, not a token id below {n}")
    return v


def tokenizer_from_gguf(
    meta: dict[str, Any], *, source: str = ""
) -> tuple[Tokenizer, int | None, tuple[int, ...], bool]:
    """(Tokenizer, bos_id, eos_ids, add_bos) from a GGUF's metadata dict."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise _bad(source, "metadata 'tokenizer.ggml.model' is missing (a GGUF without a tokenizer)")
    if kind not in TOKENIZER_TYPES:
        raise CheckpointError(f"{_where(source)}: tokenizer type {kind!r} (metadata 'tokenizer.ggml.model') "
                              f"is not supported yet; septet reads {_SUPPORTED_TYPES} GGUF tokenizers")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise _bad(source, "metadata 'tokenizer.ggml.tokens' is missing or not a list of strings")
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * n
    if not isinstance(types, list) or len(types) != n:
        raise _bad(source, f"metadata 'tokenizer.ggml.token_type' has {len(types)} entries for {n} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicate spelling keeps its first id, as llama.cpp does

    if kind == "gpt2":
        hf, default_bos = _byte_level_bpe(meta, vocab, source)
    elif kind == "llama":
        hf, default_bos = _sentencepiece_bpe(meta, tokens, types, vocab, source)
    else:  # "gemma4"
        hf, default_bos = _raw_bpe(meta, vocab, source)

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
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<turn|>"):
        tid = vocab.get(name)
        if tid is not None and tid not in eos and types[tid] == CONTROL:
            eos.append(tid)
    add_bos = meta.get("tokenizer.ggml.add_bos_token", default_bos and bos is not None)
    if kind == "gemma4":
        add_bos = True  # llama.cpp overrides the flag for Gemma 4
    if not isinstance(add_bos, bool):
        raise _bad(source, f"metadata 'tokenizer.ggml.add_bos_token' is {add_bos!r}, not a bool")
    if add_bos and bos is None:
        raise _bad(source, "metadata asks to add a BOS token but 'tokenizer.ggml.bos_token_id' is missing")
    tok = Tokenizer.from_hf(hf)
    return tok, bos, tuple(eos), bool(add_bos)


def _merges(meta: dict[str, Any], vocab: dict[str, int], source: str, *, split_from: int = 0) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges as pairs; split_from=1 splits at the first space after the first character
    (Gemma 4 pieces may begin with a space)."""
    merges_raw = meta.get("tokenizer.ggml.merges") or []
    if not isinstance(merges_raw, list):
        raise _bad(source, "metadata 'tokenizer.ggml.merges' is not a list")
    merges: list[tuple[str, str]] = []
    for i, m in enumerate(merges_raw):
        cut = m.find(" ", split_from) if isinstance(m, str) else -1
        parts = (m[:cut], m[cut + 1:]) if cut > 0 else ()
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise _bad(source, f"merge #{i} {m!r} is not two vocabulary tokens separated by one space")
        merges.append(parts)
    return merges


def _bpe_model(vocab: dict[str, int], merges: list[tuple[str, str]], source: str, **kw: Any) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer(models.BPE(vocab, merges, **kw))
    except Exception as e:  # the Rust side raises bare Exceptions
        raise _bad(source, f"vocabulary and merges do not form a BPE model ({e})") from None


def _byte_level_bpe(meta: dict[str, Any], vocab: dict[str, int], source: str) -> tuple[tokenizers.Tokenizer, bool]:
    """'gpt2': the pre-tokenizer's regex chain, then BPE over GPT-2's byte-to-unicode alphabet."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{_where(source)}: pre-tokenizer {pre!r} (metadata 'tokenizer.ggml.pre') is not "
                              f"supported yet; known: {', '.join(sorted(PRE_TOKENIZERS))}")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    hf = _bpe_model(vocab, _merges(meta, vocab, source), source, ignore_merges=ignore_merges)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf, ignore_merges  # llama.cpp adds BOS by default for the llama3 family


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[Any], vocab: dict[str, int],
                       source: str) -> tuple[tokenizers.Tokenizer, bool]:
    """'llama' (SentencePiece BPE, as llama.cpp runs it): spaces become U+2581, one is prepended to
    each stretch of text (add_space_prefix), then adjacent pieces merge greedily, the pair whose
    merged piece has the highest score first (leftmost on ties), and characters outside the
    vocabulary fall back to <0xXX> byte tokens.

    HF BPE applies merges by rank, so we derive every (left, right) split of every piece whose
    halves are both pieces, ranked by the merged piece's score: the same merges in the same order.
    (Two different pieces with exactly equal scores rank by token id here, by position in
    llama.cpp; SentencePiece vocabularies give their normal pieces distinct scores.)
    """
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise CheckpointError(f"{_where(source)}: tokenizer type 'llama' (SentencePiece) without metadata "
                              "'tokenizer.ggml.scores' is not supported yet; the merge order comes from the scores")
    if not isinstance(scores, list) or len(scores) != len(tokens) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        raise _bad(source, f"metadata 'tokenizer.ggml.scores' is not {len(tokens)} numbers")
    ranked: list[tuple[float, int, int, str, str]] = []
    for tid, piece in enumerate(tokens):
        if vocab.get(piece) != tid or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[tid]), tid, cut, left, right))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]
    hf = _bpe_model(vocab, merges, source, byte_fallback=True, unk_token=_unk(meta, tokens))
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    if not isinstance(add_prefix, bool):
        raise _bad(source, f"metadata 'tokenizer.ggml.add_space_prefix' is {add_prefix!r}, not a bool")
    steps = [normalizers.Prepend(SPACE)] if add_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    hf.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    return hf, True


def _raw_bpe(meta: dict[str, Any], vocab: dict[str, int], source: str) -> tuple[tokenizers.Tokenizer, bool]:
    """'gemma4': spaces become U+2581, text splits into lines and runs of newlines, then BPE with
    the file's merges over raw UTF-8 pieces (no byte-to-unicode mapping), <0xXX> byte fallback.
    llama.cpp also looks a run of newlines up whole before merging; plain BPE reaches every
    newline-run token of the published vocabulary through its merges, so no special case here."""
    hf = _bpe_model(vocab, _merges(meta, vocab, source, split_from=1), source, byte_fallback=True,
                    unk_token=None, ignore_merges=False)
    hf.normalizer = normalizers.Replace(" ", SPACE)
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), behavior="isolated")
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return hf, True


def _unk(meta: dict[str, Any], tokens: list[str]) -> str | None:
    uid = meta.get("tokenizer.ggml.unknown_token_id")
    return tokens[uid] if isinstance(uid, int) and not isinstance(uid, bool) and 0 <= uid < len(tokens) else None


__all__ = ["PRE_TOKENIZERS", "TOKENIZER_TYPES", "tokenizer_from_gguf"]
