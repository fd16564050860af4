"""Recipe loading: every problem at once, with key path, file:line and did-you-mean; overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmforge.core.values import parse_count
from llmforge.errors import RecipeError
from llmforge.recipe.loader import apply_override, diff_recipes, load_recipe

from .conftest import REPO, TINY_RECIPE, cli, make_corpus

BROKEN = """\
name: demo
tokenizer: {type: bpe, vocab_size: 2k}
model:
  n_layer: 2
  n_head: 2
  n_embd: 64
  seq_len: 128
  nrom: rmsnorm
data:
  web: {path: x.txt}
stages:
  - name: pretrain
    kind: pretrain
    mix: {wbe: 1.0}
    tokens: 20M
    batch_tokens: 16Ki
    optimizer: {lr: -1}
    schedule: {decay: cosin}
    evals: {every: 10}
runtime: {device: gpu}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def problems(path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return info.value.lines


def test_every_problem_reported_with_path_and_line(tmp_path):
    path = write(tmp_path, BROKEN)
    lines = problems(path)
    assert f"{path}:8: model.nrom: unknown key (did you mean 'norm'?)" in lines
    assert f"{path}:14: stages[0].mix.wbe: unknown source 'wbe' (did you mean 'web'?)" in lines
    assert any(l.startswith(f"{path}:17: stages[0].optimizer.lr: input should be greater than 0") for l in lines)
    assert any(l.startswith(f"{path}:18: stages[0].schedule.decay: input should be 'cosine'") for l in lines)
    assert f"{path}:19: stages[0].evals: unknown key (did you mean 'eval'?)" in lines
    assert any(l.startswith(f"{path}:20: runtime.device:") for l in lines)
    assert len(lines) == 6


def test_cross_field_problems(tmp_path):
    text = TINY_RECIPE.format(steps=10, every=5).replace("steps: 10", "steps: 10\n    tokens: 1M")
    text = text.replace("n_head: 2, n_kv_head: 1", "n_head: 3")
    lines = problems(write(tmp_path, text))
    assert any("stages[0]: give exactly one budget: tokens, steps or epochs" in l for l in lines)
    assert any("model: n_embd (32) must be divisible by n_head (3)" in l for l in lines)


def test_missing_keys_and_yaml_errors(tmp_path):
    lines = problems(write(tmp_path, "name: x\nmodel: {n_layer: 1}\n"))
    assert any(l.endswith("tokenizer: missing required key") for l in lines)
    assert any("model.n_head: missing required key" in l for l in lines)
    lines = problems(write(tmp_path, "name: x\nmodel: [1, 2\n"))
    assert len(lines) == 1 and "invalid YAML" in lines[0] and f"{tmp_path / 'recipe.yaml'}:" in lines[0]
    lines = problems(write(tmp_path, "name: x\nname: y\n"))
    assert lines == [f"{tmp_path / 'recipe.yaml'}:2: name: duplicate key"]


def test_overrides_by_index_and_by_name(tiny):
    by_index = load_recipe(tiny / "recipe.yaml", ["stages[0].optimizer.lr=1e-2"])
    by_name = load_recipe(tiny / "recipe.yaml", ["stages.pretrain.optimizer.lr=1e-2"])
    assert by_index.stages[0].optimizer.lr == by_name.stages[0].optimizer.lr == 1e-2
    r = load_recipe(tiny / "recipe.yaml", ["model.n_layer=3", "runtime.device=cpu", "stages.0.steps=5k"])
    assert (r.model.n_layer, r.runtime.device, r.stages[0].steps) == (3, "cpu", 5000)


def test_overrides_are_validated_against_the_schema(tiny):
    lines = problems(tiny / "recipe.yaml", ["stages.pretrain.optimizer.lrr=1", "model.n_layer=many"])
    assert "stages[0].optimizer.lrr: unknown key (did you mean 'lr'?) [from --set stages.pretrain.optimizer.lrr=1]" in lines
    assert any(l.startswith("model.n_layer: input should be a valid integer") and "[from --set" in l for l in lines)
    lines = problems(tiny / "recipe.yaml", ["stages.sft.steps=1"])
    assert lines == ["--set stages.sft.steps=1: stages has no entry named 'sft' (known: pretrain)"]
    with pytest.raises(ValueError):
        apply_override({}, "no-equals-sign")


@pytest.mark.parametrize("text,value", [("20M", 20_000_000), ("1.5B", 1_500_000_000), ("100k", 100_000),
                                        ("128Ki", 131072), ("1e6", 1_000_000), (512, 512)])
def test_counts(text, value):
    assert parse_count(text) == value


def test_diff_recipes():
    assert diff_recipes({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 2, "c": [1, 2]}}) == [("a.b", 1, 2)]


