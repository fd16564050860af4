"""Every `llmforge` command shown in README.md and docs/ runs, as written, in the order its page
shows it (a line shown twice runs once), and exits 0 without a traceback.

Each page runs in a project folder of its own that holds what its commands read, as a user's
would: `recipes/` (the shipped recipes), `data/` (stand-ins for the shards and conversations users
bring), `~/models/SmolLM2-135M-Instruct` (a tiny random Llama, HOME being the test's), any file a
page shows in a ```yaml block whose first line names it (`# experiments/lr-1e-3.yaml`), and the
finished runs that a page reads without making them itself (`compare runs/base runs/lr-1e-3`).
Training would take minutes at the recipes' sizes, so every recipe a command runs (shipped, or
written by `init`) is the real file extended (`extends:`) by one that cuts its stages to 2 steps
of 8 rows and no task evals; everything else about the command is as the page says.

A page is slow (a dozen subprocesses, several runs), so each test run exercises one page
(`sampled`); LLMFORGE_ALL=1 runs every page."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import TINY_RECIPE, install_offline, make_corpus, on_path
from .test_docs import PAGES, REPO, shown_commands
from .test_tools import QWEN25_TOOLS

SHIPPED = REPO / "recipes"
PLANNED_ONLY = ("gpt2-124m", "llama-1b-pipeline")  # sized for 8 GPUs: their pages only plan them


def shrink(recipe: Path, base: Path) -> None:
    """Make `recipe` the real file `base` with every stage cut to 2 steps of 8 rows."""
    stages = yaml.safe_load(base.read_text())["stages"]
    short = [{"name": s["name"], "steps": 2, "tokens": None, "epochs": None, "batch_tokens": None, "batch_size": 8,
              "seq_len": None, "eval": {"every": 0, "tokens": 1024, "tasks": []}, "checkpoint": {"every": 0}}
             for s in stages]
    recipe.write_text(yaml.safe_dump({"extends": str(base), "stages": short}, sort_keys=False))


def environment(home: Path) -> dict:
    # Hub datasets come from the datasets cache under HOME; packages a page pip-installs, from home/site
    return dict(os.environ, HOME=str(home), SHELL="/bin/bash", NO_COLOR="1", LLMFORGE_CACHE=str(home / "cache"),
                HF_HUB_OFFLINE="1", PYTHONPATH=on_path(home / "site"))


def pip_install(page: Path, folder: Path, home: Path) -> None:
    """The page's `pip install ./examples/...` lines, into home/site (on PYTHONPATH), offline and
    without touching the test's own environment."""
    for path in re.findall(r"^pip install (\./examples/\S+)$", page.read_text(), flags=re.M):
        install_offline(folder / path, home / "site")


