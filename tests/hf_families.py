"""Tiny random Hugging Face model folders, one per family llmforge imports: a model built by
transformers from a config (save_pretrained), a byte-level BPE tokenizer.json trained with
`tokenizers` on text made here, with that family's special tokens, and its chat template text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .conftest import make_corpus

CHATML_SMOL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
# family -> (config class, its options, template, special tokens, tokenizer_config tokens, eos tokens)
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True), CHATML_SMOL,
              ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}, ["<|im_end|>"]),
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}), LLAMA3,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, ["<|end_of_text|>", "<|eot_id|>"]),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0), QWEN25, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>"}, ["<|im_end|>", "<|endoftext|>"]),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_theta=1000000.0), QWEN3,
              ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}, ["<|im_end|>"]),
    "mistral": ("MistralConfig", dict(sliding_window=16), MISTRAL, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                {"bos_token": "<s>", "eos_token": "</s>"}, ["</s>"]),
    "phi3": ("Phi3Config", dict(sliding_window=16), PHI3,
             ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
             {"eos_token": "<|endoftext|>"}, ["<|end|>", "<|endoftext|>"]),
}
TEXT = [make_corpus(3000), *(f"Where does person{i} live? In city{i % 7}. A pet{i % 5}." for i in range(100))]


def build_tokenizer(specials: list[str], extra: list[str] = ()):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if extra:  # added tokens that are not special (Qwen3's <think>)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    return tok


def build_folder(folder: Path, family: str, pad: int = 12, max_len: int = 128, shape: dict | None = None):
    """The family's folder; returns the transformers model (eval mode). The embedding has `pad`
    rows past the tokenizer's vocab, as real models often have; `shape` replaces the tiny one."""
    import transformers

    cls, options, template, specials, tokens, eos = FAMILIES[family]
    tok = build_tokenizer(specials, ["<think>", "</think>"] if family == "qwen3" else [])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "add_bos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 128, **tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    torch.manual_seed(0)
    shape = (shape or _SHAPE) | {"vocab_size": tok.get_vocab_size() + pad, "max_position_embeddings": max_len}
    hf_config = getattr(transformers, cls)(**(shape | options))
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a misplaced one shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(folder)
    ids = [tok.token_to_id(t) for t in eos]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids, "do_sample": False}))
    return hf


CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where does person3 live?"},
                {"role": "assistant", "content": "In city3."}, {"role": "user", "content": "And person4?"},
                {"role": "assistant", "content": "In city4. A pet4."}]


def write_chat_data(folder: Path, system: bool = True, n: int = 20) -> None:
    """n conversations (every other with a system turn) and n preference pairs."""
    with open(folder / "chat.jsonl", "w") as f:
        for i in range(n):
            head = [{"role": "system", "content": "Answer briefly."}] if system and i % 2 else []
            f.write(json.dumps({"messages": head + [{"role": "user", "content": f"Where does person{i} live?"},
                                                    {"role": "assistant", "content": f"In city{i % 7}."}]}) + "\n")
    with open(folder / "prefs.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Where does person{i} live?", "chosen": f"In city{i % 7}.",
                                "rejected": f"In city{i % 7}. I can tell you more about city{i % 7} if you like."})
                    + "\n")


def hub_dataset_cache(cache: Path, repo: str, rows: list[dict], subset: str | None = None) -> Path:
    """`repo` (org/name) in the datasets cache folder `cache` as a download from the Hub leaves it,
    for offline tests (HF_HUB_OFFLINE=1): a local copy named like the repo is loaded (its subset
    declared in a README, as Hub datasets do), then filed under the repo's cache name, org___name."""
    import datasets

    org, name = repo.split("/")
    local = cache.parent / f"{name}-source"
    (local / name).mkdir(parents=True)
    (local / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if subset:
        (local / name / "README.md").write_text(f"---\nconfigs:\n- config_name: {subset}\n  data_files:\n"
                                                "  - split: train\n    path: train.jsonl\n---\n")
    datasets.load_dataset(str(local / name), subset, split="train", cache_dir=str(cache))
    shutil.rmtree(local)
    shutil.move(cache / name, cache / f"{org}___{name}")
    return cache

