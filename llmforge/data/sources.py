"""Data sources: which files, in what order, and which records are kept.

Reading a file of each format is its reader's job (formats.py); here are file discovery (a Hub
dataset's and a saved dataset's files from hub.py), the length filter and what happens to bad
records (on_error), counted by reason. Streaming a source's documents is pieces.py's.
"""

from __future__ import annotations

import glob
import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..core.paths import recipe_path
from ..errors import DataError
from .builtins import BUILTINS
from .formats import FORMATS
from .hub import hub_files, saved_files
from .spec import TEXT_SPLITS, SourceSpec


class NoFiles(DataError):
    """A source's path matches nothing (yet): `plan` goes on without it, `run` stops."""


def list_files(name: str, spec: SourceSpec, base_dir: Path) -> list[Path]:
    """The source's files, in the order their documents are read."""
    if spec.builtin:
        return _shuffled(*BUILTINS[spec.builtin].files())
    if spec.hf:  # in the dataset's own order: its last rows are held out
        return hub_files(name, spec.hf, spec.subset, spec.split, spec.revision)
    pattern = recipe_path(base_dir, spec.path)
    try:
        if pattern.is_dir() and (saved := saved_files(name, pattern, spec.split)) is not None:
            return saved
        if spec.split is not None and not (spec.split in TEXT_SPLITS and "split" in _keys(spec)):
            raise DataError(f"data.{name}.split: {spec.path!r} is not a dataset with splits (a folder "
                            "save_to_disk wrote)", hint=f"leave data.{name}.split out")
        return _matching(name, spec, pattern)
    except OSError as e:  # a name too long, a folder without read permission, a broken mount
        raise DataError(f"data.{name}.path: {spec.path!r} cannot be read ({e.strerror or e})",
                        hint="check the path; relative paths are resolved against the recipe's folder") from None


def _matching(name: str, spec: SourceSpec, pattern: Path) -> list[Path]:
    if pattern.is_dir():
        # Hidden files and folders (.git, .DS_Store, editor swap files) are never data.
        # jsonl and parquet take only their own files from a folder (not a README beside them).
        suffixes = _suffixes(spec)
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
        kinds = "/".join(_suffixes(spec))
        what = f"a folder with no {kinds + ' ' if kinds else ''}files" if pattern.is_dir() else "no files"
        raise NoFiles(f"data.{name}.path: {spec.path!r} matches {what} (looked in {pattern})",
                      hint="check the path; relative paths are resolved against the recipe's folder")
    return _shuffled(files, root)


def _keys(spec: SourceSpec) -> tuple[str, ...]:
    """The keys that apply to the source's format; while it is to be told (auto), any may."""
    return FORMATS[spec.format].keys if spec.format in FORMATS else ("split",)


def _suffixes(spec: SourceSpec) -> tuple[str, ...]:
    """What a folder gives: a format's own files; every file while the format is to be told."""
    return FORMATS[spec.format].suffixes if spec.format in FORMATS else ("",)


def _shuffled(files: list[Path], root: Path) -> list[Path]:
    # A fixed pseudo-random order (by a hash of the relative path) so that the held-out tail of
    # a multi-file source is a fair sample of its files, not just the last folder alphabetically.
    def key(p: Path) -> str:
        rel = p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()
        return hashlib.sha1(rel.encode()).hexdigest()
    return sorted(files, key=key)


@dataclass
class Skips:
    """Records dropped while reading: bad ones (on_error: skip) and ones filtered by length, each
    counted by its reason (the plan and metrics.jsonl say why every dropped record went)."""

    bad: int = 0
    filtered: int = 0
    examples: list[str] = field(default_factory=list)  # first 5 bad ones: "path:line: reason"
    reasons: dict[str, int] = field(default_factory=dict)  # reason (without the record's details) -> count

    def add_bad(self, where: str, reason: str) -> None:
        self.bad += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")
        self._count(reason_kind(reason))

    def add_filtered(self, why: str) -> None:
        self.filtered += 1
        self._count(why)

    def _count(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def summary(self) -> str:
        """'3 bad records skipped (first: a.jsonl:4: ...), 2 documents filtered by length', or ''."""
        parts = []
        if self.bad:
            parts.append(f"{self.bad} bad record{'s' * (self.bad != 1)} skipped (first: {self.examples[0]})")
        if self.filtered:
            parts.append(f"{self.filtered} document{'s' * (self.filtered != 1)} filtered by length")
        return ", ".join(parts)


def reason_kind(reason: str) -> str:
    """A bad record's reason as one kind of problem: message indices and the details in
    parentheses dropped ("messages[3]: unknown role 'bot' (known: ...)" -> "messages[i]: unknown
    role 'bot'"), so that records bad the same way count together."""
    return re.sub(r" \(.*\)$", "", re.sub(r"\[\d+\]", "[i]", reason))


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
            self.skips.add_filtered("empty" if hi == 0 else f"shorter than min_chars ({self.low})" if hi < self.low
                                    else f"longer than max_chars ({self.high})")
            return False
        return None
