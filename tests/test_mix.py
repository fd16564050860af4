"""A three-source recipe end to end: text folder + jsonl + built-in, exact mix, per-source eval,
skipped records reported, epochs cap, and exact resume with a mix."""

from __future__ import annotations

import json
import signal

import pytest

from llmforge.data import cache
from llmforge.data.sources import Skips
from llmforge.data.spec import SourceSpec

from .conftest import cli, make_corpus
from .test_run import start, wait_for_step

RECIPE = """\
name: mix
seed: 3
tokenizer: {type: bpe, vocab_size: 400, sample_bytes: 300k}
model: {preset: llama, n_layer: 2, n_head: 2, n_embd: 32, seq_len: 32}
data:
  notes: {path: notes/, split: paragraph, val_fraction: 10%}
  chat:  {path: chat.jsonl, format: jsonl, field: body, on_error: skip, val_fraction: 10%}
  code:  {builtin: python-stdlib, max_bytes: 200k, val_fraction: 10%}
stages:
  - name: pretrain
    kind: pretrain
    mix: {notes: 0.5, chat: 0.3, code: 0.2}
    steps: 30
    batch_tokens: 320
    optimizer: {lr: 3e-3}
    eval: {every: 10, tokens: 960}
    checkpoint: {every: 10, keep: 2}
runtime: {log_every: 5}
"""


@pytest.fixture
def mixdir(tmp_path):
    (tmp_path / "notes").mkdir()
    for i in range(3):
        (tmp_path / "notes" / f"n{i}.txt").write_text(make_corpus(3000, seed=i))
    lines = [json.dumps({"body": make_corpus(60, seed=100 + i), "id": i}) for i in range(300)]
    lines[7] = '{"body": "cut off'  # malformed: skipped and counted
    lines[9] = json.dumps({"text": "wrong field"})
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path


def test_three_sources_train_with_per_source_eval(mixdir):
    result = cli("run", "recipe.yaml", cwd=mixdir)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout  # the plan's table gains skipped/filtered columns
    records = [json.loads(line) for line in (mixdir / "runs/mix/stages/01-pretrain/metrics.jsonl").read_text().splitlines()]
    first = records[0]
    assert first["step"] == 0 and first["data/chat/skipped"] == 2
    final = [r for r in records if "val_loss" in r][-1]
    for name in ("notes", "chat", "code"):
        assert final[f"val/{name}/bpb"] > 0
    plan = json.loads((mixdir / "runs/mix/plan.json").read_text())
    mix = {s["name"]: s for s in plan["stages"][0]["mix"]}
    assert mix["chat"]["skipped"] == 2 and mix["chat"]["take_tokens"] == round(30 * 320 * 0.3)
    # Resume mid-stage with a mix: the same bytes as the run above.
    reference = (mixdir / "runs/mix/stages/01-pretrain/final/model.safetensors").read_bytes()
    proc = start(mixdir, "--run-dir", "again")
    wait_for_step(mixdir, proc, 15, metrics="again/stages/01-pretrain/metrics.jsonl")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = cli("run", "recipe.yaml", "--run-dir", "again", cwd=mixdir)
    assert result.returncode == 0, result.stderr
    assert (mixdir / "again/stages/01-pretrain/final/model.safetensors").read_bytes() == reference


def test_epochs_cap_is_a_plan_error(mixdir):
    result = cli("prepare", "recipe.yaml", "--set", "data.chat.epochs=0.01", cwd=mixdir)
    assert result.returncode == 2
    assert "stages[0].mix.chat: the stage takes 2,880 tokens from 'chat'" in result.stderr
    assert "data.chat.epochs allows 0.01" in result.stderr


def test_bad_record_without_skip_names_file_and_line(mixdir):
    result = cli("prepare", "recipe.yaml", "--set", "data.chat.on_error=fail", cwd=mixdir)
    assert result.returncode == 2
    assert f"{mixdir / 'chat.jsonl'}:8: malformed JSON" in result.stderr and "Traceback" not in result.stderr


def test_interrupted_preparation_leaves_no_entry(tmp_path, monkeypatch):
    from llmforge.text.tokenizer import Tokenizer, train_tokenizer

    tok = Tokenizer.load(train_tokenizer(iter([make_corpus()]), tmp_path / "tok", type="bpe", vocab_size=300))
    (tmp_path / "a.txt").write_text(make_corpus(40000))
    spec = SourceSpec(path="a.txt", split="line")
    real = cache.iter_pieces

    def dying(*args, **kwargs):
        for i, piece in enumerate(real(*args, **kwargs)):
            if i == 200:
                raise KeyboardInterrupt  # as Ctrl-C halfway through
            yield piece

    monkeypatch.setattr(cache, "iter_pieces", dying)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare_source("a", spec, tmp_path, tok, workers=1)
    assert cache.find_source("a", spec, tmp_path, tok) is None  # nothing that looks valid
    monkeypatch.setattr(cache, "iter_pieces", real)
    src = cache.prepare_source("a", spec, tmp_path, tok, workers=1)
    assert src.documents > 200  # more than the interrupted attempt got through
    assert not list((cache.cache_dir() / "tokens").glob(".tmp-*"))  # leftovers of dead runs cleaned
    assert Skips().summary() == ""
