"""metrics.jsonl logging and plotting; model FLOPs, MFU and the matmul peak probe."""

import json
import math

import pytest
import torch
from torch import nn

from septet.errors import DataError
from septet.train.flops import (
    Throughput,
    attention_flops_per_token,
    matmul_params,
    measure_matmul_peak,
    mfu,
    model_flops_per_token,
)
from septet.train.metrics import MetricsLog, plot_loss_curve, read_metrics


def _write_run(path, steps, resume_step=None):
    with MetricsLog(path, resume_step=resume_step) as log:
        for s in steps:
            row = {"step": s, "loss": torch.tensor(5.0 / s), "lr": 1e-3}
            if s % 5 == 0:
                row["val_loss"] = 6.0 / s
            log.log(row)


def test_rows_are_json_lines(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    _write_run(path, range(1, 4))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0]) == {"step": 1, "loss": 5.0, "lr": 1e-3}
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_resume_truncates_later_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_run(path, range(1, 11))  # the crashed run logged up to step 10
    _write_run(path, range(7, 13), resume_step=6)  # checkpoint at 6: steps 7.. run again
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 13))
    _write_run(path, [1], resume_step=None)  # a fresh run starts a fresh file
    assert [r["step"] for r in read_metrics(path)] == [1]


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_run(path, range(1, 4))
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    with MetricsLog(path, resume_step=3) as log:
        log.log({"step": 4, "loss": 1.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    with pytest.raises(DataError, match="missing.jsonl"):
        read_metrics(tmp_path / "missing.jsonl")


def test_plot_writes_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_run(path, range(1, 21))
    png = tmp_path / "plots" / "loss.png"
    plot_loss_curve(path, png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"lr": 1}\n')
    with pytest.raises(DataError, match="nothing to plot"):
        plot_loss_curve(empty, tmp_path / "x.png")


def test_flops_gpt3_small_by_hand():
    # GPT-3 Small: 12 layers, d_model 768, 12 heads of 64, context 2048.
    # Non-embedding matmul params: 12 layers × 12·d² (4d² attention + 8d² MLP).
    n = 12 * 12 * 768**2
    assert n == 84_934_656
    assert attention_flops_per_token(12, 12, 64, 2048) == 12 * 12 * 12 * 64 * 2048 == 226_492_416
    assert model_flops_per_token(n, 12, 12, 64, 2048) == 6 * 84_934_656 + 226_492_416 == 736_100_352


def test_palm_540b_mfu_reproduced():
    # PaLM: 540.35B params, 118 layers, 48 heads of 256, T=2048; 238.3k tokens/s on
    # 6144 TPU v4 at 275 TFLOP/s bf16 -> 46.2% MFU (Table 3).
    flops = model_flops_per_token(540.35e9, 118, 48, 256, 2048)
    assert mfu(238.3e3, flops, 6144 * 275e12) == pytest.approx(0.462, abs=0.0005)
    assert mfu(1000.0, 2e9, 4e12) == pytest.approx(0.5)


def test_matmul_params_counts_tied_head_once():
    class LM(nn.Module):
        def __init__(self, tied):
            super().__init__()
            self.emb = nn.Embedding(100, 8)
            self.pos = nn.Embedding(16, 8)
            self.mlp = nn.Linear(8, 8, bias=False)
            self.head = nn.Linear(8, 100, bias=False)
            if tied:
                self.head.weight = self.emb.weight

    assert matmul_params(LM(tied=False)) == 64 + 800          # lookups excluded
    assert matmul_params(LM(tied=True)) == 64 + 800           # tied table counted once
    bare = LM(tied=False)
    del bare.head
    assert matmul_params(bare, tied_head=True) == 64 + 800    # F.linear(x, emb.weight)


def test_measure_matmul_peak_is_positive():
    peak = measure_matmul_peak(size=128, seconds=0.1)
    assert math.isfinite(peak) and peak > 0


def test_throughput_ema():
    t = Throughput(alpha=0.5)
    assert t.update(1000, 1.0) == 1000.0
    assert t.update(3000, 1.0) == 2000.0
