"""Load a recipe: safe YAML (reading.py) -> `--set` overrides -> schema validation, every problem
reported at once.

Each problem becomes one line `file:line: key.path: what is wrong (did you mean ...?)`, or
`key.path: ... (from --set ...)` when an override caused it. Only yaml.SafeLoader is used: a recipe
is data and can never name Python code to run.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from ..data.builtins import BUILTINS
from ..errors import RecipeError
from ..stages import KINDS
from ..tasks import TASKS
from .extends import read_recipe
from .imported import import_model
from .reading import Loc, format_loc
from .schema import Recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: no such recipe file"], hint="check the path; recipes/ has examples")
    data, lines = read_recipe(path)
    origins = {}
    problems = []
    for item in overrides:
        try:
            loc = apply_override(data, item)
            origins[loc] = _shown(item)
        except ValueError as e:
            problems.append(f"--set {_shown(item)}: {e}")
    if problems:
        raise RecipeError(problems, hint="write overrides as key.path=value, e.g. stages[0].optimizer.lr=1e-3")
    recipe = validate_recipe(data, where=lambda loc: _where(loc, path, lines, origins), base_dir=path.resolve().parent)
    recipe._base_dir = path.resolve().parent
    recipe._written = (data, sorted({str(file) for file, _ in lines.values()}, key=lambda f: f != str(path)))
    return recipe


def show_recipe(recipe: Recipe) -> str:
    """The recipe as its files read once merged (extends) and overridden (--set), as YAML."""
    data, files = recipe._written
    return f"# {' + '.join(files)}, merged\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def validate_recipe(data, where=lambda loc: ("", ""), base_dir: Path | None = None) -> Recipe:
    """Validate raw recipe data; raise RecipeError listing every problem with its key path."""
    if not isinstance(data, dict):
        raise RecipeError([f"{where(())[0]}the recipe must be a mapping of keys (name, model, data, stages, ...)"])
    # A NUL can be written ("\0" in YAML, or --set) but no path or name holds one: said here, once.
    problems: list[tuple[Loc, str]] = list(_nul_strings(data)) or import_model(data, base_dir or Path.cwd())
    recipe = None
    if not problems:  # a model that cannot be imported leaves the model section incomplete: say only why
        try:
            recipe = Recipe.model_validate(data)
        except ValidationError as e:
            problems += _explain(e, data)
        problems += _check_references(data)
    if problems:
        lines = []
        for loc, msg in problems:
            prefix, suffix = where(loc)
            lines.append((prefix, f"{prefix}{format_loc(loc) or '<recipe>'}: {msg}{suffix}"))
        # In file order, like a compiler; problems from --set (no line) come last.
        lines.sort(key=lambda pl: int(m.group(1)) if (m := re.search(r":(\d+): $", pl[0])) else 1 << 30)
        raise RecipeError(list(dict.fromkeys(line for _, line in lines)),
                          hint="fix the keys above; docs/recipe.md lists every key")
    return recipe


def _nul_strings(tree, loc: Loc = ()):
    """(key path, message) of every key or string value holding a NUL character."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if "\0" in str(key) or (isinstance(value, str) and "\0" in value):
            yield loc + (key,), "holds a NUL character (\\0), which no name, path or setting can"
        else:
            yield from _nul_strings(value, loc + (key,))


def _shown(item: str) -> str:
    """An override as the error shows it: quoted if it holds a line break or control character,
    which would split the one-line message."""
    return item if item.isprintable() else repr(item)


def _where(loc: Loc, path: Path, lines: dict, origins: dict) -> tuple[str, str]:
    """(prefix, suffix) that place a problem: `file:line: ` or ` [from --set ...]`."""
    for origin, item in origins.items():  # an override set this key or a section holding it
        if loc[:len(origin)] == origin:
            return "", f" [from --set {item}]"
    if loc not in lines:  # not in the file: perhaps an override created it further down
        for origin, item in origins.items():
            if loc and origin[:len(loc)] == loc:
                return "", f" [from --set {item}]"
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:  # the file (a base recipe's, for what it set) and line
            file, line = lines[loc[:n]]
            return f"{file}:{line}: ", ""
    return f"{path}: ", ""


