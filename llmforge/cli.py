"""The command line: thin commands over the library. The one place that turns an
LlmforgeError into red lines + a hint and exit code 2. torch is imported only inside commands,
so `llmforge --help` stays instant."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .core.durable import NO_SPACE, PATH_ERRORS
from .errors import Interrupted, LlmforgeError, PeerFailed

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train language models from one declarative YAML recipe.")
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

SetOption = typer.Option(None, "--set", help="Override a recipe key: key.path=value (repeatable), "
                                             "e.g. stages[0].optimizer.lr=1e-3 or stages.pretrain.steps=100.")
RunDirOption = typer.Option(None, "--run-dir", help="Run directory (default: runs/<recipe name>).")


@contextlib.contextmanager
def user_errors(rank: int = 0, world: int = 1):
    """Turn user-caused problems into a clean exit; anything else is a bug and keeps its traceback.
    In a distributed run rank 0 speaks; another rank speaks only of a failure of its own."""
    who = f"rank {rank}: " if rank else ""
    try:
        yield
    except LlmforgeError as e:
        for line in e.lines:
            err.print(f"[bold red]error:[/] {escape(who + line)}")
        if e.hint:
            err.print(f"[dim]hint: {escape(e.hint)}[/]")
        if world > 1:  # the launcher must see this exit code before the peers notice we are gone
            from .run.distributed import exit_now

            exit_now(2)
        raise typer.Exit(2)
    except PeerFailed:  # the failing rank, or rank 0, reports it
        raise typer.Exit(2)
    except Interrupted as e:
        if not rank:
            err.print(f"[yellow]{escape(e.message)}[/]; run the same command again to resume.")
        raise typer.Exit(128 + e.signum)
    except OSError as e:  # a full disk anywhere else than a checkpoint, final/ or the cache (durable.writing)
        if e.errno in NO_SPACE:
            err.print(f"[bold red]error:[/] {escape(who + str(e.filename or 'a write'))}: the disk is full ({e.strerror})")
            err.print("[dim]hint: free some space and run the same command again: it resumes from the last "
                      "complete checkpoint[/]")
        elif e.errno in PATH_ERRORS and e.filename:  # a path given on the command line or in the recipe
            err.print(f"[bold red]error:[/] {escape(who + str(e.filename))}: {escape(e.strerror or str(e))}")
            err.print("[dim]hint: check the path and its permissions[/]")
        else:
            raise
        raise typer.Exit(2)
    except KeyboardInterrupt:
        if not rank:
            err.print("[yellow]interrupted[/]: nothing half-written was kept, the last complete checkpoint stands; "
                      "run the same command again to resume.")
        raise typer.Exit(128 + signal.SIGINT)
    except Exception as e:
        from .run.distributed import PEER_LOST, peer_failure

        if world > 1 and peer_failure(e):  # another rank died; its message (or the launcher's) is the one to read
            raise typer.Exit(PEER_LOST)
        raise


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
    from .run.distributed import close, init, launched

    if (nproc > 1 or nnodes > 1) and not launched():
        # Read once, as torch loads: the agent's c10d warnings (a C++ stack each, when a machine is
        # lost with the rendezvous store it hosted) would only repeat the one line it reports.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        with user_errors():  # recipe errors once, before any process starts; a machine lost: one line, exit 2
            from .recipe.loader import load_recipe
            from .run.distributed import launch

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
    from .output.progress import QuietReporter, Reporter
    from .output.tables import render_plan
    from .output.trackers import open_trackers
    from .recipe.loader import load_recipe
    from .run.engine import run_stages
    from .run.prepare import prepare_run

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
        from .output.tables import render_results
        from .store.runs import stage_results

        render_results(stage_results(ctx.run_dir), reporter.console)
        how = f"llmforge chat {ctx.run_dir}" if ctx.template else f"llmforge sample {ctx.run_dir} --prompt ..."
        reporter.note(f"done: {ctx.run_dir} (try `{how}`)")


@app.command()
def prepare(recipe: Path = typer.Argument(..., help="The recipe YAML file."),
            run_dir: Optional[Path] = RunDirOption,
            overrides: Optional[List[str]] = SetOption):
    """Train the tokenizer and tokenize every source into the cache, then print the exact plan."""
    with user_errors():
        from .output.progress import Reporter
        from .output.tables import render_plan
        from .recipe.loader import load_recipe
        from .run.prepare import prepare_run

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
        from .starters import write_starter

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
        from .output.progress import make_console
        from .output.tables import render_plan
        from .recipe.loader import load_recipe
        from .recipe.loader import show_recipe as written
        from .run.prepare import estimate_plan

        spec = load_recipe(recipe, overrides or [])
        if show_recipe:
            sys.stdout.write(written(spec))
            return
        device, about = None, None
        if target:
            from .plan.devices import plan_target

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


RunDirArgument = typer.Argument(..., help="A run directory, e.g. runs/quickstart.")
StageOption = typer.Option(None, "--stage", help="Stage name (default: the last finished).")
MaxNewOption = typer.Option(200, "--max-new-tokens", min=1)
TemperatureOption = typer.Option(0.8, "--temperature", min=0.0, help="0 = greedy.")
TopKOption = typer.Option(50, "--top-k", min=1)
SeedOption = typer.Option(0, "--seed")


@app.command()
def sample(run_dir: Path = RunDirArgument,
           prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue (with --chat: a user message)."),
           chat_mode: bool = typer.Option(False, "--chat", help="Prompt through the chat template; print the reply."),
           stage: Optional[str] = StageOption, max_new_tokens: int = MaxNewOption,
           temperature: float = TemperatureOption, top_k: Optional[int] = TopKOption, seed: int = SeedOption):
    """Continue a prompt with a trained stage's model (or, with --chat, answer it)."""
    with user_errors():
        from .model.generate import reply
        from .model.generate import sample as generate
        from .run.evaluation import load_for_generation
        from .store.final import chat_template, final_template, find_stage

        final = find_stage(run_dir, stage)
        model, tokenizer, amp = load_for_generation(final)
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        if chat_mode:
            pieces = reply(model, tokenizer, chat_template(final), [{"role": "user", "content": prompt}], **options)
        else:
            sys.stdout.write(prompt)
            pieces = generate(model, tokenizer, prompt, final_template(final), **options)
        with amp:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")


