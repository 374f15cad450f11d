"""HumanEval: the sandbox's limits, the pass@k estimator, the dataset and the task loop."""

from __future__ import annotations

import builtins
import gzip
import itertools
import json
import math
import os
from fractions import Fraction

import pytest

from septet.errors import DataError, InputError, SeptetError
from septet.eval import humaneval as he
from septet.eval.sandbox import Limits, isolation, run_python

# ----------------------------------------------------------------------------- sandbox


def test_a_correct_program_passes_and_its_output_comes_back():
    r = run_python("print(sum(range(10)))")
    assert r.passed and r.returncode == 0 and r.stdout == "45\n"


def test_a_failing_program_fails_with_its_traceback():
    r = run_python("assert 1 == 2, 'nope'")
    assert r.status == "failed" and r.returncode == 1 and "AssertionError: nope" in r.stderr


def test_an_endless_loop_is_killed_at_the_wall_clock_timeout():
    r = run_python("while True:\n    pass\n", limits=Limits(timeout_s=1.0))
    assert r.status == "timeout" and r.returncode is None and not r.passed


def test_the_cpu_limit_stops_a_busy_program_before_the_wall_clock():
    r = run_python("while True:\n    pass\n", limits=Limits(timeout_s=60.0, cpu_s=1))
    assert r.status == "timeout" and not r.passed


def test_allocating_too_much_memory_fails():
    r = run_python("x = bytearray(2 << 30)\nprint('allocated')", limits=Limits(memory_bytes=256 << 20))
    assert r.status == "failed" and "MemoryError" in r.stderr and "allocated" not in r.stdout


def test_opening_a_socket_fails():
    code = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\nprint('opened')"
    r = run_python(code)
    assert r.status == "failed" and "PermissionError" in r.stderr and "opened" not in r.stdout


def test_the_network_namespace_has_only_loopback_when_unshare_works():
    if "namespace" not in isolation()["network"]:
        pytest.skip("unshare is not permitted here; only the audit hook blocks sockets")
    code = "print(sorted(l.split(':')[0].strip() for l in open('/proc/self/net/dev').readlines()[2:]))"
    r = run_python(code)
    assert r.passed and r.stdout.strip() == "['lo']"


def test_files_are_written_only_in_the_temporary_directory(tmp_path):
    outside = tmp_path / "escaped.txt"
    code = ("import os\n"
            "open('inside.txt', 'w').write('ok')\n"
            "print(os.getcwd())\n"
            "print(sorted(os.listdir('.')))\n"
            f"open({str(outside)!r}, 'w').write('bad')\n")
    r = run_python(code)
    cwd, listing = r.stdout.splitlines()[:2]
    assert listing == "['inside.txt', 'program.py']"
    assert cwd != os.getcwd() and not os.path.exists(cwd)  # a fresh dir, removed afterwards
    assert r.status == "failed" and "PermissionError" in r.stderr and not outside.exists()


def test_subprocesses_forks_and_ctypes_are_refused():
    for code in ("import os\nos.fork()", "import subprocess\nsubprocess.run(['true'])",
                 "import os\nos.system('true')", "import ctypes"):
        r = run_python(code)
        assert r.status == "failed" and "PermissionError" in r.stderr, code


def test_output_is_bounded():
    r = run_python("print('x' * 1_000_000)", limits=Limits(output_bytes=1000))
    assert r.passed and len(r.stdout) < 1100 and r.stdout.endswith("[output truncated]")


def test_code_never_runs_in_the_parent_process():
    code = ("import builtins, os\n"
            "builtins.SEPTET_SANDBOX_MARKER = True\n"
            "print(os.getpid())\n")
    r = run_python(code)
    assert r.passed and int(r.stdout) != os.getpid()
    assert not hasattr(builtins, "SEPTET_SANDBOX_MARKER")


