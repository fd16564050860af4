"""Conversations with tools and reasoning, rendered by a model's own Jinja template: each format
read from a record, then llmforge's ids and learned mask against transformers' apply_chat_template
with the same tools, its assistant mask from the template's {% generation %} blocks. Two tool
templates in the styles of Qwen2.5 (calls in <tool_call> tags, results in a user turn) and Llama 3.1
(a call as JSON, results in an ipython turn), and Qwen3 for reasoning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmforge.data.formats import FORMATS
from llmforge.data.sources import Skips, SourceReport
from llmforge.data.spec import SourceSpec
from llmforge.errors import DataError, TokenizerError
from llmforge.text.chat_jinja import JinjaTemplate, read_folder_template
from llmforge.text.tokenizer_json import load_tokenizer

from .hf_families import build_folder, build_tokenizer

transformers = pytest.importorskip("transformers")

# {% generation %} marks what transformers' return_assistant_tokens_mask reports; llmforge renders
# its body as is and finds the assistant's turns itself.
QWEN25_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- 'You are helpful.' }}{%- endif %}
    {{- '\\n\\n# Tools\\n\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}{% generation %}
        {%- if message.content %}{{- message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- set call = tool_call.function %}
            {%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}
            {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' + call.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
LLAMA31_TOOLS = """{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content %}{%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = '' %}{%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools %}
    {{- 'Environment: ipython\\n\\nYou may call these functions:\\n' }}
    {%- for tool in tools %}{{- tool | tojson(indent=4) + '\\n\\n' }}{%- endfor %}
{%- endif %}
{{- system + '<|eot_id|>' }}
{%- for message in loop_messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% generation %}
        {%- if message.tool_calls %}
            {%- set call = message.tool_calls[0].function %}
            {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}' }}
        {%- else %}
            {{- message.content | trim }}
        {%- endif %}
        {{- '<|eot_id|>' }}{% endgeneration %}
    {%- elif message.role == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content | tojson + '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""
STYLES = {  # template, special tokens, tokenizer_config tokens
    "qwen2.5": (QWEN25_TOOLS, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}),
    "llama3.1": (LLAMA31_TOOLS, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                 "<|eot_id|>"], {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "city3"}}}
WITH_TOOLS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Weather in city3?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "content": "sunny, 21 C", "name": "get_weather"},
              {"role": "assistant", "content": "Sunny in city3."}]
PLAIN = [{"role": "user", "content": "Where does person3 live? Say it"}, {"role": "assistant", "content": "In city3."}]
# The same conversations as each format's record: (format, record, the messages it stands for, tools).
OPENAI_CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "city3"}'}}
RECORDS = [
    ("chat", {"messages": [WITH_TOOLS[0], WITH_TOOLS[1], {"role": "assistant", "content": None,
                                                           "tool_calls": [OPENAI_CALL]},
                           {"role": "tool", "content": "sunny, 21 C", "name": "get_weather", "tool_call_id": "c1"},
                           WITH_TOOLS[4]], "tools": TOOLS}, WITH_TOOLS, TOOLS),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Weather in city3?"},
                                    {"from": "function_call", "value": '{"name": "get_weather", "arguments": '
                                                                       '{"city": "city3"}}'},
                                    {"from": "observation", "value": "sunny, 21 C"},
                                    {"from": "gpt", "value": "Sunny in city3."}],
                  "system": "Answer briefly.", "tools": json.dumps(TOOLS)}, WITH_TOOLS, TOOLS),
    ("chat", {"messages": PLAIN}, PLAIN, None),
    ("sharegpt", {"conversations": [{"from": "human", "value": PLAIN[0]["content"]},
                                    {"from": "gpt", "value": "In city3."}]}, PLAIN, None),
    ("alpaca", {"instruction": "Where does person3 live?", "input": "Say it", "output": "In city3."},
     [{"role": "user", "content": "Where does person3 live?\nSay it"}, PLAIN[1]], None),
    ("prompt_response", {"prompt": PLAIN[0]["content"], "response": "In city3."}, PLAIN, None),
]


