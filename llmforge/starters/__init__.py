"""`llmforge init NAME --template T`: commented starter recipes that plan and run as written
(built-in data, nothing to download), next to the JSON Schema editors complete them from."""

from __future__ import annotations

import re
from pathlib import Path

from ..core.paths import user_path
from ..errors import RecipeError

TEMPLATES = ("pretrain", "finetune", "pipeline", "rlhf")
_FOLDER = Path(__file__).parent
# The finetune starter's own small model, replaced by the folder given with --model.
_OWN_MODEL = re.compile(r"^tokenizer: .*\nmodel: .*\n", re.M)


def write_starter(name: str, template: str, folder: Path, model: Path | None = None) -> list[Path]:
    """Write folder/NAME.yaml (and recipe.schema.json beside it when missing); return what was written."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise RecipeError([f"init: {name!r} is not a recipe name (letters, digits, _ . -, at most 64)"],
                          hint="e.g. llmforge init my-model")
    if template not in TEMPLATES:
        raise RecipeError([f"--template: unknown template {template!r} (known: {', '.join(TEMPLATES)})"])
    if model is not None and template != "finetune":
        raise RecipeError(["--model: only the finetune template starts from a model folder"],
                          hint="llmforge init NAME --template finetune --model PATH")
    path = folder / f"{name}.yaml"
    if path.exists():
        raise RecipeError([f"{path}: already exists; init does not overwrite it"], hint="pick another name")
    text = (_FOLDER / f"{template}.yaml").read_text().replace("{name}", name).replace("{file}", str(path))
    if model is not None:
        model = user_path(model).resolve()
        if not (model / "config.json").is_file():
            raise RecipeError([f"--model: {model}: not a Hugging Face model folder (no config.json)"],
                              hint="point at the folder holding config.json, model.safetensors and the tokenizer")
        text = _OWN_MODEL.sub(f"# Its config.json decides the architecture; its tokenizer and chat template are used as they are.\n"
                              f"model: {{init: {{hf: {model}}}}}\n", text, count=1)
        text = text.replace("# adapter: {kind: lora", "adapter: {kind: lora", 1)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    written = [path]
    schema = folder / "recipe.schema.json"
    if not schema.exists():
        from ..recipe.keydocs import recipe_json_schema

        schema.write_text(recipe_json_schema())
        written.append(schema)
    return written
