"""Run untrusted, model-written Python in a separate, limited process.

HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code") executes
generated programs against unit tests; the paper stresses that such code must run in a
sandbox because a model can emit anything. septet never `exec`s generated code in its own
process. `run_python(code)` starts `python -I` in a child process and returns what it did.

What is enforced, and how (honestly):

- A separate process (`python -I`: no user site-packages, no PYTHON* variables, the
  script's directory not on sys.path) in its own session, so a wall-clock timeout kills
  the whole process group with SIGKILL.
- Kernel resource limits set in the child before exec (preexec_fn): RLIMIT_CPU (CPU
  seconds), RLIMIT_AS (address space, so large allocations raise MemoryError),
  RLIMIT_FSIZE (largest file it may write, which also bounds its captured output) and
  RLIMIT_NPROC. Linux does not apply RLIMIT_NPROC to root, so when septet runs as root
  only the audit hook below stops forks.
- A fresh temporary directory as the working directory, deleted afterwards, and an
  environment with only PATH, HOME (the temp dir) and LANG.
- No network: when `unshare -rn` (or `unshare -n` as root) works, the child runs in its
  own empty network namespace, a kernel boundary. Otherwise only the audit hook below
  stops sockets. `isolation()` reports which layers are active.
- A PEP 578 audit hook, installed by a trusted launcher before the program runs: it
  refuses socket creation, subprocesses, fork/exec, signals to other processes, ctypes,
  and opening files for writing (or removing, renaming, ...) outside the temp dir. Audit
  hooks cannot be removed from Python code, but PEP 578 itself says they are not a
  security boundary: native code could get around them. That is why ctypes is refused.

Not enforced: reading files the user running septet can read; writes outside the temp dir
by native code, if it gets past the hook. For hostile code, run septet as an unprivileged
user inside a container or VM.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

# The launcher runs in the child before the untrusted program (passed via -c, so it is never
# a file the program could edit first). argv[1] is the program file, in the cwd.
_LAUNCHER = r'''
def _start():
    import os, sys, types
    root = os.path.realpath(os.getcwd())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    denied = frozenset({
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen",
        "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
        # the introspection that could reach this hook's closure (its settings)
        "gc.get_objects", "gc.get_referrers", "gc.get_referents"})
    path_events = frozenset({"os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod",
                             "os.chown", "os.link", "os.symlink", "os.mkdir", "os.utime",
                             "shutil.rmtree"})
    blocked_modules = frozenset({"_ctypes", "ctypes", "_posixsubprocess", "multiprocessing"})

    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return p == root or p.startswith(root + os.sep)

    def hook(event, args):
        if event in denied:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in blocked_modules:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
        elif event in path_events:
            for p in args[:2]:
                if isinstance(p, (str, bytes, os.PathLike)) and not inside(p):
                    raise PermissionError(f"sandbox: {event} on {p!r} outside the sandbox directory")

    name = sys.argv[1]
    with open(name, encoding="utf-8") as f:
        code = compile(f.read(), name, "exec")
    sys.argv = [name]
    main = types.ModuleType("__main__")  # the program's own namespace, not the launcher's
    main.__file__ = name
    sys.modules["__main__"] = main
    sys.addaudithook(hook)
    return code, main.__dict__

_code, _globals = _start()
del _start
exec(_code, _globals)
'''


@dataclass(frozen=True)
class Limits:
    """Per-run limits. cpu_s defaults to the wall-clock timeout rounded up, plus one."""

    timeout_s: float = 10.0  # wall clock; the process group is killed after it
    cpu_s: int | None = None
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: any file it writes, and its stdout/stderr
    processes: int = 64  # RLIMIT_NPROC (not applied to root by Linux)
    output_bytes: int = 64 << 10  # how much of stdout / stderr comes back

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise InputError(f"sandbox timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_bytes < (64 << 20):
            raise InputError(f"sandbox memory_bytes must be >= 64 MiB (Python needs it to start), "
                             f"got {self.memory_bytes}")

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 1


@dataclass
class SandboxResult:
    status: str  # "passed" (exit 0), "failed" (other exit), "timeout" (wall or CPU limit)
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """A command prefix that puts the child in an empty network namespace, or () if the
    kernel/user lacks the permission (then only the audit hook blocks sockets)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    # -r maps us to root inside a new user namespace: no privilege outside it, and it lets
    # an unprivileged user create the network namespace
    for flags in (("-rn",), ("-n",)):
        try:
            ok = subprocess.run([exe, *flags, "true"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return (exe, *flags)
    return ()


def isolation() -> dict[str, str]:
    """Which layers are active on this machine, for reports and docs."""
    net = "network namespace (unshare) + audit hook" if _unshare_prefix() else "audit hook only"
    root = os.geteuid() == 0 if hasattr(os, "geteuid") else False
    return {"process": "separate python -I process group, killed on timeout",
            "limits": "RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE" + ("" if root else ", RLIMIT_NPROC"),
            "network": net,
            "files": "temp dir cwd; writes elsewhere refused by the audit hook"}


def _set_limits(limits: Limits):
    """The preexec_fn: runs in the forked child just before exec. Only setrlimit calls, which
    are safe between fork and exec."""
    def apply() -> None:
        def cap(which: int, value: int, slack: int = 0) -> None:
            _, hard = resource.getrlimit(which)
            limit = value + slack
            if hard != resource.RLIM_INFINITY:
                value, limit = min(value, hard), min(limit, hard)
            resource.setrlimit(which, (value, limit))

        # the soft limit sends SIGXCPU (reported as a timeout), the hard one a second later SIGKILL
        cap(resource.RLIMIT_CPU, limits.cpu_seconds, slack=1)
        cap(resource.RLIMIT_AS, limits.memory_bytes)
        cap(resource.RLIMIT_FSIZE, limits.file_bytes)
        cap(resource.RLIMIT_NPROC, limits.processes)
        cap(resource.RLIMIT_CORE, 0)  # no core dumps in the temp dir

    return apply


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_bounded(path: Path, n: int) -> str:
    with open(path, "rb") as f:
        data = f.read(n + 1)
    text = data[:n].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > n else "")


def run_python(code: str, *, limits: Limits = Limits()) -> SandboxResult:
    """Run `code` as a Python program in a sandboxed child process; see the module docstring
    for what is and isn't enforced. Never raises for anything the program does."""
    if not sys.platform.startswith(("linux", "darwin")):
        raise InputError(f"the code sandbox needs POSIX resource limits; {sys.platform} has none")
    work = Path(tempfile.mkdtemp(prefix="septet-sandbox-"))  # the program's cwd
    logs = Path(tempfile.mkdtemp(prefix="septet-sandbox-io-"))  # outside its reach
    try:
        program = work / "program.py"
        program.write_text(code, encoding="utf-8")
        cmd = [*_unshare_prefix(), sys.executable, "-I", "-c", _LAUNCHER, program.name]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8"}
        t0 = time.monotonic()
        with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, preexec_fn=_set_limits(limits),
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also anything it left behind
                proc.wait()
        wall = time.monotonic() - t0
        rc = proc.returncode
        if timed_out or rc == -signal.SIGXCPU:
            status = "timeout"
        else:
            status = "passed" if rc == 0 else "failed"
        return SandboxResult(status, None if timed_out else rc,
                             _read_bounded(logs / "out", limits.output_bytes),
                             _read_bounded(logs / "err", limits.output_bytes), wall)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
