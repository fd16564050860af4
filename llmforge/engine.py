"""The engine: runs a Plan, one stage after another, one step after another.

It knows nothing about YAML. Each stage starts from the previous stage's final weights; each
resumes from its latest complete checkpoint; finished stages are skipped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import clean_temporary, list_checkpoints, load_checkpoint, load_weights, save_checkpoint, save_weights
from .data import Sampler, eval_windows
from .errors import CheckpointError, Interrupted
from .model import Transformer
from .optim import build_optimizer, lr_at
from .plan import Plan, StagePlan
from .stages import OBJECTIVES


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, saves, then stops."""
    signum: int = 0

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.signum:  # a second signal: stop now, the last complete checkpoint stands
                raise KeyboardInterrupt
            self.signum = signum
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


@dataclass
class Context:
    plan: Plan
    run_dir: Path
    tokenizer: object
    sources: dict  # name -> PreparedSource
    reporter: object
    stop: StopFlag = field(default_factory=StopFlag)
    lock: object = None  # the run directory's lock, held while the run lives


def run_stages(ctx: Context) -> None:
    previous = None
    with ctx.stop.installed():
        for sp in ctx.plan.stages:
            final = stage_dir(ctx.run_dir, sp) / "final"
            if not (final / "model.safetensors").is_file():
                run_stage(ctx, sp, init_from=previous)
            else:
                ctx.reporter.note(f"stage {sp.name}: already done ({final})")
            previous = final


def stage_dir(run_dir: Path, sp: StagePlan) -> Path:
    return run_dir / "stages" / sp.dir_name


