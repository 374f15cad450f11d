"""The training skeleton (septet.train.run) with a toy trainer: the interface a trainer
implements, resume, checkpoint retention, atomic saves and the loss-spike rewind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from septet.checkpoints import native
from septet.checkpoints.native import Checkpoint, list_checkpoints, load_checkpoint
from septet.errors import CheckpointError
from septet.train.metrics import read_metrics
from septet.train.run import LoopOptions, SeededDraws, Snapshot, TrainingDiverged, TrainingLoop, resume_point


class Toy:
    """Everything a trainer supplies: model, optimizer, data source, one step, eval, state."""

    def __init__(self, out: Path, steps: int = 10, resume: bool = False, **opts):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.05)
        self.batches = SeededDraws(seed=7)
        self.loop = TrainingLoop(self, LoopOptions(out=out, steps=steps, progress=False, **opts),
                                 config={"steps": steps, "lr": 0.05}, resume_from=resume_point(out, resume))

    def train_step(self) -> dict:
        g = self.batches.next_generator()
        x = torch.randn(16, 4, generator=g)
        noise = 0.1 * torch.randn(16, 1)  # the global RNG: restored on resume
        loss = (self.model(x) - x.sum(1, keepdim=True) - noise).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()}

    def evaluate(self) -> dict:
        return {"val_weight_error": (self.model.weight - 1).abs().max().item()}

    def snapshot(self) -> Snapshot:
        return Snapshot(model=self.model.state_dict(), config={"family": "toy"}, optimizer=self.opt.state_dict())

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict(ckpt.model_state)
        self.opt.load_state_dict(ckpt.optimizer_state)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "step" in r}


def steps_saved(out: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(out)]


def test_toy_trainer_runs_through_the_loop(tmp_path):
    toy = Toy(tmp_path, steps=40, eval_every=20, ckpt_every=10)
    last = toy.loop.fit()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"loss", "elapsed_s"} <= set(rows[0]) and "val_weight_error" in rows[19]
    assert last == rows[-1] and rows[-1]["loss"] < rows[0]["loss"] / 10  # it learns
    assert steps_saved(tmp_path) == [30, 40]  # keep_checkpoints=2 by default
    assert toy.loop.last_checkpoint == tmp_path / "step-00000040"
    assert (tmp_path / "loss.png").stat().st_size > 0
    ckpt = load_checkpoint(toy.loop.last_checkpoint, with_training_state=True)
    assert ckpt.train_state["step"] == 40
    assert ckpt.train_state["data"] == {"position": 40}  # the data source's resumable position
    assert ckpt.train_state["train_config"] == {"steps": 40, "lr": 0.05}  # the config snapshot


def test_resume_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    Toy(straight, steps=12, ckpt_every=4).loop.fit()
    crashed = tmp_path / "crashed"
    toy = Toy(crashed, steps=12, ckpt_every=4)
    original = toy.train_step

    def killed_after_6():
        if toy.loop.step == 6:
            raise KeyboardInterrupt
        return original()

    toy.train_step = killed_after_6
    with pytest.raises(KeyboardInterrupt):
        toy.loop.fit()
    assert steps_saved(crashed) == [4]
    resumed = Toy(crashed, steps=12, ckpt_every=4, resume=True)
    assert resumed.loop.step == 4 and resumed.batches.position == 4
    resumed.loop.fit()
    assert losses(crashed) == losses(straight)  # bit-exact, and steps 5-6 are not logged twice
    a = load_checkpoint(straight / "step-00000012").model_state
    b = load_checkpoint(crashed / "step-00000012").model_state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_retention_keeps_the_newest_k(tmp_path):
    Toy(tmp_path, steps=10, ckpt_every=2, keep_checkpoints=3, save_at_start=True).loop.fit()
    assert steps_saved(tmp_path) == [6, 8, 10]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-00000006", "step-00000008",
                                                                        "step-00000010"]


def test_a_crash_mid_save_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = native.save_file
    calls = {"n": 0}

    def dies_in_the_second_checkpoint(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 5:  # each checkpoint writes 3 files: model, optimizer, rng
            (Path(path).parent / "partial").write_bytes(b"x")  # something already on disk
            raise OSError("disk full")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(native, "save_file", dies_in_the_second_checkpoint)
    with pytest.raises(OSError, match="disk full"):
        Toy(out, steps=8, ckpt_every=4).loop.fit()
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "step-00000004"]  # no temp dir left
    assert load_checkpoint(out / "step-00000004", with_training_state=True).train_state["step"] == 4
    Toy(out, steps=8, ckpt_every=4, resume=True).loop.fit()  # and the run resumes from it
    Toy(tmp_path / "ref", steps=8, ckpt_every=4).loop.fit()
    assert losses(out) == losses(tmp_path / "ref")


def test_a_spike_rewinds_to_the_last_checkpoint_and_skips_its_batches(tmp_path):
    toy = Toy(tmp_path, steps=8, ckpt_every=2, max_rewinds=1)
    original = toy.train_step
    draws = []  # the data position each call starts from

    def spike_at_step_5():
        draws.append(toy.batches.position)
        if toy.loop.step == 4 and len(draws) == 5:
            toy.batches.next_generator()  # the poisoned batch is read
            return {"spike": 1e9}
        return original()

    toy.train_step = spike_at_step_5
    toy.loop.fit()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    events = [r for r in rows if r.get("event") == "loss_spike"]
    assert events == [{"event": "loss_spike", "at_step": 5, "loss": 1e9, "rewound_to": 4, "skipped_batches": 1}]
    assert [r["step"] for r in rows if "step" in r] == list(range(1, 9))
    assert draws == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # after the rewind, step 5 reads the batch after the poisoned one

    toy = Toy(tmp_path / "diverges", steps=4, max_rewinds=1)
    toy.train_step = lambda: {"spike": float("nan")}
    with pytest.raises(TrainingDiverged, match="no checkpoint"):
        toy.loop.fit()


def test_resume_needs_a_checkpoint_with_a_data_position(tmp_path):
    from septet.errors import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint"):
        Toy(tmp_path / "empty", resume=True)
    native.save_checkpoint(tmp_path / "old" / "step-00000003", model_state=nn.Linear(4, 1).state_dict(),
                           config={"family": "toy"}, tokenizer_json=None, train_state={"step": 3})
    with pytest.raises(CheckpointError, match="data position"):
        Toy(tmp_path / "old", resume=True)