# --- overrides -----------------------------------------------------------------------------------

_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_override(data: dict, item: str) -> Loc:
    """Apply `key.path=value` to raw recipe data in place; return the resolved key path.

    The value is parsed as YAML (safe), so `1e-3`, `true`, `[a, b]` and `{web: 1}` all work.
    A stage can be addressed by index (`stages[0]`, `stages.0`) or by name (`stages.pretrain`).
    """
    if "=" not in item:
        raise ValueError("expected key.path=value")
    key, _, raw_value = item.partition("=")
    parts: list = []
    pos = 0
    key = key.strip()
    for m in _SEGMENT.finditer(key):
        if m.start() != pos and key[pos:m.start()] != ".":
            raise ValueError(f"cannot parse key path {key!r}")
        parts.append(int(m.group(2)) if m.group(2) is not None else m.group(1))
        pos = m.end()
    if not parts or pos != len(key):
        raise ValueError(f"cannot parse key path {key!r}")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    if not isinstance(data, dict):
        raise ValueError("the recipe is not a mapping")
    node, loc = data, []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            part = _list_index(node, part, format_loc(tuple(loc)))
        elif not isinstance(node, dict):
            raise ValueError(f"{format_loc(tuple(loc))} is a value, not a section")
        loc.append(part)
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
    return tuple(loc)


def _list_index(items: list, part, where: str) -> int:
    if isinstance(part, str) and part.isdigit():
        part = int(part)
    if isinstance(part, int):
        if part >= len(items):
            raise ValueError(f"{where} has {len(items)} entries; index {part} is out of range")
        return part
    names = [x.get("name") for x in items if isinstance(x, dict)]
    if part in names:
        return names.index(part)
    raise ValueError(f"{where} has no entry named {part!r} (known: {', '.join(map(str, names))})")


# --- turning pydantic's errors into lines --------------------------------------------------------

def _explain(error: ValidationError, data) -> list[tuple[Loc, str]]:
    out = []
    for err in error.errors(include_url=False):
        loc = _clean_loc(err["loc"], data, err["type"])
        kind, msg = err["type"], err["msg"]
        if kind == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(loc[-1], _allowed_keys(loc[:-1]))
        elif kind == "missing":
            msg = "missing required key"
        else:
            msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
            msg = msg[:1].lower() + msg[1:]
            if kind not in ("value_error",) and "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
        out.append((loc, msg))
    return out


def _clean_loc(loc: tuple, data, kind: str) -> Loc:
    """Drop the union/validator tags pydantic inserts, keeping only real keys and indexes."""
    clean, node = [], data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            clean.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            clean.append(part)
            node = node[part]
        elif kind == "missing" and i == len(loc) - 1:
            clean.append(part)
        # else: a tag such as 'function-after[...]' or 'int'
    return tuple(clean)


def _model_at(loc: Loc):
    """The schema model class that describes the mapping at `loc`, if any."""
    tp = Recipe
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part)
            if field is None:
                return None
            tp = field.annotation
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp):
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
            tp = (models or members)[0]
        else:
            return tp


def _allowed_keys(loc: Loc) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _did_you_mean(word, candidates) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known: {', '.join(map(str, candidates))})" if candidates else ""


