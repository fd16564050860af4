"""Readers: one file of a source -> its documents, as (text, ends_document) pieces.

A reader yields a short document whole, as (text, True), and streams a long one (over ~1 MB) as
pieces cut at line ends, the last with ends_document=True, so no file, paragraph or line is ever
held whole. Readers do not decide what happens to a bad record or which lengths are kept: they ask
the `Report` that sources.py hands them (it raises or counts, per `on_error` and min/max_chars).
Parquet and Arrow files are read in columnar.py, conversation formats (chat, preference, ...) in
examples.py; which reader a format uses, formats.py says.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .format import Pieces, Report, Source

PIECE_BYTES = 1 << 20  # a long document is read and tokenized ~1 MB at a time

_UTF8_HINT = "convert the file to UTF-8 or remove it from the source"


# --- text -----------------------------------------------------------------------------------------
# A text document is a byte span [start, end) of its file. Short spans are decoded from memory; long
# ones are streamed from the file (see _long_document).

def read_text_file(path: Path, spec: Source, report: Report) -> Pieces:
    """The whole file is one document."""
    size = path.stat().st_size
    if size <= PIECE_BYTES:
        with open(path, "rb") as f:
            return _short_document(path, f.read(), None, report)
    return _long_document(path, 0, size, None, report)


def read_paragraphs(path: Path, spec: Source, report: Report) -> Pieces:
    """A document per block of lines between blank (empty or whitespace-only) lines; the paragraph
    keeps its inner line breaks, not the one after its last line."""
    with open(path, "rb") as f:
        doc = None  # [start, end, first line number, parts (None once long), size, ends with \r]
        for number, (start, end, content, blank, cr) in enumerate(_lines(f), 1):
            if blank:
                if doc:
                    yield from _span_document(path, doc, report)
                doc = None
                continue
            if doc is None:
                doc = [start, end, number, [], 0, cr]
            doc[1], doc[5] = end, cr
            if doc[3] is not None:
                if content is None or doc[4] + len(content) > PIECE_BYTES:
                    doc[3] = None
                else:
                    doc[3].append(content)
                    doc[4] += len(content) + 1
        if doc:
            yield from _span_document(path, doc, report)


def read_lines(path: Path, spec: Source, report: Report) -> Pieces:
    """A document per line that is not blank, without its line break."""
    with open(path, "rb") as f:
        for number, (start, end, content, blank, cr) in enumerate(_lines(f), 1):
            if not blank:
                short = content is not None and len(content) <= PIECE_BYTES
                yield from _span_document(path, [start, end, number, [content] if short else None, 0, cr], report)


def read_text(path: Path, spec: Source, report: Report) -> Pieces:
    """A text file's documents, as data.<name>.split cuts them: the file, paragraphs or lines."""
    return _SPLITS[spec.split or "file"](path, spec, report)


_SPLITS = {"file": read_text_file, "paragraph": read_paragraphs, "line": read_lines}


def _span_document(path: Path, doc: list, report: Report) -> Pieces:
    start, end, number, parts, _, cr = doc
    end -= cr  # "\r\n" line ends: the "\r" belongs to the break
    if parts is not None:
        data = b"\n".join(parts)
        return _short_document(path, data[:-1] if cr else data, number, report)
    return _long_document(path, start, end, number, report)


def _lines(f) -> Iterator[tuple[int, int, bytes | None, bool, bool]]:
    """(start, end, content, blank, ends with \\r) per line of a binary file; `end` excludes the "\\n".
    A line longer than PIECE_BYTES is not kept (content None): only its span and blankness are."""
    offset, carry = 0, b""  # carry: the unfinished line at offset
    long_start, long_blank = None, True  # a long line being passed over
    while True:
        block = f.read(PIECE_BYTES)
        data = carry + block if carry else block
        lines = data.split(b"\n")
        carry = lines.pop()  # after the last "\n": an unfinished line
        for line in lines:
            end = offset + len(line)
            if long_start is not None:
                yield long_start, end, None, long_blank and not line.strip(), line.endswith(b"\r")
                long_start, long_blank = None, True
            else:
                yield offset, end, line, not line.strip(), line.endswith(b"\r")
            offset = end + 1
        if not block:  # end of file: a last line without "\n"
            if long_start is not None:
                yield long_start, offset + len(carry), None, long_blank and not carry.strip(), carry.endswith(b"\r")
            elif carry:
                yield offset, offset + len(carry), carry, not carry.strip(), carry.endswith(b"\r")
            return
        if len(carry) > PIECE_BYTES:  # pass over it, keeping its last byte (a "\r" before the "\n"?)
            if long_start is None:
                long_start = offset
            long_blank = long_blank and not carry.strip()
            offset += len(carry) - 1
            carry = carry[-1:]


def _short_document(path: Path, data: bytes, line: int | None, report: Report) -> Pieces:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        _bad_utf8(path, e.start, line and line + data.count(b"\n", 0, e.start), report)
        return
    if report.keep(len(text)):
        yield text, True


