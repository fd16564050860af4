"""Readers for the conversation formats of post-training: chat, sharegpt, alpaca,
prompt_response, preference, unpaired, prompt.

All are records: JSON lines (`.jsonl`, `.jsonl.gz`), one example per non-blank line, read through
documents.json_records so that encoding and JSON problems read exactly as the jsonl format's, or
the rows of parquet and Arrow files (columnar.py; a Hugging Face dataset's shards). Each
example is checked whole here (roles, turn order, non-empty text), because the chat template
(llmforge/text/chat.py) renders what it is given without looking; a bad one goes to report.bad as
"path:line: messages[2]: ...", naming the message at fault. Messages come out as {"role",
"content"} dicts, with an assistant's `tool_calls` (arguments parsed from JSON) and
`reasoning_content`, and a tool result's `tool_call_id` and `name`; other keys are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from ..text.chat import ROLES
from .columnar import SUFFIXES as COLUMNAR, columnar_records
from .documents import json_records, json_type, listing, valid_unicode
from .format import Pieces, Report, Source

Messages = list[dict]  # [{"role": "system" | "user" | "assistant" | "tool", "content": str, ...}]


class Conversation(list):
    """A chat example's messages, with what the chat template renders beside them: the tools the
    assistant may call (a per-conversation `tools` list), and whether its reasoning is learned."""
    tools: list | None = None
    learn_reasoning: bool = True


# The roles a message may have: the chat template's, and a tool's result (after an assistant's calls).
MESSAGE_ROLES = (*ROLES, "tool")
Preference = tuple[Messages, str, str]  # (prompt messages, chosen reply, rejected reply)
Unpaired = tuple[Messages, str, bool]  # (prompt messages, reply, whether it is a good one)
Prompt = tuple[Messages, dict]  # (prompt messages, {"answer": reference answer or None, "record", "messages"})

_MESSAGE = '{"role": "user", "content": "..."}'
_MESSAGE_HINT = f"each message is an object like {_MESSAGE}"
_TURNS_HINT = ("a conversation is an optional system message, then user and assistant turns in turn, "
               "ending with the assistant's")
_PROMPT_HINT = ("a preference prompt is a string, or messages ending with the user's turn "
                "(the replies follow it)")
_PAIR_HINT = 'a preference record is like {"prompt": "...", "chosen": "...", "rejected": "..."}'
_UNPAIRED = '{"prompt": "...", "completion": "...", "label": true}'
_UNPAIRED_HINT = f"an unpaired record is like {_UNPAIRED} (label true: a good reply, false: a bad one)"
_TEXT_HINT = "every turn needs its text, as a non-empty string"
_TOOLS_HINT = ("an assistant turn with tool_calls is followed by one tool message per call, then the assistant "
               "answers")
_TURN = '{"from": "human", "value": "..."}'
_ALPACA = '{"instruction": "...", "input": "..." (optional), "output": "..."}'
_ALPACA_HINT = f"an alpaca record is like {_ALPACA}"
# ShareGPT's speakers (and the names its variants use) as roles; data.<name>.role_map adds others.
SPEAKERS = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
            "observation": "tool", "tool": "tool", "function_call": "assistant"}


class _Bad(Exception):
    """A bad example: args are (reason, hint) for report.bad."""


def read_chat(path: Path, spec: Source, report: Report) -> Iterator[tuple[str, Messages]]:
    """(where, messages) per record: the message list under `field` (default "messages")."""
    field = spec.text_field
    hint = f"set data.{report.source}.field to the field that holds the messages"
    renamed = dict(spec.role_map or {})  # roles by other names (human, bot...)

    def parse(record: dict) -> Messages:
        messages = _conversation(_get(record, field, hint), field, last="assistant", renamed=renamed)
        return _with_tools(messages, record, spec)
    return _read(path, report, f'{{"{field}": [{_MESSAGE}, ...]}}', parse, message_contents)


def read_sharegpt(path: Path, spec: Source, report: Report) -> Iterator[tuple[str, Messages]]:
    """(where, messages) per record: ShareGPT's turns, {"from": "human" | "gpt" | "system" | ...,
    "value": text}, under `field` (default "conversations"), with speakers named as SPEAKERS and
    role_map say; a record's own "system" string (a common variant) opens the conversation."""
    field = spec.text_field
    speakers = SPEAKERS | dict(spec.role_map or {})
    like = f'{{"{field}": [{_TURN}, ...]}}'

    def parse(record: dict) -> Messages:
        turns = _get(record, field, f"set data.{report.source}.field to the field that holds the turns")
        if not isinstance(turns, list):
            raise _Bad(f"field {field!r} is {json_type(turns)}, not a list", f"{field} must be a list like [{_TURN}, ...]")
        messages = [_speaker_turn(turn, f"{field}[{i}]", speakers, report.source) for i, turn in enumerate(turns)]
        system = record.get("system")
        if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": system}] + messages
        return _with_tools(_conversation(messages, field, last="assistant"), record, spec)
    return _read(path, report, like, parse, message_contents)


