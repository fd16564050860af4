"""Training speed as the progress line shows it: tokens/s, model FLOPs utilization, and an ETA.

Evals are timed apart from training (they are not training throughput, and the ETA adds the
ones still to come at their measured cost). The first step is timed apart too: it holds
torch.compile's compilation, or allocator and kernel warm-up, and would skew both rates.
"""

from __future__ import annotations

import contextlib
import time


class Timer:
    """Rates from what the steps really computed (data/rows.py work: real tokens, not padding;
    model FLOPs of the positions, attention and logits done, frozen weights at 4 FLOPs, not 6),
    summed on the device and read at the log cadence only."""

    def __init__(self, step: int, sp, flops, peak_flops: float | None, devices: int):
        self.sp, self.flops = sp, flops  # flops(positions, attention, logits) -> FLOPs
        self.peak = peak_flops * devices if peak_flops else None
        self.work = self.first_work = None  # [tokens, positions, attention, logits] since the last log line
        self.first_step_s: float | None = None  # the first step's time (compilation, warm-up)
        self.mark_step, self.mark = step, time.perf_counter()  # the current log interval
        self.train_s, self.train_steps = 0.0, 0  # since the first step: the ETA's rate
        self.evals_s: list[float] = []  # each eval's duration
        self.paused_s = 0.0  # eval time inside the current interval

    @contextlib.contextmanager
    def evaluating(self):
        start = time.perf_counter()
        yield
        self.evals_s.append(time.perf_counter() - start)
        self.paused_s += self.evals_s[-1]

    def step_done(self, step: int, work) -> None:
        """Call after each optimizer step (1-based count of steps done) with what it computed."""
        if self.first_step_s is None:
            now = time.perf_counter()
            self.first_step_s, self.first_work = now - self.mark - self.paused_s, work
            self.mark_step, self.mark, self.paused_s = step, now, 0.0
        else:
            self.work = work if self.work is None else self.work + work

    def rates(self, step: int) -> dict:
        now = time.perf_counter()
        elapsed, done = now - self.mark - self.paused_s, step - self.mark_step
        self.mark_step, self.mark, self.paused_s = step, now, 0.0
        out = {}
        if done == 0 and self.first_step_s:  # a log line right after the first step
            out["tokens_per_s"] = float(self.first_work[0]) / self.first_step_s
        if done > 0:
            self.train_s, self.train_steps = self.train_s + elapsed, self.train_steps + done
            tokens, positions, attention, logits = (float(x) for x in self.work.tolist())  # one sync a log line
            self.work = None
            out["tokens_per_s"] = tokens / max(elapsed, 1e-9)
            if self.peak:
                out["mfu"] = self.flops(positions, attention, logits) / max(elapsed, 1e-9) / self.peak
        if self.train_steps:
            remaining = self.sp.steps - step
            every = self.sp.eval_every
            # the final eval, plus one at each multiple of eval_every strictly between here and the end
            evals = 1 + (max(0, (self.sp.steps - 1) // every - step // every) if every else 0)
            out["eta_s"] = remaining * self.train_s / self.train_steps + evals * self._eval_cost()
        if self.first_step_s is not None and self.train_steps == done:  # the first log line of the stage
            out["first_step_s"] = self.first_step_s
        return out

    def _eval_cost(self) -> float:
        """The last eval's time, once there has been one after the stage's first (which pays for
        warm-up, so it can take several times longer); until then, a forward pass over the eval
        tokens at a third of the time a training step spends per token."""
        if len(self.evals_s) >= 2:
            return self.evals_s[-1]
        return self.sp.eval_tokens * self.train_s / (self.train_steps * self.sp.batch_tokens) / 3
