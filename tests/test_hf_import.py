"""Starting from a local transformers folder: `model: {init: {hf: folder}}` takes its
architecture and tokenizer, the first stage starts from its weights, and the result exports back
to a folder transformers loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmforge.text.chat import ChatTemplate
from llmforge.text.tokenizer import Tokenizer, train_tokenizer

from .conftest import cli, make_corpus

transformers = pytest.importorskip("transformers")

RECIPE = """\
name: imported
tokenizer: {{chat_template: default}}
model: {{init: {{hf: base}}{extra}}}
data:
  chat: {{builtin: world-chat}}
stages:
  - name: sft
    kind: sft
    mix: {{chat: 1.0}}
    steps: 6
    batch_size: 4
    seq_len: 64
    overlong: drop
    optimizer: {{lr: 1e-3}}
runtime: {{threads: 1}}
"""


def make_base(folder, vocab_pad: int = 64):
    """A random LlamaForCausalLM saved by transformers, with a sentencepiece tokenizer that has
    the chat tags, and an embedding padded past the tokenizer's vocab (as many models have)."""
    text = [make_corpus(4000)] + [f"Where does person{i} live? In city{i % 7}. A pet{i % 5}." for i in range(200)]
    tok = Tokenizer.load(train_tokenizer(text, folder / "tok", type="bpe", vocab_size=400,
                                         user_symbols=ChatTemplate().symbols))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size + vocab_pad, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rope_theta=5000.0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    shutil.copyfile(tok.path, folder / "tokenizer.model")
    shutil.rmtree(folder / "tok")
    return model, tok


def test_import_finetune_and_export_round_trip(tmp_path):
    base, tok = make_base(tmp_path / "base")
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(extra=""))
    plan = cli("plan", "recipe.yaml", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    run = cli("run", "recipe.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    saved = json.loads((tmp_path / "runs/imported/plan.json").read_text())
    assert saved["model"]["vocab_size"] == tok.vocab_size + 64 and saved["model"]["n_kv_head"] == 2
    assert saved["model_init"] == str((tmp_path / "base").resolve())
    # The stage started from the imported weights: 6 small AdamW steps moved each weight by at most
    # ~6 * lr, while a fresh random init would differ from the base by ~0.1 somewhere.
    from llmforge.model.hf import read_hf
    from llmforge.store.final import load_trained

    _, base_tensors = read_hf(tmp_path / "base")
    tuned, _ = load_trained(tmp_path / "runs/imported/stages/01-sft/final")
    moved = max((tuned.state_dict()[k] - v).abs().max().item() for k, v in base_tensors.items())
    assert 0 < moved < 0.02
    # Export the fine-tuned model: transformers loads it and agrees with llmforge.
    assert cli("export", "runs/imported", "--out", "tuned", cwd=tmp_path).returncode == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tuned", local_files_only=True)
    messages = [{"role": "user", "content": "Where does person3 live?"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == ChatTemplate().prompt(tok, messages)
    with torch.no_grad():
        assert (hf(ids).logits - tuned(ids)).abs().max().item() <= 1e-4


def test_import_errors_name_the_key(tmp_path):
    make_base(tmp_path / "base")
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(extra=", n_layer: 4, seq_len: 64"))
    out = cli("plan", "recipe.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "recipe.yaml:3: model.n_layer: 4, but" in out.stderr and "config.json has 2" in out.stderr
    assert "seq_len" not in out.stderr  # the same as the folder's: fine
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(extra="").replace("base}", "nowhere}"))
    out = cli("plan", "recipe.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "model.init.hf:" in out.stderr and "cannot read config.json" in out.stderr
    (tmp_path / "base/tokenizer.model").rename(tmp_path / "tokenizer.model")
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(extra=""))
    out = cli("plan", "recipe.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "has no tokenizer.json or tokenizer.model" in out.stderr
    (tmp_path / "tokenizer.model").rename(tmp_path / "base/tokenizer.model")
    (tmp_path / "base/model.safetensors").rename(tmp_path / "base/pytorch_model.bin")
    out = cli("plan", "recipe.yaml", cwd=tmp_path)  # sizing a run needs config.json alone: the weights may come later
    assert out.returncode == 0 and "warning: model.init.hf:" in out.stdout + out.stderr
    assert "the plan sizes the run from its config.json" in out.stdout + out.stderr
    out = cli("run", "recipe.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "model.init.hf:" in out.stderr and "only pickle weights" in out.stderr
    assert "Traceback" not in out.stderr