def read_alpaca(path: Path, spec: Source, report: Report) -> Iterator[tuple[str, Messages]]:
    """(where, messages) per record: {"instruction", "input" (optional), "output", "system"
    (optional), "history" (optional: earlier [instruction, output] pairs)}. The user's turn is
    the instruction, then a line break and the input when there is one (as LLaMA-Factory joins
    them); the output is the assistant's."""
    def parse(record: dict) -> Messages:
        user = _text(_get(record, "instruction", _ALPACA_HINT), "field 'instruction'")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _Bad(f"field 'input' is {json_type(extra)}, not a string", _ALPACA_HINT)
        messages = []
        system = record.get("system")
        if system is not None and (not isinstance(system, str) or system.strip()):
            messages.append({"role": "system", "content": _text(system, "field 'system'")})
        history = record.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise _Bad("field 'history' is not a list of [instruction, output] pairs", _ALPACA_HINT)
        for i, (asked, answered) in enumerate(history):
            messages += [{"role": "user", "content": _text(asked, f"history[{i}][0]")},
                         {"role": "assistant", "content": _text(answered, f"history[{i}][1]")}]
        messages += [{"role": "user", "content": user + ("\n" + extra if extra and extra.strip() else "")},
                     {"role": "assistant", "content": _text(_get(record, "output", _ALPACA_HINT), "field 'output'")}]
        return messages
    return _read(path, report, _ALPACA, parse, message_contents)


def read_prompt_response(path: Path, spec: Source, report: Report) -> Iterator[tuple[str, Messages]]:
    """(where, [user turn, assistant turn]) per record, from prompt_field and response_field."""
    fields = (spec.prompt_field, spec.response_field)

    def parse(record: dict) -> Messages:
        turns = []
        for role, key, setting in zip(("user", "assistant"), fields, ("prompt_field", "response_field")):
            hint = f"set data.{report.source}.{setting} to the field that holds the {role}'s turn"
            turns.append({"role": role, "content": _text(_get(record, key, hint), f"field {key!r}")})
        return turns
    return _read(path, report, '{{"{}": "...", "{}": "..."}}'.format(*fields), parse, message_contents)


def read_preference(path: Path, spec: Source, report: Report) -> Iterator[tuple[str, Preference]]:
    """(where, (prompt messages, chosen, rejected)) per record. The prompt is a string (one user
    turn) or a message list ending with the user's turn; chosen and rejected are strings, or
    TRL's conversational form: a list holding one assistant message."""
    def parse(record: dict) -> Preference:
        messages = _preference_prompt(_get(record, "prompt", _PAIR_HINT))
        chosen, rejected = (_reply(_get(record, key, _PAIR_HINT), key) for key in ("chosen", "rejected"))
        if chosen == rejected:  # no preference to learn: the dpo loss would be constant
            raise _Bad("chosen and rejected are the same", "a preference pair needs two different replies")
        return messages, chosen, rejected
    return _read(path, report, '{"prompt": "...", "chosen": "...", "rejected": "..."}', parse, pair_contents)


