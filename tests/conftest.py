"""Shared fixtures: a small generated corpus, a tiny recipe, and a private token cache."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the reliability suites exercised in this run (cases and outcomes), printed at the end.
COUNTS: dict[str, str] = {}


# Slow parametrized tests marked `sampled(k)` run k of their cases in each run, picked by this seed
# (printed at the end): every case runs across CI runs, and each run stays short.
SAMPLE_SEED = int(os.environ.get("LLMFORGE_SAMPLE_SEED") or random.randrange(10**6))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LLMFORGE_ALL") or any("::" in str(a) for a in config.args):
        return  # asked for everything, or for named tests: run what was asked
    groups: dict[str, list] = {}
    for item in items:
        if item.get_closest_marker("sampled"):
            groups.setdefault(f"{item.module.__name__}::{item.originalname}", []).append(item)
    rng, dropped, kept = random.Random(SAMPLE_SEED), [], []
    for _, group in sorted(groups.items()):
        k = group[0].get_closest_marker("sampled").args[0]
        keep = set(rng.sample(range(len(group)), min(k, len(group))))
        dropped += [it for i, it in enumerate(group) if i not in keep]
        kept += [group[i].name for i in sorted(keep)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [it for it in items if it not in dropped]
        COUNTS[f"sampled slow cases (seed {SAMPLE_SEED}: LLMFORGE_SAMPLE_SEED={SAMPLE_SEED} repeats it, "
               f"LLMFORGE_ALL=1 runs all)"] = f"{len(kept)} run, {len(dropped)} left for other runs: {', '.join(kept)}"


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        terminalreporter.section("cases exercised in this run")
        for what, outcome in COUNTS.items():
            terminalreporter.write_line(f"{what}: {outcome}")

TINY_RECIPE = """\
name: tiny
seed: 7
tokenizer: {{type: bpe, vocab_size: 320}}
model: {{preset: llama, n_layer: 2, n_head: 2, n_kv_head: 1, n_embd: 32, seq_len: 32}}
data:
  corpus: {{path: corpus.txt, val_fraction: 10%}}
stages:
  - name: pretrain
    kind: pretrain
    mix: {{corpus: 1.0}}
    steps: {steps}
    batch_tokens: 256
    optimizer: {{lr: 3e-3}}
    schedule: {{warmup: 3, decay: cosine}}
    eval: {{every: 10, tokens: 1024}}
    checkpoint: {{every: {every}, keep: 2}}
runtime: {{log_every: 2}}
"""


def make_corpus(n_words: int = 16000, seed: int = 0) -> str:
    """Deterministic pseudo-text: words built from syllables, in sentences and paragraphs, so a
    tokenizer finds real subwords and a model has structure to learn."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ta", "ri", "su", "vo", "el", "an", "or", "is"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    out, sentence = [], []
    for i in range(n_words):
        sentence.append(rng.choice(words[: 30 + i % 270]))
        if len(sentence) > rng.randint(4, 12):
            out.append(" ".join(sentence).capitalize() + rng.choice([".", ".", "!", "?"]))
            sentence = []
            if rng.random() < 0.15:
                out.append("\n\n")
    return " ".join(out) + "\n"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never touch ~/.cache: the token cache lives in a per-session temp folder
    (set in os.environ so CLI subprocesses inherit it)."""
    old = os.environ.get("LLMFORGE_CACHE")
    os.environ["LLMFORGE_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    yield
    if old is None:
        os.environ.pop("LLMFORGE_CACHE", None)
    else:
        os.environ["LLMFORGE_CACHE"] = old


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A folder with corpus.txt and recipe.yaml (40 steps, checkpoint every 10)."""
    (tmp_path / "corpus.txt").write_text(make_corpus())
    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE.format(steps=40, every=10))
    return tmp_path


def install_offline(package: Path, site: Path) -> None:
    """pip-install a package folder into `site` (offline, no build isolation, no dependencies),
    leaving the test's own environment as it is; `on_path(site)` puts it on PYTHONPATH."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(package)], check=True)


def on_path(site: Path) -> str:
    """PYTHONPATH with `site` first."""
    return os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])


def cli(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run the real `llmforge` CLI in a subprocess, as a user would. Commands that train and load
    no model (plan, init, report, compare, schema) run in this process instead: the same Typer app
    and error handling, without ~3 s of interpreter and torch start-up per call (unless the test
    sets environment variables, which the process reads at start)."""
    if args and args[0] in ("plan", "init", "report", "compare", "schema") and not env:
        return in_process(*args, cwd=cwd)
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "llmforge", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def in_process(*args, cwd=None) -> subprocess.CompletedProcess:
    import traceback

    from typer.testing import CliRunner

    from llmforge.cli import app

    here = os.getcwd()
    os.chdir(cwd or here)
    try:
        result = CliRunner().invoke(app, list(map(str, args)), catch_exceptions=True)
    finally:
        os.chdir(here)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):  # as the process would print
        stderr += "".join(traceback.format_exception(*result.exc_info))
        return subprocess.CompletedProcess(args, 1, result.stdout, stderr)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)
