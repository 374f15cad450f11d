"""Bit-reproducible training at the default thread count.

`--resume` promises the same losses as an uninterrupted run, and PaLM's spike rewind replays
the batches after a checkpoint; both need every kernel of a training step to give the same
bits each time it runs with the same inputs and thread count. PyTorch's CPU kernels on the
training path (matmul, SDPA's flash backward, embedding backward, scatter_add, reductions,
fused AdamW) split work statically per thread, but nothing stops a later change (a new op,
an index_add in a backward, a CUDA device) from adding one that accumulates in arrival
order. `deterministic_training()` asks torch for its deterministic implementation of every
op that has one, and warns (once per op) where there is none, so such an op is named instead
of silently breaking resume equality.

MKL, torch's CPU BLAS, is the one place where the same call can give other bits on the next
run: by default it may change how many threads a GEMM uses with the machine's load
(MKL_VERBOSE shows "Dyn:1") and pick code paths by memory alignment (its Conditional
Numerical Reproducibility is off: "CNR:OFF"). `MKL_CBWR=AUTO,STRICT` makes its GEMMs
bit-reproducible whatever the alignment and thread count; MKL reads it at its first call, so
it is set here, before the model is built (a user's own MKL_CBWR wins).

It does not make 1 thread equal 2 threads for every op: a parallel sum outside MKL splits
into one partial sum per thread, so keep the thread count fixed across a resume.
"""

from __future__ import annotations

import os

import torch

from .. import env


def deterministic_training(enabled: bool | None = None) -> None:
    """Use deterministic kernels for the rest of the process (call before building the model);
    `enabled` None: unless SEPTET_DETERMINISTIC=0.

    torch's deterministic mode also fills every torch.empty with NaN by default; that is a
    debugging aid (reading uninitialised memory), costs a pass over each new buffer and does
    not change any computed value, so it is turned off here.
    """
    if enabled is None:
        enabled = env.deterministic_training()
    if enabled:
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    if enabled and torch.cuda.is_available():
        # cuBLAS picks a reduction split per workspace unless this is set before its first call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def is_deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


__all__ = ["deterministic_training", "is_deterministic"]