def folder_for(tmp: Path, style: str) -> Path:
    """A tokenizer folder with the style's tool template (its {% generation %} blocks kept, for
    transformers)."""
    template, specials, tokens = STYLES[style]
    folder = tmp / style
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(specials).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "add_bos_token": False,
        "clean_up_tokenization_spaces": False, **tokens}))
    return folder


def read_record(tmp: Path, fmt: str, record: dict, **settings):
    path = tmp / "x.jsonl"
    path.write_text(json.dumps(record) + "\n")
    spec = SourceSpec(path=str(path), format=fmt, **settings)
    return [ex for _, ex in FORMATS[fmt].examples(path, spec, SourceReport("s", spec, Skips()))]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("fmt, record, messages, tools", RECORDS, ids=[f"{r[0]}{'-tools' if r[3] else ''}"
                                                                       for r in RECORDS])
def test_ids_and_learned_mask_equal_apply_chat_templates(tmp_path, style, fmt, record, messages, tools):
    folder = folder_for(tmp_path, style)
    tok, template = load_tokenizer(folder), read_folder_template(folder)
    [conversation] = read_record(tmp_path, fmt, record)
    ids, learned = template.render(tok, conversation)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True).apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == theirs["input_ids"]
    assert [int(x) for x in learned] == theirs["assistant_masks"]
    if tools:  # the call and the answer are learned; the tool's result and the tool list are not
        text = tok.decode([i for i, x in zip(ids, learned) if x])
        assert "get_weather" in text and "Sunny in city3." in text and "sunny, 21 C" not in text
        assert "The weather in a city" not in text


def test_qwen3_reasoning_is_learned_unless_the_source_says_not(tmp_path):
    """reasoning_content as Qwen3's template writes it (<think> before the reply, in the turn after
    the last question): learned with the reply, or with train_on_reasoning: false the reply and
    the tags alone."""
    build_folder(tmp_path / "qwen3", "qwen3")
    tok, template = load_tokenizer(tmp_path / "qwen3"), read_folder_template(tmp_path / "qwen3")
    record = {"messages": [{"role": "user", "content": "Where does person3 live?"},
                           {"role": "assistant", "content": "In city3.", "reasoning_content": "Person3 is in city3."}]}
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "qwen3", local_files_only=True)
    for learn, expected in ((True, "<think>\nPerson3 is in city3.\n</think>\n\nIn city3.<|im_end|>"),
                            (False, "<think></think>\n\nIn city3.<|im_end|>")):
        [conversation] = read_record(tmp_path, "chat", record, train_on_reasoning=learn)
        ids, learned = template.render(tok, conversation)
        assert ids == theirs.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert tok.decode([i for i, x in zip(ids, learned) if x]) == expected