@app.command()
def chat(run_dir: Path = RunDirArgument, stage: Optional[str] = StageOption,
         system: Optional[str] = typer.Option(None, "--system", help="A system message to start with."),
         max_new_tokens: int = MaxNewOption, temperature: float = TemperatureOption,
         top_k: Optional[int] = TopKOption, seed: int = SeedOption):
    """Chat with a trained stage in the terminal. One line per message; /reset starts over,
    /quit (or end of input) leaves. Reads stdin, so it can be scripted: echo hi | llmforge chat RUN."""
    with user_errors():
        from .model.generate import reply
        from .run.evaluation import load_for_generation
        from .store.final import chat_template, find_stage

        final = find_stage(run_dir, stage)
        model, tokenizer, amp = load_for_generation(final)
        template = chat_template(final)
        start = [{"role": "system", "content": system}] if system else []
        messages = list(start)
        tty = sys.stdin.isatty()
        err.print(f"chatting with {final.parent.name} ({run_dir}); /reset starts over, /quit leaves")
        turn = 0
        while True:
            try:
                line = input("you> " if tty else "")
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line == "/quit":
                break
            if line == "/reset":
                messages = list(start)
                err.print("(new conversation)")
                continue
            messages.append({"role": "user", "content": line})
            sys.stdout.write("assistant> " if tty else "")
            text = ""
            with amp:
                for piece in reply(model, tokenizer, template, messages, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, seed=seed + turn):
                    text += piece
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": text.strip() or "..."})
            turn += 1


@app.command(name="eval")
def eval_(run_dir: Path = RunDirArgument, stage: Optional[str] = StageOption,
          tasks: Optional[str] = typer.Option(None, "--tasks", help="Tasks to run, comma-separated (default: the "
                                              "stage's eval.tasks): world-qa, or any lm-eval task (arc_easy, "
                                              "hellaswag, mmlu, gsm8k...; needs llmforge[eval])."),
          task: Optional[List[str]] = typer.Option(None, "--task", help="A task to run (repeatable; as --tasks)."),
          limit: Optional[int] = typer.Option(None, "--limit", min=1, help="lm-eval tasks: at most N documents each."),
          num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0,
                                                    help="lm-eval tasks: examples in each prompt."),
          apply_chat_template: bool = typer.Option(False, "--apply-chat-template",
                                                   help="lm-eval tasks: prompt through the stage's chat template."),
          include_path: Optional[Path] = typer.Option(None, "--include-path",
                                                      help="lm-eval tasks: a folder of task YAMLs of your own."),
          as_json: bool = typer.Option(False, "--json", help="Print the results as JSON.")):
    """Measure a finished stage on its held-out data (val loss/bpb; dpo: reward accuracy) and
    its task evals: llmforge's and lm-evaluation-harness's (results in the stage's eval.json too)."""
    with user_errors():
        from .output.progress import Reporter
        from .output.tables import render_results
        from .run.evaluation import evaluate_stage

        names = [t.strip() for t in (tasks or "").split(",") if t.strip()] + list(task or []) or None
        options = {"limit": limit, "num_fewshot": num_fewshot, "apply_chat_template": apply_chat_template or None,
                   "include_path": str(include_path.resolve()) if include_path else None}
        reporter = Reporter(err if as_json else None)  # --json: stdout holds the JSON alone
        try:
            results = evaluate_stage(run_dir, stage, names, reporter, options)
        finally:
            reporter.close()
        if as_json:
            sys.stdout.write(json.dumps(results, indent=1) + "\n")
        else:
            render_results([results], reporter.console, title=f"{run_dir}: stage {results['stage']}")


