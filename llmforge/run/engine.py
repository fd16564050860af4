"""The engine: runs a Plan, one stage after another, one step after another.

It knows nothing about YAML. Each stage starts from the previous stage's final weights; each
resumes from its latest complete checkpoint; finished stages are skipped.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..core import durable, faults
from ..data.sampler import Sampler
from ..errors import CheckpointError, Interrupted
from ..model import adapters
from ..model.recompute import checkpoint_blocks
from ..model.weights import load_weights, set_weights
from ..optim import build_optimizer, lr_at
from ..plan.plan import Plan, StagePlan
from ..stages import KINDS, Kind
from ..store.checkpoint import (by_name, clean_temporary, latest_checkpoint, list_checkpoints, save_checkpoint,
                                set_rng_state)
from ..store.final import write_final
from . import distributed
from .distributed import Dist
from .step import autocast, evaluate, settle, train_step
from .timing import Timer


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, saves, then stops."""
    signum: int = 0

    @contextlib.contextmanager
    def installed(self, abort_on_repeat: bool = True):
        """abort_on_repeat: a second signal stops at once, without saving. Not in a distributed
        run, where a scheduler (Slurm, Kubernetes) may signal every process besides the launcher
        forwarding it; the launcher SIGKILLs workers that take too long to save."""
        def handler(signum, frame):
            if self.signum and abort_on_repeat:  # stop now, the last complete checkpoint stands
                raise KeyboardInterrupt
            self.signum = self.signum or signum
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
    lock: object = None  # the run directory's lock, held while the run lives (by rank 0)
    dist: Dist = field(default_factory=Dist)  # this process's place in a distributed run


def run_stages(ctx: Context) -> None:
    d = ctx.dist
    with ctx.stop.installed(abort_on_repeat=d.world == 1):
        for sp in ctx.plan.stages:
            if signum := d.stop_requested(ctx.stop.signum):  # between stages: nothing to save
                raise Interrupted(signum, f"stopped before stage {sp.name}")
            final = stage_dir(ctx.run_dir, sp) / "final"
            done = (final / "model.safetensors").is_file() and not _damaged_final(ctx, sp, final)
            d.together(lambda: d.same(done, f"whether stage {sp.name} is done"))
            if not done:
                run_stage(ctx, sp, init_from=_start(ctx, sp))
            else:
                ctx.reporter.note(f"stage {sp.name}: already done ({final})")


def _damaged_final(ctx: Context, sp: StagePlan, final: Path) -> bool:
    """A finished stage's final/ changed since it was written: it is rebuilt from the stage's
    last checkpoint (the same bytes), or, with none left, the run stops saying what to do."""
    why = durable.damage(final)
    if why is None:
        return False
    if not list_checkpoints(final.parent / "checkpoints"):
        raise CheckpointError(f"{final} is damaged ({why}) and the stage has no checkpoint to rebuild it from",
                              hint=f"delete {final} to train stage {sp.name} again, or restore it from a copy")
    ctx.reporter.note(f"stage {sp.name}: {final} is damaged ({why}); rebuilding it from its last checkpoint")
    return True


def _start(ctx: Context, sp: StagePlan) -> Path | None:
    """The folder with the stage's starting weights: an earlier stage's final/, the model's
    transformers folder (model.init.hf), or None for random weights."""
    if sp.init is None:
        return Path(ctx.plan.model_init) if ctx.plan.model_init else None
    return next((stage_dir(ctx.run_dir, p) / "final" for p in ctx.plan.stages if p.name == sp.init), None)


def stage_dir(run_dir: Path, sp: StagePlan) -> Path:
    return run_dir / "stages" / sp.dir_name


