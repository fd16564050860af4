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


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch PWNED') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append({'role': 'user', 'content': 'injected'}) %}{{ messages }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch PWNED') }}",
]


def test_chat_templates_from_folders_render_in_a_sandbox(tmp_path, monkeypatch):
    """A folder's template can read the conversation and write text, nothing else: reaching for
    Python objects, modules or the file system ends in one clear error, and nothing runs."""
    import json

    import pytest

    from llmforge.text.chat_jinja import TemplateError, read_folder_template

    monkeypatch.chdir(tmp_path)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for i, source in enumerate(ESCAPES):
        folder = tmp_path / f"model{i}"
        folder.mkdir()
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": source + "{% for m in messages %}"
                                                                  "{{ m['content'] }}{% endfor %}"}))
        with pytest.raises(TemplateError) as e:
            read_folder_template(folder)._render(messages, False)
        assert "chat_template" in e.value.message and ("SecurityError" in e.value.message
                                                       or "UndefinedError" in e.value.message), e.value.message
        assert not (tmp_path / "PWNED").exists()
    # A tokenizer_config.json of the wrong shape is named, not a traceback.
    folder = tmp_path / "odd"
    folder.mkdir()
    for config in ([], {"chat_template": [1, 2]}, {"chat_template": "{{ 1 }}", "bos_token": {"content": 3}}):
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        try:
            read_folder_template(folder)
        except TemplateError as e:
            assert str(folder) in e.message
