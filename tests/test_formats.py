"""Source formats: text (file/paragraph/line), jsonl (+ .gz), parquet; bad data, filters, budget."""

from __future__ import annotations

import gzip
import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmforge.data import documents as readers
from llmforge.data.pieces import iter_documents, iter_pieces
from llmforge.data.sources import Skips, list_files
from llmforge.data.spec import SourceSpec
from llmforge.errors import DataError


def documents(pieces) -> list[str]:
    """Join (text, ends_document) pieces into documents; every document must be ended."""
    docs, current = [], ""
    for text, end in pieces:
        current += text
        if end:
            docs.append(current)
            current = ""
    assert current == "", "the last document was never ended"
    return docs


def read(tmp_path, skips=None, **spec) -> list[str]:
    return documents(iter_pieces("s", SourceSpec(**spec), tmp_path, skips))


def error(tmp_path, **spec) -> DataError:
    with pytest.raises(DataError) as e:
        read(tmp_path, **spec)
    return e.value


# --- text -----------------------------------------------------------------------------------------

TEXT = "first para\nstill first\n\n \t \n\n\nsecond\r\nline two\r\n\n  indented third"


def test_text_splits(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT, newline="")
    assert read(tmp_path, path="a.txt") == [TEXT]
    assert read(tmp_path, path="a.txt", split="paragraph") == [
        "first para\nstill first", "second\r\nline two", "  indented third"]
    assert read(tmp_path, path="a.txt", split="line") == [
        "first para", "still first", "second", "line two", "  indented third"]
    pieces = list(iter_pieces("s", SourceSpec(path="a.txt", split="line"), tmp_path))
    assert all(end for _, end in pieces)  # short documents come whole


def reference(text: str, split: str) -> list[str]:
    """What the paragraph and line splits mean, on a whole string."""
    def blank(line):
        return not line.encode().strip()
    lines = text.split("\n")
    if split == "line":
        docs = [line for line in lines if not blank(line)]
        return [d.removesuffix("\r") for d in docs]
    docs, block = [], []
    for line in lines + [""]:
        if blank(line):
            if block:
                docs.append("\n".join(block).removesuffix("\r"))
            block = []
        else:
            block.append(line)
    return docs


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="ab \t\r\né€😀", max_size=120), piece=st.sampled_from([4, 7, 16, 1 << 20]),
       split=st.sampled_from(["paragraph", "line"]))
def test_paragraph_and_line_splits_match_their_definition(tmp_path_factory, text, piece, split):
    # A tiny PIECE_BYTES sends most documents down the streamed (long document) path.
    tmp = tmp_path_factory.mktemp("split")
    (tmp / "a.txt").write_bytes(text.encode())
    expected = reference(text, split)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(readers, "PIECE_BYTES", piece)
        if not expected:
            with pytest.raises(DataError, match="no text"):
                read(tmp, path="a.txt", split=split)
            return
        assert read(tmp, path="a.txt", split=split) == expected
        skips, kept = Skips(), [d for d in expected if 3 <= len(d) <= 9]
        if kept:
            assert read(tmp, skips, path="a.txt", split=split, min_chars=3, max_chars=9) == kept
            assert skips.filtered == len(expected) - len(kept)


def test_long_file_streams_in_bounded_pieces(tmp_path):
    # 5 MB with lines, and 5 MB with no line end at all and multi-byte characters on every boundary.
    lined = ("some words on a line, " * 4 + "\n") * 55_000
    solid = "aé€😀" * 500_000
    for name, text in [("lined.txt", lined), ("solid.txt", solid)]:
        (tmp_path / name).write_text(text)
        pieces = list(iter_pieces("s", SourceSpec(path=name), tmp_path))
        assert len(pieces) >= 5 and max(len(t.encode()) for t, _ in pieces) <= readers.PIECE_BYTES
        assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
        assert "".join(t for t, _ in pieces) == text
    # Cut just before a word start (a space after a non-space), where BPE never merges across.
    pieces = [t for t, _ in iter_pieces("s", SourceSpec(path="lined.txt"), tmp_path)]
    assert all(b.startswith(" ") and not a.endswith(" ") for a, b in zip(pieces, pieces[1:]))


def test_long_paragraph_and_line_stream(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "PIECE_BYTES", 64)
    para = "\n".join(f"line {i} of a long paragraph" for i in range(40))
    (tmp_path / "a.txt").write_text(f"short\n\n{para}\n\n" + "x" * 500 + "\n")
    pieces = list(iter_pieces("s", SourceSpec(path="a.txt", split="paragraph"), tmp_path))
    assert documents(pieces) == ["short", para, "x" * 500]
    assert max(len(t) for t, _ in pieces) <= 64 and sum(end for _, end in pieces) == 3
    assert read(tmp_path, path="a.txt", split="line")[-1] == "x" * 500


