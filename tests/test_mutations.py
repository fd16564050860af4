"""Bad input, generated: recipes mutated without knowing the schema, `--set` values, data files
and transformers folders for model.init.hf. Every case must end in success or exit 2 with one
line naming what is wrong (a key path, file:line or the folder), never a traceback, within a few
seconds. Cases run in this process (the CLI through typer's runner, the readers directly), each
under a wall-clock limit; the counts are printed at the end of the test session."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmforge.cli import app
from llmforge.errors import LlmforgeError

from .conftest import COUNTS, REPO, TINY_RECIPE, make_corpus
from .test_faults import RECIPE as THREE_STAGES
from .test_post import write_data

LIMIT_S = 10  # per case; a hang (the `batch_size: 1e30` of old) fails instead of stalling the suite
SETTINGS = settings(deadline=None, derandomize=False, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])
# A refusal starts with where: recipe.yaml:LINE, a key path (stages[1].optimizer.lr), a file or folder.
NAMED = re.compile(r"^error: (rank \d+: )?(--set )?\S+:( |$)")


class Overtime(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` on the way can swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def ring(signum, frame):
        raise Overtime
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def invoke(folder: Path, *args: str):
    """`llmforge ARGS` in `folder`: (exit code, stderr). A traceback fails the test."""
    cwd = os.getcwd()
    os.chdir(folder)
    start = time.perf_counter()
    try:
        with time_limit(LIMIT_S):
            result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    except Overtime:
        raise AssertionError(f"llmforge {' '.join(args)} took over {LIMIT_S} s") from None
    finally:
        os.chdir(cwd)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError("".join(traceback.format_exception(*result.exc_info)))
    return result.exit_code, result.stderr, time.perf_counter() - start


def check_refusal(code: int, stderr: str, what: str, names: str = "") -> str:
    """names: a start of the message that names the problem too (the --set override as given)."""
    assert code in (0, 2), f"{what}: exit {code}\n{stderr}"
    if code == 0:
        return "accepted"
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), f"{what}: {stderr}"
    assert "Traceback" not in stderr, stderr
    assert NAMED.search(lines[0]) or (names and lines[0].startswith(names)), f"{what}: the message names no key path, file or line: {lines[0]}"
    return "refused"


# --- recipes -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """Valid recipes, each in a folder with its data: the quickstarts (builtin data), the tiny
    pretraining recipe and a three-stage one with chat and preference files."""
    out = []
    for name, text, data in [("quickstart", (REPO / "recipes/quickstart.yaml").read_text(), None),
                             ("rlhf", (REPO / "recipes/quickstart-rlhf.yaml").read_text(), None),
                             ("tiny", TINY_RECIPE.format(steps=40, every=10), "corpus"),
                             ("three", THREE_STAGES, "post")]:
        folder = tmp_path_factory.mktemp(name)
        if data == "corpus":
            (folder / "corpus.txt").write_text(make_corpus(3000))
        elif data == "post":
            write_data(folder)
        (folder / "recipe.yaml").write_text(text)
        assert invoke(folder, "plan", "recipe.yaml")[0] == 0, name
        out.append((folder, yaml.safe_load(text)))
    return out


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, prefix + (i,))


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


EXTREMES = [0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 1e30, -1e30, 1e-30, float("inf"), float("-inf"), float("nan"),
            "1e30", "1e300", "10T", "1Ei", "-5", "50%", "1000%", "", " ", "é中文🙂\u202e", "\x00", "../../x", "stages",
            "pretrain", "auto", "none", "a" * 5000]
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.sampled_from(EXTREMES)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)


def mutate(data, tree):
    """One schema-blind change somewhere in the tree; returns a description."""
    path = data.draw(st.sampled_from(list(_paths(tree))[1:]))
    parent, key = _get(tree, path[:-1]), path[-1]
    op = data.draw(st.sampled_from(["delete", "replace", "replace", "unknown key", "deep", "copy elsewhere"]))
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = data.draw(values)
    elif op == "unknown key":
        target = parent[key] if isinstance(parent[key], dict) else parent if isinstance(parent, dict) else {}
        if not isinstance(parent, dict) and not isinstance(parent[key], dict):
            parent[key] = target
        target[data.draw(st.sampled_from(["stepz", "lr", "kind", "mix", "hf", "é", "1", "__class__"]))] = data.draw(values)
    elif op == "deep":
        depth = data.draw(st.integers(10, 60))
        for _ in range(depth):
            parent[key] = [parent[key]] if depth % 2 else {"x": parent[key]}
    else:  # a valid value from another key: the right shape in the wrong place
        other = data.draw(st.sampled_from(list(_paths(tree))[1:]))
        parent[key] = json.loads(json.dumps(_get(tree, other)))
    return f"{op} at {'.'.join(map(str, path))}"


TEXT_MUTATIONS = {
    "alias bomb": lambda text: "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh")) + text,
    "alias cycle": lambda text: text.replace("stages:", "extra: &e [*e]\nstages:", 1),
    "duplicate key": lambda text: text + "\nseed: 3\n",
    "truncated": lambda text: text[: len(text) // 2],
    "tab": lambda text: text.replace("  ", "\t", 1),
    "binary": lambda text: text[:100] + "\x00\xff\x1b[31m" + text[100:],
    "unclosed": lambda text: text.replace("{", "{[", 1),
    "empty": lambda text: "",
    "a list": lambda text: "- " + text.replace("\n", "\n  "),
}


@settings(SETTINGS, max_examples=int(os.environ.get("LLMFORGE_MUTATIONS", 300)))
@given(st.data())
def test_mutated_recipes_plan_or_name_the_problem(recipes, data):
    folder, tree = data.draw(st.sampled_from(recipes))
    if data.draw(st.integers(0, 4)) == 0:
        how = data.draw(st.sampled_from(sorted(TEXT_MUTATIONS)))
        text = TEXT_MUTATIONS[how](yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    else:
        tree = json.loads(json.dumps(tree))
        how = "; ".join(mutate(data, tree) for _ in range(data.draw(st.integers(1, 3))))
        text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
    (folder / "mutated.yaml").write_text(text)
    code, stderr, _ = invoke(folder, "plan", "mutated.yaml")
    _count("recipe mutations", check_refusal(code, stderr.replace("mutated.yaml", "recipe.yaml"), how))


set_values = st.one_of(st.sampled_from([str(v) for v in EXTREMES]), st.text(max_size=30),
                       st.sampled_from(["{a: 1}", "[1, 2]", "{", "]", "&a x", "*a", "!!python/object:os.system",
                                        "null", "~", "true", "1e3", "0x10", "[[[[[]]]]]", "=", "a=b"]))


@settings(SETTINGS, max_examples=int(os.environ.get("LLMFORGE_MUTATIONS", 300)) // 2)
@given(st.data())
def test_set_overrides_plan_or_name_the_problem(recipes, data):
    folder, tree = data.draw(st.sampled_from(recipes))
    keys = [".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path).replace(".[", "[")
            for path in list(_paths(tree))[1:]]
    key = data.draw(st.one_of(st.sampled_from(keys), st.sampled_from(["stages.pretrain.steps", "stages[9].lr", "x.y",
                                                                      "stages[-1].kind", "", "..", "stages.[0]",
                                                                      "model.init.hf", "data.new.path"])))
    override = f"{key}={data.draw(set_values)}"
    code, stderr, _ = invoke(folder, "plan", "recipe.yaml", "--set", override)
    _count("--set values", check_refusal(code, stderr, override, names=f"error: --set {override if override.isprintable() else repr(override)}: "))


@pytest.mark.parametrize("key", ["model.n_layer", "model.n_embd", "model.seq_len", "tokenizer.vocab_size"])
def test_a_model_too_big_for_any_machine_is_refused_at_once_and_once(recipes, key):
    """Found by the draw above in CI: 2**31 layers took minutes to plan (the activation estimate
    counted checkpointed blocks one by one) and every stage said the same thing."""
    folder, _ = recipes[0]
    code, stderr, _ = invoke(folder, "plan", "recipe.yaml", "--set", f"{key}={2**31}")
    assert code == 2 and "GiB to train even at micro-batch 1" in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(set(errors)), stderr


# --- data files ---------------------------------------------------------------------------------

GOOD = {"jsonl": '{"text": "Hello there"}',
        "chat": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}',
        "preference": '{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}',
        "unpaired": '{"prompt": "Hi", "completion": "Hello", "label": true}',
        "prompt": '{"prompt": "Hi", "answer": "Hello"}',
        "prompt_response": '{"prompt": "Hi", "response": "Hello"}'}
BAD_LINES = st.one_of(
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["{", "[]", "null", "1", '"text"', "{}", '{"messages": null}', '{"messages": [1, 2]}',
                     '{"messages": [{"role": 3, "content": "x"}]}', '{"prompt": ["a"], "chosen": {}}',
                     '{"prompt": "a", "chosen": "b", "rejected": 7}', '{"label": "yes", "prompt": "a", "completion": "b"}',
                     '{"messages": [{"role": "assistant", "content": "' + "x" * 200_000 + '"}]}',
                     '\ufeff{"prompt": "a"}', "\x00" * 10, '{"prompt": "' + "\ud800" + '"}']),
    st.dictionaries(st.sampled_from(["messages", "prompt", "chosen", "rejected", "completion", "label", "answer",
                                     "response", "role", "content"]), values, max_size=4).map(json.dumps))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A trained tokenizer with the chat template's symbols, to prepare mutated files with."""
    from llmforge.text.chat import ChatTemplate
    from llmforge.text.tokenizer import Tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("data")
    tok = Tokenizer.load(train_tokenizer([make_corpus(3000)], folder / "tok", type="bpe", vocab_size=300,
                                         user_symbols=ChatTemplate().symbols))
    return folder, tok, ChatTemplate()


