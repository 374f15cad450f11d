"""Training is bit-reproducible at the default thread count, not only single-threaded: two
runs give the same losses, a run killed with SIGKILL and resumed gives the losses of one that
never stopped, and a torchrun job matches one process. Every run is a `septet train`
subprocess with two intra-op threads, as a user's run on a 2-core machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import TINY, losses

THREADS = "2"
STEPS = 30
CKPT_EVERY = 10


def train_cmd(out: Path, data: Path, steps: int = STEPS, *extra: str) -> list[str]:
    sets = sum((["--set", f"{k}={v}"] for k, v in TINY.items()), [])
    return [sys.executable, "-m", "septet.cli", "train", "--model", "llama-tiny", "--data", str(data),
            "--out", str(out), "--steps", str(steps), "--batch-size", "8", "--eval-every", str(steps),
            "--eval-batches", "2", "--ckpt-every", str(CKPT_EVERY), "--spike-factor", "0",
            "--device", "cpu", "--no-progress", *sets, *extra]


def thread_env(threads: str = THREADS) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def run_train(out: Path, data: Path, *extra: str, threads: str = THREADS) -> dict[int, float]:
    proc = subprocess.run(train_cmd(out, data, STEPS, *extra), capture_output=True, text=True,
                          env=thread_env(threads), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(out)


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory) -> dict[int, float]:
    """One uninterrupted run at two threads."""
    out = tmp_path_factory.mktemp("det") / "ref"
    got = run_train(out, small_corpus)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def test_two_runs_give_identical_losses(reference, small_corpus, tmp_path):
    again = run_train(tmp_path / "again", small_corpus)
    assert again == reference  # exact floats, every step


def test_sigkill_then_resume_matches_uninterrupted(reference, small_corpus, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(out, small_corpus), env=thread_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = out / f"step-{CKPT_EVERY:08d}"
    deadline = time.monotonic() + 240
    try:
        while not target.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
        assert target.is_dir(), "no checkpoint was written in time"
        proc.send_signal(signal.SIGKILL)  # no cleanup, no final save: as a crash or an OOM kill
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logged = losses(out)
    assert len(logged) < STEPS  # it really stopped early
    resumed = run_train(out, small_corpus, "--resume")
    assert sorted(resumed) == list(range(1, STEPS + 1))  # no step missing or logged twice
    assert resumed == reference


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_torchrun_two_threads_matches_single_process(small_corpus, tmp_path):
    """FSDP2 over two gloo ranks, each at the default two threads (torchrun would otherwise
    set one): the same losses as one process, to the rounding of a sharded reduction."""
    single, dist_out = tmp_path / "single", tmp_path / "fsdp"
    proc = subprocess.run(train_cmd(single, small_corpus, 8), capture_output=True, text=True,
                          env=thread_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *train_cmd(dist_out, small_corpus, 8)[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(single), losses(dist_out)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5)


def test_every_gemm_of_a_run_is_in_mkls_reproducible_mode(small_corpus, tmp_path):
    """The mode is in force from the first GEMM (MKL reads it once, at its first call):
    MKL_VERBOSE shows CNR:AUTO,STRICT on every call of a training run, and CNR:OFF with
    SEPTET_DETERMINISTIC=0. Skips where torch's BLAS is not MKL."""
    modes = {}
    for setting in ("1", "0"):
        env = {**thread_env(), "MKL_VERBOSE": "1", "SEPTET_DETERMINISTIC": setting}
        env.pop("MKL_CBWR", None)
        proc = subprocess.run(train_cmd(tmp_path / f"run{setting}", small_corpus, 2), capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        modes[setting] = {line.split("CNR:")[1].split()[0] for line in proc.stdout.splitlines()
                          if line.startswith("MKL_VERBOSE") and "CNR:" in line}
    if not modes["1"] and not modes["0"]:
        pytest.skip("torch's BLAS here is not MKL (no MKL_VERBOSE lines)")
    assert modes["1"] == {"AUTO,STRICT"}
    assert modes["0"] == {"OFF"}
