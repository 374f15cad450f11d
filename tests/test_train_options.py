"""Training options applied from outside the model: every family through the loop with its
paper optimizer, activation checkpointing, bf16 autocast and torch.compile."""

from __future__ import annotations

import pytest
import torch
from test_train import losses, tiny_run

from septet.train.loop import train
from septet.train.metrics import read_metrics

FAMILY_TINY = {
    "gpt3-tiny": {"n_layer": 2, "d_model": 64, "n_head": 4, "vocab_size": 512, "context": 64, "window": 16},
    "palm-tiny": {"n_layer": 2, "d_model": 64, "n_head": 4, "d_head": 16, "vocab_size": 512, "context": 64},
    "lamda-tiny": {"n_layer": 2, "d_model": 64, "n_head": 4, "d_ff": 256, "vocab_size": 512, "context": 64},
    "gpt4-moe-tiny": {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "d_ff": 64,
                      "vocab_size": 512, "context": 64},
}


@pytest.mark.parametrize("preset", sorted(FAMILY_TINY))
def test_every_family_trains_with_its_recipe(tmp_path, small_corpus, preset):
    out = tmp_path / preset
    summary = train(tiny_run(out, small_corpus, model=preset, overrides=FAMILY_TINY[preset],
                             steps=12, eval_every=12, ckpt_every=12, lr=3e-3 if preset != "palm-tiny" else None))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 12
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # it learns
    assert summary["val_loss"] < rows[0]["loss"]
    if preset == "palm-tiny":
        assert all(r["z_loss"] > 0 for r in rows)  # PaLM's z-loss is logged
    if preset == "gpt4-moe-tiny":
        assert all(r["moe_balance_loss"] > 0 and r["moe_dropped_fraction"] == 0 for r in rows)


def test_activation_checkpointing_gives_the_same_run(tmp_path, small_corpus):
    a = tmp_path / "plain"
    b = tmp_path / "ac"
    train(tiny_run(a, small_corpus, steps=4))
    train(tiny_run(b, small_corpus, steps=4, activation_checkpointing=True))
    la, lb = losses(a), losses(b)
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5)


def test_bf16_autocast_tracks_fp32(tmp_path, small_corpus):
    a = tmp_path / "fp32"
    b = tmp_path / "bf16"
    train(tiny_run(a, small_corpus, steps=6))
    train(tiny_run(b, small_corpus, steps=6, dtype="bf16"))
    la, lb = losses(a), losses(b)
    assert lb[6] < lb[1]
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=2e-2)


def test_compile_gives_the_same_losses(tmp_path, small_corpus):
    a = tmp_path / "eager"
    b = tmp_path / "compiled"
    train(tiny_run(a, small_corpus, steps=3, eval_every=3, ckpt_every=3))
    train(tiny_run(b, small_corpus, steps=3, eval_every=3, ckpt_every=3, compile=True))
    la, lb = losses(a), losses(b)
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-4)
    torch._dynamo.reset()
