"""`llmforge report` and `llmforge compare` on real runs of a three-stage recipe (pretrain -> sft
-> dpo): the PNGs and the self-contained page of a finished run and of one killed mid-stage,
the comparison of two runs that differ in one key, and what a user sees without matplotlib."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmforge.cli import app

from .conftest import cli
from .test_faults import RECIPE
from .test_post import write_data

PNG = b"\x89PNG\r\n\x1a\n"


def train(folder: Path, run_dir: str, *overrides: str, faults: str = "") -> subprocess.CompletedProcess:
    sets = [a for o in overrides for a in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "llmforge", "run", "recipe.yaml", "--run-dir", run_dir, *sets],
                          cwd=folder, env=dict(os.environ, LLMFORGE_FAULTS=faults), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/a and runs/b (pretrain lr 3e-3 against 1e-3), and runs/cut: killed at dpo's step 4."""
    folder = tmp_path_factory.mktemp("views")
    write_data(folder)
    (folder / "recipe.yaml").write_text(RECIPE)
    for name, extra in (("a", ()), ("b", ("stages.pretrain.optimizer.lr=1e-3",))):
        result = train(folder, f"runs/{name}", *extra)
        assert result.returncode == 0, result.stderr
    result = train(folder, "runs/cut", faults="step:03-dpo:4=kill")
    assert result.returncode < 0, result.stderr
    return folder


def test_report_of_a_finished_run(runs):
    result = cli("report", "runs/a", cwd=runs)
    assert result.returncode == 0, result.stderr
    folder = runs / "runs/a"
    for name in ("loss.png", "lr.png", "throughput.png", "rewards.png"):  # dpo has reward figures
        assert (folder / name).read_bytes().startswith(PNG), name
    page = (folder / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert not re.search(r"(src|href)=\"(https?:|//)", page), "the page must be self-contained"
    assert "· finished ·" in page.replace("&middot;", "·") and "running or stopped" not in page
    # The results table holds each stage's final/eval.json, as the terminal's table shows them.
    for stage in ("01-pretrain", "02-sft", "03-dpo"):
        figures = json.loads((folder / "stages" / stage / "final/eval.json").read_text())
        assert f"{figures['val_loss']:.4f}" in page, stage
    assert "<td>12 / 12</td>" in page and "<td>8 / 8</td>" in page  # the plan table: steps done / planned


def test_report_of_a_run_still_going(runs):
    result = cli("report", "runs/cut", "--out", "cut-report", cwd=runs)
    assert result.returncode == 0, result.stderr
    page = (runs / "cut-report/report.html").read_text()
    # Killed as step 4 began: the last line written is step 2's (runtime.log_every 2).
    assert "running or stopped" in page and "stage dpo at step 2 of 8" in page
    assert (runs / "cut-report/loss.png").read_bytes().startswith(PNG)


def test_compare_names_the_key_that_differs_and_overlays_the_curves(runs):
    result = cli("compare", "runs/a", "runs/b", "--out", "ab.png", cwd=runs)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"pretrain val bpb\s+\d\.\d{4}\s+\d\.\d{4}", out), out
    assert re.search(r"stages\.pretrain\.optimizer\.lr\s+0\.003\s+0\.001", out), out
    differing = out[out.index("recipe keys that differ"):]
    assert len([l for l in differing.splitlines()[2:] if l.strip()]) == 1, "only lr differs"
    assert (runs / "ab.png").read_bytes().startswith(PNG)


def test_bad_input_is_one_line(runs, tmp_path):
    for args in (("report", tmp_path), ("compare", "runs/a"), ("compare", "runs/a", tmp_path)):
        result = cli(*args, cwd=runs)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: "), result.stderr


def test_without_matplotlib_report_says_how_to_get_it(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is missing
    monkeypatch.chdir(runs)
    result = CliRunner().invoke(app, ["report", "runs/a", "--out", "no-plots"])
    assert result.exit_code == 2
    assert "error: plots need matplotlib, which is not installed" in result.output
    assert "pip install 'llmforge[plot]'" in result.output
    result = CliRunner().invoke(app, ["compare", "runs/a", "runs/b"])  # the table stands without the plot
    assert result.exit_code == 0 and "stages.pretrain.optimizer.lr" in result.output
    assert "warning: plots need matplotlib" in result.output
