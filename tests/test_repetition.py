"""The repetition guard: fires on a tail of one n-gram repeated back to back (periods 1 to
ngram_max), not on varied text nor on short legitimate repeats."""

from __future__ import annotations

import random

import pytest

from septet.inference.repetition import RepetitionGuard, loop_at_end


def first_fire(seq, **kw) -> int | None:
    """The index of the item at which the guard first fires."""
    g = RepetitionGuard(**kw)
    for i, t in enumerate(seq):
        if g.push(t):
            return i
    return None


@pytest.mark.parametrize("period", [1, 2, 3, 5, 8, 17, 32])
def test_a_loop_of_any_period_up_to_ngram_max_is_caught(period):
    rng = random.Random(period)
    prefix = [rng.randrange(1000, 2000) for _ in range(40)]  # varied text first
    gram = list(range(period))
    seq = prefix + gram * 40
    g = RepetitionGuard(ngram_max=32, min_repeats=4, min_tokens=16)
    at = first_fire(seq, ngram_max=32, min_repeats=4, min_tokens=16)
    copies = max(4, -(-16 // period))  # ceil(16 / period), at least 4
    assert at == len(prefix) + copies * period - 1  # the moment the last needed copy completes
    assert g.extend(seq) and g.period == period and g.copies == copies
    assert g.excess == (copies - 1) * period


def test_a_period_beyond_ngram_max_is_not_caught():
    gram = list(range(40))
    assert first_fire(gram * 10, ngram_max=32) is None
    assert first_fire(gram * 10, ngram_max=40) is not None


def test_varied_text_never_fires():
    rng = random.Random(0)
    words = [rng.randrange(50) for _ in range(5000)]  # a small vocabulary, many chance repeats
    assert first_fire(words) is None


def test_short_legitimate_repeats_do_not_fire():
    ha = ["Ha", " ha", " ha", " ha", " ha", "!", " That", " was", " funny", "."]
    assert first_fire(ha) is None  # " ha" four times: a period-1 loop needs 16
    no = ["No", ",", " no", ",", " no", ",", " no", ".", " I", " said", " no"]
    assert first_fire(no) is None
    numbers = [str(i) if i % 2 == 0 else "," for i in range(60)]  # "0 , 2 , 4 , ..." counts up
    assert first_fire(numbers) is None
    dashes = ["-"] * 8  # a markdown rule
    assert first_fire(dashes) is None
    assert first_fire(["-"] * 16) == 15


def test_min_repeats_and_min_tokens_are_the_thresholds():
    assert first_fire([7, 8] * 3, min_repeats=3, min_tokens=0) == 5
    assert first_fire([7, 8] * 2, min_repeats=3, min_tokens=0) is None
    assert first_fire([7, 8] * 10, min_repeats=3, min_tokens=12) == 11


def test_loop_at_end_only_counts_a_loop_still_running():
    loop = [1, 2, 3, 4] * 6
    assert loop_at_end([9, 10] + loop) == (4, 6)
    assert loop_at_end(loop + [5, 6, 7]) is None  # it left the loop
    g = RepetitionGuard()
    assert g.extend(loop + [5, 6, 7])  # ...but the guard had fired inside it


def test_reset_and_bad_arguments():
    g = RepetitionGuard(min_tokens=0)
    assert g.extend([1] * 4) and g.fired
    g.reset()
    assert not g.fired and g.count == 0 and not g.push(1)
    with pytest.raises(ValueError, match="ngram_max"):
        RepetitionGuard(ngram_max=0)
    with pytest.raises(ValueError, match="min_repeats"):
        RepetitionGuard(min_repeats=1)

