"""benchmarks/inference.py --rounds: medians over rounds, ratios paired within a round."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "inference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_inference", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def result(engine, setting, b1, b8=100.0, prefill=300.0, rss=5e8, load=1.0):
    return {"engine": engine, "setting": setting, "decode_b1_tok_s": b1, "decode_b8_tok_s": b8,
            "prefill_tok_s": prefill, "peak_rss": rss, "load_s": load}


def test_each_metric_is_the_median_over_the_rounds_and_failures_are_dropped(bench):
    rounds = [
        [result("septet", "int4", 100, load=1.0), result("llama.cpp", "Q4_1", 80)],
        [result("llama.cpp", "Q4_1", 120), {"engine": "septet", "setting": "int4", "error": "killed"}],
        [result("septet", "int4", 90, load=3.0), result("llama.cpp", "Q4_1", 60)],
    ]
    merged = {r["engine"]: r for r in bench.combine_rounds(rounds)}
    assert merged["septet"]["decode_b1_tok_s"] == 95 and merged["septet"]["load_s"] == 2.0
    assert merged["septet"]["rounds_ok"] == 2
    assert merged["llama.cpp"]["decode_b1_tok_s"] == 80 and merged["llama.cpp"]["rounds_ok"] == 3
    failed = bench.combine_rounds([[{"engine": "septet", "setting": "x", "error": "boom"}]])
    assert failed == [{"engine": "septet", "setting": "x", "error": "boom"}]


def test_ratios_pair_engines_within_a_round(bench):
    rounds = [
        [result("septet", "int4", 100), result("llama.cpp", "Q4_1", 80)],
        [result("llama.cpp", "Q4_1", 120), result("septet", "int4", 110)],
        [result("septet", "int4", 50)],  # no llama.cpp this round: no ratio
    ]
    ratios = bench.paired_ratios(rounds)
    assert ratios["int4"]["decode_b1_tok_s"] == [1.25, round(110 / 120, 3)]
    assert ratios["int4"]["prefill_tok_s"] == [1.0, 1.0]
