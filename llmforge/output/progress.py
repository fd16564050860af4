"""Showing a run: a rich live view on a terminal, plain lines otherwise, metrics.jsonl always.

The engine calls one Reporter interface; whether anything is drawn is the reporter's business,
so the training loop has no `if tty` branches.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

from .trackers import NO_TRACKERS

_SPARKS = "▁▂▃▄▅▆▇█"
# Step figures shown beside the loss (dpo's, a reward model's, grpo's); all are in metrics.jsonl.
_SHOWN = ("reward_acc", "reward_margin", "accuracy", "margin", "reward", "kl")


class Reporter:
    """verbosity: -1 (--quiet) shows no steps or evals, only notes and the end; 1 (--verbose) every
    figure of every step and eval line."""

    def __init__(self, console: Console | None = None, live: bool | None = None, verbosity: int = 0):
        self.console = console or make_console()
        self.verbosity = verbosity
        self.live = (self.console.is_terminal if live is None else live) and verbosity >= 0
        self.losses: list[float] = []  # the live view's sparkline
        self.info = ""  # the live line's sparkline and figures, shown again after each busy() note
        self.metrics_file = None
        self.progress: Progress | None = None
        self.task_id = None
        self.stage = None
        self.trackers = NO_TRACKERS  # runtime.trackers, once the run directory holds its plan (track)

    def track(self, trackers) -> None:
        self.trackers = trackers

    # -- messages and preparation ----------------------------------------------------------------
    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    @contextlib.contextmanager
    def task(self, description: str, total_bytes: int | None):
        """A bounded piece of preparation work; yields advance(n_bytes)."""
        if not self.live:
            self.note(f"{description} ...")
            yield lambda n: None
            return
        columns = [TextColumn("{task.description}"), BarColumn()]
        if total_bytes:
            columns += [DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=True) as progress:
            tid = progress.add_task(description, total=total_bytes)
            yield lambda n: progress.advance(tid, n)

    @contextlib.contextmanager
    def busy(self, what: str):
        """Work of unknown length that plain output need not mention (an eval, a checkpoint write,
        a reference pass): said in the stage's live line, or by a spinner before a stage starts."""
        if self.progress:  # said in place of the loss, which comes back after (the line a stage ends on)
            self.progress.update(self.task_id, info=f"{what} ...")
            try:
                yield
            finally:
                if self.progress:
                    self.progress.update(self.task_id, info=self.info)
        elif self.live:
            with Progress(SpinnerColumn(), TextColumn(what), console=self.console, transient=True):
                yield
        else:
            yield

    # -- stages ----------------------------------------------------------------------------------
    def stage_start(self, sp, start_step: int, metrics_path: Path) -> None:
        self.stage = sp
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        resumed_at = _truncate_metrics(metrics_path, start_step)
        if resumed_at:  # the trackers drop what the killed process logged from here: this line again
            self.trackers.log(sp.name, start_step, {k: v for k, v in resumed_at.items() if k != "step"})
        self.metrics_file = open(metrics_path, "a")
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self.progress.start()
            self.task_id = self.progress.add_task(sp.name, total=sp.steps, completed=start_step, info="")
        else:
            self.note(f"stage {sp.name}: steps {start_step}..{sp.steps}")
        self.losses, self.info = [], ""

    def log(self, step: int, metrics: dict) -> None:
        self._write({"step": step, **metrics})
        self.trackers.log(self.stage.name, step, metrics)
        extra = "".join(f"{k} {metrics[k]:.3f}  " for k in _SHOWN if k in metrics)
        mfu = f"  mfu {metrics['mfu']:.0%}" if "mfu" in metrics else ""
        if metrics.get("first_step_s", 0) > 2:  # torch.compile's compilation, mostly
            self.note(f"{self.stage.name}: the first step took {metrics['first_step_s']:.1f} s (compilation and "
                      "warm-up; not counted in tok/s)")
        eta = f"  eta {duration(metrics['eta_s'])}" if "eta_s" in metrics else ""
        if self.verbosity > 0:
            extra = "".join(f"{k} {v:.4g}  " for k, v in metrics.items()
                            if k not in ("loss", "lr", "tokens_per_s", "mfu", "eta_s", "time", "first_step_s"))
        info = (f"loss {metrics['loss']:.4f}  {extra}lr {metrics['lr']:.2e}  "
                f"{metrics.get('tokens_per_s', 0):,.0f} tok/s{mfu}{eta}")
        if self.progress:
            self.losses = (self.losses + [metrics["loss"]])[-24:]
            self.info = f"{sparkline(self.losses)}  {info}"
            self.progress.update(self.task_id, completed=step, info=self.info)
        elif self.verbosity >= 0:
            self.note(f"{self.stage.name} step {step}/{self.stage.steps}  {info}")

    def log_eval(self, step: int, metrics: dict) -> None:
        if not metrics:
            return
        self._write({"step": step, **metrics})
        self.trackers.log(self.stage.name, step, metrics)
        # Overall figures only (per-source ones, "val/<source>/...", are in metrics.jsonl).
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if self.verbosity > 0 or
                          k.startswith("val_") or (k.count("/") == 1 and not k.startswith(("val/", "data/"))))
        if self.verbosity >= 0:
            self.console.print(f"{self.stage.name} step {step}/{self.stage.steps}  {shown}", markup=False,
                               highlight=False)

    def stage_end(self, sp) -> None:
        if self.progress:
            self.progress.update(self.task_id, completed=sp.steps)
            self.progress.stop()
            self.progress = None
        if self.metrics_file:
            self.metrics_file.close()
            self.metrics_file = None
        self.trackers.stage_end(sp.name, sp.steps)
        self.note(f"stage {sp.name}: done")

    def close(self) -> None:
        self.trackers.close()
        if self.progress:
            self.progress.stop()
            self.progress = None
        if self.metrics_file:
            self.metrics_file.close()
            self.metrics_file = None

    def _write(self, record: dict) -> None:
        if self.metrics_file:
            # Wall-clock time too, so curves can be drawn against time (benchmarks/time_to_quality.py).
            self.metrics_file.write(json.dumps(record | {"time": round(time.time(), 3)}) + "\n")
            self.metrics_file.flush()


