"""Muon: the orthogonalized update, which parameters it takes, its AdamW half equal to torch's
AdamW, and exact resume after kill -9 with its momentum buffers in the checkpoint."""

from __future__ import annotations

import signal

import pytest
import torch

from llmforge.model.families import PRESETS
from llmforge.model.transformer import ModelConfig, Transformer
from llmforge.optim import build_optimizer
from llmforge.optim.muon import orthogonalize

from .conftest import REPO, TINY_RECIPE, cli, make_corpus
from .test_run import final_bytes, start, wait_for_step


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, n_embd=32, **PRESETS["llama"]))


def test_newton_schulz_makes_the_update_nearly_orthogonal():
    g = torch.randn(3, 32, 96, generator=torch.Generator().manual_seed(0)) * torch.tensor([1e-3, 1.0, 50.0])[:, None, None]
    singular = torch.linalg.svdvals(orthogonalize(g))
    # The quintic iteration trades exactness for speed: singular values land in about [0.7, 1.2],
    # whatever the gradient's scale.
    assert singular.min() > 0.6 and singular.max() < 1.25


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = build_optimizer(model, {"name": "muon",
                                  "lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "muon_lr": 0.02})
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [g for g in opt.param_groups if g["muon"]]
    assert len(muon) == 1 and muon[0]["lr_ratio"] == pytest.approx(20.0)
    assert {names[id(p)] for p in muon[0]["params"]} == {n for n, p in model.named_parameters()
                                                         if p.dim() == 2 and n.startswith("blocks.")}
    others = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert "tok_emb.weight" in others and "norm.weight" in others


def test_the_adamw_half_steps_exactly_like_torch_adamw():
    ours, theirs = tiny_model(), tiny_model()
    for model in (ours, theirs):  # blocks' matrices frozen: both optimizers see the same gradients every step
        for name, p in model.named_parameters():
            p.requires_grad_(not (p.dim() == 2 and name.startswith("blocks.")))
    a = build_optimizer(ours, {"name": "muon", "lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1})
    b = build_optimizer(theirs, {"name": "adamw", "lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1})
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, opt in ((ours, a), (theirs, b)):
            loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(p, q, atol=1e-7, rtol=1e-5), name


def test_muon_resumes_bitwise_after_kill_9(tmp_path):
    recipe = TINY_RECIPE.format(steps=30, every=10).replace("optimizer: {lr: 3e-3}",
                                                              "optimizer: {name: muon, lr: 3e-3, muon_lr: 0.02}")
    for name in ("reference", "killed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "corpus.txt").write_text(make_corpus())
        (tmp_path / name / "recipe.yaml").write_text(recipe)
    assert cli("run", "recipe.yaml", cwd=tmp_path / "reference").returncode == 0
    proc = start(tmp_path / "killed")
    wait_for_step(tmp_path / "killed", proc, 14)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = cli("run", "recipe.yaml", cwd=tmp_path / "killed")
    assert resumed.returncode == 0 and "resuming from step-" in resumed.stdout
    assert final_bytes(tmp_path / "killed") == final_bytes(tmp_path / "reference")


def test_shakespeare_recipe_trains_and_logs_time(tmp_path):
    """The time-to-quality recipe runs as shipped (on stand-in text), and its metrics carry wall time."""
    (tmp_path / "text.txt").write_text(make_corpus(20000))
    result = cli("run", REPO / "recipes/shakespeare-char.yaml", "--set", f"data.shakespeare.path={tmp_path}/text.txt",
                 "--set", "stages[0].steps=20", "--set", "stages[0].eval.every=10", "--run-dir", tmp_path / "run",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "muon" in result.stdout
    import json

    records = [json.loads(line) for line in (tmp_path / "run/stages/01-pretrain/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in evals] == [0, 10, 20] and evals[-1]["val_bpb"] < evals[0]["val_bpb"]
    assert all(r["time"] >= records[0]["time"] for r in records)


def test_an_optimizer_that_cannot_shard_is_refused_under_fsdp_and_auto_picks_ddp(tmp_path):
    """Muon declares it cannot train sharded (it orthogonalizes whole matrices): the plan says so
    under runtime.parallel: fsdp, and auto keeps it on ddp where adamw would shard to fit."""
    from llmforge.errors import PlanError
    from llmforge.optim import OPTIMIZERS
    from llmforge.plan.devices import Device
    from llmforge.plan.estimates import estimate_memory
    from llmforge.plan.mix import SourceStats
    from llmforge.plan.plan import compile_plan, model_config
    from llmforge.recipe.loader import load_recipe

    assert [name for name, o in OPTIMIZERS.items() if not o.shards] == ["muon"]
    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE.format(steps=10, every=5))
    big = ["model.n_embd=512", "model.n_layer=8", "model.n_head=8"]
    need = estimate_memory(model_config(load_recipe(tmp_path / "recipe.yaml", big), 320), 1, 32, "fp32", cpu=True)

    def plan(*overrides):
        recipe = load_recipe(tmp_path / "recipe.yaml", [*big, *overrides])
        device = Device("cpu", "cpu", int(need / 0.6 * 0.85), "fp32", False, 1, None)  # ddp does not fit
        return compile_plan(recipe, vocab_size=320, sources={"corpus": SourceStats(1, 10**6, 10**4)},
                            device=device, world_size=2)

    assert plan().parallel == "fsdp"  # adamw shards to fit
    with pytest.raises(PlanError, match=r"stages\[0\].optimizer.name: muon orthogonalizes whole matrices, which "
                                        "fsdp shards"):
        plan("stages[0].optimizer.name=muon", "runtime.parallel=fsdp")
    with pytest.raises(PlanError, match="to train even at micro-batch 1"):
        plan("stages[0].optimizer.name=muon")  # auto keeps muon whole: on ddp it does not fit
