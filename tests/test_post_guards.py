"""Post-training guards: what must never silently train on the wrong thing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmforge.data.rows import Examples, PairRows, layout
from llmforge.errors import CheckpointError, RecipeError
from llmforge.stages.dpo import attach_reference


def pairs(seqs: list[list[int]], prompt_len: int) -> Examples:
    """Preference pairs (chosen, rejected, chosen, ...) sharing a prompt of prompt_len tokens."""
    tokens = np.concatenate([np.asarray(s) for s in seqs])
    learned = np.concatenate([np.arange(len(s)) >= prompt_len for s in seqs]).astype(np.uint8)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    return Examples(tokens, learned, offsets, 2, lambda i: f"prefs.jsonl:{i + 1}")


def test_a_pair_cut_to_the_same_tokens_learns_nothing():
    # Rejected = chosen + a rambling tail: cut to 5 tokens, the two sides are the same.
    ex = pairs([[1, 2, 3, 4, 10], [1, 2, 3, 4, 10, 11], [1, 2, 3, 7], [1, 2, 3, 8]], prompt_len=3)
    lay = layout(ex, 4, packing=False, overlong="truncate", train_on="assistant", seed=0)
    assert lay.empty.tolist() == [0]  # a plan error under truncate
    lay = layout(ex, 4, packing=False, overlong="drop", train_on="assistant", seed=0)
    assert lay.keep.tolist() == [1] and lay.dropped == 1 and not len(lay.empty)


def test_a_stale_reference_is_recomputed_or_refused(tmp_path):
    ex = pairs([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7], [1, 2, 6, 8]], prompt_len=2)
    train = {"prefs": PairRows(ex, 8, overlong="truncate", seed=0)}
    evals = {"prefs": (PairRows(ex, 8, overlong="drop", seed=0), 1)}
    calls = []

    def reference(batch):
        calls.append(len(batch["chosen"]))
        return np.full((len(batch["chosen"]), 2), -float(len(calls)), dtype=np.float32)

    class Model:  # only switched between eval and train modes
        def eval(self):
            return self

        def train(self):
            return self

    path = tmp_path / "reference.npz"
    attach_reference(path, {"data": "a"}, train, evals, reference, 4, Model())
    assert calls and train["prefs"].reference[:, 0].tolist() == [-1.0, -1.0]
    n = len(calls)
    attach_reference(path, {"data": "a"}, train, evals, reference, 4, Model())  # resumed: reused
    assert len(calls) == n
    attach_reference(path, {"data": "b"}, train, evals, reference, 4, Model())  # other data: recomputed
    assert len(calls) > n
    with pytest.raises(CheckpointError, match="do not match"):  # eval never recomputes it
        attach_reference(path, {"data": "c"}, train, evals, None, 4)
    path.write_bytes(b"PK\x03\x04 cut short by a crash")
    with pytest.raises(CheckpointError):
        attach_reference(path, {"data": "b"}, train, evals, None, 4)


def test_the_tokenizer_under_trained_stages_is_never_retrained(tmp_path):
    from llmforge.recipe.loader import validate_recipe
    from llmforge.run.prepare import ensure_tokenizer

    (tmp_path / "a.txt").write_text("some text to train a tokenizer on, " * 400)
    (tmp_path / "b.txt").write_text("other words entirely for the second source. " * 400)
    raw = {"name": "t", "tokenizer": {"vocab_size": 300},
           "model": {"n_layer": 1, "n_head": 1, "n_embd": 8, "seq_len": 16},
           "data": {"a": {"path": "a.txt"}, "b": {"path": "b.txt"}},
           "stages": [{"name": "p", "kind": "pretrain", "mix": {"a": 1.0}, "steps": 1, "batch_tokens": 16}]}

    def recipe(data):
        r = validate_recipe(data)
        r._base_dir = tmp_path
        return r

    class Quiet:
        def task(self, *a):
            import contextlib
            return contextlib.nullcontext()

    run = tmp_path / "run"
    run.mkdir()
    ensure_tokenizer(recipe(raw), run, Quiet())
    (run / "stages" / "01-p").mkdir(parents=True)  # the stage has started
    more = json.loads(json.dumps(raw))
    more["stages"].append({"name": "q", "kind": "pretrain", "mix": {"b": 1.0}, "steps": 1, "batch_tokens": 16})
    with pytest.raises(RecipeError, match="trained on sources") as e:
        ensure_tokenizer(recipe(more), run, Quiet())
    assert "['a']" in e.value.hint
    more["tokenizer"]["train_on"] = ["a"]  # the hint's way out keeps the old tokenizer
    ensure_tokenizer(recipe(more), run, Quiet())
