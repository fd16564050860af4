"""Commands that use a finished stage: sample, chat, eval, lm-eval, export."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from .app import RunDirArgument, StageOption, app, err, user_errors

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
        from ..model.generate import reply
        from ..model.generate import sample as generate
        from ..run.evaluation import load_for_generation
        from ..store.final import chat_template, final_template, find_stage

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
        from ..model.generate import reply
        from ..run.evaluation import load_for_generation
        from ..store.final import chat_template, find_stage

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
        from ..output.progress import Reporter
        from ..output.tables import render_results
        from ..run.evaluation import evaluate_stage

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
        from ..tasks import load_harness

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
        from ..errors import RecipeError
        from ..export.hf import DTYPES, export_stage
        from ..store.final import find_stage

        if dtype not in DTYPES:
            raise RecipeError([f"--dtype: unknown dtype {dtype!r}"], hint=f"use one of {', '.join(DTYPES)}")
        final = find_stage(run_dir, stage)
        if adapter:
            from ..export.peft import export_adapter

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
