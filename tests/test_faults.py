"""Fault injection on a real three-stage run (pretrain -> sft -> dpo), in real subprocesses:
SIGKILL at seeded random moments (tokenizer training, data preparation, steps, mid-checkpoint,
dpo's reference pass, final/), a second Ctrl-C while saving, damaged cache entries and final/,
and a full disk. Every rerun must end byte-identical to the uninterrupted run.

The moments come from llmforge/core/faults.py: the uninterrupted run traces every one it reaches;
the test picks some (LLMFORGE_FAULT_SEED=N repeats a pick) and kills a run at each in turn."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmforge.core import durable

from .conftest import COUNTS
from .test_post import write_data

RECIPE = """\
name: faults
seed: 5
tokenizer: {type: bpe, vocab_size: 320, chat_template: default}
model: {preset: llama, n_layer: 2, n_head: 2, n_kv_head: 1, n_embd: 32, seq_len: 64}
data:
  corpus: {path: corpus.txt, val_fraction: 10%}
  chat: {path: chat.jsonl, format: chat, val_fraction: 10%}
  prefs: {path: prefs.jsonl, format: preference, val_fraction: 10%}
stages:
  - {name: pretrain, kind: pretrain, mix: {corpus: 1.0}, steps: 12, batch_tokens: 256, optimizer: {lr: 3e-3},
     eval: {every: 6, tokens: 512}, checkpoint: {every: 4, keep: 2}}
  - {name: sft, kind: sft, mix: {chat: 1.0}, steps: 8, batch_size: 4, optimizer: {lr: 2e-3},
     eval: {every: 4, tokens: 512}, checkpoint: {every: 4, keep: 2}}
  - {name: dpo, kind: dpo, init: pretrain, mix: {prefs: 1.0}, steps: 8, batch_size: 4,
     optimizer: {lr: 1e-3}, eval: {every: 4, tokens: 512}, checkpoint: {every: 4, keep: 2}}
runtime: {log_every: 2, threads: 1}
"""
STAGES = ("01-pretrain", "02-sft", "03-dpo")
# Moments every pick must include one of: the list, plus steps and final/.
GROUPS = {"tokenizer training": "tokenizer:", "data preparation": "data:", "a training step": "step:",
          "a checkpoint write": "checkpoint:", "dpo's reference pass": "reference:", "final/": "final:"}


def run(folder: Path, run_dir: str, cache: str, faults: str = "", trace: Path | None = None, **kw):
    env = dict(os.environ, LLMFORGE_CACHE=str(folder / cache), LLMFORGE_FAULTS=faults)
    if trace:
        env["LLMFORGE_FAULT_TRACE"] = str(trace)
    return subprocess.run([sys.executable, "-m", "llmforge", "run", "recipe.yaml", "--run-dir", run_dir],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300, **kw)


def finals(run_dir: Path) -> dict:
    return {s: (run_dir / "stages" / s / "final/model.safetensors").read_bytes() for s in STAGES}


def curves(run_dir: Path) -> dict:
    def rows(s):
        return [(m["step"], m.get("loss"), m.get("val_loss")) for m in
                map(json.loads, (run_dir / "stages" / s / "metrics.jsonl").read_text().splitlines())]
    return {s: rows(s) for s in STAGES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, with the trace of every moment it reached."""
    folder = tmp_path_factory.mktemp("faults")
    write_data(folder)
    (folder / "recipe.yaml").write_text(RECIPE)
    trace = folder / "trace.txt"
    result = run(folder, "runs/ref", "cache-ref", trace=trace)
    assert result.returncode == 0, result.stderr
    moments = trace.read_text().split()
    assert len(moments) == len(set(moments)), "each moment must be named once"
    return folder, moments


def pick(moments: list[str], rng: random.Random, n: int = 12) -> list[str]:
    """One moment of each group, the rest anywhere, in the order the run reaches them."""
    chosen = {rng.choice([m for m in moments if m.startswith(prefix)]) for prefix in GROUPS.values()}
    while len(chosen) < n:
        chosen.add(rng.choice(moments))
    return sorted(chosen, key=moments.index)


def test_killed_at_random_moments_ends_byte_identical(reference):
    folder, moments = reference
    seed = int(os.environ.get("LLMFORGE_FAULT_SEED") or random.randrange(10**6))
    kills = pick(moments, random.Random(seed))
    print(f"fault seed {seed} (LLMFORGE_FAULT_SEED={seed} repeats it): {len(kills)} kill points: {kills}")
    for key in kills:
        result = run(folder, "runs/chain", "cache-chain", faults=f"{key}=kill")
        assert result.returncode == -signal.SIGKILL, f"seed {seed}: {key} was never reached\n{result.stderr}"
    result = run(folder, "runs/chain", "cache-chain")
    assert result.returncode == 0, f"seed {seed}: {result.stderr}"
    chain, ref = folder / "runs/chain", folder / "runs/ref"
    assert finals(chain) == finals(ref), f"seed {seed}"
    assert curves(chain) == curves(ref), f"seed {seed}"
    groups = {name: sum(k.startswith(p) for k in kills) for name, p in GROUPS.items()}
    COUNTS["kill points (seed %d)" % seed] = f"{len(kills)}, all resumed byte-identical ({groups})"


