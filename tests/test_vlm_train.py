"""VLM training, scoring and evaluation on tiny stand-ins (septet.vlm.data/train/infer/evaluate)."""

from __future__ import annotations

import pytest
import torch
from vlm_fixtures import synthetic_vqa, tiny_lm_dir, tiny_train_config

import septet
from septet.checkpoints.native import latest_checkpoint, load_checkpoint
from septet.train.metrics import read_metrics
from septet.vlm import data as D
from septet.vlm.evaluate import EvalConfig, baselines, evaluate_vlm
from septet.vlm.infer import load_vlm
from septet.vlm.train import BridgeTrainer, train_vlm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return tiny_lm_dir(tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def data():
    return synthetic_vqa(24, seed=0), synthetic_vqa(12, seed=1, offset=100)


def run(tc, data, lm_dir):
    train, val = data
    return train_vlm(tc, train=train, val=val, lm=septet.load(str(lm_dir)))


# ----------------------------------------------------------------------------- data

def test_flamingo_chunks_score_only_the_answer_and_eoc():
    fmt = D.Formatter(lambda s: [ord(ch) for ch in s], image_id=1000, eoc_id=1001, eos_id=0)
    q = synthetic_vqa(1).questions[0]
    ids, tgt = fmt.flamingo_chunk(q)
    assert len(ids) == len(tgt) and ids[0] == 1000 and ids[-1] == 1001
    scored = [(t, ids[i + 1]) for i, t in enumerate(tgt) if t != -100]
    assert all(t == nxt for t, nxt in scored)  # position i predicts ids[i + 1]
    answer = fmt.answer(q.answer)
    assert [t for t, _ in scored] == answer + [1001]
    seq_ids, seq_tgt = fmt.flamingo_sequence([fmt.flamingo_chunk(q), fmt.flamingo_chunk(q)])
    assert seq_ids.count(1000) == 2 and sum(t != -100 for t in seq_tgt) == 2 * (len(answer) + 1)


def test_right_padding_and_media_shapes(data):
    train, _ = data
    fmt = D.Formatter(lambda s: [ord(ch) % 200 for ch in s], image_id=300, eoc_id=301, eos_id=0)
    b = D.flamingo_interleaved_batch(train, fmt, 3, 2, torch.Generator().manual_seed(0))
    assert b.tokens.shape == b.targets.shape and len(b.image_ids) == 3
    assert ((b.tokens == 300).sum(1) == 2).all()
    assert D.media_for(train, b.image_ids).shape == (3, 2, 1, 4, 16)  # (B, M, F, N, D)


def test_rices_returns_the_most_similar_images_most_similar_last(data):
    train, _ = data
    rices = D.Rices(train)
    query = train.features.get([5])[0]
    picked = rices.select(query, 3)
    assert picked[-1] == 5  # the image itself is the nearest
    sims = [torch.nn.functional.cosine_similarity(train.features.get([i])[0].mean(0), query.mean(0), dim=0)
            for i in picked]
    assert sims == sorted(sims)
    assert rices.select(query, 0) == []


def test_stage1_batches_have_distinct_captions(data):
    train, _ = data
    ids = D.sample_images(train, 20, torch.Generator().manual_seed(0), distinct_captions=True)
    assert len({train.captions[i] for i in ids}) == len(ids) == 20


def test_answer_alpha_flattens_the_answer_distribution(data):
    train, _ = data
    counts = {a: sum(q.answer == a for q in train.questions) for a in train.answers}
    counts = {a: n for a, n in counts.items() if n}
    for alpha in (0.0, 0.5):
        qs = D.sample_questions(train, 20000, torch.Generator().manual_seed(0), alpha)
        assert qs == D.sample_questions(train, 20000, torch.Generator().manual_seed(0), alpha)  # deterministic
        z = sum(n ** alpha for n in counts.values())
        for a, n in counts.items():
            share = sum(q.answer == a for q in qs) / len(qs)
            assert share == pytest.approx(n ** alpha / z, abs=0.015), (alpha, a)
    with pytest.raises(septet.errors.DataError, match="alpha"):
        D.sample_questions(train, 4, torch.Generator(), 1.5)


@pytest.mark.parametrize("arch", ["flamingo", "blip2"])
def test_logits_at_selects_the_same_logits_as_the_full_forward(tmp_path, data, lm_dir, arch):
    """Training asks for the logits at the answer tokens only; they must be the full
    forward's logits at those positions."""
    train, _ = data
    run(tiny_train_config(arch, lm_dir, tmp_path / arch, steps=1), data, lm_dir)
    vlm = load_vlm(tmp_path / arch)
    with torch.no_grad():
        for name, p in vlm.bridge.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.8)
    b = D.flamingo_vqa_batch(train, vlm.fmt, 3, torch.Generator().manual_seed(0)) if arch == "flamingo" else \
        D.blip_stage2_batch(train, vlm.fmt, 3, 1, torch.Generator().manual_seed(0))
    at = b.targets != -100
    with torch.no_grad():
        if arch == "flamingo":
            media = D.media_for(train, b.image_ids)
            full, some = vlm.bridge(b.tokens, media), vlm.bridge(b.tokens, media, logits_at=at)
        else:
            feats = train.features.get([r[0] for r in b.image_ids])
            full, some = vlm.bridge.model(feats, b.tokens), vlm.bridge.model(feats, b.tokens, logits_at=at)
    assert some.shape == (int(at.sum()), full.shape[-1])
    torch.testing.assert_close(some, full[at])


