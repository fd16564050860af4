"""Starting from the open models people fine-tune: for each family (Llama with SmolLM2's ChatML,
Llama 3 with rope scaling, Qwen2.5, Qwen3, Mistral, Phi-3) a tiny random transformers folder
with a tokenizer.json and the family's chat template imports with the same logits and greedy
tokens, renders conversations to apply_chat_template's ids with the learned spans right, and
exports back as itself."""

from __future__ import annotations

import re

import pytest
import torch

from llmforge.export.hf import export_weights
from llmforge.model.families import CLASSES
from llmforge.model.hf import read_hf
from llmforge.model.transformer import Transformer
from llmforge.text.chat_jinja import read_folder_template
from llmforge.text.tokenizer_json import load_tokenizer

from .hf_families import CONVERSATION, FAMILIES, build_folder, write_chat_data

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_folder(folder, request.param)


def ours(folder) -> Transformer:
    cfg, tensors = read_hf(folder)
    model = Transformer(cfg).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: the embedding
    return model


def test_import_computes_like_transformers(family):
    name, folder, hf = family
    model = ours(folder)
    assert model.config.family == ("llama" if name == "llama3" else name)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # 40 tokens: past the sliding window of 16 (mistral, phi3)
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff
    prompt = tokens[:1, :12]
    theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None)[0, 12:].tolist()
    assert list(model.generate(prompt, 24, temperature=0)) == theirs


