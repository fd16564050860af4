"""The command line's common ground: the Typer app, the one place that turns an LlmforgeError into
red lines + a hint and exit code 2 (`user_errors`), and the options several commands share."""

from __future__ import annotations

import contextlib
import signal

import typer
from rich.console import Console
from rich.markup import escape

from ..core.durable import NO_SPACE, PATH_ERRORS
from ..errors import Interrupted, LlmforgeError, PeerFailed

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train language models from one declarative YAML recipe.")
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

SetOption = typer.Option(None, "--set", help="Override a recipe key: key.path=value (repeatable), "
                                             "e.g. stages[0].optimizer.lr=1e-3 or stages.pretrain.steps=100.")
RunDirOption = typer.Option(None, "--run-dir", help="Run directory (default: runs/<recipe name>).")
RunDirArgument = typer.Argument(..., help="A run directory, e.g. runs/quickstart.")
StageOption = typer.Option(None, "--stage", help="Stage name (default: the last finished).")


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
            from ..run.distributed import exit_now

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
        from ..run.distributed import PEER_LOST, peer_failure

        if world > 1 and peer_failure(e):  # another rank died; its message (or the launcher's) is the one to read
            raise typer.Exit(PEER_LOST)
        raise


def main() -> None:
    app(prog_name="llmforge")  # the same name (and completion script) whether run as llmforge or python -m
