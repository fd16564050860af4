"""model.init.hf in a recipe: the model section filled from a transformers folder's config.json,
and the tokenizer (and chat template) taken from that folder."""

from __future__ import annotations

from pathlib import Path

from ..core.paths import recipe_path

Loc = tuple  # a key path: ("model", "init", "hf")


def import_model(data: dict, base_dir: Path) -> list[tuple[Loc, str]]:
    """model.init.hf: fill the model section from the transformers folder's config.json (keys the
    recipe gives must agree: an imported model keeps its architecture), and use its tokenizer. A
    key set to null counts as left out: a run's recipe.yaml spells out every default that way, and
    `llmforge eval` reads it back."""
    model = data.get("model")
    init = model.get("init") if isinstance(model, dict) else None
    if not isinstance(init, dict) or not isinstance(init.get("hf"), str):
        return []  # absent, or malformed: the schema says what is wrong
    from ..errors import CheckpointError
    from ..model.families import PRESETS
    from ..model.hf import recipe_model

    folder = recipe_path(base_dir, init["hf"]).resolve()
    try:
        fields = recipe_model(folder)
    except CheckpointError as e:
        return [(("model", "init", "hf"), e.message + (f" ({e.hint})" if e.hint else ""))]
    expected = PRESETS[fields["preset"]] | fields
    problems = [(("model", key), f"{model[key]!r}, but {folder}/config.json has {value!r} (an imported model "
                 "keeps its architecture; leave the key out)")
                for key, value in expected.items() if model.get(key) is not None and model[key] != value]
    model.update(fields)
    init["hf"] = str(folder)
    tokenizer = data.setdefault("tokenizer", {})
    if not isinstance(tokenizer, dict):
        return problems  # the schema reports it
    from ..text.tokenizer_json import tokenizer_file

    own = tokenizer_file(folder)
    if own is None:
        problems.append((("model", "init", "hf"), f"{folder} has no tokenizer.json or tokenizer.model; llmforge "
                         "trains with the model's own tokenizer"))
        return problems
    if tokenizer.get("vocab_size") is not None:
        problems.append((("tokenizer", "vocab_size"), "the model from model.init.hf comes with its tokenizer; "
                         "leave vocab_size out"))
    elif tokenizer.get("path") is not None and recipe_path(base_dir, str(tokenizer["path"])).resolve() != own:
        problems.append((("tokenizer", "path"), f"the model from model.init.hf uses {own}; leave path out"))
    tokenizer["path"] = str(own)
    if tokenizer.get("chat_template") is None and _has_template(folder):
        tokenizer["chat_template"] = {"path": str(folder)}  # the model's own
    return problems


def _has_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        import json

        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False