def test_text_invalid_utf8(tmp_path, monkeypatch):
    (tmp_path / "bad.txt").write_bytes(b"good\n\nfine \xff here\nmore\n\nok\n")
    where = tmp_path / "bad.txt"
    e = error(tmp_path, path="bad.txt")
    assert e.message == f"{where}: invalid UTF-8 at byte offset 11 (source 's')"
    assert "UTF-8" in e.hint and "on_error: skip" in e.hint
    assert error(tmp_path, path="bad.txt", split="paragraph").message == f"{where}:3: invalid UTF-8"
    assert error(tmp_path, path="bad.txt", split="line").message == f"{where}:3: invalid UTF-8"
    skips = Skips()
    assert read(tmp_path, skips, path="bad.txt", split="paragraph", on_error="skip") == ["good", "ok"]
    assert (skips.bad, skips.examples) == (1, [f"{where}:3: invalid UTF-8"])
    assert read(tmp_path, path="bad.txt", split="line", on_error="skip") == ["good", "more", "ok"]
    # A long document is checked before any of it goes out, so a skipped file leaves nothing behind.
    monkeypatch.setattr(readers, "PIECE_BYTES", 16)
    (tmp_path / "good.txt").write_text("all fine " * 20)
    skips = Skips()
    assert read(tmp_path, skips, path="*.txt", on_error="skip") == ["all fine " * 20]
    assert skips.examples == [f"{where}: invalid UTF-8 at byte offset 11 (source 's')"]
    assert error(tmp_path, path="bad.txt", split="paragraph").message == f"{where}:3: invalid UTF-8"


def test_length_filter_on_long_files(tmp_path, monkeypatch):
    # Long files are judged from their size (bytes/4 <= chars <= bytes) when that decides, and
    # counted exactly when it does not; either way the verdict is the exact one.
    monkeypatch.setattr(readers, "PIECE_BYTES", 32)
    (tmp_path / "ascii.txt").write_text("a" * 100)  # 100 chars, 100 bytes
    (tmp_path / "wide.txt").write_text("€" * 100)  # 100 chars, 300 bytes
    (tmp_path / "short.txt").write_text("tiny")
    for lo, hi, kept in [(0, 100, 3), (0, 99, 1), (101, 1000, 0), (50, 150, 2), (1, 10, 1), (5, 1000, 2)]:
        skips = Skips()
        if kept:
            assert len(read(tmp_path, skips, path="*.txt", min_chars=lo, max_chars=hi)) == kept
            assert skips.filtered == 3 - kept
        else:
            e = error(tmp_path, path="*.txt", min_chars=lo, max_chars=hi)
            assert e.message == "data.s: the source has no text (3 files, 3 documents filtered by length)"
    monkeypatch.setattr(readers, "_scan", None)  # sizes alone decide these: the files are read once
    assert len(read(tmp_path, path="*.txt", min_chars=4, max_chars=1000)) == 3
    assert len(read(tmp_path, path="*.txt", max_chars=24)) == 1


# --- jsonl ----------------------------------------------------------------------------------------

def write_jsonl(path, lines):
    """Objects become a line each; strings are written as they are."""
    data = "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines)
    path.write_bytes(gzip.compress(data.encode()) if path.name.endswith(".gz") else data.encode())


def test_jsonl_and_gz(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "id": 1}, "\n", "  \n", {"text": "two\nlines"}, "\n"])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"body": "zipped"}, "\n"])
    assert read(tmp_path, path="a.jsonl", format="jsonl") == ["one", "two\nlines"]
    assert read(tmp_path, path="b.jsonl.gz", format="jsonl", field="body") == ["zipped"]
    # A folder gives only its .jsonl/.jsonl.gz files (not the README); a named file is taken as is.
    (tmp_path / "README.md").write_text("not data")
    write_jsonl(tmp_path / "c.json", [{"text": "named"}])
    files = list_files("s", SourceSpec(path=".", format="jsonl"), tmp_path)
    assert sorted(p.name for p in files) == ["a.jsonl", "b.jsonl.gz"]
    assert read(tmp_path, path="c.json", format="jsonl") == ["named"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("x")
    assert "a folder with no .jsonl/.jsonl.gz files" in error(tmp_path, path="sub", format="jsonl").message


BAD_JSONL = [
    ('{"text": "a" "b"}', "malformed JSON (Expecting ',' delimiter at column 14)", "JSON object"),
    ('[1, 2]', "a JSON list, not an object", "JSON object"),
    ('{"body": "x", "id": 3}', "no field 'text' (fields: body, id)", "data.s.field"),
    ('{"text": 42}', "field 'text' is int, not a string", "data.s.field"),
    ('{"text": null}', "field 'text' is null, not a string", "data.s.field"),
    ('{"text": "\\ud800"}', "field 'text' holds an unpaired surrogate (not valid Unicode)", "escapes"),
]


@pytest.mark.parametrize("line,reason,hint", BAD_JSONL)
def test_jsonl_bad_records(tmp_path, line, reason, hint):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, "\n", line + "\n", {"text": "also"}])
    e = error(tmp_path, path="d.jsonl", format="jsonl")
    assert e.message == f"{tmp_path / 'd.jsonl'}:3: {reason}"
    assert hint in e.hint and "on_error: skip" in e.hint
    skips = Skips()
    assert read(tmp_path, skips, path="d.jsonl", format="jsonl", on_error="skip") == ["fine", "also"]
    assert (skips.bad, skips.examples) == (1, [f"{tmp_path / 'd.jsonl'}:3: {reason}"])


