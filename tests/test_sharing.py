"""Shared base recipes (`extends:`), `plan --show-recipe`, and `llmforge init`'s starters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from llmforge.errors import RecipeError
from llmforge.recipe.loader import load_recipe
from llmforge.starters import TEMPLATES

from .conftest import TINY_RECIPE, cli, make_corpus

DERIVED = """\
extends: shared/base.yaml
name: derived
model: {n_layer: 1}
stages:
  - name: pretrain
    optimizer: {lr: 1e-3}
  - name: more
    kind: pretrain
    mix: {corpus: 1.0}
    steps: 5
    batch_tokens: 64
"""


@pytest.fixture
def shared(tmp_path) -> Path:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared/corpus.txt").write_text(make_corpus())
    (tmp_path / "shared/base.yaml").write_text(TINY_RECIPE.format(steps=40, every=10))
    (tmp_path / "derived.yaml").write_text(DERIVED)
    return tmp_path


def problems(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    return e.value.problems


def test_maps_merge_lists_are_replaced_and_stages_match_by_name(shared):
    base = yaml.safe_load((shared / "shared/base.yaml").read_text())
    recipe = load_recipe(shared / "derived.yaml")
    assert recipe.name == "derived" and recipe.model.n_layer == 1
    assert recipe.model.n_embd == base["model"]["n_embd"]  # the rest of the base's model section stays
    assert [s.name for s in recipe.stages] == ["pretrain", "more"]
    pretrain = recipe.stages[0]
    assert pretrain.optimizer.lr == 1e-3 and pretrain.steps == 40  # merged into the base's stage
    # Data paths resolve against the folder of the recipe that runs, whichever file wrote them:
    # a shared base names data/..., each project that extends it holds its own data/.
    assert recipe.base_dir == shared and recipe.data["corpus"].path == "corpus.txt"
    (shared / "derived.yaml").write_text(DERIVED + "tokenizer: {type: bpe, vocab_size: 300, sample_bytes: 1M}\n")
    assert load_recipe(shared / "derived.yaml").tokenizer.vocab_size == 300


def test_errors_point_at_the_file_and_line_that_wrote_the_value(shared):
    text = (shared / "shared/base.yaml").read_text()
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "n_embd" in l)
    (shared / "shared/base.yaml").write_text(text.replace("n_embd: 32", "n_embd: wide"))
    (msg,) = problems(shared / "derived.yaml")
    assert msg.startswith(f"shared/base.yaml:{line}: model.n_embd: ") or \
        msg.startswith(f"{shared}/shared/base.yaml:{line}: model.n_embd: "), msg
    (shared / "shared/base.yaml").write_text(text)
    (shared / "derived.yaml").write_text(DERIVED.replace("lr: 1e-3", "lr: fast"))
    (msg,) = problems(shared / "derived.yaml")
    assert msg.startswith(f"{shared}/derived.yaml:6: stages[0].optimizer.lr: "), msg


def test_cycles_missing_files_and_urls_are_refused(shared):
    (shared / "shared/base.yaml").write_text("extends: ../derived.yaml\n" +
                                             (shared / "shared/base.yaml").read_text())
    (msg,) = problems(shared / "derived.yaml")
    assert "extends: a cycle: derived.yaml -> base.yaml -> derived.yaml" in msg
    for value, what in (("nowhere.yaml", "no such file"), ("https://example.com/r.yaml", "only local files"),
                        ("{a: 1}", "a base recipe file, or a list of them")):
        (shared / "derived.yaml").write_text(DERIVED.replace("shared/base.yaml", value))
        (msg,) = problems(shared / "derived.yaml")
        assert msg.startswith(f"{shared}/derived.yaml:1: extends: ") and what in msg, msg


def test_show_recipe_prints_the_merged_result(shared):
    result = cli("plan", "derived.yaml", "--show-recipe", "--set", "seed=3", cwd=shared)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# derived.yaml + shared/base.yaml, merged\n")
    merged = yaml.safe_load(result.stdout)
    assert "extends" not in merged and merged["seed"] == 3 and merged["model"]["n_layer"] == 1
    assert [s["name"] for s in merged["stages"]] == ["pretrain", "more"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_init_writes_a_starter_that_plans_as_written(tmp_path, template):
    result = cli("init", "mine", "--template", template, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "mine.yaml").read_text()
    assert text.startswith("# yaml-language-server: $schema=recipe.schema.json\n")
    assert json.loads((tmp_path / "recipe.schema.json").read_text())["properties"]["extends"]
    result = cli("plan", "mine.yaml", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "mine"
    again = cli("init", "mine", "--template", template, cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_init_finetune_from_a_model_folder(tmp_path):
    from .hf_families import build_folder

    build_folder(tmp_path / "model", "llama", max_len=512)
    result = cli("init", "ft", "--template", "finetune", "--model", "model", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    recipe = yaml.safe_load((tmp_path / "ft.yaml").read_text())
    assert recipe["model"] == {"init": {"hf": str(tmp_path / "model")}} and "tokenizer" not in recipe
    assert recipe["adapter"]["kind"] == "lora"
    result = cli("plan", "ft.yaml", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model_init"] == str(tmp_path / "model")
    shutil.rmtree(tmp_path / "model")
    for args, what in ((("ft2", "--template", "finetune", "--model", "model"), "no config.json"),
                       (("ft3", "--template", "nope"), "unknown template"), (("../x",), "not a recipe name")):
        result = cli("init", *args, cwd=tmp_path)
        assert result.returncode == 2 and what in result.stderr, result.stderr
