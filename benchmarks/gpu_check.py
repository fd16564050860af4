"""The GPU check: one prepared call that answers the open questions of the CUDA review
(shared/GPU_REVIEW.md) on one H100/H200, in about 8 minutes.

    python3 benchmarks/gpu_check.py --budget 440 --out $OUT    # on the GPU machine (README: Speed)
    python benchmarks/gpu_check.py --dry --out /tmp/gpu_check    # anywhere: tiny shapes on the CPU (CI)
    python benchmarks/gpu_check.py --only attention,sft          # some sections alone

Each section runs in a child process of its own with a time cap, so an out-of-memory error,
a hang or a crash loses that section alone. A section prints `RESULT {json}` lines as it goes,
one per case, so what it measured before a timeout survives it. This process reads them,
writes every line to OUT/gpu_check.log and the results so far to OUT/gpu_check.json (after
each section, so a call killed from outside still leaves them), and runs the sections most
important first, skipping those its --budget no longer leaves time for (the caps add up to
more than 440 s; most sections end well before theirs, and what a budget skipped can run in a
later call with --only).

The sections, their caps on a GPU, and the review's question each settles (§ of the review):
  env         30 s  versions, the device the plan sees (peak, precision, compile), a bf16 8192^3
                    matmul (the real ceiling), SDPA's backend order, rms_norm's autocast dtype (§1.5)
  attention   70 s  llmforge's attention (packed documents, windows, plain causal) against SDPA
                    with a dense boolean mask and the math kernel: which backends take each case,
                    fwd+bwd ms, extra memory, error against fp32; recompiles of a compiled packed
                    call over changing document layouts (§1.2, §1.7, P1)
  pretrain   180 s  a 350M llama at 2048 through the real train_step at the planner's micro-batch,
                    eager then compiled: tokens/s, MFU, first step (compile), peak memory against
                    the plan's estimate, engine against a bare loop, the eval graph (§2, §3, P3, P4)
  sft         60 s  packed rows through the sft objective and to_device's DocLayout, MHA and GQA,
                    at the planner's micro-batch (micro-batch 2 after an out-of-memory error);
                    recompiles of a compiled model over steps of different layouts (§1.2, §1.7)
  adapters    60 s  LoRA eager and compiled, QLoRA (where bitsandbytes imports) eager and compiled,
                    a biased (gpt2) QLoRA; q_proj's input/output dtypes; merged against adapter (§1.5)
  grpo        75 s  generate_batch, then the training forward on the same replies (eager,
                    compiled): the per-token log-prob gap and the share of ratios outside 1 +- 0.2,
                    at init and with the output head sharpened toward a trained model's (§1.4)
  fsdp1       45 s  distributed.wrap's ddp and fsdp branches in a one-rank process group: a few
                    train_steps (two micro-batches each: no_sync) and full_state (§1.3's code path)
  checkpoint  35 s  full_state + save_checkpoint + read_checkpoint of the 350M and its AdamW (P9)

With --dry every section runs on tiny shapes on the CPU in fp32, and "compiled" means dynamo
with its eager backend (graphs, breaks and recompiles as on a GPU, without minutes of C++
builds): it keeps this script working where CI runs (tests/test_gpu_check.py). The exit code
is 0 when every section that started ended by itself (a case's own error is a result), else 1.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the llmforge of this checkout, installed or not

# (name, cap in seconds on a GPU), most important first: the budget drops sections from the end.
SECTIONS = [("env", 30), ("attention", 70), ("pretrain", 180), ("sft", 60), ("adapters", 60), ("grpo", 75),
            ("fsdp1", 45), ("checkpoint", 35)]
DRY_CAP = 120  # a tiny section takes seconds; this only stops a hang
MIN_START = 20  # seconds: a section is not started on less (imports and CUDA start-up alone take ~5)


def run_section(name: str, cap: float, dry: bool, log) -> dict:
    """Run one section in a child process, at most `cap` seconds; its results, and on a crash or
    timeout the exit code and the last lines it printed (a traceback, an OOM message)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name] + (["--dry"] if dry else [])
    start = time.perf_counter()
    # A session of its own, so a timeout kills the section's helpers too (inductor's compile workers).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            bufsize=1, env=os.environ | {"PYTHONUNBUFFERED": "1"}, start_new_session=True)
    results, tail = [], collections.deque(maxlen=30)

    def read():
        for line in proc.stdout:
            log.write(f"[{name} {time.perf_counter() - start:6.1f}s] {line}")
            log.flush()
            if line.startswith("RESULT "):
                try:
                    results.append(json.loads(line[7:]))
                    print(f"  {brief(results[-1])}", flush=True)
                    continue
                except ValueError:
                    pass
            tail.append(line.rstrip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code, timed_out = proc.wait(timeout=cap), False
    except subprocess.TimeoutExpired:
        code, timed_out = None, True
    try:  # the section's group: on a timeout all of it, else what outlived it (compile workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    code = proc.wait() if code is None else code
    reader.join(timeout=10)
    record = {"section": name, "seconds": round(time.perf_counter() - start, 1), "cap_s": round(cap, 1),
              "exit_code": code, "timed_out": timed_out, "results": results}
    if code != 0 or timed_out:
        record["error"] = "\n".join(tail)
    return record


def brief(result: dict) -> str:
    """One line of a result: its case, then its scalar fields (lists and dicts are in the JSON)."""
    def show(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    fields = " ".join(f"{k}={show(v)}" for k, v in result.items()
                      if k != "case" and not isinstance(v, (list, dict)) and v is not None)
    return f"{result.get('case', '?')}: {fields}"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU, fp32 (CI)")
    ap.add_argument("--budget", type=float, default=440, help="seconds for all sections (default 440)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")),
                    help="folder for gpu_check.json and gpu_check.log (default $OUT)")
    ap.add_argument("--only", help="comma-separated sections to run, in the usual order")
    ap.add_argument("--section", help=argparse.SUPPRESS)  # a child: run this section here
    args = ap.parse_args()
    if args.section:
        import gpu_check_sections  # this folder is on sys.path when run as a script

        gpu_check_sections.run(args.section, dry=args.dry)
        return 0
    wanted = args.only.split(",") if args.only else [name for name, _ in SECTIONS]
    unknown = set(wanted) - {name for name, _ in SECTIONS}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {', '.join(name for name, _ in SECTIONS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"dry": args.dry, "budget_s": args.budget, "argv": sys.argv[1:],
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": []}
    start, ok = time.perf_counter(), True
    with open(args.out / "gpu_check.log", "w") as log:
        for name, cap in SECTIONS:
            if name not in wanted:
                continue
            left = args.budget - (time.perf_counter() - start)
            if left < MIN_START:
                record = {"section": name, "skipped": f"budget: {max(left, 0):.0f} s left of {args.budget:.0f}",
                          "results": []}
                print(f"[{name}] skipped ({record['skipped']})", flush=True)
            else:
                cap = min(DRY_CAP if args.dry else cap, left)
                print(f"[{name}] (cap {cap:.0f} s)", flush=True)
                record = run_section(name, cap, args.dry, log)
                status = "timed out" if record["timed_out"] else "ok" if record["exit_code"] == 0 \
                    else f"failed (exit {record['exit_code']})"
                print(f"[{name}] {status} in {record['seconds']} s, {len(record['results'])} results", flush=True)
                if "error" in record:
                    print("    " + record["error"].strip().replace("\n", "\n    ")[-1500:], flush=True)
                ok &= status == "ok"
            report["sections"].append(record)
            report["seconds"] = round(time.perf_counter() - start, 1)
            write_json(args.out / "gpu_check.json", report)
    print(f"\n{'section':11} {'status':10} {'s':>6} results")
    for r in report["sections"]:
        status = "skipped" if "skipped" in r else "timed out" if r["timed_out"] else \
            "ok" if r["exit_code"] == 0 else f"exit {r['exit_code']}"
        print(f"{r['section']:11} {status:10} {r.get('seconds', 0):6.1f} {len(r['results'])}")
    print(f"total {report['seconds']} s; {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.log'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