# ----------------------------------------------------------------------------- training

def test_flamingo_run_writes_a_bridge_only_checkpoint_and_resumes_exactly(tmp_path, data, lm_dir):
    straight = run(tiny_train_config("flamingo", lm_dir, tmp_path / "a", steps=4), data, lm_dir)
    assert straight["steps"] == 4 and straight["val_acc"] is not None
    run(tiny_train_config("flamingo", lm_dir, tmp_path / "b", steps=4, ckpt_every=2), data, lm_dir)
    # simulate a crash after step 2: drop the step-4 checkpoint, resume
    import shutil

    shutil.rmtree(tmp_path / "b" / "step-00000004")
    run(tiny_train_config("flamingo", lm_dir, tmp_path / "b", steps=4, resume=True), data, lm_dir)
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert set(a.model_state) == set(b.model_state)
    assert not any(k.startswith("lm.") for k in a.model_state)  # only the bridge is stored
    assert a.config["lm"] == str(lm_dir) and a.config["vision"] == "tiny-test"
    for k in a.model_state:
        torch.testing.assert_close(a.model_state[k], b.model_state[k], rtol=0, atol=0)
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss_vqa", "loss_caption", "loss_interleaved"} <= set(rows[0])


def test_blip2_runs_stage1_then_stage2(tmp_path, data, lm_dir):
    summary = run(tiny_train_config("blip2", lm_dir, tmp_path / "b2"), data, lm_dir)
    assert summary["steps"] == 5
    rows = read_metrics(tmp_path / "b2" / "metrics.jsonl")
    assert [r["stage"] for r in rows] == [1, 1, 2, 2, 2]
    assert {"loss_itc", "loss_itm", "loss_itg"} <= set(rows[0])
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "b2"))
    assert any(k.startswith("stage1.qformer.") for k in ckpt.model_state)
    assert any(k.startswith("proj.") for k in ckpt.model_state)
    assert not any(".lm." in k or k.startswith("lm.") for k in ckpt.model_state)