def run_stage(ctx: Context, sp: StagePlan, init_from: Path | None) -> None:
    plan, d, device = ctx.plan, ctx.dist, torch.device(ctx.plan.device.type)
    if device.type == "cuda":  # fp32 matmuls (outside autocast) on tensor cores, as TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    root = stage_dir(ctx.run_dir, sp)
    identity = _identity(ctx, sp) | adapters.base_stamp(init_from, sp.adapter)
    model, stage, resumed = d.together(lambda: _setup(ctx, sp, init_from, identity))
    objective, amp = stage.objective, stage.amp
    checkpoint = resumed[0].name if resumed else None
    d.together(lambda: d.same(checkpoint, f"the checkpoint stage {sp.name} resumes from"))
    if d.world > 1:  # rank 0 prepared the stage (dpo: the reference's log-probs); the others read it
        d.together(lambda: d.main or objective.prepare(root, stage_inputs(ctx.tokenizer, ctx.sources, sp),
                                                       stage.train, stage.evals))
    evals = eval_batches(stage.evals)
    sampler = Sampler([(stage.train[s.name], s.weight) for s in sp.mix], sp.global_batch, plan.seed, sp.index)
    names = adapters.saved_names(model, sp.adapter)  # before wrapping: a tied tensor's name; an adapter's alone
    checkpoint_blocks(model, sp.activation_checkpointing)
    if plan.device.compile:  # each stage compiles afresh: graphs piling up over the stages of one run
        torch._dynamo.reset()  # would reach dynamo's recompile limit, past which it silently runs eager
    step_model = distributed.wrap(model, plan.parallel, d, device, compile=plan.device.compile,
                                  bf16=device.type == "cuda" and plan.device.precision == "bf16")
    optimizer = build_optimizer(model, sp.optimizer | {"lr": sp.lr})
    start, pending, last_eval = _resume(ctx, sp, resumed, identity, model, optimizer, sampler, device)
    del resumed  # the full optimizer state read from disk: each rank now holds only its own

    def save(step: int) -> dict:
        """Gather the full state (all ranks), write it (rank 0), agree it is on disk; the weights.
        At `start` the state is exactly the checkpoint just loaded: nothing to write (and before
        a first step the optimizer has no state to gather: asking would create it)."""
        if step == start and step != sp.steps:
            return {}
        weights, optimizer_state = distributed.full_state(model, optimizer)
        weights = {k: v for k, v in weights.items() if k in names}
        if step != start:
            if pending:  # a non-finite step since the last log line ends the run here, before writing
                settle(pending, step, sp, bad_run)
            state = identity | {"stage": sp.name, "sampler": sampler.state_dict(),
                                "pending": [{k: v.item() for k, v in m.items()} for m in pending], "last_eval": last_eval}
            with ctx.reporter.busy(f"writing checkpoint {step}"):
                d.together(lambda: d.main and save_checkpoint(root / "checkpoints", step, weights, optimizer_state,
                                                              state, sp.checkpoint_keep))
        return weights

    ctx.reporter.stage_start(sp, start, root / "metrics.jsonl")
    head = KINDS[sp.kind].generates  # a reward model never runs the output head
    timer = Timer(start, sp, lambda pos, att, logits: plan.model.step_flops(pos, att, logits * head, bool(sp.adapter)),
                  plan.device.peak_flops, d.world)
    bad_run = 0  # steps in a row whose gradients were not finite, as of the last log line
    for step in range(start, sp.steps + 1):
        if signum := d.stop_requested(ctx.stop.signum):  # every rank stops at the same step
            save(step)
            raise Interrupted(signum, f"stopped at step {step} of stage {sp.name}; checkpoint saved")
        if step in (0, sp.steps) or (sp.eval_every and step % sp.eval_every == 0):
            with timer.evaluating(), ctx.reporter.busy("evaluating"):
                last_eval = evaluate(step_model, objective, evals, sp.micro_batch, device, amp)
            ctx.reporter.log_eval(step, last_eval | (_dropped(ctx, sp) if step == 0 else {}))
        if step == sp.steps:
            break
        if sp.checkpoint_every and step % sp.checkpoint_every == 0:
            save(step)
        lr = lr_at(step, peak=sp.lr, warmup=sp.warmup_steps, total=sp.steps, decay=sp.decay, min_lr=sp.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # muon: its matrices' own peak
        pending.append(train_step(step_model, optimizer, objective, sampler.next_batch(), sp, amp, device, d, step,
                                   sampler.next_batch))
        timer.step_done(step + 1, pending[-1].pop("work"))
        faults.reached("step", sp.dir_name, step + 1)
        if (step + 1) % sp.log_every == 0 or step + 1 == sp.steps:
            means, bad_run = settle(pending, step + 1, sp, bad_run)  # one sync per log line
            ctx.reporter.log(step + 1, means | {"lr": lr, **timer.rates(step + 1)})
            pending.clear()
    weights = save(sp.steps)
    d.together(lambda: d.main and _finish(ctx, sp, root, model if plan.parallel != "fsdp" else None, weights,
                                          last_eval))
    ctx.reporter.stage_end(sp)


def _setup(ctx: Context, sp: StagePlan, init_from: Path | None, identity: dict):
    """Build the stage's model at its starting weights and the stage (rank 0 prepares it from them:
    dpo's reference), and load the latest complete checkpoint's weights if any."""
    device, root = torch.device(ctx.plan.device.type), stage_dir(ctx.run_dir, sp)
    if ctx.dist.main:
        clean_temporary(root)
        clean_temporary(root / "checkpoints")
    torch.manual_seed(ctx.plan.seed + sp.index)  # the same initial weights on every machine
    kind = KINDS[sp.kind]
    model = kind.build_model(ctx.plan.model)
    if init_from is not None and str(init_from) == ctx.plan.model_init:
        _load_hf(model, init_from, ctx.plan.model, kind.fresh)
    elif init_from is not None:
        _check_init(init_from, ctx.tokenizer.fingerprint)
        load_weights(model, init_from / "model.safetensors", kind.fresh)
    if sp.adapter:  # frozen from here; LoRA's A drawn from the seed set above, B zero. Before the move: qlora
        # quantizes each layer onto the device, which so never holds the base in fp32
        adapters.apply(model, sp.adapter, trainable=kind.fresh, lm_head=kind.generates, device=device)
    model.to(device)
    stage = build_stage(sp, ctx.plan.device, ctx.tokenizer, ctx.template, ctx.sources, ctx.plan.seed)
    if ctx.dist.main:  # before resuming: from the stage's starting weights
        with ctx.reporter.busy(f"stage {sp.name}: preparing ({sp.kind})"):
            stage.objective.prepare(root, stage_inputs(ctx.tokenizer, ctx.sources, sp), stage.train, stage.evals,
                                    model, device, stage.amp)
    stage.objective.start(model, root, device)
    resumed = None
    found = latest_checkpoint(root / "checkpoints", ctx.reporter.note)  # damaged ones passed over, named
    if found:
        path, (weights, optimizer_state, state) = found
        changed = [f"data source {n!r}" for n, key in state.get("data", {}).items() if identity["data"].get(n) != key]
        if state.get("tokenizer") != identity["tokenizer"]:
            changed.insert(0, "the tokenizer")
        if state.get("base") != identity.get("base"):  # an adapter is an update to those weights alone
            changed.append(f"the weights it starts from ({init_from})")
        if changed:
            raise CheckpointError(f"stage {sp.name}: {' and '.join(changed)} changed since {path} was "
                                  "saved; resuming would train on different tokens",
                                  hint="restore the original data, or use --restart to start over")
        saved = adapters.saved_names(model, sp.adapter)  # an adapter's checkpoint holds only what trains
        frozen = tuple(n for n in model.state_dict() if n not in saved)
        set_weights(model, weights, path / "model.safetensors", frozen)
        resumed = (path, optimizer_state, state)
    return model, stage, resumed


def _finish(ctx: Context, sp: StagePlan, root: Path, model, weights: dict, last_eval: dict) -> None:
    """Rank 0: the task evals on the final weights (on an unsharded copy under FSDP), then the
    stage's loadable model."""
    results, adapter = dict(last_eval), None
    if sp.adapter:  # final/ holds the merged model, and the adapter beside it
        adapter, weights = adapters.finish(model)
    if sp.tasks:
        from ..tasks import run_tasks

        if model is None:
            model = KINDS[sp.kind].build_model(ctx.plan.model)
            set_weights(model, weights, root / "final")
            model.to(ctx.plan.device.type)
        with autocast(ctx.plan.device):  # the run's device and precision, as its training
            scores = run_tasks(sp.tasks, model.eval(), ctx.tokenizer, ctx.template, **sp.task_options)
        ctx.reporter.log_eval(sp.steps, scores)
        results |= scores
    config = {"model": ctx.plan.model.to_dict(), "stage": sp.name, "kind": sp.kind,
              "language_model": KINDS[sp.kind].generates, "tokenizer_fingerprint": ctx.tokenizer.fingerprint,
              "chat_template": ctx.template.to_dict() if ctx.template else None}
    if adapter is not None:  # which weights it is an update to
        config["adapter"] = adapters.record(sp.adapter, sp.init, ctx.plan.model_init)
    write_final(root / "final", weights, config, results, ctx.tokenizer.files, adapter)


@dataclass
class Stage:
    """A stage's parts, however its model's weights are got (trained here, or a finished stage's in
    `llmforge eval`): its kind, objective and autocast, and per mixed source its training row source
    and its held-out (row source, rows to evaluate), as stage_rows makes them."""
    kind: Kind
    objective: object
    amp: object
    train: dict
    evals: dict


def build_stage(sp: StagePlan, device, tokenizer, template, sources: dict, seed: int) -> Stage:
    """The one place a stage is assembled, for the engine and for `llmforge eval` alike."""
    kind = KINDS[sp.kind]
    train, evals = stage_rows(sources, sp, seed)
    return Stage(kind, kind.objective(sp, tokenizer, template, seed), autocast(device), train, evals)


def stage_rows(sources: dict, sp: StagePlan, seed: int) -> tuple[dict, dict]:
    """Per mixed source: the stage's training row source, and its held-out (row source, rows to
    evaluate) — the same layout rules as training, but held-out examples too long are dropped."""
    kind, train, evals = KINDS[sp.kind], {}, {}
    for s in sp.mix:
        train[s.name] = kind.train_rows(sources[s.name], sp.seq_len, sp.options, seed)
        evals[s.name] = kind.held_out(sources[s.name], sp.seq_len, sp.options, seed, sp.eval_tokens // len(sp.mix))
    return train, evals


def eval_batches(evals: dict) -> dict:
    """{source: held-out batch} from stage_rows' (row source, count) pairs (pretrain: the batch)."""
    return {name: n if rows is None else rows.rows(np.arange(n)) for name, (rows, n) in evals.items()}


def _check_init(final: Path, fingerprint: str) -> None:
    """Weights trained with another tokenizer would read every id as a different token."""
    try:
        trained_with = json.loads((final / "config.json").read_text()).get("tokenizer_fingerprint")
    except (OSError, ValueError):
        trained_with = None
    if trained_with != fingerprint:
        raise CheckpointError(f"{final}: these weights were trained with another tokenizer than the run's",
                              hint="use --restart to train every stage with the current tokenizer")


def _load_hf(model, folder: Path, planned, fresh: tuple[str, ...]) -> None:
    """The imported model's weights, if its folder still holds the architecture that was planned."""
    from ..model.hf import read_hf

    cfg, tensors = read_hf(folder)
    if replace(cfg, dropout=planned.dropout, init_std=planned.init_std) != planned:
        raise CheckpointError(f"{folder}/config.json: the model changed since the run was planned",
                              hint="use --restart to plan the run again")
    set_weights(model, tensors, folder / "model.safetensors", fresh)


def _dropped(ctx: Context, sp: StagePlan) -> dict:
    """Records the data preparation left out, logged once with the stage's first eval."""
    out = {}
    for s in sp.mix:
        if s.skipped or s.filtered:
            out |= {f"data/{s.name}/skipped": s.skipped, f"data/{s.name}/filtered": s.filtered}
            # each reason as its own count, under a name trackers accept ("messages[i]: two 'user'
            # turns in a row" -> data/chat/left_out/messages_i_two_user_turns_in_a_row); the plan shows it whole
            out |= {f"data/{s.name}/left_out/{re.sub(r'[^a-z0-9]+', '_', why.lower()).strip('_')[:80]}": n
                    for why, n in s.reasons.items()}
        if s.dropped or s.truncated:
            out |= {f"data/{s.name}/overlong_dropped": s.dropped, f"data/{s.name}/truncated": s.truncated}
    return out


def _identity(ctx: Context, sp: StagePlan) -> dict:
    """What a checkpoint must agree on to be resumed: inputs (refused if changed) and the
    machine binding (allowed to change: same math, but no longer bitwise identical)."""
    d, world = ctx.plan.device, ctx.plan.world_size
    machine = f"{d.type}, {d.precision}, {d.threads} threads" + (f", {ctx.plan.parallel} x {world}" if world > 1 else "")
    return stage_inputs(ctx.tokenizer, ctx.sources, sp) | {"plan_hash": sp.math_hash(), "machine": machine}


def stage_inputs(tokenizer, sources: dict, sp: StagePlan) -> dict:
    """The tokens a stage trains on: the tokenizer and its sources' content-addressed cache keys."""
    return {"tokenizer": tokenizer.fingerprint, "data": {s.name: sources[s.name].path.name for s in sp.mix}}


def _resume(ctx: Context, sp: StagePlan, resumed, identity: dict, model, optimizer, sampler, device):
    """From the checkpoint _setup read, if any: optimizer, RNG and sampler states, and (start
    step, pending step metrics, last eval)."""
    if resumed is None:
        return 0, [], {}
    path, optimizer_state, state = resumed
    distributed.load_optimizer(model, optimizer, by_name(optimizer_state, model, optimizer))
    set_rng_state(state["rng"])
    if (state.get("plan_hash"), state.get("machine")) != (identity["plan_hash"], identity["machine"]):
        ctx.reporter.note(f"stage {sp.name}: resuming on a different setup ({state.get('machine')} -> "
                          f"{identity['machine']}, or another micro-batch): same math, not bitwise identical")
    sampler.load_state_dict(state["sampler"])
    ctx.reporter.note(f"stage {sp.name}: resuming from {path.name}")
    pending = [{k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in m.items()}
               for m in state.get("pending", [])]
    return state["step"], pending, state.get("last_eval", {})


