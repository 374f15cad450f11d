"""BIG-bench JSON tasks: prompt formatting, few-shot draws and metrics exactly as
bigbench==1.0.0's JsonTask defines them, on small fixture task.json files.

The golden strings and values below were derived from bigbench/api/json_task.py,
task_metrics.py and models/model_utils.py (defaults "\\nQ: ", "\\nA: ", "\\n  choice: ",
separator "\\n", RandomState(42) for the appended-choice permutation — identity for 3
choices, reversed for 2 — and for the few-shot draws), and checked against those
functions run outside septet."""

from __future__ import annotations

import json

import pytest

from septet.errors import DataError, InputError
from septet.eval import bigbench
from septet.eval.bigbench import load_bigbench_path, queries
from septet.eval.metrics import (
    DEFAULT_REGEX,
    bigbench_argmax,
    exact_str_match,
    multiple_choice_grade,
    postprocess,
    regex_is_line_bound,
)
from septet.eval.scoring import LogLik

MC = {"canary": "c", "name": "toy_mc", "description": "d", "keywords": ["k"],
      "metrics": ["multiple_choice_grade"], "preferred_score": "multiple_choice_grade",
      "task_prefix": "Pick the animal.",
      "examples": [
          {"input": "Which one barks?", "target_scores": {"dog": 1, "cat": 0, "cow": 0}},
          {"input": "Which one meows?", "target_scores": {"dog": 0, "cat": 1, "cow": 0}},
          {"input": "Which one moos?", "target_scores": {"dog": 0, "cat": 0, "cow": 1}},
          {"input": "Which one is a pet?", "target_scores": {"dog": 0.5, "cat": 0.5, "cow": 0}},
          {"input": "Which one gives milk?", "target_scores": {"cow": 1, "bird": 0}},
          {"input": "Which one barks?", "target_scores": {"dog": 1, "cat": 0, "cow": 0}}]}  # a duplicate
GEN = {"canary": "c", "name": "toy_gen", "description": "d", "keywords": ["k"],
       "metrics": ["exact_str_match"], "preferred_score": "exact_str_match",
       "example_input_prefix": "\nquestion: ", "example_output_prefix": "\nanswer: ",
       "few_shot_example_separator": "\n\n", "output_regex": "[-+]?\\d+",
       "examples": [{"input": "1+1", "target": "2"}, {"input": "2+2", "target": ["4", "four"]},
                    {"input": "3+3", "target": "6"}, {"input": "4+4", "target": "8"}]}

Q = "Pick the animal.\nQ: "
ANIMALS = "\n  choice: cat\n  choice: cow\n  choice: dog\nA: "
MILK = "\n  choice: cow\n  choice: bird\nA: "


def _write(d, data):
    d.mkdir(parents=True, exist_ok=True)
    (d / "task.json").write_text(json.dumps(data))
    return d / "task.json"


@pytest.fixture
def mc_task(tmp_path):
    return load_bigbench_path(_write(tmp_path / "toy_mc", MC))


@pytest.fixture
def gen_task(tmp_path):
    return load_bigbench_path(_write(tmp_path / "toy_gen", GEN))


def _prompts(task, shots, limit=None):
    return [q.prompt(task) for q in queries(task, shots, limit)]


def test_zero_shot_prompts_golden(mc_task):
    assert len(mc_task.examples) == 5  # the duplicate is dropped, as JsonTask does
    assert _prompts(mc_task, 0) == [Q + "Which one barks?" + ANIMALS, Q + "Which one meows?" + ANIMALS,
                                    Q + "Which one moos?" + ANIMALS, Q + "Which one is a pet?" + ANIMALS,
                                    Q + "Which one gives milk?" + MILK]
    # choices are scored in target_scores order, not the displayed order
    assert mc_task.examples[4].choices == ["cow", "bird"]
    # the best-scored choice (first on ties) is the demonstration answer
    assert mc_task.examples[3].targets == ["dog"]


def test_few_shot_prompts_golden(mc_task):
    def demo(q, a):
        return f"\nQ: {q}" + (MILK if "milk" in q else ANIMALS) + a + "\n"

    def query(q):
        return f"\nQ: {q}" + (MILK if "milk" in q else ANIMALS)

    p = "Pick the animal."
    assert _prompts(mc_task, 2) == [
        p + demo("Which one moos?", "cow") + demo("Which one is a pet?", "dog") + query("Which one meows?"),
        p + demo("Which one is a pet?", "dog") + demo("Which one barks?", "dog") + query("Which one gives milk?"),
        p + demo("Which one meows?", "cat") + demo("Which one barks?", "dog") + query("Which one moos?"),
        p + demo("Which one is a pet?", "dog") + demo("Which one moos?", "cow") + query("Which one barks?"),
        p + demo("Which one barks?", "dog") + demo("Which one meows?", "cat") + query("Which one is a pet?"),
    ]
    assert _prompts(mc_task, 1, limit=2) == [
        "Pick the animal." + demo("Which one moos?", "cow") + "\nQ: Which one meows?" + ANIMALS,
        "Pick the animal." + demo("Which one is a pet?", "dog") + "\nQ: Which one gives milk?" + MILK]


