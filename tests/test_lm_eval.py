"""lm-evaluation-harness on llmforge's models, offline: task YAMLs of our own over local jsonl (a
multiple-choice task, a generation task, a perplexity task), run through `llmforge lm-eval
--model llmforge`, `llmforge eval --tasks` and a stage's `eval.tasks`, and scored as lm-eval's
own Hugging Face backend scores the exported model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import COUNTS, cli, make_corpus

lm_eval = pytest.importorskip("lm_eval")

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light"]
TASKS = ("local_mc", "local_gen", "local_ppl")
OFFLINE = {"HF_HUB_OFFLINE": "1"}

RECIPE = """\
name: lme
seed: 3
tokenizer: {type: bpe, vocab_size: 320, chat_template: default}
model: {preset: llama, n_layer: 2, n_head: 2, n_kv_head: 1, n_embd: 32, seq_len: 64}
data:
  corpus: {path: corpus.txt, format: text}
  chat: {path: chat.jsonl, format: chat}
stages:
  - {name: pretrain, kind: pretrain, mix: {corpus: 1.0}, steps: 12, batch_tokens: 512, optimizer: {lr: 3e-3}}
  - name: sft
    kind: sft
    mix: {chat: 1.0}
    steps: 4
    batch_size: 4
    eval: {tasks: [world-qa, lm-eval:local_mc], lm_eval: {include_path: tasks, limit: 6}}
