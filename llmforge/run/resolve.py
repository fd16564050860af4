"""A recipe's `format: auto` sources resolved, where a run or a plan starts (data/detect.py reads
each one's first record), and the stages checked against what was found: the recipe loader could
only check the formats the recipe names."""

from __future__ import annotations

from ..data.detect import resolve_format
from ..data.sources import NoFiles
from ..errors import DataError
from ..recipe.schema import Recipe
from ..stages import KINDS


def resolve_formats(recipe: Recipe, planning: bool = False) -> tuple[Recipe, list[str]]:
    """(the recipe with every used source's format set, a line per detection for the plan).
    planning: a source whose files are not at hand yet (`plan` sizes a run before its data is
    downloaded) is planned as the first format its stage takes."""
    used = list(dict.fromkeys([n for st in recipe.stages for n in st.mix] + list(recipe.tokenizer.train_on or [])))
    data, notes = dict(recipe.data), []
    for name in used:
        try:
            data[name], note = resolve_format(name, recipe.data[name], recipe.base_dir)
        except NoFiles:
            if not planning:
                raise
            if recipe.data[name].format != "auto":
                continue
            stage = next((st for st in recipe.stages if name in st.mix), None)  # None: tokenizer.train_on's alone
            fmt = KINDS[stage.kind].formats[0] if stage else "text"
            data[name], note = recipe.data[name].model_copy(update={"format": fmt}), \
                f"data.{name}: format auto: not at hand yet, planned as {fmt}"
        notes += [note] if note else []
    if data == recipe.data:
        return recipe, []
    for i, stage in enumerate(recipe.stages):
        formats = KINDS[stage.kind].formats
        for name in stage.mix:
            if data[name].format not in formats:
                raise DataError(f"stages[{i}].mix.{name}: {KINDS[stage.kind].wrong_format(name, data[name].format)} "
                                "(format auto)",
                                hint=f"point stage {stage.name} at a source of that shape, or set data.{name}.format")
    return recipe.model_copy(update={"data": data}), notes