def test_generative_prompts_golden(gen_task):
    assert _prompts(gen_task, 0)[1] == "\nquestion: 2+2\nanswer: "
    assert _prompts(gen_task, 2, limit=3) == [
        "\nquestion: 1+1\nanswer: 2\n\n\nquestion: 3+3\nanswer: 6\n\n\nquestion: 2+2\nanswer: ",
        "\nquestion: 2+2\nanswer: 4\n\n\nquestion: 3+3\nanswer: 6\n\n\nquestion: 4+4\nanswer: ",
        "\nquestion: 4+4\nanswer: 8\n\n\nquestion: 2+2\nanswer: 4\n\n\nquestion: 1+1\nanswer: "]


def test_metric_definitions_by_hand():
    # ties: sha256 of the float64 bytes picks among the tied maxima
    assert bigbench_argmax([-1.0, -1.0, -2.0]) == 1
    assert bigbench_argmax([-0.5, -3.0, -0.5, -0.5]) == 0
    assert bigbench_argmax([0.0, 0.0]) == 1
    assert bigbench_argmax([-3.0, -0.1, -2.0]) == 1
    # partial credit: the grade is the target score of the chosen answer
    assert multiple_choice_grade(["dog", "cat"], [-0.1, -2.0], {"dog": 0.5, "cat": 0.5}) == 0.5
    assert exact_str_match("4", ["4", "four"]) == 1.0 and exact_str_match(" 4", ["4"]) == 0.0
    assert postprocess("  42 and 7", None, "[-+]?\\d+") == "42"
    assert postprocess("x. more", ".", None) == "x."
    assert postprocess(".x. more", ".", None) == ".x. more"  # a stop string at 0 is ignored
    assert postprocess("abc\ndef", None, DEFAULT_REGEX) == "abc"
    assert postprocess("nothing", None, "\\d+") == ""
    assert postprocess("it is 'a' ok", None, "('.*?')") == "'a'"
    assert postprocess("9" * 300, None, "\\d+") == "9" * 256


class FakeScorer:
    """Scores a choice by minus its length; 'generates' a fixed answer per prompt."""

    context = 10_000

    def __init__(self, answers=None):
        self.answers = answers or {}
        self.seen = []

    def encode(self, text):
        return list(text.encode())

    def context_ids(self, text):
        return self.encode(text) or [0]

    def loglikelihood(self, pairs, boundary="joint", progress=None):
        assert boundary == "separate"  # BIG-bench's HF scorer tokenises target alone
        self.seen += pairs
        return [LogLik(-float(len(x)), len(x), len(x), False) for _, x in pairs]

    def generate_until(self, prompts, max_new_tokens=32, done=None, progress=None):
        return [next(v for k, v in self.answers.items() if p.endswith(k)) for p in prompts]


def test_multiple_choice_grade_end_to_end(mc_task):
    rows = bigbench.evaluate(mc_task, FakeScorer(), 0)
    (row,) = rows
    # dog/cat/cow tie at -3 → the hash rule picks index 1 (cat) for each 3-way item:
    # barks 0, meows 1, moos 0, pet 0.5; milk: cow (-3) beats bird (-4): 1 → 2.5 / 5
    assert row.metric == "multiple_choice_grade" and row.value == pytest.approx(0.5) and row.n == 5
    assert row.primary and row.task == "toy_mc"
    assert mc_task.low_score == pytest.approx((1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 2) / 5)


def test_exact_str_match_end_to_end(gen_task):
    answers = {"1+1\nanswer: ": " 2.", "2+2\nanswer: ": "four", "3+3\nanswer: ": "7\n6", "4+4\nanswer: ": "+8"}
    (row,) = bigbench.evaluate(gen_task, FakeScorer(answers), 0)
    # regex [-+]?\d+: "2" ✓, "four" → "" ✗ (no digits), "7" ✗, "+8" ✗ (verbatim compare)
    assert row.metric == "exact_str_match" and row.value == pytest.approx(0.25)


