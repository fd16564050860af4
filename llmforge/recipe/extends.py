"""Shared base recipes: `extends: base.yaml` (or a list of files) is merged under the recipe before
anything else reads it.

The merge is what a practitioner expects from a config overlay: mappings merge key by key, lists
are replaced whole, and `stages` are matched by name (a stage the base lacks is added at the end).
Bases are local files only, relative to the file that names them; a cycle is an error naming the
chain. Every key keeps the file and line it was written at, so a bad value inherited from a base
is reported there.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.paths import recipe_path
from ..errors import RecipeError
from .reading import Loc, read_yaml

Where = tuple[Path, int]  # (file, line)


class _Map(dict):
    """A mapping that remembers where each of its keys was written (and where it starts)."""
    at: dict
    start: Where


class _Seq(list):
    at: list
    start: Where


def read_recipe(path: Path) -> tuple[object, dict[Loc, Where]]:
    """(the merged recipe data, the file and line of each key path)."""
    tree = _read(path, ())
    where: dict[Loc, Where] = {}
    return _plain(tree, (), where), where


def _read(path: Path, chain: tuple[Path, ...]):
    data, lines = read_yaml(path)
    tree = _tracked(data, (), lines, path)
    if not isinstance(tree, _Map) or "extends" not in tree:
        return tree
    names = tree.pop("extends")
    line = tree.at.pop("extends")
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise RecipeError([f"{_show(line)}extends: a base recipe file, or a list of them"],
                          hint="write extends: base.yaml (a path relative to this file)")
    merged = None
    for i, name in enumerate(names):
        here = line if not isinstance(names, _Seq) else names.at[i]
        merged = _merge(merged, _base(path, name, here, chain + (path.resolve(),)))
    return _merge(merged, tree)


def _base(path: Path, name: str, here: Where, chain: tuple[Path, ...]):
    if "://" in name or name.startswith(("http:", "https:")):
        raise RecipeError([f"{_show(here)}extends: {name!r}: only local files can be extended"],
                          hint="download the base recipe, read it, and name the local copy")
    shown = recipe_path(path.parent, name)  # as messages name it; resolved for the cycle check
    base = shown.resolve()
    if base in chain:
        names = " -> ".join(p.name for p in chain[chain.index(base):]) + f" -> {base.name}"
        raise RecipeError([f"{_show(here)}extends: a cycle: {names}"], hint="a recipe cannot extend itself")
    if not os.path.isfile(base):  # os.path, unlike Path, says False for a name too long to stat
        raise RecipeError([f"{_show(here)}extends: {name!r}: no such file ({shown})"],
                          hint="paths in extends are relative to the file that names them")
    tree = _read(shown, chain)
    if not isinstance(tree, _Map):
        raise RecipeError([f"{shown}:1: the recipe must be a mapping of keys (extended at {here[0]}:{here[1]})"])
    return tree


def _merge(base, over):
    """over merged onto base (either may be None): maps key by key, stages by name, the rest replaced."""
    if base is None:
        return over
    if not (isinstance(base, _Map) and isinstance(over, _Map)):
        return over
    out = _new(_Map, base.start)
    for key in list(base) + [k for k in over if k not in base]:
        if key in over and key in base:
            value = _merge_stages(base[key], over[key]) if key == "stages" else _merge(base[key], over[key])
            out[key], out.at[key] = value, over.at[key]
        elif key in over:
            out[key], out.at[key] = over[key], over.at[key]
        else:
            out[key], out.at[key] = base[key], base.at[key]
    return out


def _merge_stages(base, over):
    """Stages matched by name: a named stage of `over` merges into the base's stage of that name,
    the others are added after the base's. Anything but two lists of named stages replaces."""
    def named(items):
        return isinstance(items, _Seq) and all(isinstance(s, _Map) and isinstance(s.get("name"), str) for s in items)

    if not (named(base) and named(over)):
        return over
    out = _new(_Seq, over.start)
    by_name = {s["name"]: (s, w) for s, w in zip(over, over.at)}
    for stage, at in zip(base, base.at):
        if stage["name"] in by_name:
            derived, at = by_name.pop(stage["name"])
            stage = _merge(stage, derived)
        out.append(stage)
        out.at.append(at)
    for stage, at in by_name.values():
        out.append(stage)
        out.at.append(at)
    return out


def _new(cls, start: Where):
    value = cls()
    value.at = {} if cls is _Map else []
    value.start = start
    return value


def _tracked(value, loc: Loc, lines: dict, path: Path):
    """The data with each mapping and list carrying the file and line of its entries."""
    def where(at: Loc) -> Where:
        for n in range(len(at), -1, -1):
            if at[:n] in lines:
                return path, lines[at[:n]]
        return path, 1

    if isinstance(value, dict):
        out = _new(_Map, where(loc))
        for k, v in value.items():
            out[k], out.at[k] = _tracked(v, loc + (k,), lines, path), where(loc + (k,))
        return out
    if isinstance(value, list):
        out = _new(_Seq, where(loc))
        for i, v in enumerate(value):
            out.append(_tracked(v, loc + (i,), lines, path))
            out.at.append(where(loc + (i,)))
        return out
    return value


def _plain(value, loc: Loc, where: dict):
    """Back to plain dicts and lists, filling where[key path] = (file, line)."""
    if isinstance(value, (_Map, _Seq)) and not loc:
        where[loc] = value.start
    if isinstance(value, _Map):
        out = {}
        for k, v in value.items():
            out[k] = _plain(v, loc + (k,), where)
            where[loc + (k,)] = value.at[k]  # a key's own line, as reading.py indexes it
        return out
    if isinstance(value, _Seq):
        out = []
        for i, v in enumerate(value):
            out.append(_plain(v, loc + (i,), where))
            where[loc + (i,)] = value.at[i]
        return out
    return value


def _show(where: Where) -> str:
    return f"{where[0]}:{where[1]}: "

