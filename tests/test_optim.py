"""Optimizers (AdamW groups, PaLM's Adafactor) and learning-rate / batch schedules."""

import copy
import math

import pytest
import torch
from torch import nn

from septet.errors import ConfigError
from septet.train.optim import Adafactor, beta2_at, build_optimizer, param_groups
from septet.train.schedules import batch_size_at, linear_batch_ramp, lr_at


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)

    def forward(self, x):
        return self.head(self.norm(self.proj(self.tok_emb(x))))


def rms(x):
    return x.pow(2).mean().sqrt().item()


# ---------------------------------------------------------------- param groups

def test_param_groups_split_decay():
    model = Tiny()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight), id(model.head.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model.tok_emb.weight), id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)
    }


def test_build_optimizer_kinds_and_unknown():
    model = Tiny()
    adamw = build_optimizer(model, "adamw", 3e-4, 0.1)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95) and adamw.param_groups[0]["eps"] == 1e-8
    assert isinstance(build_optimizer(model, "adafactor", 1e-2, 1.0), Adafactor)
    with pytest.raises(ConfigError, match="sgd"):
        build_optimizer(model, "sgd", 1e-2, 0.0)


# ---------------------------------------------------------------- Adafactor

def test_beta2_schedule():
    assert beta2_at(1) == 0.0
    assert beta2_at(10) == pytest.approx(1 - 10**-0.8)
    assert beta2_at(10_000) == pytest.approx(1 - 10_000**-0.8)
    assert beta2_at(100) < beta2_at(1000) < 1


def _one_param(values, **kw):
    p = nn.Parameter(values.clone())
    return p, Adafactor([p], **kw)


def test_first_step_is_parameter_scaled():
    torch.manual_seed(0)
    p, opt = _one_param(torch.randn(16, 16) * 0.3, lr=1e-2, weight_decay=0.0)
    before = p.detach().clone()
    p.grad = torch.randn(16, 16)
    opt.step()
    delta = p.detach() - before
    # β2(1) = 0 so u = g/|g| = sign(g), RMS 1: the update is lr·RMS(p) per element.
    expected = -1e-2 * rms(before) * torch.sign(p.grad)
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-9)
    assert opt.state[p]["step"] == 1 and isinstance(opt.state[p]["step"], int)


def test_small_parameters_use_eps2_scale():
    p, opt = _one_param(torch.zeros(4), lr=0.1, weight_decay=0.0)
    p.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.1 * 1e-3))


def test_weight_decay_is_lr_squared():
    p, opt = _one_param(torch.full((3, 3), 2.0), lr=0.1)  # weight_decay=1.0, power 2 (PaLM)
    p.grad = torch.zeros(3, 3)  # zero gradient: only the decay moves p
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3, 3), 2.0 * (1 - 0.1**2)))


def test_update_clipping():
    def second_step_delta(clip):
        p, opt = _one_param(torch.ones(8), lr=1e-2, beta1=0.0, weight_decay=0.0, clip_threshold=clip)
        p.grad = torch.full((8,), 0.01)
        opt.step()
        before = p.detach().clone()
        p.grad = torch.full((8,), 100.0)  # a spike: g²≫v, so RMS(u) > 1
        opt.step()
        return p.detach() - before, before

    b2 = beta2_at(2)
    raw_u = 100.0 / math.sqrt(b2 * (0.01**2) + (1 - b2) * 100.0**2)
    assert raw_u > 1.2
    unclipped, before = second_step_delta(clip=10.0)
    assert rms(unclipped) == pytest.approx(1e-2 * rms(before) * raw_u, rel=1e-5)
    clipped, before = second_step_delta(clip=1.0)
    assert rms(clipped) == pytest.approx(1e-2 * rms(before), rel=1e-5)


def test_adafactor_minimises_a_quadratic():
    torch.manual_seed(0)
    target = torch.randn(10, 10)
    p, opt = _one_param(torch.randn(10, 10), lr=0.1, weight_decay=0.0)
    first = None
    for step in range(1, 501):
        for g in opt.param_groups:  # PaLM's schedule shape: constant, then 1/sqrt(step)
            g["lr"] = lr_at(step, kind="inverse_sqrt", peak=0.1, warmup=100, total=0)
        opt.zero_grad()
        loss = (p - target).pow(2).mean()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first * 0.01


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 5), generator=g)
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        opt.step()


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_state_dict_round_trip_gives_identical_next_step(name):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, name, 1e-2, 0.1)
    _train(model, opt, 3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())

    clone = Tiny()
    clone.load_state_dict(saved_model)
    opt2 = build_optimizer(clone, name, 1e-2, 0.1)
    opt2.load_state_dict(saved_opt)
    _train(model, opt, 1, seed=7)
    _train(clone, opt2, 1, seed=7)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_bf16_state_stays_fp32_after_load():
    p = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = Adafactor([p], lr=1e-2)
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    opt2 = Adafactor([p], lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.state[p]["exp_avg_sq"].dtype == torch.float32


# ---------------------------------------------------------------- schedules

def test_cosine_schedule_values():
    kw = dict(kind="cosine", peak=1.0, warmup=10, total=110, min_ratio=0.1)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)           # warmup end: peak
    assert lr_at(60, **kw) == pytest.approx(0.55)          # midpoint: (peak + floor)/2
    assert lr_at(110, **kw) == pytest.approx(0.1)          # end: 10% of peak
    assert lr_at(10_000, **kw) == pytest.approx(0.1)       # constant after


def test_inverse_sqrt_schedule_values():
    kw = dict(kind="inverse_sqrt", peak=1e-2, warmup=10_000, total=0)
    assert lr_at(1, **kw) == 1e-2                          # PaLM: no ramp
    assert lr_at(10_000, **kw) == 1e-2
    assert lr_at(40_000, **kw) == pytest.approx(5e-3)      # 1e-2·sqrt(10k/40k)
    assert lr_at(1_000_000, **kw) == pytest.approx(1e-3)


def test_constant_schedule_values():
    kw = dict(kind="constant", peak=1e-4, warmup=4, total=0)
    assert lr_at(2, **kw) == pytest.approx(5e-5)
    assert lr_at(4, **kw) == 1e-4 and lr_at(10**6, **kw) == 1e-4


def test_schedule_errors():
    with pytest.raises(ConfigError, match="linear"):
        lr_at(1, kind="linear", peak=1.0, warmup=1, total=2)
    with pytest.raises(ConfigError, match="min_ratio"):
        lr_at(1, kind="cosine", peak=1.0, warmup=1, total=2, min_ratio=2.0)
    with pytest.raises(ConfigError, match="total"):
        lr_at(1, kind="cosine", peak=1.0, warmup=10, total=5)


def test_batch_size_ramp():
    ramp = [(50_000, 512), (115_000, 1024), (115_001, 2048)]  # PaLM-540B, in sequences
    assert batch_size_at(0, ramp) == 512
    assert batch_size_at(49_999, ramp) == 512
    assert batch_size_at(50_000, ramp) == 1024
    assert batch_size_at(10**7, ramp) == 2048
    with pytest.raises(ConfigError):
        batch_size_at(0, [])
    with pytest.raises(ConfigError, match="increase"):
        batch_size_at(0, [(10, 1), (5, 2)])
    lin = linear_batch_ramp(16, 64, ramp_steps=100, stages=4)
    assert [batch_size_at(s, lin) for s in (0, 30, 60, 80, 100, 10**6)] == [16, 28, 40, 52, 64, 64]
