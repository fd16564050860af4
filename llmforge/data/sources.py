"""Data sources: which files, in what order, how much of them, and which documents are kept.

Reading a file of each format is its reader's job (formats.py); here are file discovery, the
max_bytes budget, the length filter and what happens to bad records (on_error). A source never
loads a whole corpus into memory: `iter_pieces` streams.
"""

from __future__ import annotations

import glob
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .builtins import BUILTINS
from .formats import FORMATS
from .spec import SourceSpec


class NoFiles(DataError):
    """A source's path matches nothing (yet): `plan` goes on without it, `run` stops."""


def list_files(name: str, spec: SourceSpec, base_dir: Path) -> list[Path]:
    """The source's files, in the order their documents are read."""
    if spec.builtin:
        return _shuffled(*BUILTINS[spec.builtin].files())
    pattern = Path(spec.path).expanduser()
    pattern = pattern if pattern.is_absolute() else base_dir / pattern
    try:
        return _matching(name, spec, pattern)
    except OSError as e:  # a name too long, a folder without read permission, a broken mount
        raise DataError(f"data.{name}.path: {spec.path!r} cannot be read ({e.strerror or e})",
                        hint="check the path; relative paths are resolved against the recipe's folder") from None


def _matching(name: str, spec: SourceSpec, pattern: Path) -> list[Path]:
    if pattern.is_dir():
        # Hidden files and folders (.git, .DS_Store, editor swap files) are never data.
        # jsonl and parquet take only their own files from a folder (not a README beside them).
        suffixes = FORMATS[spec.format].suffixes
        files = [p for p in pattern.rglob("*") if p.is_file() and p.name.endswith(suffixes)
                 and not any(part.startswith(".") for part in p.relative_to(pattern).parts)]
        root = pattern
    elif pattern.is_file():
        return [pattern]
    else:
        files = [Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file()]
        # The folder above the first wildcard: file order must not depend on where the project sits.
        parts = pattern.parts
        root = Path(*parts[:next(i for i, part in enumerate(parts) if glob.has_magic(part) or i == len(parts) - 1)])
    if not files:
        kinds = "/".join(FORMATS[spec.format].suffixes)
        what = f"a folder with no {kinds + ' ' if kinds else ''}files" if pattern.is_dir() else "no files"
        raise NoFiles(f"data.{name}.path: {spec.path!r} matches {what} (looked in {pattern})",
                      hint="check the path; relative paths are resolved against the recipe's folder")
    return _shuffled(files, root)


def _shuffled(files: list[Path], root: Path) -> list[Path]:
    # A fixed pseudo-random order (by a hash of the relative path) so that the held-out tail of
    # a multi-file source is a fair sample of its files, not just the last folder alphabetically.
    def key(p: Path) -> str:
        rel = p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()
        return hashlib.sha1(rel.encode()).hexdigest()
    return sorted(files, key=key)


def iter_pieces(name: str, spec: SourceSpec, base_dir: Path, skips: Skips | None = None) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of the source's documents, in order, stopping at max_bytes
    (UTF-8 bytes of kept text; the document it falls in is cut there and ended). A short document
    comes whole; a long one in ~1 MB pieces cut at line ends, so none is ever held whole. Bad
    records (on_error: skip) and documents outside min_chars..max_chars are counted in `skips`."""
    report = SourceReport(name, spec, skips if skips is not None else Skips())
    read = FORMATS[spec.format].read
    budget = spec.max_bytes or sys.maxsize
    files = list_files(name, spec, base_dir)
    documents, inside = 0, False  # inside: a document's first pieces are out, not its last
    for path in files:
        for text, end in read(path, spec, report):
            size = _utf8_len(text)
            if size >= budget:
                text = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
                if text or inside:
                    yield text, True
                return
            budget -= size
            documents += end
            inside = not end
            yield text, end
    if documents == 0:
        what = f"{len(files)} file" + ("s" if len(files) != 1 else "")
        raise DataError(f"data.{name}: the source has no text ({what}, {report.skips.summary() or 'all empty'})",
                        hint="point the source at files with content"
                             + ("; check field, min_chars and max_chars" if report.skips.bad or report.skips.filtered
                                else ""))


def iter_documents(name: str, spec: SourceSpec, base_dir: Path) -> Iterator[str]:
    """Text of the source in reading order, in pieces (for tokenizer training, where document
    boundaries do not matter)."""
    return (text for text, _ in iter_pieces(name, spec, base_dir))


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


@dataclass
class Skips:
    """Records dropped while reading: bad ones (on_error: skip) and ones filtered by length."""

    bad: int = 0
    filtered: int = 0
    examples: list[str] = field(default_factory=list)  # first 5 bad ones: "path:line: reason"

    def add_bad(self, where: str, reason: str) -> None:
        self.bad += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    def summary(self) -> str:
        """'3 bad records skipped (first: a.jsonl:4: ...), 2 documents filtered by length', or ''."""
        parts = []
        if self.bad:
            parts.append(f"{self.bad} bad record{'s' * (self.bad != 1)} skipped (first: {self.examples[0]})")
        if self.filtered:
            parts.append(f"{self.filtered} document{'s' * (self.filtered != 1)} filtered by length")
        return ", ".join(parts)


class SourceReport:
    """The source's rules as readers see them (formats.Report): on_error and min/max_chars."""

    def __init__(self, name: str, spec: SourceSpec, skips: Skips):
        self.source, self.spec, self.skips = name, spec, skips
        # A stray non-UTF-8 file in the installed stdlib is not the user's fault: skip it.
        self.skipping = spec.on_error == "skip" or spec.builtin is not None
        self.low = max(spec.min_chars, 1)  # a document with no text is always dropped
        self.high = spec.max_chars if spec.max_chars is not None else sys.maxsize

    def bad(self, where: str, reason: str, hint: str) -> None:
        if not self.skipping:
            raise DataError(f"{where}: {reason}",
                            hint=f"{hint}; or set on_error: skip in data.{self.source} to skip bad records")
        self.skips.add_bad(where, reason)

    def keep(self, lo: int, hi: int | None = None) -> bool | None:
        hi = lo if hi is None else hi
        if self.low <= lo and hi <= self.high:
            return True
        if hi < self.low or lo > self.high:
            self.skips.filtered += 1
            return False
        return None