@pytest.mark.parametrize("record, error", [
    ({"messages": [PLAIN[0], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{city: city3"}}]}]},
     "messages[1]: tool_calls[0].function.arguments is not JSON"),
    ({"messages": [PLAIN[0], {"role": "tool", "content": "sunny"}, PLAIN[1]]},
     "messages[1]: a tool result with no tool call before it"),
    ({"messages": [PLAIN[0], {"role": "assistant", "content": "", "tool_calls": [CALL]}, PLAIN[1]]},
     "messages[2]: a 'assistant' turn where the results of the tool calls before it belong"),
])
def test_a_bad_tool_record_is_one_line_naming_it(tmp_path, record, error):
    with pytest.raises(DataError) as e:
        read_record(tmp_path, "chat", record)
    assert e.value.message.startswith(f"{tmp_path / 'x.jsonl'}:1: {error}"), e.value.message


def test_a_template_that_cannot_render_tools_is_named(tmp_path):
    from llmforge.text.chat import ChatTemplate
    from llmforge.text.chat_jinja import NAMED

    [conversation] = read_record(tmp_path, "chat", RECORDS[0][1])
    with pytest.raises(TokenizerError) as e:
        ChatTemplate().segments(conversation)
    assert e.value.message == "the tag chat template (<|user|>...) cannot render tools"
    chatml = JinjaTemplate(NAMED["chatml"]["jinja"], NAMED["chatml"]["specials"], origin="chat_template chatml")
    with pytest.raises(TokenizerError) as e:
        chatml.segments(conversation)
    assert "does not write tool calls (assistant message 2 calls 'get_weather'" in e.value.message


# Each family's template of tests/hf_families.py with {% generation %} around what its assistant
# writes after the generation prompt (the same rendering, now with transformers' assistant mask).
TAGGED = {
    "llama": [("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
               "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
               "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}{% else %}"
               "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}")],
    "llama3": [("{{ content }}", "{% if message['role'] == 'assistant' %}{{ content[:-(message['content'] | trim"
                " | length) - 10] }}{% generation %}{{ content[-(message['content'] | trim | length) - 10:] }}"
                "{% endgeneration %}{% else %}{{ content }}{% endif %}")],
    "qwen2": [("{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
               "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
               "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}"
               "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}")],
    "qwen3": [("{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>"
               "\\n\\n' + content.lstrip('\\n') }}",
               "{{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- '<think>\\n' + reasoning_content.strip("
               "'\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}{% endgeneration %}"),
              ("{{- '<|im_start|>' + message.role + '\\n' + content }}",  # (twice)
               "{{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- content }}{% endgeneration %}"),
              ("{{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endfor %}",
               "{% generation %}{{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n    {%- endif %}\n{%- endfor %}")],
    "mistral": [("{{- ' ' + message['content'] + eos_token}}",
                 "{% generation %}{{- ' ' + message['content'] + eos_token}}{% endgeneration %}")],
    "phi3": [("{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}",
              "{{'<|assistant|>\n'}}{% generation %}{{message['content'] + '<|end|>'}}{% endgeneration %}{{'\n'}}")],
}


@pytest.mark.parametrize("family", TAGGED)
def test_every_family_learns_what_transformers_marks_as_the_assistant_s(tmp_path, family):
    """The six families' templates, tagged: llmforge's learned mask == return_assistant_tokens_mask,
    for each conversation format (Qwen3 with reasoning in its last turn)."""
    from .hf_families import CONVERSATION, FAMILIES

    source = FAMILIES[family][2]
    for old, new in TAGGED[family]:
        assert old in source, (family, old)
        source = source.replace(old, new)
    folder = tmp_path / family
    build_folder(folder, family)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": source}))
    tok, template = load_tokenizer(folder), read_folder_template(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    conversation = CONVERSATION[1:] if family == "mistral" else CONVERSATION  # its template drops a system turn
    cases = [(conversation, conversation)] + [(read_record(tmp_path, fmt, record)[0], messages)
                                              for fmt, record, messages, tools in RECORDS if not tools]
    if family == "qwen3":
        last = dict(conversation[-1], reasoning_content="Person4 is in city4.")
        cases.append((read_record(tmp_path, "chat", {"messages": conversation[:-1] + [last]})[0],
                      conversation[:-1] + [last]))
    for ours_messages, messages in cases:
        ids, learned = template.render(tok, ours_messages)
        expected = theirs.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
        assert ids == expected["input_ids"], (family, messages)
        assert [int(x) for x in learned] == expected["assistant_masks"], (family, messages)


def test_on_error_skip_counts_the_conversations_the_template_cannot_render(tmp_path, monkeypatch):
    from llmforge.data.cache import prepare_source
    from llmforge.text.chat import ChatTemplate
    from llmforge.text.tokenizer import Tokenizer, train_tokenizer

    from .conftest import make_corpus

    monkeypatch.setenv("LLMFORGE_CACHE", str(tmp_path / "cache"))
    template = ChatTemplate()
    tok = Tokenizer.load(train_tokenizer(iter([make_corpus()]), tmp_path / "tok", type="bpe", vocab_size=320,
                                         user_symbols=template.symbols))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"messages": PLAIN}, RECORDS[0][1]]))
    with pytest.raises(DataError) as e:
        prepare_source("chat", SourceSpec(path="chat.jsonl", format="chat"), tmp_path, tok, template=template)
    assert e.value.message == f"{tmp_path / 'chat.jsonl'}:2: the tag chat template (<|user|>...) cannot render tools"
    src = prepare_source("chat", SourceSpec(path="chat.jsonl", format="chat", on_error="skip"), tmp_path, tok,
                         template=template)
    assert (src.documents, src.skipped, src.reasons) == (
        1, 1, {"the tag chat template (<|user|>...) cannot render tools": 1})
