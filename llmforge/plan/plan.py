"""Recipe -> Plan: every derived number for this machine, computed before any training.

The recipe says *what* (global batch in tokens, budget, schedule); the plan says *how* here
(device, precision, micro-batch x grad-accum x world size, steps, memory and time estimates).
Every derived number appears in `llmforge plan`; nothing is decided silently elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.paths import recipe_path
from ..core.values import resolve_percent
from ..errors import PlanError
from ..model.adapters import projections
from ..model.families import PRESETS
from ..model.recompute import recompute_share
from ..model.transformer import ModelConfig
from ..optim import OPTIMIZERS
from ..recipe.schema import Recipe
from ..stages import KINDS
from .adapter import plan_adapter
from .devices import Device
from .estimates import choose_micro_batch, disk_warnings, estimate_memory, estimate_time, memory_budget
from .mix import SourcePlan, SourceStats, held_out_fits, missing_warning, plan_mix, source_rows


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    kind: str
    dir_name: str  # "01-pretrain"
    init: str | None  # the earlier stage whose final weights this one starts from; None: the model's
    # own start (model.init.hf, else random); "none": random
    options: object  # the kind's own settings: its Options (stages/<kind>.py), defaults filled in
    seq_len: int
    batch_tokens: int  # token capacity of a step's rows (dpo: both sides of each pair)
    global_batch: int  # rows per optimizer step = micro_batch * grad_accum * world_size (dpo: pairs)
    micro_batch: int
    grad_accum: int
    world_size: int
    steps: int
    tokens: int
    lr: float
    min_lr: float
    warmup_steps: int
    decay: str
    optimizer: dict
    eval_every: int
    eval_tokens: int
    checkpoint_every: int
    checkpoint_keep: int
    log_every: int
    tasks: tuple[str, ...]  # task evals on the final weights
    task_options: dict  # how its lm-eval tasks run (eval.lm_eval; include_path made absolute)
    mix: tuple[SourcePlan, ...]
    flops: float
    est_peak_memory_bytes: int
    est_time_s: float | None
    adapter: dict | None = None  # the stage's LoRA (recipe AdapterSpec), None: full training
    on_nonfinite: str = "stop"  # runtime.on_nonfinite: stop | skip
    max_nonfinite: int = 10
    trainable_params: int = 0  # what the optimizer steps (an adapter's alone, or every weight)
    activation_checkpointing: str = "none"  # none | selective | full (runtime's, or the plan's under auto)
    seq_len_from: str = ""  # how seq_len was chosen when the recipe does not say it (stage_seq_len)

    def math_hash(self) -> str:
        """What decides this stage's numbers on a given machine; stored in every checkpoint."""
        keys = ("kind", "init", "options", "seq_len", "global_batch", "micro_batch", "grad_accum", "world_size",
                "steps", "lr", "min_lr", "warmup_steps", "decay", "optimizer", "adapter")
        blob = {k: getattr(self, k) for k in keys} | {"mix": [(s.name, s.weight) for s in self.mix],
                                                      "options": self.options.model_dump()}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Plan:
    name: str
    seed: int
    device: Device
    model: ModelConfig
    params: int
    params_non_embedding: int
    flops_per_token: int
    stages: tuple[StagePlan, ...] = field(default_factory=tuple)
    world_size: int = 1  # processes training together (torchrun's WORLD_SIZE)
    parallel: str = "single"  # single | ddp | fsdp
    warnings: tuple[str, ...] = ()  # things that will run, but perhaps not as the user meant
    model_init: str | None = None  # a transformers folder the first stage starts from (model.init.hf)
    # sft/dpo stage name -> one training example as chat-template segments (text, special, learned),
    # so `plan` can show what the model will learn from
    previews: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the plan found for itself (a format told by its data)

    def to_json(self) -> dict:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        for stage, sp in zip(out["stages"], self.stages):
            stage["options"] = sp.options.model_dump()
        return out


def model_config(recipe: Recipe, vocab_size: int) -> ModelConfig:
    """The recipe's model section with its preset's defaults filled in."""
    spec = recipe.model
    fields = dict(PRESETS[spec.preset])
    fields.update({k: v for k, v in spec.model_dump(exclude={"preset", "init", "vocab_size"}).items() if v is not None})
    if spec.init is not None and spec.vocab_size is not None and spec.vocab_size < vocab_size:
        raise PlanError(f"{spec.init.hf}/config.json: vocab_size {spec.vocab_size} is smaller than its tokenizer's "
                        f"{vocab_size} tokens ({recipe.tokenizer.path})", hint="the model's embedding must have a row "
                        "for every token: check that config.json and the tokenizer belong together")
    if spec.vocab_size is not None and spec.vocab_size < vocab_size:
        raise PlanError(f"model.vocab_size: {spec.vocab_size} rows cannot hold the tokenizer's {vocab_size} tokens",
                        hint=f"set model.vocab_size to at least {vocab_size}, or leave it out")
    return ModelConfig(vocab_size=spec.vocab_size or vocab_size, **fields)