def test_second_ctrl_c_while_saving_keeps_the_last_checkpoint(reference):
    """Ctrl-C at step 6 asks for a checkpoint there; a second Ctrl-C halfway through writing it
    stops at once: exit 130, step 4's checkpoint intact, nothing half-written left."""
    folder, _ = reference
    faults = "step:01-pretrain:6=int,checkpoint:01-pretrain:6:model.safetensors=int"
    result = run(folder, "runs/ctrlc", "cache-ref", faults=faults)
    assert result.returncode == 130, result.stderr
    assert "interrupted" in result.stderr and "run the same command again to resume" in result.stderr
    checkpoints = folder / "runs/ctrlc/stages/01-pretrain/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000004"]
    assert durable.damage(checkpoints / "step-000004") is None
    result = run(folder, "runs/ctrlc", "cache-ref")
    assert result.returncode == 0, result.stderr
    assert "stage pretrain: resuming from step-000004" in result.stdout
    assert finals(folder / "runs/ctrlc") == finals(folder / "runs/ref")


def test_tokenizing_workers_die_with_a_killed_run(reference):
    """kill -9 while worker processes tokenize: they must not live on as orphans (they held the
    terminal's pipes open, so a caller waiting for the output hung), and the rerun is whole."""
    folder, _ = reference
    env = dict(os.environ, LLMFORGE_CACHE=str(folder / "cache-orphans"), LLMFORGE_FAULTS="data:corpus:batch:1=kill")
    command = [sys.executable, "-m", "llmforge", "run", "recipe.yaml", "--run-dir", "runs/orphans",
               "--set", "runtime.data_workers=2"]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    result = subprocess.run(command, cwd=folder, env=dict(env, LLMFORGE_FAULTS=""), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert finals(folder / "runs/orphans") == finals(folder / "runs/ref")


def flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[min(at, len(data) - 1)] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path, at: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:at])


@pytest.mark.parametrize("how", [flip, truncate])
def test_damaged_cache_entry_and_final_are_rebuilt(reference, how):
    """A changed token cache entry is tokenized again; a changed final/ is rebuilt from the stage's
    last checkpoint; both end as the bytes they were."""
    folder, _ = reference
    copy, cache = folder / f"runs/{how.__name__}", folder / f"cache-{how.__name__}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.copytree(folder / "runs/ref", copy, ignore=shutil.ignore_patterns(".lock"))
    shutil.copytree(folder / "cache-ref", cache)
    entries = sorted(p for p in (cache / "tokens").iterdir() if (p / "tokens.bin").exists())
    tokens = entries[0] / "tokens.bin"
    before = tokens.read_bytes()
    how(tokens)
    final = copy / "stages/01-pretrain/final/model.safetensors"
    how(final)
    result = run(folder, f"runs/{copy.name}", cache.name)
    assert result.returncode == 0, result.stderr
    assert f"token cache entry {entries[0]} is damaged" in result.stdout
    assert "stage pretrain: " in result.stdout and "is damaged" in result.stdout and "rebuilding it" in result.stdout
    assert tokens.read_bytes() == before
    assert finals(copy) == finals(folder / "runs/ref")
    COUNTS[f"corruption cases ({how.__name__})"] = "2 (a token cache entry, final/): both rebuilt byte-identical"


def test_damaged_final_without_checkpoints_says_what_to_do(reference):
    folder, _ = reference
    copy = folder / "runs/lost"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder / "runs/ref", copy, ignore=shutil.ignore_patterns(".lock", "checkpoints"))
    truncate(copy / "stages/02-sft/final/model.safetensors")
    result = run(folder, "runs/lost", "cache-ref")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "02-sft/final is damaged (model.safetensors is 100 bytes" in result.stderr
    assert "no checkpoint to rebuild it from" in result.stderr and "delete runs/lost/stages/02-sft/final" in result.stderr


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = ["-o", f"size={size}"] if not os.path.ismount(path) else ["-o", f"remount,size={size}"]
    return subprocess.run(["mount", "-t", "tmpfs", *opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(reference):
    """On a 1 MiB tmpfs (or, where mounting is not allowed, under a file size limit) the run stops
    at the checkpoint that does not fit: exit 2 naming it and the bytes it needs, the checkpoints
    before it intact. With more room the same command finishes, byte-identical."""
    folder, _ = reference
    disk = folder / "disk"
    mounted = _tmpfs(disk, "1m")
    limit = None
    if not mounted:  # a real limit too: the kernel refuses the write with EFBIG
        disk.mkdir(exist_ok=True)
        size = (folder / "runs/ref/stages/01-pretrain/checkpoints/step-000012/optimizer.safetensors").stat().st_size
        limit = size - 1

        def limit_files():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        result = run(folder, str(disk / "run"), "cache-ref", preexec_fn=limit_files if limit else None)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "the disk is full" in result.stderr and "checkpoints/step-" in result.stderr
        assert "bytes are free" in result.stderr and "needs about" in result.stderr
        checkpoints = disk / "run/stages/01-pretrain/checkpoints"
        left = sorted(checkpoints.iterdir()) if checkpoints.exists() else []
        assert all(p.name.startswith("step-") and durable.damage(p) is None for p in left)
        if mounted:
            assert left, "the checkpoints that fit are kept"
            assert "warning:" in result.stdout and "MiB free" in result.stdout  # the plan said so before
            assert _tmpfs(disk, "64m")
            result = run(folder, str(disk / "run"), "cache-ref")
            assert result.returncode == 0, result.stderr
            assert finals(disk / "run") == finals(folder / "runs/ref")
        COUNTS["disk full"] = "a 1 MiB tmpfs" if mounted else f"a {limit:,}-byte file size limit"
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], capture_output=True)
