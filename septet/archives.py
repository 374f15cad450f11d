"""Copying selected members out of an archive, or out of a directory, without trusting it.

Extraction never calls `tarfile.extract*`: each wanted member is checked (no absolute paths,
no `..`, no links or devices, bounded sizes) and copied by hand. A directory is read the same
way as an archive, its files named by their paths relative to it, so a local copy of an asset
goes through the same selection and the same checks as a downloaded one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator

from septet.errors import AssetError

_COPY_CHUNK = 1 << 20


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


def wanted(name: str, members: tuple[str, ...], exclude: tuple[str, ...] = ()) -> bool:
    """Whether a member name matches one of the `members` globs and none of `exclude`
    (fnmatch: `*` spans "/")."""
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

    Works on .tar(.gz/.bz2/.xz), .zip/.whl and plain directories. Every member name is
    checked, wanted or not, because a hostile name anywhere means a hostile archive.
    Returns the written paths, sorted.
    """
    archive, dest = Path(archive), Path(dest)
    written: list[Path] = []
    total = 0
    try:
        with contextlib.closing(_iter_entries(archive)) as entries:
            for name, kind, size, opener in entries:
                rel = _safe_relpath(name, archive)
                if kind == "dir" or not wanted(rel.as_posix(), members, exclude):
                    continue
                if kind != "file":
                    raise AssetError(f"{archive.name}: member {name!r} is a {kind}, not a regular file; "
                                     "refusing to extract")
                if size > max_file_bytes:
                    raise AssetError(f"{archive.name}: member {name!r} is {size} bytes, "
                                     f"over the {max_file_bytes} limit")
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
    if archive.is_dir():
        yield from _dir_entries(archive)
        return
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


def _dir_entries(root: Path) -> Iterator[tuple[str, str, int, Callable[[], IO[bytes]]]]:
    """A directory's contents as archive members, in sorted order; links are not followed."""
    for top, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(top)
        rel_top = base.relative_to(root).as_posix()
        for name in sorted(files) + [d for d in dirs if (base / d).is_symlink()]:
            path = base / name
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            st = path.lstat()
            kind = "link" if path.is_symlink() else "file" if path.is_file() else "special"
            yield rel, kind, st.st_size, (lambda p=path: open(p, "rb"))


def _checked(f: IO[bytes] | None, name: str) -> IO[bytes]:
    if f is None:
        raise tarfile.TarError(f"cannot read member {name!r}")
    return f


__all__ = ["extract_members", "wanted"]
