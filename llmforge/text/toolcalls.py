"""Reading tool calls out of a model's reply the way its own chat template writes them.

Templates disagree: Qwen2.5 and Hermes write `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
Llama 3.1 a bare `{"name": ..., "parameters": {...}}`, Mistral `[TOOL_CALLS] [{...}]`. Rather than
a parser per family, the format is learned from the template itself: it renders one assistant
turn calling a probe tool, and what surrounds the call's JSON object (the text before it, after
it) and the keys holding the name and the arguments are the format (vLLM keeps a parser per
family; this is the same knowledge, read from the one place that defines it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import TokenizerError

_NAME, _ARG = "llmforge_probe_tool", "llmforge_probe_argument"
_PROBE_TOOL = {"type": "function", "function": {"name": _NAME, "description": "probe",
                                                "parameters": {"type": "object", "properties": {_ARG: {"type": "integer"}}}}}
_PROBE = [{"role": "user", "content": "probe"},
          {"role": "assistant", "content": "", "tool_calls": [
              {"type": "function", "function": {"name": _NAME, "arguments": {_ARG: 7}}}]}]


@dataclass(frozen=True)
class ToolCallFormat:
    before: str  # the text the template writes before a call's JSON object ("<tool_call>\n"; "" for bare JSON)
    name_key: str  # the object's key holding the tool's name
    arguments_key: str  # and its arguments (an object, or a JSON string of one)

    @staticmethod
    def of(template) -> ToolCallFormat:
        """The format `template` (a JinjaTemplate) writes tool calls in; a TokenizerError saying why
        not for a template that writes none (the tag template, a template without tools)."""
        render = getattr(template, "render_text", None)
        if render is None:
            raise TokenizerError("the tag chat template (<|user|>...) cannot write tool calls",
                                 hint="use a model folder whose own template takes tools (Qwen2.5, Qwen3, Llama 3.1)")
        head = render(_PROBE[:1], True, [_PROBE_TOOL])
        whole = render(_PROBE, False, [_PROBE_TOOL])
        turn = whole[len(head):] if whole.startswith(head) else ""
        at = turn.find(_NAME)
        found = _enclosing_object(turn, at) if at >= 0 else None
        if found is None:
            raise TokenizerError(f"{template.origin}: the chat template does not write tool calls as JSON (an "
                                 "assistant turn calling a tool renders without it)",
                                 hint="use a model folder whose own template takes tools (Qwen2.5, Qwen3, Llama 3.1)")
        start, end, call = found
        name_key = next(k for k, v in call.items() if v == _NAME)
        arguments_key = next((k for k, v in call.items() if v == {_ARG: 7} or v == json.dumps({_ARG: 7})), None)
        if arguments_key is None:
            raise TokenizerError(f"{template.origin}: cannot find where the chat template writes a tool call's arguments")
        before = turn[:start].rstrip(" [")  # Mistral's list of calls: read one call at a time
        return ToolCallFormat(before if before.strip() else "", name_key, arguments_key)

    def parse(self, reply: str) -> list[tuple[str, dict]] | None:
        """The reply's tool calls as (name, arguments), [] if it makes none; raises ValueError for
        a call that starts but does not parse (a failed turn)."""
        calls, at = [], 0
        if not self.before and not reply.lstrip().startswith("{"):  # bare JSON: a call is the whole reply
            return []
        while True:
            start = reply.find(self.before, at) if self.before else reply.find("{", at)
            if start < 0 or (not self.before and calls):
                return calls
            body = start + len(self.before)
            while body < len(reply) and reply[body] in " \n\t[":
                body += 1
            try:
                obj, end = json.JSONDecoder().raw_decode(reply, body)
            except json.JSONDecodeError as e:
                if not self.before:  # bare JSON: a reply that is not a call is an answer
                    return calls
                raise ValueError(f"the tool call does not parse as JSON ({e.msg} at character {e.pos - body})")
            if not isinstance(obj, dict) or not isinstance(obj.get(self.name_key), str) or \
                    self.arguments_key not in obj:
                if not self.before:
                    return calls
                raise ValueError(f"the tool call is not an object with {self.name_key!r} and {self.arguments_key!r}")
            arguments = obj[self.arguments_key]
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    raise ValueError(f"the tool call's {self.arguments_key!r} is not JSON") from None
            if not isinstance(arguments, dict):
                raise ValueError(f"the tool call's {self.arguments_key!r} is not an object")
            calls.append((obj[self.name_key], arguments))
            at = end


def _enclosing_object(text: str, at: int) -> tuple[int, int, dict] | None:
    """The JSON object in `text` that contains position `at`: (start, end, the object)."""
    for start in range(at, -1, -1):
        if text[start] != "{":
            continue
        try:
            obj, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if end > at and isinstance(obj, dict) and _NAME in obj.values():
            return start, end, obj
    return None