def run_stage(ctx: Context, sp: StagePlan, init_from: Path | None) -> None:
    plan, device = ctx.plan, torch.device(ctx.plan.device.type)
    root = stage_dir(ctx.run_dir, sp)
    clean_temporary(root)
    clean_temporary(root / "checkpoints")
    torch.manual_seed(plan.seed + sp.index)  # the same initial weights on every machine
    model = Transformer(plan.model)
    if init_from is not None:
        load_weights(model, init_from / "model.safetensors")
    model.to(device)
    opt = sp.optimizer
    optimizer = build_optimizer(model, opt["name"], sp.lr, opt["betas"], opt["eps"], opt["weight_decay"])
    sampler = Sampler([(ctx.sources[s.name].train, s.weight) for s in sp.mix], sp.seq_len,
                      sp.global_batch, plan.seed, sp.index)
    evals = {s.name: eval_windows(ctx.sources[s.name].val, sp.seq_len, sp.eval_tokens // len(sp.mix))
             for s in sp.mix}
    identity = _identity(ctx, sp)
    start, losses, last_eval = _resume(ctx, sp, identity, model, optimizer, sampler)
    step_model = torch.compile(model) if plan.device.compile else model
    objective, amp = OBJECTIVES[sp.kind], _autocast(plan.device)

    def save(step: int) -> None:
        if step != start:  # at `start` the state is exactly the checkpoint just loaded
            save_checkpoint(root / "checkpoints", step, model, optimizer, identity | {
                "stage": sp.name, "sampler": sampler.state_dict(), "pending_losses": [x.item() for x in losses],
                "last_eval": last_eval}, sp.checkpoint_keep)

    ctx.reporter.stage_start(sp, start, root / "metrics.jsonl")
    timer = Timer(start)
    for step in range(start, sp.steps + 1):
        if ctx.stop.signum:
            save(step)
            raise Interrupted(ctx.stop.signum, f"stopped at step {step} of stage {sp.name}; checkpoint saved")
        if step in (0, sp.steps) or (sp.eval_every and step % sp.eval_every == 0):
            last_eval = evaluate(step_model, evals, ctx.tokenizer.token_bytes, sp.micro_batch, device, amp)
            ctx.reporter.log_eval(step, last_eval | (_dropped(ctx, sp) if step == 0 else {}))
        if step == sp.steps:
            break
        if sp.checkpoint_every and step % sp.checkpoint_every == 0:
            save(step)
        lr = lr_at(step, peak=sp.lr, warmup=sp.warmup_steps, total=sp.steps, decay=sp.decay, min_lr=sp.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.from_numpy(sampler.next_batch()).to(device, non_blocking=True)
        losses.append(train_step(step_model, optimizer, objective, batch, sp, amp))
        if (step + 1) % sp.log_every == 0 or step + 1 == sp.steps:
            loss = torch.stack(losses).mean().item()  # one host sync per log, not per step
            ctx.reporter.log(step + 1, {"loss": loss, "lr": lr, **timer.rates(step + 1, sp)})
            losses.clear()
    save(sp.steps)
    write_final(root / "final", model, ctx, sp)
    ctx.reporter.stage_end(sp)


def _dropped(ctx: Context, sp: StagePlan) -> dict:
    """Records the data preparation left out, logged once with the stage's first eval."""
    out = {}
    for s in sp.mix:
        if s.skipped or s.filtered:
            out |= {f"data/{s.name}/skipped": s.skipped, f"data/{s.name}/filtered": s.filtered}
    return out


def _identity(ctx: Context, sp: StagePlan) -> dict:
    """What a checkpoint must agree on to be resumed: inputs (refused if changed) and the
    machine binding (allowed to change: same math, but no longer bitwise identical)."""
    d = ctx.plan.device
    return {"tokenizer": ctx.tokenizer.fingerprint,
            "data": {s.name: ctx.sources[s.name].path.name for s in sp.mix},  # content-addressed keys
            "plan_hash": sp.math_hash(), "machine": f"{d.type}, {d.precision}, {d.threads} threads"}


def _resume(ctx: Context, sp: StagePlan, identity: dict, model, optimizer, sampler):
    """Load the latest complete checkpoint, if any: (start step, pending losses, last eval)."""
    checkpoints = list_checkpoints(stage_dir(ctx.run_dir, sp) / "checkpoints")
    if not checkpoints:
        return 0, [], {}
    state = load_checkpoint(checkpoints[-1], model, optimizer)
    changed = [f"data source {n!r}" for n, key in state.get("data", {}).items() if identity["data"].get(n) != key]
    if state.get("tokenizer") != identity["tokenizer"]:
        changed.insert(0, "the tokenizer")
    if changed:
        raise CheckpointError(f"stage {sp.name}: {' and '.join(changed)} changed since {checkpoints[-1]} was "
                              "saved; resuming would train on different tokens",
                              hint="restore the original data, or use --restart to start over")
    if (state.get("plan_hash"), state.get("machine")) != (identity["plan_hash"], identity["machine"]):
        ctx.reporter.note(f"stage {sp.name}: resuming on a different setup ({state.get('machine')} -> "
                          f"{identity['machine']}, or another micro-batch): same math, not bitwise identical")
    sampler.load_state_dict(state["sampler"])
    ctx.reporter.note(f"stage {sp.name}: resuming from {checkpoints[-1].name}")
    losses = [torch.tensor(x, dtype=torch.float32) for x in state.get("pending_losses", [])]
    return state["step"], losses, state.get("last_eval", {})


def train_step(model, optimizer, objective, batch: torch.Tensor, sp: StagePlan, amp) -> torch.Tensor:
    """One optimizer step over the global batch, in grad_accum micro-batches."""
    total = torch.zeros((), device=batch.device)
    for micro in batch.split(sp.micro_batch):
        with amp:
            loss = objective.loss(model, micro) / sp.grad_accum
        loss.backward()
        total += loss.detach()
    if sp.optimizer["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), sp.optimizer["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(model, windows: dict[str, np.ndarray], token_bytes: np.ndarray, micro_batch: int,
             device, amp) -> dict:
    """Held-out loss in nats/token and bits per UTF-8 byte, overall and per source."""
    from .stages.pretrain import token_losses

    model.eval()
    out, nats_all, tokens_all, bytes_all = {}, 0.0, 0, 0
    for name, win in windows.items():
        if not len(win):
            continue
        # Bits per byte of *text*: targets that decode to no bytes (end-of-text) count in neither sum.
        counted = torch.from_numpy(token_bytes[win[:, 1:]] > 0)
        nats = 0.0
        for rows in np.array_split(np.arange(len(win)), math.ceil(len(win) / micro_batch)):
            with amp:
                losses = token_losses(model, torch.from_numpy(win[rows]).to(device))
            nats += losses.double().cpu()[counted[rows]].sum().item()
        n_bytes = int(token_bytes[win[:, 1:]].sum())
        n_tokens = int(counted.sum())
        out[f"val/{name}/loss"] = nats / n_tokens
        out[f"val/{name}/bpb"] = nats / math.log(2) / max(n_bytes, 1)
        nats_all, tokens_all, bytes_all = nats_all + nats, tokens_all + n_tokens, bytes_all + n_bytes
    model.train()
    if not tokens_all:
        return {}
    return {"val_loss": nats_all / tokens_all, "val_bpb": nats_all / math.log(2) / max(bytes_all, 1)} | out


def write_final(final: Path, model, ctx: Context, sp: StagePlan) -> None:
    """The stage's loadable model: weights, config and tokenizer, renamed into place at once."""
    tmp = final.parent / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / "model.safetensors")
    config = {"model": ctx.plan.model.to_dict(), "stage": sp.name, "kind": sp.kind,
              "tokenizer_fingerprint": ctx.tokenizer.fingerprint}
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copyfile(ctx.tokenizer.path, tmp / "tokenizer.model")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _autocast(device):
    if device.precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if device.precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


class Timer:
    """Tokens/s and ETA from the wall time between log lines."""

    def __init__(self, step: int):
        self.step, self.time = step, time.perf_counter()

    def rates(self, step: int, sp: StagePlan) -> dict:
        now = time.perf_counter()
        elapsed, done = now - self.time, step - self.step
        tokens_per_s = done * sp.batch_tokens / max(elapsed, 1e-9)
        self.step, self.time = step, now
        return {"tokens_per_s": tokens_per_s, "eta_s": (sp.steps - step) * sp.batch_tokens / max(tokens_per_s, 1e-9)}
