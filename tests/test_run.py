"""End to end through the real CLI: train, skip when done, sample, resume exactly after kill -9
and after Ctrl-C, refuse a changed recipe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import cli

FINAL = Path("runs/tiny/stages/01-pretrain/final")


def final_bytes(folder: Path) -> bytes:
    return (folder / FINAL / "model.safetensors").read_bytes()


def metrics(folder: Path) -> list[dict]:
    path = folder / "runs/tiny/stages/01-pretrain/metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of the tiny recipe; other tests compare against it."""
    from .conftest import TINY_RECIPE, make_corpus

    folder = tmp_path_factory.mktemp("reference")
    (folder / "corpus.txt").write_text(make_corpus())
    (folder / "recipe.yaml").write_text(TINY_RECIPE.format(steps=40, every=10))
    started = time.perf_counter()
    result = cli("run", "recipe.yaml", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, result, time.perf_counter() - started


def test_run_end_to_end(reference):
    folder, result, _ = reference
    run = folder / "runs/tiny"
    assert (run / "recipe.yaml").is_file() and (run / "plan.json").is_file()
    assert (run / "tokenizer/tokenizer.model").is_file()
    final = run / "stages/01-pretrain/final"
    config = json.loads((final / "config.json").read_text())
    assert config["model"]["n_layer"] == 2 and config["stage"] == "pretrain"
    assert (final / "tokenizer.model").is_file()
    checkpoints = sorted(p.name for p in (run / "stages/01-pretrain/checkpoints").iterdir())
    assert checkpoints == ["step-000030", "step-000040"]  # keep: 2
    records = metrics(folder)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(2, 41, 2))
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(train[0])
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    assert {"val_loss", "val_bpb", "val/corpus/bpb"} <= set(evals[0])
    assert evals[-1]["val_bpb"] < 0.75 * evals[0]["val_bpb"]  # it learns
    assert "Traceback" not in result.stderr


# The tiny recipe's training loss, recorded from a known-good run (torch 2.13, CPU, fp32).
# 0.5% absorbs float differences between CPUs; a change to the schedule, init, optimizer or data
# order moves some of these by more (a new data order moved step 20 by 1.5%): re-record then.
GOLDEN_LOSS = {2: 5.7607, 10: 5.0429, 20: 4.2774, 30: 3.9653, 40: 3.8447}


def test_golden_loss_curve(reference):
    folder, _, _ = reference
    loss = {r["step"]: r["loss"] for r in metrics(folder) if "loss" in r}
    for step, expected in GOLDEN_LOSS.items():
        assert loss[step] == pytest.approx(expected, rel=0.005), step


