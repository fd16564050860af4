"""Reading a recipe file: safe YAML with the line of every key, refused at once when no machine
could read it (nested too deep, aliases that expand without end, duplicate keys).

Only yaml.SafeLoader is used: a recipe is data and can never name Python code to run.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import RecipeError

Loc = tuple  # a key path: ("stages", 0, "optimizer", "lr")

MAX_DEPTH = 32  # a recipe nests ~5 levels; deeper is a mistake (and would exhaust Python's stack)
MAX_NODES = 100_000  # values once aliases are expanded: an alias bomb (billion laughs) stops here


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_yaml(path: Path) -> tuple[object, dict[Loc, int]]:
    """(the recipe's data, the line of each key path); RecipeError for anything unreadable."""
    text = path.read_text(encoding="utf-8", errors="replace")
    loader = None
    try:
        _check_shape(text, path)
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "position", None)
        line = mark.line + 1 if hasattr(mark, "line") else None
        where = f"{path}:{line}: " if line else f"{path}: "
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
        raise RecipeError([f"{where}invalid YAML: {problem}"], hint="check indentation and quoting there")
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[Loc, int] = {}
    duplicates: list[str] = []
    if node is not None:
        _index_lines(node, (), lines, duplicates, path)
    if duplicates:
        raise RecipeError(duplicates, hint="each key may appear once; YAML would silently keep the last")
    return data, lines


def _check_shape(text: str, path: Path) -> None:
    """Refuse YAML nested deeper than MAX_DEPTH or expanding past MAX_NODES values once aliases
    are followed, and aliases to a collection that contains them (a cycle), from the event
    stream: unlike composing, it neither recurses nor expands anything. Each anchor remembers
    the size and depth of what it names, so an alias counts as all of it."""
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values, levels) of what it names
    open_: list[list] = [[None, 0, 0]]  # per open collection: anchor, values so far, deepest level below
    total = 0

    def refuse(event, what: str, hint: str):
        raise RecipeError([f"{path}:{event.start_mark.line + 1}: {what}"], hint=hint)

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            open_.append([event.anchor, 1, 0])
            if len(open_) - 1 > MAX_DEPTH:
                refuse(event, f"nested deeper than {MAX_DEPTH} levels", "a recipe needs a few levels; check the "
                                                                        "brackets there")
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, size, below = open_.pop()
            if anchor:
                anchors[anchor] = (size, below + 1)
            open_[-1][1] += size
            open_[-1][2] = max(open_[-1][2], below + 1)
        elif isinstance(event, yaml.AliasEvent):
            if any(entry[0] == event.anchor for entry in open_):
                refuse(event, f"alias *{event.anchor} is inside the collection it names (a cycle)",
                       "an alias can only repeat a value defined before it, outside it")
            size, levels = anchors.get(event.anchor, (1, 0))
            if len(open_) - 1 + levels > MAX_DEPTH:
                refuse(event, f"nested deeper than {MAX_DEPTH} levels once alias *{event.anchor} is expanded",
                       "write the values out, or use fewer nested aliases")
            open_[-1][1] += size
            open_[-1][2] = max(open_[-1][2], levels)
            total += size - 1
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor:
                anchors[event.anchor] = (1, 0)
            open_[-1][1] += 1
        else:
            continue
        total += 1
        if total > MAX_NODES:
            refuse(event, f"the recipe expands to more than {MAX_NODES:,} values (YAML aliases repeating each "
                          "other)", "write the values out, or use fewer nested aliases")


def _index_lines(node, loc: Loc, lines: dict, duplicates: list, path: Path, visited=None) -> None:
    visited = set() if visited is None else visited
    if id(node) in visited:  # a YAML alias: indexed where it was defined (and no cycles, no blow-up)
        return
    visited.add(id(node))
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        keys = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in keys:
                duplicates.append(f"{path}:{key_node.start_mark.line + 1}: {format_loc(loc + (key,))}: duplicate key")
            keys.add(key)
            _index_lines(value_node, loc + (key,), lines, duplicates, path, visited)
            lines[loc + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, loc + (i,), lines, duplicates, path, visited)