def _check_references(data: dict) -> list[tuple[Loc, str]]:
    """Cross-section checks, on raw data so they are reported alongside field errors."""
    problems = []
    sources = list(data.get("data") or {}) if isinstance(data.get("data"), dict) else []
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    names = {}
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        mix = stage.get("mix")
        kind = KINDS.get(stage["kind"]) if isinstance(stage.get("kind"), str) else None  # None: the schema says
        if isinstance(mix, dict):
            for src in mix:
                if src not in sources:
                    problems.append((("stages", i, "mix", src), _unknown_source(src, sources)))
                elif kind and _format(data["data"][src]) not in kind.formats + ("auto",):  # auto: run/resolve.py
                    problems.append((("stages", i, "mix", src), kind.wrong_format(src, _format(data["data"][src]))))
        no_template = isinstance(data.get("tokenizer"), dict) and not data["tokenizer"].get("chat_template")
        if kind and kind.chat and no_template:
            problems.append((("stages", i, "kind"), f"{_a(kind.name)} {kind.name} stage needs tokenizer.chat_template "
                             "(e.g. chat_template: default)"))
        tasks = isinstance(stage.get("eval"), dict) and stage["eval"].get("tasks")
        own = isinstance(tasks, list) and any(t in TASKS for t in tasks if isinstance(t, str))  # lm-eval's need none
        if own and no_template:
            problems.append((("stages", i, "eval", "tasks"), "task evals prompt the model through the chat "
                             "template: set tokenizer.chat_template (e.g. chat_template: default)"))
        elif tasks and kind and not kind.generates:
            problems.append((("stages", i, "eval", "tasks"), f"task evals generate replies; {_a(kind.name)} "
                             f"{kind.name} stage's model scores replies and cannot write them"))
        problems += _init_problems(i, stage, kind, stages, names)
        name = stage.get("name")
        if isinstance(name, str):
            if name in names:
                problems.append((("stages", i, "name"), f"duplicate stage name {name!r} (also stages[{names[name]}])"))
            names.setdefault(name, i)
        seq, model_seq = stage.get("seq_len"), model.get("seq_len")
        if isinstance(seq, int) and isinstance(model_seq, int) and seq > model_seq:
            problems.append((("stages", i, "seq_len"), f"{seq} is longer than model.seq_len ({model_seq})"))
    tok = data.get("tokenizer")
    if isinstance(tok, dict) and isinstance(tok.get("train_on"), list):
        for j, src in enumerate(tok["train_on"]):
            if src not in sources:
                problems.append((("tokenizer", "train_on", j), _unknown_source(src, sources)))
    return problems


def _init_problems(i: int, stage: dict, kind, stages: list, names: dict) -> list[tuple[Loc, str]]:
    """A stage starts from an earlier stage (its init, else the one before it), and a stage that
    writes text cannot start from a model that only scores it."""
    init = stage.get("init")
    if isinstance(init, str) and init != "none" and init not in names:
        later = any(isinstance(s, dict) and s.get("name") == init for s in stages)
        return [(("stages", i, "init"), f"{init!r} is not an earlier stage" + (
            " (a stage starts from one that ran before it)" if later else _did_you_mean(init, list(names)))
            + "; use a stage name or none")]
    start = names.get(init) if isinstance(init, str) else i - 1 if init is None and i > 0 else None
    before = stages[start] if start is not None and isinstance(stages[start], dict) else {}
    was = KINDS.get(before["kind"]) if isinstance(before.get("kind"), str) else None
    if kind and kind.generates and was and not was.generates:
        generating = [n for n, j in names.items() if isinstance(stages[j], dict)
                      and KINDS.get(str(stages[j].get("kind")), was).generates]
        return [(("stages", i, "init"), f"{_a(kind.name)} {kind.name} stage trains a language model, but it would "
                 f"start from stage {before.get('name')!r}, a {was.name} model that only scores replies; "
                 + (f"set init: {generating[-1]}" if generating else "set init to a stage that trains a language "
                    "model, or none"))]
    return []


def _a(word: str) -> str:
    return "an" if word[:1] in "aeios" else "a"  # an sft, a dpo, a pretrain


def _format(source) -> str:
    """A raw source's format, as the schema will resolve it."""
    if not isinstance(source, dict):
        return "text"
    builtin = source.get("builtin")
    fixed = BUILTINS[builtin].settings if isinstance(builtin, str) and builtin in BUILTINS else {}
    return source.get("format") or fixed.get("format", "auto")


def _unknown_source(name, sources) -> str:
    hint = _did_you_mean(name, sources)
    known = f" (known: {', '.join(map(str, sources))})" if sources else " (the data section defines none)"
    return f"unknown source {name!r}" + (hint if "did you mean" in hint else known)


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
