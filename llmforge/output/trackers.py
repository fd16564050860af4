"""Experiment trackers (`runtime.trackers: [tensorboard, wandb]`): what metrics.jsonl logs, also in
TensorBoard's event files (RUN_DIR/tensorboard/) and in a Weights & Biases run (online, or offline
with WANDB_MODE=offline; `wandb sync` uploads it later).

metrics.jsonl stays the record; a tracker is a copy. So a tracker that cannot start (its package
missing, no network) or fails later is one warning line, and training goes on without it. Only the
reporter of rank 0 holds trackers, so only rank 0 logs. Each figure is logged as `stage/key` at the
run's global step (the steps of the stages before it plus the stage's own), so the stages of a run
read as one timeline, as in `llmforge report`.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import yaml

from ..store.runs import stage_results

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}


class TensorBoard:
    def __init__(self, run_dir: Path, recipe: dict, plan: dict):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.open = lambda step: SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=step)
        self.texts = {"recipe": yaml.safe_dump(recipe, sort_keys=False), "plan": json.dumps(plan, indent=1)}
        self.writer = None

    def log(self, step: int, figures: dict) -> None:
        if self.writer is None:
            # Opened at the first step this process logs: on a resume, TensorBoard then drops what
            # the killed process logged from there on, as metrics.jsonl does, so no step shows twice.
            self.writer = self.open(step)
            for name, text in self.texts.items():
                self.writer.add_text(name, _code(text), step)
        for key, value in figures.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def results(self, step: int, rows: list[dict]) -> None:
        self.writer = self.writer or self.open(step)
        columns = sorted({k for r in rows for k in r} - {"stage", "kind"})
        table = ["| stage | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        table += [f"| {r['stage']} | " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
        self.writer.add_text("results", "\n".join(table), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, recipe: dict, plan: dict):
        import wandb

        # One W&B run per run directory, resumed with it: its id is kept beside the metrics.
        id_file = run_dir / "wandb-id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llmforge"), name=recipe.get("name"),
                              id=run_id, resume="allow", dir=str(run_dir),
                              config={"recipe": recipe, "plan": plan}, settings=wandb.Settings(quiet=True))
        id_file.write_text(run_id)

    def log(self, step: int, figures: dict) -> None:
        self.run.log(figures, step=step)

    def results(self, step: int, rows: list[dict]) -> None:
        columns = ["stage"] + sorted({k for r in rows for k in r} - {"stage", "kind"})
        self.run.log({"results": self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])},
                     step=step)

    def close(self) -> None:
        self.run.finish()


KINDS = {"tensorboard": TensorBoard, "wandb": WandB}


class Trackers:
    """The run's trackers behind one interface; a failing one warns once and is dropped."""

    def __init__(self, names: list[str], run_dir: Path, note):
        self.note, self.run_dir, self.live = note, run_dir, {}
        plan = json.loads((run_dir / "plan.json").read_text()) if names else {}
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if names else {}
        self.offsets, total = {}, 0
        for sp in plan.get("stages", []):
            self.offsets[sp["name"]], total = total, total + sp["steps"]
        for name in names:
            try:
                self.live[name] = KINDS[name](run_dir, recipe, plan)
            except ImportError:
                self.note(f"warning: runtime.trackers: {name} is not installed, so this run is not logged "
                          f"to it (pip install 'llmforge[{EXTRAS[name]}]'); training goes on")
            except Exception as e:  # no network, no login, a full disk: the run matters more
                self.note(f"warning: runtime.trackers: {name} could not start ({_short(e)}); training goes on")

    def log(self, stage: str, step: int, metrics: dict) -> None:
        figures = {f"{stage}/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "time"}
        self._each("log", self.offsets.get(stage, 0) + step, figures)

    def stage_end(self, stage: str, steps: int) -> None:
        """Every finished stage's final figures (final/eval.json), as one table."""
        if not self.live:
            return
        self._each("results", self.offsets.get(stage, 0) + steps, stage_results(self.run_dir))

    def close(self) -> None:
        self._each("close")
        self.live = {}

    def _each(self, method: str, *args) -> None:
        for name, tracker in list(self.live.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:
                self.note(f"warning: runtime.trackers: {name} failed ({_short(e)}); the run goes on without it")
                del self.live[name]


def _code(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # Markdown code block in TensorBoard's text tab


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def open_trackers(run_dir: Path, note) -> Trackers:
    """The trackers the run directory's recipe names (runtime.trackers)."""
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    return Trackers(recipe.get("runtime", {}).get("trackers", []), run_dir, note)


NO_TRACKERS = Trackers([], Path("."), lambda text: None)  # the reporter's default: logs nowhere
