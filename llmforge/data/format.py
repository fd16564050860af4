"""What a data format declares, and what its readers are given. The formats themselves, by name:
formats.py (FORMATS)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

Pieces = Iterator[tuple[str, bool]]  # (text, ends_document): a document whole, or streamed in pieces


class Source(Protocol):
    """What a reader reads of its source's settings (data/spec.py's SourceSpec)."""

    format: str
    split: str | None
    text_field: str
    prompt_field: str
    response_field: str
    answer_field: str
    role_map: dict | None
    train_on_reasoning: bool


class Report(Protocol):
    """What a reader asks of its source (implemented in sources.py)."""

    source: str  # the source's name, for messages
    skipping: bool  # bad records are skipped, so a long document must be checked before it is yielded

    def bad(self, where: str, reason: str, hint: str) -> None:
        """A bad record at `where` ("path:line"): raises DataError, or counts it and returns."""

    def keep(self, lo: int, hi: int | None = None) -> bool | None:
        """Whether a document of lo..hi characters passes the length filter (None: cannot tell yet).
        A document that is dropped is counted."""


Reader = Callable[[Path, Source, Report], Pieces]


@dataclass(frozen=True)
class Format:
    """A data format: documents to pretrain on (text, jsonl, parquet), or examples, conversations
    rendered through the chat template for post-training (chat, preference, ...)."""
    name: str  # as data.<name>.format says it
    # Files a folder contributes to a source of this format ("": every file); a named file or a glob
    # is taken as it is.
    suffixes: tuple[str, ...]
    read: Reader  # one file -> its documents (for examples: each one's text, to train a tokenizer on)
    keys: tuple[str, ...] = ()  # the data.<name> keys that apply to it alone (split, field, prompt_field, ...)
    default_field: str = "text"  # the field (jsonl, chat) or column (parquet) read when `field` is not given
    # Examples only: one file -> (where, example) per kept record, and the template's segments of each
    # sequence an example becomes (a preference pair: chosen and rejected, per_example 2).
    examples: Callable[[Path, Source, Report], Iterator[tuple[str, object]]] | None = None
    sequences: Callable[[object, object], list] | None = None
    per_example: int = 1
    # Each example's last item kept apart, as PreparedExamples.<extra> (a prompt's answer and record, an
    # unpaired reply's label), read back as extra_type(list of them).
    extra: str | None = None
    extra_type: Callable = list

    @property
    def conversations(self) -> bool:
        """Its examples are rendered through the chat template (post-training data)."""
        return self.examples is not None