def test_jsonl_invalid_utf8_and_many_bad(tmp_path):
    (tmp_path / "u.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "\xff"}\n'))
    e = error(tmp_path, path="u.jsonl.gz", format="jsonl")
    assert e.message == f"{tmp_path / 'u.jsonl.gz'}:2: invalid UTF-8"
    write_jsonl(tmp_path / "m.jsonl", ["{}\n"] * 8 + [{"text": "kept"}])
    skips = Skips()
    assert read(tmp_path, skips, path="m.jsonl", format="jsonl", on_error="skip") == ["kept"]
    assert skips.bad == 8 and len(skips.examples) == 5
    assert skips.examples[0] == f"{tmp_path / 'm.jsonl'}:1: no field 'text' (no fields)"
    assert skips.summary().startswith("8 bad records skipped (first: ")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    assert "not a readable gzip file" in error(tmp_path, path="broken.jsonl.gz", format="jsonl").message


# --- parquet --------------------------------------------------------------------------------------

def write_parquet(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path, row_group_size=2)


def test_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    texts = [f"doc {i}" for i in range(600)]  # several record batches and row groups
    write_parquet(tmp_path / "a.parquet", text=texts, n=list(range(600)))
    assert read(tmp_path, path="a.parquet", format="parquet") == texts
    e = error(tmp_path, path="a.parquet", format="parquet", field="body")
    assert e.message == f"{tmp_path / 'a.parquet'}: no column 'body' (columns: text, n)"
    e = error(tmp_path, path="a.parquet", format="parquet", field="n")
    assert e.message == f"{tmp_path / 'a.parquet'}: column 'n' is int64, not a string"
    with pytest.raises(DataError, match="no column"):  # not a record: skipping does not apply
        read(tmp_path, path="a.parquet", format="parquet", field="body", on_error="skip")


def test_parquet_nulls(tmp_path):
    pytest.importorskip("pyarrow")
    write_parquet(tmp_path / "n.parquet", text=["a", None, "", "b", None])
    e = error(tmp_path, path="n.parquet", format="parquet")
    assert e.message == f"{tmp_path / 'n.parquet'}: row 2: null" and "on_error: skip" in e.hint
    skips = Skips()
    assert read(tmp_path, skips, path="n.parquet", format="parquet", on_error="skip") == ["a", "b"]
    assert (skips.bad, skips.filtered) == (2, 1)  # the empty string is a document with no text
    assert skips.examples == [f"{tmp_path / 'n.parquet'}: row 2: null", f"{tmp_path / 'n.parquet'}: row 5: null"]


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    e = error(tmp_path, path="a.parquet", format="parquet", on_error="skip")
    assert e.message == "data.s: reading parquet or Arrow files needs pyarrow"
    assert e.hint == "pip install 'llmforge[parquet]'"


# --- every format ---------------------------------------------------------------------------------

def test_filters_count(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in ["", "ab", "abcd", "abcdefgh", "€€€"]])
    skips = Skips()
    assert read(tmp_path, skips, path="a.jsonl", format="jsonl", min_chars=3, max_chars=4) == ["abcd", "€€€"]
    assert (skips.filtered, skips.bad) == (3, 0)


def test_max_bytes_for_every_format(tmp_path):
    pytest.importorskip("pyarrow")
    texts = [f"document number {i} é" for i in range(50)]
    (tmp_path / "a.txt").write_text("\n".join(texts))
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    write_parquet(tmp_path / "a.parquet", text=texts)
    for spec in [dict(path="a.txt"), dict(path="a.txt", split="line"), dict(path="a.jsonl", format="jsonl"),
                 dict(path="a.parquet", format="parquet")]:
        pieces = list(iter_pieces("s", SourceSpec(**spec, max_bytes=100), tmp_path))
        whole = "\n".join(texts) if spec == dict(path="a.txt") else "".join(texts)  # line ends are not kept
        assert "".join(documents(pieces)) == whole.encode()[:100].decode(errors="ignore")
        assert sum(len(t.encode()) for t, _ in pieces) <= 100 and pieces[-1][1]


def test_not_records_always_raise(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        read(tmp_path, path="missing.jsonl", format="jsonl", on_error="skip")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    e = error(tmp_path, path="blank.txt", split="paragraph", on_error="skip")
    assert e.message == "data.s: the source has no text (1 file, all empty)"
    write_jsonl(tmp_path / "bad.jsonl", ["nope\n"])
    e = error(tmp_path, path="bad.jsonl", format="jsonl", on_error="skip")
    assert e.message.startswith("data.s: the source has no text (1 file, 1 bad record skipped (first: ")


def test_builtin_stdlib_still_reads(tmp_path):
    spec = SourceSpec(builtin="python-stdlib", max_bytes=20_000)
    text = "".join(iter_documents("std", spec, tmp_path))
    assert 19_000 < len(text.encode()) <= 20_000 and ("def " in text or "import " in text)
