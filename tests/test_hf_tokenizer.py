"""The exported tokenizer.json: transformers' AutoTokenizer (the `tokenizers` library alone, no
sentencepiece) gives llmforge's ids on awkward text, decodes them back, and apply_chat_template
gives the ids llmforge's chat template renders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmforge.text.chat import ChatTemplate
from llmforge.text.hf_tokenizer import tokenizer_config, tokenizer_json
from llmforge.text.tokenizer import Tokenizer, train_tokenizer

from .conftest import make_corpus

transformers = pytest.importorskip("transformers")

AWKWARD = ["  two leading spaces", " one", "\n\nnewlines first\nand\n\n\nruns\n", "\ttab\tand\t\ttabs\t",
           "trailing   ", "    indented:\n        deeper\n\treturn x", "日本語のテキストと中文。", "emoji 🎉🚀 and 👩‍👩‍👧",
           "façade naïve Ünïcödé", "x = 1234567890 + 0.5e-3", "a  b   c    d     e", "\r\nwindows\r\n", "", " ",
           "<0x41> is not a byte", "«quotes» — dashes… ½", "kalo mine tari su vo elan oris"]


def _corpus() -> list[str]:
    code = "def f(x):\n    if x:\n        return x + 1\n\treturn None\n" * 40
    return [make_corpus(6000), code, "日本語のテキストです。中文文本。😀🎉 emoji. façade naïve " * 30]


def export_tokenizer(tmp_path: Path, kind: str, template: ChatTemplate | None = None) -> Tokenizer:
    symbols = template.symbols if template else ()
    vocab = {"bpe": 600, "unigram": 500, "char": 400}[kind]
    tok = Tokenizer.load(train_tokenizer(_corpus(), tmp_path / "tok", type=kind, vocab_size=vocab,
                                         user_symbols=symbols))
    fast, warnings = tokenizer_json(tok.model_bytes)
    assert bool(warnings) == (kind == "unigram")
    (tmp_path / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False))
    config = tokenizer_config(tok.model_bytes, 64, template.jinja() if template else None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return tok


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_autotokenizer_gives_llmforges_ids(tmp_path, kind):
    ours = export_tokenizer(tmp_path, kind)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    lines = make_corpus(3000, seed=5).splitlines(keepends=True) + _corpus()[1].splitlines(keepends=True)
    for text in AWKWARD + lines:
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.encode(text), repr(text)
        assert theirs.decode(ids) == text
    assert theirs("x")["input_ids"] == ours.encode("x")  # no BOS or EOS added
    assert theirs.eos_token_id == ours.eot_id


def test_unigram_tokenizer_exports_with_a_warning_and_decodes_exactly(tmp_path):
    """Unigram's tokenizer.json may segment ties differently (warned about), but the text it
    reads back is always the same."""
    ours = export_tokenizer(tmp_path, "unigram")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in AWKWARD[:-3]:
        assert theirs.decode(theirs(text, add_special_tokens=False)["input_ids"]) == text
        assert ours.decode(theirs(text, add_special_tokens=False)["input_ids"]) == text


def test_loads_without_sentencepiece(tmp_path):
    ours = export_tokenizer(tmp_path, "bpe")
    script = ("import sys; sys.modules['sentencepiece'] = None; sys.modules['google.protobuf'] = None\n"
              "import transformers\n"
              f"t = transformers.AutoTokenizer.from_pretrained({str(tmp_path)!r}, local_files_only=True)\n"
              "print(t(' two  spaces\\n\\tand 漢字 🙂', add_special_tokens=False)['input_ids'])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ours.encode(" two  spaces\n\tand 漢字 🙂")


@pytest.mark.parametrize("tags", [None, {"system": "[S]", "user": "[U]", "assistant": "[A]", "end": "[E]"}])
def test_apply_chat_template_gives_llmforges_ids(tmp_path, tags):
    template = ChatTemplate(**tags) if tags else ChatTemplate()
    ours = export_tokenizer(tmp_path, "bpe", template)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    conversations = [
        [{"role": "user", "content": "Where does Orla live?"}],
        [{"role": "system", "content": "Be terse.\n"}, {"role": "user", "content": " two  spaces\tand a tab"},
         {"role": "assistant", "content": "In Lima. 漢字 🙂"}, {"role": "user", "content": "And Pietro?"}],
    ]
    for messages in conversations:
        for generation in (False, True):
            ids = theirs.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True,
                                             return_dict=True)["input_ids"]
            expected = template.prompt(ours, messages) if generation else template.render(ours, messages)[0]
            assert ids == expected
    assert theirs.convert_tokens_to_ids(template.end) == template.stop_ids(ours)[0]
    # Tags are special tokens: skip_special_tokens leaves the conversation's text.
    rendered = template.render(ours, conversations[0])[0]
    assert theirs.decode(rendered, skip_special_tokens=True) == "Where does Orla live?"
