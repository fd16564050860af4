"""What the sections of benchmarks/gpu_check.py share: the device as llmforge's plan sees it,
the shapes, the RESULT lines, timing and memory, one training step through llmforge's own
train_step, and packed rows. Only public llmforge names are used."""

from __future__ import annotations

import functools
import gc
import json
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from llmforge.data.rows import IGNORE
from llmforge.model.families import PRESETS
from llmforge.model.transformer import ModelConfig
from llmforge.plan.devices import Device, detect_device
from llmforge.run.step import autocast, train_step

# AdamW as a recipe's defaults would plan it (grad_clip is read by train_step from the stage plan).
ADAMW = {"name": "adamw", "lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


@dataclass
class Ctx:
    dry: bool
    dev: torch.device
    device: Device  # what the plan sees of this machine: precision, compile, peak FLOP/s, memory
    amp: object  # the engine's autocast for that device (bf16 on a GPU, none in fp32)

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"

    @property
    def gqa(self) -> int:
        """KV heads of the grouped-query cases: 16 query heads share 4 (Llama 3's 4:1), 4 share 2 in --dry."""
        return 2 if self.dry else 4

    @property
    def docs(self) -> tuple[int, int]:
        """Documents a packed row holds, at least and at most (packed sft's 3-9; 2-3 in --dry,
        where each group of lengths is more for dynamo to trace on a CPU)."""
        return (2, 3) if self.dry else (3, 9)


def setup(dry: bool) -> Ctx:
    if dry:  # tiny shapes gain nothing from a second thread, and on a busy CI machine its waits cost
        torch.set_num_threads(1)
    # detect_device reads only these four runtime keys; "auto" is what a recipe leaves them at.
    runtime = SimpleNamespace(device="cpu" if dry else "auto", threads="auto", precision="auto", compile="auto")
    device = detect_device(runtime)
    if device.type != "cuda" and not dry:
        raise SystemExit("no CUDA device: the real shapes need a GPU (use --dry on a CPU)")
    if device.type == "cuda":  # as engine.run_stage: fp32 matmuls outside autocast as TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if dry:  # inductor on a CPU builds C++ for minutes; dynamo's eager backend still traces every
        torch.compile = functools.partial(torch.compile, backend="eager")  # graph, break and recompile
    return Ctx(dry, torch.device(device.type), device, autocast(device))


def config(ctx: Ctx, **over) -> ModelConfig:
    """The review's ~350M llama (24 layers x 1024, 16 heads of 64, vocab 32000) at seq_len 2048,
    as benchmarks/gpu.py's; with --dry 2 layers x 64 at 128. `over` changes any field."""
    base = dict(vocab_size=256, seq_len=128, n_layer=2, n_head=4, n_embd=64) if ctx.dry else \
        dict(vocab_size=32000, seq_len=2048, n_layer=24, n_head=16, n_embd=1024)
    return ModelConfig(**(PRESETS["llama"] | base | over))


def report(case: str, **fields) -> None:
    """One result: a line the parent process reads as it comes (it survives a later timeout)."""
    def digits(v):  # 4 significant digits are all a timing or a ratio holds
        return float(f"{v:.4g}") if isinstance(v, float) else [digits(x) for x in v] if isinstance(v, list) else v
    print("RESULT " + json.dumps({"case": case} | {k: digits(v) for k, v in fields.items()}, default=str), flush=True)


def error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:400]}" if lines else type(e).__name__


def attempt(case: str, fn, *args, **kw):
    """Run one case; an error (an OOM, a refused kernel, a bitsandbytes crash) is its result,
    and the section goes on. The case's tensors die with its frame, then the cache is emptied."""
    try:
        return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - any failure is a finding
        report(case, error=error_text(e))
        return None
    finally:
        free()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def reset_peak(ctx: Ctx) -> int:
    """Start a peak-memory window; the bytes allocated now (0 on a CPU, where it is not measured)."""
    if not ctx.cuda:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak(ctx: Ctx, since: int = 0) -> int | None:
    return torch.cuda.max_memory_allocated() - since if ctx.cuda else None


