"""What a task eval declares: its name (as `eval.tasks` and `llmforge eval --task` say it), how it
scores a model, and the figures it reports, as the results tables show them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Task:
    name: str
    # (model, tokenizer, chat template) -> {"<name>/<figure>": share of items, 0..1}
    run: Callable[..., dict]
    columns: tuple[tuple[str, str], ...]  # (figure, heading) of the results table, in order, as percentages
