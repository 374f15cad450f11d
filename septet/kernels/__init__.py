"""septet's own CPU kernels, compiled on first use and registered as torch operators.

`q4.c` holds the matmul kernels for Q4_1 / Q8_0 block weights (fp32 activations, or int8
ones as llama.cpp computes), `attn.c` a one-token attention, `step.c` a whole decoding step
of a LLaMA stack on those two; `ops.cpp` registers them as `torch.ops.septet.q4_1_mm` /
`q8_0_mm` / `decode_attention` / `llama_decode`. They are built once per machine into
`$SEPTET_HOME/kernels/` with the system compilers (the ones torch.compile already needs on a
CPU) for the CPU at hand (-march=native; ~10 s), under a name keyed by the sources, the
compiler, torch's version and the CPU flags: a changed source, torch or machine builds
anew. The build writes to a temporary name and renames it, so an interrupted or concurrent
build never leaves a half-written library.

`available()` says whether the operators are loaded; when they cannot be (no compiler, a
failed build, SEPTET_KERNELS=0) `why_not()` says why and callers use PyTorch's kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .. import env

HERE = Path(__file__).parent
C_SOURCES = (HERE / "q4.c", HERE / "attn.c", HERE / "step.c")
SOURCES = (*C_SOURCES, HERE / "kernels.h", HERE / "ops.cpp")
_C_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=gnu11"]
_CXX_FLAGS = ["-O2", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return env.home() / "kernels"  # the same root as assets and features


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if "error" in ln][:1] or proc.stderr.splitlines()[-1:]
        raise OSError(f"{Path(cmd[0]).name} failed: {' '.join(last)}")


def _build(cc: str, cxx: str) -> Path:
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    stamp = repr((torch.__version__, _C_FLAGS, _CXX_FLAGS, abi, _cpu_flags(),
                  [subprocess.run([c, "--version"], capture_output=True, text=True,
                                  timeout=30).stdout.splitlines()[:1] for c in (cc, cxx)]))
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + stamp.encode()).hexdigest()[:16]
    out = _cache_dir() / f"septet_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print("septet: building CPU kernels (once per machine)...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        objs, so = [Path(tmp) / f"{src.stem}.o" for src in C_SOURCES], Path(tmp) / "kernels.so"
        for src, obj in zip(C_SOURCES, objs):
            _run([cc, *_C_FLAGS, "-c", str(src), "-o", str(obj)])
        _run([cxx, *_CXX_FLAGS, abi, *(f"-I{p}" for p in include_paths()), f"-I{HERE}", str(HERE / "ops.cpp"),
              *map(str, objs), "-o", str(so), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-lm"])
        os.replace(so, out)
    for old in out.parent.glob("septet_kernels-*.so"):  # builds of other sources or machines
        if old != out:
            old.unlink(missing_ok=True)  # a process that has one loaded keeps its mapping
    return out


_loaded: list[bool] = []  # the build / load outcome once tried; a plain global, cheap to read under torch.compile
_why = ""


def available() -> bool:
    """Whether the operators are loaded, building them on the first call; False when they
    cannot be had here (see `why_not`) or SEPTET_KERNELS=0 (read on every call, so a caller
    can switch to torch's kernels at any time)."""
    if not env.kernels_enabled():
        return False
    if not _loaded:
        _loaded.append(_load())
    return _loaded[0]


def enabled() -> bool:
    """`available()` for code that torch.compile traces: there an untried build reads as
    False (building is not traceable), so decide before compiling."""
    if not _loaded and torch.compiler.is_compiling():
        return False
    return available()


def _load() -> bool:
    global _why
    if sys.platform != "linux":
        _why = f"built only on Linux, not {sys.platform}"
        return False
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cc is None or cxx is None:
        _why = "no C / C++ compiler (gcc, g++) on PATH"
        return False
    try:
        torch.ops.load_library(str(_build(cc, cxx)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _why = f"building septet/kernels failed: {e}"
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (fake tensors)."""

    @torch.library.register_fake("septet::q4_1_mm")
    def _(x, qs, d, m, int8_act):
        return x.new_empty(x.shape[0], qs.shape[0])

    @torch.library.register_fake("septet::q8_0_mm")
    def _(x, qs, d, int8_act):
        return x.new_empty(x.shape[0], qs.shape[0])

    @torch.library.register_fake("septet::decode_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("septet::llama_decode")
    def _(x, weights, kinds, k, v, pos, cos, sin, mask, n_head, eps, rope_half):
        return x.new_empty(x.shape)


def why_not() -> str | None:
    """Why `available()` is False, or None when the kernels are in use."""
    if available():
        return None
    return "SEPTET_KERNELS=0" if not env.kernels_enabled() else _why or "unknown"
