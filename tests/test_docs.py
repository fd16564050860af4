"""The docs are part of the feature: the generated CLI reference is current, and every `llmforge`
command line shown in README.md and docs/ names a real command with options it takes."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import typer.main
import yaml

from llmforge.cli import app
from llmforge.recipe import keydocs as KEYDOCS
from llmforge.reference import cli_reference, fill_recipe_doc

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "cli.md")]  # cli.md: synopses


def test_the_cli_reference_is_current():
    assert (REPO / "docs/cli.md").read_text() == cli_reference(), "docs/cli.md is stale: python -m llmforge.reference"


def test_the_recipe_reference_tables_are_current():
    """docs/recipe.md's key tables are generated from the schema and recipe/keydocs.py's meanings:
    a key added, renamed, given another default or another meaning without regenerating fails here
    (and recipe_tables refuses a key without a meaning)."""
    text = (REPO / "docs/recipe.md").read_text()
    assert text.count("<!-- keys: ") == len(KEYDOCS.TABLES), "every table of recipe/keydocs.py appears once"
    assert text == fill_recipe_doc(text), "docs/recipe.md is stale: python -m llmforge.reference"


def test_every_meaning_belongs_to_a_key_and_reaches_the_editor():
    from llmforge.recipe.keydocs import recipe_json_schema

    schema = json.loads(recipe_json_schema())
    keys = [key for rows in KEYDOCS.table_keys(schema).values() for key, _, _ in rows]
    assert sorted(KEYDOCS.MEANINGS) == sorted(keys), "recipe/keydocs.py MEANINGS must hold exactly the schema's keys"
    lr = schema["$defs"]["OptimizerSpec"]["properties"]["lr"]
    assert lr["description"].startswith("peak learning rate") and "`muon`" in lr["markdownDescription"]
    assert json.loads((REPO / "docs/recipe.schema.json").read_text()) == schema


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2's numbers, as editors' YAML servers read them: `1e-3` is a float (PyYAML's 1.1
    rules make it a string, which llmforge's loader then converts)."""


Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")) + sorted(
    (REPO / "llmforge/starters").glob("*.yaml")), ids=lambda p: p.name)
def test_the_editors_schema_accepts_every_shipped_recipe(recipe):
    """What an editor checks against docs/recipe.schema.json: no red line under a recipe that
    llmforge runs (smollm2-assistant: model.init.hf supplies the architecture and tokenizer)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads((REPO / "docs/recipe.schema.json").read_text()))
    data = yaml.load(recipe.read_text().replace("{name}", "starter"), Loader=Yaml12Loader)
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]
    assert not problems, problems
    assert list(validator.iter_errors({"name": "x", "model": {"n_layer": 2}, "data": {}, "stages": []}))


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_names_the_schema_for_editors(recipe):
    """Its first line points an editor's YAML server at the schema (completion, red lines), as
    `llmforge init` writes for a new recipe."""
    assert recipe.read_text().startswith("# yaml-language-server: $schema=../docs/recipe.schema.json\n")


def test_every_recipe_key_is_in_the_recipe_reference():
    """Every key anywhere in the schema (the tables' and those of nested sections) is named in docs/recipe.md."""
    from llmforge.recipe.keydocs import recipe_json_schema

    keys: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            keys.update(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(recipe_json_schema()))
    code = " ".join(re.findall(r"`[^`]*`", (REPO / "docs/recipe.md").read_text()))
    missing = sorted(k for k in keys if not re.search(rf"\b{re.escape(k)}\b", code))
    assert len(keys) > 100 and not missing, f"docs/recipe.md does not document: {missing}"


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
    if command.context_settings.get("ignore_unknown_options"):  # `lm-eval`: lm-eval's own arguments
        return
    options = {o for p in command.params for o in p.opts + p.secondary_opts}
    for arg in args[1:]:
        name = arg.split("=")[0]
        if name.startswith("-"):
            assert name in options, f"{where}: {args[0]} takes no {name} ({line})"
    command.make_context(args[0], args[1:])  # types and arity as the CLI checks them