def test_limits_are_validated():
    with pytest.raises(InputError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(InputError, match="memory_bytes"):
        Limits(memory_bytes=1 << 20)


# ----------------------------------------------------------------------------- pass@k


def test_pass_at_k_hand_computed_values():
    assert he.pass_at_k(1, 1, 1) == 1.0
    assert he.pass_at_k(10, 0, 5) == 0.0
    assert he.pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c/n
    assert he.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert he.pass_at_k(4, 1, 3) == pytest.approx(1 - 1 / 4)  # 1 - C(3,3)/C(4,3)
    assert he.pass_at_k(5, 4, 2) == 1.0  # n - c < k: every pair holds a pass


def test_pass_at_k_equals_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert he.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    n, c, k = 1000, 13, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert he.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(InputError, match="n_samples"):
        he.pass_at_k(3, 1, 4)
    with pytest.raises(InputError):
        he.pass_at_k(3, 5, 1)


# ----------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def problems():
    return he.load_problems()


def test_the_dataset_has_164_valid_problems(problems):
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    assert all(p.prompt.rstrip().endswith(('"""', "'''")) or "def " in p.prompt for p in problems)


def _write(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_a_malformed_dataset_gets_a_clear_message(tmp_path, problems):
    good = dict(vars(problems[0]))
    cases = [({**good, "test": ""}, "field 'test'"),
             ({**good, "entry_point": "not a name"}, "entry_point"),
             ("{not json", "not valid JSON"),
             ([1, 2], "JSON object")]
    for row, message in cases:
        with pytest.raises(DataError, match=message):
            he.load_problems(_write(tmp_path / "bad.jsonl.gz", [row]))
    with pytest.raises(DataError, match="repeats"):
        he.load_problems(_write(tmp_path / "dup.jsonl.gz", [good, good]))
    with pytest.raises(DataError, match="no such"):
        he.load_problems(tmp_path / "missing.jsonl.gz")
    assert issubclass(DataError, SeptetError)


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    subset = problems[:12]
    good = he.check_many([(p, p.canonical_solution) for p in subset])
    assert [r.status for r in good] == ["passed"] * len(subset), [r.stderr[-300:] for r in good]
    bad = he.check_many([(p, "    return None\n") for p in subset[:4]])
    assert [r.status for r in bad] == ["failed"] * 4


@pytest.mark.slow
def test_all_164_canonical_solutions_pass(problems):
    results = he.check_many([(p, p.canonical_solution) for p in problems])
    failed = [(p.task_id, r.status) for p, r in zip(problems, results) if not r.passed]
    assert not failed


# ----------------------------------------------------------------------------- the task


class ScriptedCompleter:
    """Returns canned completions and records how it was called."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers
        self.calls = []

    def generate(self, prompt, *, stop, max_new_tokens, temperature, seed):
        return self.generate_batch([prompt], stop=stop, max_new_tokens=max_new_tokens,
                                   temperature=temperature, seed=seed)[0]

    def generate_batch(self, prompts, *, stop, max_new_tokens, temperature, seed):
        self.calls.append((len(prompts), tuple(stop), temperature))
        key = next(tid for tid in self.answers if prompts[0].endswith(self.answers[tid][0]))
        return list(self.answers[key][1:])


def test_run_humaneval_scores_pass_at_1_without_executing_in_process(problems, monkeypatch):
    chosen = problems[:4]
    answers = {p.task_id: [p.prompt, p.canonical_solution] for p in chosen[:3]}
    # the 4th "solution" would mark this process if it ever ran here
    answers[chosen[3].task_id] = [chosen[3].prompt,
                                  "    import builtins; builtins.SEPTET_RAN_HERE = 1\n    return None\n"]
    lm = ScriptedCompleter(answers)

    def refuse(*args, **kwargs):
        raise AssertionError("generated code must not be compiled or executed in septet's process")

    monkeypatch.setattr(builtins, "exec", refuse)
    monkeypatch.setattr(builtins, "eval", refuse)
    out = he.run_humaneval(lm, problems=chosen)
    monkeypatch.undo()
    assert not hasattr(builtins, "SEPTET_RAN_HERE")
    assert out["metric"] == "pass@1" and out["n"] == 4 and out["value"] == pytest.approx(0.75)
    assert out["stderr"] == pytest.approx(0.25)  # sample std sqrt(1/4) / sqrt(n = 4)
    assert [r["correct"] for r in out["records"]] == [1, 1, 1, 0]
    assert lm.calls[0] == (1, he.STOP_SEQUENCES, 0.0)


def test_run_humaneval_pass_at_k_with_several_samples(problems):
    p = problems[2]
    lm = ScriptedCompleter({p.task_id: [p.prompt, p.canonical_solution, "    return -1\n",
                                        "    return -1\n"]})
    out = he.run_humaneval(lm, k=(1, 2, 3), n_samples=3, temperature=0.8, problems=[p])
    assert out["records"][0]["correct"] == 1
    assert out["pass_at_k"]["pass@1"]["value"] == pytest.approx(1 / 3)
    assert out["pass_at_k"]["pass@2"]["value"] == pytest.approx(2 / 3)
    assert out["pass_at_k"]["pass@3"]["value"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="identical"):
        he.run_humaneval(lm, n_samples=3, temperature=0.0, problems=[p])
    with pytest.raises(InputError, match="between 1 and n_samples"):
        he.run_humaneval(lm, k=(5,), n_samples=3, temperature=0.8, problems=[p])


def test_program_layout(problems):
    p = problems[0]
    text = he.program(p, "    return True\n")
    assert text.startswith(p.prompt + "    return True\n")
    assert p.test in text and text.rstrip().endswith(f"check({p.entry_point})")
