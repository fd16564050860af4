"""Commands that read a recipe: run (here or under torchrun), prepare, init, plan."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .app import RunDirOption, SetOption, app, err, user_errors


@app.command()
def run(recipe: Path = typer.Argument(..., help="The recipe YAML file."),
        run_dir: Optional[Path] = RunDirOption,
        overrides: Optional[List[str]] = SetOption,
        restart: bool = typer.Option(False, "--restart", help="Delete the run directory and start over."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No plan, steps or evals: notes, warnings and the results."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Every figure of every step and eval line."),
        nproc: int = typer.Option(1, "--nproc-per-node", min=1, help="Train with N processes on this machine, "
                                  "launched by torch.distributed.run (one per GPU; on CPU, gloo)."),
        nnodes: int = typer.Option(1, "--nnodes", min=1, help="... on this many machines, each running this same "
                                   "command (docs/distributed.md)."),
        endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="With --nnodes: host:port of one of the "
                                               "machines, where they meet (torchrun's c10d rendezvous).")):
    """Prepare the tokenizer and data, print the plan, and train every stage (resuming if possible)."""
    from ..run.distributed import close, init, launched

    if (nproc > 1 or nnodes > 1) and not launched():
        # Read once, as torch loads: the agent's c10d warnings (a C++ stack each, when a machine is
        # lost with the rendezvous store it hosted) would only repeat the one line it reports.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        with user_errors():  # recipe errors once, before any process starts; a machine lost: one line, exit 2
            from ..recipe.loader import load_recipe
            from ..run.distributed import launch

            load_recipe(recipe, overrides or [])
            args = ["run", str(recipe), *(["--run-dir", str(run_dir)] if run_dir else []),
                    *[a for o in overrides or [] for a in ("--set", o)], *(["--restart"] if restart else []),
                    *(["--quiet"] if quiet else []), *(["--verbose"] if verbose else [])]
            code = launch(nproc, args, nnodes, endpoint)
        raise typer.Exit(code)
    d = init()  # joins torchrun's process group, if this process is one of its workers
    try:
        with user_errors(d.rank, d.world):
            _run(recipe, run_dir, overrides or [], restart, d, verbose - quiet)
    finally:
        close(d)


def _run(recipe: Path, run_dir: Path | None, overrides: list[str], restart: bool, d, verbosity: int = 0) -> None:
    from ..output.progress import QuietReporter, Reporter
    from ..output.tables import render_plan
    from ..output.trackers import open_trackers
    from ..recipe.loader import load_recipe
    from ..run.engine import run_stages
    from ..run.prepare import prepare_run

    reporter = Reporter(verbosity=verbosity) if d.main else QuietReporter()

    def setup():
        spec = load_recipe(recipe, overrides)
        return prepare_run(spec, run_dir or Path("runs") / spec.name, reporter, restart=restart, dist=d)

    try:
        # Rank 0 prepares the run directory, tokenizer and data; then the others find them ready.
        ctx = d.together(setup if d.main else lambda: None)
        ctx = d.together(lambda: ctx if d.main else setup())
        d.together(lambda: d.same((ctx.plan.parallel, [sp.math_hash() for sp in ctx.plan.stages]), "the plan"))
        if verbosity >= 0:
            render_plan(ctx.plan, reporter.console)
        if d.main:  # runtime.trackers: only rank 0 logs
            reporter.track(open_trackers(ctx.run_dir, reporter.note))
        run_stages(ctx)
    finally:
        reporter.close()
    if d.main:
        from ..output.tables import render_results
        from ..store.runs import stage_results

        render_results(stage_results(ctx.run_dir), reporter.console)
        how = f"llmforge chat {ctx.run_dir}" if ctx.template else f"llmforge sample {ctx.run_dir} --prompt ..."
        reporter.note(f"done: {ctx.run_dir} (try `{how}`)")


@app.command()
def prepare(recipe: Path = typer.Argument(..., help="The recipe YAML file."),
            run_dir: Optional[Path] = RunDirOption,
            overrides: Optional[List[str]] = SetOption):
    """Train the tokenizer and tokenize every source into the cache, then print the exact plan."""
    with user_errors():
        from ..output.progress import Reporter
        from ..output.tables import render_plan
        from ..recipe.loader import load_recipe
        from ..run.prepare import prepare_run

        spec = load_recipe(recipe, overrides or [])
        reporter = Reporter()
        ctx = prepare_run(spec, run_dir or Path("runs") / spec.name, reporter)
        render_plan(ctx.plan, reporter.console)


@app.command(name="init")
def init_(name: str = typer.Argument(..., help="The recipe's name: writes NAME.yaml here."),
          template: str = typer.Option("pipeline", "--template", help="pretrain, finetune, pipeline or rlhf."),
          model: Optional[Path] = typer.Option(None, "--model", help="finetune: the Hugging Face model folder to "
                                               "start from."),
          folder: Path = typer.Option(Path("."), "--dir", help="Where to write it.")):
    """Write a commented starter recipe that plans and runs as written (and recipe.schema.json
    beside it, for completion in editors with the YAML language server)."""
    with user_errors():
        from ..starters import write_starter

        recipe, *rest = write_starter(name, template, folder, model)
        err.print(f"wrote {recipe}{' and ' + ', '.join(map(str, rest)) if rest else ''}; next: "
                  f"llmforge plan {recipe}", highlight=False)


@app.command()
def plan(recipe: Path = typer.Argument(..., help="The recipe YAML file."),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
         run_dir: Optional[Path] = RunDirOption,
         overrides: Optional[List[str]] = SetOption,
         nproc: int = typer.Option(1, "--nproc-per-node", min=1, help="Plan for N processes (as `run` would use)."),
         nnodes: int = typer.Option(1, "--nnodes", min=1, help="... on this many machines (world size N x nodes)."),
         target: Optional[str] = typer.Option(None, "--target", help="Plan for hardware you don't have: h100x8, "
                                              "a100-80gx4, h200, 4090, cpu, ... (docs/targets.md)."),
         show_recipe: bool = typer.Option(False, "--show-recipe", help="Print the recipe as it reads after "
                                          "extends and --set are applied, instead of the plan.")):
    """Print what a run would do on this machine (or on --target), without training."""
    with user_errors():
        from ..output.progress import make_console
        from ..output.tables import render_plan
        from ..recipe.loader import load_recipe
        from ..recipe.loader import show_recipe as written
        from ..run.prepare import estimate_plan

        spec = load_recipe(recipe, overrides or [])
        if show_recipe:
            sys.stdout.write(written(spec))
            return
        device, about = None, None
        if target:
            from ..plan.devices import plan_target

            device, nproc, about = plan_target(target, spec.runtime, nnodes)
        result = estimate_plan(spec, run_dir or Path("runs") / spec.name, world_size=nproc * nnodes,
                               processes=nproc, device=device)
        if as_json:
            sys.stdout.write(json.dumps(({"target": about} if about else {}) | result.to_json(), indent=1) + "\n")
        else:
            console = make_console()
            if about:
                console.print(about, highlight=False, markup=False)
            render_plan(result, console)