def test_subtasks_aggregate_like_bigbench(tmp_path):
    root = tmp_path / "parent"
    _write(root, {"canary": "c", "name": "parent", "description": "d", "keywords": ["k"]})
    _write(root / "a_mc", MC)
    _write(root / "b_gen", GEN)
    task = load_bigbench_path(root)
    assert [s.name for s in task.subtasks] == ["parent:toy_mc", "parent:toy_gen"]
    answers = {"1+1\nanswer: ": "2", "2+2\nanswer: ": "4", "3+3\nanswer: ": "5", "4+4\nanswer: ": "8"}
    rows = bigbench.evaluate(task, FakeScorer(answers), 0)
    by = {(r.task, r.metric): r for r in rows}
    agg = task.label
    assert by[(agg, "multiple_choice_grade")].value == pytest.approx(0.5)  # only one subtask has it
    assert by[(agg, "exact_str_match")].value == pytest.approx(0.75)
    low = (4 / 3 + 1 / 2) / 5
    norm = ((0.5 - low) / (1 - low) * 100 + 75.0) / 2  # mixed preferred scores → normalized aggregate
    assert by[(agg, "normalized_aggregate_score")].value == pytest.approx(norm)
    assert by[(agg, "normalized_aggregate_score")].primary
    assert by[(f"{agg}/a_mc", "multiple_choice_grade")].notes["subtask_of"] == agg
    # --limit splits evenly over subtasks (BIG-bench's max_examples rule)
    rows = bigbench.evaluate(task, FakeScorer(answers), 0, limit=4)
    assert {r.n for r in rows if r.task != agg} == {2}
    with pytest.raises(InputError, match="smaller than the 2 subtasks"):
        bigbench.evaluate(task, FakeScorer(answers), 0, limit=1)


def test_too_many_shots_and_reduced_shots(mc_task):
    with pytest.raises(InputError, match="5 distinct examples, too few for 5 shots"):
        queries(mc_task, 5)
    short = FakeScorer()
    short.context = 160  # room for the 0-shot prompts, not for 3 demonstrations
    with pytest.warns(UserWarning, match="ran with as few as"):
        (row,) = bigbench.evaluate(mc_task, short, 3)
    assert row.notes["shots_reduced"] == 5


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(examples=[{"input": "x", "target_scores": {"a": "high"}}]),
     "must map each choice to a number"),
    (lambda d: d.update(examples=[{"input": "x", "target": "a"}, {"input": "y", "target": "b"}]),
     "needs 'target_scores'"),
    (lambda d: d.update(examples=[{"target_scores": {"a": 1}}]), "field 'input' must be a string"),
    (lambda d: d.update(examples=[{"input": "x", "target_scores": {"a": 0, "b": 0}}]), "no choice scored above"),
    (lambda d: d.update(output_regex="(unclosed"), "does not compile"),
    (lambda d: d.pop("name"), "missing field 'name'"),
    (lambda d: d.update(metrics="multiple_choice_grade"), "'metrics' must be a list"),
])
def test_malformed_task_json(tmp_path, mutate, match):
    data = json.loads(json.dumps(MC))
    mutate(data)
    path = _write(tmp_path / "bad", data)
    with pytest.raises(DataError, match=match) as e:
        load_bigbench_path(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_invalid_json_and_unknown_names(tmp_path, monkeypatch):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "task.json").write_text('{"name": "x",')
    with pytest.raises(DataError, match="invalid JSON at line 1"):
        load_bigbench_path(tmp_path / "broken")
    from septet import assets

    root = tmp_path / "bb"
    _write(root / "toy_mc", MC)
    monkeypatch.setattr(assets, "fetch", lambda name, **kw: root)  # no 358 MB download here
    assert bigbench.load_bigbench("toy_mc").label == "bigbench:toy_mc"
    with pytest.raises(InputError, match="did you mean toy_mc"):
        bigbench.load_bigbench("toy_mx")
    with pytest.raises(InputError, match="expected bigbench:NAME"):
        bigbench.load_bigbench("../etc")


def test_settled_rule_only_for_line_bound_regexes(gen_task):
    done = bigbench._settled(gen_task)  # [-+]?\d+ cannot span lines
    assert not done("  4") and done("  4\nquestion") and not done("\n\n")
    assert regex_is_line_bound(DEFAULT_REGEX)
    assert not regex_is_line_bound(r"\d+\s[a-z]+")


@pytest.mark.slow
def test_real_bigbench_task_with_smollm2():
    import septet
    from septet import assets
    from septet.eval.scoring import Scorer

    try:
        task = bigbench.load_bigbench("cause_and_effect/one_sentence")
    except assets.AssetUnavailable as e:  # no source reachable here: say which and why
        pytest.skip(str(e))
    sc = Scorer.from_loaded(septet.load("smollm2"))
    rows = bigbench.evaluate(task, sc, 0, limit=8)
    (row,) = rows
    assert row.metric == "multiple_choice_grade" and row.n == 8 and 0.0 <= row.value <= 1.0
