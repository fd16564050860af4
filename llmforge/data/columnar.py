"""Columnar files: parquet, and the Arrow shards a Hugging Face dataset is kept in (`datasets`
writes them as Arrow IPC streams, in its cache and in a save_to_disk folder).

Both are read a record batch at a time, never the whole table: `read_columnar` yields documents
from one text column (the jsonl/parquet formats), `columnar_records` yields each row as a dict,
so the conversation readers (examples.py) read a parquet or Arrow file as they read JSON lines.
Rows are numbered from 1, like lines, in messages ("train.parquet: row 12").
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .documents import listing
from .format import Pieces, Report, Source

SUFFIXES = (".parquet", ".arrow")
_BATCH_ROWS = 256  # rows per record batch: a few MB even for long documents or conversations


def _pyarrow(report: Report):
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401  (pa.ipc is a submodule, not loaded by `import pyarrow`)
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"data.{report.source}: reading parquet or Arrow files needs pyarrow",
                        hint="pip install 'llmforge[parquet]'") from None
    return pa


def _batches(path: Path, report: Report, columns: list[str] | None = None):
    """(schema, iterator of record batches) of one parquet or Arrow file."""
    pa = _pyarrow(report)
    try:
        if path.name.endswith(".parquet"):
            pf = pa.parquet.ParquetFile(path)
            return pf.schema_arrow, pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))  # what `datasets` writes
            batches = iter(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))  # Feather v2, the IPC file format
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        return reader.schema, (b.select(columns) for b in batches) if columns else batches
    except (pa.ArrowException, OSError) as e:
        kind = "parquet" if path.name.endswith(".parquet") else "Arrow"
        raise DataError(f"{path}: not a readable {kind} file ({e})",
                        hint="check the file; parquet comes from pyarrow, pandas, Spark...; Arrow shards from "
                             "`datasets` (save_to_disk)") from None


def _rows(path: Path, report: Report, batches) -> Iterator[list]:
    pa = _pyarrow(report)
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except pa.ArrowException as e:
            raise DataError(f"{path}: unreadable after row {row} ({e})", hint="check the file") from None
        if batch is None:
            return
        row += batch.num_rows
        yield batch


def read_columnar(path: Path, spec: Source, report: Report) -> Pieces:
    """A document per row of column `field`."""
    pa = _pyarrow(report)
    field = spec.text_field
    schema, batches = _batches(path, report, None)
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} ({listing('columns', schema.names)})",
                        hint=f"set data.{report.source}.field to the column that holds the text")
    kind = schema.field(field).type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind)
            or getattr(pa.types, "is_string_view", lambda t: False)(value_kind)):
        raise DataError(f"{path}: column {field!r} is {kind}, not a string",
                        hint=f"data.{report.source}.field must name a column of text")
    if path.name.endswith(".parquet"):  # read the one column only
        schema, batches = _batches(path, report, [field])
    row = 0
    for batch in _rows(path, report, batches):
        for text in batch.column(field).to_pylist():
            row += 1
            if text is None:
                report.bad(f"{path}: row {row}", "null", "drop or fill the rows without text")
            elif report.keep(len(text)):
                yield text, True


def columnar_records(path: Path, report: Report) -> Iterator[tuple[str, dict]]:
    """("path: row N", the row as a dict) per row."""
    row = 0
    for batch in _rows(path, report, _batches(path, report)[1]):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", record


def first_record(path: Path, report: Report) -> dict | None:
    """The file's first row (format: auto looks at it), None for an empty file."""
    return next((record for _, record in columnar_records(path, report)), None)
