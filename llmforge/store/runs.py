"""Reading a run directory back: its recipe, plan and every stage's metrics.jsonl, finished or not.

`metrics.jsonl` is the source of truth for reports and comparisons; this module only reads, so a
report can be made while the run is still writing (a line cut mid-write is skipped).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import CheckpointError

LATER = "later-evals.json"  # what `llmforge eval` measured on a finished stage (final_results)


@dataclass
class StageRun:
    dir_name: str  # 01-pretrain
    name: str
    kind: str
    steps: int  # planned steps (the x-axis length of the stage)
    train: list[dict] = field(default_factory=list)  # step lines (they carry "lr")
    evals: list[dict] = field(default_factory=list)  # held-out and task figures
    results: dict | None = None  # final/eval.json once the stage finished
    offset: int = 0  # steps of the stages before it: its place on the run's timeline

    @property
    def done(self) -> bool:
        return self.results is not None

    @property
    def last_step(self) -> int:
        return max([r["step"] for r in self.train + self.evals], default=0)

    @property
    def seconds(self) -> float | None:
        """Wall time between the stage's first and last metrics line (resumes included)."""
        times = [r["time"] for r in self.train + self.evals if "time" in r]
        return max(times) - min(times) if len(times) > 1 else None

    def series(self, key: str, evals: bool = False) -> tuple[list[int], list[float]]:
        """(global steps, values) of one figure."""
        rows = [r for r in (self.evals if evals else self.train) if isinstance(r.get(key), (int, float))]
        return [self.offset + r["step"] for r in rows], [float(r[key]) for r in rows]


@dataclass
class Run:
    path: Path
    name: str
    recipe: dict
    plan: dict | None
    stages: list[StageRun]

    @property
    def done(self) -> bool:
        return bool(self.stages) and all(s.done for s in self.stages)


def read_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        if not isinstance(recipe, dict):
            raise ValueError("recipe.yaml is not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise CheckpointError(f"{run_dir}: not a run directory ({e})",
                              hint="point at a folder made by `llmforge run`, e.g. runs/quickstart") from None
    plan = _json(run_dir / "plan.json")
    # The plan lists every stage, started or not; without one, the stage folders there are.
    planned = [(sp["dir_name"], sp["name"], sp["kind"], sp["steps"]) for sp in (plan or {}).get("stages", [])]
    if not planned:
        kinds = {s.get("name"): s.get("kind", "pretrain") for s in recipe.get("stages", []) if isinstance(s, dict)}
        planned = [(f.name, f.name.split("-", 1)[-1], kinds.get(f.name.split("-", 1)[-1], "?"), 0)
                   for f in sorted((run_dir / "stages").glob("*-*")) if f.is_dir()]
    stages, offset = [], 0
    for dir_name, name, kind, steps in planned:
        folder = run_dir / "stages" / dir_name
        stage = StageRun(dir_name, name, kind, steps)
        for record in _lines(folder / "metrics.jsonl"):
            (stage.train if "lr" in record else stage.evals).append(record)
        stage.results = final_results(folder / "final")
        stage.steps = stage.steps or stage.last_step
        stage.offset, offset = offset, offset + stage.steps
        stages.append(stage)
    return Run(run_dir, str(recipe.get("name", run_dir.name)), recipe, plan, stages)


def final_figures(stage: StageRun) -> dict:
    """The stage's last held-out figures: final/eval.json when it finished, else its latest eval."""
    if stage.results is not None:
        return stage.results
    latest: dict = {}
    for record in stage.evals:
        latest |= {k: v for k, v in record.items() if k not in ("step", "time")}
    return latest


def _lines(path: Path) -> list[dict]:
    out = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written, or cut by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def final_results(final: Path) -> dict | None:
    """A finished stage's figures: final/eval.json as saved when it finished, with what `llmforge
    eval` measured on those weights since (LATER, beside final/: final/ is sealed as it was written,
    and later stages may stand on its checksums)."""
    results = _json(final / "eval.json")
    return None if results is None else results | (_json(final.parent / LATER) or {})


def record_later(final: Path, results: dict) -> None:
    """Keep figures `llmforge eval` measured on a stage's final weights (merged over earlier ones)."""
    path = final.parent / LATER
    tmp = path.with_name(f".tmp-{LATER}-{os.getpid()}")
    tmp.write_text(json.dumps((_json(path) or {}) | results, indent=1))
    os.replace(tmp, path)


def stage_results(run_dir: Path) -> list[dict]:
    """Each finished stage's final eval results (final_results)."""
    out = []
    for final in sorted((run_dir / "stages").glob("*/final")):
        try:
            config = json.loads((final / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if (results := final_results(final)) is not None:
            out.append({"stage": config["stage"], "kind": config["kind"]} | results)
    return out
