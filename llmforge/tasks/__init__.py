"""Task evals by name: generate from a stage's final weights and score what comes out.

A task runs the model the way a user would (greedy decoding through the chat template), so its
numbers measure behaviour, not loss. Tasks are chosen by name in a stage's `eval.tasks`; the
schema's allowed names and the results tables' columns come from TASKS. Adding a task is a
module here and a line below.
"""

from __future__ import annotations

from ..errors import PlanError
from . import world_qa
from .task import Task

TASKS: dict[str, Task] = {t.name: t for t in (world_qa.TASK,)}


def run_tasks(names, model, tokenizer, template) -> dict:
    if template is None:
        raise PlanError("eval.tasks: task evals prompt the model through the chat template",
                        hint="set tokenizer.chat_template: default")
    out = {}
    for name in names:
        out |= TASKS[name].run(model, tokenizer, template)
    return out


def task_columns() -> tuple[tuple[str, str], ...]:
    """(metric key, heading) of every task's figures, as the results tables show them."""
    return tuple((f"{t.name}/{figure}", heading) for t in TASKS.values() for figure, heading in t.columns)
