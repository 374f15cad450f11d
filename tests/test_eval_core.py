"""Evaluation core: scoring (prefix reuse, batching, boundaries, rolling windows, greedy
and beam decoding) against brute-force references, HF transformers parity, the GPT-3
few-shot protocol, metrics, the JSONL format, reports and the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from septet.api import LoadedModel
from septet.errors import DataError, InputError
from septet.eval import fewshot
from septet.eval.catalog import get_task
from septet.eval.metrics import accuracy, choice_scores, exact_match, mean_stderr, normalize_answer, token_f1
from septet.eval.report import Row, markdown_table, write_report
from septet.eval.scoring import Scorer
from septet.eval.tasks import Doc, Task, TaskConfig, load_jsonl
from septet.models import build, get_preset
from septet.tokenizer import Tokenizer

V = 64


def _tiny(name: str, vocab: int = V, context: int = 96, **over):
    torch.manual_seed(0)
    cfg = get_preset(name).config.replace(**{**dict(n_layer=2, d_model=32, n_head=4, vocab_size=vocab,
                                                    context=context), **over})
    model = build(cfg).eval()
    with torch.no_grad():  # sharper than the init: far-from-uniform logits, no near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def _byte_scorer(model, batch_size: int = 4) -> Scorer:
    """Characters as tokens (code point mod V): a tokenizer with no boundary effects."""
    return Scorer(model, lambda s: [ord(c) % V for c in s], lambda ids: "".join(chr(97 + i % 26) for i in ids),
                  prefix_id=0, batch_size=batch_size)


def _brute(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One uncached forward of ctx + cont[:-1]: the reference log P(cont | ctx)."""
    with torch.no_grad():
        lp = model(torch.tensor([ctx + cont[:-1]])).float().log_softmax(-1)[0]
    rows = lp[len(ctx) - 1:]
    return rows[torch.arange(len(cont)), cont].sum().item(), bool((rows.argmax(-1) == torch.tensor(cont)).all())


FAMILIES = [("llama-tiny", dict(n_kv_head=2)), ("gpt3-tiny", dict(window=8)), ("lamda-tiny", {})]


