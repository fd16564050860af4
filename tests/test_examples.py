"""Conversation formats: chat, prompt_response, preference (jsonl, + .gz); bad records, filters, text."""

from __future__ import annotations

import gzip
import json

import pytest

from llmforge.data.examples import read_alpaca, read_chat, read_preference, read_prompt_response, read_sharegpt
from llmforge.data.formats import FORMATS, read_examples
from llmforge.data.pieces import iter_pieces
from llmforge.data.sources import Skips, SourceReport, list_files
from llmforge.data.spec import SourceSpec
from llmforge.errors import DataError

U, A, S = "user", "assistant", "system"


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


def write(path, records):
    """One JSON line per record; a str is written as is (a raw, possibly broken, line)."""
    data = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records)
    path.write_bytes(gzip.compress(data.encode()) if path.name.endswith(".gz") else data.encode())
    return path


def read(reader, path, skips=None, **spec):
    spec = SourceSpec(path=str(path), **spec)
    return list(reader(path, spec, SourceReport("s", spec, skips if skips is not None else Skips())))


def bad(reader, path, **spec) -> DataError:
    with pytest.raises(DataError) as e:
        read(reader, path, **spec)
    return e.value


# --- chat -----------------------------------------------------------------------------------------

def test_chat_valid(tmp_path):
    p = write(tmp_path / "c.jsonl", [
        {"messages": [msg(S, "Be terse."), msg(U, "Hi", name="ann"), msg(A, "Hello."),
                      msg(U, "Bye?"), msg(A, "Bye.", weight=1)], "id": 7},
        "\n", "  \n",
        {"messages": [msg(U, "2+2?"), msg(A, "4")]},
    ])
    got = read(read_chat, p, format="chat")
    assert got == [
        (f"{p}:1", [msg(S, "Be terse."), msg(U, "Hi"), msg(A, "Hello."), msg(U, "Bye?"), msg(A, "Bye.")]),
        (f"{p}:4", [msg(U, "2+2?"), msg(A, "4")]),
    ]
    # Another field name; a BOM before the first line is not part of the JSON.
    q = tmp_path / "d.jsonl"
    q.write_bytes(b"\xef\xbb\xbf" + json.dumps({"conv": [msg(U, "a"), msg(A, "b")]}).encode())
    assert read(read_chat, q, format="chat", field="conv") == [(f"{q}:1", [msg(U, "a"), msg(A, "b")])]


OK = [msg(U, "q"), msg(A, "a")]


@pytest.mark.parametrize("record, reason", [
    ({"conv": OK}, "no field 'messages' (fields: conv)"),
    ({"messages": "hi"}, "field 'messages' is string, not a list"),
    ({"messages": []}, "field 'messages' is an empty list"),
    ({"messages": [msg(U, "q"), "a"]}, "messages[1]: a JSON string, not an object"),
    ({"messages": [{"content": "q"}, msg(A, "a")]}, "messages[0]: no 'role' (fields: content)"),
    ({"messages": [msg(U, "q"), {"role": A, "text": "a"}]}, "messages[1]: no 'content' (fields: role, text)"),
    ({"messages": [msg(U, "q"), msg("bot", "a")]}, "messages[1]: unknown role 'bot' (known: system, user, assistant, tool)"),
    ({"messages": [msg(U, "q"), msg(A, ["a"])]}, "messages[1]: content is list, not a string"),
    ({"messages": [msg(U, ""), msg(A, "a")]}, "messages[0]: content is empty"),
    ({"messages": [msg(U, "q"), msg(A, " \n\t")]}, "messages[1]: content is only whitespace"),
    ({"messages": [msg(U, "q"), msg(S, "s"), msg(A, "a")]}, "messages[1]: a 'system' message after the first"),
    ({"messages": [msg(S, "s"), msg(S, "t"), *OK]}, "messages[1]: a 'system' message after the first"),
    ({"messages": [msg(S, "s"), msg(A, "a")]}, "messages[1]: the first turn is 'assistant', not 'user'"),
    ({"messages": [*OK, msg(U, "q2"), msg(U, "q3"), msg(A, "a")]}, "messages[3]: two 'user' turns in a row"),
    ({"messages": [*OK, msg(A, "a2")]}, "messages[2]: two 'assistant' turns in a row"),
    ({"messages": [*OK, msg(U, "more?")]}, "messages[2]: the last turn is 'user', not 'assistant'"),
    ({"messages": [msg(S, "s")]}, "messages[0]: the last turn is 'system', not 'assistant'"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}\n',
     "messages[0]: content holds an unpaired surrogate (not valid Unicode)"),
    ("[1, 2]\n", "a JSON list, not an object"),
    ("{nope\n", "malformed JSON (Expecting property name enclosed in double quotes at column 2)"),
])
def test_chat_bad_records(tmp_path, record, reason):
    p = write(tmp_path / "c.jsonl", [{"messages": OK}, record, {"messages": OK}])
    e = bad(read_chat, p, format="chat")
    assert e.message == f"{p}:2: {reason}"
    assert "on_error: skip" in e.hint
    skips = Skips()
    got = read(read_chat, p, skips, format="chat", on_error="skip")
    assert [where for where, _ in got] == [f"{p}:1", f"{p}:3"]
    assert (skips.bad, skips.examples) == (1, [f"{p}:2: {reason}"])


