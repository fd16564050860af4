"""Damaged checkpoints: checksums written at save time find a truncated or bit-flipped file on
resume; the run names it, resumes from the checkpoint before it, and ends bitwise where an
uninterrupted run does. With no intact checkpoint left: exit 2, saying what to do."""

from __future__ import annotations

import json
import shutil

import pytest

from .conftest import TINY_RECIPE, cli, make_corpus
from .test_post import kill_at, start

STEPS = 30


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    (folder / "corpus.txt").write_text(make_corpus(6000, seed=2))
    (folder / "recipe.yaml").write_text(TINY_RECIPE.format(steps=STEPS, every=5).replace(
        "runtime: {log_every: 2}", "runtime: {log_every: 2, threads: 1}"))
    result = cli("run", "recipe.yaml", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder


def _killed_copy(reference, tmp_path):
    for name in ("corpus.txt", "recipe.yaml"):
        shutil.copy(reference / name, tmp_path / name)
    stage = tmp_path / "runs/tiny/stages/01-pretrain"
    kill_at(tmp_path, start(tmp_path), stage / "metrics.jsonl", 22)
    steps = sorted((stage / "checkpoints").glob("step-*"))
    assert len(steps) >= 2 and not (stage / "final").exists()
    return stage, steps


def _flip(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip model", "truncate optimizer", "flip state"])
def test_a_damaged_checkpoint_is_named_and_passed_over(reference, tmp_path, damage):
    stage, steps = _killed_copy(reference, tmp_path)
    latest = steps[-1]
    how, which = damage.split()
    target = latest / {"model": "model.safetensors", "optimizer": "optimizer.safetensors", "state": "state.json"}[which]
    if how == "flip":
        _flip(target, 0.9 if which == "state" else 0.5)
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    result = cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert f"checkpoint {latest.relative_to(tmp_path)} is damaged: {target.name}" in out, out
    assert f"resuming from {steps[-2].name}" in out, out
    ours = (stage / "final/model.safetensors").read_bytes()
    assert ours == (reference / "runs/tiny/stages/01-pretrain/final/model.safetensors").read_bytes()


def test_no_intact_checkpoint_is_exit_2_with_what_to_do(reference, tmp_path):
    stage, steps = _killed_copy(reference, tmp_path)
    for step in steps:
        _flip(step / "model.safetensors")
    result = cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "no intact checkpoint to resume from" in result.stderr and "--restart" in result.stderr
    sums = json.loads((steps[0] / "checksums.json").read_text())
    assert set(sums) == {"model.safetensors", "optimizer.safetensors", "state.json"}


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_gradients_that_are_not_finite_stop_the_run_or_are_skipped(tmp_path, policy):
    """An absurd lr blows the weights up within a step or two: `stop` ends the run at the first
    step whose gradients are not finite (exit 2, naming stage and step); `skip` drops those
    updates, counts them in the metrics, and stops after max_nonfinite in a row."""
    (tmp_path / "corpus.txt").write_text(make_corpus(3000, seed=4))
    recipe = TINY_RECIPE.format(steps=20, every=5).replace("optimizer: {lr: 3e-3}", "optimizer: {lr: 1e12}")
    recipe = recipe.replace("runtime: {log_every: 2}", f"runtime: {{log_every: 1, threads: 1, on_nonfinite: {policy}, "
                                                      "max_nonfinite: 3}")
    (tmp_path / "recipe.yaml").write_text(recipe)
    result = cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    if policy == "stop":
        assert "error: stage pretrain, step " in result.stderr and "the gradients are not finite" in result.stderr
    else:
        assert "the gradients were not finite 4 steps in a row (runtime.max_nonfinite: 3)" in result.stderr
        logged = [json.loads(line) for line in
                  (tmp_path / "runs/tiny/stages/01-pretrain/metrics.jsonl").read_text().splitlines()]
        assert [m["skipped"] for m in logged if "skipped" in m][-3:] == [1.0, 1.0, 1.0]
    assert "runtime.on_nonfinite" in result.stderr or policy == "skip"
