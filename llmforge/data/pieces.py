"""A source's documents as a stream of pieces, never a whole corpus in memory: what the token
cache tokenizes and the tokenizer trains on. The max_bytes budget is kept here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .detect import concrete
from .formats import FORMATS
from .sources import Skips, SourceReport, list_files
from .spec import SourceSpec


def iter_pieces(name: str, spec: SourceSpec, base_dir: Path, skips: Skips | None = None) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of the source's documents, in order, stopping at max_bytes
    (UTF-8 bytes of kept text; the document it falls in is cut there and ended). A short document
    comes whole; a long one in ~1 MB pieces cut at line ends, so none is ever held whole. Bad
    records (on_error: skip) and documents outside min_chars..max_chars are counted in `skips`."""
    spec = concrete(name, spec, base_dir)  # (a run resolved it where it started: run/resolve.py)
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