class QuietReporter:
    """The reporter of ranks other than 0 in a distributed run: they train, rank 0 tells."""

    console = Console(quiet=True)

    def note(self, text: str) -> None:
        pass

    @contextlib.contextmanager
    def task(self, description: str, total_bytes: int | None):
        yield lambda n: None

    def busy(self, what: str):
        return contextlib.nullcontext()

    def stage_start(self, sp, start_step: int, metrics_path: Path) -> None:
        pass

    def log(self, step: int, metrics: dict) -> None:
        pass

    log_eval = log

    def stage_end(self, sp) -> None:
        pass

    def close(self) -> None:
        pass


def sparkline(values: list[float]) -> str:
    """A loss curve in one line of block characters (lowest ▁, highest █)."""
    lo, hi = min(values), max(values)
    return "".join(_SPARKS[int((v - lo) / (hi - lo) * 7.999) if hi > lo else 0] for v in values)


def make_console() -> Console:
    """Log lines are never wrapped; piped output (logs, CI) gets room for full tables."""
    console = Console(soft_wrap=True, highlight=False, emoji=False)
    return console if console.is_terminal else Console(soft_wrap=True, highlight=False, emoji=False, width=160)


def _truncate_metrics(path: Path, start_step: int) -> dict | None:
    """On resume, drop what the resumed steps will log again (evals at start_step included);
    return the training line at start_step, which stays."""
    if not path.exists():
        return None
    keep, at_start = [], None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        # At start_step itself only the training line stays: its evals and task scores come again.
        if rec.get("step", 0) < start_step or (rec.get("step") == start_step and "lr" in rec):
            keep.append(line)
            at_start = rec if rec.get("step") == start_step else at_start
    path.write_text("".join(k + "\n" for k in keep))
    return at_start


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def si(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"
