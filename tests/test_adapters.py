"""LoRA adapters: the layer math by hand, training from a recipe (sft then dpo on LoRA), checkpoints
that hold the adapter alone, bitwise resume after kill -9, merged final/ folders, and the PEFT
export that peft loads onto the exported base with the same logits."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmforge.core import durable
from llmforge.model import adapters
from llmforge.model.transformer import ModelConfig, Transformer
from llmforge.optim import build_optimizer

from .conftest import cli
from .test_post import RECIPE, final_weights, kill_at, start, write_data

SPEC = {"kind": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["attn", "mlp"], "rslora": False}


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**({"vocab_size": 64, "seq_len": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}
                                      | kw)))


def test_lora_starts_at_the_base_and_merges_to_the_same_model():
    model = _model()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        base = model(idx)
    names = adapters.apply(model, SPEC)
    assert len(names) == 2 * 7 * 2  # A and B on 7 projections in each of 2 blocks
    trainable, frozen = adapters.count(model)
    assert trainable == adapters.adapter_params(model.config, SPEC) == sum(
        p.numel() for n, p in model.named_parameters() if n in names)
    assert frozen == model.config.num_params()
    with torch.no_grad():
        assert torch.equal(model(idx), base)  # B is zero: exactly the base model
        for m in model.modules():
            if isinstance(m, adapters.LoRALinear):
                m.lora_B.normal_(0, 0.1)
        lora = model(idx)
    layer = model.blocks[0].attn.q_proj  # by hand: x W^T + (alpha / r) x A^T B^T
    x = torch.randn(3, 32)
    assert torch.allclose(layer(x), x @ layer.weight.T + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T), atol=1e-6)
    adapters.merge(model)
    assert not any(isinstance(m, adapters.LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(_model().state_dict())  # the same names as a model without one
    with torch.no_grad():
        assert torch.allclose(model(idx), lora, atol=1e-5)
        assert not torch.allclose(lora, base, atol=1e-3)


def test_only_the_adapter_trains_and_takes_adamw_under_muon():
    model = _model()
    names = set(adapters.apply(model, SPEC | {"targets": ["q_proj", "down_proj"]}))
    assert {n.rsplit(".", 2)[-2] for n in names} == {"q_proj", "w2"}  # down_proj is llama's w2
    for name in ("adamw", "muon"):
        opt = build_optimizer(model, {"name": name, "lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1})
        stepped = {id(p) for g in opt.param_groups for p in g["params"]}
        assert stepped == {id(p) for n, p in model.named_parameters() if n in names}
        assert not any(g.get("muon") and g["params"] for g in opt.param_groups)
    gpt2 = _model(norm="layernorm", positions="learned", mlp="gelu", family="gpt2")
    assert {n.rsplit(".", 1)[-1] for n, _ in adapters.targeted(gpt2, ["mlp"])} == {"c_fc", "c_proj"}
    assert adapters.count(gpt2)[0] == gpt2.config.num_params()  # untouched until apply


LORA = "    adapter: {rank: 4, alpha: 8, targets: [attn, mlp]}\n"


def _recipe() -> str:
    """pretrain -> sft with LoRA -> dpo with LoRA on the merged sft model (its reference)."""
    head, rest = RECIPE.split("  - name: dpo\n")
    dpo = rest.split("  - name: rm\n")[0].replace("    init: pretrain\n", "")
    return head.replace("    eval: {every: 8, tokens: 1024}\n    checkpoint: {every: 4, keep: 2}\n",
                        "    eval: {every: 8, tokens: 1024}\n    checkpoint: {every: 4, keep: 2}\n" + LORA, 1) \
        + "  - name: dpo\n" + dpo + LORA + "runtime: {log_every: 2, threads: 1}\n"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    write_data(folder)
    (folder / "recipe.yaml").write_text(_recipe())
    result = cli("run", "recipe.yaml", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder


def test_lora_sft_and_dpo_from_a_recipe(lora_run):
    run = lora_run / "runs/post"
    plan = cli("plan", "recipe.yaml", cwd=lora_run)
    assert "lora rank 4, alpha 8 on attn, mlp:" in plan.stdout and "trainable" in plan.stdout, plan.stdout
    for stage in ("02-sft", "03-dpo"):
        root = run / "stages" / stage
        step = sorted(root.glob("checkpoints/step-*"))[-1]
        saved = load_file(str(step / "model.safetensors"))
        assert saved and all(".lora_" in name for name in saved), stage  # the adapter alone
        full = (run / "stages/01-pretrain/final/model.safetensors").stat().st_size
        assert (step / "model.safetensors").stat().st_size + (step / "optimizer.safetensors").stat().st_size \
            < 0.5 * full
        final = load_file(str(root / "final/model.safetensors"))
        assert not any(".lora_" in n for n in final)  # merged: a plain model for the next stage
        assert set(final) == set(load_file(str(run / "stages/01-pretrain/final/model.safetensors")))
        config = json.loads((root / "final/config.json").read_text())
        assert config["adapter"]["rank"] == 4 and (root / "final/adapter.safetensors").is_file()
        assert math.isfinite(json.loads((root / "final/eval.json").read_text())["val_loss"])
    assert json.loads((run / "stages/03-dpo/final/config.json").read_text())["adapter"]["base"] == "sft"
    # dpo's reference is the merged sft model: at step 0 its implicit rewards are all zero.
    first = json.loads((run / "stages/03-dpo/metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and abs(first["val_reward_margin"]) < 1e-4
    # Frozen means frozen: the merged weights differ from sft's only where LoRA was applied.
    sft, dpo = (load_file(str(run / f"stages/{s}/final/model.safetensors")) for s in ("02-sft", "03-dpo"))
    assert torch.equal(sft["tok_emb.weight"], dpo["tok_emb.weight"])
    assert not torch.equal(sft["blocks.0.attn.q_proj.weight"], dpo["blocks.0.attn.q_proj.weight"])


def test_lora_resumes_bitwise_after_kill_9(lora_run):
    run = lora_run / "runs/post"
    copy = lora_run / "runs/killed"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("02-sft", "03-dpo", ".lock"))
    args = ("--run-dir", "runs/killed")
    kill_at(lora_run, start(lora_run, *args), copy / "stages/02-sft/metrics.jsonl", 10)
    # The checkpoint is an update to pretrain's weights: if they change (other weights, sealed as
    # a final/ is), the resume is refused.
    base = copy / "stages/01-pretrain/final"
    original = (base / "model.safetensors").read_bytes()
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(str(base / "model.safetensors")).items()}
    save_file(other, str(base / "model.safetensors"))
    sums = (base / "checksums.json").read_text()
    durable.seal(base)
    refused = cli("run", "recipe.yaml", *args, cwd=lora_run)
    assert refused.returncode == 2 and "the weights it starts from" in refused.stderr, refused.stderr
    (base / "model.safetensors").write_bytes(original)
    (base / "checksums.json").write_text(sums)
    kill_at(lora_run, start(lora_run, *args), copy / "stages/03-dpo/metrics.jsonl", 6)
    assert (copy / "stages/02-sft/final").exists() and not (copy / "stages/03-dpo/final").exists()
    result = cli("run", "recipe.yaml", *args, cwd=lora_run)
    assert result.returncode == 0, result.stderr
    assert "stage dpo: resuming from step-" in result.stdout
    for stage in ("02-sft", "03-dpo"):
        assert final_weights(copy, stage) == final_weights(run, stage), stage
        assert (copy / "stages" / stage / "final/adapter.safetensors").read_bytes() == \
            (run / "stages" / stage / "final/adapter.safetensors").read_bytes()


def test_peft_loads_the_exported_adapter_onto_the_exported_base(lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    run = lora_run / "runs/post"
    assert cli("export", str(run), "--stage", "pretrain", "--out", str(tmp_path / "base")).returncode == 0
    result = cli("export", str(run), "--stage", "sft", "--adapter", "--out", str(tmp_path / "adapter"))
    assert result.returncode == 0, result.stderr
    assert "load it with peft.PeftModel.from_pretrained onto an export of stage pretrain" in result.stderr
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"}
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    from llmforge.store.final import load_model

    ours = load_model(run / "stages/02-sft/final")
    idx = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx).logits - ours(idx)).abs().max().item() < 1e-4
    # A stage without an adapter has none to export.
    refused = cli("export", str(run), "--stage", "pretrain", "--adapter", "--out", str(tmp_path / "none"))
    assert refused.returncode == 2 and "trained no adapter" in refused.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.replace("adapter: {rank: 4", "adapter: {kind: qlora, rank: 4", 1),
     "stages[1].adapter.kind: qlora keeps the frozen base in 4-bit NF4, which needs a CUDA GPU (this run is on cpu)"),
    (lambda r: r.replace("targets: [attn, mlp]", "targets: [c_fc]", 1),
     "stages[1].adapter.targets: ['c_fc'] select no layer of this model"),
    (lambda r: r.replace("  - name: sft\n", "  - name: sft\n    init: none\n"),
     "stages[1].adapter: stage sft starts from random weights"),
    (lambda r: r.replace("adapter: {rank: 4", "adapter: {rank: 0", 1), "stages[1].adapter.rank: input should be greater than 0 (got 0)\nhint"),
    (lambda r: r.replace("adapter: {rank: 4, alpha: 8, targets: [attn, mlp]}", "adapter: off", 1),
     "stages[1].adapter: input should be 'none' (got False)"),
])
def test_bad_adapters_are_plan_errors(tmp_path, edit, message):
    write_data(tmp_path)
    (tmp_path / "recipe.yaml").write_text(edit(_recipe()))
    result = cli("plan", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_top_level_adapter_applies_to_post_training_stages(tmp_path):
    write_data(tmp_path)
    recipe = RECIPE.split("  - name: dpo\n")[0] + "runtime: {threads: 1}\nadapter: {rank: 2, targets: [attn]}\n"
    (tmp_path / "recipe.yaml").write_text(recipe)
    out = cli("plan", "recipe.yaml", cwd=tmp_path).stdout
    pretrain, sft = out.split("stage 02-sft")
    assert "lora rank" not in pretrain and "lora rank 2, alpha 32 on attn" in sft, out
    (tmp_path / "recipe.yaml").write_text(recipe.replace("  - name: sft\n", "  - name: sft\n    adapter: none\n"))
    assert "lora rank" not in cli("plan", "recipe.yaml", cwd=tmp_path).stdout


def test_lora_trains_under_ddp_and_is_refused_under_fsdp(lora_run, tmp_path):
    """Two processes (gloo): DDP steps only the adapter; the result matches one process's to
    float rounding (their micro-batches differ, so not bitwise)."""
    for name in ("corpus.txt", "chat.jsonl", "prefs.jsonl", "questions.jsonl", "recipe.yaml"):
        shutil.copy(lora_run / name, tmp_path / name)
    result = cli("run", "recipe.yaml", "--nproc-per-node", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for stage in ("02-sft", "03-dpo"):
        ours, single = (json.loads((r / "runs/post/stages" / stage / "final/eval.json").read_text())["val_loss"]
                        for r in (tmp_path, lora_run))
        assert ours == pytest.approx(single, rel=1e-3), stage
        assert (tmp_path / "runs/post/stages" / stage / "final/adapter.safetensors").is_file()
    fsdp = cli("plan", "recipe.yaml", "--nproc-per-node", "2", "--set", "runtime.parallel=fsdp", cwd=tmp_path)
    assert fsdp.returncode == 2 and "stages[1].adapter: adapters train under ddp, not fsdp" in fsdp.stderr


def test_lora_on_an_imported_model_exports_onto_its_folder(tmp_path):
    """model.init.hf, then LoRA sft: peft loads the exported adapter onto the very folder the run
    imported, and computes llmforge's merged model."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from .test_hf_import import RECIPE as IMPORTED
    from .test_hf_import import make_base

    make_base(tmp_path / "base")
    recipe = IMPORTED.format(extra="").replace("    optimizer: {lr: 1e-3}\n", "    optimizer: {lr: 1e-2}\n"
                                               "    adapter: {rank: 8, alpha: 16, targets: [all-linear], "
                                               "train_embeddings: true}\n")
    (tmp_path / "recipe.yaml").write_text(recipe)
    run = cli("run", "recipe.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = cli("export", "runs/imported", "--adapter", "--out", "adapter", cwd=tmp_path)
    assert result.returncode == 0 and str((tmp_path / "base").resolve()) in result.stderr, result.stderr
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]  # train_embeddings
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    from llmforge.store.final import load_model

    ours = load_model(tmp_path / "runs/imported/stages/01-sft/final")
    idx = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = ours(idx)
        assert (model(idx).logits - merged).abs().max().item() < 1e-4
        with model.disable_adapter():  # and the adapter did change the model
            assert (model(idx).logits - merged).abs().max().item() > 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="qlora needs a CUDA GPU")
