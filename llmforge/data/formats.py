"""Data formats by name (FORMATS): what data.<name>.format may say, which files a folder gives,
which reader turns a file into documents or examples, and for examples what sequences each one
becomes. The schema's format values and the cache's handling come from here; adding a format is
a Format below (its reader in documents.py or examples.py).
"""

from __future__ import annotations

import functools

import numpy as np

from . import columnar, documents, examples
from .format import Format, Report, Source

_JSONL = (".jsonl", ".jsonl.gz")
# Records: JSON lines, or the rows of parquet and Arrow files (a Hugging Face dataset's shards).
RECORDS = _JSONL + columnar.SUFFIXES


def _examples(name: str, read, contents, sequences, **more) -> Format:
    """A conversation format: records, rendered through the chat template."""
    return Format(name, RECORDS, functools.partial(examples.read_example_texts, examples=read, contents=contents),
                  examples=read, sequences=sequences, **more)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("text", ("",), documents.read_text, keys=("split",)),
    Format("jsonl", _JSONL, documents.read_jsonl, keys=("field",)),
    Format("parquet", columnar.SUFFIXES, columnar.read_columnar, keys=("field",)),
    _examples("chat", examples.read_chat, examples.message_contents, lambda ex, template: [template.segments(ex)],
              keys=("field", "role_map", "train_on_reasoning"), default_field="messages"),
    _examples("sharegpt", examples.read_sharegpt, examples.message_contents, lambda ex, template: [template.segments(ex)],
              keys=("field", "role_map", "train_on_reasoning"), default_field="conversations"),
    _examples("alpaca", examples.read_alpaca, examples.message_contents, lambda ex, template: [template.segments(ex)]),
    _examples("prompt_response", examples.read_prompt_response, examples.message_contents,
              lambda ex, template: [template.segments(ex)], keys=("prompt_field", "response_field")),
    _examples("preference", examples.read_preference, examples.pair_contents,
              lambda ex, template: [template.pair_segments(ex[0], ex[1]), template.pair_segments(ex[0], ex[2])],
              per_example=2),
    _examples("unpaired", examples.read_unpaired, examples.unpaired_contents,
              lambda ex, template: [template.pair_segments(ex[0], ex[1])], extra="labels",
              extra_type=lambda labels: np.array(labels, dtype=bool)),
    # What the policy continues; the reference answer and the whole record stay as they were read.
    _examples("prompt", examples.read_prompt, examples.prompt_contents,
              lambda ex, template: [template.prompt_segments(ex[0])], keys=("prompt_field", "answer_field"),
              extra="prompts"),
)}


def read_examples(path, spec: Source, report: Report):
    """(where, example) per kept record of a conversation file (examples.py says what each is)."""
    return FORMATS[spec.format].examples(path, spec, report)