@settings(SETTINGS, max_examples=int(os.environ.get("LLMFORGE_MUTATIONS", 300)))
@given(st.data())
def test_mutated_data_files_prepare_or_name_the_record(prepared, data):
    from llmforge.data.cache import prepare_source
    from llmforge.data.spec import SourceSpec

    folder, tok, template = prepared
    fmt = data.draw(st.sampled_from(["text", *GOOD]))
    on_error = data.draw(st.sampled_from(["fail", "skip"]))
    if fmt == "text":
        raw = data.draw(st.one_of(st.binary(max_size=3000), st.text(max_size=3000).map(str.encode),
                                  st.just(b"\xff\xfe" + "é".encode("utf-16-le") * 100), st.just(b"x" * 2_000_000)))
        path = folder / "bad.txt"
    else:
        lines = [GOOD[fmt]] * data.draw(st.integers(0, 3))
        for _ in range(data.draw(st.integers(1, 3))):
            lines.insert(data.draw(st.integers(0, len(lines))), data.draw(BAD_LINES))
        raw = "\n".join(lines).encode("utf-8", "surrogatepass")
        if data.draw(st.booleans()):
            raw = raw[: data.draw(st.integers(0, len(raw)))]  # cut anywhere, mid-record too
        path = folder / "bad.jsonl"
    path.write_bytes(raw)
    spec = SourceSpec(path=path.name, format=fmt, on_error=on_error, val_fraction=0.0)
    start = time.perf_counter()
    try:
        with time_limit(LIMIT_S):
            prepare_source("bad", spec, folder, tok, workers=1, template=template)
        _count("data files", "accepted")
    except LlmforgeError as e:
        assert re.search(r"bad\.(jsonl|txt)(:\d+)?|data\.bad", e.message), e.message
        _count("data files", "refused")
    except Overtime:
        raise AssertionError(f"{fmt} file of {len(raw):,} bytes took over {LIMIT_S} s") from None
    assert time.perf_counter() - start < LIMIT_S