def test_hints_name_the_setting(tmp_path):
    p = write(tmp_path / "c.jsonl", [{"conv": OK}])
    assert "data.s.field" in bad(read_chat, p, format="chat").hint
    p = write(tmp_path / "p.jsonl", [{"prompt": "q"}])
    assert "data.s.response_field" in bad(read_prompt_response, p, format="prompt_response").hint


def test_invalid_utf8_and_gzip(tmp_path):
    good = json.dumps({"messages": OK}).encode()
    (tmp_path / "u.jsonl.gz").write_bytes(gzip.compress(good + b"\n" + b'{"messages": "\xff"}\n'))
    e = bad(read_chat, tmp_path / "u.jsonl.gz", format="chat")
    assert e.message == f"{tmp_path / 'u.jsonl.gz'}:2: invalid UTF-8"
    (tmp_path / "b.jsonl.gz").write_bytes(b"not gzip at all")
    assert "not a readable gzip file" in bad(read_chat, tmp_path / "b.jsonl.gz", format="chat").message


# --- prompt_response ------------------------------------------------------------------------------

def test_prompt_response(tmp_path):
    p = write(tmp_path / "p.jsonl", [{"prompt": "q", "response": "a", "extra": 1}])
    assert read(read_prompt_response, p, format="prompt_response") == [(f"{p}:1", [msg(U, "q"), msg(A, "a")])]
    p = write(tmp_path / "i.jsonl.gz", [{"instruction": "do", "output": "done"}, {"instruction": "x", "output": 3},
                                        {"instruction": "y"}])
    spec = dict(format="prompt_response", prompt_field="instruction", response_field="output")
    skips = Skips()
    assert read(read_prompt_response, p, skips, on_error="skip", **spec) == [(f"{p}:1", [msg(U, "do"), msg(A, "done")])]
    assert skips.examples == [f"{p}:2: field 'output' is int, not a string",
                              f"{p}:3: no field 'output' (fields: instruction)"]


# --- sharegpt and alpaca --------------------------------------------------------------------------

