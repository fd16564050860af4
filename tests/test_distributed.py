"""Distributed training on CPU: real torch.distributed processes (gloo), launched by
`llmforge run --nproc-per-node 2` through torch.distributed.run.

The same recipe gives the same losses and weights at world size 1 and 2 (DDP and FSDP2), a
run killed with -9 resumes at either world size, and a failing rank ends the run with exit 2
and its message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import cli
from .test_run import wait_for_step

# Three stages on the generated world (pretrain -> sft -> dpo) with a tiny model, so every
# objective's loss normalization is checked across world sizes. micro_batch 2 of 8 rows per
# step: 4 micro-batches alone, 2 per rank at world size 2, so gradients are accumulated (and
# synchronized once per step) at both. One thread per process at every world size: a kernel's
# rounding depends on its thread count, and chaos would grow even that into visible drift.
RECIPE = """\
name: dist
seed: 3
tokenizer: {type: bpe, vocab_size: 512, chat_template: default}
model: {preset: llama, n_layer: 2, n_head: 2, n_embd: 32, seq_len: 64, tie_embeddings: true}
data:
  facts: {builtin: world-facts, val_fraction: 2%}
  chat: {builtin: world-chat}
  prefs: {builtin: world-prefs}
stages:
  - {name: pretrain, kind: pretrain, mix: {facts: 1.0}, steps: 16, batch_tokens: 512,
     optimizer: {lr: 3e-3}, eval: {every: 8, tokens: 2Ki}, checkpoint: {every: 4, keep: 2}}
  - {name: sft, kind: sft, mix: {chat: 1.0}, steps: 40, batch_size: 8, optimizer: {lr: 1e-3},
     eval: {every: 20, tokens: 2Ki}, checkpoint: {every: 4, keep: 2}}
  - {name: dpo, kind: dpo, mix: {prefs: 1.0}, steps: 8, batch_size: 8, beta: 0.1, rpo_alpha: 1.0,
     optimizer: {lr: 1e-4}, eval: {every: 4, tokens: 2Ki, tasks: [world-qa]}, checkpoint: {every: 4, keep: 2}}
runtime: {log_every: 1, micro_batch: 2, threads: 1}
"""
STAGES = ("01-pretrain", "02-sft", "03-dpo")
RUN = Path("runs/dist")


def write_recipe(folder: Path) -> Path:
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


def run(folder: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    return cli("run", "recipe.yaml", "--nproc-per-node", nproc, *args, cwd=folder)


def losses(folder: Path, stage: str) -> dict:
    lines = (folder / RUN / "stages" / stage / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def weights(folder: Path, stage: str) -> dict:
    return load_file(str(folder / RUN / "stages" / stage / "final/model.safetensors"))


def assert_same_run(ours: Path, reference: Path) -> None:
    """Every step's loss and the final weights of every stage within 1e-5 of the reference."""
    for stage in STAGES:
        a, b = losses(ours, stage), losses(reference, stage)
        assert a.keys() == b.keys(), stage
        assert max(abs(a[k] - b[k]) for k in a) < 1e-5, stage
        wa, wb = weights(ours, stage), weights(reference, stage)
        assert wa.keys() == wb.keys(), stage
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5, stage