# --- transformers folders for model.init.hf -----------------------------------------------------

@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    pytest.importorskip("transformers")
    from .test_hf_import import RECIPE, make_base

    folder = tmp_path_factory.mktemp("hf")
    make_base(folder / "good", vocab_pad=0)
    (folder / "recipe.yaml").write_text(RECIPE.format(extra=""))
    return folder


def _folder_mutations(data, folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    weights = folder / "model.safetensors"
    how = data.draw(st.sampled_from(["truncate weights", "flip header", "config value", "config shape",
                                     "no config", "pickle only", "index without shards", "bad json"]))
    if how == "truncate weights":
        raw = weights.read_bytes()
        weights.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif how == "flip header":
        raw = bytearray(weights.read_bytes())
        at = data.draw(st.integers(0, 200))
        raw[at] ^= data.draw(st.integers(1, 255))
        weights.write_bytes(bytes(raw))
    elif how == "config value":
        key = data.draw(st.sampled_from(sorted(config)))
        config[key] = data.draw(values)
        (folder / "config.json").write_text(json.dumps(config))
        how += f" {key}"
    elif how == "config shape":
        (folder / "config.json").write_text(json.dumps(data.draw(st.one_of(values, st.just([config])))))
    elif how == "no config":
        (folder / "config.json").unlink()
    elif how == "pickle only":
        weights.rename(folder / "pytorch_model.bin")
    elif how == "index without shards":
        weights.unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps(data.draw(st.one_of(
            values, st.just({"weight_map": {"lm_head.weight": "model-00001.safetensors"}})))))
    else:
        (folder / "config.json").write_text(json.dumps(config)[:-5])
    return how


@settings(SETTINGS, max_examples=int(os.environ.get("LLMFORGE_MUTATIONS", 300)) // 5)
@given(st.data())
def test_mutated_model_folders_are_refused_by_name(hf_base, data):
    from llmforge.model.hf import read_hf

    base = hf_base / "base"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(hf_base / "good", base)
    how = _folder_mutations(data, base)
    code, stderr, _ = invoke(hf_base, "plan", "recipe.yaml")
    outcome = check_refusal(code, stderr, how)
    if code == 0:  # the recipe's view of the folder is fine: the weights are read when the stage starts
        try:
            with time_limit(LIMIT_S):
                read_hf(base)
        except LlmforgeError as e:
            assert str(base) in e.message, e.message
            outcome = "refused at stage start"
    _count("model folders", outcome)


def _count(what: str, outcome: str) -> None:
    tally = _TALLY[what]
    tally[outcome] += 1
    COUNTS[what] = f"{sum(tally.values())}: " + ", ".join(f"{n} {k}" for k, n in sorted(tally.items())) + \
        ", 0 tracebacks, 0 over the time limit"


_TALLY: dict = collections.defaultdict(collections.Counter)


@pytest.mark.parametrize("override", ["model.init.hf=~0", "data.corpus.path=~nobody-here/x.txt"])
def test_a_path_naming_an_unknown_user_is_a_path_that_is_not_there(recipes, override):
    """Found by the draw above in CI: `~0` (a home directory of user "0") raised from pathlib."""
    folder, _ = recipes[0]
    key = override.split("=")[0]
    if key.startswith("data.corpus"):
        folder, _ = recipes[2]  # the tiny recipe: its source is `corpus`
    code, stderr, _ = invoke(folder, "plan", "recipe.yaml", "--set", override)
    assert code in (0, 2) and "Traceback" not in stderr, stderr
