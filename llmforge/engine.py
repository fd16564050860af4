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
from .data.rows import WindowRows, example_rows
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
    sources: dict  # name -> PreparedSource or PreparedExamples
    template: object  # the chat template (chat.ChatTemplate), or None
    reporter: object
    stop: StopFlag = field(default_factory=StopFlag)
    lock: object = None  # the run directory's lock, held while the run lives


def run_stages(ctx: Context) -> None:
    with ctx.stop.installed():
        for sp in ctx.plan.stages:
            final = stage_dir(ctx.run_dir, sp) / "final"
            if not (final / "model.safetensors").is_file():
                init = next((stage_dir(ctx.run_dir, p) / "final" for p in ctx.plan.stages if p.name == sp.init), None)
                run_stage(ctx, sp, init_from=init)
            else:
                ctx.reporter.note(f"stage {sp.name}: already done ({final})")


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
        _check_init(init_from, ctx.tokenizer.fingerprint)
        load_weights(model, init_from / "model.safetensors")
    model.to(device)
    opt = sp.optimizer
    optimizer = build_optimizer(model, opt["name"], sp.lr, opt["betas"], opt["eps"], opt["weight_decay"])
    objective, amp = OBJECTIVES[sp.kind](sp, ctx.tokenizer.token_bytes), _autocast(plan.device)
    train, evals = stage_rows(ctx.sources, sp, plan.seed)
    if sp.kind == "dpo":  # before resuming: the reference is the stage's starting weights
        attach_reference(root / "reference.npz", reference_identity(ctx.tokenizer, ctx.sources, sp), train, evals,
                         lambda batch: objective.reference(model, _to(batch, device)), sp.micro_batch, model, amp)
    evals = eval_batches(evals)
    sampler = Sampler([(train[s.name], s.weight) for s in sp.mix], sp.global_batch, plan.seed, sp.index)
    identity = _identity(ctx, sp)
    start, pending, last_eval = _resume(ctx, sp, identity, model, optimizer, sampler)
    step_model = torch.compile(model) if plan.device.compile else model

    def save(step: int) -> None:
        if step != start:  # at `start` the state is exactly the checkpoint just loaded
            save_checkpoint(root / "checkpoints", step, model, optimizer, identity | {
                "stage": sp.name, "sampler": sampler.state_dict(),
                "pending": [{k: v.item() for k, v in m.items()} for m in pending], "last_eval": last_eval},
                sp.checkpoint_keep)

    ctx.reporter.stage_start(sp, start, root / "metrics.jsonl")
    timer = Timer(start)
    for step in range(start, sp.steps + 1):
        if ctx.stop.signum:
            save(step)
            raise Interrupted(ctx.stop.signum, f"stopped at step {step} of stage {sp.name}; checkpoint saved")
        if step in (0, sp.steps) or (sp.eval_every and step % sp.eval_every == 0):
            last_eval = evaluate(step_model, objective, evals, sp.micro_batch, device, amp)
            ctx.reporter.log_eval(step, last_eval | (_dropped(ctx, sp) if step == 0 else {}))
        if step == sp.steps:
            break
        if sp.checkpoint_every and step % sp.checkpoint_every == 0:
            save(step)
        lr = lr_at(step, peak=sp.lr, warmup=sp.warmup_steps, total=sp.steps, decay=sp.decay, min_lr=sp.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pending.append(train_step(step_model, optimizer, objective, sampler.next_batch(), sp, amp, device))
        if (step + 1) % sp.log_every == 0 or step + 1 == sp.steps:
            means = {k: torch.stack([m[k] for m in pending]).mean().item() for k in pending[0]}  # one sync per log
            ctx.reporter.log(step + 1, means | {"lr": lr, **timer.rates(step + 1, sp)})
            pending.clear()
    save(sp.steps)
    results = dict(last_eval)
    if sp.tasks:
        from .tasks import run_tasks

        scores = run_tasks(sp.tasks, model.eval(), ctx.tokenizer, ctx.template)
        ctx.reporter.log_eval(sp.steps, scores)
        results |= scores
    write_final(root / "final", model, ctx, sp, results)
    ctx.reporter.stage_end(sp)


def stage_rows(sources: dict, sp: StagePlan, seed: int) -> tuple[dict, dict]:
    """Per mixed source: the stage's training row source, and its held-out (row source, rows to
    evaluate) — the same layout rules as training, but held-out examples too long are dropped."""
    train, evals = {}, {}
    share = sp.eval_tokens // len(sp.mix)
    for s in sp.mix:
        src, T, o = sources[s.name], sp.seq_len, sp.options
        if sp.kind == "pretrain":
            train[s.name] = WindowRows(src.train, T)
            evals[s.name] = (None, {"tokens": eval_windows(src.val, T, share)})
        else:
            train[s.name] = example_rows(sp.kind, src.train, T, o, seed)
            val = example_rows(sp.kind, src.val, T, o, seed, overlong="drop")
            per_row = 2 * T if sp.kind == "dpo" else T
            evals[s.name] = (val, min(val.n_rows, max(1, share // per_row)))
    return train, evals


def eval_batches(evals: dict) -> dict:
    """{source: held-out batch} from stage_rows' (row source, count) pairs (pretrain: the batch)."""
    return {name: n if rows is None else rows.rows(np.arange(n)) for name, (rows, n) in evals.items()}


def attach_reference(path: Path, identity: dict, train: dict, evals: dict, reference, micro_batch: int,
                     model=None, amp=contextlib.nullcontext()) -> None:
    """The frozen reference's log-probs of every pair, computed once by `reference(batch)` from
    the stage's starting weights (before any training step) and kept in the stage folder with
    what they were computed from, so a resume reuses them and anything else recomputes them.
    With model None (llmforge eval: the weights at hand are not the reference) a missing or
    stale file is an error."""
    sets = {f"train/{n}": r for n, r in train.items()} | {f"val/{n}": r for n, (r, _) in evals.items()}
    stamp = json.dumps(identity, sort_keys=True)
    try:
        with np.load(path) as saved:
            stored = {k: saved[k] for k in sets}
            fresh = str(saved["identity"]) == stamp and all(len(stored[k]) == r.n_rows for k, r in sets.items())
    except Exception:  # missing, half-written by a crash, or from another version: compute again
        fresh = False
    if not fresh and model is None:
        raise CheckpointError(f"{path}: the dpo reference's log-probs are missing or do not match this data",
                              hint="run the recipe again (with --restart if the data changed)")
    if not fresh:
        model.eval()
        stored = {}
        for key, rows in sets.items():
            parts = [np.zeros((0, 2), dtype=np.float32)]
            for idx in np.array_split(np.arange(rows.n_rows), max(1, math.ceil(rows.n_rows / micro_batch))):
                with amp:
                    parts.append(reference(rows.rows(idx, with_reference=False)))
            stored[key] = np.concatenate(parts)
        model.train()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        with open(tmp, "wb") as f:
            np.savez(f, identity=np.array(stamp), **stored)
        os.replace(tmp, path)
    for key, rows in sets.items():
        # Indexed by example: rows() looks them up through the layout.
        ref = np.zeros((len(rows.ex), 2), dtype=np.float32)
        ref[rows.layout.keep] = stored[key]
        rows.reference = ref


def reference_identity(tokenizer, sources: dict, sp: StagePlan) -> dict:
    """What a dpo reference's log-probs depend on, besides the starting weights (a finished init
    stage never changes without --restart): tokens, and which pairs are cut or left out."""
    return {"tokenizer": tokenizer.fingerprint, "data": {s.name: sources[s.name].path.name for s in sp.mix},
            "init": sp.init, "seq_len": sp.seq_len, "options": sp.options}


def _check_init(final: Path, fingerprint: str) -> None:
    """Weights trained with another tokenizer would read every id as a different token."""
    try:
        trained_with = json.loads((final / "config.json").read_text()).get("tokenizer_fingerprint")
    except (OSError, ValueError):
        trained_with = None
    if trained_with != fingerprint:
        raise CheckpointError(f"{final}: these weights were trained with another tokenizer than the run's",
                              hint="use --restart to train every stage with the current tokenizer")


def _to(batch: dict, device) -> dict:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


def _split(batch: dict, size: int) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _dropped(ctx: Context, sp: StagePlan) -> dict:
    """Records the data preparation left out, logged once with the stage's first eval."""
    out = {}
    for s in sp.mix:
        if s.skipped or s.filtered:
            out |= {f"data/{s.name}/skipped": s.skipped, f"data/{s.name}/filtered": s.filtered}
        if s.dropped or s.truncated:
            out |= {f"data/{s.name}/overlong_dropped": s.dropped, f"data/{s.name}/truncated": s.truncated}
    return out


def _identity(ctx: Context, sp: StagePlan) -> dict:
    """What a checkpoint must agree on to be resumed: inputs (refused if changed) and the
    machine binding (allowed to change: same math, but no longer bitwise identical)."""
    d = ctx.plan.device
    return {"tokenizer": ctx.tokenizer.fingerprint,
            "data": {s.name: ctx.sources[s.name].path.name for s in sp.mix},  # content-addressed keys
            "plan_hash": sp.math_hash(), "machine": f"{d.type}, {d.precision}, {d.threads} threads"}


def _resume(ctx: Context, sp: StagePlan, identity: dict, model, optimizer, sampler):
    """Load the latest complete checkpoint, if any: (start step, pending step metrics, last eval)."""
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
    pending = [{k: torch.tensor(v, dtype=torch.float32) for k, v in m.items()} for m in state.get("pending", [])]
    return state["step"], pending, state.get("last_eval", {})


def train_step(model, optimizer, objective, batch: dict, sp: StagePlan, amp, device) -> dict:
    """One optimizer step over the global batch, in grad_accum micro-batches; the loss is a mean
    over the whole batch's units (tokens, pairs), however unevenly the micro-batches hold them."""
    units = objective.units(batch)
    totals: dict = {}
    for micro in _split(batch, sp.micro_batch):
        with amp:
            sums = objective.loss(model, _to(micro, device))
        (sums["loss"] / units).backward()
        for k, v in sums.items():
            totals[k] = totals.get(k, 0) + v.detach()
    if sp.optimizer["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), sp.optimizer["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: (v / units).float() for k, v in totals.items()}


@torch.no_grad()
def evaluate(model, objective, batches: dict[str, dict], micro_batch: int, device, amp) -> dict:
    """Held-out metrics (pretrain/sft: loss in nats/token and bits per UTF-8 byte; dpo: loss and
    reward accuracy/margin), overall and per source."""
    model.eval()
    out, total = {}, {}
    for name, batch in batches.items():
        sums: dict = {}
        for micro in _split(batch, micro_batch) if len(next(iter(batch.values()))) else []:
            with amp:
                for k, v in objective.eval_sums(model, _to(micro, device)).items():
                    sums[k] = sums.get(k, 0) + v
        out |= {f"val/{name}/{k}": v for k, v in objective.summarize(sums).items()}
        for k, v in sums.items():
            total[k] = total.get(k, 0) + v
    model.train()
    return {f"val_{k}": v for k, v in objective.summarize(total).items()} | out


def write_final(final: Path, model, ctx: Context, sp: StagePlan, results: dict) -> None:
    """The stage's loadable model: weights, config, tokenizer and its final eval results, renamed
    into place at once."""
    tmp = final.parent / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / "model.safetensors")
    config = {"model": ctx.plan.model.to_dict(), "stage": sp.name, "kind": sp.kind,
              "tokenizer_fingerprint": ctx.tokenizer.fingerprint,
              "chat_template": ctx.template.to_dict() if ctx.template else None}
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "eval.json").write_text(json.dumps(results, indent=1))
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
