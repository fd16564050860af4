"""The house keeps its rooms: the package's import graph, read from the source (imports inside
functions and under TYPE_CHECKING count: a lazy import hides a circle, it does not remove it), has
no circle, no private name crosses a module line, and each layer imports only the layers below it,
in the order README.md's Layout table lists them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmforge"
README = PACKAGE.parent / "README.md"

# Bottom to top: a layer may import the layers before it, never one after it. A folder is a layer;
# so are the top-level modules errors (the floor) and cli, __main__ and reference (the roof).
LAYERS = ("errors", "core", "text", "model", "optim", "data", "store", "stages", "tasks", "recipe", "plan", "run", "export",
          "output", "starters", "cli", "reference", "__main__")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]):
    """(importer, imported module, name) for every import of a llmforge module, anywhere in a file."""
    for mod, path in modules.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                yield from ((mod, a.name, None) for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    if f"{target}.{a.name}" in modules:
                        yield mod, f"{target}.{a.name}", None
                    elif target in modules:
                        yield mod, target, a.name


def _layer(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else mod


def test_no_import_cycles_and_no_private_names_across_modules():
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for mod, dest, name in _imports(modules):
        if dest != mod and not mod.startswith(dest + "."):  # a package's own __init__ is not a circle
            edges[mod].add(dest)
        if name and name.startswith("_") and not name.startswith("__") and dest != mod:
            private.append(f"{mod} imports {name} from {dest}")
    assert not private, private
    # A depth-first walk: meeting a module that is still on the walk's stack closes a circle.
    state, cycles, stack = {}, [], []

    def visit(mod: str) -> None:
        state[mod] = "open"
        stack.append(mod)
        for dest in sorted(edges[mod]):
            if state.get(dest) == "open":
                cycles.append(" -> ".join(stack[stack.index(dest):] + [dest]))
            elif dest not in state:
                visit(dest)
        stack.pop()
        state[mod] = "done"

    for mod in sorted(modules):
        if mod not in state:
            visit(mod)
    assert not cycles, cycles


def test_each_layer_imports_only_the_layers_below_it():
    modules = _modules()
    assert {_layer(m) for m in modules} - {"llmforge"} == set(LAYERS), "a new folder needs its place in LAYERS"
    upward = sorted({f"{mod} imports {dest}" for mod, dest, _ in _imports(modules)
                     if _layer(mod) != "llmforge" and _layer(dest) != _layer(mod)
                     and LAYERS.index(_layer(dest)) > LAYERS.index(_layer(mod))})
    assert not upward, upward


def test_the_readme_layout_lists_the_layers_bottom_up_with_what_each_imports():
    section = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z_]+)(?:/|\.py)` \|.*\| ([^|]+) \|$", section, flags=re.M))
    roof = ("cli", "reference", "__main__")
    assert [r for r in rows if r not in roof] == [layer for layer in LAYERS if layer not in roof]
    uses: dict[str, set] = {}
    for mod, dest, _ in _imports(_modules()):
        if _layer(mod) != _layer(dest):
            uses.setdefault(_layer(mod), set()).add(_layer(dest))
    for layer, listed in rows.items():
        actual = ", ".join(sorted(uses.get(layer, ()), key=LAYERS.index)) or "nothing of llmforge"
        assert listed.strip() == actual, f"README.md's Layout: {layer} imports {actual}"


def _names(node, members) -> list[str]:
    """Member names spelled in node: a string, or strings in a tuple, list or set."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in members]


def test_no_module_outside_a_registry_branches_on_a_member():
    """Each axis that is a registry keeps its members' names to itself: outside its folder, no
    comparison with a member's name (kind == "dpo", task in ("world-qa", ...)), no table keyed by
    one, no lookup by one. (stages/ is held to the same by tests/test_kinds.py.)"""
    from llmforge.data.builtins import BUILTINS
    from llmforge.data.formats import FORMATS
    from llmforge.model.families import FAMILIES
    from llmforge.optim import OPTIMIZERS
    from llmforge.plan.devices import TARGETS
    from llmforge.stages import KINDS
    from llmforge.tasks import TASKS

    axes = {"stage kind": (KINDS, "stages/"), "task": (TASKS, "tasks/"), "device": (TARGETS, "plan/devices.py"),
            "family": (FAMILIES, "model/families/"), "optimizer": (OPTIMIZERS, "optim/"),
            "data format": (FORMATS, "data/formats.py"), "built-in source": (BUILTINS, "data/builtins.py")}
    # Format names double as record fields ("prompt"): for them, comparisons alone are branches.
    compared_only = {"data format"}
    named = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        for axis, (members, home) in axes.items():
            if where.startswith(home):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                spelled = []
                if isinstance(node, ast.Compare):
                    spelled = [k for side in [node.left, *node.comparators] for k in _names(side, members)]
                elif axis in compared_only:
                    continue
                elif isinstance(node, ast.Dict):
                    spelled = [k for key in node.keys if key is not None for k in _names(key, members)]
                elif isinstance(node, ast.Subscript):
                    spelled = _names(node.slice, members)
                named += [f"{where}:{node.lineno}: {axis} {k!r}" for k in spelled]
    assert not named, named