def read_unpaired(path: Path, spec: Source, report: Report) -> Iterator[tuple[str, Unpaired]]:
    """(where, (prompt messages, completion, label)) per record: TRL's unpaired preference form,
    one reply judged on its own (KTO). prompt and completion are as in a preference record;
    label is true for a good reply, false for a bad one."""
    def parse(record: dict) -> Unpaired:
        messages = _preference_prompt(_get(record, "prompt", _UNPAIRED_HINT))
        completion = _reply(_get(record, "completion", _UNPAIRED_HINT), "completion")
        label = _get(record, "label", _UNPAIRED_HINT)
        if not isinstance(label, bool):
            raise _Bad(f"field 'label' is {json_type(label)}, not true or false", _UNPAIRED_HINT)
        return messages, completion, label
    return _read(path, report, _UNPAIRED, parse, unpaired_contents)


def read_prompt(path: Path, spec: Source, report: Report) -> Iterator[tuple[str, Prompt]]:
    """(where, (prompt messages, answer or None)) per record: the prompt (a string, or messages
    ending with the user's turn), an optional system message, an optional reference answer."""
    key, answer_key = spec.prompt_field, spec.answer_field
    like = f'{{"{key}": "...", "system": "..." (optional), "{answer_key}": "..." (optional)}}'

    def parse(record: dict) -> Prompt:
        prompt = _get(record, key, f"set data.{report.source}.prompt_field to the field that holds the prompt")
        if isinstance(prompt, list):
            messages = _conversation(prompt, key, last="user")
        else:
            messages = [{"role": "user", "content": _text(prompt, f"field {key!r}", _PROMPT_HINT)}]
        if record.get("system") is not None:
            if messages[0]["role"] == "system":
                raise _Bad("a system field and a system message in the prompt", "give the system message once")
            messages = [{"role": "system", "content": _text(record["system"], "field 'system'")}] + messages
        answer = record.get(answer_key)
        # The whole record travels with the prompt: a reward plugin or environment may read any field.
        return messages, {"answer": None if answer is None else _text(answer, f"field {answer_key!r}"), "record": record,
                          "messages": messages}  # what a multi-turn environment renders again, with its tools
    return _read(path, report, like, parse, prompt_contents)


def read_example_texts(path: Path, spec: Source, report: Report, examples, contents) -> Pieces:
    """A document per example: its contents joined by newlines (tokenizer training must see the
    words the post-training stages train on; the chat tags are the tokenizer's own symbols and are
    not part of the text). examples: the format's reader; contents: an example -> its texts."""
    for _, example in examples(path, spec, report):
        yield "\n".join(contents(example)), True


# --- checks ---------------------------------------------------------------------------------------

def _read(path: Path, report: Report, like: str, parse: Callable, contents: Callable) -> Iterator:
    rows = columnar_records(path, report) if path.name.endswith(COLUMNAR) else json_records(path, report, like)
    for where, record in rows:
        try:
            example = parse(record)
        except _Bad as e:
            report.bad(where, *e.args)
            continue
        # The length filter counts the text the example is made of (not the JSON around it).
        if report.keep(sum(map(len, contents(example)))):
            yield where, example


def message_contents(messages: Messages) -> list[str]:
    """The text a conversation is made of (for tokenizer training and the length filter): its
    contents, reasoning and tool calls (as JSON), and its tools' schemas."""
    out = [m["content"] for m in messages if m["content"]] + \
        [m["reasoning_content"] for m in messages if "reasoning_content" in m] + \
        [json.dumps(call["function"], ensure_ascii=False) for m in messages for call in m.get("tool_calls", ())]
    return out + [json.dumps(t, ensure_ascii=False) for t in getattr(messages, "tools", None) or ()]


def pair_contents(example: Preference) -> list[str]:
    prompt, chosen, rejected = example
    return message_contents(prompt) + [chosen, rejected]


def unpaired_contents(example: Unpaired) -> list[str]:
    return message_contents(example[0]) + [example[1]]


def prompt_contents(example: Prompt) -> list[str]:
    messages, extra = example
    return message_contents(messages) + ([extra["answer"]] if extra["answer"] else [])


