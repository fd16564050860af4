"""world-qa: questions about the held-out people of the generated world (llmforge/data/world.py).
Their facts were only ever in the pretraining text, never in a training conversation. Scores:
  format   the model ended its turn with a well-formed answer sentence (any value)
  correct  ... and the value is the person's true one
  concise  ... correct, and nothing else: no rambling after it (what dpo prefers)
"""

from __future__ import annotations

from ..data.world import qa_prompts, score_reply
from .task import Task

_MAX_NEW_TOKENS = 48  # an answer is ~10 tokens; a model that never ends its turn is cut here


def world_qa(model, tokenizer, template) -> dict:
    from ..model.generate import greedy_replies  # torch: only when a task runs

    counts: dict[str, int] = {}
    items = qa_prompts()
    replies = greedy_replies(model, tokenizer, template, [item["messages"] for item in items], _MAX_NEW_TOKENS)
    for item, (text, ended) in zip(items, replies):
        for k, ok in score_reply(item, text, ended).items():
            counts[k] = counts.get(k, 0) + bool(ok)
    return {f"world-qa/{k}": v / len(items) for k, v in counts.items()}


TASK = Task("world-qa", world_qa, columns=(("format", "format"), ("correct", "correct"), ("concise", "concise")))
