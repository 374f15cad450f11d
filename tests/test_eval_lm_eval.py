"""The `septet` model type inside lm-evaluation-harness, on local YAML tasks (no hub)."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

# the harness reads local JSON through `datasets`: never reach for the hub, cache in tmp
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="septet-hf-datasets-"))

lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402

from septet.api import LoadedModel  # noqa: E402
from septet.eval.lm_eval_adapter import SeptetLM  # noqa: E402
from septet.models import build, get_preset  # noqa: E402
from septet.tokenizer import Tokenizer  # noqa: E402

WORDS = "the cat sat on a mat answer paris london rome city capital of france is what yes no".split()


@pytest.fixture(scope="module")
def adapter() -> SeptetLM:
    text = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(4000))
    tok = Tokenizer.train_bpe([text], 300)
    torch.manual_seed(0)
    cfg = get_preset("llama-tiny").config.replace(n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                                                  vocab_size=300, context=64)
    model = build(cfg).eval()
    return SeptetLM(loaded=LoadedModel(model, tok, name="tiny"), batch_size=4)


class Req:
    """The part of lm_eval's Instance the model reads."""

    def __init__(self, *args):
        self.args = args


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("septet") is SeptetLM


def test_requests_map_to_the_scorer(adapter):
    sc = adapter.scorer
    reqs = [Req("the cat sat on", " a mat"), Req("the cat sat on", " a city"), Req("", "paris")]
    out = adapter.loglikelihood(reqs)
    ref = sc.loglikelihood([r.args for r in reqs], boundary="joint")
    assert [lp for lp, _ in out] == pytest.approx([s.logprob for s in ref])
    assert all(isinstance(g, bool) for _, g in out)
    long_text = " ".join(WORDS * 6)  # longer than the 64-token context: several windows
    (rolled,) = adapter.loglikelihood_rolling([Req(long_text)])
    assert rolled == pytest.approx(sc.rolling_loglikelihood(long_text).logprob) and rolled < 0
    gens = adapter.generate_until([Req("the cat", {"until": ["\n"], "max_gen_toks": 5}),
                                   Req("paris is", {"until": "mat", "max_gen_toks": 3})])
    assert gens[0] == sc.generate_until(["the cat"], stop=["\n"], max_new_tokens=5)[0]
    assert "mat" not in gens[1]
    # a context longer than the model's is cut from the left, as lm-eval's HF model does
    (lp, _), = adapter.loglikelihood([Req(" ".join(WORDS * 5), " yes")])
    assert lp < 0


def _yaml_tasks(tmp_path) -> str:
    mc = [{"question": f"the cat sat on a {w} is", "choices": [" yes", " no"], "gold": i % 2}
          for i, w in enumerate(["mat", "city", "paris", "rome"])]
    gen = [{"question": "capital of france is", "answer": "paris"}, {"question": "the cat sat on", "answer": "a mat"}]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in mc))
    (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps(x) for x in gen))
    (tmp_path / "septet_toy_mc.yaml").write_text(f"""
task: septet_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (tmp_path / "septet_toy_gen.yaml").write_text(f"""
task: septet_toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""")
    (tmp_path / "septet_toy_ppl.yaml").write_text(f"""
task: septet_toy_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'gen.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}} {{{{answer}}}}"
metric_list:
  - metric: word_perplexity
""")
    return str(tmp_path)


def test_local_yaml_tasks_run_through_simple_evaluate(adapter, tmp_path):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=_yaml_tasks(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(model=adapter, tasks=["septet_toy_mc", "septet_toy_gen", "septet_toy_ppl"],
                                  task_manager=tm, num_fewshot=0, bootstrap_iters=0)
    res = out["results"]
    assert 0.0 <= res["septet_toy_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["septet_toy_gen"]["exact_match,none"] <= 1.0
    assert res["septet_toy_ppl"]["word_perplexity,none"] > 1.0
    # the harness's per-choice scores are the adapter's: recompute one item's accuracy
    sc = adapter.scorer
    docs = [json.loads(x) for x in (tmp_path / "mc.jsonl").read_text().splitlines()]
    acc = []
    for d in docs:
        lps = [s.logprob for s in sc.loglikelihood([(d["question"], c) for c in d["choices"]])]
        acc.append(float(max(range(2), key=lambda i: lps[i]) == d["gold"]))
    assert res["septet_toy_mc"]["acc,none"] == pytest.approx(sum(acc) / len(acc))
