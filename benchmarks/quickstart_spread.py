"""How much the quickstart's results table moves with the seed and the thread count.

    python benchmarks/quickstart_spread.py [--recipe recipes/quickstart.yaml] [--seeds 1 2 3 4 5]
                                           [--threads 2] [--out /tmp/llmforge-spread]

Runs the whole recipe once per (seed, threads), each in its own run directory (the token cache
is shared, so data is tokenized once), then prints each stage's task columns per run and their
mean, min, max and spread (max - min, in points), and whether the ordering the README's table
argues for holds in every run:
  sft's format is above pretrain's (sft teaches the answer format);
  every post-training stage's correct is above pretrain's (they answer from stored facts);
  the last stage's concise is above sft's (preference tuning removes the rambling habit).
Other seeds give other weights and data orders; other thread counts other float rounding, as
another CPU would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("world-qa/format", "world-qa/correct", "world-qa/concise")


def run_once(recipe: Path, seed: int, threads: int, out: Path) -> list[dict]:
    run_dir = out / f"seed{seed}-t{threads}"
    done = run_dir / "results.json"
    if done.is_file():  # an earlier invocation's run: reuse it
        return json.loads(done.read_text())
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "llmforge", "run", str(recipe), "--run-dir", str(run_dir), "--restart",
           "--set", f"seed={seed}", "--set", f"runtime.threads={threads}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"seed {seed}, {threads} threads failed:\n{result.stderr[-2000:]}")
    from llmforge.store.final import stage_results

    results = stage_results(run_dir)
    print(f"seed {seed}, {threads} threads: {time.perf_counter() - start:.0f} s", flush=True)
    done.write_text(json.dumps(results))
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--threads", type=int, nargs="+", default=[min(2, os.cpu_count() or 1)])
    ap.add_argument("--out", default="/tmp/llmforge-spread")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {(s, t): run_once(ROOT / args.recipe, s, t, out) for t in args.threads for s in args.seeds}
    stages = [r["stage"] for r in next(iter(runs.values()))]
    print(f"\n{args.recipe}: task columns per run (seed, threads), then mean and spread (max - min)")
    for stage in stages:
        for col in COLUMNS:
            values = [next(r for r in rs if r["stage"] == stage).get(col) for rs in runs.values()]
            if None in values:
                continue
            cells = " ".join(f"{v:4.0%}" for v in values)
            print(f"  {stage:<10} {col.split('/')[1]:<8} {cells}   mean {statistics.mean(values):4.0%}  "
                  f"min {min(values):4.0%}  max {max(values):4.0%}  spread {100 * (max(values) - min(values)):4.1f}")
    first, last = stages[0], stages[-1]
    sft = next((s for s in stages if s == "sft"), stages[min(1, len(stages) - 1)])

    def get(rs, stage, col):
        return next(r for r in rs if r["stage"] == stage).get(col, 0.0)
    claims = {
        f"{sft} format > {first} format": [get(rs, sft, COLUMNS[0]) > get(rs, first, COLUMNS[0]) for rs in runs.values()],
        f"post-training correct > {first} correct": [all(get(rs, s, COLUMNS[1]) > get(rs, first, COLUMNS[1])
                                                          for s in stages[1:] if COLUMNS[1] in
                                                          next(r for r in rs if r["stage"] == s)) for rs in runs.values()],
        f"{last} concise > {sft} concise": [get(rs, last, COLUMNS[2]) > get(rs, sft, COLUMNS[2]) for rs in runs.values()],
    }
    print("orderings:")
    for claim, held in claims.items():
        print(f"  {claim}: {sum(held)} of {len(held)} runs")


if __name__ == "__main__":
    main()
