"""Commands that read run folders or the schema: report, compare, schema."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from ..errors import LlmforgeError
from .app import RunDirArgument, app, err, user_errors


@app.command()
def report(run_dir: Path = RunDirArgument,
           out: Optional[Path] = typer.Option(None, "--out", help="Folder to write into (default: the run directory).")):
    """Write report.html (self-contained, plots embedded) and its PNGs: every stage's train loss and
    held-out bpb on one timeline, the lr schedule, tokens/s and MFU, preference and reward curves,
    the results and the plan. Made from metrics.jsonl, so it works while the run goes on."""
    with user_errors():
        from ..output.report import write_report

        page, *pngs = write_report(run_dir, out)
        err.print(f"wrote {page} (with {', '.join(p.name for p in pngs)} beside it)", highlight=False)


@app.command()
def compare(run_dirs: List[Path] = typer.Argument(..., help="Two or more run directories."),
            out: Path = typer.Option(Path("compare.png"), "--out", help="The PNG of overlaid held-out curves.")):
    """Runs side by side: each stage's final held-out figures, the recipe keys that differ, and one
    PNG overlaying their held-out curves."""
    with user_errors():
        from ..output.progress import make_console
        from ..output.tables import render_comparison
        from ..output.report import compare_runs, write_comparison

        runs, labels, rows, differ = compare_runs(run_dirs)
        render_comparison(labels, rows, differ, make_console())
        try:
            err.print(f"wrote {write_comparison(runs, labels, out)}", highlight=False)
        except LlmforgeError as e:  # the table stands without the plot
            err.print(f"[yellow]warning:[/] {escape(e.message)}; {escape(e.hint or '')}")


@app.command()
def schema():
    """Print the recipe's JSON Schema (editors use docs/recipe.schema.json for completion)."""
    from ..recipe.keydocs import recipe_json_schema

    sys.stdout.write(recipe_json_schema())
