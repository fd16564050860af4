"""The progress line's rates: evals and the first step are timed apart, the ETA adds the evals
still to come, MFU appears when the device's peak is known."""

from __future__ import annotations

from types import SimpleNamespace

import llmforge.run.timing as timing


def test_rates_eta_and_mfu(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    sp = SimpleNamespace(steps=100, batch_tokens=1000, eval_every=50, eval_tokens=6000)
    timer = timing.Timer(0, sp, flops_per_token=6e6, peak_flops=1e12, devices=2)
    with timer.evaluating():  # the step-0 eval: 4 s, not training time
        clock[0] += 4.0
    clock[0] += 10.0  # the first step (compilation): apart
    timer.step_done(1)
    for step in range(2, 11):  # nine steps of 0.5 s
        clock[0] += 0.5
        timer.step_done(step)
    r = timer.rates(10)
    assert r["tokens_per_s"] == 2000.0 and r["first_step_s"] == 10.0
    assert r["mfu"] == 2000.0 * 6e6 / 2e12
    # 90 steps at 0.5 s, and two evals to come (step 50 and the end). The step-0 eval paid for
    # warm-up, so until another is timed an eval is a forward over 6000 tokens: a third of 3 s.
    assert r["eta_s"] == 90 * 0.5 + 2 * 1.0
    clock[0] += 5.0
    r = timer.rates(20)
    assert "first_step_s" not in r and r["tokens_per_s"] == 2000.0
    with timer.evaluating():  # a second eval: its measured time counts from now on
        clock[0] += 2.0
    clock[0] += 5.0
    assert timer.rates(30)["eta_s"] == 70 * 0.5 + 2 * 2.0


def test_no_mfu_without_a_known_peak(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    timer = timing.Timer(0, SimpleNamespace(steps=10, batch_tokens=10, eval_every=0, eval_tokens=10), 1e6, None, 1)
    clock[0] += 1
    timer.step_done(1)
    assert "mfu" not in timer.rates(1) and timer.rates(1).get("eta_s") is None
