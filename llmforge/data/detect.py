"""`format: auto`: a source's format told from its first record, before anything reads it.

The common shapes are told apart by their fields: `messages` (chat), `conversations` of
from/value turns (sharegpt), instruction and output (alpaca), chosen and rejected (preference),
completion and label (unpaired), prompt and response (prompt_response), a prompt alone (prompt),
`text` (documents). A file that is not records (not JSON lines, parquet or Arrow) is text. A
source is resolved once, where a run or a plan starts, into a spec with its format set; the plan
says what was found, so a wrong guess is seen before any compute is spent.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from ..errors import DataError
from .columnar import SUFFIXES as COLUMNAR, first_record
from .documents import json_records, listing
from .formats import FORMATS, RECORDS
from .sources import NoFiles, Skips, SourceReport, list_files
from .spec import TEXT_SPLITS, SourceSpec

_HINT = "set data.{name}.format to one of: " + ", ".join(FORMATS)


def resolve_format(name: str, spec: SourceSpec, base_dir: Path) -> tuple[SourceSpec, str]:
    """(spec with its format set, what was detected and why: "" when nothing was to detect, or
    for plain text, the old default that needs no saying)."""
    if spec.format != "auto":
        return spec, ""
    # Lists record files (a folder of text files has none); a text split names no dataset split.
    probe = spec.model_copy(update={"format": "chat", "split": None if spec.split in TEXT_SPLITS else spec.split})
    try:
        files = list_files(name, probe, base_dir)
    except NoFiles:
        files = list_files(name, spec.model_copy(update={"format": "text"}), base_dir)
    report = SourceReport(name, spec, Skips())
    for path in files:
        shown = f"{spec.hf} ({spec.split or 'train'})" if spec.hf else \
            path.relative_to(base_dir) if path.is_relative_to(base_dir) else path.name
        if not path.name.endswith(RECORDS):
            return _resolved(name, spec, "text", {}, "")
        rows = first_record(path, report) if path.name.endswith(COLUMNAR) else \
            next((r for _, r in json_records(path, report, "{...}")), None)
        if rows is not None:
            fmt, settings, why = detect(rows, spec.field, columnar=path.name.endswith(COLUMNAR))
            if fmt is None:
                raise DataError(f"data.{name}.format: auto cannot tell the format of {shown}'s records "
                                f"({listing('fields', list(rows))})", hint=_HINT.format(name=name))
            return _resolved(name, spec, fmt, settings, f"{shown}'s first record has {why}")
    raise DataError(f"data.{name}: format auto found no record to tell the format by ({len(files)} file(s), all empty)",
                    hint=_HINT.format(name=name))


def concrete(name: str, spec: SourceSpec, base_dir: Path) -> SourceSpec:
    """The spec with its format told, for a caller of the data layer that did not resolve it
    (a run resolves every source once, run/resolve.py)."""
    return resolve_format(name, spec, base_dir)[0] if spec.format == "auto" else spec


def detect(record: dict, field: str | None = None, columnar: bool = False) -> tuple[str | None, dict, str]:
    """(format, settings it implies, the fields that told it) for one record; format None: no
    known shape."""
    documents = "parquet" if columnar else "jsonl"
    if field is not None:
        value = record.get(field)
        if isinstance(value, str):
            return documents, {}, f"text in {field!r}"
        if isinstance(value, list):
            return _turns(value, field)
        return None, {}, ""
    if isinstance(record.get("messages"), list):
        return _turns(record["messages"], "messages")
    if isinstance(record.get("conversations"), list):
        return _turns(record["conversations"], "conversations")
    has = set(record)
    for fmt, needs in (("preference", ("prompt", "chosen", "rejected")), ("unpaired", ("prompt", "completion", "label")),
                       ("alpaca", ("instruction", "output")), ("prompt_response", ("prompt", "response")),
                       ("prompt", ("prompt",))):
        if has.issuperset(needs):
            return fmt, {}, " and ".join(repr(k) for k in needs)
    if isinstance(record.get("text"), str):
        return documents, {}, "'text'"
    return None, {}, ""


def _turns(turns: list, field: str) -> tuple[str, dict, str]:
    """A list of turns: ShareGPT's {from, value}, else messages {role, content}."""
    first = turns[0] if turns and isinstance(turns[0], dict) else {}
    sharegpt = "from" in first and "role" not in first
    fmt = "sharegpt" if sharegpt else "chat"
    settings = {} if field == FORMATS[fmt].default_field else {"field": field}
    return fmt, settings, f"{field!r} of {'from/value turns' if sharegpt else 'role/content messages'}"


def _resolved(name: str, spec: SourceSpec, fmt: str, settings: dict, why: str) -> tuple[SourceSpec, str]:
    given = spec.model_dump(exclude_unset=True)
    try:
        resolved = SourceSpec.model_validate(given | {"format": fmt} | {k: v for k, v in settings.items() if k not in given})
    except ValidationError as e:
        problem = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise DataError(f"data.{name}: format auto found {fmt} ({why}), but {problem}",
                        hint=f"set data.{name}.format, or fix the source's settings") from None
    return resolved, why and f"data.{name}: format auto: {fmt} ({why})"