def _get(record: dict, key: str, hint: str):
    if key not in record:
        raise _Bad(f"no field {key!r} ({listing('fields', list(record))})", hint)
    return record[key]


def _text(value, label: str, hint: str = _TEXT_HINT) -> str:
    """A turn's text: a string that is not blank (a blank turn teaches nothing, or teaches silence)."""
    if not isinstance(value, str):
        raise _Bad(f"{label} is {json_type(value)}, not a string", hint)
    if not value.strip():
        raise _Bad(f"{label} is {'empty' if not value else 'only whitespace'}", _TEXT_HINT)
    if not valid_unicode(value):
        raise _Bad(f"{label} holds an unpaired surrogate (not valid Unicode)", "fix the record's \\uXXXX escapes")
    return value


def _message(value, at: str, renamed: dict | None = None) -> dict:
    if not isinstance(value, dict):
        raise _Bad(f"{at}: a JSON {json_type(value)}, not an object", _MESSAGE_HINT)
    for key in ("role", "content"):
        if key not in value:
            raise _Bad(f"{at}: no {key!r} ({listing('fields', list(value))})", _MESSAGE_HINT)
    role = value["role"]
    if renamed and isinstance(role, str):
        role = renamed.get(role, role)
    if role not in MESSAGE_ROLES:
        raise _Bad(f"{at}: unknown role {role!r} (known: {', '.join(MESSAGE_ROLES)})",
                   "name other roles (human, gpt, bot...) as system, user or assistant with the source's role_map")
    calls = value.get("tool_calls") if role == "assistant" else None
    content = value["content"]
    if calls and content in (None, ""):  # a turn that only calls tools
        message = {"role": role, "content": ""}
    else:
        message = {"role": role, "content": _text(content, f"{at}: content")}
    if calls:
        message["tool_calls"] = _tool_calls(calls, f"{at}: tool_calls")
    if role == "assistant" and value.get("reasoning_content") not in (None, ""):
        message["reasoning_content"] = _text(value["reasoning_content"], f"{at}: reasoning_content")
    if role == "tool":
        message |= {k: value[k] for k in ("tool_call_id", "name") if isinstance(value.get(k), str)}
    return message


def _tool_calls(value, at: str) -> list[dict]:
    """An assistant's tool calls as chat templates take them: [{"type": "function", "function":
    {"name", "arguments": an object}}] (OpenAI's arguments, a JSON string, parsed)."""
    hint = 'tool_calls is a list like [{"type": "function", "function": {"name": "...", "arguments": {...}}}]'
    if not isinstance(value, list):
        raise _Bad(f"{at} is {json_type(value)}, not a list", hint)
    calls = []
    for k, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise _Bad(f"{at}[{k}]: no function name", hint)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            arguments = _json_value(arguments, f"{at}[{k}].function.arguments", "a call's arguments are a JSON object "
                                    "(or a string holding one, as OpenAI writes them)")
        if not isinstance(arguments, dict):
            raise _Bad(f"{at}[{k}].function.arguments is {json_type(arguments)}, not an object", hint)
        calls.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}}
                     | ({"id": call["id"]} if isinstance(call.get("id"), str) else {}))
    return calls


def _json_value(text, at: str, hint: str):
    if isinstance(text, (dict, list)):
        return text
    try:
        return json.loads(text)
    except (TypeError, ValueError) as e:
        raise _Bad(f"{at} is not JSON ({e})", hint) from None


def _with_tools(messages: Messages, record: dict, spec: Source) -> Conversation:
    """The messages as a Conversation, with the record's `tools` (a list of tool schemas, or a
    string holding one as LLaMA-Factory writes it) and the source's train_on_reasoning."""
    out = Conversation(messages)
    tools = record.get("tools")
    if tools not in (None, "", []):
        tools = _json_value(tools, "field 'tools'", "tools is a list of tool schemas, like "
                            '[{"type": "function", "function": {"name": "...", "parameters": {...}}}]')
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise _Bad("field 'tools' is not a list of objects", "tools is a list of tool schemas")
        out.tools = tools
    out.learn_reasoning = getattr(spec, "train_on_reasoning", True)
    return out


