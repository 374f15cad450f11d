"""Learning-rate and batch-size schedules from the papers.

Convention: `step` is the 1-based index of the optimizer update about to be applied
(the first update is step 1), the same k that PaLM's 1/sqrt(k) and Adafactor's
β2 = 1 − k^−0.8 use. Step 0 is allowed and means "before any update".
"""

from __future__ import annotations

import math

from septet.errors import ConfigError

KINDS = ("cosine", "inverse_sqrt", "constant")


def lr_at(
    step: int,
    *,
    kind: str,
    peak: float,
    warmup: int,
    total: int,
    min_ratio: float = 0.1,
) -> float:
    """The learning rate for update `step`.

    cosine        GPT-3 / LLaMA: linear warmup 0 → peak over `warmup` steps (lr = peak at
                  step == warmup), cosine decay to min_ratio·peak at step == total (both
                  papers decay to 10%), constant min_ratio·peak after.
    inverse_sqrt  PaLM: constant peak for the first `warmup` steps (PaLM: 1e-2 for 10k,
                  no ramp: parameter scaling makes a ramp unnecessary), then
                  peak·sqrt(warmup/step), continuous at step == warmup. `total` unused.
    constant      Flamingo: linear warmup 0 → peak, then constant. `total` unused.
    """
    if kind not in KINDS:
        raise ConfigError(f"lr schedule kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if step < 0:
        raise ConfigError(f"lr schedule step={step} is negative; steps count from 0")
    if peak < 0 or warmup < 0 or total < 0:
        raise ConfigError(f"lr schedule peak={peak}, warmup={warmup}, total={total}: all must be >= 0")
    if not 0.0 <= min_ratio <= 1.0:
        raise ConfigError(f"lr schedule min_ratio={min_ratio} is outside [0, 1]; GPT-3/LLaMA use 0.1")

    if kind == "inverse_sqrt":
        if warmup < 1:
            raise ConfigError("inverse_sqrt schedule needs warmup >= 1 (PaLM: 10000): peak·sqrt(warmup/step)")
        return peak if step <= warmup else peak * math.sqrt(warmup / step)

    if kind == "cosine" and total <= warmup:
        raise ConfigError(f"cosine schedule total={total} must exceed warmup={warmup}")
    if step < warmup:
        return peak * step / warmup
    if kind == "constant":
        return peak
    floor = min_ratio * peak
    if step >= total:
        return floor
    progress = (step - warmup) / (total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_size_at(step: int, ramp: list[tuple[int, int]]) -> int:
    """The batch size for update `step` under a step-wise ramp.

    `ramp` is [(until_step, batch_size), ...] with until_step strictly increasing:
    batch_size applies while step < until_step; after the last boundary the last
    batch_size holds. PaLM-540B: [(50_000, 512), (115_000, 1024), (_, 2048)] sequences.
    """
    if not ramp:
        raise ConfigError("batch-size ramp is empty; give [(until_step, batch_size), ...]")
    previous = None
    for until, size in ramp:
        if size <= 0:
            raise ConfigError(f"batch-size ramp entry ({until}, {size}) has a batch size <= 0")
        if previous is not None and until <= previous:
            raise ConfigError(f"batch-size ramp steps must increase; {until} follows {previous}")
        previous = until
    for until, size in ramp:
        if step < until:
            return size
    return ramp[-1][1]


def linear_batch_ramp(start: int, end: int, ramp_steps: int, stages: int) -> list[tuple[int, int]]:
    """A GPT-3-style linear ramp from `start` to `end` over `ramp_steps`, as `stages` equal
    plateaus (GPT-3 ramped from 32k tokens to the full batch over the first 4–12B tokens).
    The result is a `ramp` for batch_size_at; the last entry holds `end` forever.
    """
    if stages < 1 or ramp_steps < stages or start <= 0 or end <= 0:
        raise ConfigError(
            f"linear_batch_ramp(start={start}, end={end}, ramp_steps={ramp_steps}, stages={stages}): "
            "need positive sizes and 1 <= stages <= ramp_steps"
        )
    ramp = []
    for i in range(stages):
        size = round(start + (end - start) * i / stages)
        ramp.append((ramp_steps * (i + 1) // stages, size))
    ramp.append((ramp_steps + 1, end))
    return ramp


__all__ = ["KINDS", "batch_size_at", "linear_batch_ramp", "lr_at"]
