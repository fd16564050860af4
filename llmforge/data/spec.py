"""A data source as a recipe names it (data.<name>): where its files are, their format, and how
documents or examples are cut from them; and the built-in sources."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..core.values import Count, Float, Fraction, PositiveCount, Spec, parse_fraction
from .builtins import BUILTINS
from .formats import FORMATS


TEXT_SPLITS = ("file", "paragraph", "line")


class SourceSpec(Spec):
    # file, directory or glob; relative to the recipe's folder. A folder save_to_disk wrote is read as
    # that dataset (data/hub.py).
    path: str | None = None
    builtin: Literal[tuple(BUILTINS)] | None = None  # data/builtins.py
    hf: str | None = None  # a Hugging Face dataset, org/name, loaded through `datasets` (data/hub.py)
    subset: str | None = None  # hf: the dataset's configuration (its "subset" on the Hub)
    revision: str | None = None  # hf: a branch, tag or commit
    # text/jsonl/parquet: documents. chat: jsonl of {messages: [{role, content}]}. sharegpt: jsonl of
    # {conversations: [{from, value}]}. alpaca: jsonl of {instruction, input, output}. prompt_response:
    # jsonl with a prompt and a response field. preference: jsonl of {prompt, chosen, rejected}.
    # unpaired: jsonl of {prompt, completion, label} (label true: a good reply, false: a bad one; kto).
    # prompt: jsonl of {prompt, system (optional), answer (optional: the reference a verifier checks)}.
    # auto: told by the first record (data/detect.py): a file that is not records is text.
    format: Literal[tuple(FORMATS) + ("auto",)] = "auto"  # data/formats.py
    # text: one document per file, blank-line block or line (default file). A dataset (hf, or a folder
    # save_to_disk wrote with splits): the split to read (default train).
    split: str | None = None
    field: str | None = None  # jsonl: the field holding the text (default text); parquet: the column
    # (default text); chat: the field holding the message list (default messages)
    prompt_field: str = "prompt"  # prompt_response, prompt: the user's turn
    answer_field: str = "answer"  # prompt: the reference answer (optional in each record)
    response_field: str = "response"  # prompt_response: the assistant's turn
    # chat, sharegpt: other role or speaker names as system, user or assistant ({human: user, bot: assistant})
    role_map: dict[str, Literal["system", "user", "assistant", "tool"]] | None = None
    # chat, sharegpt: an assistant's reasoning (reasoning_content, or <think>...</think>) is learned with its reply
    train_on_reasoning: bool = True
    min_chars: Count = 0  # documents shorter than this are dropped
    max_chars: PositiveCount | None = None  # documents longer than this are dropped
    on_error: Literal["fail", "skip"] = "fail"  # skip: bad records are counted and reported, not fatal
    val_fraction: Fraction = 0.05  # the last share of the source's tokens is held out
    max_bytes: PositiveCount | None = None  # read at most this much of the source
    epochs: Annotated[Float, Field(gt=0)] | None = None  # at most this many passes over the training split

    @model_validator(mode="before")
    @classmethod
    def _builtin_defaults(cls, data):
        """A built-in source's data comes in one format: fill it in, refuse a contradiction."""
        if isinstance(data, dict) and isinstance(data.get("builtin"), str) and data["builtin"] in BUILTINS:
            fixed = BUILTINS[data["builtin"]].settings
            for key, value in fixed.items():
                given = parse_fraction(data.get(key, value)) if key == "val_fraction" else data.get(key, value)
                if given != value:
                    raise ValueError(f"builtin {data['builtin']} has {key} {value}; leave {key} out")
            data = {**fixed, **data}
        return data

    @model_validator(mode="after")
    def _one_origin(self):
        if sum(x is not None for x in (self.path, self.builtin, self.hf)) != 1:
            raise ValueError("give exactly one of path, builtin or hf")
        if self.hf is None and (given := [k for k in ("subset", "revision") if getattr(self, k) is not None]):
            raise ValueError(f"{given[0]} applies to hf sources (a Hugging Face dataset)")
        fmt = FORMATS.get(self.format)  # None: auto
        if self.hf is not None and fmt and ".arrow" not in fmt.suffixes:  # a dataset's rows are Arrow shards
            raise ValueError(f"an hf source is rows of a table, not {self.format} files: use format auto, parquet "
                             "(documents from the `field` column) or a conversation format")
        if fmt and "split" in fmt.keys and self.hf is None and self.split not in (None,) + TEXT_SPLITS:
            raise ValueError(f"split {self.split!r}: a text source splits its files by {', '.join(TEXT_SPLITS)}")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        if self.format == "auto":  # what applies is known once the format is (data/detect.py checks again)
            return self
        keys = FORMATS[self.format].keys
        if self.field is not None and "field" not in keys:
            instead = [k for k in keys if k.endswith("_field")]
            raise ValueError(f"field does not apply to {self.format} data"
                             + (f" (use {' and '.join(instead)})" if instead else ""))
        for key in ("role_map", "train_on_reasoning"):
            if getattr(self, key) != type(self).model_fields[key].default and key not in keys:
                having = ", ".join(name for name, f in FORMATS.items() if key in f.keys)
                raise ValueError(f"{key} applies to {having} sources, not {self.format}")
        return self

    @property
    def text_field(self) -> str:
        """The jsonl field / parquet column with the text, or the chat field with the messages."""
        return self.field or FORMATS[self.format].default_field
