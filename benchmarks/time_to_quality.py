"""Time to quality on character-level Tiny Shakespeare: llmforge's recipes/shakespeare-char.yaml
against nanoGPT's CPU configuration (benchmarks/nanogpt_reference.py), run back to back.

    python benchmarks/time_to_quality.py [--data ../shared/data/tinyshakespeare.txt] [--repeat 3]

The target is nanoGPT's quoted validation loss 1.8857 nats per character = 2.7205 bits per byte
(the text is ASCII). llmforge's clock starts before the `llmforge run` process does, with an empty
token cache and run directory, so start-up, tokenizer training and data preparation count. Its
time to target is the first eval at or below the target (the time is in metrics.jsonl); the final
model is then measured on the whole held-out 10% (not timed). Medians over --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_BPB = 1.8857 / math.log(2)  # 2.7205


def run_llmforge(data: Path, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, LLMFORGE_CACHE=str(work / "cache"))
    cmd = [sys.executable, "-m", "llmforge", "run", str(ROOT / "recipes/shakespeare-char.yaml"),
           "--set", f"data.shakespeare.path={data}", "--run-dir", str(work / "run")]
    start = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    wall = time.time() - start
    if done.returncode:
        sys.exit(f"llmforge failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (work / "run/stages/01-pretrain/metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["time"] - start, r["val_bpb"]) for r in records if "val_bpb" in r]
    reached = next((t for _, t, bpb in curve if bpb <= TARGET_BPB), None)
    tokens = max(r["step"] for r in records) * json.loads((work / "run/plan.json").read_text())["stages"][0][
        "batch_tokens"]
    return {"wall_s": wall, "to_target_s": reached, "curve": curve, "val_bpb_sampled": curve[-1][2],
            "val_bpb_full": full_split_bpb(work / "run", data), "tokens": tokens}


def full_split_bpb(run: Path, data: Path) -> float:
    """The final model on every window of the held-out split (the last 10% of the token stream,
    as llmforge splits it), bits per byte of the predicted characters."""
    import numpy as np
    import torch

    from llmforge.store.final import load_trained

    model, tok = load_trained(run / "stages/01-pretrain/final")
    ids = tok.encode(data.read_text()) + [tok.eot_id]
    val = torch.tensor(ids[len(ids) - int(len(ids) * 0.1):])
    T = model.config.seq_len
    n = (len(val) - 1) // T
    x, y = val[:n * T].view(n, T), val[1:n * T + 1].view(n, T)
    nats = 0.0
    with torch.no_grad():
        for i in range(0, n, 256):
            logits = model(x[i:i + 256])
            nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + 256].flatten(), reduction="sum").item()
    return nats / math.log(2) / float(np.asarray(tok.token_bytes)[y.numpy()].sum())


def run_reference(data: Path) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/nanogpt_reference.py"), "--data", str(data)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the reference failed:\n{done.stderr[-2000:]}")
    result = json.loads(re.search(r"^RESULT (.*)$", done.stdout, re.M).group(1))
    result["curve"] = [(int(m[0]), float(m[1]), float(m[4])) for m in
                       re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", done.stdout, re.M)]
    result["to_target_s"] = next((t for _, t, bpb in result["curve"] if bpb <= TARGET_BPB), None)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/tinyshakespeare.txt")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each, alternating; medians reported")
    args = ap.parse_args()
    data = args.data.resolve()
    if not data.is_file():
        sys.exit(f"{data}: no such file (download Tiny Shakespeare and pass --data)")
    ours, refs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            ours.append(run_llmforge(data, Path(tmp) / "llmforge"))
            print(f"llmforge run {i + 1}: {ours[-1]['wall_s']:.1f} s, final val_bpb {ours[-1]['val_bpb_full']:.4f}",
                  flush=True)
            refs.append(run_reference(data))
            print(f"reference run {i + 1}: {refs[-1]['wall_s']:.1f} s, final val_bpb {refs[-1]['val_bpb_full']:.4f}",
                  flush=True)

    print("\nllmforge eval curve (last run): step, seconds from start, val_bpb")
    for step, t, bpb in ours[-1]["curve"]:
        print(f"  {step:>5} {t:>7.1f} {bpb:>8.4f}")

    def med(runs, key):
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    def cell(value, fmt):
        return format(value, fmt) + "s" if value is not None else "not reached"

    rows = [("nanoGPT reference (4x128 GPT-2, AdamW)", refs), ("llmforge shakespeare-char", ours)]
    print(f"\ntarget val_bpb <= {TARGET_BPB:.4f}; medians of {args.repeat} run(s) each, back to back")
    print(f"{'':40} {'to target':>10} {'total wall':>11} {'tokens':>10} {'val_bpb (eval)':>15} {'val_bpb (whole)':>16}")
    for name, runs in rows:
        print(f"{name:40} {cell(med(runs, 'to_target_s'), '.1f'):>11} {med(runs, 'wall_s'):>10.1f}s "
              f"{med(runs, 'tokens'):>10,.0f} {med(runs, 'val_bpb_sampled'):>15.4f} {med(runs, 'val_bpb_full'):>16.4f}")
    ref_wall, our_wall = med(refs, "wall_s"), med(ours, "wall_s")
    print(f"\nllmforge's whole run takes {our_wall / ref_wall:.2f}x the reference's wall time "
          f"(target: under 0.5x, i.e. {ref_wall / 2:.1f} s); its final model is at {med(ours, 'val_bpb_full'):.4f} "
          f"bpb on the whole held-out split")


if __name__ == "__main__":
    main()