def test_qlora_trains_and_merges_on_cuda(tmp_path):
    """Written for a CUDA machine: the quickstart-like recipe with kind: qlora runs on the GPU, its
    checkpoints hold the adapter alone, and the merged final model is close to the 4-bit one."""
    pytest.importorskip("bitsandbytes")
    write_data(tmp_path)
    recipe = _recipe().replace("adapter: {rank: 4", "adapter: {kind: qlora, rank: 4").replace(
        "runtime: {log_every: 2, threads: 1}", "runtime: {log_every: 2, device: cuda, precision: bf16}")
    (tmp_path / "recipe.yaml").write_text(recipe)
    result = cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for stage in ("02-sft", "03-dpo"):
        root = tmp_path / "runs/post/stages" / stage
        saved = load_file(str(sorted(root.glob("checkpoints/step-*"))[-1] / "model.safetensors"))
        assert all(".lora_" in n for n in saved)
        assert math.isfinite(json.loads((root / "final/eval.json").read_text())["val_loss"])


def test_reward_and_grpo_stages_train_adapters(tmp_path):
    """LoRA on every kind: a reward model (its new head and, with train_embeddings, the token table
    train too; the output head it never uses stays frozen) and grpo (its frozen reference is the
    policy's starting weights)."""
    write_data(tmp_path)
    recipe = RECIPE.replace("  - name: rm\n    kind: reward\n", "  - name: rm\n    kind: reward\n"
                            "    adapter: {rank: 4, targets: [attn], train_embeddings: true}\n")
    recipe = recipe.replace("    group: 4\n", "    group: 4\n    adapter: {rank: 4, targets: [attn, mlp]}\n")
    (tmp_path / "recipe.yaml").write_text(recipe)
    result = cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stages = tmp_path / "runs/post/stages"
    rm = load_file(str(stages / "04-rm/final/adapter.safetensors"))
    assert {n for n in rm if ".lora_" not in n} == {"score.weight", "tok_emb.weight"}
    grpo = json.loads((stages / "05-grpo/final/eval.json").read_text())
    assert math.isfinite(grpo["val_reward"])
    assert json.loads((stages / "05-grpo/final/config.json").read_text())["adapter"]["base"] == "sft"