def trained(folder: Path, nproc: int) -> Path:
    """folder with the recipe, trained by nproc processes on this machine."""
    result = run(write_recipe(folder), nproc)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The recipe trained by one process: what every distributed run must reproduce."""
    return trained(tmp_path_factory.mktemp("single"), 1)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(single, tmp_path, parallel):
    folder = write_recipe(tmp_path)
    result = run(folder, 2, "--set", f"runtime.parallel={parallel}")
    assert result.returncode == 0, result.stderr
    assert_same_run(folder, single)
    plan = json.loads((folder / RUN / "plan.json").read_text())
    assert (plan["world_size"], plan["parallel"]) == (2, parallel)
    assert [(s["micro_batch"], s["grad_accum"], s["world_size"]) for s in plan["stages"]] == [(2, 2, 2)] * 3
    # Only rank 0 reports: each line once, and one metrics record per step.
    assert result.stdout.count("stage sft: done") == 1 and result.stdout.count("results on held-out data") == 1
    assert f"parallel: {parallel} over 2 processes" in result.stdout
    steps = [json.loads(l)["step"] for l in (folder / RUN / "stages/02-sft/metrics.jsonl").read_text().splitlines()
             if '"loss"' in l]
    assert steps == list(range(1, 41))
    # The final task eval ran on the full weights (under FSDP: gathered from the shards).
    single_eval = json.loads((single / RUN / "stages/03-dpo/final/eval.json").read_text())
    ours = json.loads((folder / RUN / "stages/03-dpo/final/eval.json").read_text())
    assert ours["world-qa/format"] == single_eval["world-qa/format"]


def torchrun(folder: Path, *launcher_args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "llmforge", "run",
                             "recipe.yaml"], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_torchrun_itself_runs_the_same_command(single, tmp_path):
    folder = write_recipe(tmp_path)
    proc = torchrun(folder, "--standalone", "--nproc-per-node", "2")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.count("stage dpo: done") == 1
    assert_same_run(folder, single)


def wait_for(folder: Path, proc: subprocess.Popen, stage: str, step: int) -> None:
    wait_for_step(folder, proc, step, metrics=str(RUN / "stages" / stage / "metrics.jsonl"))


def start(folder: Path, nproc: int, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmforge", "run", "recipe.yaml", "--nproc-per-node", str(nproc)],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.sampled(2)
@pytest.mark.parametrize("before, after", [(2, 2), (2, 1), (1, 2)])
def test_kill_9_mid_stage_then_resume_at_any_world_size(single, tmp_path, before, after):
    folder = write_recipe(tmp_path)
    proc = start(folder, before)
    wait_for(folder, proc, "02-sft", 10)
    proc.send_signal(signal.SIGKILL)  # the launcher: its workers must die with it
    proc.wait()
    result = run(folder, after)  # would fail on the run directory's lock if a worker lived on
    assert result.returncode == 0, result.stderr
    assert "stage pretrain: already done" in result.stdout and "resuming from step-" in result.stdout
    if before != after:
        assert "resuming on a different setup" in result.stdout
    assert_same_run(folder, single)


def test_stop_signal_saves_on_every_rank_at_the_same_step(single, tmp_path):
    """SIGTERM to the launcher: it forwards it, the ranks agree on a step, save, and exit;
    the same command resumes."""
    folder = write_recipe(tmp_path)
    proc = start(folder, 2)
    wait_for(folder, proc, "02-sft", 6)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.count("checkpoint saved") == 1 and "Traceback" not in stderr
    result = run(folder, 2)
    assert result.returncode == 0, result.stderr
    assert_same_run(folder, single)


FAULT = """\
# Injected into every worker (PYTHONPATH): rank 1 fails at its 5th sft training step.
import os
if os.environ.get("RANK") == "1":
    from llmforge.errors import DataError
    from llmforge.stages import sft as module
    sft = module.Objective
    calls = {"n": 0}
    original = sft.loss
    def loss(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 5:  # two micro-batches per step on this rank
            raise DataError("a shard of data/chat went missing")
        return original(self, model, batch)
    sft.loss = loss
"""


def test_a_failing_rank_ends_the_run_with_exit_2_and_its_message(single, tmp_path):
    folder = write_recipe(tmp_path)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FAULT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]))
    result = cli("run", "recipe.yaml", "--nproc-per-node", 2, cwd=folder, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error: rank 1: a shard of data/chat went missing") == 1, result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    # Nothing trained is lost: the next run resumes from sft's last checkpoint, and ends the same.
    result = run(folder, 2)
    assert result.returncode == 0, result.stderr
    assert "resuming from step-000004" in result.stdout
    assert_same_run(folder, single)


def test_errors_before_training_are_reported_once(tmp_path):
    folder = write_recipe(tmp_path)
    # 8 rows per step cannot be split among 3 processes: a plan error, naming the numbers.
    result = run(folder, 3)
    assert result.returncode == 2
    assert result.stderr.count("stages[1].batch_size: 8 does not divide among 3 processes") == 1, result.stderr
    assert "Traceback" not in result.stderr
    # A recipe error is caught before any process starts.
    result = run(folder, 2, "--set", "runtime.parallel=zero")
    assert result.returncode == 2 and result.stderr.count("error: runtime.parallel: input should be") == 1, \
        result.stderr


def test_plan_picks_fsdp_when_training_does_not_fit_one_device(tmp_path):
    from llmforge.errors import PlanError
    from llmforge.plan.devices import Device
    from llmforge.plan.estimates import estimate_memory
    from llmforge.plan.mix import SourceStats
    from llmforge.plan.plan import compile_plan, model_config
    from llmforge.recipe.loader import load_recipe

    from .conftest import TINY_RECIPE

    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE.format(steps=10, every=5))
    recipe = load_recipe(tmp_path / "recipe.yaml", ["model.n_embd=512", "model.n_layer=8", "model.n_head=8"])
    need = estimate_memory(model_config(recipe, 320), 1, 32, "fp32", cpu=True)  # whole model, one sequence

    def plan(memory_share: float, world: int):
        device = Device("cpu", "cpu", int(need / 0.6 * memory_share), "fp32", False, 1, None)
        return compile_plan(recipe, vocab_size=320, sources={"corpus": SourceStats(1, 10**6, 10**4)},
                            device=device, world_size=world)

    roomy, tight = plan(4.0, 2), plan(0.85, 2)
    assert (roomy.world_size, roomy.parallel) == (2, "ddp")
    assert tight.parallel == "fsdp" and tight.stages[0].est_peak_memory_bytes < need
    with pytest.raises(PlanError, match=r"to train even at micro-batch 1, more than the \d+\.\d GiB usable \(60%\) "
                                         r"of the \d+\.\d GiB this cpu offers"):
        plan(0.85, 1)  # alone, it does not fit at all; the message names the budget it checked
    assert plan(4.0, 1).parallel == "single"


def test_checkpoints_from_before_distributed_training_still_load(tmp_path):
    """Older checkpoints keyed optimizer state by parameter index; they resume as before."""
    import torch
    from safetensors.torch import save_file

    from llmforge.model.transformer import ModelConfig, Transformer
    from llmforge.optim import build_optimizer
    from llmforge.store.checkpoint import by_name, read_checkpoint

    model = Transformer(ModelConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=True))
    optimizer = build_optimizer(model, {"name": "adamw",
                                        "lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1})
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    optimizer.step()
    old = optimizer.state_dict()
    folder = tmp_path / "step-000001"
    folder.mkdir()
    save_file({f"state.{i}.{k}": v for i, s in old["state"].items() for k, v in s.items()},
              str(folder / "optimizer.safetensors"), metadata={"param_groups": json.dumps(old["param_groups"])})
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"))
    (folder / "state.json").write_text(json.dumps({"step": 1}))
    _, state, _ = read_checkpoint(folder)
    named = by_name(state, model, optimizer)
    assert "tok_emb.weight" in named["state"] and named["param_groups"][1]["params"][-1] == "norm.weight"
    assert torch.equal(named["state"]["tok_emb.weight"]["exp_avg"], old["state"][0]["exp_avg"])