"""


def write_tasks(folder: Path) -> Path:
    """Three lm-eval tasks, each a YAML reading a local jsonl (dataset_path: json)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mc.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"question": f"the {WORDS[i % 8]} and the",
                                "choices": [WORDS[(i + k) % 8] for k in (1, 3, 5)], "answer": i % 3}) + "\n")
    with open(folder / "gen.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"question": f"the {WORDS[i % 8]} of", "target": WORDS[(i + 2) % 8]}) + "\n")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: local_mc\n" + common.format(data=folder / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "gen.yaml").write_text(
        "task: local_gen\n" + common.format(data=folder / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    (folder / "ppl.yaml").write_text(
        "task: local_ppl\n" + common.format(data=folder / "gen.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{question}} {{target}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished two-stage run whose sft stage ran an lm-eval task at its end."""
    folder = tmp_path_factory.mktemp("lme")
    (folder / "corpus.txt").write_text(make_corpus(6000))
    from .hf_families import write_chat_data

    write_chat_data(folder, n=40)
    write_tasks(folder / "tasks")
    (folder / "recipe.yaml").write_text(RECIPE)
    result = cli("run", "recipe.yaml", cwd=folder, env=OFFLINE)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


def test_a_stage_runs_its_lm_eval_tasks_beside_its_own(run):
    results = json.loads((run / "runs/lme/stages/02-sft/final/eval.json").read_text())
    assert 0 <= results["lm-eval/local_mc/acc"] <= 1 and "world-qa/format" in results, results


def test_llmforge_eval_runs_lm_eval_tasks_and_keeps_the_figures(run):
    result = cli("eval", "runs/lme", "--stage", "pretrain", "--tasks", ",".join(TASKS), "--include-path", "tasks",
                 "--json", cwd=run, env=OFFLINE)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout)
    assert {"lm-eval/local_mc/acc", "lm-eval/local_mc/acc_norm", "lm-eval/local_gen/exact_match",
            "lm-eval/local_ppl/word_perplexity", "lm-eval/local_ppl/bits_per_byte"} <= set(figures), figures
    later = json.loads((run / "runs/lme/stages/01-pretrain/later-evals.json").read_text())
    assert later["lm-eval/local_mc/acc"] == figures["lm-eval/local_mc/acc"]
    compared = cli("compare", "runs/lme", "runs/lme", cwd=run)
    assert "pretrain local_mc acc " in compared.stdout and "sft local_mc acc " in compared.stdout, compared.stdout


def test_lm_eval_s_own_command_line_with_the_llmforge_model(run):
    """`llmforge lm-eval` is lm-eval's command line (its flags, its table) with --model llmforge."""
    result = cli("lm-eval", "--model", "llmforge", "--model_args", "run=runs/lme,stage=sft",
                 "--tasks", "local_gen,local_mc", "--include_path", "tasks", "--limit", "4",
                 "--apply_chat_template", cwd=run, env=OFFLINE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "local_gen" in result.stdout and "exact_match" in result.stdout and "local_mc" in result.stdout, result.stdout


def test_an_unknown_task_is_one_line(run):
    result = cli("eval", "runs/lme", "--tasks", "no_such_task", cwd=run, env=OFFLINE)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-2].startswith("error: eval.tasks: lm-eval has no task 'no_such_task' (nor does "
                                                     f"{run / 'tasks'})"), result.stderr


def test_parity_with_lm_eval_s_hugging_face_backend_on_the_exported_model(run, tmp_path):
    """The same requests scored by llmforge in memory and by lm-eval's `hf` model on the stage
    exported as a transformers folder (fp32): every log-likelihood within 1e-4, every greedy
    flag, generation and metric the same."""
    import lm_eval.evaluator as evaluator
    from lm_eval.tasks import TaskManager

    from llmforge.tasks.harness import LlmforgeLM

    assert cli("export", "runs/lme", "--stage", "pretrain", "--out", str(tmp_path / "hf"), cwd=run).returncode == 0
    manager = TaskManager(include_path=str(run / "tasks"))
    hf = evaluator.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu",
                                   tasks=list(TASKS), task_manager=manager, log_samples=True, batch_size=4)
    ours = evaluator.simple_evaluate(model=LlmforgeLM(run=str(run / "runs/lme"), stage="pretrain", device="cpu",
                                                      batch_size=3),
                                     tasks=list(TASKS), task_manager=manager, log_samples=True)
    worst, compared = 0.0, 0
    for task in TASKS:
        figures = lambda r: {k: float(v) for k, v in r.items() if "," in k and "stderr" not in k}  # noqa: E731
        assert figures(hf["results"][task]) == pytest.approx(figures(ours["results"][task]), rel=1e-5), task
        for theirs, mine in zip(hf["samples"][task], ours["samples"][task], strict=True):
            for a, b in zip(theirs["resps"], mine["resps"], strict=True):
                a, b = a[0], b[0]
                if isinstance(a, (tuple, list)):  # (log-likelihood, greedy)
                    worst = max(worst, abs(a[0] - b[0]))
                    assert a[1] == b[1]
                elif isinstance(a, float):  # a rolling log-likelihood
                    worst = max(worst, abs(a - b))
                else:  # generated text
                    assert a == b
                compared += 1
    assert compared == 12 * 3 + 6 + 6 and worst < 1e-4, (compared, worst)
    COUNTS["lm-eval parity with its hf backend (fp32)"] = f"{compared} requests, largest log-likelihood gap {worst:.1e}"


def test_without_lm_eval_installed_the_hint_names_the_extra(monkeypatch):
    import sys

    from llmforge.errors import PlanError
    from llmforge.tasks import run_tasks

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith(("lm_eval.", "llmforge.tasks.harness"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(PlanError) as e:
        run_tasks(["lm-eval:arc_easy"], None, None, None)
    assert (e.value.message, e.value.hint) == ("eval.tasks: lm-eval tasks (arc_easy) need lm-evaluation-harness",
                                               "pip install 'llmforge[eval]'")


def test_the_entry_point_lm_eval_plugins_look_for_names_the_model():
    """Where lm-eval discovers model plugins (releases after 0.4.13), `lm_eval --model llmforge`
    finds the model through this entry point."""
    from importlib.metadata import entry_points

    from llmforge.tasks.harness import LlmforgeLM

    [point] = [e for e in entry_points(group="lm_eval.models") if e.name == "llmforge"]
    assert point.load() is LlmforgeLM
