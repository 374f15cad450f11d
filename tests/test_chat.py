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
