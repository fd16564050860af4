"""Shared files run no code: no code path unpickles, evaluates or executes what it reads.

An AST scan of the package (not a grep: a comment or a method named eval does not count):
torch.load only with weights_only=True, and never pickle.load(s), marshal, eval, exec or
compile; recipes are read with yaml.SafeLoader only.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmforge"
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ATTRS = {("pickle", "load"), ("pickle", "loads"), ("marshal", "load"), ("marshal", "loads"),
                   ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("dill", "load")}


def _calls():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield path.relative_to(PACKAGE.parent), node


def test_no_code_path_unpickles_or_evaluates():
    found = []
    for where, call in _calls():
        f = call.func
        if isinstance(f, ast.Name) and f.id in FORBIDDEN_CALLS:
            found.append(f"{where}:{call.lineno}: {f.id}()")
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            if (f.value.id, f.attr) in FORBIDDEN_ATTRS:
                found.append(f"{where}:{call.lineno}: {f.value.id}.{f.attr}()")
            if (f.value.id, f.attr) == ("torch", "load"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in call.keywords)
                if not safe:
                    found.append(f"{where}:{call.lineno}: torch.load() without weights_only=True")
    assert not found, found


def test_the_scan_sees_what_it_forbids(tmp_path):
    """The scan itself finds each forbidden form (a test that cannot fail proves nothing)."""
    src = "import pickle, torch\npickle.load(f)\ntorch.load(p)\neval('1')\ntorch.load(p, weights_only=True)\n"
    tree = ast.parse(src)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    hits = 0
    for call in calls:
        f = call.func
        if isinstance(f, ast.Name) and f.id in FORBIDDEN_CALLS:
            hits += 1
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            if (f.value.id, f.attr) in FORBIDDEN_ATTRS:
                hits += 1
            elif (f.value.id, f.attr) == ("torch", "load") and not call.keywords:
                hits += 1
    assert hits == 3
