"""Token cache, sampler and held-out windows."""

from __future__ import annotations

import numpy as np
import pytest

from llmforge.data.cache import cache_key, prepare_source
from llmforge.data.rows import WindowRows
from llmforge.data.sampler import Sampler, eval_windows
from llmforge.data.spec import SourceSpec
from llmforge.errors import DataError
from llmforge.text.tokenizer import Tokenizer, train_tokenizer

from .conftest import make_corpus


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return Tokenizer.load(train_tokenizer(iter([make_corpus()]), out, type="bpe", vocab_size=320))


def test_prepare_is_cached_and_exact(tmp_path, tok):
    (tmp_path / "a.txt").write_text("hello world. " * 200)
    (tmp_path / "b.txt").write_text(make_corpus(2000))
    spec = SourceSpec(path="*.txt", val_fraction=0.1)
    src = prepare_source("s", spec, tmp_path, tok)
    assert src.documents == 2 and src.tokens.dtype == np.uint16
    assert src.bytes == (tmp_path / "a.txt").stat().st_size + (tmp_path / "b.txt").stat().st_size
    assert (src.tokens == tok.eot_id).sum() == 2  # every document ends with end-of-text
    assert len(src.val) == int(len(src.tokens) * 0.1) and len(src.train) + len(src.val) == len(src.tokens)
    text = tok.decode([t for t in src.tokens.tolist() if t != tok.eot_id])
    assert sorted([text[:2600], text[2600:]]) != [] and "hello world. " * 200 in text
    again = prepare_source("s", spec, tmp_path, tok)
    assert again.path == src.path  # a cache hit: same entry, not re-tokenized


def test_changed_file_or_tokenizer_changes_the_key(tmp_path, tok):
    (tmp_path / "a.txt").write_text("one two three")
    spec = SourceSpec(path="a.txt")
    key = cache_key("s", spec, tmp_path, tok.fingerprint)
    assert cache_key("s", spec, tmp_path, "another-tokenizer") != key
    (tmp_path / "a.txt").write_text("one two four!")
    assert cache_key("s", spec, tmp_path, tok.fingerprint) != key
    assert cache_key("s", SourceSpec(path="a.txt", val_fraction=0.2), tmp_path, tok.fingerprint) != key


def test_bad_sources(tmp_path, tok):
    with pytest.raises(DataError, match="matches no files"):
        prepare_source("s", SourceSpec(path="nothing-*.txt"), tmp_path, tok)
    (tmp_path / "bad.txt").write_bytes(b"fine text \xff\xfe broken")
    with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte offset 10"):
        prepare_source("s", SourceSpec(path="bad.txt"), tmp_path, tok)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        prepare_source("s", SourceSpec(path="empty.txt"), tmp_path, tok)


def test_sampler_resumes_exactly_from_its_state():
    a, b = np.arange(1000, dtype=np.uint16), np.arange(5000, 5500, dtype=np.uint16)
    sources = [(WindowRows(a, 16), 0.75), (WindowRows(b, 16), 0.25)]
    s1 = Sampler(sources, batch_size=64, seed=1, stream=0)
    batches = [s1.next_batch()["tokens"] for _ in range(3)]
    state = s1.state_dict()
    batches += [s1.next_batch()["tokens"] for _ in range(3)]
    s2 = Sampler(sources, batch_size=64, seed=1, stream=0)
    s2.load_state_dict(state)
    assert all(np.array_equal(s2.next_batch()["tokens"], x) for x in batches[3:])
    assert len(str(state)) < 100  # a few counters, whatever the corpus size
    rows = np.concatenate(batches)
    assert rows.shape == (384, 17) and rows.dtype == np.int64
    assert np.all(np.diff(rows, axis=1) == 1)  # contiguous windows
    other = Sampler(sources, batch_size=64, seed=2, stream=0).next_batch()["tokens"]
    assert not np.array_equal(other, batches[0])


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (0.97, 0.02, 0.01), (1 / 3, 1 / 3, 1 / 3)])
def test_realized_token_shares_match_the_weights(weights):
    arrays = [np.full(10_000, i, dtype=np.uint16) for i in range(3)]
    sampler = Sampler([(WindowRows(a, 32), w) for a, w in zip(arrays, weights)], batch_size=24, seed=0, stream=1)
    for steps in (10, 97, 400):
        counts = sum(sampler.counts(n) for n in range(steps))
        assert counts.sum() == steps * 24
        assert np.allclose(counts / counts.sum(), weights, atol=0.01)
    drawn = np.concatenate([sampler.next_batch()["tokens"] for _ in range(97)])
    assert np.allclose(np.bincount(drawn[:, 0], minlength=3) / len(drawn), weights, atol=0.01)


def test_each_epoch_visits_every_window_once():
    arr = np.arange(3300, dtype=np.uint16)  # 3300 tokens: 102 windows of 32 (+1) per epoch
    sampler = Sampler([(WindowRows(arr, 32), 1.0)], batch_size=17, seed=3, stream=0)
    starts = np.concatenate([sampler.next_batch()["tokens"][:, 0] for _ in range(12)])  # 204 windows: two epochs
    first, second = np.sort(starts[:102]), np.sort(starts[102:])
    assert len(set(first.tolist())) == 102 and len(set(second.tolist())) == 102
    assert np.all(np.diff(first) == 32) and np.all(np.diff(second) == 32)  # a full grid, no overlaps
    assert sampler.epochs_drawn()[0] == 2


def test_permutation_is_a_bijection():
    from llmforge.data.sampler import permute

    for n in (1, 2, 3, 17, 1000, 4099):
        assert sorted(permute(np.arange(n), n, key=12345).tolist()) == list(range(n))
    assert permute(np.arange(50), 50, key=1).tolist() != permute(np.arange(50), 50, key=2).tolist()


def test_eval_windows_fixed_and_non_overlapping():
    val = np.arange(1000)
    w = eval_windows(val, seq_len=10, max_tokens=200)
    assert w.shape == (20, 11)
    assert len(set(w[:, 0].tolist())) == 20 and np.all(np.diff(w[:, 0]) >= 10)
    assert eval_windows(np.arange(5), seq_len=10, max_tokens=100).shape == (0, 11)


def test_file_order_does_not_depend_on_where_the_project_is(tmp_path):
    from llmforge.data.sources import list_files

    orders = []
    for where in ("one", "deeper/two"):
        base = tmp_path / where
        for d in "abcdefgh":
            (base / "data" / d).mkdir(parents=True)
            (base / "data" / d / "x.txt").write_text(d)
        files = list_files("s", SourceSpec(path="data/*/x.txt"), base)
        orders.append([p.parent.name for p in files])
    assert orders[0] == orders[1]
