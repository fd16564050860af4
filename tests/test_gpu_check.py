"""benchmarks/gpu_check.py gets one short call on a GPU machine (README: Speed); its --dry mode
runs every section on tiny shapes on the CPU, so the script is known to work before that call.
In fp32 the figures it prints must also say what fp32 math says: attention paths equal to the
dense mask, grpo's sampler and training forward in agreement, a merged LoRA equal to its adapter."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import REPO

SECTIONS = ["env", "attention", "pretrain", "sft", "adapters", "grpo", "fsdp1", "checkpoint"]


def gpu_check(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def test_dry_run_gives_every_section_its_results(tmp_path):
    out = gpu_check("--dry", "--out", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["section"] for s in report["sections"]] == SECTIONS
    results = {}
    for s in report["sections"]:
        assert s["exit_code"] == 0 and not s["timed_out"] and s["results"], s
        for r in s["results"]:
            assert "error" not in r, (s["section"], r)
            results[s["section"], r["case"]] = r
    assert "RESULT" in (tmp_path / "gpu_check.log").read_text()
    # A skip says why: QLoRA needs CUDA (and bitsandbytes).
    for case in ("qlora_eager", "qlora_compiled", "qlora_gpt2_bias"):
        assert "CUDA" in results["adapters", case]["skipped"]

    assert results["env", "matmul"]["tflops"] > 0
    for case in ("causal_mha", "causal_gqa", "docs_mha", "docs_gqa", "window_mha", "window_gqa", "docs_window_gqa"):
        r = results["attention", case]
        assert r["ours_err"] < 1e-4 and r["dense_err"] < 1e-4 and "math" in r["ours_takes"], r
    assert results["attention", "compiled_packed"]["graphs"] >= 1
    plan = results["pretrain", "plan"]
    for case in ("eager", "compiled"):
        assert results["pretrain", case]["tok_s"] > 0 and results["pretrain", case]["loss"] > 0
    assert results["pretrain", "compiled"]["graphs"] >= 1 and plan["micro"] * plan["grad_accum"] == plan["rows"]
    assert results["sft", "mha"]["kv_heads"] == 4 and results["sft", "gqa"]["kv_heads"] == 2
    for case in ("lora_eager", "lora_compiled"):
        assert results["adapters", case]["merged_rel_err"] < 1e-4
    for case in ("init_eager", "init_compiled", "sharp_eager", "sharp_compiled"):  # fp32: the ratio starts at 1
        grpo = results["grpo", case]
        assert grpo["tokens"] > 0 and grpo["gap_max_abs"] < 1e-3 and grpo["outside_clip_0_2"] == 0
    for mode in ("ddp", "fsdp"):
        assert results["fsdp1", mode]["names_match"] is True
    assert results["fsdp1", "fsdp"]["wrapped"].startswith("FSDP")
    assert results["checkpoint", "checkpoint"]["gib"] > 0


def test_sections_past_the_budget_are_skipped_and_named(tmp_path):
    out = gpu_check("--dry", "--only", "env,checkpoint", "--budget", "5", "--out", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["section"], s["skipped"].split(":")[0]) for s in report["sections"]] == \
        [("env", "budget"), ("checkpoint", "budget")]
    assert gpu_check("--only", "nope", "--out", str(tmp_path), cwd=tmp_path).returncode == 2


def test_a_crash_or_a_timeout_costs_its_section_alone(tmp_path):
    """What a child process left is recorded: the traceback's last lines and its exit code, or
    that its cap killed it (the runner then goes on with the next section)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    with open(tmp_path / "log", "w") as log:
        crashed = gpu_check.run_section("no-such-section", 120, True, log)
        cut = gpu_check.run_section("env", 0.5, True, log)
    assert crashed["exit_code"] == 1 and not crashed["timed_out"] and "KeyError" in crashed["error"]
    assert cut["timed_out"] and cut["exit_code"] == -9 and cut["results"] == []