@pytest.mark.parametrize("name,over", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_batched_prefix_reuse_equals_brute_force(name, over):
    model = _tiny(name, **over)
    sc = _byte_scorer(model, batch_size=3)  # forces several batches and padded contexts
    pairs = [("the cat sat on", " the mat"), ("the cat sat on", " a hat"), ("the cat sat on", " x"),
             ("a", " much longer continuation here"), ("", "empty context"), ("mid length ctx", " yes"),
             ("the cat sat on", " the mat!"), ("mid length ctx", " no")]
    got = sc.loglikelihood(pairs, boundary="separate")
    for (c, x), g in zip(pairs, got):
        ref, greedy = _brute(model, sc.context_ids(c), sc.encode(x))
        assert g.logprob == pytest.approx(ref, abs=1e-4), (c, x)
        assert g.is_greedy == greedy and g.n_tokens == len(x) and g.n_chars == len(x)


def test_shared_context_runs_once(monkeypatch):
    model = _tiny("llama-tiny", n_kv_head=2)
    sc = _byte_scorer(model, batch_size=16)
    calls = []
    real = model.forward

    def spy(tokens, **kw):
        calls.append(tuple(tokens.shape))
        return real(tokens, **kw)

    monkeypatch.setattr(model, "forward", spy)
    ctx = "a shared context of some length"
    sc.loglikelihood([(ctx, " one"), (ctx, " two"), (ctx, " three"), (ctx, " four")], boundary="separate")
    # one prefill of the context (batch 1), one pass of all four continuations
    assert calls == [(1, len(ctx)), (4, len(" three") - 1)]


def test_over_long_pairs_are_refused_or_truncated():
    model = _tiny("llama-tiny", n_kv_head=2, context=32)
    sc = _byte_scorer(model)
    with pytest.raises(InputError, match="exceeds the model's context of 32"):
        sc.loglikelihood([("x" * 30, " abcdef")])
    (lp, _), = sc.loglikelihood_ids([(list(range(1, 31)), [5, 6, 7, 8, 9])], truncate=True)
    ref, _ = _brute(model, list(range(3, 31)), [5, 6, 7, 8, 9])  # the oldest 2 tokens dropped
    assert lp == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("stride", [None, 10])
def test_rolling_loglikelihood_windows(stride):
    model = _tiny("llama-tiny", n_kv_head=2, context=24)
    sc = _byte_scorer(model)
    text = "the quick brown fox jumps over the lazy dog " * 2
    full = [0] + sc.encode(text)
    got = sc.rolling_loglikelihood(text, stride=stride)
    step = stride or 24
    ref = 0.0
    for a in range(1, len(full), step):  # each window: at most 24 inputs, scores `step` tokens
        b = min(a + step, len(full))
        s = max(0, b - 1 - 24)
        ref += _brute(model, full[s:a], full[a:b])[0]
    assert got.n_tokens == len(text) and got.logprob == pytest.approx(ref, abs=1e-3)
    short = sc.rolling_loglikelihood("short text")
    assert short.logprob == pytest.approx(_brute(model, [0], sc.encode("short text"))[0], abs=1e-4)


def test_greedy_generation_batched_equals_single_and_stops():
    model = _tiny("llama-tiny", n_kv_head=2)
    sc = _byte_scorer(model, batch_size=3)
    prompts = ["abc", "a much longer prompt", "q"]
    alone = [sc.generate_until([p], max_new_tokens=12)[0] for p in prompts]
    assert sc.generate_until(prompts, max_new_tokens=12) == alone
    for p, free in zip(prompts, alone):  # reference: argmax step by step without a cache
        ids = sc.context_ids(p)
        for _ in range(12):
            with torch.no_grad():
                ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
        assert sc.decode(ids[len(sc.context_ids(p)):]) == free
    stop = alone[0][3:5]
    cut = sc.generate_until(["abc"], stop=[stop], max_new_tokens=12)[0]
    assert cut == alone[0][:alone[0].index(stop)]


def test_compiled_greedy_generation_equals_eager():
    """`septet eval --compile`: the static compiled decode step gives the eager tokens for a
    left-padded batch (cache slots rounded up to a bucket, keys masked)."""
    model = _tiny("llama-tiny", n_kv_head=2)
    prompts = ["abc", "a much longer prompt", "q"]
    eager = _byte_scorer(model, batch_size=3).generate_until(prompts, max_new_tokens=10)
    compiled = _byte_scorer(model, batch_size=3)
    compiled.compile = True
    assert compiled.generate_until(prompts, max_new_tokens=10) == eager


def test_beam_search_is_exhaustive_with_enough_beams():
    """With beams >= V^(n-1) nothing is pruned: the result is the best sequence under the
    GNMT-normalised score among all continuations of n tokens (or ended by an end token)."""
    vocab, n, alpha = 5, 3, 0.6
    model = _tiny("llama-tiny", vocab=vocab, n_kv_head=2)
    sc = Scorer(model, lambda s: [ord(c) % vocab for c in s], lambda ids: "".join("abcde"[i] for i in ids),
                prefix_id=0, stop_ids=[4])
    prompt = [ord(c) % vocab for c in "cab"]
    lp = lambda k: ((5 + k) / 6) ** alpha  # noqa: E731
    best, best_text = -math.inf, None
    for k in range(1, n + 1):
        for seq in itertools.product(range(vocab), repeat=k):
            if 4 in seq[:-1] or (k < n and seq[-1] != 4):
                continue  # an end token only last; shorter sequences must end with it
            total, _ = _brute(model, prompt, list(seq))
            if total / lp(k) > best:
                best, best_text = total / lp(k), "".join("abcde"[i] for i in seq if i != 4)
    assert sc.beam_search("cab", beams=vocab ** (n - 1), length_penalty=alpha, max_new_tokens=n) == best_text
    # beam 1 without a penalty is greedy decoding
    assert sc.beam_search("cab", beams=1, length_penalty=0.0, max_new_tokens=n) == \
        sc.generate_until(["cab"], max_new_tokens=n)[0]


# ----------------------------------------------------------------------------- boundaries

@pytest.fixture(scope="module")
def bpe_lm() -> LoadedModel:
    words = "the cat sat on a mat answer paris london rome city capital of france is what".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(4000))
    tok = Tokenizer.train_bpe([text], 300)
    return LoadedModel(_tiny("llama-tiny", vocab=300, n_kv_head=2, context=128), tok, name="bpe-tiny")


