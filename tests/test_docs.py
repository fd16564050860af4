"""The docs are part of the feature: the generated CLI reference is current, and every `llmforge`
command line shown in README.md and docs/ names a real command with options it takes."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import typer.main

from llmforge.cli import app
from llmforge.reference import cli_reference

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "cli.md")]  # cli.md: synopses


def test_the_cli_reference_is_current():
    assert (REPO / "docs/cli.md").read_text() == cli_reference(), \
        "docs/cli.md is stale: python -m llmforge.reference > docs/cli.md"


def shown_commands() -> list[tuple[str, str]]:
    """(page:line, command line) of each `llmforge ...` line in a fenced block, comments cut."""
    out = []
    for page in PAGES:
        fenced = False
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            text = line.split(" #")[0].strip()
            if fenced and text.startswith("llmforge "):
                out.append((f"{page.name}:{n}", text.rstrip("\\").strip()))
    return out


def test_docs_show_commands():
    assert len(shown_commands()) >= 20


@pytest.mark.parametrize("where, line", shown_commands(), ids=[w for w, _ in shown_commands()])
def test_every_command_in_the_docs_parses(where, line):
    group = typer.main.get_command(app)
    args = shlex.split(line.replace("...", "X"))[1:]
    if args[0].startswith("--"):  # a group option: --install-completion, --help
        assert args[0] in {o for p in group.params for o in p.opts}, f"{where}: {line}"
        return
    assert args[0] in group.commands, f"{where}: no command {args[0]!r} in {line}"
    command = group.commands[args[0]]
    options = {o for p in command.params for o in p.opts + p.secondary_opts}
    for arg in args[1:]:
        name = arg.split("=")[0]
        if name.startswith("-"):
            assert name in options, f"{where}: {args[0]} takes no {name} ({line})"
    command.make_context(args[0], args[1:])  # types and arity as the CLI checks them