def test_sharegpt_speakers_become_roles(tmp_path):
    """ShareGPT's speakers as roles, a record's own system string first, role_map for the rest; then
    chat's rules (the turn that breaks them is named by its index in the turns)."""
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
             {"from": "user", "value": "Bye?"}, {"from": "bot", "value": "Bye."}]
    p = write(tmp_path / "s.jsonl", [{"system": "Be terse.", "conversations": turns}])
    assert bad(read_sharegpt, p, format="sharegpt").message == f"{p}:1: conversations[3]: unknown speaker 'bot' " \
        "(known: system, human, user, gpt, assistant, chatgpt, bing, bard, model, observation, tool, function_call)"
    assert "data.s.role_map, e.g. {bot: user}" in bad(read_sharegpt, p, format="sharegpt").hint
    assert read(read_sharegpt, p, format="sharegpt", role_map={"bot": "assistant"}) == [
        (f"{p}:1", [msg(S, "Be terse."), msg(U, "Hi"), msg(A, "Hello."), msg(U, "Bye?"), msg(A, "Bye.")])]
    q = write(tmp_path / "t.jsonl", [{"turns": [{"from": "gpt", "value": "Hello."}]}, {"turns": [{"value": "x"}]},
                                     {"turns": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    skips = Skips()
    assert read(read_sharegpt, q, skips, format="sharegpt", field="turns", on_error="skip") == [
        (f"{q}:3", [msg(U, "q"), msg(A, "a")])]
    assert skips.examples == [f"{q}:1: turns[0]: the first turn is 'assistant', not 'user'",
                              f"{q}:2: turns[0]: no 'from' (fields: value)"]


def test_chat_role_map_renames_roles(tmp_path):
    p = write(tmp_path / "c.jsonl", [{"messages": [msg("human", "q"), msg("bot", "a")]}])
    assert "role_map" in bad(read_chat, p, format="chat").hint
    assert read(read_chat, p, format="chat", role_map={"human": "user", "bot": "assistant"}) == [
        (f"{p}:1", [msg(U, "q"), msg(A, "a")])]


def test_role_map_applies_to_chat_and_sharegpt_only():
    with pytest.raises(ValueError, match="role_map applies to chat, sharegpt sources, not alpaca"):
        SourceSpec(path="x", format="alpaca", role_map={"bot": "assistant"})


def test_alpaca_instruction_input_and_history(tmp_path):
    """The input follows the instruction after a line break (LLaMA-Factory's joining); an empty
    input adds nothing; system and history come first."""
    p = write(tmp_path / "a.jsonl", [
        {"instruction": "Translate.", "input": "Good morning.", "output": "Bonjour."},
        {"instruction": "Name a prime.", "input": "", "output": "7."},
        {"instruction": "And another?", "output": "11.", "system": "Be terse.", "history": [["Name a prime.", "7."]]},
        {"instruction": "x", "input": 3, "output": "y"},
        {"instruction": "x"},
    ])
    skips = Skips()
    assert read(read_alpaca, p, skips, format="alpaca", on_error="skip") == [
        (f"{p}:1", [msg(U, "Translate.\nGood morning."), msg(A, "Bonjour.")]),
        (f"{p}:2", [msg(U, "Name a prime."), msg(A, "7.")]),
        (f"{p}:3", [msg(S, "Be terse."), msg(U, "Name a prime."), msg(A, "7."), msg(U, "And another?"),
                    msg(A, "11.")]),
    ]
    assert skips.examples == [f"{p}:4: field 'input' is int, not a string",
                              f"{p}:5: no field 'output' (fields: instruction)"]


# --- preference -----------------------------------------------------------------------------------

def test_preference_forms(tmp_path):
    p = write(tmp_path / "d.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [msg(S, "s"), msg(U, "q1"), msg(A, "a1", name="x"), msg(U, "q2")],
         "chosen": [msg(A, "good")], "rejected": [msg(A, "bad")]},
    ])
    assert read(read_preference, p, format="preference") == [
        (f"{p}:1", ([msg(U, "q")], "good", "bad")),
        (f"{p}:2", ([msg(S, "s"), msg(U, "q1"), msg(A, "a1"), msg(U, "q2")], "good", "bad")),
    ]


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same"),
    ({"prompt": "q", "chosen": [msg(A, "x")], "rejected": "x"}, "chosen and rejected are the same"),
    ({"chosen": "a", "rejected": "b"}, "no field 'prompt' (fields: chosen, rejected)"),
    ({"prompt": "q", "chosen": "a"}, "no field 'rejected' (fields: prompt, chosen)"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "field 'prompt' is only whitespace"),
    ({"prompt": {"q": 1}, "chosen": "a", "rejected": "b"}, "field 'prompt' is object, not a string"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "field 'prompt' is an empty list"),
    ({"prompt": [*OK], "chosen": "a", "rejected": "b"}, "prompt[1]: the last turn is 'assistant', not 'user'"),
    ({"prompt": [msg(A, "hi"), msg(U, "q")], "chosen": "a", "rejected": "b"},
     "prompt[0]: the first turn is 'assistant', not 'user'"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, "field 'rejected' is null, not a string"),
    ({"prompt": "q", "chosen": [msg(A, "a"), msg(A, "b")], "rejected": "b"},
     "field 'chosen' is a list of 2 messages, not one assistant message"),
    ({"prompt": "q", "chosen": [], "rejected": "b"},
     "field 'chosen' is a list of 0 messages, not one assistant message"),
    ({"prompt": "q", "chosen": "a", "rejected": [msg(U, "b")]}, "rejected[0]: a 'user' message, not 'assistant'"),
    ({"prompt": "q", "chosen": "a", "rejected": [msg("bot", "b")]},
     "rejected[0]: unknown role 'bot' (known: system, user, assistant, tool)"),
])
def test_preference_bad_records(tmp_path, record, reason):
    p = write(tmp_path / "d.jsonl", [record])
    assert bad(read_preference, p, format="preference").message == f"{p}:1: {reason}"


# --- unpaired (kto) ----------------------------------------------------------------------------------

