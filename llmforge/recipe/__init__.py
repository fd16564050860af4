"""Recipes: the schema, loading with overrides, and comparing two recipes."""

from __future__ import annotations

import yaml

from .loader import apply_override, format_loc, load_recipe, validate_recipe
from .schema import Recipe, StageSpec
from .values import parse_count, resolve_percent

__all__ = [
    "Recipe", "StageSpec", "apply_override", "diff_recipes", "dump_recipe", "format_loc",
    "load_recipe", "parse_count", "recipe_json_schema", "resolve_percent", "validate_recipe",
]


def recipe_json_schema() -> str:
    """JSON Schema of a recipe, for editors: `# yaml-language-server: $schema=docs/recipe.schema.json`."""
    import json

    return json.dumps(Recipe.model_json_schema(), indent=1) + "\n"


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled, overrides applied) as YAML, for the run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def diff_recipes(old, new, loc: tuple = ()) -> list[tuple[str, object, object]]:
    """(key path, old value, new value) for every leaf that differs between two plain-data recipes."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += diff_recipes(old.get(key), new.get(key), loc + (key,))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in diff_recipes(a, b, loc + (i,))]
    return [] if old == new else [(format_loc(loc), old, new)]
