"""`llmforge eval`: a finished stage measured again on its held-out data and its task evals,
with exactly the code that evaluated it during the run (engine.evaluate, tasks.run_tasks).

A run directory holds all it needs: the resolved recipe, the folder relative data paths are
resolved against (run.json), the tokenizer and each stage's final weights; the token cache is
reused, or rebuilt from the data if it was cleared.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import yaml

from ..data.cache import prepare_source
from ..errors import CheckpointError
from ..plan.devices import detect_device
from ..plan.plan import plan_stage
from ..recipe.loader import validate_recipe
from ..recipe.schema import RuntimeSpec
from ..store.final import check_language_model, find_stage, load_model, load_trained
from ..store.runs import record_later
from ..tasks import run_tasks
from ..text.templates import template_from_spec
from ..text.tokenizer_json import load_tokenizer
from .engine import build_stage, eval_batches, stage_inputs
from .prepare import source_stats
from .resolve import resolve_formats
from .step import autocast, evaluate


def load_run_recipe(run_dir: Path):
    try:
        recipe = validate_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
        base = json.loads((run_dir / "run.json").read_text())["base_dir"]
    except (OSError, ValueError, KeyError, yaml.YAMLError) as e:
        raise CheckpointError(f"{run_dir}: not a complete run directory ({e})",
                              hint="point at a folder made by `llmforge run`, e.g. runs/quickstart") from None
    recipe._base_dir = Path(base)
    return resolve_formats(recipe)[0]  # a run from before format: auto was written without it


def evaluate_stage(run_dir: Path, stage: str | None, tasks: list[str] | None = None, reporter=None,
                   lm_eval: dict | None = None) -> dict:
    """Held-out metrics of a stage's final weights (val loss/bpb; for dpo, reward accuracy against
    its reference) plus its task evals (the recipe's eval.tasks, or `tasks`: llmforge's by name,
    any other name an lm-eval task, run with the options `lm_eval` sets over eval.lm_eval's)."""
    final = find_stage(run_dir, stage)
    recipe = load_run_recipe(run_dir)
    name = json.loads((final / "config.json").read_text())["stage"]
    device = detect_device(recipe.runtime.model_copy(update={"device": "auto"}))  # wherever eval runs
    torch.set_num_threads(device.threads)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    template = template_from_spec(recipe.tokenizer.chat_template, recipe.base_dir)
    spec = next(s for s in recipe.stages if s.name == name)
    sources = {}
    for src in spec.mix:
        with _task(reporter, f"preparing {src}"):
            sources[src] = prepare_source(src, recipe.data[src], recipe.base_dir, tokenizer, template=template)
    stats = {n: source_stats(s) for n, s in sources.items()}
    sp = plan_stage(recipe, recipe.stages.index(spec), vocab_size=tokenizer.vocab_size, sources=stats,
                    device=device, tokenizer_fingerprint=tokenizer.fingerprint)
    stage = build_stage(sp, device, tokenizer, template, sources, recipe.seed)
    model = load_model(final, stage.kind.build_model, device.type)
    # What the run prepared (dpo: its reference's log-probs; the final weights are not the reference).
    stage.objective.prepare(final.parent, stage_inputs(tokenizer, sources, sp), stage.train, stage.evals)
    stage.objective.start(model, final.parent, torch.device(device.type))  # grpo: its reward models
    results = {"stage": name} | evaluate(model, stage.objective, eval_batches(stage.evals), sp.micro_batch,
                                         torch.device(device.type), stage.amp)
    names = sp.tasks if tasks is None else tasks
    options = sp.task_options | {k: v for k, v in (lm_eval or {}).items() if v is not None}
    if names:
        check_language_model(final)  # task evals generate replies

        with _task(reporter, f"task evals: {', '.join(names)}"), stage.amp:
            results |= run_tasks(names, model, tokenizer, template, **options)
    record_later(final, {k: v for k, v in results.items() if k != "stage"})  # report and compare show them
    return results


def _task(reporter, description: str):
    return reporter.task(description, None) if reporter else contextlib.nullcontext()


def load_for_generation(final: Path):
    """(model, tokenizer, autocast context) for `chat` and `sample`: on the GPU (in bf16 where it
    has it) when there is one, as a run trains there; else on the CPU in fp32."""
    device = detect_device(RuntimeSpec())
    return *load_trained(final, device.type), autocast(device)
