"""The command line: thin commands over the library. The one place that turns an
LlmforgeError into red lines + a hint and exit code 2. torch is imported only inside commands,
so `llmforge --help` stays instant."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import Interrupted, LlmforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train language models from one declarative YAML recipe.")
err = Console(stderr=True, highlight=False, soft_wrap=True)

SetOption = typer.Option(None, "--set", help="Override a recipe key: key.path=value (repeatable), "
                                             "e.g. stages[0].optimizer.lr=1e-3 or stages.pretrain.steps=100.")
RunDirOption = typer.Option(None, "--run-dir", help="Run directory (default: runs/<recipe name>).")


@contextlib.contextmanager
def user_errors():
    """Turn user-caused problems into a clean exit; anything else is a bug and keeps its traceback."""
    try:
        yield
    except LlmforgeError as e:
        for line in e.lines:
            err.print(f"[bold red]error:[/] {escape(line)}")
        if e.hint:
            err.print(f"[dim]hint: {escape(e.hint)}[/]")
        raise typer.Exit(2)
    except Interrupted as e:
        err.print(f"[yellow]{escape(e.message)}[/]; run the same command again to resume.")
        raise typer.Exit(128 + e.signum)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]; nothing half-written was kept. Run the same command again to resume.")
        raise typer.Exit(128 + signal.SIGINT)


@app.command()
def run(recipe: Path = typer.Argument(..., help="The recipe YAML file."),
        run_dir: Optional[Path] = RunDirOption,
        overrides: Optional[List[str]] = SetOption,
        restart: bool = typer.Option(False, "--restart", help="Delete the run directory and start over.")):
    """Prepare the tokenizer and data, print the plan, and train every stage (resuming if possible)."""
    with user_errors():
        from .engine import run_stages
        from .pipeline import prepare_run
        from .progress import Reporter, render_plan
        from .recipe import load_recipe

        spec = load_recipe(recipe, overrides or [])
        run_dir = run_dir or Path("runs") / spec.name
        reporter = Reporter()
        try:
            ctx = prepare_run(spec, run_dir, reporter, restart=restart)
            render_plan(ctx.plan, reporter.console)
            run_stages(ctx)
        finally:
            reporter.close()
        reporter.note(f"done: {run_dir} (sample with `llmforge sample {run_dir} --prompt ...`)")


@app.command()
def prepare(recipe: Path = typer.Argument(..., help="The recipe YAML file."),
            run_dir: Optional[Path] = RunDirOption,
            overrides: Optional[List[str]] = SetOption):
    """Train the tokenizer and tokenize every source into the cache, then print the exact plan."""
    with user_errors():
        from .pipeline import prepare_run
        from .progress import Reporter, render_plan
        from .recipe import load_recipe

        spec = load_recipe(recipe, overrides or [])
        reporter = Reporter()
        ctx = prepare_run(spec, run_dir or Path("runs") / spec.name, reporter)
        render_plan(ctx.plan, reporter.console)


@app.command()
def plan(recipe: Path = typer.Argument(..., help="The recipe YAML file."),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
         run_dir: Optional[Path] = RunDirOption,
         overrides: Optional[List[str]] = SetOption):
    """Print what a run would do on this machine, without training."""
    with user_errors():
        from .pipeline import estimate_plan
        from .progress import make_console, render_plan
        from .recipe import load_recipe

        spec = load_recipe(recipe, overrides or [])
        result = estimate_plan(spec, run_dir or Path("runs") / spec.name)
        if as_json:
            sys.stdout.write(json.dumps(result.to_json(), indent=1) + "\n")
        else:
            render_plan(result, make_console())


@app.command()
def sample(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/quickstart."),
           prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
           stage: Optional[str] = typer.Option(None, "--stage", help="Stage name (default: the last finished)."),
           max_new_tokens: int = typer.Option(200, "--max-new-tokens", min=1),
           temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="0 = greedy."),
           top_k: Optional[int] = typer.Option(50, "--top-k", min=1),
           seed: int = typer.Option(0, "--seed")):
    """Continue a prompt with a trained stage's model."""
    with user_errors():
        from .generate import find_stage, load_trained, sample as generate

        model, tokenizer = load_trained(find_stage(run_dir, stage))
        sys.stdout.write(prompt)
        for piece in generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, seed=seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


@app.command()
def schema():
    """Print the recipe's JSON Schema (editors use docs/recipe.schema.json for completion)."""
    from .recipe import recipe_json_schema

    sys.stdout.write(recipe_json_schema())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
