"""`septet chat`: a streaming chat loop over any loaded model with a chat template.

`ChatSession` holds the conversation and does the model work; `run_repl` is the terminal
front end (commands, Ctrl-C). Keeping them apart lets tests drive a session directly.

Sampling: values passed in win, then the model's own defaults (`lm.generation_defaults`,
septet.generation_config), then FALLBACK. The repetition guard (septet.inference.repetition)
is on by default: it watches the streamed pieces (one per token, but where a character spans
tokens) and ends an answer once it has become one n-gram repeated back to back; the history
then keeps the answer with the copies beyond the first removed.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator, TextIO

from .api import LoadedModel
from .chat_template import DEFAULT_TEMPLATE, render_chat
from .errors import ConfigError
from .generation_config import sampling_for
from .inference.repetition import RepetitionGuard

FALLBACK = {"temperature": 0.7, "top_p": 0.9}  # for models that recommend no sampling values
HELP = "commands: /reset clears the conversation, /system TEXT sets the system prompt, /quit exits"


class ChatSession:
    def __init__(self, lm: LoadedModel, *, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, repetition_guard: bool = True):
        if lm.tokenizer is None:
            raise ConfigError("this model has no tokenizer, so it cannot chat; load a checkpoint that has one")
        self.lm = lm
        self.template = lm.chat_template or DEFAULT_TEMPLATE
        self.system = system
        self.sampling = sampling_for(lm, FALLBACK, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed)
        self.repetition_guard = repetition_guard
        self.stopped_repeating = False  # the last answer was ended by the repetition guard
        self.turns: list[dict[str, str]] = []  # user/assistant messages, oldest first

    def reset(self) -> None:
        self.turns.clear()

    def messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + turns

    def prompt_ids(self) -> list[int]:
        """Render the conversation; drop the oldest exchanges until prompt + answer fit
        the context window (the system prompt and the newest user turn always stay)."""
        budget = self.lm.model.config.context - self.sampling["max_new_tokens"]
        turns = list(self.turns)
        while True:
            text = render_chat(self.template, self.messages(turns), add_generation_prompt=True,
                               bos_token=self.lm.bos_token, eos_token=self.lm.eos_token)
            ids = self.lm.encode(text)
            if len(ids) <= budget or len(turns) <= 1:
                break
            turns = turns[2:] if len(turns) > 2 else turns[1:]
        if len(ids) > budget:
            raise ConfigError(f"the message is {len(ids)} tokens but only {budget} fit in the "
                              f"context with room for the answer; shorten it or lower --max-new-tokens")
        self.turns = turns
        return ids

    def reply(self, user: str) -> Iterator[str]:
        """Stream the assistant's answer. Whatever was streamed is kept in the history, also
        when the caller stops early (Ctrl-C)."""
        self.turns.append({"role": "user", "content": user})
        ids = self.prompt_ids()
        answer: list[str] = []
        guard = RepetitionGuard() if self.repetition_guard else None
        self.stopped_repeating = False
        try:
            for piece in self.lm.stream_ids(ids, **self.sampling):
                answer.append(piece)
                yield piece
                if guard is not None and guard.push(piece):
                    self.stopped_repeating = True
                    del answer[len(answer) - guard.excess:]
                    break
        finally:
            self.turns.append({"role": "assistant", "content": "".join(answer).strip()})

    def describe(self) -> str:
        """The sampling in one line, e.g. 'temperature 0.2, top-p 0.9, repetition guard on'."""
        s = self.sampling
        parts = [f"temperature {s['temperature']:g}"] if "temperature" in s else []
        parts += [f"top-p {s['top_p']:g}"] if s.get("top_p", 1.0) < 1.0 else []
        parts += [f"top-k {s['top_k']}"] if s.get("top_k") else []
        parts.append("repetition guard " + ("on" if self.repetition_guard else "off"))
        return ", ".join(parts)


def run_repl(session: ChatSession, *, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    out.write(f"septet chat with {session.lm.name} ({session.describe()}) — {HELP}\n")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/system"):
            session.system = line[len("/system"):].strip() or None
            session.reset()
            out.write("(system prompt set; conversation cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        try:
            for piece in session.reply(line):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        if session.stopped_repeating:
            out.write(" [stopped: the answer repeats itself]")
        out.write("\n")
