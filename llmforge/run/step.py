"""One optimizer step and one held-out evaluation: what the engine's loop (engine.py) calls, on
any objective (stages/kind.py), in one process or one rank of several."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import torch

from ..data.rows import trim, work
from ..errors import TrainingError
from ..model.weights import eager, unwrap
from ..stages.kind import to_device
from . import distributed
from .distributed import Dist

if TYPE_CHECKING:
    from ..plan.plan import StagePlan


def train_step(model, optimizer, objective, batch: dict, sp: StagePlan, amp, device, d: Dist | None = None,
               step: int = 0) -> dict:
    """One optimizer step over the global batch: this rank's share of its rows (after the
    objective's rollout: grpo samples replies to them), in grad_accum micro-batches. The loss is
    a mean over the whole global batch's units (tokens, pairs), however unevenly the
    micro-batches and ranks hold them; DDP/FSDP average gradients over ranks, so each rank's
    share is scaled by the world size to make that average a sum."""
    d = d or Dist()
    units = objective.units(batch)
    mine = d.shard(batch)
    t = time.perf_counter()
    rows, figures = objective.rollout(unwrap(model), mine, device, amp, step, d.rank)
    if figures:  # grpo's rollout figures, then its update time
        figures["rollout_s"], t = time.perf_counter() - t, time.perf_counter()
    per_micro = sp.micro_batch * _count(rows) // max(1, _count(mine))  # grpo: a prompt's row became G replies
    micros = _split(rows, per_micro)
    totals: dict = {}
    done = sum(work(trim(m)) for m in micros)  # what the forwards compute, for tokens/s and MFU
    for i, micro in enumerate(micros):
        with distributed.grad_sync(model, i == len(micros) - 1):
            with amp:
                sums = objective.loss(model, to_device(micro, device))
            (sums["loss"] / (units / d.world)).backward()
        for k, v in sums.items():
            totals[k] = totals.get(k, 0) + v.detach()
    # The norm is of the reduced gradients, so every rank takes the same branch below.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), sp.optimizer["grad_clip"] or float("inf"))
    finite = bool(torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))  # one sync
    if not finite and sp.on_nonfinite == "stop":
        loss = (totals["loss"] / units).item()
        raise TrainingError(f"stage {sp.name}, step {step}: the gradients are not finite (loss {loss:.4g}); "
                            "stopped before updating, so every checkpoint saved so far is intact",
                            hint="lower optimizer.lr or raise schedule.warmup and run again (it resumes from "
                                 "the last checkpoint), or set runtime.on_nonfinite: skip to drop such steps")
    if finite:
        optimizer.step()
    # skip: the update is dropped; so many in a row that training is not recovering is the stop above.
    optimizer.nonfinite_run = 0 if finite else getattr(optimizer, "nonfinite_run", 0) + 1
    if optimizer.nonfinite_run > sp.max_nonfinite:
        raise TrainingError(f"stage {sp.name}, step {step}: the gradients were not finite {optimizer.nonfinite_run} "
                            f"steps in a row (runtime.max_nonfinite: {sp.max_nonfinite}); stopped, every checkpoint "
                            "saved so far is intact", hint="lower optimizer.lr or raise schedule.warmup and run again")
    optimizer.zero_grad(set_to_none=True)
    figures["skipped"] = 0.0 if finite else 1.0  # on_nonfinite: skip, the update dropped
    if "rollout_s" in figures:
        figures["update_s"] = time.perf_counter() - t
    keys = list(totals) + list(figures)
    host = torch.tensor([*figures.values(), *done], dtype=torch.float32)  # figures and work: known on the host
    if device.type == "cuda":  # copied without waiting for the step to finish
        host = host.pin_memory().to(device, non_blocking=True)
    reduced = d.all_sum(torch.cat([torch.stack([totals[k].float() for k in totals]), host]))  # one all-reduce
    out = {k: v / (units if k in totals else d.world) for k, v in zip(keys, reduced)}
    return out | {"work": reduced[len(keys):]}  # summed over ranks


@torch.no_grad()
def evaluate(model, objective, batches: dict[str, dict], micro_batch: int, device, amp) -> dict:
    """Held-out metrics (pretrain/sft: loss in nats/token and bits per UTF-8 byte; dpo: loss and
    reward accuracy/margin), overall and per source."""
    model.eval()
    out, total = {}, {}
    for name, batch in batches.items():
        sums: dict = {}
        for micro in _split(batch, micro_batch) if len(next(iter(batch.values()))) else []:
            with amp, eager():
                for k, v in objective.eval_sums(model, to_device(micro, device)).items():
                    sums[k] = sums.get(k, 0) + v
        out |= {f"val/{name}/{k}": v for k, v in objective.summarize(sums).items()}
        for k, v in sums.items():
            total[k] = total.get(k, 0) + v
    model.train()
    return {f"val_{k}": v for k, v in objective.summarize(total).items()} | out


def _split(batch: dict, size: int) -> list[dict]:
    n = _count(batch)
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, max(1, size))]


def _count(batch: dict) -> int:
    return len(next(iter(batch.values())))


def autocast(device):
    """The autocast context of the plan's device and precision (none in fp32)."""
    if device.precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if device.precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()