def _speaker_turn(value, at: str, speakers: dict, source: str) -> dict:
    """A ShareGPT turn as a message (its text checked by _conversation)."""
    if not isinstance(value, dict):
        raise _Bad(f"{at}: a JSON {json_type(value)}, not an object", f"each turn is an object like {_TURN}")
    for key in ("from", "value"):
        if key not in value:
            raise _Bad(f"{at}: no {key!r} ({listing('fields', list(value))})", f"each turn is an object like {_TURN}")
    if not isinstance(value["from"], str) or value["from"] not in speakers:
        raise _Bad(f"{at}: unknown speaker {value['from']!r} (known: {', '.join(speakers)})",
                   f"name its role with data.{source}.role_map, e.g. {{{value['from']}: user}}")
    if value["from"] == "function_call":  # LLaMA-Factory's: the call as JSON, {"name": ..., "arguments": ...}
        call = _json_value(value["value"], f"{at}: value", "a function_call turn's value is the call as JSON, "
                           '{"name": "...", "arguments": {...}}')
        return {"role": "assistant", "content": "", "tool_calls": [{"function": call}]}
    return {"role": speakers[value["from"]], "content": value["value"]}


def _conversation(value, name: str, last: str, renamed: dict | None = None) -> Messages:
    """Messages in an order the chat template can render: an optional system message first, then
    user and assistant turns alternating from the user's, ending with `last` (assistant for a
    chat example, whose replies are learned; user for a preference prompt, which awaits one).
    `renamed`: other role names as the source's role_map gives them."""
    if not isinstance(value, list):
        raise _Bad(f"field {name!r} is {json_type(value)}, not a list", f"{name} must be a list like [{_MESSAGE}, ...]")
    if not value:
        raise _Bad(f"field {name!r} is an empty list", _TURNS_HINT)
    hint = _TURNS_HINT if last == "assistant" else _PROMPT_HINT
    messages = [_message(m, f"{name}[{i}]", renamed) for i, m in enumerate(value)]
    previous, calling = None, False  # calling: the assistant's last turn called tools, whose results come next
    for i, m in enumerate(messages):
        role, at = m["role"], f"{name}[{i}]"
        if role == "system":
            if i:
                raise _Bad(f"{at}: a 'system' message after the first", hint)
        elif previous in (None, "system"):
            if role != "user":
                raise _Bad(f"{at}: the first turn is {role!r}, not 'user'", hint)
        elif role == "tool":
            if previous != "tool" and not calling:
                raise _Bad(f"{at}: a tool result with no tool call before it", _TOOLS_HINT)
        elif calling and role != "tool":
            raise _Bad(f"{at}: a {role!r} turn where the results of the tool calls before it belong", _TOOLS_HINT)
        elif role == previous or (previous == "tool" and role != "assistant"):
            raise _Bad(f"{at}: two {role!r} turns in a row" if role == previous else
                       f"{at}: a {role!r} turn after tool results (the assistant answers them)", hint)
        calling = role == "assistant" and bool(m.get("tool_calls"))
        previous = role
    if previous != last:
        raise _Bad(f"{name}[{len(messages) - 1}]: the last turn is {previous!r}, not {last!r}", hint)
    return messages


def _preference_prompt(value) -> Messages:
    """A preference prompt: a string (one user turn), or messages ending with the user's turn."""
    if isinstance(value, list):
        return _conversation(value, "prompt", last="user")
    return [{"role": "user", "content": _text(value, "field 'prompt'", _PROMPT_HINT)}]


def _reply(value, name: str) -> str:
    """A preference reply: a string, or [{"role": "assistant", "content": ...}] (TRL's form)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise _Bad(f"field {name!r} is a list of {len(value)} messages, not one assistant message",
                       f'{name} is a string, or [{{"role": "assistant", "content": "..."}}]')
        message = _message(value[0], f"{name}[0]")
        if message["role"] != "assistant":
            raise _Bad(f"{name}[0]: a {message['role']!r} message, not 'assistant'",
                       f"{name} is the assistant's reply to the prompt")
        return message["content"]
    return _text(value, f"field {name!r}")
