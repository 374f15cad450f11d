"""Chat: the conversation loop, history trimming to the context window, commands, and a
real answer from the default model."""

from __future__ import annotations

import io
import json

import pytest

from septet.api import LoadedModel
from septet.chat import ChatSession, run_repl
from septet.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_lm(chat_lm) -> LoadedModel:
    return chat_lm


def test_history_is_trimmed_oldest_first(tiny_lm):
    s = ChatSession(tiny_lm, system="Be brief.", max_new_tokens=8, temperature=0)
    for i in range(12):
        "".join(s.reply(f"question number {i} about the king of Denmark"))
    ids = s.prompt_ids()
    assert len(ids) <= 160 - 8
    contents = [t["content"] for t in s.turns]
    assert "question number 11 about the king of Denmark" in contents
    assert "question number 0 about the king of Denmark" not in contents  # dropped first
    assert s.messages(s.turns)[0] == {"role": "system", "content": "Be brief."}  # kept


def test_a_message_too_long_for_the_context_is_refused(tiny_lm):
    s = ChatSession(tiny_lm, max_new_tokens=8)
    with pytest.raises(ConfigError, match="shorten it"):
        "".join(s.reply("Denmark " * 400))


def test_repl_commands(tiny_lm):
    s = ChatSession(tiny_lm, max_new_tokens=4, temperature=0)
    lines = iter(["hello", "/system You are Hamlet.", "/bogus", "hi", "/reset", "/quit", "never read"])
    out = io.StringIO()
    run_repl(s, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "system prompt set" in text and "unknown command /bogus" in text
    assert "conversation cleared" in text
    assert s.turns == [] and s.system == "You are Hamlet."


def test_ctrl_c_stops_the_answer_not_the_chat(tiny_lm, monkeypatch):
    s = ChatSession(tiny_lm, max_new_tokens=50, temperature=1.0, seed=0)
    original = s.lm.stream_ids

    def interrupted(ids, **kw):
        for i, piece in enumerate(original(ids, **kw)):
            if i == 3:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(s.lm, "stream_ids", interrupted)
    lines = iter(["first", "/quit"])
    out = io.StringIO()
    run_repl(s, read=lambda prompt: next(lines), out=out)
    assert "[stopped]" in out.getvalue()
    assert [t["role"] for t in s.turns] == ["user", "assistant"]


def test_smollm2_answers_paris(capsys, monkeypatch):
    from septet.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    assert main(["chat", "--model", "smollm2", "--json", "--temperature", "0", "--max-new-tokens", "20"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["assistant"]
    assert "Paris" in answer


# --- sampling defaults from the model, the repetition guard ------------------------------

def test_sampling_defaults_come_from_the_model_and_explicit_values_win(tiny_lm, monkeypatch):
    from septet.chat import FALLBACK

    assert ChatSession(tiny_lm).sampling["temperature"] == FALLBACK["temperature"]  # it has none
    monkeypatch.setattr(tiny_lm, "generation_defaults", {"temperature": 0.2, "top_p": 0.9}, raising=False)
    s = ChatSession(tiny_lm)
    assert (s.sampling["temperature"], s.sampling["top_p"]) == (0.2, 0.9)
    assert "temperature 0.2, top-p 0.9, repetition guard on" == s.describe()
    s = ChatSession(tiny_lm, temperature=0, top_p=0.5)
    assert (s.sampling["temperature"], s.sampling["top_p"]) == (0, 0.5)


def test_the_cli_leaves_sampling_to_the_model_unless_asked():
    from septet.cli import build_parser

    args = build_parser().parse_args(["chat"])
    assert args.temperature is None and args.top_p is None and args.repetition_guard
    args = build_parser().parse_args(["chat", "--temperature", "0.9", "--no-repetition-guard"])
    assert args.temperature == 0.9 and not args.repetition_guard
    args = build_parser().parse_args(["generate", "--model", "m"])
    assert args.temperature is None and args.top_p is None and args.top_k is None


def test_the_guard_ends_a_looping_answer_and_keeps_one_copy(tiny_lm, monkeypatch):
    loop = ["Oui", "!"] + [" Le", " mart", "eau", "."] * 50  # constructed: the reported loop's shape

    monkeypatch.setattr(tiny_lm, "stream_ids", lambda ids, **kw: iter(loop))
    s = ChatSession(tiny_lm, max_new_tokens=8)
    streamed = "".join(s.reply("What is the capital of France?"))
    assert s.stopped_repeating and streamed == "Oui!" + " Le marteau." * 4  # 4 copies of a 4-gram
    assert s.turns[-1] == {"role": "assistant", "content": "Oui! Le marteau."}
    s = ChatSession(tiny_lm, max_new_tokens=8, repetition_guard=False)
    assert "".join(s.reply("again")) == "".join(loop) and not s.stopped_repeating
    out = io.StringIO()
    lines = iter(["hello", "/quit"])
    run_repl(ChatSession(tiny_lm, max_new_tokens=8), read=lambda prompt: next(lines), out=out)
    assert "[stopped: the answer repeats itself]" in out.getvalue()


def test_generation_defaults_are_read_from_the_checkpoint_else_the_registry(tmp_path):
    from septet.errors import CheckpointError
    from septet.generation_config import from_asset, from_gguf_metadata, from_hf_dir, generation_defaults

    hf = tmp_path / "hf"
    hf.mkdir()
    assert from_hf_dir(hf) == {} and generation_defaults(from_hf_dir(hf)) == {}
    (hf / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50, "eos_token_id": 2}))
    found = from_hf_dir(hf)
    assert generation_defaults(found, "smollm2") == {"temperature": 0.6, "top_p": 0.9, "top_k": 50}
    (hf / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert from_hf_dir(hf) == {"temperature": 0.0}  # greedy, as transformers decodes it
    (hf / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    with pytest.raises(CheckpointError, match="'temperature' must be a number"):
        from_hf_dir(hf)
    assert from_gguf_metadata({"general.sampling.temp": 0.8, "general.sampling.top_k": -1,
                               "general.name": "x"}) == {"temperature": 0.8, "top_k": 0}
    assert from_asset("smollm2") == {"temperature": 0.2, "top_p": 0.9}  # the model card's values
    assert from_asset("shakespeare") == {} and from_asset("no-such-asset") == {}
    assert generation_defaults({}, "smollm2") == {"temperature": 0.2, "top_p": 0.9}