def test_joint_boundary_moves_trailing_space(bpe_lm):
    sc = Scorer.from_loaded(bpe_lm)
    tok = bpe_lm.tokenizer
    ctx, cont = sc.split("capital of france is: ", "paris", "joint")
    assert ctx == tok.encode("capital of france is:") and cont == tok.encode(" paris")
    ctx, cont = sc.split("capital of france is: ", "paris", "separate")
    assert ctx == tok.encode("capital of france is: ") and cont == tok.encode("paris")
    assert sc.split("", "paris", "joint") == ([tok.eot_id], tok.encode("paris"))


# ----------------------------------------------------------------------------- HF parity

def test_choice_loglikelihoods_match_transformers():
    transformers = pytest.importorskip("transformers")
    from septet.checkpoints.hf import hf_llama_to_septet
    from septet.models import LLaMA, LLaMAConfig

    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-6,
                                   max_position_embeddings=128, tie_word_embeddings=False,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    ours = LLaMA(LLaMAConfig(vocab_size=V, n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128,
                             norm_eps=1e-6, context=128, rope_style="half", tie_embeddings=False)).eval()
    ours.load_state_dict(hf_llama_to_septet(hf.state_dict(), ours.config))
    sc = _byte_scorer(ours, batch_size=5)
    items = [("Question: which is bigger?\nAnswer:", [" an elephant", " a mouse", " neither"]),
             ("Q: 2+2\nA:", [" 4", " 5", " twenty two"])]
    pairs = [(c, x) for c, xs in items for x in xs]
    got = sc.loglikelihood(pairs, boundary="separate")
    for (c, x), g in zip(pairs, got):
        ctx, cont = sc.context_ids(c), sc.encode(x)
        with torch.no_grad():
            lp = hf(torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
        ref = sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        assert g.logprob == pytest.approx(ref, abs=1e-3)


@pytest.mark.slow
def test_smollm2_choice_loglikelihoods_match_transformers():
    from hf_reference import hf_model_from_gguf

    import septet

    lm = septet.load("smollm2")
    hf = hf_model_from_gguf(lm.path)
    sc = Scorer.from_loaded(lm)
    ctx = "Question: What is the capital of France?\nAnswer:"
    choices = [" Paris", " London", " Berlin in Germany"]
    got = sc.loglikelihood([(ctx, c) for c in choices])
    for c, g in zip(choices, got):
        ids, cont = sc.split(ctx, c)
        with torch.no_grad():
            lp = hf(torch.tensor([ids + cont])).logits.float().log_softmax(-1)[0]
        ref = sum(lp[len(ids) - 1 + j, t].item() for j, t in enumerate(cont))
        assert g.logprob == pytest.approx(ref, abs=1e-3)
    assert max(range(3), key=lambda i: got[i].logprob) == 0  # a real model knows this one


# ----------------------------------------------------------------------------- metrics

def test_free_form_metrics_by_hand():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert exact_match("the Paris.", ["paris"]) == 1.0 and accuracy("the Paris.", ["paris"]) == 0.0
    assert accuracy(" Paris ", ["Paris"]) == 1.0
    # pred {new, york, city}, gold {new, york}: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("New York City", ["new york", "nyc"]) == pytest.approx(0.8)
    assert token_f1("", [""]) == 1.0 and token_f1("x", [""]) == 0.0
    s = mean_stderr([1, 0, 1, 1])
    assert s.value == 0.75 and s.stderr == pytest.approx(math.sqrt(0.25 / 4))


def test_multiple_choice_modes_by_hand():
    lps, ntok, nchar, unc = [-4.0, -6.0], [2, 6], [4, 30], [-1.0, -5.0]
    assert choice_scores("sum", lps, ntok, nchar) == [-4.0, -6.0]
    assert choice_scores("token", lps, ntok, nchar) == [-2.0, -1.0]
    assert choice_scores("char", lps, ntok, nchar) == [-1.0, -0.2]
    assert choice_scores("uncond", lps, ntok, nchar, unc) == [-3.0, -1.0]


# ----------------------------------------------------------------------------- few-shot protocol

def _task(n: int = 12, train: int = 0, **config) -> Task:
    docs = [Doc(f"Q: item {i}\nA:", (f"yes {i}", f"no {i}"), i % 2) for i in range(n)]
    tr = [Doc(f"Q: train {i}\nA:", ("yes", "no"), 0) for i in range(train)]
    return Task("toy", docs, tr, TaskConfig(**config))


def test_demonstrations_are_seeded_and_never_the_item():
    task = _task()
    for i in range(len(task.test)):
        demos = fewshot.demonstrations(task, i, 5, seed=7)
        assert task.test[i] not in demos and len(set(demos)) == 5
        assert demos == fewshot.demonstrations(task, i, 5, seed=7)
    assert fewshot.demonstrations(task, 0, 5, seed=7) != fewshot.demonstrations(task, 0, 5, seed=8)
    with_train = _task(train=6)
    assert all(d.prompt.startswith("Q: train") for d in fewshot.demonstrations(with_train, 3, 4, 1))
    with pytest.raises(InputError, match="too few for 12 shots"):
        fewshot.demonstrations(task, 0, 12, 1)


def test_prompt_layout_is_gpt3_style():
    task = _task(description="Answer yes or no.")
    text = fewshot.build_prompt(task, task.test[0], [task.test[3], task.test[2]])
    assert text == "Answer yes or no.\nQ: item 3\nA: no 3\nQ: item 2\nA: yes 2\nQ: item 0\nA:"


def test_shots_are_reduced_to_fit_the_context(bpe_lm):
    sc = Scorer.from_loaded(bpe_lm)
    long_docs = [Doc("the cat sat on a mat " * 3 + f"{i}", ("yes", "no"), 0) for i in range(8)]
    task = Task("long", long_docs)
    with pytest.warns(UserWarning, match="did not fit the model's context with 6 shots"):
        rows = fewshot.evaluate(task, sc, 6, seed=0)
    acc = next(r for r in rows if r.metric == "acc")
    assert acc.notes["shots_reduced"] == 8 and acc.notes["min_shots"] < 6
    huge = Task("huge", [Doc("the cat " * 200, ("a", "b"), 0), Doc("x", ("a", "b"), 1)])
    with pytest.raises(InputError, match="even with 0 shots"):
        fewshot.evaluate(huge, sc, 0)


def test_fewshot_evaluate_rows(bpe_lm):
    sc = Scorer.from_loaded(bpe_lm)
    task = _task(mode="uncond")
    rows = fewshot.evaluate(task, sc, 2, seed=0, limit=6)
    by = {r.metric: r for r in rows}
    assert by["acc"].primary and by["acc"].n == 6 and by["acc"].notes["mode"] == "uncond"
    assert by["acc"].value == by["acc_uncond"].value
    assert set(by) == {"acc", "acc_sum", "acc_token", "acc_char", "acc_uncond"}
    again = fewshot.evaluate(task, sc, 2, seed=0, limit=6)
    assert [r.value for r in again] == [r.value for r in rows]  # deterministic
    gen = Task("gen", [Doc(f"Q: {w}\nA:", targets=(w,)) for w in ("paris", "rome", "london", "city")],
               config=TaskConfig(max_new_tokens=4, beams=2))
    metrics = {r.metric: r for r in fewshot.evaluate(gen, sc, 1, seed=0)}
    assert set(metrics) == {"accuracy", "exact_match", "f1"} and metrics["exact_match"].primary
    assert metrics["f1"].notes["decoding"] == "beam 2"


# ----------------------------------------------------------------------------- JSONL tasks

def _write(tmp_path, lines, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_jsonl_task_format(tmp_path):
    p = _write(tmp_path, [{"task": {"mode": "char", "separator": "\n\n", "stop": ["\n", "."]}},
                          {"context": "Q: 1+1?\nA:", "choices": ["2", "3"], "gold": 0},
                          {"input": "Q: capital of Italy?\nA:", "target": ["Rome", "Roma"]},
                          {"context": "demo", "choices": ["a", "b"], "gold": 1, "split": "train"}])
    task = get_task(str(p))
    assert task.name == "t" and len(task.test) == 2 and len(task.train) == 1
    assert task.config.mode == "char" and task.config.stop == ("\n", ".")
    assert task.test[1].targets == ("Rome", "Roma")


@pytest.mark.parametrize("line,match", [
    ('{"context": "c", "choices": ["a", "b"], "gold": 2}', r"line 2: field 'gold' is 2 but there are 2 choices"),
    ('{"context": "c", "choices": ["a"], "gold": 0}', r"line 2: field 'choices' must be a list of at least 2"),
    ('{"input": "c"}', r"line 2: field 'target' must be a string or a non-empty list"),
    ('{"question": "c"}', r"line 2: an item needs"),
    ('{"context": "c", "choices": ["a", "b"]}', r"line 2: missing field 'gold'"),
    ('{not json', r"line 2: not valid JSON"),
    ('[1, 2]', r"line 2: expected a JSON object"),
])
def test_malformed_jsonl_names_line_and_field(tmp_path, line, match):
    p = _write(tmp_path, ['{"input": "ok", "target": "ok"}', line])
    with pytest.raises(DataError, match=match) as e:
        load_jsonl(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_bad_task_settings_and_unknown_task(tmp_path):
    p = _write(tmp_path, [{"task": {"mode": "weird"}}, {"input": "a", "target": "b"}])
    with pytest.raises(DataError, match="mode 'weird' is not one of"):
        load_jsonl(p)
    p = _write(tmp_path, [{"task": {"beam": 4}}, {"input": "a", "target": "b"}])
    with pytest.raises(DataError, match="unknown task setting 'beam'"):
        load_jsonl(p)
    with pytest.raises(InputError, match="unknown task 'no-such-task'"):
        get_task("no-such-task")


# ----------------------------------------------------------------------------- report + CLI

def test_report_files(tmp_path):
    rows = [Row("toy", k, "acc", 0.5 + 0.1 * k, 10, 0.05, primary=True) for k in (0, 1, 3)]
    rows.append(Row("toy", 3, "acc_sum", float("nan"), 1, float("nan"), notes={"shots_reduced": 2}))
    paths = write_report(tmp_path / "out", rows, {"model": "m", "seed": 1})
    data = json.loads(paths["json"].read_text())
    assert data["model"] == "m" and data["results"][0] == {
        "task": "toy", "shots": 0, "metric": "acc", "value": 0.5, "n": 10, "stderr": 0.05, "primary": True}
    assert data["results"][3]["value"] is None
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(rows)
    assert "| toy | **acc** | 0.5000 ± 0.0500 (n=10) | 0.6000 ± 0.0500 (n=10) | 0.8000 ± 0.0500 (n=10) |" in table
    assert "†2" in table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "results.md", "results.png"]


def test_cli_end_to_end_and_one_line_errors(tmp_path, bpe_lm, monkeypatch, capsys):
    import septet.api
    from septet.cli import main

    monkeypatch.setattr(septet.api, "load", lambda *a, **k: bpe_lm)
    p = _write(tmp_path, [{"context": f"the cat {i}", "choices": ["sat", "mat"], "gold": i % 2} for i in range(6)])
    out = tmp_path / "res"
    assert main(["eval", "--model", "x", "--task", str(p), "--shots", "0,2", "--out", str(out),
                 "--json", "--limit", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    accs = [r for r in data["results"] if r["metric"] == "acc"]
    assert [(r["shots"], r["n"]) for r in accs] == [(0, 4), (2, 4)]
    assert (out / "results.png").is_file() and (out / "results.md").is_file()
    bad = _write(tmp_path, ['{"context": "c", "choices": ["a", "b"], "gold": "0"}'], "bad.jsonl")
    for task, msg in [("nope", "unknown task 'nope'"), (str(bad), "field 'gold' must be int")]:
        assert main(["eval", "--model", "x", "--task", task]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1
    assert main(["eval", "--model", "x", "--task", str(p), "--shots", "9"]) == 2
    assert "too few for 9 shots" in capsys.readouterr().err


@pytest.mark.parametrize("compile_", [False, True])
def test_batched_chain_of_thought_equals_one_item_at_a_time(bpe_lm, compile_):
    """Without the calculator, CoT items are decoded several per forward pass (left padded,
    optionally through the compiled static step): the records must equal the one-by-one loop's."""
    from septet.eval import cot

    words = ["the cat sat", "paris is what city", "a mat", "capital of france is", "rome"]
    items = [cot.Example(q, "1") for q in words]
    lm = LoadedModel(_tiny("llama-tiny", vocab=300, n_kv_head=2, context=256), bpe_lm.tokenizer, name="bpe-tiny")
    single = cot.run_gsm8k_cot(lm, items, shots=1, max_new_tokens=12, batch=1)
    batched = cot.run_gsm8k_cot(lm, items, shots=1, max_new_tokens=12, batch=3, compile=compile_)
    assert [r["completion"] for r in batched["records"]] == [r["completion"] for r in single["records"]]
    assert any(r["completion"] for r in single["records"])