@app.command(name="lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                             "help_option_names": []})
def lm_eval_(ctx: typer.Context):
    """lm-evaluation-harness's own command line with llmforge's model registered: `llmforge lm-eval
    --model llmforge --model_args run=runs/x,stage=sft --tasks arc_easy` (every argument goes to
    lm-eval unchanged; `--help` is lm-eval's)."""
    with user_errors():
        from .tasks import load_harness

        load_harness("lm-eval: its command line and models")  # registers --model llmforge
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm-eval", *ctx.args]
        cli_evaluate()


@app.command()
def export(run_dir: Path = RunDirArgument, stage: Optional[str] = StageOption,
           out: Path = typer.Option(..., "--out", help="Folder to write (must not exist, or be empty)."),
           dtype: str = typer.Option("fp32", "--dtype", help="Weights as fp32, bf16 or fp16."),
           adapter: bool = typer.Option(False, "--adapter", help="Write the stage's LoRA adapter alone, as a "
                                        "PEFT folder to load onto its base model.")):
    """Write a finished stage as a Hugging Face transformers model folder of its family (the one
    it was imported as, or its preset's: Llama, Qwen2, Qwen3, Mistral, Phi-3, GPT-2): config.json,
    generation_config.json, model.safetensors, and the tokenizer with the chat template. A stage
    trained with an adapter exports merged; with --adapter, as PEFT's adapter folder."""
    with user_errors():
        from .errors import RecipeError
        from .export.hf import DTYPES, export_stage
        from .store.final import find_stage

        if dtype not in DTYPES:
            raise RecipeError([f"--dtype: unknown dtype {dtype!r}"], hint=f"use one of {', '.join(DTYPES)}")
        final = find_stage(run_dir, stage)
        if adapter:
            from .export.peft import export_adapter

            arch, record = export_adapter(final, out)
            base = record["base"]
            onto = base if record.get("base_kind") == "hf" else f"an export of stage {base} (llmforge export " \
                                                                  f"{run_dir} --stage {base} --out BASE)"
            err.print(f"exported {final.parent.name}'s adapter for {arch} to {out}; load it with "
                      f"peft.PeftModel.from_pretrained onto {onto}", highlight=False)
            return
        with err.status(f"exporting {final.parent.name} ..."):  # a spinner on a terminal; large models take a while
            arch, warnings = export_stage(final, out, dtype)
        for warning in warnings:
            err.print(f"[yellow]warning:[/] {escape(warning)}")
        err.print(f"exported {final.parent.name} as {arch} ({dtype}) to {out}")


@app.command()
def report(run_dir: Path = RunDirArgument,
           out: Optional[Path] = typer.Option(None, "--out", help="Folder to write into (default: the run directory).")):
    """Write report.html (self-contained, plots embedded) and its PNGs: every stage's train loss and
    held-out bpb on one timeline, the lr schedule, tokens/s and MFU, preference and reward curves,
    the results and the plan. Made from metrics.jsonl, so it works while the run goes on."""
    with user_errors():
        from .output.report import write_report

        page, *pngs = write_report(run_dir, out)
        err.print(f"wrote {page} (with {', '.join(p.name for p in pngs)} beside it)", highlight=False)


@app.command()
def compare(run_dirs: List[Path] = typer.Argument(..., help="Two or more run directories."),
            out: Path = typer.Option(Path("compare.png"), "--out", help="The PNG of overlaid held-out curves.")):
    """Runs side by side: each stage's final held-out figures, the recipe keys that differ, and one
    PNG overlaying their held-out curves."""
    with user_errors():
        from .output.progress import make_console
        from .output.tables import render_comparison
        from .output.report import compare_runs, write_comparison

        runs, labels, rows, differ = compare_runs(run_dirs)
        render_comparison(labels, rows, differ, make_console())
        try:
            err.print(f"wrote {write_comparison(runs, labels, out)}", highlight=False)
        except LlmforgeError as e:  # the table stands without the plot
            err.print(f"[yellow]warning:[/] {escape(e.message)}; {escape(e.hint or '')}")


@app.command()
def schema():
    """Print the recipe's JSON Schema (editors use docs/recipe.schema.json for completion)."""
    from .recipe.keydocs import recipe_json_schema

    sys.stdout.write(recipe_json_schema())


def main() -> None:
    app(prog_name="llmforge")  # the same name (and completion script) whether run as llmforge or python -m
