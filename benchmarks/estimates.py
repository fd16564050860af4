"""Are the plan's estimates true? For each stage of a recipe: the plan's peak memory against the
measured growth of the process's resident memory (CPU) or torch's peak allocation (GPU), the
plan's time against the stage's wall time, and the ETA shown after 20 steps against the time the
stage then really took.

    python benchmarks/estimates.py recipes/quickstart.yaml
    python benchmarks/estimates.py recipes/shakespeare-char.yaml --set data.shakespeare.path=PATH

Targets: memory within +/-25%, the ETA at step 20 within +/-20%.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from rich.console import Console

import llmforge.run.engine as engine
from llmforge.output.progress import Reporter
from llmforge.recipe.loader import load_recipe
from llmforge.run.prepare import prepare_run


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def _trim() -> None:
    """Hand freed heap memory back to the OS, so that what an earlier stage freed but the process
    kept does not hide this stage's growth (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class _Peak:
    """The highest resident memory seen by a thread sampling every 2 ms."""

    def __init__(self):
        self.value, self.at = 0, 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def reset(self, value: int) -> None:
        self.value, self.at = value, time.time()

    def _run(self):
        while True:
            now = _rss()
            if now > self.value:
                self.value, self.at = now, time.time()
            time.sleep(0.002)


def measure(recipe: str | Path, overrides: list[str] = (), run_dir: Path | None = None) -> list[dict]:
    """Run the recipe in this process; per stage, the plan's figures and the measured ones."""
    peak, rows = _Peak(), []
    run_stage = engine.run_stage

    importlib.import_module("torch._dynamo")  # the first optimizer imports it: ~100 MB, not training memory

    def measured(ctx, sp, init_from):
        gc.collect()
        _trim()
        cuda = ctx.plan.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else _rss()
        peak.reset(base)
        start = time.time()
        run_stage(ctx, sp, init_from)
        grew = (torch.cuda.max_memory_allocated() if cuda else peak.value) - base
        records = [json.loads(line) for line in
                   (engine.stage_dir(ctx.run_dir, sp) / "metrics.jsonl").read_text().splitlines()]
        at20 = next((r for r in records if r.get("step") == 20 and "eta_s" in r), None)
        rows.append({"stage": sp.name, "est_memory": sp.est_peak_memory_bytes, "memory": grew,
                     "est_time": sp.est_time_s, "time": time.time() - start, "peak_at": peak.at - start,
                     "eta20": at20 and at20["eta_s"], "after20": at20 and records[-1]["time"] - at20["time"]})

    engine.run_stage = measured
    try:
        with tempfile.TemporaryDirectory() as tmp:
            reporter = Reporter(Console(quiet=True), live=False)
            ctx = prepare_run(load_recipe(recipe, list(overrides)), run_dir or Path(tmp) / "run", reporter, restart=True)
            try:
                engine.run_stages(ctx)
            finally:
                reporter.close()
    finally:
        engine.run_stage = run_stage
    return rows


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        sys.exit(__doc__)
    overrides = [a for i, a in enumerate(args) if i and args[i - 1] == "--set"]
    rows = measure(args[0], overrides)
    mib = 2 ** 20
    print(f"{args[0]}")
    print(f"{'stage':10} {'plan MiB':>9} {'measured':>9} {'ratio':>6} | {'plan s':>7} {'wall s':>7} | "
          f"{'ETA@20 s':>8} {'then took':>9} {'ratio':>6} | peak at s")
    for r in rows:
        eta = (f"{r['eta20']:>8.1f} {r['after20']:>9.1f} {r['eta20'] / r['after20']:>6.2f}" if r["eta20"]
               else f"{'-':>8} {'-':>9} {'-':>6}")
        est_time = f"{r['est_time']:>7.1f}" if r["est_time"] else f"{'-':>7}"
        print(f"{r['stage']:10} {r['est_memory'] / mib:>9.1f} {r['memory'] / mib:>9.1f} "
              f"{r['est_memory'] / r['memory']:>6.2f} | {est_time} {r['time']:>7.1f} | {eta} | {r['peak_at']:.1f}")


if __name__ == "__main__":
    main()
