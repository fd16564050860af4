"""runtime.trackers: TensorBoard's event files and an offline W&B run log what metrics.jsonl logs,
read back here; only rank 0 of a distributed run logs; a tracker that cannot start is one warning."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from .conftest import TINY_RECIPE, cli, make_corpus

TWO_STAGES = TINY_RECIPE.format(steps=12, every=6).replace(
    "runtime: {log_every: 2}", """\
  - {name: more, kind: pretrain, mix: {corpus: 1.0}, steps: 6, batch_tokens: 256, optimizer: {lr: 1e-3},
     eval: {every: 3, tokens: 1024}}
runtime: {log_every: 2, trackers: [tensorboard, wandb]}""")


def metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(l) for l in (run / "stages" / stage / "metrics.jsonl").read_text().splitlines()]


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (LevelDB's log format: 32 KiB blocks of records
    with a 7-byte header each, after W&B's own 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, chunks, part = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:
            break
        part, pos = part + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or its last piece
            chunks.append(part)
            part = b""
    records = []
    for data in chunks:
        record = pb.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    """Two stages, two processes (gloo), both trackers."""
    folder = tmp_path_factory.mktemp("trackers")
    (folder / "corpus.txt").write_text(make_corpus())
    (folder / "recipe.yaml").write_text(TWO_STAGES)
    result = cli("run", "recipe.yaml", "--nproc-per-node", "2", cwd=folder, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr
    return folder / "runs/tiny"


def test_tensorboard_holds_every_figure_at_the_runs_global_step(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((logged / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, "only rank 0 logs"
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for stage, offset in (("01-pretrain", 0), ("02-more", 12)):
        name = stage.split("-")[1]
        train = [m for m in metrics(logged, stage) if "lr" in m]
        got = [(e.step, e.value) for e in acc.Scalars(f"{name}/loss")]
        assert got == [(offset + m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in train]
        evals = [m for m in metrics(logged, stage) if "val_loss" in m]
        assert [e.step for e in acc.Scalars(f"{name}/val_bpb")] == [offset + m["step"] for m in evals]
    texts = acc.Tags()["tensors"]
    assert {"recipe/text_summary", "plan/text_summary", "results/text_summary"} <= set(texts)
    results = acc.Tensors("results/text_summary")[-1].tensor_proto.string_val[0].decode()
    final = json.loads((logged / "stages/02-more/final/eval.json").read_text())
    assert "| more |" in results and f"{final['val_loss']:.4f}" in results


def test_wandb_offline_run_has_the_recipe_the_steps_and_the_results(logged):
    runs = list((logged / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "only rank 0 logs"
    (path,) = runs[0].glob("run-*.wandb")
    records = wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["recipe"]["name"] == "tiny" and config["plan"]["world_size"] == 2
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
    losses = {int(h["_step"]): float(h["more/loss"]) for h in history if "more/loss" in h}
    train = [m for m in metrics(logged, "02-more") if "lr" in m]
    assert losses == {12 + m["step"]: pytest.approx(m["loss"], rel=1e-9) for m in train}
    assert any("results/_type" in h for h in history), "the results table"
    assert (logged / "wandb-id.txt").read_text().strip() == run.run_id


def test_a_tracker_that_cannot_start_is_one_warning(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_corpus())
    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE.format(steps=4, every=2).replace(
        "runtime: {log_every: 2}", "runtime: {log_every: 2, trackers: [wandb, tensorboard]}"))
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text("class Settings:\n    def __init__(self, **kw): pass\n\n"
                                   "def init(**kw):\n    raise ConnectionError('no network')\n")
    result = cli("run", "recipe.yaml", cwd=tmp_path, env={"PYTHONPATH": str(fake)})
    assert result.returncode == 0, result.stderr
    assert "warning: runtime.trackers: wandb could not start (no network); training goes on" in result.stdout
    assert list((tmp_path / "runs/tiny/tensorboard").glob("events.*")), "the other tracker still logs"
    (fake / "wandb.py").write_text("raise ImportError('No module named wandb')\n")
    result = cli("run", "recipe.yaml", "--restart", cwd=tmp_path, env={"PYTHONPATH": str(fake)})
    assert result.returncode == 0, result.stderr
    assert "warning: runtime.trackers: wandb is not installed" in result.stdout


def test_after_a_kill_tensorboard_holds_each_step_once(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_corpus())
    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE.format(steps=20, every=10).replace(
        "runtime: {log_every: 2}", "runtime: {log_every: 2, trackers: [tensorboard]}"))
    killed = cli("run", "recipe.yaml", cwd=tmp_path, env={"LLMFORGE_FAULTS": "step:01-pretrain:15=kill"})
    assert killed.returncode < 0, killed.stderr  # after checkpoint 10, with steps 12 and 14 logged
    assert cli("run", "recipe.yaml", cwd=tmp_path).returncode == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs/tiny/tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    train = [m for m in metrics(tmp_path / "runs/tiny", "01-pretrain") if "lr" in m]
    assert [(e.step, e.value) for e in acc.Scalars("pretrain/loss")] == \
        [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in train]
    assert [e.step for e in acc.Scalars("pretrain/val_loss")] == [0, 10, 20]
