"""Conformance against llama.cpp's own reference files (asset `llama-cpp-vocabs`, ~77 MB once
per SEPTET_HOME).

Tokenizers: llama.cpp ships vocab-only GGUFs (`ggml-vocab-<name>.gguf`) with `.inp` (inputs
separated by a `__ggml_vocab_test__` line) and `.out` (the token ids llama.cpp produces, one
line per input). Its `tests/test-tokenizer-0.cpp` tokenizes with add_special=false (no BOS/EOS)
and parse_special=false (control tokens in the text are plain text; user-defined tokens still
match). We rebuild each tokenizer from the GGUF metadata with `tokenizer_from_gguf` and demand
every input encode to exactly the reference ids; a type septet does not read must raise a
CheckpointError naming it.

Chat templates: every `templates/*.jinja` must render a standard conversation with
`render_chat`. Templates may refuse a system message (raise_exception) or need a variable of
their own (firefunction's `functions`); both are retried and recorded, and the recorded sets are
pinned, since the asset is pinned too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from septet import assets
from septet.chat_template import ChatTemplateError, render_chat
from septet.checkpoints.gguf import read_gguf
from septet.checkpoints.gguf_tokenizer import PRE_TOKENIZERS, TOKENIZER_TYPES, tokenizer_from_gguf
from septet.errors import CheckpointError

SEP = "\n__ggml_vocab_test__\n"
# every ggml-vocab-*.gguf in llama-cpp-python 0.3.36 that has .inp/.out reference files
VOCABS = ("bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2", "llama-bpe",
          "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder")
UNSUPPORTED = {"bert-bge": "bert"}  # WordPiece: septet raises a CheckpointError naming the type


@pytest.fixture(scope="module")
def llama_cpp_dir(septet_home) -> Path:
    if os.environ.get("SEPTET_OFFLINE") == "1" and not assets.is_fetched("llama-cpp-vocabs"):
        pytest.skip("SEPTET_OFFLINE=1 and asset 'llama-cpp-vocabs' is not in SEPTET_HOME")
    return assets.fetch("llama-cpp-vocabs", progress=False, quiet=True)


def read_cases(gguf: Path) -> list[tuple[str, list[int]]]:
    """(input text, reference ids) pairs, parsed the way test-tokenizer-0.cpp parses them."""
    raw = gguf.with_name(gguf.name + ".inp").read_bytes().decode("utf-8")
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    lines = gguf.with_name(gguf.name + ".out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":  # getline yields no line after the final newline
        lines.pop()
    assert len(inputs) == len(lines), f"{gguf.name}: {len(inputs)} inputs but {len(lines)} outputs"
    return [(s, [int(t) for t in line.split()]) for s, line in zip(inputs, lines)]


def test_asset_holds_the_expected_vocabs(llama_cpp_dir):
    with_refs = sorted(p.name[len("ggml-vocab-"):-len(".gguf.inp")]
                       for p in llama_cpp_dir.glob("ggml-vocab-*.gguf.inp"))
    assert tuple(with_refs) == VOCABS
    assert len(list((llama_cpp_dir / "templates").glob("*.jinja"))) >= 60


@pytest.mark.parametrize("name", VOCABS)
def test_tokenizer_matches_llama_cpp(llama_cpp_dir, name):
    path = llama_cpp_dir / f"ggml-vocab-{name}.gguf"
    meta = read_gguf(path).metadata
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get(
        "tokenizer.ggml.pre", "default" if meta.get("tokenizer.ggml.model") == "gpt2" else "-")
    cases = read_cases(path)
    assert cases
    supported = kind in TOKENIZER_TYPES and (kind != "gpt2" or pre in PRE_TOKENIZERS)
    assert supported == (name not in UNSUPPORTED), f"{name} ({kind}/{pre}): support changed, update UNSUPPORTED"
    if not supported:
        with pytest.raises(CheckpointError) as info:
            tokenizer_from_gguf(meta, source=str(path))
        msg = str(info.value)
        assert f"'{kind}'" in msg and "not supported" in msg and path.name in msg, msg
        print(f"\n{name}: {kind}/{pre} unsupported, raises: {msg}")
        return

    tok, bos, eos, add_bos = tokenizer_from_gguf(meta, source=str(path))
    tok.hf.encode_special_tokens = True  # parse_special=false: control tokens in text are plain text
    failures = []
    for text, ref in cases:
        got = tok.encode(text)
        if got != ref:
            failures.append(f"{text[:40]!r}: expected {ref[:12]}, got {got[:12]}")
        elif tok.decode(got) != text:
            failures.append(f"{text[:40]!r}: decodes to {tok.decode(got)[:40]!r}")
    print(f"\n{name}: {kind}/{pre} {len(cases) - len(failures)}/{len(cases)} match llama.cpp")
    assert not failures, (f"{name} ({kind}/{pre}): {len(cases) - len(failures)}/{len(cases)} match; "
                          + "; ".join(failures[:5]))
    assert bos is None or 0 <= bos < tok.vocab_size
    assert all(0 <= e < tok.vocab_size for e in eos) and isinstance(add_bos, bool)


# ------------------------------------------------------------------------------ chat templates

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hello there."},
    {"role": "assistant", "content": "Hi! What do you need?"},
    {"role": "user", "content": "Name one prime number."},
]
# What the pinned templates need beyond HF's standard context (tools=None, documents=None), as
# found by the retries below: no system message, tools as a list (tool-use-only templates
# iterate it unconditionally), or a variable of their own.
REJECTS_SYSTEM = {"google-gemma-2-2b-it.jinja"}
NEEDS_TOOL_LIST = {"CohereForAI-c4ai-command-r-plus-tool_use.jinja",
                   "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
                   "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja"}
NEEDS_VARIABLES = {"fireworks-ai-llama-3-firefunction-v2.jinja": {"datetime", "functions"}}
_UNDEFINED = re.compile(r"'(\w+)' is undefined")


def _render(source: str, name: str, messages: list[dict], extra: dict) -> tuple[str, set[str]]:
    """Render, supplying "" for any variable the template needs but HF does not pass; returns
    (text, names supplied)."""
    supplied: dict[str, str] = {}
    while True:
        try:
            text = render_chat(source, messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>",
                               name=name, **{"tools": None, "documents": None, **extra, **supplied})
            return text, set(supplied)
        except ChatTemplateError as e:
            missing = _UNDEFINED.search(str(e))
            if not missing or missing.group(1) in supplied or len(supplied) >= 4:
                raise
            supplied[missing.group(1)] = ""


def test_every_chat_template_renders(llama_cpp_dir):
    templates = sorted((llama_cpp_dir / "templates").glob("*.jinja"))
    rendered, no_system, tool_list, needs, errors = 0, set(), set(), {}, []
    for path in templates:
        source = path.read_text(encoding="utf-8")
        variants = [{}] + ([{"enable_thinking": False}, {"enable_thinking": True}]
                           if "enable_thinking" in source else [])
        try:
            for extra in variants:
                messages = CONVERSATION
                if path.name in tool_list:
                    extra = {**extra, "tools": []}
                try:
                    text, supplied = _render(source, path.name, messages, extra)
                except ChatTemplateError as e:
                    if "rejected the conversation" in str(e):
                        messages = CONVERSATION[1:]  # a template that takes no system message
                        no_system.add(path.name)
                    elif "'NoneType' object is not iterable" in str(e) and "tools" not in extra:
                        extra = {**extra, "tools": []}  # a tool-use template: it needs a tool list
                        tool_list.add(path.name)
                    else:
                        raise
                    text, supplied = _render(source, path.name, messages, extra)
                if supplied:
                    needs[path.name] = supplied
                lost = [m["content"] for m in messages if m["content"] not in text]
                assert not lost, f"{path.name} {extra}: rendered text lacks {lost}"
            rendered += 1
        except (ChatTemplateError, AssertionError) as e:
            errors.append(f"{path.name}: {e}")
    print(f"\nchat templates: {rendered}/{len(templates)} render; without system message: {sorted(no_system)}; "
          f"with tools=[]: {sorted(tool_list)}; given extra variables: {needs}")
    assert not errors, f"{rendered}/{len(templates)} templates render; " + " | ".join(errors[:5])
    assert no_system == REJECTS_SYSTEM
    assert tool_list == NEEDS_TOOL_LIST
    assert needs == NEEDS_VARIABLES
