"""Task evals by name: generate from a stage's final weights and score what comes out.

A task runs the model the way a user would (greedy decoding through the chat template), so its
numbers measure behaviour, not loss. Tasks are chosen by name in a stage's `eval.tasks`; the
schema's allowed names and the results tables' columns come from TASKS. Adding a task is a
module here and a line below. Any task of lm-evaluation-harness runs too, named `lm-eval:TASK`
(harness.py, with the `lm-eval` package).
"""

from __future__ import annotations

import importlib

from ..errors import PlanError
from . import world_qa
from .task import Task

TASKS: dict[str, Task] = {t.name: t for t in (world_qa.TASK,)}
LM_EVAL = "lm-eval:"  # an lm-eval task, as eval.tasks names it: lm-eval:arc_easy
LM_EVAL_TASK = r"^lm-eval:[\w.,-]+$"


def run_tasks(names, model, tokenizer, template, **lm_eval) -> dict:
    """Each named task's figures: llmforge's own (TASKS) and lm-eval's (lm-eval:TASK, run
    together in one lm-eval call with the options `lm_eval` gives: limit, num_fewshot...)."""
    own = [n for n in names if n in TASKS]
    if own and template is None:
        raise PlanError("eval.tasks: task evals prompt the model through the chat template",
                        hint="set tokenizer.chat_template: default")
    out = {}
    for name in own:
        out |= TASKS[name].run(model, tokenizer, template)
    if harness := [n.removeprefix(LM_EVAL) for n in names if n not in TASKS]:
        out |= lm_eval_tasks(harness, model, tokenizer, template, **lm_eval)
    return out


def lm_eval_tasks(names: list[str], model, tokenizer, template, **options) -> dict:
    return load_harness(f"eval.tasks: lm-eval tasks ({', '.join(names)})").run_lm_eval(
        model, tokenizer, template, names, **options)


def load_harness(what: str):
    """harness.py (lm-eval's `llmforge` model registered with it), or, without the lm-eval
    package, an error saying that `what` needs it."""
    try:
        return importlib.import_module(".harness", __name__)
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        raise PlanError(f"{what} need lm-evaluation-harness", hint="pip install 'llmforge[eval]'") from None


def task_columns() -> tuple[tuple[str, str], ...]:
    """(metric key, heading) of every task's figures, as the results tables show them."""
    return tuple((f"{t.name}/{figure}", heading) for t in TASKS.values() for figure, heading in t.columns)
