"""Readers for the conversation formats of post-training: chat, sharegpt, alpaca,
prompt_response, preference, unpaired, prompt.

All are records: JSON lines (`.jsonl`, `.jsonl.gz`), one example per non-blank line, read through
documents.json_records so that encoding and JSON problems read exactly as the jsonl format's, or
the rows of parquet and Arrow files (columnar.py; a Hugging Face dataset's shards). Each
example is checked whole here (roles, turn order, non-empty text), because the chat template
(llmforge/text/chat.py) renders what it is given without looking; a bad one goes to report.bad as
"path:line: messages[2]: ...", naming the message at fault. Messages come out as plain
{"role", "content"} dicts: other keys (name, weight, tool calls...) are dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from ..text.chat import ROLES
from .columnar import SUFFIXES as COLUMNAR, columnar_records
from .documents import json_records, json_type, listing, valid_unicode
from .format import Pieces, Report, Source

Messages = list[dict]  # [{"role": "system" | "user" | "assistant", "content": str}]
Preference = tuple[Messages, str, str]  # (prompt messages, chosen reply, rejected reply)
Unpaired = tuple[Messages, str, bool]  # (prompt messages, reply, whether it is a good one)
Prompt = tuple[Messages, "str | None"]  # (prompt messages, reference answer or None)

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
_TURN = '{"from": "human", "value": "..."}'
_ALPACA = '{"instruction": "...", "input": "..." (optional), "output": "..."}'
_ALPACA_HINT = f"an alpaca record is like {_ALPACA}"
# ShareGPT's speakers (and the names its variants use) as roles; data.<name>.role_map adds others.
SPEAKERS = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant"}


class _Bad(Exception):
    """A bad example: args are (reason, hint) for report.bad."""


def read_chat(path: Path, spec: Source, report: Report) -> Iterator[tuple[str, Messages]]:
    """(where, messages) per record: the message list under `field` (default "messages")."""
    field = spec.text_field
    hint = f"set data.{report.source}.field to the field that holds the messages"
    renamed = dict(spec.role_map or {})  # roles by other names (human, bot...)

    def parse(record: dict) -> Messages:
        return _conversation(_get(record, field, hint), field, last="assistant", renamed=renamed)
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
        return _conversation(messages, field, last="assistant")
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
        return messages, None if answer is None else _text(answer, f"field {answer_key!r}")
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
    return [m["content"] for m in messages]


def pair_contents(example: Preference) -> list[str]:
    prompt, chosen, rejected = example
    return message_contents(prompt) + [chosen, rejected]


def unpaired_contents(example: Unpaired) -> list[str]:
    return message_contents(example[0]) + [example[1]]


def prompt_contents(example: Prompt) -> list[str]:
    messages, answer = example
    return message_contents(messages) + ([answer] if answer else [])


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
    if role not in ROLES:
        raise _Bad(f"{at}: unknown role {role!r} (known: {', '.join(ROLES)})",
                   "name other roles (human, gpt, bot...) as system, user or assistant with the source's role_map")
    return {"role": role, "content": _text(value["content"], f"{at}: content")}


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
    previous = None
    for i, m in enumerate(messages):
        role, at = m["role"], f"{name}[{i}]"
        if role == "system":
            if i:
                raise _Bad(f"{at}: a 'system' message after the first", hint)
        elif previous in (None, "system"):
            if role != "user":
                raise _Bad(f"{at}: the first turn is {role!r}, not 'user'", hint)
        elif role == previous:
            raise _Bad(f"{at}: two {role!r} turns in a row", hint)
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