def compile_plan(recipe: Recipe, *, vocab_size: int, sources: dict[str, SourceStats], device: Device,
                 world_size: int = 1, tokenizer_fingerprint: str | None = None, previews: dict | None = None,
                 run_dir: Path | None = None, warnings: list[str] | None = None, notes: list[str] | None = None) -> Plan:
    """The frozen plan, everything it shows computed here: previews (sft/dpo stage name -> an example
    as the chat template renders it) come from the caller, which reads the data; with run_dir, a
    warning when its disk cannot hold what the stages will keep (none for another machine's disk)."""
    cfg = model_config(recipe, vocab_size)
    params = cfg.num_params()
    seq_lens = [stage_seq_len(recipe, i, cfg, sources) for i in range(len(recipe.stages))]
    parallel = _choose_parallel(recipe, cfg, device, world_size, [n for n, _ in seq_lens])
    shards = world_size if parallel == "fsdp" else 1
    stages, problems = [], []
    for i, spec in enumerate(recipe.stages):
        try:
            stages.append(_plan_stage(i, spec, recipe, cfg, sources, device, world_size, shards,
                                      tokenizer_fingerprint, seq_lens[i]))
        except PlanError as e:
            problems.append(e)
    if problems:
        # a model-wide problem (it does not fit) fails every stage alike: say it once
        raise PlanError("\n".join(dict.fromkeys(p.message for p in problems)), hint=problems[0].hint)
    warnings = list(warnings or []) + [missing_warning(st.missing, [sp.name for sp in stages if not sp.steps and name in [s.name for s in sp.mix]])
                for name, st in sources.items() if st.missing]
    warnings += [f"data.{s.name}: no held-out {what} seq_len+1 = {sp.seq_len + 1} tokens; "
                 f"stage {sp.name} cannot eval on it"
                 for sp in stages for s in sp.mix if not sources[s.name].missing
                 for what in [held_out_fits(sp, sources[s.name], recipe.seed)] if what]
    warnings += [f"stage {sp.name}: runtime.on_nonfinite: skip with optimizer.name: {sp.optimizer['name']} reads one "
                 "flag from the device every step (adamw skips on the device, without waiting)"
                 for sp in stages if sp.on_nonfinite == "skip" and not OPTIMIZERS[sp.optimizer["name"]].skips_on_device]
    if run_dir is not None:
        warnings += disk_warnings(stages, params, run_dir)
    return Plan(recipe.name, recipe.seed, device, cfg, params, cfg.num_params(exclude_embeddings=True),
                cfg.flops_per_token(), tuple(stages), world_size, parallel, tuple(dict.fromkeys(warnings)),
                model_init=recipe.model.init.hf if recipe.model.init else None, previews=previews or {},
                notes=tuple(notes or ()) + tuple(n for sp in stages for n in KINDS[sp.kind].notes(
                    f"stages[{sp.index}]", sp.options)))


def plan_stage(recipe: Recipe, index: int, *, vocab_size: int, sources: dict[str, SourceStats], device: Device,
               tokenizer_fingerprint: str | None = None) -> StagePlan:
    """Stage `index` of the recipe alone, in one process (`llmforge eval`: only its sources are
    prepared; it keeps its place, init and references among the recipe's stages)."""
    cfg = model_config(recipe, vocab_size)
    return _plan_stage(index, recipe.stages[index], recipe, cfg, sources, device, 1, 1, tokenizer_fingerprint,
                       stage_seq_len(recipe, index, cfg, sources))


