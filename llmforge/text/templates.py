"""A chat template from its description: a recipe's tokenizer.chat_template, or the dict a stage's
final/config.json saved. The tag template lives in chat.py, Jinja ones in chat_jinja.py."""

from __future__ import annotations

from .chat import ChatTemplate
from .chat_jinja import JinjaTemplate


def template_from_spec(spec, base_dir=None):
    """The chat template a recipe's tokenizer.chat_template (or a stage's saved config) names:
    None, the tag template (a dict of four tags), a named Jinja one, or a model's own Jinja one."""
    if spec is None:
        return None
    fields = spec if isinstance(spec, dict) else spec.model_dump()
    if "jinja" in fields or "name" in fields or "path" in fields:
        return JinjaTemplate.from_spec(fields, base_dir)
    return ChatTemplate(**fields)
