"""The generated parts of the docs: docs/cli.md from the Typer app itself (every command, its
arguments and options with their defaults and help, in the order `llmforge --help` lists them), and
the key tables of docs/recipe.md from the recipe schema (type, default and allowed values from
the schema; what each key means from recipe/keydocs.py), each between `<!-- keys: NAME -->` and
`<!-- /keys -->`. tests/test_docs.py fails when either is stale; `python -m llmforge.reference`
rewrites both."""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

import typer.main


def cli_reference() -> str:
    from .cli import app

    commands = typer.main.get_command(app).commands  # in the order they are defined, as --help lists them
    out = ["# Command-line reference", "",
           "Generated from the commands themselves (`python -m llmforge.reference`); "
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


def recipe_tables() -> dict[str, str]:
    """Each key table of docs/recipe.md, by name (recipe/keydocs.py TABLES)."""
    from .recipe.keydocs import DEFAULTS, MEANINGS, recipe_json_schema, table_keys

    tables, missing = {}, []
    for name, rows in table_keys(json.loads(recipe_json_schema())).items():
        lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, prop, required in rows:
            missing += [key] if key not in MEANINGS else []
            default = DEFAULTS.get(key) or _default(key, prop, required)
            cells = [f"`{key.split('.', 1)[1] if '.' in key and name != 'top' else key}`", _type(prop), default,
                     MEANINGS.get(key, "")]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        tables[name] = "\n".join(lines)
    if missing:
        raise KeyError(f"recipe/keydocs.py MEANINGS has no entry for {missing}")
    return tables


def _type(prop: dict) -> str:
    """A schema node's type as a reader would say it: count, int, `a`/`b`, list of ..."""
    alternatives = [a for a in prop.get("anyOf", prop.get("oneOf", [prop])) if a.get("type") != "null"]
    if len(alternatives) > 1 or alternatives[0] is not prop:
        if any(a.get("type") == "string" and "Ki" in a.get("pattern", "") for a in alternatives):
            return "count"  # an int, or one written like 20M or 128Ki
        return " or ".join(dict.fromkeys(_type(a) for a in alternatives))
    if "enum" in prop:
        return " / ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    if "$ref" in prop:
        return "section"
    kind = prop.get("type")
    if kind == "array":
        if "prefixItems" in prop:
            return "[" + ", ".join(_type(p) for p in prop["prefixItems"]) + "]"
        return "list of " + ("sections" if "$ref" in prop["items"] else _type(prop["items"]))
    if kind == "object" and "properties" in prop:
        return "section"
    if kind == "object":
        values = prop.get("additionalProperties") or next(iter(prop.get("patternProperties", {}).values()), {})
        if values is True:  # any keys, any values: a plugin's own options
            return "map"
        return "map: name -> " + ("section" if "$ref" in values else _type(values))
    if kind == "string":
        return "share (`5%`)" if "%" in prop.get("pattern", "") else "name" if "pattern" in prop else "text"
    return {"integer": "int", "number": "number", "boolean": "bool"}.get(kind, "any")


def _default(key: str, prop: dict, required) -> str:
    from .recipe.keydocs import TABLES
    from .recipe.schema import OPTION_KINDS
    from .stages import KINDS

    option = key.removeprefix(TABLES["stages"][0])
    if key.startswith(TABLES["stages"][0]) and option in OPTION_KINDS:  # each kind's own default
        defaults = {k: KINDS[k].Options.model_fields[option] for k in OPTION_KINDS[option]}
        shown = {k: "required" if f.is_required() else _value(f.default, prop) for k, f in defaults.items()}
        if len(set(shown.values())) == 1:
            return next(iter(shown.values()))
        return ", ".join(f"{k}: {v}" for k, v in shown.items())
    if required:
        return required if isinstance(required, str) else "required"
    return _value(prop["default"], prop) if "default" in prop else "none"


def _value(value, prop: dict) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and value >= 1024 and _type(prop) == "count":  # as a recipe would write it
        for suffix, unit in (("Mi", 2**20), ("Ki", 2**10), ("M", 10**6), ("k", 10**3)):
            if value % unit == 0:
                return f"`{value // unit}{suffix}`"
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(map(str, value)) + "]`"
    return f"`{value}`"


def fill_recipe_doc(text: str) -> str:
    """docs/recipe.md with each `<!-- keys: NAME -->` ... `<!-- /keys -->` block regenerated."""
    tables = recipe_tables()

    def table(m: re.Match) -> str:
        return f"{m.group(1)}\n{tables[m.group(2)]}\n{m.group(3)}"
    return re.sub(r"(<!-- keys: (\w+) -->)\n.*?\n(<!-- /keys -->)", table, text, flags=re.S)


if __name__ == "__main__":
    docs = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    (docs / "cli.md").write_text(cli_reference())
    (docs / "recipe.md").write_text(fill_recipe_doc((docs / "recipe.md").read_text()))
    print(f"wrote {docs / 'cli.md'} and the key tables of {docs / 'recipe.md'}")
