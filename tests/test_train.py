"""End-to-end training: resume equality, the loss-spike guard, FSDP2 under torchrun,
generation from a checkpoint, and one-line errors from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from septet.cli import main
from septet.models.base import DecoderLM
from septet.train.loop import TrainConfig, Trainer, train
from septet.train.metrics import read_metrics

# a ~100k-parameter LLaMA: fast enough for several full runs per test
TINY = {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "vocab_size": 512, "context": 64}


def tiny_run(out: Path, data: Path, **kw) -> TrainConfig:
    args = dict(model="llama-tiny", out=out, data=str(data), steps=8, batch_size=8,
                eval_every=4, eval_batches=2, ckpt_every=4, progress=False, overrides=dict(TINY),
                peak_flops=1e11, spike_factor=0.0)
    args.update(kw)
    return TrainConfig(**args)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r and "step" in r}


def test_resume_after_crash_is_bit_exact(tmp_path, small_corpus, monkeypatch):
    ref = tmp_path / "ref"
    train(tiny_run(ref, small_corpus))
    crashed = tmp_path / "crashed"
    original = Trainer.train_step

    def crash_at_step_6(self):
        if self.step == 5:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_run(crashed, small_corpus))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert sorted(losses(crashed)) == [1, 2, 3, 4, 5]
    train(tiny_run(crashed, small_corpus, resume=True))
    a, b = losses(ref), losses(crashed)
    assert sorted(b) == list(range(1, 9))  # no duplicated rows after the resume
    assert a == b  # bit-exact: the same float losses, not merely close
    from safetensors.torch import load_file

    wa = load_file(ref / "step-00000008" / "model.safetensors")
    wb = load_file(crashed / "step-00000008" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_spike_guard_rewinds_and_skips(tmp_path, small_corpus, monkeypatch):
    original = DecoderLM.loss
    calls = {"n": 0}

    def spiky_loss(self, logits, targets, ignore_index=-100):
        parts = original(self, logits, targets, ignore_index)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 7:  # the 7th training batch is "poisoned"
                parts.ce = parts.ce * 50
                parts.total = parts.total * 50
        return parts

    monkeypatch.setattr(DecoderLM, "loss", spiky_loss)
    out = tmp_path / "spike"
    summary = train(tiny_run(out, small_corpus, steps=10, ckpt_every=2, spike_factor=3.0, spike_window=3))
    assert summary["steps"] == 10
    rows = read_metrics(out / "metrics.jsonl")
    events = [r for r in rows if r.get("event") == "loss_spike"]
    assert len(events) == 1
    ev = events[0]
    assert ev["at_step"] == 7 and ev["rewound_to"] == 6 and ev["skipped_batches"] == 1
    assert all(r["loss"] < 20 for r in rows if "loss" in r and "step" in r)


def test_spike_without_checkpoint_stops_clearly(tmp_path, small_corpus, monkeypatch):
    from septet.train.run import TrainingDiverged

    monkeypatch.setattr(Trainer, "train_step", lambda self: {"spike": float("nan")})
    with pytest.raises(TrainingDiverged, match="lower --lr"):
        train(tiny_run(tmp_path / "nan", small_corpus, max_rewinds=0))


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_torchrun_fsdp2_matches_single_process(tmp_path, small_corpus):
    single = tmp_path / "single"
    train(tiny_run(single, small_corpus, steps=4, eval_every=4, ckpt_every=4))
    dist_out = tmp_path / "fsdp"
    sets = sum((["--set", f"{k}={v}"] for k, v in TINY.items()), [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "septet.cli", "train", "--model", "llama-tiny", "--data", str(small_corpus),
           "--out", str(dist_out), "--steps", "4", "--batch-size", "8", "--eval-every", "4",
           "--eval-batches", "2", "--ckpt-every", "4", "--spike-factor", "0", "--device", "cpu",
           "--no-progress", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(single), losses(dist_out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5)
    # the gathered checkpoint equals the single-process one within float tolerance
    from safetensors.torch import load_file

    wa = load_file(single / "step-00000004" / "model.safetensors")
    wb = load_file(dist_out / "step-00000004" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_generate_from_checkpoint_cli(tmp_path, small_corpus, capsys):
    out = tmp_path / "gen"
    train(tiny_run(out, small_corpus, steps=4))
    rc = main(["generate", "--model", str(out), "--prompt", "HAMLET.", "--max-new-tokens", "12",
               "--seed", "3", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prompt"] == "HAMLET." and isinstance(res["text"], str)
    # same seed, same text
    main(["generate", "--model", str(out), "--prompt", "HAMLET.", "--max-new-tokens", "12",
          "--seed", "3", "--json"])
    assert json.loads(capsys.readouterr().out)["text"] == res["text"]


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err
    return err


def test_cli_errors_are_one_line(tmp_path, capsys):
    one_line_error(capsys, ["train", "--model", "llama-7", "--out", str(tmp_path / "x")], "llama-7b")
    one_line_error(capsys, ["train", "--model", "llama-tiny", "--data", str(tmp_path / "nope.txt"),
                            "--out", str(tmp_path / "x")], "nope.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n\n")
    one_line_error(capsys, ["train", "--model", "llama-tiny", "--data", str(empty),
                            "--out", str(tmp_path / "x")], "empty")
    one_line_error(capsys, ["train", "--model", "llama-tiny", "--set", "n_layers=3",
                            "--out", str(tmp_path / "x")], "n_layers")
    one_line_error(capsys, ["generate", "--model", str(tmp_path / "missing")], "missing")


def test_corrupt_checkpoint_is_one_line(tmp_path, small_corpus, capsys):
    out = tmp_path / "corrupt"
    train(tiny_run(out, small_corpus, steps=4))
    weights = out / "step-00000004" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated, as after a failed copy
    one_line_error(capsys, ["generate", "--model", str(out), "--prompt", "x"], "model.safetensors")


def test_overlong_prompt_is_one_line(tmp_path, small_corpus, capsys):
    out = tmp_path / "long"
    train(tiny_run(out, small_corpus, steps=2, eval_every=2, ckpt_every=2))
    capsys.readouterr()
    rc = main(["generate", "--model", str(out), "--prompt", "the king " * 200])
    captured = capsys.readouterr()
    assert rc == 2
    assert len(captured.err.strip().splitlines()) == 1
    assert "shorten it" in captured.err and "context of 64" in captured.err
    assert captured.out == ""  # nothing echoed before the error
