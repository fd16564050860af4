"""The progress line's rates: evals and the first step are timed apart, the ETA adds the evals
still to come, MFU appears when the device's peak is known."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import numpy as np
import torch

import llmforge.run.timing as timing
from llmforge.data.rows import IGNORE, work

STEP = torch.tensor([1000.0, 1200.0, 5e4, 300.0])  # a step's work: real tokens, positions, attention, logits


def flops(positions, attention, logits):
    return 6e6 * positions + 10.0 * attention + 1e3 * logits


def test_rates_eta_and_mfu(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    sp = SimpleNamespace(steps=100, batch_tokens=1000, eval_every=50, eval_tokens=6000)
    timer = timing.Timer(0, sp, flops, peak_flops=1e12, devices=2)
    with timer.evaluating():  # the step-0 eval: 4 s, not training time
        clock[0] += 4.0
    clock[0] += 10.0  # the first step (compilation): apart
    timer.step_done(1, 2 * STEP)  # its work counts in no rate
    for step in range(2, 11):  # nine steps of 0.5 s
        clock[0] += 0.5
        timer.step_done(step, STEP)
    r = timer.rates(10)
    assert r["tokens_per_s"] == 2000.0 and r["first_step_s"] == 10.0  # real tokens, not batch_tokens' 1000 a step
    assert r["mfu"] == pytest.approx(flops(*(9 * STEP[1:]).tolist()) / 4.5 / 2e12)
    # 90 steps at 0.5 s, and two evals to come (step 50 and the end). The step-0 eval paid for
    # warm-up, so until another is timed an eval is a forward over 6000 tokens: a third of 3 s.
    assert r["eta_s"] == 90 * 0.5 + 2 * 1.0
    clock[0] += 5.0
    for step in range(11, 21):
        timer.step_done(step, STEP)
    r = timer.rates(20)
    assert "first_step_s" not in r and r["tokens_per_s"] == 2000.0
    with timer.evaluating():  # a second eval: its measured time counts from now on
        clock[0] += 2.0
    clock[0] += 5.0
    for step in range(21, 31):
        timer.step_done(step, STEP)
    assert timer.rates(30)["eta_s"] == 70 * 0.5 + 2 * 2.0


def test_no_mfu_without_a_known_peak(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    timer = timing.Timer(0, SimpleNamespace(steps=10, batch_tokens=10, eval_every=0, eval_tokens=10), flops, None, 1)
    clock[0] += 1
    timer.step_done(1, STEP)
    assert "mfu" not in timer.rates(1) and timer.rates(1).get("eta_s") is None


def test_work_counts_real_tokens_positions_attention_and_logits():
    """Padding is no token: a packed row counts its documents' positions, attention their
    squares; pair rows count both sides up to each reply's end; logits only where learned."""
    targets = np.full((2, 8), IGNORE)
    targets[0, 1:3], targets[0, 4:6], targets[1, 0:3] = 5, 5, 5
    docs = np.array([[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1]])
    packed = {"inputs": np.zeros((2, 8), dtype=np.int64), "targets": targets, "docs": docs}
    # row 0 used through position 5 (docs of 3 and 3), row 1 through 2 (one doc of 3)
    assert work(packed).tolist() == [6 + 3, 16, 9 + 9 + 9, 4 + 3]
    learned = np.zeros((1, 8), dtype=bool)
    learned[0, 2:4] = True
    pairs = {"chosen": np.zeros((1, 9), dtype=np.int64), "chosen_learned": learned,
             "rejected": np.zeros((1, 9), dtype=np.int64), "rejected_learned": np.roll(learned, 2, axis=1)}
    assert work(pairs).tolist() == [4 + 6, 16, 16 + 36, 4]
    assert work({"tokens": np.zeros((3, 9), dtype=np.int64)}).tolist() == [24, 24, 3 * 64, 24]  # pretraining windows
