"""Token ids to text, incrementally, with stop strings."""

from __future__ import annotations

from typing import Iterable, Iterator


class TextStream:
    """Incremental detokenisation with stop strings.

    `push(id)` returns the text that is now final ('' while a multi-byte character is
    incomplete or a tail might still grow into a stop string); `finish()` returns what is
    left. Each push decodes only the tokens since the last clean character boundary (plus
    one step of context, for tokenizers that drop a leading space), so the work per token
    is O(1) amortised, not O(length).
    """

    def __init__(self, tokenizer, stop_strings: Iterable[str] = ()):
        self.tok = tokenizer
        self.stops = tuple(x for x in stop_strings if x)
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this are already turned into text
        self.held = ""  # text held back: a possible start of a stop string
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if now.endswith("\ufffd"):
            return self._filter("")  # an incomplete character: wait for more bytes
        piece = now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._filter(piece)

    def _filter(self, piece: str) -> str:
        text = self.held + piece
        if not self.stops:
            self.held = ""
            return text
        cut = min((i for i in (text.find(x) for x in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.held = ""
            return text[:cut]
        hold = 0
        for x in self.stops:  # the longest tail of text that starts some stop string
            for k in range(min(len(x) - 1, len(text)), hold, -1):
                if text.endswith(x[:k]):
                    hold = k
                    break
        self.held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def finish(self) -> str:
        """The rest: an undecodable tail as U+FFFD, and held text (it never became a stop string)."""
        if self.stopped:
            return ""
        tail = ""
        if self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            tail = self._decode(self.ids[self.prefix:])[len(before):]
            self.prefix = self.read = len(self.ids)
        out = self._filter(tail)
        out, self.held = out + self.held, ""
        return out


def stream_text(tokenizer, ids: Iterable[int], stop_ids: Iterable[int] = (),
                stop_strings: Iterable[str] = ()) -> Iterator[str]:
    """Text pieces for a stream of token ids; a stop id ends it (and is not decoded)."""
    stop = set(stop_ids)
    ts = TextStream(tokenizer, stop_strings)
    for t in ids:
        if t in stop:
            break
        piece = ts.push(t)
        if piece:
            yield piece
        if ts.stopped:
            return
    rest = ts.finish()
    if rest:
        yield rest
