"""A guard against degenerate repetition: the tail of a generation that is one n-gram
repeated back to back ("Le marteau. Le marteau. Le marteau. ...").

`RepetitionGuard.push(token)` takes the generated tokens one at a time (token ids, or any
hashable items, e.g. the text pieces of a stream) and returns True once the tail is
`min_repeats` or more back-to-back copies of one n-gram of length 1..`ngram_max` that together
span at least `min_tokens` items. That is the looping signature: a sampled answer that
reaches it practically never leaves it again before the budget ends.

How it is cheap: for each period p it keeps the number of consecutive latest positions j with
x[j] == x[j - p]. The tail is c copies of a p-gram exactly when that run is at least
(c - 1)·p, so a push costs O(ngram_max) comparisons against the last ngram_max items, and
memory is O(ngram_max) however long the generation runs.

`min_tokens` keeps short legitimate repeats ("ha ha ha", "no, no, no", a row of eight dashes)
from firing: with the defaults a single repeated token needs 16 copies, a 2-gram 8 and an
n-gram of 4 or more tokens 4 copies.

What a caller does when it fires (the convention septet follows): stop the row, finish
reason "stop"; the text already streamed stays as it was. Where the text is kept (a chat
history, a non-streamed answer), `excess` items at the end are the copies beyond the first
and may be dropped.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Iterable

NGRAM_MAX = 32
MIN_REPEATS = 4
MIN_TOKENS = 16


class RepetitionGuard:
    """Detects a tail made of one n-gram repeated back to back; see the module docstring."""

    def __init__(self, ngram_max: int = NGRAM_MAX, min_repeats: int = MIN_REPEATS,
                 min_tokens: int = MIN_TOKENS):
        if ngram_max < 1:
            raise ValueError(f"ngram_max must be >= 1, got {ngram_max}")
        if min_repeats < 2:
            raise ValueError(f"min_repeats must be >= 2, got {min_repeats}")
        self.ngram_max = ngram_max
        self.min_repeats = min_repeats
        self.min_tokens = min_tokens
        self.reset()

    def reset(self) -> None:
        self._last: deque[Hashable] = deque(maxlen=self.ngram_max)  # newest last
        self._run = [0] * (self.ngram_max + 1)  # _run[p]: matches x[j] == x[j-p] ending now
        self.count = 0  # items pushed
        self.period = 0  # once fired: the repeating n-gram's length
        self.copies = 0  # once fired: how many whole copies of it end the sequence

    @property
    def fired(self) -> bool:
        return self.period > 0

    @property
    def excess(self) -> int:
        """Items at the end beyond the loop's first copy (0 until the guard fires)."""
        return (self.copies - 1) * self.period if self.fired else 0

    def push(self, token: Hashable) -> bool:
        """Add the next item; True when the sequence now ends in a loop (and from then on)."""
        last, run = self._last, self._run
        n = len(last)
        found = 0
        for p in range(1, n + 1):  # last[-p] is the item p positions back
            if last[n - p] == token:
                run[p] += 1
                if not found:
                    copies = run[p] // p + 1
                    if copies >= self.min_repeats and copies * p >= self.min_tokens:
                        found = p
            else:
                run[p] = 0
        last.append(token)
        self.count += 1
        if found and not self.fired:
            self.period, self.copies = found, run[found] // found + 1
        return self.fired

    def extend(self, tokens: Iterable[Hashable]) -> bool:
        """Push each item; True if the guard fired at any point."""
        for t in tokens:
            self.push(t)
        return self.fired


def loop_at_end(tokens: Iterable[Hashable], ngram_max: int = NGRAM_MAX, min_repeats: int = MIN_REPEATS,
                min_tokens: int = MIN_TOKENS) -> tuple[int, int] | None:
    """(period, copies) when the whole sequence ends in a loop by the guard's rule, else None.
    Unlike `RepetitionGuard.fired`, a loop that the sequence later left does not count."""
    g = RepetitionGuard(ngram_max, min_repeats, min_tokens)
    seq = list(tokens)
    for t in seq:
        g.push(t)
    run = g._run
    for p in range(1, min(ngram_max, len(seq) - 1) + 1):
        copies = run[p] // p + 1
        if copies >= min_repeats and copies * p >= min_tokens:
            return p, copies
    return None