def test_no_python_objects_in_yaml(tmp_path):
    lines = problems(write(tmp_path, "name: !!python/object/apply:os.system ['echo hacked']\n"))
    assert len(lines) == 1 and "invalid YAML" in lines[0]


def test_cli_broken_recipe_exit_2_no_traceback(tmp_path):
    path = write(tmp_path, BROKEN)
    for command in ("plan", "run"):
        result = cli(command, path, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert len(error_lines) == 6
        assert error_lines[0].startswith(f"error: {path}:8: model.nrom")  # in file order
        assert any("stages[0].mix.wbe" in l for l in error_lines)
    result = cli("plan", path, "--set", "stages[0].optimizer.lrr=1", cwd=tmp_path)
    assert "error: stages[0].optimizer.lrr: unknown key (did you mean 'lr'?) [from --set stages[0].optimizer.lrr=1]" \
        in result.stderr.splitlines()
    result = cli("plan", tmp_path / "missing.yaml")
    assert result.returncode == 2 and "no such recipe file" in result.stderr


def test_messages_are_printed_verbatim(tmp_path):
    """rich would turn ':100:' (a line number) into an emoji and '[b]' into markup."""
    path = write(tmp_path, "#\n" * 96 + BROKEN.replace("model:", "model:\n  smile: 1  # [b]", 1))
    result = cli("plan", path, cwd=tmp_path)
    assert f"{path}:100: model.smile: unknown key" in result.stderr, result.stderr


def test_plan_json_keys(tiny):
    result = cli("plan", tiny / "recipe.yaml", "--json", cwd=tiny)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["params"] > 0
    stage = plan["stages"][0]
    for key in ("name", "kind", "steps", "tokens", "micro_batch", "grad_accum", "flops", "est_peak_memory_bytes"):
        assert key in stage
    assert stage["steps"] == 40 and stage["tokens"] == 40 * 256
    assert stage["micro_batch"] * stage["grad_accum"] * stage["world_size"] == 256 // 32


def test_plan_errors(tiny):
    result = cli("plan", tiny / "recipe.yaml", "--set", "stages[0].batch_tokens=250", cwd=tiny)
    assert result.returncode == 2
    assert "stages[0].batch_tokens: 250 is not a multiple of seq_len x world size (32 x 1)" in result.stderr
    result = cli("plan", tiny / "recipe.yaml", "--set", "model.n_embd=32768", "--set", "model.n_layer=64", cwd=tiny)
    assert result.returncode == 2 and "GiB" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_plans(recipe, tmp_path):
    # shakespeare-char reads a file users download; stand-in text plans the same way.
    (tmp_path / "text.txt").write_text(make_corpus(2000))
    extra = ["--set", f"data.shakespeare.path={tmp_path}/text.txt"] if recipe.stem == "shakespeare-char" else []
    if recipe.stem == "smollm2-assistant":  # a tiny stand-in for the folder and data users bring
        from .hf_families import build_folder, write_chat_data

        build_folder(tmp_path / "smollm2", "llama", max_len=1024)
        write_chat_data(tmp_path, n=400)
        extra = ["--set", f"model.init.hf={tmp_path}/smollm2", "--set", f"data.chat.path={tmp_path}/chat.jsonl",
                 "--set", f"data.prefs.path={tmp_path}/prefs.jsonl"]
    if recipe.stem in ("gpt2-124m", "llama-1b-pipeline"):  # web-text shards and conversations users bring
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .hf_families import write_chat_data

        pq.write_table(pa.table({"text": make_corpus(20000).split(". ")}), tmp_path / "web.parquet")
        write_chat_data(tmp_path, n=400)
        extra = ["--set", f"data.web.path={tmp_path}/web.parquet", "--target", "h100x8"]
        if recipe.stem == "llama-1b-pipeline":
            extra += ["--set", f"data.chat.path={tmp_path}/chat.jsonl", "--set", f"data.prefs.path={tmp_path}/prefs.jsonl"]
    result = cli("plan", recipe, "--json", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["stages"]
    if "--target" in extra:  # what the recipe's comment says the plan says there
        pretrain = plan["stages"][0]
        assert plan["world_size"] == 8 and plan["parallel"] == "ddp" and plan["target"].startswith("target h100x8")
        hours = {"gpt2-124m": 0.75, "llama-1b-pipeline": 9.5}[recipe.stem]
        assert abs(pretrain["est_time_s"] / 3600 - hours) < 0.1 * hours, pretrain["est_time_s"]


def test_help_does_not_import_torch():
    code = "import sys; from llmforge.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    result = cli("--help")
    assert result.returncode == 0 and "run" in result.stdout and "plan" in result.stdout


def test_committed_json_schema_is_current():
    from llmforge.recipe.keydocs import recipe_json_schema

    committed = (REPO / "docs" / "recipe.schema.json").read_text()
    assert committed == recipe_json_schema(), "run: llmforge schema > docs/recipe.schema.json"


def test_yaml_booleans_are_not_numbers(tiny):
    lines = problems(tiny / "recipe.yaml", ["model.n_layer=yes", "stages.pretrain.optimizer.lr=true"])
    assert "model.n_layer: expected a number, got true [from --set model.n_layer=yes]" in lines
    assert any(l.startswith("stages[0].optimizer.lr: expected a number, got true") for l in lines)
    assert load_recipe(tiny / "recipe.yaml", ["runtime.compile=off"]).runtime.compile == "off"


def _bomb(levels: int = 9) -> str:
    """Aliases of aliases: 9 ** levels values once expanded (a billion laughs)."""
    text = 'name: x\na: &a ["l", "l", "l", "l", "l", "l", "l", "l", "l"]\n'
    names = "abcdefghijklmnop"
    for prev, cur in zip(names[:levels - 1], names[1:levels]):
        text += f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    return text


@pytest.mark.parametrize("text, message", [
    ("name: " + "[" * 3000 + "]" * 3000 + "\n", "recipe.yaml:1: nested deeper than 32 levels"),
    (_bomb(), "the recipe expands to more than 100,000 values"),
    ("name: x\na: &x {b: *x}\n", "recipe.yaml:2: alias *x is inside the collection it names (a cycle)"),
    ("name: x\na0: &a0 [[[[1]]]]\n" + "".join(f"a{i}: &a{i} [[[[*a{i - 1}]]]]\n" for i in range(1, 12)),
     "nested deeper than 32 levels once alias *a6 is expanded"),
    (TINY_RECIPE.format(steps=10, every=5).replace("batch_tokens: 256", "batch_tokens: 1e30"),
     "stages[0].batch_tokens: 1e+30 is more than any machine can run"),
    (TINY_RECIPE.format(steps=10, every=5).replace("batch_tokens: 256", "batch_size: 100000000000000"), "plan tiny"),
])
def test_recipes_no_machine_could_read_are_refused_at_once(tmp_path, text, message):
    """Deep nesting, alias bombs and absurd counts: one line and exit 2, not a hang or a traceback
    (a batch of 1e14 rows is planned at once: the micro-batch search stops at what could fit)."""
    path = write(tmp_path, text)
    (tmp_path / "corpus.txt").write_text(make_corpus(2000))
    result = subprocess.run([sys.executable, "-m", "llmforge", "plan", str(path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    out = result.stdout + result.stderr
    assert message in out and "Traceback" not in out, out
    assert result.returncode == (0 if message == "plan tiny" else 2), out


def test_a_mapping_where_a_name_belongs_is_a_key_error(tmp_path):
    text = TINY_RECIPE.format(steps=10, every=5).replace("corpus: {path: corpus.txt,", "corpus: {builtin: {a: 1},")
    lines = problems(write(tmp_path, text))
    assert any("data.corpus.builtin: input should be 'python-stdlib'" in line for line in lines), lines


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", ".hidden", "x\\y"])
def test_names_cannot_leave_the_run_directory(tmp_path, name):
    """A recipe or stage name becomes a folder name: one that could point elsewhere is refused."""
    text = TINY_RECIPE.format(steps=10, every=5)
    for key in ("name: tiny", "  - name: pretrain"):
        lines = problems(write(tmp_path, text.replace(key, key.split("name:")[0] + f"name: '{name}'")))
        assert any("name: string should match pattern" in line for line in lines), lines


def test_paths_the_os_cannot_use_are_named(tiny):
    """A name too long to stat (Python's Path.is_dir raises for it) or a folder the OS refuses:
    one line naming the path, exit 2, wherever the path was given."""
    long = "a" * 5000
    (tiny / "extends.yaml").write_text(f"extends: {long}\nname: x\n")
    for args in (["plan", "recipe.yaml", "--set", f"data.corpus.path={long}"],
                 ["plan", "recipe.yaml", "--set", "tokenizer.vocab_size=null", "--set", f"tokenizer.path={long}"],
                 ["plan", "extends.yaml"], ["plan", long], ["chat", long], ["export", long, "--out", "x"],
                 ["run", "recipe.yaml", "--run-dir", f"{long}/run"]):
        result = cli(*args, cwd=tiny)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args[:2], result.stderr[-800:])
        assert result.stderr.startswith("error: ") and "a" * 200 in result.stderr, (args[:2], result.stderr[-800:])


@pytest.mark.parametrize("key", ["stages[0].mix.corpus", "stages[0].optimizer.lr", "model.rope_theta"])
def test_infinite_numbers_are_refused_by_key(tiny, key):
    """inf passes gt=0: a mix weight of inf made the plan divide inf by inf (a NaN row count)."""
    result = cli("plan", "recipe.yaml", "--set", f"{key}=inf", cwd=tiny)
    assert result.returncode == 2 and f"error: {key}: input should be a finite number" in result.stderr, result.stderr
