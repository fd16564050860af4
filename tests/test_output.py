"""What a run prints: --quiet and --verbose, NO_COLOR on a terminal, the live view's sparkline,
and shell completion."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from llmforge.output.progress import sparkline

from .conftest import cli

COLOR = re.compile(r"\x1b\[[0-9;]*(3[0-7]|9[0-7]|38;[0-9;]+)m")  # a foreground colour


def test_quiet_and_verbose(tiny):
    quiet = cli("run", "recipe.yaml", "--quiet", cwd=tiny)
    assert quiet.returncode == 0, quiet.stderr
    assert "plan tiny" not in quiet.stdout and " step " not in quiet.stdout
    assert "results on held-out data" in quiet.stdout and "done: runs/tiny" in quiet.stdout
    verbose = cli("run", "recipe.yaml", "--verbose", "--restart", cwd=tiny)
    assert verbose.returncode == 0, verbose.stderr
    steps = [l for l in verbose.stdout.splitlines() if re.match(r"pretrain step \d+/40  loss", l)]
    assert steps and all("skipped 0" in l for l in steps)  # a figure the default lines leave to metrics.jsonl
    assert any("val/corpus/loss" in l for l in verbose.stdout.splitlines())


def test_no_color_on_a_terminal_and_the_live_view(tiny):
    colored = cli("run", "recipe.yaml", cwd=tiny, env={"FORCE_COLOR": "1", "NO_COLOR": ""})
    assert colored.returncode == 0 and COLOR.search(colored.stdout + colored.stderr), "a terminal gets colour"
    assert re.search("[▁▂▃▄▅▆▇█]{2,}", colored.stdout), "the live view's loss sparkline"
    plain = cli("run", "recipe.yaml", "--restart", cwd=tiny, env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert plain.returncode == 0 and not COLOR.search(plain.stdout + plain.stderr)


def test_sparkline():
    assert sparkline([3.0, 2.0, 1.0, 1.0]) == "█▄▁▁"
    assert sparkline([1.0, 1.0]) == "▁▁"


def test_shell_completion():
    """Typer finds the shell in the process tree (not from an argument), so ask from inside bash."""
    result = subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -m llmforge --show-completion; exit $?"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "_llmforge_completion" in result.stdout
