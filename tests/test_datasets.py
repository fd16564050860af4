"""Hugging Face datasets as sources, and `format: auto`: a folder save_to_disk wrote, a Hub dataset
from the `datasets` cache offline, parquet records, and each format told by its first record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmforge.data.detect import detect
from llmforge.data.pieces import iter_documents
from llmforge.data.sources import Skips
from llmforge.data.spec import SourceSpec
from llmforge.errors import DataError

from .conftest import cli
from .hf_families import hub_dataset_cache

datasets = pytest.importorskip("datasets")

PAIRS = [(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(40)]
SHAREGPT = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in PAIRS]


def recipe(source: str) -> str:
    return ("name: ds\ntokenizer: {type: char, vocab_size: 64, byte_fallback: false, chat_template: default}\n"
            "model: {preset: llama, n_layer: 2, n_head: 2, n_embd: 32, seq_len: 32}\n"
            f"data:\n  chat: {source}\n"
            "stages:\n  - {name: sft, kind: sft, mix: {chat: 1.0}, steps: 3, batch_size: 2, eval: {every: 0}}\n"
            "runtime: {log_every: 1}\n")


def fake_hub_cache(tmp_path: Path, rows: list[dict], repo: str) -> Path:
    return hub_dataset_cache(tmp_path / "hf-cache", repo, rows)


def test_a_saved_dataset_and_a_cached_hub_dataset_train_as_the_same_jsonl(tmp_path):
    """The same records as JSON lines, as a folder save_to_disk wrote and as a Hub dataset in the
    datasets cache (offline), each with no format given: the same tokens, so the same losses."""
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SHAREGPT))
    datasets.Dataset.from_list(SHAREGPT).save_to_disk(str(tmp_path / "saved"))
    cache = fake_hub_cache(tmp_path, SHAREGPT, "someorg/chatset")
    env = {"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    losses = {}
    for name, source in [("jsonl", "{path: chat.jsonl}"), ("saved", "{path: saved}"), ("hub", "{hf: someorg/chatset}")]:
        (tmp_path / "recipe.yaml").write_text(recipe(source))
        result = cli("run", "recipe.yaml", "--run-dir", f"runs/{name}", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "format auto: sharegpt" in result.stdout, result.stdout
        metrics = (tmp_path / f"runs/{name}/stages/01-sft/metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in metrics if '"loss"' in line]
    assert len(losses["jsonl"]) == 3 and losses["jsonl"] == losses["saved"] == losses["hub"], losses


def test_a_dataset_with_splits_reads_the_one_named(tmp_path):
    rows = [{"text": f"document number {i}"} for i in range(6)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "dd"))
    spec = SourceSpec(path="dd", format="parquet", split="test")
    assert list(iter_documents("s", spec, tmp_path)) == ["document number 4", "document number 5"]
    with pytest.raises(DataError) as e:
        list(iter_documents("s", SourceSpec(path="dd", format="parquet", split="validation"), tmp_path))
    assert e.value.message == f"data.s.split: {tmp_path / 'dd'} has no split 'validation' (splits: train, test)"


def test_a_hub_dataset_not_in_the_cache_offline_is_one_line_naming_how_to_fetch_it(tmp_path):
    (tmp_path / "recipe.yaml").write_text(recipe("{hf: nobody/nothing-here, revision: v2}"))
    result = cli("plan", "recipe.yaml", cwd=tmp_path,
                 env={"HF_DATASETS_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "error: data.chat.hf: 'nobody/nothing-here' is not in the datasets cache and HF_HUB_OFFLINE is set",
        "hint: fetch it on a machine with internet (`hf download --repo-type dataset nobody/nothing-here "
        "--revision v2`, or run once online) and copy the Hugging Face cache here"]


def test_a_changed_hub_dataset_is_tokenized_again(tmp_path, monkeypatch):
    """The token cache keys a Hub dataset by its files' contents: a new version (new shards in the
    cache) is tokenized again, an unchanged one is found."""
    import huggingface_hub

    for module in (datasets.config, huggingface_hub.constants):  # HF_HUB_OFFLINE=1, as read at import
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    from llmforge.data.cache import find_source, prepare_source
    from llmforge.text.tokenizer import Tokenizer, train_tokenizer

    from .conftest import make_corpus

    tok = Tokenizer.load(train_tokenizer(iter([make_corpus()]), tmp_path / "tok", type="bpe", vocab_size=320))
    spec = SourceSpec(hf="someorg/docs", format="parquet")
    counts = []
    for n in (5, 6):
        cache = fake_hub_cache(tmp_path / str(n), [{"text": f"document number {i}"} for i in range(n)], "someorg/docs")
        monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
        assert find_source("docs", spec, tmp_path, tok) is None  # not tokenized yet
        counts.append(prepare_source("docs", spec, tmp_path, tok).documents)
        assert find_source("docs", spec, tmp_path, tok) is not None
    assert counts == [5, 6]


def test_parquet_records_are_read_as_conversations(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"instruction": "Say hi", "input": "", "output": "Hi"}, {"instruction": "", "input": "", "output": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    from llmforge.data.formats import read_examples
    from llmforge.data.sources import SourceReport

    skips = Skips()
    spec = SourceSpec(path="a.parquet", format="alpaca", on_error="skip")
    got = list(read_examples(tmp_path / "a.parquet", spec, SourceReport("s", spec, skips)))
    assert got == [(f"{tmp_path / 'a.parquet'}: row 1", [{"role": "user", "content": "Say hi"},
                                                          {"role": "assistant", "content": "Hi"}])]
    assert skips.examples == [f"{tmp_path / 'a.parquet'}: row 2: field 'instruction' is empty"]


@pytest.mark.parametrize("record, fmt, settings", [
    ({"messages": [{"role": "user", "content": "a"}]}, "chat", {}),
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt", {}),
    ({"conversations": [{"role": "user", "content": "a"}]}, "chat", {"field": "conversations"}),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca", {}),
    ({"prompt": "a", "response": "b"}, "prompt_response", {}),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference", {}),
    ({"prompt": "a", "completion": "b", "label": True}, "unpaired", {}),
    ({"prompt": "a", "answer": "b"}, "prompt", {}),
    ({"text": "a", "id": 3}, "jsonl", {}),
    ({"id": 3}, None, {}),
])
def test_auto_tells_each_format_by_its_fields(record, fmt, settings):
    assert detect(record)[:2] == (fmt, settings)


@pytest.mark.parametrize("record, error", [
    ({"prompt": "a", "chosen": "b", "rejected": "c"},  # a shape the stage cannot train on
     "stages[0].mix.chat: an sft stage trains on chat, sharegpt, alpaca or prompt_response data; source 'chat' is "
     "preference (format auto)"),
    ({"question": "a", "gold": "b"},  # no shape it knows
     "data.chat.format: auto cannot tell the format of x.jsonl's records (fields: question, gold)"),
])
def test_auto_names_what_it_cannot_use(tmp_path, record, error):
    (tmp_path / "x.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "recipe.yaml").write_text(recipe("{path: x.jsonl}"))
    result = cli("plan", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines()[0] == f"error: {error}", result.stderr


def test_every_record_left_out_is_counted_by_its_reason_in_the_plan_and_the_metrics(tmp_path):
    lines = []
    for i, (q, a) in enumerate(PAIRS):
        turns = [{"from": "human", "value": q}, {"from": "bot" if i % 7 == 0 else "gpt", "value": a}]
        lines.append(json.dumps({"conversations": [turns[0]] + turns if i % 11 == 1 else turns}))
    (tmp_path / "chat.jsonl").write_text("\n".join(lines + ["{oops", json.dumps({"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})]) + "\n")
    (tmp_path / "recipe.yaml").write_text(recipe("{path: chat.jsonl, on_error: skip, min_chars: 8}"))
    result = cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("chat left out: 6 conversations[i]: unknown speaker 'bot'; 4 conversations[i]: two 'user' turns in "
            "a row; 1 malformed JSON; 1 shorter than min_chars (8)") in result.stdout, result.stdout
    first = json.loads((tmp_path / "runs/ds/stages/01-sft/metrics.jsonl").read_text().splitlines()[0])
    assert {k: v for k, v in first.items() if k.startswith("data/")} == {
        "data/chat/skipped": 11, "data/chat/filtered": 1,
        "data/chat/left_out/conversations_i_unknown_speaker_bot": 6,
        "data/chat/left_out/conversations_i_two_user_turns_in_a_row": 4,
        "data/chat/left_out/malformed_json": 1, "data/chat/left_out/shorter_than_min_chars_8": 1}


def test_conversations_tokenize_the_same_in_worker_processes(tmp_path, monkeypatch):
    """A large conversation source is rendered and encoded by worker processes, a batch each:
    the cache entry is byte for byte the one a single process writes (Jinja template included)."""
    import numpy as np

    from llmforge.data.cache import prepare_source
    from llmforge.text.chat_jinja import JinjaTemplate, NAMED
    from llmforge.text.tokenizer import Tokenizer, train_tokenizer

    from .conftest import make_corpus

    template = JinjaTemplate(NAMED["chatml"]["jinja"], NAMED["chatml"]["specials"], origin="chatml")
    tok = Tokenizer.load(train_tokenizer(iter([make_corpus()]), tmp_path / "tok", type="bpe", vocab_size=320,
                                         user_symbols=template.symbols))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SHAREGPT * 10))
    spec = SourceSpec(path="chat.jsonl", format="sharegpt")
    entries = []
    for workers in (1, 2):
        monkeypatch.setenv("LLMFORGE_CACHE", str(tmp_path / f"cache-{workers}"))
        src = prepare_source("chat", spec, tmp_path, tok, workers=workers, template=template)
        entries.append([np.asarray(src.tokens), np.asarray(src.learned), src.offsets, src.origins])
    assert len(entries[0][2]) == 401 and all(np.array_equal(a, b) for a, b in zip(*entries))