@pytest.mark.parametrize("arch", ["flamingo", "blip2"])
def test_bridge_trainer_killed_after_a_checkpoint_resumes_to_the_same_losses(tmp_path, data, lm_dir, arch,
                                                                             monkeypatch):
    """Killed in step 4 (the newest checkpoint is step 2; BLIP-2 then starts stage 2), then
    resumed through septet.train.run: every logged row equals the uninterrupted run's."""
    def config(out, **kw):
        return tiny_train_config(arch, lm_dir, out, steps=4, stage1_steps=2, eval_every=3, ckpt_every=2, **kw)

    run(config(tmp_path / "straight"), data, lm_dir)
    original = BridgeTrainer.train_step

    def killed_in_step_4(self):
        if self.loop.step == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(BridgeTrainer, "train_step", killed_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path / "resumed"), data, lm_dir)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000002"
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3]
    summary = run(config(tmp_path / "resumed", resume=True), data, lm_dir)
    total = 4 + (2 if arch == "blip2" else 0)
    assert summary["steps"] == total

    def rows(out):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_metrics(out / "metrics.jsonl")]

    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, total + 1))
    assert resumed == straight  # losses, lr, grad norms and val_acc: equal floats
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "resumed"), with_training_state=True)
    assert ckpt.train_state["data"] == {"position": total}
    assert ckpt.train_state["train_config"]["arch"] == arch


def test_resume_with_another_bridge_config_is_refused(tmp_path, data, lm_dir):
    run(tiny_train_config("flamingo", lm_dir, tmp_path / "r", steps=2), data, lm_dir)
    with pytest.raises(septet.errors.ConfigError, match="another config"):
        run(tiny_train_config("flamingo", lm_dir, tmp_path / "r", steps=3, n_latents=8, resume=True), data, lm_dir)


# ----------------------------------------------------------------------------- scoring

@pytest.mark.parametrize("arch", ["flamingo", "blip2"])
def test_cached_ranking_equals_the_full_forward(tmp_path, data, lm_dir, arch):
    """VLM.rank (prefix once in a KV cache, candidates as right-padded rows) must give the
    same log-likelihoods as scoring each full sequence from scratch."""
    train, _ = data
    run(tiny_train_config(arch, lm_dir, tmp_path / arch, steps=2), data, lm_dir)
    vlm = load_vlm(tmp_path / arch)
    with torch.no_grad():  # open Flamingo's gates so the image matters
        for name, p in vlm.bridge.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.8)
    q = train.questions[0]
    feats = train.features.get([q.image_id])
    cands = [vlm.fmt.answer(a) for a in train.answers] + [vlm.fmt.encode(" red circle")]  # one multi-token
    prompt, media = vlm._prompt(vlm.fmt.question(q.text), feats)
    fast = vlm.rank(vlm.prefix_batch(prompt[:1], media), [prompt[1:]], cands)[0]
    for c, toks in enumerate(cands):
        ids = torch.tensor([prompt + toks])
        with torch.no_grad():
            logits = vlm.bridge(ids, media) if arch == "flamingo" else vlm.bridge.model(media, ids)
        logp = logits[0].float().log_softmax(-1)
        full = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(toks))
        assert fast[c].item() == pytest.approx(full, abs=1e-4)


def test_evaluation_reports_every_setting_and_the_baselines(tmp_path, data, lm_dir):
    train, test = data
    run(tiny_train_config("flamingo", lm_dir, tmp_path / "f", steps=2), data, lm_dir)
    vlm = load_vlm(tmp_path / "f")
    ec = EvalConfig(shots=(0, 2), images=3, generate_questions=2)
    results = evaluate_vlm(vlm, test, train, ec)
    assert [r.name for r in results] == ["flamingo 0-shot", "flamingo 2-shot random", "flamingo 2-shot rices"]
    assert all(r.n == 9 and 0 <= r.ranked <= 1 for r in results)
    assert results[0].n_generated == 2 and results[1].generated is None
    lm = septet.load(str(lm_dir))
    base = baselines(lm.model, lm.tokenizer, lm.tokenizer.eot_id, train, test, ec)
    assert base[0].name.startswith("majority") and base[1].name.startswith("text-only") and base[1].n == 9