def gib(n: float | None) -> float | None:
    return None if n is None else n / 2**30


def mib(n: float | None) -> float | None:
    return None if n is None else n / 2**20


def fresh_dynamo() -> None:
    """Forget every compiled graph and count from zero (reset() alone keeps the counters)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def dynamo_stats() -> dict:
    """Graphs dynamo compiled since fresh_dynamo(), and its graph breaks."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(breaks.values()),
            "break_reasons": [r[:160] for r in list(breaks)[:4]]}


def stage_plan(micro: int) -> SimpleNamespace:
    """The keys of a StagePlan that train_step reads."""
    return SimpleNamespace(name="gpu_check", micro_batch=micro, optimizer={"grad_clip": 1.0},
                           on_nonfinite="stop", max_nonfinite=10)


def train(ctx: Ctx, step_model, optimizer, objective, batch: dict, micro: int, steps: int) -> tuple[list, float]:
    """(seconds of each optimizer step, the last loss) through llmforge's train_step: its host
    copies, micro-batches, clipping and syncs, as the engine's loop calls it."""
    times, out = [], {}
    for i in range(steps):
        start = time.perf_counter()
        out = train_step(step_model, optimizer, objective, batch, stage_plan(micro), ctx.amp, ctx.dev, step=i)
        sync(ctx)
        times.append(time.perf_counter() - start)
    return times, float(out["loss"])


def measure_steps(ctx: Ctx, step_model, optimizer, objective, batch: dict, micro: int,
                  steps: int) -> tuple[float, list, float, int | None]:
    """(the first step's seconds, each later step's, the last loss, peak bytes allocated): one
    step apart (compilation, autotuning, the allocator's warm-up), then `steps` timed."""
    reset_peak(ctx)
    first, _ = train(ctx, step_model, optimizer, objective, batch, micro, 1)
    times, loss = train(ctx, step_model, optimizer, objective, batch, micro, steps)
    return first[0], times, loss, peak(ctx)


def token_rows(rng, rows: int, seq_len: int, vocab: int) -> np.ndarray:
    """[rows, seq_len + 1] random ids: pretraining windows (the data pipeline is not measured)."""
    return rng.integers(0, vocab, (rows, seq_len + 1), dtype=np.int64)


def random_docs(rng, rows: int, seq_len: int, count: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """([rows, seq_len] document ids as packed sft rows hold them, [rows] positions used): `count`
    documents of random lengths a row, then a little padding, a document of its own (data/rows.py)."""
    docs, used = np.zeros((rows, seq_len), dtype=np.int64), np.zeros(rows, dtype=np.int64)
    for r in range(rows):
        n, used[r] = int(rng.integers(count[0], count[1] + 1)), seq_len - int(rng.integers(0, seq_len // 16 + 1))
        cuts = np.sort(rng.choice(np.arange(1, used[r]), n - 1, replace=False))
        docs[r, :used[r]] = np.searchsorted(cuts, np.arange(used[r]), side="right")
        docs[r, used[r]:] = n
    return docs, used


def packed_rows(rng, rows: int, seq_len: int, vocab: int, count: tuple[int, int]) -> dict:
    """Packed sft rows (inputs, targets, docs) as PackedRows makes them: in each conversation
    the second half is learned (the reply), the rest and the padding are IGNORE."""
    docs, used = random_docs(rng, rows, seq_len, count)
    inputs = rng.integers(0, vocab, (rows, seq_len), dtype=np.int64)
    targets = np.full((rows, seq_len), IGNORE, dtype=np.int64)
    for r in range(rows):
        starts = np.flatnonzero(np.diff(docs[r, :used[r]], prepend=-1))
        for s, e in zip(starts, np.append(starts[1:], used[r])):
            half = (s + e) // 2
            targets[r, half:e - 1] = inputs[r, half + 1:e]
    return {"inputs": inputs, "targets": targets, "docs": docs}
