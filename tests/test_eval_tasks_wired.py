"""HumanEval, GSM8K-style and MMLU chain of thought run through `septet eval` like any other
task: --shots, --limit, the results JSON, markdown and plot, one warning line for shot
counts a task does not allow, and one-line errors. A tiny random model stands in for a
real one, so only the wiring is under test (the scores are near zero)."""

from __future__ import annotations

import json

import pytest
import torch

import septet.api
from septet.api import LoadedModel
from septet.cli import main
from septet.eval import registry_tasks
from septet.eval.catalog import get_task, registered_tasks
from septet.eval.cot import Example
from septet.models import build, get_preset
from septet.tokenizer import Tokenizer


def _tiny_lm(stops_at_once: bool) -> LoadedModel:
    """A 2-layer LLaMA with a long enough context for HumanEval prompts. `stops_at_once`
    makes end-of-text its every prediction, so decoding ends at once and tests stay fast."""
    words = "def return the answer is Q A : x 1 2 3 + = ( ) pens has".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(3000))
    tok = Tokenizer.train_bpe([text], 300)
    torch.manual_seed(0)
    cfg = get_preset("llama-tiny").config.replace(n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                                                  vocab_size=300, context=2048)
    model = build(cfg).eval()
    if stops_at_once:
        def favour_eot(module, inputs, logits):
            logits[..., tok.eot_id] += 1e4
            return logits
        model.register_forward_hook(favour_eot)
    return LoadedModel(model, tok, name="tiny")


@pytest.fixture(scope="module")
def quiet_lm() -> LoadedModel:
    return _tiny_lm(stops_at_once=True)


@pytest.fixture
def run_cli(quiet_lm, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(septet.api, "load", lambda *a, **k: quiet_lm)

    def run(*argv: str) -> tuple[int, dict | None, str]:
        rc = main(["eval", "--model", "tiny", "--out", str(tmp_path / "out"), "--json", *argv])
        out, err = capsys.readouterr()
        return rc, (json.loads(out) if rc == 0 else None), err
    return run


def _primary(data: dict) -> list[tuple[str, int, str, int]]:
    return [(r["task"], r["shots"], r["metric"], r["n"]) for r in data["results"] if r["primary"]]


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "word_problems.jsonl"
    rows = [{"question": f"Ana has {i} pens and buys 2 more. How many pens?", "answer": f"So #### {i + 2}"}
            for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_the_names_are_registered():
    names = registered_tasks()
    assert {"humaneval", "mmlu-cot", "mmlu-cot:SUBJECT", "gsm8k-cot:PATH"} <= set(names)


def test_humaneval_runs_zero_shot_and_skips_other_shots_with_one_warning(run_cli, tmp_path):
    rc, data, err = run_cli("--task", "humaneval", "--shots", "0,1,3", "--limit", "2")
    assert rc == 0
    assert _primary(data) == [("humaneval", 0, "pass@1", 2)]
    assert data["warnings"] == ["humaneval is 0-shot only; skipping --shots 1,3"]
    row = data["results"][0]
    assert 0.0 <= row["value"] <= 1.0 and sum(row["notes"]["sandbox"].values()) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "results.md", "results.png"]


def test_only_disallowed_shots_is_a_one_line_error(run_cli):
    rc, _, err = run_cli("--task", "humaneval", "--shots", "2")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no task allows these shot counts" in err and "0-shot only" in err


def test_gsm8k_cot_runs_with_shots_limit_and_calculator(run_cli, problems_file):
    rc, data, _ = run_cli("--task", f"gsm8k-cot:{problems_file}", "--shots", "0,2", "--limit", "3",
                          "--calculator")
    assert rc == 0
    label = "gsm8k-cot:word_problems+calculator"
    assert _primary(data) == [(label, 0, "exact_match", 3), (label, 2, "exact_match", 3)]
    assert all("calculator_injections" in r["notes"] for r in data["results"])


def test_a_model_that_writes_text_goes_through_the_same_path(run_cli, problems_file, monkeypatch):
    talkative = _tiny_lm(stops_at_once=False)  # decodes its full 256-token budget
    monkeypatch.setattr(septet.api, "load", lambda *a, **k: talkative)
    rc, data, _ = run_cli("--task", f"gsm8k-cot:{problems_file}", "--limit", "1", "--calculator")
    assert rc == 0 and _primary(data) == [("gsm8k-cot:word_problems+calculator", 0, "exact_match", 1)]


def test_mmlu_cot_subject_runs_and_caps_shots_at_the_other_examples(run_cli):
    rc, data, _ = run_cli("--task", "mmlu-cot:high_school_physics", "--shots", "0,1,5", "--limit", "2")
    assert rc == 0
    assert _primary(data) == [("mmlu-cot:high_school_physics", k, "exact_match", 2) for k in (0, 1)]
    assert data["warnings"] == ["mmlu-cot:high_school_physics allows at most 4 shots; skipping --shots 5"]


def test_tasks_mix_in_one_run(run_cli, problems_file):
    rc, data, _ = run_cli("--task", f"humaneval,gsm8k-cot:{problems_file}", "--shots", "0,1", "--limit", "1")
    assert rc == 0
    assert [(t, k) for t, k, _, _ in _primary(data)] == [("humaneval", 0), ("gsm8k-cot:word_problems", 0),
                                                         ("gsm8k-cot:word_problems", 1)]


@pytest.mark.parametrize("argv, message", [
    (["--task", "gsm8k-cot:"], "needs a problems file"),
    (["--task", "gsm8k-cot:/nonexistent/p.jsonl"], "no such problems file"),
    (["--task", "mmlu-cot:astrology"], "unknown MMLU subject(s) astrology"),
    (["--task", "mmlu-cot:"], "name a subject after the colon"),
    (["--task", "humaneval", "--calculator"], "--calculator applies to chain-of-thought tasks only"),
])
def test_bad_specs_are_one_line_errors(run_cli, argv, message):
    rc, _, err = run_cli(*argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_mmlu_order_takes_one_example_per_subject_first():
    task = get_task("mmlu-cot")
    subjects = [e.subject for e in task.examples]
    assert len(set(subjects[:57])) == 57 and task.max_shots == 4 and len(subjects) == 282
    # each subject keeps its own order, so the exemplars of an item are the protocol's
    exs = [Example(f"q{i}", "A", subject=s) for i, s in enumerate("aabbba")]
    assert [e.question for e in registry_tasks.interleave_subjects(exs)] == ["q0", "q2", "q1", "q3", "q5", "q4"]