def test_second_run_is_a_no_op(reference):
    folder, _, _ = reference
    before = final_bytes(folder)
    result = cli("run", "recipe.yaml", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "already done" in result.stdout
    assert final_bytes(folder) == before


def test_sample_prints_text(reference):
    folder, _, _ = reference
    result = cli("sample", "runs/tiny", "--prompt", "Ka", "--max-new-tokens", "30", "--seed", "1", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Ka") and len(result.stdout.strip()) > 10
    again = cli("sample", "runs/tiny", "--prompt", "Ka", "--max-new-tokens", "30", "--seed", "1", cwd=folder)
    assert again.stdout == result.stdout  # seeded
    missing = cli("sample", "runs/tiny", "--prompt", "x", "--stage", "sft", cwd=folder)
    assert missing.returncode == 2 and "no finished stage named 'sft'" in missing.stderr


def start(folder: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmforge", "run", "recipe.yaml", *args], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def wait_for_step(folder: Path, proc: subprocess.Popen, step: int, timeout: float = 120,
                  metrics: str = "runs/tiny/stages/01-pretrain/metrics.jsonl") -> None:
    """Wait until the running `proc` has logged `step` in its metrics file under `folder`."""
    path = folder / metrics
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and any(json.loads(l).get("step", 0) >= step for l in path.read_text().splitlines()
                                 if l.endswith("}")):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {step}")


@pytest.mark.parametrize("kill_at", [0, 13, 31])
def test_kill_9_then_resume_is_bitwise_identical(reference, tiny, kill_at):
    proc = start(tiny)
    if kill_at:
        wait_for_step(tiny, proc, kill_at)
    else:  # as early as possible: during tokenizer training or data preparation
        time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = cli("run", "recipe.yaml", cwd=tiny)
    assert result.returncode == 0, result.stderr
    if kill_at:
        assert "resuming from step-" in result.stdout
    assert final_bytes(tiny) == final_bytes(reference[0])
    # The resumed metrics read like an uninterrupted run's: every step once.
    def curve(folder):
        return [(r["step"], r.get("loss"), r.get("lr"), r.get("val_loss")) for r in metrics(folder)]
    assert curve(tiny) == curve(reference[0])


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_exits(reference, tiny, sig, code):
    proc = start(tiny)
    wait_for_step(tiny, proc, 15)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "checkpoint saved" in err and "run the same command again to resume" in err
    saved = sorted((tiny / "runs/tiny/stages/01-pretrain/checkpoints").iterdir())[-1]
    assert int(saved.name.split("-")[1]) >= 15  # not just the last periodic checkpoint
    result = cli("run", "recipe.yaml", cwd=tiny)
    assert result.returncode == 0, result.stderr
    assert final_bytes(tiny) == final_bytes(reference[0])


def test_changed_recipe_is_refused_then_restart(tiny):
    proc = start(tiny)
    wait_for_step(tiny, proc, 12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = cli("run", "recipe.yaml", "--set", "stages.pretrain.optimizer.lr=1e-2", cwd=tiny)
    assert result.returncode == 2
    assert "stages[0].optimizer.lr: changed from 0.003 to 0.01" in result.stderr
    assert "--restart" in result.stderr and "Traceback" not in result.stderr
    # Watching and saving settings may change mid-run.
    result = cli("run", "recipe.yaml", "--set", "stages.pretrain.eval.every=20", cwd=tiny)
    assert result.returncode == 0, result.stderr
    result = cli("run", "recipe.yaml", "--set", "stages.pretrain.optimizer.lr=1e-2", "--restart", cwd=tiny)
    assert result.returncode == 0, result.stderr
    assert json.loads((tiny / "runs/tiny/plan.json").read_text())["stages"][0]["lr"] == 1e-2


def test_bad_data_path_is_a_clear_error(tiny):
    (tiny / "corpus.txt").unlink()
    result = cli("run", "recipe.yaml", cwd=tiny)
    assert result.returncode == 2
    assert "data.corpus.path: 'corpus.txt' matches no files" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_stages_chain_and_resume(tiny):
    """Stage 2 starts from stage 1's final weights; a kill in stage 2 resumes exactly."""
    recipe = (tiny / "recipe.yaml").read_text()
    anneal = recipe.split("stages:\n", 1)[1].split("runtime:")[0]
    anneal = anneal.replace("name: pretrain", "name: anneal").replace("steps: 40", "steps: 20")
    anneal = anneal.replace("lr: 3e-3", "lr: 1e-3").replace("warmup: 3, decay: cosine", "decay: linear")
    text = recipe.replace("runtime:", anneal + "runtime:")
    (tiny / "recipe.yaml").write_text(text)
    reference = tiny / "reference"
    reference.mkdir()
    (reference / "recipe.yaml").write_text(text.replace("path: corpus.txt", f"path: {tiny / 'corpus.txt'}"))
    assert cli("run", "recipe.yaml", cwd=reference).returncode == 0

    proc = start(tiny)
    path = tiny / "runs/tiny/stages/02-anneal/metrics.jsonl"
    wait_for_step(tiny, proc, 12, metrics="runs/tiny/stages/02-anneal/metrics.jsonl")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = cli("run", "recipe.yaml", cwd=tiny)
    assert result.returncode == 0, result.stderr
    assert "stage pretrain: already done" in result.stdout and "resuming from step-" in result.stdout
    for stage in ("01-pretrain", "02-anneal"):
        ours = (tiny / f"runs/tiny/stages/{stage}/final/model.safetensors").read_bytes()
        assert ours == (reference / f"runs/tiny/stages/{stage}/final/model.safetensors").read_bytes()
    first = [json.loads(l) for l in (tiny / "runs/tiny/stages/01-pretrain/metrics.jsonl").read_text().splitlines()]
    second = [json.loads(l) for l in path.read_text().splitlines()]
    # Same held-out windows: stage 2 at step 0 scores exactly what stage 1 ended with.
    assert second[0]["val_loss"] == first[-1]["val_loss"]


def test_changed_data_mid_stage_is_refused(tiny):
    proc = start(tiny)
    wait_for_step(tiny, proc, 12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(tiny / "corpus.txt", "a") as f:
        f.write("A new sentence changes the tokens.\n")
    result = cli("run", "recipe.yaml", cwd=tiny)
    assert result.returncode == 2, result.stderr
    assert "data source 'corpus' changed since" in result.stderr and "Traceback" not in result.stderr


def test_tokenizer_settings_change_before_training_rebuilds_it(tiny):
    args = ("run", "recipe.yaml", "--set", "stages.pretrain.steps=1")
    assert cli(*args, cwd=tiny).returncode == 0
    first = (tiny / "runs/tiny/tokenizer/tokenizer.model").read_bytes()
    shutil.rmtree(tiny / "runs/tiny/stages")  # as if killed before any stage began
    result = cli(*args, "--set", "tokenizer.vocab_size=300", cwd=tiny)
    assert result.returncode == 0, result.stderr
    assert json.loads((tiny / "runs/tiny/plan.json").read_text())["model"]["vocab_size"] == 300
    assert (tiny / "runs/tiny/tokenizer/tokenizer.model").read_bytes() != first


def test_restart_only_deletes_run_directories(tiny):
    precious = tiny / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = cli("run", "recipe.yaml", "--run-dir", "precious", "--restart", cwd=tiny)
    assert result.returncode == 2 and "not an llmforge run directory" in result.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_one_process_per_run_directory(tiny):
    proc = start(tiny, "--set", "stages.pretrain.steps=100000")
    wait_for_step(tiny, proc, 2)
    result = cli("run", "recipe.yaml", cwd=tiny)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert result.returncode == 2 and "another llmforge process is running" in result.stderr


def test_gpt2_preset_char_tokenizer_runs(tiny):
    text = (tiny / "recipe.yaml").read_text()
    text = text.replace("{type: bpe, vocab_size: 320}", "{type: char, vocab_size: 400}")
    text = text.replace("preset: llama, n_layer: 2, n_head: 2, n_kv_head: 1", "preset: gpt2, n_layer: 2, n_head: 2")
    text = text.replace("log_every: 2}", "log_every: 2, compile: off}")  # YAML reads bare off as false
    (tiny / "recipe.yaml").write_text(text)
    result = cli("run", "recipe.yaml", "--set", "stages.pretrain.steps=12", cwd=tiny)
    assert result.returncode == 0, result.stderr
    plan = json.loads((tiny / "runs/tiny/plan.json").read_text())
    assert plan["model"]["positions"] == "learned" and plan["model"]["tie_embeddings"]
    assert plan["model"]["vocab_size"] < 400  # char: vocab_size is an upper bound
    sample = cli("sample", "runs/tiny", "--prompt", "Ka", "--max-new-tokens", "40", cwd=tiny)  # past seq_len 32
    assert sample.returncode == 0 and len(sample.stdout) > 20


def test_no_held_out_data_is_a_plan_warning(tiny):
    result = cli("plan", "recipe.yaml", "--set", "data.corpus.val_fraction=0", cwd=tiny)
    assert result.returncode == 0, result.stderr
    assert "warning: data.corpus: no held-out window" in result.stdout


def test_a_few_conversations_plan_before_the_tokenizer_exists(tmp_path):
    """Two short conversations, fewer tokens than one seq_len: `plan` estimates them (no tokenizer
    yet) as one partly filled row, as `run` packs them, instead of refusing them as too short a
    token stream for a pretraining window."""
    chat = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (("Hi there, who are you?", "A small model."), ("Where is Paris?", "In France."))]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat))
    (tmp_path / "recipe.yaml").write_text(
        "name: few\ntokenizer: {type: bpe, vocab_size: 300, chat_template: default}\n"
        "model: {preset: llama, n_layer: 2, n_head: 2, n_embd: 64, seq_len: 128}\n"
        "data:\n  chat: {path: chat.jsonl, format: chat}\n"
        "stages:\n  - {name: sft, kind: sft, mix: {chat: 1.0}, steps: 2, batch_size: 2}\n")
    result = cli("plan", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "estimated from file sizes" in result.stdout and "warning" not in result.stdout
    assert cli("run", "recipe.yaml", cwd=tmp_path).returncode == 0


def test_sharegpt_and_alpaca_train_as_the_same_chat(tmp_path):
    """The same two exchanges as chat, sharegpt and alpaca records: the same tokens, so the same
    losses step by step."""
    pairs = (("Hi there, who are you?", "A small model."), ("Where is Paris?", "In France."))
    records = {
        "chat": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs],
        "sharegpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in pairs],
        "alpaca": [{"instruction": q, "input": "", "output": a} for q, a in pairs],
    }
    losses = {}
    for fmt, lines in records.items():
        (tmp_path / f"{fmt}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (tmp_path / "recipe.yaml").write_text(
            f"name: {fmt}\ntokenizer: {{type: bpe, vocab_size: 300, chat_template: default}}\n"
            "model: {preset: llama, n_layer: 2, n_head: 2, n_embd: 64, seq_len: 64}\n"
            f"data:\n  chat: {{path: {fmt}.jsonl, format: {fmt}}}\n"
            "stages:\n  - {name: sft, kind: sft, mix: {chat: 1.0}, steps: 3, batch_size: 1, eval: {every: 0}}\n"
            "runtime: {log_every: 1}\n")
        result = cli("run", "recipe.yaml", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        metrics = (tmp_path / f"runs/{fmt}/stages/01-sft/metrics.jsonl").read_text().splitlines()
        losses[fmt] = [json.loads(line)["loss"] for line in metrics if '"loss"' in line]
    assert len(losses["chat"]) == 3 and losses["sharegpt"] == losses["chat"] == losses["alpaca"], losses
