"""Chain of thought: the GSM8K exemplars, answer extraction, PaLM's calculator hook inside a
KV-cached decoding loop, pluggable problems and MMLU's CoT dev examples."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from septet.errors import DataError, InputError
from septet.eval import cot
from septet.inference import Sampling
from septet.models import build, get_preset

# ----------------------------------------------------------------------------- exemplars


@pytest.fixture(scope="module")
def tasks_dir() -> Path:
    from septet import assets

    return assets.fetch("lm-eval-tasks", progress=False, quiet=True)


def test_the_eight_standard_exemplars(tasks_dir):
    ex = cot.gsm8k_exemplars()
    assert len(ex) == 8
    assert [e.answer for e in ex] == ["6", "5", "39", "8", "9", "29", "33", "8"]
    assert ex[0].question.startswith("There are 15 trees in the grove.")
    assert ex[0].target == ("There are 15 trees originally. Then there were 21 trees after some "
                            "more were planted. So there must have been 21 - 15 = 6. The answer is 6.")
    assert all(e.target.endswith(f"The answer is {e.answer}.") for e in ex)


def test_the_tiny_yaml_reader_agrees_with_pyyaml(tasks_dir):
    yaml = pytest.importorskip("yaml")
    path = tasks_dir / "gsm8k" / "gsm8k-cot.yaml"
    ours = cot.read_fewshot_samples(path.read_text(encoding="utf-8"), path)
    assert ours == yaml.safe_load(path.read_text(encoding="utf-8"))["fewshot_config"]["samples"]


def test_the_tiny_yaml_reader_folds_quotes_and_refuses_the_rest(tmp_path):
    text = ("fewshot_config:\n  samples:\n  - question: 'It''s two\n      lines'\n    target: a\n"
            "      b\n\n      c\nnum_fewshot: 8\n")
    assert cot.read_fewshot_samples(text, tmp_path / "t.yaml") == [
        {"question": "It's two lines", "target": "a b\nc"}]
    for bad in ('"double quoted"', "|", "'unterminated", "a # comment"):
        text = f"fewshot_config:\n  samples:\n  - question: {bad}\n    target: x\n"
        with pytest.raises(DataError, match="t.yaml"):
            cot.read_fewshot_samples(text, tmp_path / "t.yaml")
    with pytest.raises(DataError, match="fewshot_config"):
        cot.read_fewshot_samples("task: x\n", tmp_path / "t.yaml")


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("text, expected", [
    ("21 - 15 = 6. The answer is 6.", "6"),
    ("The answer is $1,234.50.", "1234.5"),
    ("The answer is 18.00", "18"),
    ("The answer is -3. Then 7", "-3"),
    ("first 5, then 7 apples.", "7"),  # no "The answer is": the last number
    ("no numbers here", None),
])
def test_answer_extraction(text, expected):
    assert cot.extract_answer(text) == expected


def test_choice_extraction():
    assert cot.extract_choice("... so it is 4. The answer is (B).") == "B"
    assert cot.extract_choice("(A) is wrong, (C) is right") == "C"
    assert cot.extract_choice("I don't know") is None


# ----------------------------------------------------------------------------- calculator


@pytest.mark.parametrize("expr, value", [
    ("2 + 3", 5), ("5 x 3", 15), ("1,000 * 2.5", 2500), ("(3 + 4) * 2", 14),
    ("10 / 4", Fraction(5, 2)), ("7 - 2 - 1", 4), ("8 / 2 / 2", 2), ("2 * -3", -6), ("$23 - $15", 8),
])
def test_the_calculator_computes_plain_arithmetic(expr, value):
    assert cot.calculate(expr) == value


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "2**3", "2 ^ 3", "1e9 + 1", "a + b", "3", "2 + (3",
    "10 / 0", "1 + 2; 3", "len('x') + 1", "9" * 20 + " + 1", "(" * 40 + "1" + ")" * 40 + " + 1", "",
])
def test_the_calculator_refuses_anything_else(expr):
    assert cot.calculate(expr) is None


@pytest.mark.parametrize("text, hit", [
    ("So there must have been 21 - 15 =", ("21 - 15", " 6")),
    ("he had 58 - 23 = ", ("58 - 23", "35")),
    ("5 bagels will be 5 x 3 =", ("5 x 3", " 15")),
    ("I had 5. 5 * 4 =", ("5 * 4", " 20")),
    ("each costs 10 / 4 =", ("10 / 4", " 2.5")),
    ("x = 3 =", None), ("there are 3 =", None), ("no equals sign 2 + 2", None),
])
def test_the_injection_finds_the_span_before_equals(text, hit):
    assert cot.calculator_injection(text) == hit


# ----------------------------------------------------------------------------- decoding


class CharTokenizer:
    """One token per ASCII character; id 0 ends the text."""

    eot_token = None

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, *, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i)


class ScriptedModel(nn.Module):
    """Writes `script` after whatever prompt it is given, one character per step, whatever
    was injected in between (it reads its position from its cache), then id 0. Records the
    tokens of every forward call."""

    def __init__(self, script: str, context: int = 4096):
        super().__init__()
        self.script = script
        self.config = SimpleNamespace(context=context, vocab_size=128)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.calls: list[list[int]] = []

    def new_cache(self, batch, max_len=None, cache_cls=None):
        return SimpleNamespace(ids=[], n_prompt=None, max_len=max_len, pos=0)

    def prepare_for_inference(self):
        pass

    def row_positions(self, pad, start, T):
        return torch.arange(start, start + T)

    def forward(self, tokens, *, cache=None, positions=None, pad_mask=None, last_only=False):
        fed = tokens[0].tolist()
        self.calls.append(fed)
        cache.ids += fed
        cache.pos += len(fed)
        assert len(cache.ids) <= cache.max_len
        if cache.n_prompt is None:
            cache.n_prompt = len(fed)
        i = len(cache.ids) - cache.n_prompt
        nxt = ord(self.script[i]) if i < len(self.script) else 0
        logits = torch.zeros(1, 1, 128)
        logits[0, 0, nxt] = 1.0
        return logits


SCRIPT = " 2 + 3 = 7. So 5 * 2 = 11. The answer is 11.\n\nQ: next"


def _generate(model, prompt="Q: x\nA:", calculator=True, max_new=100):
    tok = CharTokenizer()
    return cot.generate_cot(model, tok, tok.encode(prompt), stop_ids={0}, calculator=calculator,
                            sampling=Sampling(max_new_tokens=max_new, temperature=0))


def test_without_the_calculator_the_model_writes_its_own_arithmetic():
    out = _generate(ScriptedModel(SCRIPT), calculator=False)
    assert out.text == " 2 + 3 = 7. So 5 * 2 = 11. The answer is 11." and out.injections == []


def test_the_calculator_injects_results_and_decoding_continues_on_the_cache():
    model = ScriptedModel(SCRIPT)
    out = _generate(model)
    assert out.text == " 2 + 3 = 5. So 5 * 2 = 10. The answer is 11."
    assert out.injections == [("2 + 3", " 5"), ("5 * 2", " 10")]
    prompt = CharTokenizer().encode("Q: x\nA:")
    assert model.calls[0] == prompt  # one prefill ...
    # ... then one token per step, or "=" with its injected result: never a restart
    assert all(len(c) == 1 or c[0] == ord("=") for c in model.calls[1:])
    assert [ord("="), ord(" "), ord("5")] in model.calls  # "=" and its result in one cached step
    # every token but the last (the "\n\n" stop) went through the model exactly once
    assert sum(map(len, model.calls)) == len(prompt) + out.n_tokens - 1


def test_injected_tokens_count_towards_max_new_tokens():
    out = _generate(ScriptedModel(SCRIPT), max_new=8)  # " 2 + 3 =" then no room for " 5"
    assert out.n_tokens == 8 and out.text == " 2 + 3 ="
    out = _generate(ScriptedModel(SCRIPT), max_new=9)
    assert out.text == " 2 + 3 = " and out.injections == [("2 + 3", " ")]


@pytest.mark.parametrize("compile_", [False, True])
def test_the_cached_loop_computes_what_a_fresh_forward_would(monkeypatch, compile_):
    """With a real (tiny, random) model: after an injection, every greedy token equals the
    argmax of an uncached forward over the whole sequence, so the cache stayed consistent."""
    torch.manual_seed(0)
    cfg = get_preset("llama-tiny").config.replace(n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                                   vocab_size=128, context=64)
    model = build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    # inject "=42" after the 3rd token, whatever the text is
    monkeypatch.setattr(cot, "calculator_injection",
                        lambda text: ("fake", "=42") if len(text.replace("\x00", "")) == 3 else None)
    tok = CharTokenizer()
    prompt = tok.encode("Q: 1\nA:")
    out = cot.generate_cot(model, tok, prompt, stop=(), stop_ids=set(), calculator=True,
                           sampling=Sampling(max_new_tokens=20, temperature=0, compile=compile_))
    assert out.injections == [("fake", "=42")] and out.n_tokens == 20
    ids = tok.encode(out.text)
    assert ids[3:6] == tok.encode("=42")
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids]))[0]
    for t in range(6, len(ids)):  # the tokens decoded after the injection
        assert logits[len(prompt) + t - 1].argmax().item() == ids[t]


# ----------------------------------------------------------------------------- tasks


class FakeLM:
    """Just what the CoT runners use of a septet.api.LoadedModel."""

    def __init__(self, model):
        self.model, self.tokenizer, self.name, self.eos_ids = model, CharTokenizer(), "fake", (0,)
        self.prompts: list[str] = []

    def encode(self, text):
        self.prompts.append(text)
        return self.tokenizer.encode(text)


def test_problems_load_from_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"question": "What is 2 + 2?", "answer": 4},
            {"question": "Ann has 3 pens...", "answer": "She had 3 + 4 = 7.\n#### 1,007"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [(p.question, p.answer) for p in cot.load_problems(path)] == [
        ("What is 2 + 2?", "4"), ("Ann has 3 pens...", "1007")]
    for bad, message in [('{"question": "q"}', "answer"), ('{"answer": 3}', "question"),
                         ("not json", "not JSON"), ('{"question": "q", "answer": "none"}', "final number")]:
        path.write_text(bad + "\n")
        with pytest.raises(DataError, match=message):
            cot.load_problems(path)


def test_synthetic_problems_are_deterministic_and_correct():
    a, b = cot.synthetic_problems(5, seed=3), cot.synthetic_problems(5, seed=3)
    assert a == b and len({p.question for p in a}) == 5
    for p in a:
        nums = [int(w) for w in p.question.replace(".", " ").split() if w.isdigit()]
        assert int(p.answer) == nums[0] + nums[1] * nums[2]


def test_run_gsm8k_cot_end_to_end():
    problems = [cot.Example("Ann has 2 + 5 pens.", "7"), cot.Example("Bob has 8.", "8")]
    lm = FakeLM(ScriptedModel(" 2 + 5 = 9. The answer is 9.\n\n"))
    plain = cot.run_gsm8k_cot(lm, problems, shots=8)
    assert (plain["metric"], plain["value"], plain["n"]) == ("exact_match", 0.0, 2)
    assert lm.prompts[0].startswith("Q: There are 15 trees in the grove.")
    assert lm.prompts[0].endswith("The answer is 8.\n\nQ: Ann has 2 + 5 pens.\nA:")
    assert lm.prompts[0].count("\n\nQ: ") == 8
    lm = FakeLM(ScriptedModel(" 2 + 5 = 9. The answer is 7.\n\n"))
    calc = cot.run_gsm8k_cot(lm, problems, shots=2, calculator=True)
    assert calc["value"] == 0.5 and calc["stderr"] == pytest.approx(0.5)
    rec = calc["records"][0]
    assert rec["completion"] == " 2 + 5 = 7. The answer is 7." and rec["injections"] == [["2 + 5", " 7"]]
    assert rec["prediction"] == "7" and rec["correct"] and rec["shots"] == 2
    with pytest.raises(InputError, match="shots"):
        cot.run_gsm8k_cot(lm, problems, shots=9)


def test_too_many_shots_for_the_context_are_reduced_with_a_warning():
    lm = FakeLM(ScriptedModel(" The answer is 1.", context=600))
    with pytest.warns(UserWarning, match="do not fit"):
        out = cot.run_gsm8k_cot(lm, [cot.Example("Q?", "1")], shots=8, max_new_tokens=32)
    assert 0 < out["records"][0]["shots"] < 8 and out["value"] == 1.0


@pytest.fixture(scope="module")
def mmlu(tasks_dir):
    return cot.load_mmlu_cot()


def test_mmlu_cot_dev_examples_load_with_their_answers(mmlu):
    assert len({e.subject for e in mmlu}) == 57 and len(mmlu) == 282
    for e in mmlu:
        assert e.target.startswith("Let's think step by step.")
        assert f"answer is ({e.answer})" in e.target and f"({e.answer})" in e.question
        assert e.description.startswith("The following are multiple choice questions")
    with pytest.raises(InputError, match="unknown MMLU subject"):
        cot.load_mmlu_cot(["astrology"])


def test_mmlu_cot_json_agrees_with_the_subject_yaml(tasks_dir, mmlu):
    yaml = pytest.importorskip("yaml")
    for subject in ("abstract_algebra", "formal_logic", "high_school_mathematics"):
        doc = yaml.safe_load((tasks_dir / "mmlu" / "flan_cot_fewshot" / f"mmlu_{subject}.yaml").read_text())
        ours = [(e.question, e.target) for e in mmlu if e.subject == subject]
        assert ours == [(s["question"].strip(), s["target"].strip()) for s in doc["fewshot_config"]["samples"]]


def test_mmlu_cot_scoring_never_shows_the_item_under_test(mmlu):
    items = [e for e in mmlu if e.subject == "high_school_mathematics"]
    lm = FakeLM(ScriptedModel(f" So it is 4. The answer is ({items[0].answer}).\n\n"))
    out = cot.run_mmlu_cot(lm, items, shots=4)
    assert out["n"] == len(items) and out["records"][0]["correct"]
    assert out["value"] == pytest.approx(sum(e.answer == items[0].answer for e in items) / len(items))
    for item, prompt in zip(items, lm.prompts):
        assert prompt.endswith(f"Q: {item.question}\nA: Let's think step by step.")
        assert item.target not in prompt
        assert prompt.count("\n\nQ: ") == 5  # the description, then 4 exemplars and the item