def _long_document(path: Path, start: int, end: int, line: int | None, report: Report) -> Pieces:
    # Length filter without holding the document: UTF-8 takes 1 to 4 bytes per character, so
    # bytes/4 <= chars <= bytes. Only when that range straddles min_chars or max_chars (or when bad
    # records are skipped, so a bad byte must be found before any piece goes out) is the span read
    # once more first, counting characters and checking UTF-8.
    size = end - start
    verdict = report.keep(-(-size // 4), size)
    if verdict is False:
        return
    if verdict is None or report.skipping:
        chars, bad = _scan(path, start, end)
        if bad is not None:
            _bad_utf8(path, bad, line and line + _count_newlines(path, start, bad), report)
            return
        if verdict is None and not report.keep(chars):
            return
    yield from _stream(path, start, end, line, report)


def _word_start(data: bytes) -> int:
    """Offset of the last space that follows a non-space (0 if none). The BPE tokenizer never
    merges across that point (see Tokenizer.encode_batch), so pieces cut there tokenize exactly
    as the whole document would."""
    i = data.rfind(b" ")
    while i > 0 and data[i - 1] == 0x20:
        i -= 1
    return max(i, 0)


def _stream(path: Path, start: int, end: int, line: int | None, report: Report) -> Pieces:
    """The span in ~PIECE_BYTES pieces, each ending before a word start when there is one (else
    at a line end, else between characters), so tokenizing them separately changes no token."""
    pending, carry, offset = None, b"", start  # offset: file position of carry[0]
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            block = f.read(min(PIECE_BYTES - len(carry), end - offset - len(carry)))  # carry < PIECE_BYTES
            data = carry + block
            if not data:
                break
            cut = len(data)
            if block and offset + len(data) < end:  # more follows: cut at the last word start, or
                cut = _word_start(data) or data.rfind(b"\n") + 1  # line end, or before the last character
                if not cut:
                    cut = len(data) - 1
                    while cut > len(data) - 4 and data[cut] & 0xC0 == 0x80:  # UTF-8: <= 3 continuation bytes
                        cut -= 1
            piece, carry = data[:cut], data[cut:]
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = offset + e.start
                _bad_utf8(path, bad, line and line + _count_newlines(path, start, bad), report)
                # Only reached when skipping, and then the span was checked first: the file changed.
                raise DataError(f"{path}: changed while being read (source {report.source!r})")
            offset += len(piece)
            if text:
                if pending is not None:
                    yield pending, False
                pending = text
    if pending is not None:
        yield pending, True


def _blocks(path: Path, start: int, end: int) -> Iterator[bytes]:
    """The bytes of a span of a file, PIECE_BYTES at a time."""
    with open(path, "rb") as f:
        f.seek(start)
        while start < end:
            block = f.read(min(PIECE_BYTES, end - start))
            if not block:
                return
            start += len(block)
            yield block


def _scan(path: Path, start: int, end: int) -> tuple[int, int | None]:
    """(characters, offset of the first invalid UTF-8 byte or None) of a span, read block by block."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    chars, offset = 0, start
    for block in _blocks(path, start, end):
        held = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
        try:
            chars += len(decoder.decode(block, final=offset + len(block) >= end))
        except UnicodeDecodeError as e:
            return chars, offset - held + e.start
        offset += len(block)
    return chars, None


def _count_newlines(path: Path, start: int, end: int) -> int:
    return sum(block.count(b"\n") for block in _blocks(path, start, end))


def _bad_utf8(path: Path, offset: int, line: int | None, report: Report) -> None:
    """split: file names the byte offset; paragraph and line splits name the line."""
    if line is None:
        report.bad(str(path), f"invalid UTF-8 at byte offset {offset} (source {report.source!r})", _UTF8_HINT)
    else:
        report.bad(f"{path}:{line}", "invalid UTF-8", _UTF8_HINT)


# --- jsonl ----------------------------------------------------------------------------------------

def json_records(path: Path, report: Report, like: str) -> Iterator[tuple[str, dict]]:
    """("path:line", object) per non-blank line of a JSON-lines file (`.gz`: gzipped); shared by the
    jsonl reader and the example readers (examples.py). A line that is not UTF-8 or not a JSON
    object goes to report.bad; `like` shows the expected shape in the hint."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    report.bad(where, "invalid UTF-8", _UTF8_HINT)
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    report.bad(where, f"malformed JSON ({e.msg} at column {e.colno})",
                               "each line must be one JSON object")
                    continue
                if not isinstance(record, dict):
                    report.bad(where, f"a JSON {json_type(record)}, not an object",
                               f"each line must be one JSON object, like {like}")
                    continue
                yield where, record
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})", hint="recompress the file, or drop .gz from its name")


def read_jsonl(path: Path, spec: Source, report: Report) -> Pieces:
    """A document per non-blank line: a JSON object whose `field` holds the text. `.gz`: gzipped."""
    field = spec.text_field
    for where, record in json_records(path, report, f'{{"{field}": "..."}}'):
        if field not in record:
            report.bad(where, f"no field {field!r} ({listing('fields', list(record))})",
                       f"set data.{report.source}.field to the field that holds the text")
            continue
        text = record[field]
        if not isinstance(text, str):
            report.bad(where, f"field {field!r} is {json_type(text)}, not a string",
                       f"data.{report.source}.field must name a field that holds text")
            continue
        if not valid_unicode(text):
            report.bad(where, f"field {field!r} holds an unpaired surrogate (not valid Unicode)",
                       "fix the record's \\uXXXX escapes")
            continue
        if report.keep(len(text)):
            yield text, True


def json_type(value) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string"}.get(type(value), type(value).__name__)


def listing(what: str, names: list) -> str:
    if not names:
        return f"no {what}"
    shown = ", ".join(map(str, names[:12]))
    return f"{what}: {shown}" + (f", ... ({len(names)} in all)" if len(names) > 12 else "")


def valid_unicode(text: str) -> bool:
    """False for a string with an unpaired surrogate (JSON's "\\ud800"), which cannot be encoded."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
