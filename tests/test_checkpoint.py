"""Checkpoint directories: round trips, bit-exact resume, tied weights, RNG, corruption, atomicity."""

import json

import pytest
import torch
from torch import nn

import septet.checkpoints.native as ck
from septet.checkpoints.native import (
    capture_rng,
    checkpoint_dir,
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
    unflatten_optimizer_state,
)
from septet.errors import CheckpointError
from septet.train.optim import build_optimizer

CONFIG = {"family": "llama", "d_model": 6, "betas": [0.9, 0.95]}
TOKENIZER = json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}})


class Tiny(nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        self.tok_emb = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.tok_emb.weight

    def forward(self, x):
        return self.head(self.norm(self.proj(self.tok_emb(x))))


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 5), generator=g)
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        opt.step()


def _save(path, model, opt=None, train_state=None):
    save_checkpoint(
        path, model_state=model.state_dict(), config=CONFIG, tokenizer_json=TOKENIZER,
        optimizer_state=None if opt is None else opt.state_dict(), train_state=train_state,
    )


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_resume_is_bitwise_identical(tmp_path, name):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, name, 1e-2, 0.1)
    _train(model, opt, 3, seed=1)
    _save(tmp_path / "ck", model, opt, {"step": 3, "data": {"epoch": 0, "offset": 12}, "pair": (1, 2)})

    loaded = load_checkpoint(tmp_path / "ck", with_training_state=True)
    assert loaded.config == CONFIG and loaded.tokenizer_json == TOKENIZER
    assert loaded.train_state == {"step": 3, "data": {"epoch": 0, "offset": 12}, "pair": (1, 2)}
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    clone = Tiny()
    clone.load_state_dict(loaded.model_state)
    opt2 = build_optimizer(clone, name, 1e-2, 0.1)
    opt2.load_state_dict(loaded.optimizer_state)

    _train(model, opt, 2, seed=9)
    _train(clone, opt2, 2, seed=9)
    for (n, a), b in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizer_state_flatten_round_trips_exactly(name):
    model = Tiny()
    opt = build_optimizer(model, name, 1e-2, 0.1)
    _train(model, opt, 2, seed=1)
    sd = opt.state_dict()
    structure, tensors = flatten_optimizer_state(sd)
    back = unflatten_optimizer_state(json.loads(json.dumps(structure)), tensors)
    assert back["param_groups"] == sd["param_groups"]  # tuples (betas) stay tuples
    assert set(back["state"]) == set(sd["state"])       # int keys stay ints
    for i, entry in sd["state"].items():
        for key, value in entry.items():
            got = back["state"][i][key]
            assert type(got) is type(value)
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value


def test_model_only_checkpoint_and_missing_training_state(tmp_path):
    model = Tiny()
    save_checkpoint(tmp_path / "ck", model_state=model.state_dict(), config=CONFIG, tokenizer_json=None)
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.tokenizer_json is None and loaded.optimizer_state is None
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model_state[k], v)
    with pytest.raises(CheckpointError, match="training_state/; it cannot be resumed"):
        load_checkpoint(tmp_path / "ck", with_training_state=True)


def test_tied_weights_saved_once_and_retied(tmp_path):
    model = Tiny(tied=True)
    _save(tmp_path / "ck", model)
    loaded = load_checkpoint(tmp_path / "ck")
    state = loaded.model_state
    assert state["head.weight"] is state["tok_emb.weight"]
    clone = Tiny(tied=True)
    clone.load_state_dict(state)  # strict: both keys present
    assert clone.head.weight is clone.tok_emb.weight
    assert torch.equal(clone.head.weight, model.tok_emb.weight)
    # A view of shared storage that is not an exact alias is stored as its own copy.
    big = torch.arange(12.0)
    save_checkpoint(tmp_path / "views", model_state={"a": big[:6], "b": big[6:]}, config=CONFIG, tokenizer_json=None)
    views = load_checkpoint(tmp_path / "views").model_state
    assert torch.equal(views["a"], big[:6]) and torch.equal(views["b"], big[6:])


def test_rng_restore_reproduces_randn(tmp_path):
    state = capture_rng()
    a = torch.randn(5)
    restore_rng(state)
    assert torch.equal(torch.randn(5), a)

    model = Tiny()
    torch.manual_seed(42)
    _save(tmp_path / "ck", model, train_state={"step": 0})
    expected = torch.randn(7)
    torch.randn(100)  # move the generator on
    restore_rng(load_checkpoint(tmp_path / "ck", with_training_state=True).rng)
    assert torch.equal(torch.randn(7), expected)


def test_truncated_model_file_is_a_clear_error(tmp_path):
    _save(tmp_path / "ck", Tiny())
    f = tmp_path / "ck" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*re-save"):
        load_checkpoint(tmp_path / "ck")
    f.write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ck")
    f.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path / "ck")


def test_missing_dir_and_bad_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    _save(tmp_path / "ck", Tiny())
    cfg = tmp_path / "ck" / "config.json"
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_checkpoint(tmp_path / "ck")
    cfg.write_text(json.dumps({"d_model": 6}))
    with pytest.raises(CheckpointError, match="'family'"):
        load_checkpoint(tmp_path / "ck")
    cfg.unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="family"):
        save_checkpoint(tmp_path / "x", model_state={}, config={"d": 1}, tokenizer_json=None)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, "adamw", 1e-3, 0.1)
    _train(model, opt, 1, seed=1)
    _save(tmp_path / "ck", model, opt, {"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}

    _train(model, opt, 1, seed=2)
    real_save = ck.save_file
    calls = []

    def crashing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # model.safetensors written, crash during optimizer.safetensors
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt("simulated crash")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path / "ck", model, opt, {"step": 2})
    monkeypatch.setattr(ck, "save_file", real_save)

    loaded = load_checkpoint(tmp_path / "ck", with_training_state=True)
    assert loaded.train_state == {"step": 1}
    for k, v in before.items():
        assert torch.equal(loaded.model_state[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dirs left behind


def test_run_dir_layout(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (100, 20, 300):
        _save(checkpoint_dir(tmp_path, step), Tiny())
    (tmp_path / ".step-00000400.abc.tmp").mkdir()  # a half-written save is never picked
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000300"
    removed = prune_checkpoints(tmp_path, keep=2)
    assert removed == [tmp_path / "step-00000020"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000300"
