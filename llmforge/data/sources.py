"""Data sources: where documents come from, in a fixed order, one document at a time.

A source never loads a whole corpus into memory; `iter_documents` streams. Its fingerprint
(a hash of the content and the options that shape the documents) keys the token cache, so an
edited file can never reuse stale tokens.
"""

from __future__ import annotations

import glob
import hashlib
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from ..recipe.schema import SourceSpec

# Folders of the standard library that are test fixtures or tooling rather than ordinary code
# (some hold deliberately broken files) or generated tables (codecs, pydoc topics); leaving them
# out keeps the built-in corpus ordinary, human-written code.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__",
                "encodings", "pydoc_data"}


def list_files(name: str, spec: SourceSpec, base_dir: Path) -> list[Path]:
    """The source's files, in the order their documents are read."""
    if spec.builtin == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in root.rglob("*.py") if not _STDLIB_SKIP.intersection(p.relative_to(root).parts)]
        return _shuffled(files, root)
    pattern = Path(spec.path).expanduser()
    pattern = pattern if pattern.is_absolute() else base_dir / pattern
    if pattern.is_dir():
        # Hidden files and folders (.git, .DS_Store, editor swap files) are never data.
        files = [p for p in pattern.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(pattern).parts)]
        root = pattern
    elif pattern.is_file():
        return [pattern]
    else:
        files = [Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file()]
        root = pattern.parent
    if not files:
        what = "a folder with no files" if pattern.is_dir() else "no files"
        raise DataError(f"data.{name}.path: {spec.path!r} matches {what} (looked in {pattern})",
                        hint="check the path; relative paths are resolved against the recipe's folder")
    return _shuffled(files, root)


def _shuffled(files: list[Path], root: Path) -> list[Path]:
    # A fixed pseudo-random order (by a hash of the relative path) so that the held-out tail of
    # a multi-file source is a fair sample of its files, not just the last folder alphabetically.
    def key(p: Path) -> str:
        rel = p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()
        return hashlib.sha1(rel.encode()).hexdigest()
    return sorted(files, key=key)


_PIECE_BYTES = 1 << 20  # a long document is read and tokenized ~1 MB at a time


def iter_pieces(name: str, spec: SourceSpec, base_dir: Path) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of the source's documents (one per file), in order, stopping at
    max_bytes. A file is streamed in ~1 MB pieces cut at line ends, so no file is ever held whole."""
    budget = spec.max_bytes or sys.maxsize
    for path in list_files(name, spec, base_dir):
        pending = None
        for text in _read_pieces(path, name, skip_bad=spec.builtin is not None):
            size = len(text.encode("utf-8"))
            if size >= budget:
                text = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
                if pending is not None:
                    yield pending, False
                yield text, True
                return
            budget -= size
            if pending is not None:
                yield pending, False
            pending = text
        if pending is not None:
            yield pending, True


def iter_documents(name: str, spec: SourceSpec, base_dir: Path) -> Iterator[str]:
    """Text of the source in reading order, in pieces (for tokenizer training, where document
    boundaries do not matter)."""
    return (text for text, _ in iter_pieces(name, spec, base_dir))


def _read_pieces(path: Path, name: str, skip_bad: bool) -> Iterator[str]:
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(_PIECE_BYTES)
            data = carry + block
            if not data:
                return
            cut = len(data)
            if block:  # more may follow: end this piece at a line end, or at least between characters
                cut = data.rfind(b"\n") + 1 or len(data)
                while cut < len(data) and cut > 0 and data[cut] & 0xC0 == 0x80:
                    cut -= 1
            piece, carry = data[:cut], data[cut:]
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError as e:
                if skip_bad:  # a stray non-UTF-8 file in the installed stdlib is not the user's fault
                    return
                raise DataError(f"{path}: invalid UTF-8 at byte offset {offset + e.start} (source {name!r})",
                                hint="convert the file to UTF-8 or remove it from the source")
            offset += len(piece)
            if text:
                yield text


def source_fingerprint(name: str, spec: SourceSpec, base_dir: Path) -> str:
    """Hash of everything that decides the source's documents: options and file contents."""
    h = hashlib.sha256(spec.model_dump_json(include={"format", "max_bytes", "builtin"}).encode())
    for path in list_files(name, spec, base_dir):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