def stage_seq_len(recipe: Recipe, i: int, cfg: ModelConfig, sources: dict[str, SourceStats]) -> tuple[int, str]:
    """(the stage's seq_len, how it was chosen): its own, else the model's; but a model folder's
    context (model.init.hf: 8,192 tokens for SmolLM2, 32,768 for Qwen2.5) is no row length
    anyone means, so there a stage of examples takes the longest row its data makes, rounded up
    to 64, capped at the context. Before the data is tokenized (a `plan` of data not at hand),
    the context stands."""
    spec, kind = recipe.stages[i], KINDS[recipe.stages[i].kind]
    if spec.seq_len or recipe.model.init is None:
        return spec.seq_len or cfg.seq_len, ""
    known = [kind.longest(sources[name].examples, spec.options) for name in spec.mix
             if sources[name].examples is not None]
    if not known or len(known) < len(spec.mix):
        return cfg.seq_len, "the model's context: its data's lengths are not known until it is tokenized"
    longest = max(known)
    derived = min(cfg.seq_len, max(64, -(-(longest - 1) // 64) * 64))
    return derived, f"from its data: the longest example is {longest:,} tokens (the model's context: {cfg.seq_len:,})"


def _choose_parallel(recipe: Recipe, cfg: ModelConfig, device: Device, world_size: int, seq_lens: list[int]) -> str:
    """single alone; else the recipe's choice, or under auto DDP when the whole model's training
    state and one sequence's activations fit one device (by estimate_memory), FSDP otherwise."""
    if world_size == 1:
        return "single"
    unsharded = next(((i, OPTIMIZERS[s.optimizer.name]) for i, s in enumerate(recipe.stages)
                      if not OPTIMIZERS[s.optimizer.name].shards), None)
    if unsharded is not None and recipe.runtime.parallel == "fsdp":
        sharding = ", ".join(name for name, o in OPTIMIZERS.items() if o.shards)
        raise PlanError(f"stages[{unsharded[0]}].optimizer.name: {unsharded[1].unsharded}",
                        hint=f"use runtime.parallel: ddp, or optimizer {sharding}")
    kind = next(((i, KINDS[s.kind]) for i, s in enumerate(recipe.stages) if KINDS[s.kind].unsharded), None)
    if kind is not None and recipe.runtime.parallel == "fsdp":
        raise PlanError(f"stages[{kind[0]}].kind: {kind[1].unsharded}; it cannot run with runtime.parallel: fsdp",
                        hint="use runtime.parallel: ddp (or auto, which picks it for such a recipe)")
    unsharded = unsharded or kind
    if recipe.runtime.parallel != "auto":
        return recipe.runtime.parallel
    if unsharded is not None:
        return "ddp"
    longest = max(n * KINDS[s.kind].sequences(s.options, _format(recipe, s)) for n, s in zip(seq_lens, recipe.stages))
    return "ddp" if estimate_memory(cfg, 1, longest, device.precision, cpu=device.type == "cpu") <= memory_budget(device) \
        else "fsdp"


def _plan_stage(i, spec, recipe, cfg, sources, device, world_size, shards, fingerprint, seq_len) -> StagePlan:
    where, kind = f"stages[{i}]", KINDS[spec.kind]
    (seq_len, seq_len_from), options = seq_len, kind.plan_options(spec, recipe)
    if problems := kind.check(where, i, options, recipe, sources, fingerprint):
        raise PlanError("\n".join(problems), hint=f"see docs/recipe.md, stage kind {spec.kind}")
    n_seq = kind.sequences(options, _format(recipe, spec))  # a dpo row is a pair: two sequences
    per_row = n_seq * seq_len
    if spec.batch_tokens is not None:
        if spec.batch_tokens % (per_row * world_size):
            per = per_row * world_size
            lo, hi = spec.batch_tokens // per * per, (spec.batch_tokens // per + 1) * per
            two = f"{n_seq} x " if n_seq > 1 else ""
            what = f"{two}seq_len x world size ({two}{seq_len} x {world_size})"
            raise PlanError(f"{where}.batch_tokens: {spec.batch_tokens} is not a multiple of {what}",
                            hint=f"use {lo} or {hi}, or give batch_size" if lo else f"use {hi}, or give batch_size")
        global_batch = spec.batch_tokens // per_row
    else:
        global_batch = spec.batch_size
        if global_batch % world_size:
            raise PlanError(f"{where}.batch_size: {global_batch} does not divide among {world_size} processes",
                            hint=f"use a multiple of {world_size}")
    batch_tokens = global_batch * per_row
    rows = {name: source_rows(where, spec, name, sources[name], seq_len, options, recipe.seed) for name in spec.mix}
    if spec.epochs is not None and any(sources[name].missing for name in spec.mix):
        steps = 0  # epochs of data not at hand: unknown (the plan warns)
    elif spec.epochs is not None:
        steps = max(1, math.ceil(spec.epochs * sum(r[0] for r in rows.values()) / global_batch))
    else:
        steps = spec.steps or math.ceil(spec.tokens / batch_tokens)
    tokens = steps * batch_tokens
    adapter, trainable, frozen_bytes = plan_adapter(where, recipe, spec, cfg, device, shards,
                                                    stage_init(recipe, i))
    beside = kind.memory_beside(options, cfg, global_batch // world_size, seq_len,  # grpo's reference, rollout
                                4 if device.precision == "fp32" else 2, frozen_bytes or cfg.num_params() * 4)
    micro, memory, checkpointing = choose_micro_batch(
        where, recipe.runtime.micro_batch, global_batch // world_size, per_row, cfg, device, shards,
        max(r[3] for r in rows.values()), trainable if adapter else None, frozen_bytes,
        recipe.runtime.activation_checkpointing, beside, bool(adapter) and "w2" in projections(adapter["targets"]))
    mix = plan_mix(where, spec.mix, sources, recipe.data, rows, steps * global_batch, per_row)
    warmup = round(resolve_percent(spec.schedule.warmup, steps))
    if warmup >= steps and steps > 1:
        raise PlanError(f"{where}.schedule.warmup: {warmup} warmup steps but the stage has only {steps} steps",
                        hint="use a smaller warmup, e.g. '2%'")
    opt = spec.optimizer
    min_lr = resolve_percent(spec.schedule.min_lr, opt.lr)
    if min_lr > opt.lr:
        raise PlanError(f"{where}.schedule.min_lr: {min_lr:g} is above the peak lr {opt.lr:g}",
                        hint="use a share of the peak like '10%', or a smaller number")
    flops = float(cfg.flops_per_token(seq_len)) * tokens
    if adapter:  # a frozen weight needs no weight gradient: forward + input gradients, ~2/3 of it
        flops *= 2 / 3
    recompute = 1 + recompute_share(cfg, checkpointing, seq_len)  # what the device does: forwards again
    return StagePlan(
        index=i, name=spec.name, kind=spec.kind, dir_name=f"{i + 1:02d}-{spec.name}", init=stage_init(recipe, i),
        options=options,
        seq_len=seq_len, batch_tokens=batch_tokens, global_batch=global_batch, micro_batch=micro,
        grad_accum=global_batch // (micro * world_size), world_size=world_size, steps=steps, tokens=tokens,
        lr=opt.lr, min_lr=min_lr, warmup_steps=warmup,
        decay=spec.schedule.decay,
        optimizer=opt.model_dump(mode="json", exclude={"lr"}),
        eval_every=spec.eval.every, eval_tokens=spec.eval.tokens, checkpoint_every=spec.checkpoint.every,
        checkpoint_keep=spec.checkpoint.keep, log_every=recipe.runtime.log_every, tasks=tuple(spec.eval.tasks),
        task_options=_lm_eval_options(spec, recipe),
        mix=mix, flops=flops, est_peak_memory_bytes=memory,
        activation_checkpointing=checkpointing, seq_len_from=seq_len_from,
        est_time_s=estimate_time(recompute * flops / world_size, cfg, micro * per_row // seq_len, seq_len, device,
                                 steps=steps, world_size=world_size, synced_bytes=_synced_bytes(
                                     cfg, trainable if adapter else cfg.num_params(), shards > 1)),
        adapter=adapter, trainable_params=trainable, on_nonfinite=recipe.runtime.on_nonfinite,
        max_nonfinite=recipe.runtime.max_nonfinite,
    )


def _synced_bytes(cfg: ModelConfig, trainable: int, sharded: bool) -> float:
    """Bytes a device sends per step, over (n-1)/n, to keep the others in step (in a ring, an
    all-gather or reduce-scatter of B bytes sends (n-1)/n B, an all-reduce twice that). DDP
    all-reduces the fp32 gradients of what trains; FSDP all-gathers the bf16 weights twice
    (forward and backward) and reduce-scatters the gradients."""
    return 2 * 2 * cfg.num_params() + 4 * trainable if sharded else 2 * 4 * trainable


def _lm_eval_options(spec, recipe: Recipe) -> dict:
    options = spec.eval.lm_eval.model_dump()
    if options["include_path"]:
        options["include_path"] = str(recipe_path(recipe.base_dir, options["include_path"]))
    return options


def _format(recipe: Recipe, spec) -> str:
    """The data format of a stage's mix (a kind that takes several formats refuses a mix of them)."""
    return recipe.data[next(iter(spec.mix))].format


def stage_init(recipe: Recipe, i: int) -> str | None:
    """The stage whose final weights stage i starts from: its `init`, else the one before it.
    None for the first stage without one: it starts from the model's own start (model.init, or
    random weights); "none" asks for random weights."""
    init = recipe.stages[i].init
    if init is None and i > 0:
        return recipe.stages[i - 1].name
    return init
