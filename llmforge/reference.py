"""docs/cli.md, generated from the Typer app itself: every command, its arguments and options with
their defaults and help, in the order `llmforge --help` lists them. tests/test_docs.py fails when
the committed page is stale; regenerate it with `python -m llmforge.reference > docs/cli.md`."""

from __future__ import annotations

import inspect

import typer.main


def cli_reference() -> str:
    from .cli import app

    commands = typer.main.get_command(app).commands  # in the order they are defined, as --help lists them
    out = ["# Command-line reference", "",
           "Generated from the commands themselves (`python -m llmforge.reference > docs/cli.md`); "
           "`llmforge COMMAND --help` says the same. Every command exits 0 when done, 2 on a problem "
           "you can fix (one red line naming it, and a hint), 130/143 when interrupted.", ""]
    out += [f"- [`{name}`](#llmforge-{name}): {_first_line(c)}" for name, c in commands.items()]
    for name, command in commands.items():
        params = [p for p in command.params if p.name != "help" and not getattr(p, "hidden", False)]
        arguments = [p.name.upper() + ("" if p.required else "?") + ("..." if p.nargs == -1 else "")
                     for p in params if p.param_type_name == "argument"]
        usage = " ".join(["llmforge", name, *arguments] + (["[OPTIONS]"] if len(arguments) < len(params) else []))
        out += ["", f"## llmforge {name}", "", "```", usage, "```", "", inspect.cleandoc(command.help or "")]
        if params:
            out += ["", "| argument or option | default | meaning |", "|---|---|---|", *map(_row, params)]
    return "\n".join(out).rstrip() + "\n"


def _first_line(command) -> str:
    return " ".join(inspect.cleandoc(command.help or "").split("\n\n")[0].split()).split(". ")[0].rstrip(".")


def _row(param) -> str:
    if param.param_type_name == "argument":
        name = f"`{param.name.upper()}`"
    else:
        name = ", ".join(f"`{o}`" for o in param.opts + param.secondary_opts)
    if param.required:
        default = "required"
    elif getattr(param, "is_flag", False):
        default = "off"
    else:
        value = param.default
        default = "-" if value in (None, [], ()) else f"`{value}`"
    return f"| {name} | {default} | {' '.join((param.help or '').split()).replace('|', '/')} |"


if __name__ == "__main__":
    import sys

    sys.stdout.write(cli_reference())
