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
               step: int = 0, more=None) -> dict:
    """One step over the global batch: this rank's share of its rows (after the objective's
    rollout: grpo samples replies to them, drawing further batches with `more` under dynamic
    sampling), in grad_accum micro-batches, then an optimizer step (objective.updates of them on
    the same rows: grpo's updates_per_rollout). The loss is a mean over the whole global batch's
    units (tokens, pairs), however unevenly the micro-batches and ranks hold them; DDP/FSDP
    average gradients over ranks, so each rank's share is scaled by the world size to make that
    average a sum."""
    d = d or Dist()
    units = objective.units(batch)
    mine = d.shard(batch)

    def refill(need: bool):  # every rank draws the next batch alike when any rank needs more
        agreed = d.all_sum(torch.tensor([float(need)])) if more is not None else torch.zeros(1)
        return d.shard(more()) if agreed.item() > 0 else None

    t = time.perf_counter()
    rows, figures = objective.rollout(unwrap(model), mine, device, amp, step, d.rank, refill)
    if figures:  # grpo's rollout figures, then its update time
        figures["rollout_s"], t = time.perf_counter() - t, time.perf_counter()
    per_micro = sp.micro_batch * _count(rows) // max(1, _count(mine))  # grpo: a prompt's row became G replies
    micros = _split(rows, per_micro)
    totals: dict = {}
    bad = torch.zeros((), device=device)
    for _ in range(objective.updates):
        bad = torch.maximum(bad, _update(model, optimizer, objective, micros, sp, amp, device, d, units, totals))
    done = objective.updates * sum(work(trim(m)) for m in micros)  # what the forwards compute, for tokens/s and MFU
    if "rollout_s" in figures:
        figures["update_s"] = time.perf_counter() - t
        figures = d.union(figures)
    keys = list(totals) + ["skipped"] + list(figures)  # skipped: not finite, so not updated (or stopping)
    host = torch.tensor([*figures.values(), *done], dtype=torch.float32)  # figures and work: known on the host
    if device.type == "cuda":  # copied without waiting for the step to finish
        host = host.pin_memory().to(device, non_blocking=True)
    reduced = d.all_sum(torch.cat([torch.stack([*(totals[k].float() for k in totals), bad]), host]))  # one all-reduce
    out = {k: v / (units * objective.updates if k in totals else d.world) for k, v in zip(keys, reduced)}
    return out | {"work": reduced[len(keys):]}  # summed over ranks


def _update(model, optimizer, objective, micros: list[dict], sp: StagePlan, amp, device, d: Dist, units: int,
            totals: dict) -> torch.Tensor:
    """Gradients of the micro-batches, then one optimizer step; adds the losses' sums to totals.
    Returns 1.0 where the gradients were not finite (on the device)."""
    for i, micro in enumerate(micros):
        with distributed.grad_sync(model, i == len(micros) - 1):
            with amp:
                sums = objective.loss(model, to_device(micro, device))
            (sums["loss"] / (units / d.world)).backward()
        for k, v in sums.items():
            totals[k] = totals.get(k, 0) + v.detach()
    # The norm is of the reduced gradients, so every rank agrees on it. Reading it here would make
    # the host wait for the device every step: fused AdamW skips a non-finite step on the device
    # (found_inf, as under torch's GradScaler), and the host acts on it at the next log line (settle).
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), sp.optimizer["grad_clip"] or float("inf"))
    bad = (~torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)).float()
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = bad
        optimizer.step()
    elif sp.on_nonfinite == "stop" or not bool(bad):  # skip without fused: one sync a step (the plan says so)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return bad


def settle(pending: list[dict], end: int, sp: StagePlan, bad_run: int) -> tuple[dict, int]:
    """The means of the figures of steps end - len(pending) .. end - 1, read from the device at
    once (the one sync of a log line), and the run of non-finite steps so far (from bad_run, the
    run before them). A non-finite step is acted on here rather than when it ran: under
    on_nonfinite: stop it ends the run (exit 2) before any later checkpoint is written; under
    skip, more than max_nonfinite in a row do."""
    keys = list(pending[0])
    table = torch.stack([torch.stack([m[k] for k in keys]) for m in pending])
    *rows, means = torch.cat([table, table.mean(dim=0, keepdim=True)]).tolist()
    for i, row in enumerate(dict(zip(keys, r)) for r in rows):
        step = end - len(rows) + i
        bad_run = bad_run + 1 if row["skipped"] else 0
        if bad_run and sp.on_nonfinite == "stop":
            raise TrainingError(f"stage {sp.name}, step {step}: the gradients are not finite (loss {row['loss']:.4g}); "
                                "stopped, and every checkpoint saved so far is intact",
                                hint="lower optimizer.lr or raise schedule.warmup and run again (it resumes from "
                                     "the last checkpoint), or set runtime.on_nonfinite: skip to drop such steps")
        if bad_run > sp.max_nonfinite:
            raise TrainingError(f"stage {sp.name}, step {step}: the gradients were not finite {bad_run} steps in a row "
                                f"(runtime.max_nonfinite: {sp.max_nonfinite}); stopped, every checkpoint saved so "
                                "far is intact", hint="lower optimizer.lr or raise schedule.warmup and run again")
    return dict(zip(keys, means)), bad_run


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