def test_template_gives_apply_chat_templates_ids_and_learns_the_replies(family):
    name, folder, _ = family
    tok, template = load_tokenizer(folder), read_folder_template(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    conversation = CONVERSATION[1:] if name == "mistral" else CONVERSATION  # its template drops a system turn
    ids, learned = template.render(tok, conversation)
    assert ids == theirs.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    prompt = conversation[:2]
    assert template.prompt(tok, prompt) == theirs.apply_chat_template(prompt, add_generation_prompt=True,
                                                                      tokenize=True, return_dict=True)["input_ids"]
    # Learned: each reply (a space before it may share its first token) and the end of turn after it.
    runs, run = [], []
    for i, flag in zip(ids, learned):
        if flag:
            run.append(i)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    end = template.end_of_turn
    # Qwen3 writes an empty thought before the last reply: the model learns to write it too.
    thought = "<think>\n\n</think>\n\n" if name == "qwen3" else ""
    assert [re.sub(r"^\s+", "", r) for r in runs + ([tok.decode(run)] if run else [])] == \
        [f"In city3.{end}", f"{thought}In city4. A pet4.{end}"]
    assert template.stop_ids(tok)[0] == tok.special_id(end)
    # A message that spells the end of turn cannot end it: it is text.
    clean, forged = ([{"role": "user", "content": text}, {"role": "assistant", "content": "Yo"}]
                     for text in ("Hi", f"Hi{end}"))
    assert template.render(tok, forged)[0].count(tok.special_id(end)) == \
        template.render(tok, clean)[0].count(tok.special_id(end))


def test_export_round_trip(family, tmp_path):
    name, folder, hf = family
    model = ours(folder)
    final = tmp_path / "final"
    final.mkdir()
    from safetensors.torch import save_file

    from llmforge.model.weights import weight_names

    state = model.state_dict()
    save_file({k: state[k].contiguous() for k in weight_names(model)}, str(final / "model.safetensors"))
    (final / "config.json").write_text(__import__("json").dumps({"model": model.config.to_dict()}))
    export_weights(final, tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(again).__name__ == CLASSES[model.config.family] == type(hf).__name__
    tokens = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (again(tokens).logits - hf(tokens).logits).abs().max().item() < 1e-5
    cfg, tensors = read_hf(tmp_path / "hf")
    assert cfg == model.config
    assert all(torch.equal(tensors[k], v) for k, v in read_hf(folder)[1].items())


RECIPE = """\
name: tuned
model: {init: {hf: base}}
data:
  chat: {path: chat.jsonl, format: chat, val_fraction: 20%}
  prefs: {path: prefs.jsonl, format: preference, val_fraction: 20%}
stages:
  - {name: sft, kind: sft, mix: {chat: 1.0}, steps: 3, batch_size: 4, seq_len: 128, optimizer: {lr: 1e-3}}
  - {name: dpo, kind: dpo, mix: {prefs: 1.0}, steps: 2, batch_size: 4, seq_len: 128, optimizer: {lr: 1e-4}}
runtime: {threads: 1}
"""


@pytest.mark.sampled(3)
def test_finetune_a_model_folder_and_export_it_as_itself(family, tmp_path):
    """`model: {init: {hf: folder}}` and nothing else about the model: its tokenizer.json and its own
    chat template are used; sft and dpo run; export writes the same family with its tokenizer."""
    import shutil

    from .conftest import cli

    name, folder, hf = family
    shutil.copytree(folder, tmp_path / "base")
    write_chat_data(tmp_path, system=name != "mistral")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    plan = cli("plan", "recipe.yaml", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "In city0." in plan.stdout  # the mask preview, through the model's own template
    run = cli("run", "recipe.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert cli("export", "runs/tuned", "--out", "out", cwd=tmp_path).returncode == 0
    # the run's recipe.yaml (every default spelled out, null ones too) reads back for `llmforge eval`
    evaluated = cli("eval", "runs/tuned", "--stage", "sft", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0 and "val_loss" in evaluated.stdout, evaluated.stderr
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(tuned).__name__ == type(hf).__name__
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    from llmforge.store.final import final_template as load_template
    from llmforge.store.final import find_stage, load_trained

    final = find_stage(tmp_path / "runs/tuned", None)
    model, tok = load_trained(final)
    template = load_template(final)
    messages = [{"role": "user", "content": "Where does person3 live?"}]
    ids = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == template.prompt(tok, messages)
    with torch.no_grad():
        assert (tuned(ids).logits - model(ids)).abs().max().item() < 1e-4
    import json

    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == tok.special_id(template.end_of_turn)


def test_bad_model_folders_are_refused_naming_file_and_key(tmp_path):
    """Each problem: exit 2, one line naming the file and the key, from `plan`, before any compute."""
    import json

    from .conftest import cli

    build_folder(tmp_path / "base", "llama")
    write_chat_data(tmp_path)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    config_file = tmp_path / "base/config.json"
    good = config_file.read_text()

    def plan_error() -> str:
        out = cli("plan", "recipe.yaml", cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        return out.stderr.splitlines()[0]

    config_file.write_text(json.dumps(json.loads(good) | {"model_type": "mamba"}))
    assert "base/config.json: model_type 'mamba' is not supported" in plan_error()
    config_file.write_text(json.dumps(json.loads(good) | {"model_type": "gemma2"}))
    assert "model_type 'gemma2' (Gemma 2) is not supported yet" in plan_error()
    config_file.write_text(json.dumps(json.loads(good) | {"hidden_act": "gelu"}))
    assert "base/config.json: hidden_act = 'gelu'" in plan_error()
    config_file.write_text(json.dumps(json.loads(good) | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    assert "base/config.json: rope_scaling = {'rope_type': 'yarn'" in plan_error()
    config_file.write_text(json.dumps(json.loads(good) | {"vocab_size": 100}))
    line = plan_error()
    assert "base/config.json: vocab_size 100 is smaller than its tokenizer's" in line and "tokenizer.json" in line
    config_file.write_text(good)

    tokenizer_config = tmp_path / "base/tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    tokenizer_config.write_text(json.dumps(settings | {"chat_template": "{{ raise_exception('no system role') }}"}))
    assert "tokenizer_config.json: chat_template: the chat template refused a conversation: no system role" \
        in plan_error()
    tokenizer_config.write_text(json.dumps(settings | {"chat_template": "{% for m in messages %}{{ m.content "}))
    assert "tokenizer_config.json: chat_template: the chat template does not parse" in plan_error()
    tokenizer_config.write_text(json.dumps(settings | {"chat_template": "{% for m in messages %}### {{ m.role }}: "
                                                                        "{{ m.content }}\n{% endfor %}"}))
    line = plan_error()  # no special token ends a turn: where would generation stop?
    assert "chat_template: cannot find the assistant's turns in the rendering (no special token ends" in line
    tokenizer_config.write_text(json.dumps(settings))

    tokenizer_file = tmp_path / "base/tokenizer.json"
    spec = json.loads(tokenizer_file.read_text())
    tokenizer_file.write_text(json.dumps(spec | {"model": {"type": "WordPiece", "vocab": {"[UNK]": 0},
                                                           "unk_token": "[UNK]"}}))
    assert "base/tokenizer.json: model.type 'WordPiece' is not supported" in plan_error()


def test_a_template_that_refuses_a_conversation_names_the_data_line(tmp_path):
    import json

    from .conftest import cli

    build_folder(tmp_path / "base", "llama")
    write_chat_data(tmp_path)  # every other conversation has a system turn, first on line 2
    config_file = tmp_path / "base/tokenizer_config.json"
    config = json.loads(config_file.read_text())
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    config_file.write_text(json.dumps(config | {"chat_template": refuse + config["chat_template"]}))
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    out = cli("run", "recipe.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = out.stderr.splitlines()[0]
    assert "chat.jsonl:2: " in line and "refused a conversation: System role not supported" in line


SCRATCH = {  # family -> the recipe's model options that make it (a preset, plus the options it takes)
    "qwen2": {"preset": "qwen2"},
    "qwen3": {"preset": "qwen3", "head_dim": 24},
    "mistral": {"preset": "mistral", "sliding_window": 8},
    "phi3": {"preset": "phi3", "sliding_window": 8},
    "llama": {"preset": "llama", "rope_scaling": {"factor": 8.0, "original_max_position_embeddings": 16}},
}


@pytest.mark.parametrize("name", SCRATCH)
def test_a_family_built_from_scratch_exports_as_itself(name, tmp_path):
    from llmforge.plan.plan import model_config
    from llmforge.recipe.loader import validate_recipe

    recipe = validate_recipe({"name": "x", "tokenizer": {"vocab_size": 300}, "data": {"d": {"path": "d.txt"}},
                              "model": SCRATCH[name] | {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64,
                                                        "seq_len": 48},
                              "stages": [{"name": "p", "kind": "pretrain", "mix": {"d": 1.0}, "steps": 1,
                                          "batch_size": 1}]})
    cfg = model_config(recipe, 300)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    from safetensors.torch import save_file

    from llmforge.model.weights import weight_names

    final = tmp_path / "final"
    final.mkdir()
    state = model.state_dict()
    save_file({k: state[k].contiguous() for k in weight_names(model)}, str(final / "model.safetensors"))
    (final / "config.json").write_text(__import__("json").dumps({"model": cfg.to_dict()}))
    export_weights(final, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(hf).__name__ == CLASSES[name]
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() < 1e-4


def test_train_from_scratch_with_a_bytelevel_tokenizer_and_chatml(tmp_path):
    """A qwen3 trained here: byte-level BPE tokenizer.json with the chatml tokens, pretrain then
    sft, exported as Qwen3ForCausalLM whose tokenizer renders chats to llmforge's ids."""
    import json

    from .conftest import cli, make_corpus

    (tmp_path / "corpus.txt").write_text(make_corpus(3000))
    write_chat_data(tmp_path, n=60)
    (tmp_path / "recipe.yaml").write_text("""\
name: scratch
tokenizer: {type: bytelevel_bpe, vocab_size: 400, chat_template: chatml}
model: {preset: qwen3, n_layer: 2, n_head: 2, n_kv_head: 1, n_embd: 32, head_dim: 24, seq_len: 64}
data:
  text: {path: corpus.txt}
  chat: {path: chat.jsonl, format: chat, val_fraction: 20%}
stages:
  - {name: pretrain, kind: pretrain, mix: {text: 1.0}, steps: 4, batch_tokens: 256}
  - {name: sft, kind: sft, mix: {chat: 1.0}, steps: 3, batch_size: 4}
runtime: {threads: 1}
""")
    run = cli("run", "recipe.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "runs/scratch/tokenizer/tokenizer.json").is_file()
    assert "<|im_start|>" in (tmp_path / "runs/scratch/stages/02-sft/final/tokenizer.json").read_text()
    assert cli("export", "runs/scratch", "--out", "out", cwd=tmp_path).returncode == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    from llmforge.store.final import final_template as load_template
    from llmforge.store.final import find_stage, load_trained

    final = find_stage(tmp_path / "runs/scratch", None)
    _, tok = load_trained(final)
    messages = [{"role": "user", "content": "Where does person3 live?"}]
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        load_template(final).prompt(tok, messages)
    assert json.loads((tmp_path / "out/generation_config.json").read_text())["eos_token_id"][0] == \
        tok.special_id("<|im_end|>")


@pytest.mark.parametrize("preset", ["qwen2", "qwen3", "mistral", "phi3"])
def test_llama_like_presets_have_rope_positions(preset):
    from llmforge.recipe.schema import ModelSpec

    scaling = {"factor": 8.0, "original_max_position_embeddings": 16}
    ModelSpec(preset=preset, n_layer=1, n_head=2, n_embd=32, seq_len=8, rope_scaling=scaling)  # no "needs rope"
    with pytest.raises(ValueError, match="rope needs an even head size"):
        ModelSpec(preset=preset, n_layer=1, n_head=2, n_embd=30, seq_len=8)
