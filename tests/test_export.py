"""Export to Hugging Face transformers: the exported folder loads with AutoModelForCausalLM,
offline and without custom code, and computes the same model (logits within 1e-4 in fp32, the
same greedy tokens)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmforge.export.hf import export_weights
from llmforge.model.families import PRESETS
from llmforge.model.transformer import ModelConfig, Transformer
from llmforge.model.weights import weight_names

from .conftest import TINY_RECIPE, cli, make_corpus

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "llama, grouped-query, untied": dict(preset="llama", n_kv_head=2, tie_embeddings=False),
    "llama, tied": dict(preset="llama", tie_embeddings=True),
    "llama, biases": dict(preset="llama", bias=True, n_kv_head=1),
    "gpt2, tied": dict(preset="gpt2"),
    "gpt2, untied, no biases": dict(preset="gpt2", tie_embeddings=False, bias=False),
}


def write_final(folder: Path, model: Transformer) -> Path:
    """A stage's final/ folder as the engine writes it (weights once per tied tensor, config)."""
    final = folder / "final"
    final.mkdir(parents=True)
    state = model.state_dict()
    save_file({k: state[k].contiguous() for k in weight_names(model)}, str(final / "model.safetensors"))
    (final / "config.json").write_text(json.dumps({"model": model.config.to_dict()}))
    return final


def greedy(model: Transformer, prompt: torch.Tensor, n: int) -> list[int]:
    return prompt[0].tolist() + list(model.generate(prompt, n, temperature=0))


@pytest.mark.parametrize("name", CONFIGS)
def test_export_loads_in_transformers_and_computes_the_same(tmp_path, name):
    extra = dict(CONFIGS[name])
    fields = PRESETS[extra.pop("preset")] | extra
    cfg = ModelConfig(vocab_size=300, seq_len=64, n_layer=2, n_head=4, n_embd=64, rope_theta=5000.0, **fields)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_weights(write_final(tmp_path, model), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if cfg.norm == "rmsnorm" else "GPT2LMHeadModel")
    tokens = torch.randint(0, 300, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    print(f"{name}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4
    prompt = tokens[:1, :6]
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert theirs[0].tolist() == greedy(model, prompt, 20)


def test_a_model_transformers_cannot_express_is_refused(tmp_path):
    cfg = ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, n_embd=16, norm="layernorm", positions="rope")
    final = write_final(tmp_path / "stages/01-pretrain", Transformer(cfg))
    (final / "tokenizer.model").write_bytes(b"")
    result = cli("export", tmp_path, "--out", tmp_path / "hf")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.norm/positions/mlp: llama is rmsnorm + rope + swiglu, not layernorm + rope + swiglu" in result.stderr
    assert not (tmp_path / "hf").exists()


def test_export_a_trained_run(tmp_path):
    """Through the CLI: train the tiny recipe, export, and transformers continues a prompt with
    the same greedy tokens as the trained model."""
    (tmp_path / "corpus.txt").write_text(make_corpus())
    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE.format(steps=10, every=0))
    assert cli("run", "recipe.yaml", cwd=tmp_path).returncode == 0
    result = cli("export", "runs/tiny", "--out", "hf", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json"]
    assert cli("export", "runs/tiny", "--out", "hf", cwd=tmp_path).returncode == 2  # never overwrites
    # transformers, model and tokenizer, continues a prompt with the text `llmforge sample` prints.
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    prompt = "Kalo mine"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    theirs = tokenizer.decode(hf.generate(ids, max_new_tokens=20, do_sample=False)[0], skip_special_tokens=True)
    ours = cli("sample", "runs/tiny", "-p", prompt, "--temperature", "0", "--max-new-tokens", "20", cwd=tmp_path)
    assert ours.stdout == theirs + "\n" and len(theirs) > len(prompt)
    # bf16 export: half the bytes, same architecture.
    assert cli("export", "runs/tiny", "--out", "hf16", "--dtype", "bf16", cwd=tmp_path).returncode == 0
    assert json.loads((tmp_path / "hf16/config.json").read_text())["torch_dtype"] == "bfloat16"
    # Exporting needs no transformers: the export code never imports it.
    check = "import sys, llmforge.cli, llmforge.export.hf; assert 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0


def hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          rope_theta=5000.0, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("kind, shard", [("llama", False), ("llama", True), ("gpt2", False)])
def test_import_a_transformers_model(tmp_path, kind, shard):
    """A model saved by transformers (sharded too) reads into llmforge's model: the same logits."""
    from llmforge.model.hf import read_hf
    from llmforge.model.weights import set_weights

    theirs = hf_model(kind)
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="60KB" if shard else "5GB")
    assert (tmp_path / "hf/model.safetensors.index.json").is_file() == shard
    cfg, tensors = read_hf(tmp_path / "hf")
    ours = Transformer(cfg).eval()
    set_weights(ours, tensors, tmp_path / "hf")
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    print(f"import {kind}{' sharded' if shard else ''}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4
    # And back: exporting what was imported gives transformers the same model again.
    export_weights(write_final(tmp_path / "again", ours), tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    with torch.no_grad():
        assert (back(tokens).logits - theirs(tokens).logits).abs().max().item() <= 1e-4


def test_import_refuses_pickle_and_what_it_cannot_compute(tmp_path):
    from llmforge.errors import CheckpointError
    from llmforge.model.hf import read_hf

    theirs = hf_model("llama")
    theirs.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    (tmp_path / "hf/config.json").write_text(json.dumps(config | {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    with pytest.raises(CheckpointError, match="rope_scaling"):
        read_hf(tmp_path / "hf")
    (tmp_path / "hf/config.json").write_text(json.dumps(config))
    (tmp_path / "hf/model.safetensors").rename(tmp_path / "hf/pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        read_hf(tmp_path / "hf")


@pytest.mark.parametrize("tags", [None, {"system": "[S]", "user": "[U]", "assistant": "[A]", "end": "[E]\n"}])
def test_the_jinja_chat_template_renders_as_llmforge_does(tags):
    """apply_chat_template's template (rendered here by jinja2, as transformers does) gives the
    text of llmforge's own rendering, with and without the assistant's opening tag."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from llmforge.text.chat import ChatTemplate

    template = ChatTemplate(**tags) if tags else ChatTemplate()

    def raise_exception(message):
        raise ValueError(message)

    # transformers' own environment for chat templates
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template.jinja())
    conversations = [
        [{"role": "user", "content": "Where does Orla live?"}],
        [{"role": "system", "content": "Be terse.\n"}, {"role": "user", "content": " two  spaces\tand a tab"},
         {"role": "assistant", "content": "In Lima. 漢字 🙂"}, {"role": "user", "content": "And Pietro?"}],
    ]
    for messages in conversations:
        ours = "".join(text for text, _, _ in template.segments(messages))
        assert jinja.render(messages=messages, add_generation_prompt=False, raise_exception=raise_exception) == ours
        prompt = "".join(text for text, _, _ in template.prompt_segments(messages))
        assert jinja.render(messages=messages, add_generation_prompt=True, raise_exception=raise_exception) == prompt
    with pytest.raises(ValueError, match="unknown role: tool"):
        jinja.render(messages=[{"role": "tool", "content": "x"}], raise_exception=raise_exception)