def test_unpaired_forms(tmp_path):
    p = write(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "good", "label": True},
                                     {"prompt": [msg(U, "q")], "completion": [msg(A, "bad")], "label": False}])
    assert read(read_examples, p, format="unpaired") == [(f"{p}:1", ([msg(U, "q")], "good", True)),
                                                         (f"{p}:2", ([msg(U, "q")], "bad", False))]


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "q", "completion": "a"}, "no field 'label' (fields: prompt, completion)"),
    ({"prompt": "q", "completion": "a", "label": 1}, "field 'label' is int, not true or false"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "field 'label' is string, not true or false"),
    ({"prompt": "q", "label": True}, "no field 'completion' (fields: prompt, label)"),
    ({"prompt": "q", "completion": " ", "label": True}, "field 'completion' is only whitespace"),
])
def test_unpaired_bad_records(tmp_path, record, reason):
    p = write(tmp_path / "u.jsonl", [record])
    e = bad(read_examples, p, format="unpaired")
    assert e.message == f"{p}:1: {reason}"
    assert "label" in e.hint or "text" in e.hint


# --- length filter, dispatch, text for the tokenizer ----------------------------------------------

def test_length_filter_counts_all_contents(tmp_path):
    p = write(tmp_path / "c.jsonl", [{"messages": [msg(U, "ab"), msg(A, "cd")]},  # 4 characters
                                     {"messages": [msg(S, "s"), msg(U, "ab"), msg(A, "cd")]},  # 5
                                     {"messages": [msg(U, "€€€"), msg(A, "€€€")]}])  # 6 (not 18 bytes)
    skips = Skips()
    got = read(read_chat, p, skips, format="chat", min_chars=5, max_chars=5)
    assert [where for where, _ in got] == [f"{p}:2"]
    assert (skips.bad, skips.filtered) == (0, 2)
    p = write(tmp_path / "d.jsonl", [{"prompt": "ab", "chosen": "c", "rejected": "d"}])  # 4
    assert read(read_preference, p, format="preference", max_chars=3) == []
    assert len(read(read_preference, p, format="preference", max_chars=4)) == 1


def test_read_examples_dispatches(tmp_path):
    c = write(tmp_path / "c.jsonl", [{"messages": OK}])
    p = write(tmp_path / "p.jsonl", [{"prompt": "q", "response": "a"}])
    d = write(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "y"}])
    assert read(read_examples, c, format="chat") == [(f"{c}:1", OK)]
    assert read(read_examples, p, format="prompt_response") == [(f"{p}:1", OK)]
    assert read(read_examples, d, format="preference") == [(f"{d}:1", ([msg(U, "q")], "x", "y"))]


@pytest.mark.parametrize("fmt, record, text", [
    ("chat", {"messages": [msg(S, "s"), msg(U, "q"), msg(A, "a\nb")]}, "s\nq\na\nb"),
    ("prompt_response", {"prompt": "q", "response": "a"}, "q\na"),
    ("preference", {"prompt": [msg(U, "q1"), msg(A, "a1"), msg(U, "q2")], "chosen": "x", "rejected": [msg(A, "y")]},
     "q1\na1\nq2\nx\ny"),
    ("unpaired", {"prompt": "q", "completion": "x", "label": False}, "q\nx"),
])
def test_a_conversation_formats_reader_gives_its_text(tmp_path, fmt, record, text):
    p = write(tmp_path / "e.jsonl", [record, record])
    reader = FORMATS[fmt].read
    assert read(reader, p, format=fmt) == [(text, True), (text, True)]


def test_iter_pieces_on_a_chat_source(tmp_path):
    (tmp_path / "chats").mkdir()
    write(tmp_path / "chats" / "a.jsonl", [{"messages": OK}, {"messages": [msg(U, "hi"), msg(A, "hello")]}])
    write(tmp_path / "chats" / "b.jsonl.gz", [{"messages": [msg(U, "z"), msg(A, "zz")]}])
    (tmp_path / "chats" / "README.md").write_text("not data")
    spec = SourceSpec(path="chats", format="chat")
    files = list_files("s", spec, tmp_path)
    assert sorted(f.name for f in files) == ["a.jsonl", "b.jsonl.gz"]  # a folder gives only jsonl files
    assert sorted(iter_pieces("s", spec, tmp_path)) == [("hi\nhello", True), ("q\na", True), ("z\nzz", True)]
    # max_bytes cuts the text where tokenizer sampling would stop.
    assert list(iter_pieces("s", SourceSpec(path="chats/a.jsonl", format="chat", max_bytes=5), tmp_path)) == [
        ("q\na", True), ("hi", True)]
