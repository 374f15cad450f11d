"""In-context learning appears in a tiny model septet trains itself: on documents whose
key -> value map is drawn afresh each time, accuracy under the GPT-3 few-shot protocol
rises with the number of demonstrations K."""

from __future__ import annotations

import random

from septet.api import load
from septet.eval import icl


def test_documents_and_episodes_use_a_fresh_map_each_time():
    rng = random.Random(0)
    docs = [icl.document(rng, 40) for _ in range(30)]
    maps = []
    for doc in docs:
        pairs = [line.split(" ") for line in doc.split("\n")]
        assert all(k in icl.KEYS and v in icl.VALUES for k, v in pairs)
        seen: dict[str, str] = {}
        for k, v in pairs:
            assert seen.setdefault(k, v) == v  # one map per document
        maps.append(seen)
    # and a new one each time (two can coincide: all 8 keys on the favourite is 0.75**8 ≈ 10%)
    assert len({tuple(sorted(m.items())) for m in maps}) > 20
    task = icl.episode(rng, "e")
    assert [d.prompt for d in task.test] == list(icl.KEYS) and task.train == task.test
    assert all(d.choices == icl.VALUES for d in task.test)


def test_the_reference_readers():
    assert abs(icl.reader_accuracy(0) - 1 / 8) < 0.01
    assert icl.reader_accuracy(8) == 1.0  # every key shown
    assert icl.reader_accuracy(8, use_keys=False) < 0.85  # the favourite value is not enough


def test_accuracy_rises_with_demonstrations(tmp_path):
    checkpoints = icl.train_model(tmp_path, steps=150, batch_size=16, seq_len=48, lr=3e-3, n_docs=800,
                                  model={"d_model": 32})
    curve = {p.shots: p.score.value for p in icl.accuracy_curve(load(checkpoints[-1]), shots=(0, 1, 8),
                                                                episodes=20)}
    # 160 items per K: a standard error of about 0.035 on each number
    assert curve[0] < 0.3, curve
    assert curve[8] > curve[0] + 0.3, curve
    assert curve[1] > curve[0] + 0.15, curve