def llmforge(args: list[str], cwd: Path, home: Path, where: str = "", stdin: str | None = None):
    # From a shell, as typed: --install-completion asks the process tree which shell it is in (a
    # bare `bash -c CMD` would exec CMD and leave no shell in the tree, hence the `; exit`).
    line = f"{shlex.quote(sys.executable)} -m llmforge {shlex.join(args)}; exit $?"
    result = subprocess.run(["bash", "-c", line], cwd=cwd, env=environment(home),
                            input=stdin or "", capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in out, f"{where}: llmforge {shlex.join(args)}\n{out[-3000:]}"
    return result


class Project:
    """The folder a page runs in (copied from one built once), and the finished runs pages read."""

    def __init__(self, root: Path):
        self.root, self.home = root / "project", root / "home"
        self.runs: dict[str, Path] = {}
        self._build()

    def _build(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .hf_families import build_folder, write_chat_data

        root = self.root
        (root / "recipes").mkdir(parents=True)
        (self.home / "models").mkdir(parents=True)
        for recipe in SHIPPED.glob("*.yaml"):
            target = root / "recipes" / recipe.name
            shutil.copy(recipe, target) if recipe.stem in PLANNED_ONLY else shrink(target, recipe)
        build_folder(self.home / "models/SmolLM2-135M-Instruct", "llama", max_len=256)
        qwen = self.home / "models/Qwen2.5-0.5B-Instruct"  # rl.md's tool calls: a template that writes them
        build_folder(qwen, "qwen2", max_len=1024)
        config = json.loads((qwen / "tokenizer_config.json").read_text())
        (qwen / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": QWEN25_TOOLS}))
        shutil.copytree(REPO / "examples", root / "examples")
        shutil.copytree(self.home / "models/SmolLM2-135M-Instruct", root / "models/smollm2")
        shards = root / "data/fineweb-edu/sample/10BT"
        shards.mkdir(parents=True)
        pq.write_table(pa.table({"text": make_corpus(20000).split(". ")}), shards / "000.parquet")
        write_chat_data(root / "data", n=200)
        write_dataset_stand_ins(root / "data", self.home / ".cache/huggingface/datasets")
        from llmforge.data.world import multiple_choice  # evaluation.md's task of your own reads it

        (root / "evals").mkdir()
        (root / "evals/world-mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in multiple_choice()))
        (root / "corpus.txt").write_text(make_corpus(3000))
        (root / "recipe.yaml").write_text(TINY_RECIPE.format(steps=4, every=2))
        (root / "shared").mkdir()
        shrink(root / "shared/base.yaml", SHIPPED / "quickstart.yaml")  # what sharing.md's experiments extend

    def page_folder(self, tmp: Path, page: Path, lines: list[str]) -> Path:
        """A copy of the project with the page's files and the runs it reads but does not make."""
        folder = tmp / "project"
        shutil.copytree(self.root, folder)
        for block in re.findall(r"```yaml\n# (\S+\.yaml)\n(.*?)```", page.read_text(), flags=re.S):
            path, text = folder / block[0], block[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        made = {run_dir(folder, line) for line in lines if line.split()[1] == "run"}
        for line in lines:
            for name in re.findall(r"\bruns/([\w.-]+)", line):
                if f"runs/{name}" not in made and not (folder / "runs" / name).exists():
                    shutil.copytree(self.run(name), folder / "runs" / name)
        return folder

    def run(self, name: str) -> Path:
        """A finished run for pages that read runs/NAME: the quickstart's, under any name, or an
        adapter-trained fine-tune for runs/my-assistant."""
        source = "my-assistant" if name == "my-assistant" else "quickstart"
        if source not in self.runs:
            folder = self.root.parent / f"prerequisite-{source}"
            shutil.copytree(self.root, folder)
            if source == "my-assistant":
                llmforge(["init", "my-assistant", "--template", "finetune", "--model",
                          str(self.home / "models/SmolLM2-135M-Instruct")], folder, self.home)
                wrap_written(folder / "my-assistant.yaml")
                recipe = "my-assistant.yaml"
            else:
                recipe = "recipes/quickstart.yaml"
            llmforge(["run", recipe, "-q"], folder, self.home)
            self.runs[source] = folder / "runs" / source
        return self.runs[source]


def write_dataset_stand_ins(data: Path, hf_cache: Path) -> None:
    """docs/data.md's sources: a save_to_disk folder, ShareGPT and Alpaca files, and SmolTalk's
    `all` subset in the datasets cache, as a download from the Hub leaves it."""
    import datasets

    from .hf_families import hub_dataset_cache

    pairs = [(f"Where does person{i} live?", f"In city{i % 7}.") for i in range(60)]
    sharegpt = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in pairs]
    (data / "sharegpt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sharegpt))
    (data / "alpaca.jsonl").write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n"
                                               for q, a in pairs))
    messages = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    datasets.Dataset.from_list(messages).save_to_disk(str(data / "my-chats"))
    hub_dataset_cache(hf_cache, "HuggingFaceTB/smoltalk", messages, subset="all")


def wrap_written(recipe: Path) -> None:
    """A recipe `init` just wrote, kept whole as NAME.full.yaml under a NAME.yaml that shrinks it."""
    full = recipe.with_suffix(".full.yaml")
    recipe.rename(full)
    shrink(recipe, full)


def run_dir(folder: Path, line: str) -> str:
    """The run directory a `run` command line writes (a recipe `init` has yet to write: its name)."""
    from llmforge.recipe.loader import load_recipe

    args = shlex.split(line)
    if "--run-dir" in args:
        return args[args.index("--run-dir") + 1]
    recipe = folder / args[2]
    if recipe.exists() and "~" in recipe.read_text():  # a path under the test's HOME: read the name alone
        return f"runs/{yaml.safe_load(recipe.read_text())['name']}"
    return f"runs/{load_recipe(recipe).name if recipe.exists() else recipe.stem}"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return Project(tmp_path_factory.mktemp("docs"))


PAGE_NAMES = sorted({where.split(":")[0] for where, _ in shown_commands()})


@pytest.mark.sampled(1)
@pytest.mark.parametrize("page", PAGE_NAMES)
def test_every_command_on_the_page_runs(page, project, tmp_path):
    shown = [(where, line) for where, line in shown_commands() if where.split(":")[0] == page
             and not (line.split()[1] == "run" and "--nnodes" in line)]  # waits for its other machines: test_multinode.py
    commands = [(where, line) for i, (where, line) in enumerate(shown) if line not in [l for _, l in shown[:i]]]
    path = next(p for p in PAGES if p.name == page)
    folder = project.page_folder(tmp_path, path, [line for _, line in commands])
    pip_install(path, folder, project.home)
    for where, line in commands:
        args = shlex.split(line.replace("~", str(project.home)))[1:]
        stdin = "Where does Clara live?\n" if args[0] == "chat" else None
        llmforge(args, folder, project.home, where, stdin)
        if args[0] == "init":  # run what it wrote, cut short (the file itself is planned as written first)
            name = args[1]
            llmforge(["plan", f"{name}.yaml"], folder, project.home, where)
            wrap_written(folder / f"{name}.yaml")
