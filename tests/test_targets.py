"""`llmforge plan --target`: the plan for hardware this machine does not have."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmforge.plan.devices import ASSUMED_MFU, TARGETS, Device, parse_target, table
from llmforge.plan.estimates import estimate_time

from .conftest import cli

REPO = Path(__file__).resolve().parents[1]


def plan(folder: Path, *args: str) -> dict:
    result = cli("plan", "recipe.yaml", "--json", *args, cwd=folder)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_target_sets_device_world_and_time(tiny):
    here = plan(tiny)
    there = plan(tiny, "--target", "a100-80gx4")
    assert there["target"].startswith("target a100-80gx4: NVIDIA A100 SXM 80GB")
    assert there["world_size"] == 4 and there["parallel"] == "ddp" and "target" not in here
    device = there["device"]
    assert device["type"] == "cuda" and device["memory_bytes"] == 80e9 and device["precision"] == "bf16"
    stage = there["stages"][0]
    assert stage["micro_batch"] * stage["grad_accum"] * 4 == stage["global_batch"]
    # The tiny model's 40 steps: compute at 40% of 4 x 312 TFLOPS, or the gradients' all-reduce.
    compute = stage["flops"] / 4 / (ASSUMED_MFU * 312e12)
    talk = stage["steps"] * 2 * 4 * there["params"] * 3 / 4 / 300e9
    assert stage["est_time_s"] == pytest.approx(max(compute, talk), rel=1e-6)
    assert plan(tiny, "--target", "h200")["world_size"] == 1
    assert plan(tiny, "--target", "cpu")["device"]["type"] == "cpu"


def test_a_model_too_large_for_the_target_is_refused_or_sharded(tiny):
    big = ["--set", "model.n_embd=4096", "--set", "model.n_layer=32", "--set", "model.n_head=32",
           "--set", "model.n_kv_head=8"]  # ~6.5B parameters: ~100 GB of training state
    result = cli("plan", "recipe.yaml", "--target", "4090", *big, cwd=tiny)
    assert result.returncode == 2 and "GiB" in result.stderr and "Traceback" not in result.stderr
    assert plan(tiny, "--target", "h100x8", *big)["parallel"] == "fsdp"


@pytest.mark.parametrize("bad", ["tpu", "h100x0", "h100x65", "cpux2", "h100x8x2"])
def test_unknown_targets_are_one_line(tiny, bad):
    result = cli("plan", "recipe.yaml", "--target", bad, cwd=tiny)
    assert result.returncode == 2 and result.stderr.startswith("error: --target: "), result.stderr


def test_communication_bounds_a_step_on_a_slow_link():
    device = Device("cuda", "x", 24e9, "bf16", True, 1, 100e12, 10e9)
    assert estimate_time(1e15, None, 1, 1, device) == pytest.approx(1e15 / 40e12)
    # 25 s of compute; 100 steps each sending 3/4 of 1 GB over a 10 GB/s link take 7.5 s, hidden
    # behind it; of 10 GB, 75 s, which then bounds the stage.
    assert estimate_time(1e15, None, 1, 1, device, steps=100, world_size=4, synced_bytes=1e9) == pytest.approx(25)
    assert estimate_time(1e15, None, 1, 1, device, steps=100, world_size=4, synced_bytes=1e10) == pytest.approx(75)


def test_the_documented_table_is_the_one_the_plan_uses():
    assert table() in (REPO / "docs/targets.md").read_text(), "docs/targets.md: paste llmforge.plan.devices.table()"
    assert parse_target("A100-80Gx4") == ("a100-80g", 4) and set(TARGETS) >= {"h100", "h200", "4090"}


def test_a_detected_gpu_takes_its_peak_from_the_device_table():
    """detect_device and --target read one table: a GPU's peak comes from the first row whose
    name torch reports it by contains (an A10G is not an A100)."""
    from llmforge.plan.devices import peak_flops

    assert peak_flops("cuda", "NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("cuda", "NVIDIA A100-SXM4-40GB", "bf16") == 312e12
    assert peak_flops("cuda", "NVIDIA A10G", "bf16") == 125e12
    assert peak_flops("cuda", "NVIDIA A100-SXM4-40GB", "fp32") == 156e12  # TF32: about half
    assert peak_flops("cuda", "Tesla T4", "bf16") is None and peak_flops("cpu", "CPU (2 threads)", "fp32") is None


def test_a_plan_for_hardware_you_do_not_have_needs_no_data(tmp_path):
    """Sizing a run comes before downloading 10B tokens: README's own lines, in a folder with the
    shipped recipes and no data, plan from the recipes' budgets and warn of what is missing; a
    stage whose budget counts epochs of the missing data says its steps are unknown."""
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    gpt2 = cli("plan", "recipes/gpt2-124m.yaml", "--target", "h100x8", cwd=tmp_path)
    assert gpt2.returncode == 0, gpt2.stderr
    assert "19074 steps x 524,288 tokens = 10.0B tokens" in gpt2.stdout
    assert "warning: data.web.path: '../data/fineweb-edu/sample/10BT/*.parquet' matches no files" in gpt2.stdout
    assert "planned from the stages' budgets without it" in gpt2.stdout
    llama = cli("plan", "recipes/llama-1b-pipeline.yaml", "--target", "a100-80gx8", cwd=tmp_path)
    assert llama.returncode == 0, llama.stderr
    assert "stage 02-sft (sft): ? steps (its data is not at hand)" in llama.stdout
    assert "the steps of sft count its examples: unknown until then" in llama.stdout
    run = cli("run", "recipes/gpt2-124m.yaml", cwd=tmp_path)  # training does need it
    assert run.returncode == 2 and "matches no files" in run.stderr
