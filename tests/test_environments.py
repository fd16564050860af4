"""Multi-turn grpo with an environment: tool calls read as the model's own template writes them,
run by the environment, their results appended as context (never learned), the conversation
rendered as transformers' apply_chat_template(messages, tools=...) renders it, the reward
counted; then a real run (a tiny Qwen2.5-style model taught to call the calculator by sft) and
its kill -9 bitwise resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmforge.errors import TrainingError
from llmforge.stages import environments, episodes
from llmforge.stages.environments import Calculator, EnvironmentSpec
from llmforge.stages.rewards import RewardTerm, Rewards
from llmforge.stages.plugins import Reply
from llmforge.text.chat_jinja import read_folder_template
from llmforge.text.tokenizer_json import load_tokenizer
from llmforge.text.toolcalls import ToolCallFormat

from .conftest import cli
from .hf_families import FAMILIES, build_folder
from .test_tools import QWEN25_TOOLS, folder_for

transformers = pytest.importorskip("transformers")
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 3"}}\n</tool_call>'


def _setup(tmp_path, style="qwen2.5"):
    folder = folder_for(tmp_path, style)
    tok, template = load_tokenizer(folder), read_folder_template(folder)
    return folder, tok, template, environments.find(EnvironmentSpec(name="calculator"), "environment")


def test_the_tool_call_format_is_read_from_the_template(tmp_path):
    _, _, qwen, _ = _setup(tmp_path)
    _, _, llama, _ = _setup(tmp_path, "llama3.1")
    assert ToolCallFormat.of(qwen).parse("Let me see.\n" + CALL) == [("calculator", {"expression": "12 * 3"})]
    assert ToolCallFormat.of(llama).parse('{"name": "calculator", "parameters": {"expression": "2"}}') == \
        [("calculator", {"expression": "2"})]
    assert ToolCallFormat.of(qwen).parse("It is 36.") == [] and ToolCallFormat.of(llama).parse("It is 36.") == []
    with pytest.raises(ValueError, match="does not parse as JSON"):
        ToolCallFormat.of(qwen).parse('<tool_call>\n{"name": "calculator", "argu')


def test_a_tool_call_is_run_its_result_is_context_and_the_reward_counts(tmp_path):
    folder, tok, template, found = _setup(tmp_path)
    stops = tuple(template.stop_ids(tok))
    messages = [{"role": "user", "content": "What is 12 * 3?"}]
    c = episodes.start(template, tok, found, messages, {"answer": "36"}, {}, seed=1)
    prompt = len(c.ids)
    fmt = ToolCallFormat.of(template)
    # The policy's first turn: a call (sampled ids, ended by the template's end of turn)
    first = template.encode_text(tok, CALL) + [stops[0]]
    episodes.take(c, first, [-0.5] * len(first), True, tok, stops)
    episodes.act(c, template, tok, found, fmt, seq_len=512)
    assert c.live and c.episode.tool_calls == 1 and c.episode.tool_errors == 0
    assert c.episode.messages[-1] == {"role": "tool", "name": "calculator", "content": "36"}
    # ... then the answer, which ends the conversation
    second = template.encode_text(tok, "It is 36.") + [stops[0]]
    episodes.take(c, second, [-0.25] * len(second), True, tok, stops)
    episodes.act(c, template, tok, found, fmt, seq_len=512)
    assert not c.live and c.reply == "It is 36." and c.tokens == len(first) + len(second) and c.turns == 2
    rows = episodes.rows([c], 512)
    ids = rows["tokens"][0, :rows["length"][0]].tolist()
    learned = rows["learned"][0]
    # what is learned is exactly the policy's two turns (targets at positions - 1); the tool result is not
    targets = [ids[j + 1] for j in range(len(ids) - 1) if learned[j]]
    assert targets == first + second
    between = ids[prompt + len(first):len(ids) - len(second)]
    assert "36" in tok.decode(between) and not learned[prompt + len(first) - 1:len(ids) - len(second) - 1].any()
    assert rows["sampled"][0][learned].tolist() == [-0.5] * len(first) + [-0.25] * len(second)
    # the trained text is what transformers renders for these messages with these tools
    theirs = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    rendered = theirs.apply_chat_template(c.episode.messages, tools=Calculator.tools, tokenize=False)
    assert rendered.startswith(tok.decode(ids)) and rendered[len(tok.decode(ids)):] == "\n"
    assert theirs(rendered)["input_ids"][:len(ids)] == ids
    # the reward: the recipe's terms score the final turn
    rewards = Rewards([RewardTerm(verifier="math"), RewardTerm(verifier="format", weight=0.5)], 40, "stages[0]")
    reply = Reply(record={"answer": "36"}, text=c.reply, tokens=c.tokens, ended=c.ended, seed=1, answer="36",
                  messages=c.episode.messages)
    total, values, errors = rewards.score([reply], rows, "cpu", 0)
    assert total.tolist() == [1.5] and values["reward/math"].tolist() == [1.0] and errors == []


def test_a_call_that_does_not_parse_is_a_failed_turn_the_policy_sees(tmp_path):
    _, tok, template, found = _setup(tmp_path)
    stops = tuple(template.stop_ids(tok))
    c = episodes.start(template, tok, found, [{"role": "user", "content": "What is 2 + 2?"}], {}, {}, seed=1)
    bad = template.encode_text(tok, '<tool_call>\n{"name": "calculator", "argu') + [stops[0]]
    episodes.take(c, bad, [0.0] * len(bad), True, tok, stops)
    episodes.act(c, template, tok, found, ToolCallFormat.of(template), seq_len=512)
    assert c.live and c.episode.tool_errors == 1 and c.episode.tool_calls == 0
    assert c.episode.messages[-1]["content"].startswith("error: the tool call does not parse as JSON")
    calc = Calculator()  # a tool that fails says so in its result
    assert environments.call_tool(found, "calculator", {"expression": "__import__('os')"}, c.episode).startswith(
        "error: ValueError: only numbers") and c.episode.tool_errors == 2
    assert calc.call("calculator", {"expression": "(12 + 7) * 3 / 2"}, c.episode) == "28.5"


class Judge:
    """An environment with the calculator's tool whose own reward has named parts and fails on
    every other conversation."""
    tools = Calculator.tools

    def call(self, name, arguments, episode):
        return Calculator().call(name, arguments, episode)

    def reward(self, episode):
        if episode.seed % 2:
            raise ValueError("no verdict on this one")
        return {"answered": 1.0, "polite": 0.5}


def test_an_environments_reward_parts_are_logged_and_its_failures_written(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from llmforge.model.transformer import ModelConfig, Transformer
    from llmforge.stages.grpo import Objective, Options

    _, tok, template, _ = _setup(tmp_path)
    monkeypatch.setitem(environments.BUILT_IN, "judge", Judge())
    options = Options(reward=[{"verifier": "format"}], group=2, max_new_tokens=4,
                      environment={"name": "judge", "max_turns": 1, "weight": 2.0})
    objective = Objective(SimpleNamespace(index=0, options=options, seq_len=512), tok, template, seed=1)
    objective.folder = tmp_path
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, seq_len=512, n_layer=1, n_head=2, n_embd=16)).eval()
    messages = np.empty(4, dtype=object)
    messages[:] = [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(4)]
    prompts = {"messages": messages, "record": np.array([{"answer": str(i + 1)} for i in range(4)], dtype=object)}
    seeds = [10, 11, 12, 13]  # the odd ones fail
    rows, replies, values = objective._converse(model, prompts, [None] * 4, seeds, 1.0, torch.Generator().manual_seed(0),
                                                (3, 0, 0))
    total, values, failed = objective._score(replies, rows, values, "cpu", (3, 0, 0))
    assert failed == 2
    assert values["reward/judge/answered"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert values["reward/judge/polite"].tolist() == [0.5, 0.0, 0.5, 0.0]
    assert values["reward/judge"].tolist() == [1.5, 0.0, 1.5, 0.0]
    assert torch.allclose(total, values["reward/format"] + 2.0 * values["reward/judge"])
    errors = [json.loads(line) for line in (tmp_path / "reward_errors.jsonl").read_text().splitlines()]
    assert [(e["step"], e["reward"], e["reply"]) for e in errors] == [(3, "judge", 1), (3, "judge", 3)]
    assert errors[0]["error"] == "ValueError: no verdict on this one"
    # a seq_len that holds no prompt with the tool list trains nothing: one line naming the key
    short = Objective(SimpleNamespace(index=1, options=options, seq_len=64), tok, template, seed=1)
    with pytest.raises(TrainingError, match=r"stages\[1\]\.seq_len: 64 tokens hold none of these prompts with judge "
                                            r"\(built in\)'s tool list \(the shortest is \d+ tokens") as e:
        short._converse(model, prompts, [None] * 4, seeds, 1.0, torch.Generator().manual_seed(0), (0, 0, 0))
    assert "set stages[1].seq_len to about" in e.value.hint


# --- a real run ---------------------------------------------------------------------------------------

def _sums(n: int, seed: int = 0) -> list[tuple[int, int]]:
    return [(3 + (i * 7 + seed) % 17, 2 + (i * 5 + seed) % 11) for i in range(n)]


def project(folder: Path) -> Path:
    """A tiny Qwen2.5-style model with a template that writes tool calls; sft conversations that
    call the calculator, then prompts with their answers."""
    folder.mkdir(parents=True, exist_ok=True)
    build_folder(folder / "model", "qwen2", max_len=512)
    config = json.loads((folder / "model/tokenizer_config.json").read_text())
    (folder / "model/tokenizer_config.json").write_text(json.dumps(config | {"chat_template": QWEN25_TOOLS}))
    with open(folder / "calls.jsonl", "w") as f:
        for a, b in _sums(48):
            call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}}
            f.write(json.dumps({"tools": Calculator.tools, "messages": [
                {"role": "user", "content": f"What is {a} * {b}?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "calculator", "content": str(a * b)},
                {"role": "assistant", "content": f"It is {a * b}."}]}) + "\n")
    (folder / "sums.jsonl").write_text("".join(json.dumps({"prompt": f"What is {a} * {b}?", "answer": str(a * b)})
                                               + "\n" for a, b in _sums(40, seed=3)))
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


RECIPE = """\
name: tools
seed: 3
model: {init: {hf: model}}
data:
  calls: {path: calls.jsonl, format: chat, val_fraction: 0}
  sums: {path: sums.jsonl, format: prompt, val_fraction: 10%}
stages:
  - {name: sft, kind: sft, mix: {calls: 1.0}, steps: 80, batch_size: 8, optimizer: {lr: 5e-3, weight_decay: 0.0}}
  - name: rl
    kind: grpo
    mix: {sums: 1.0}
    seq_len: 512                       # the prompt with the calculator's tool list (~300 tokens), and turns
    steps: 4
    batch_size: 2
    group: 3
    max_new_tokens: 100                # a call is ~90 tokens of this tiny byte-level vocabulary
    environment: {name: calculator, max_turns: 3}
    reward: [{verifier: math}, {verifier: format, weight: 0.2}]
    optimizer: {lr: 1e-3, weight_decay: 0.0}
    eval: {every: 2, tokens: 1024}
    checkpoint: {every: 1, keep: 2}
runtime: {log_every: 1, threads: 1}
"""


def test_grpo_with_the_calculator_calls_it_and_resumes_bitwise_after_kill_9(tmp_path):
    whole, killed = project(tmp_path / "whole"), project(tmp_path / "killed")
    plan = cli("plan", "recipe.yaml", cwd=whole)
    assert plan.returncode == 0, plan.stderr
    assert "stages[1].environment: calculator (built in), tools calculator; up to 3 turns" in plan.stdout
    result = cli("run", "recipe.yaml", cwd=whole)
    assert result.returncode == 0, result.stderr
    steps = [m for m in map(json.loads, (whole / "runs/tools/stages/02-rl/metrics.jsonl").read_text().splitlines())
             if "loss" in m]
    assert len(steps) == 4 and all({"tool_calls", "tool_errors", "turns", "reward/math"} <= set(m) for m in steps)
    assert sum(m["tool_calls"] for m in steps) > 0  # sft taught it to call; the environment ran the calls
    assert all(m["turns"] >= 1 for m in steps)
    evaluated = cli("eval", "runs/tools", "--stage", "rl", "--json", cwd=whole)  # greedy conversations, rescored
    assert evaluated.returncode == 0 and "val_tool_calls" in json.loads(evaluated.stdout), evaluated.stderr
    assert cli("run", "recipe.yaml", cwd=killed, env={"LLMFORGE_FAULTS": "step:02-rl:2=kill"}).returncode == -9
    assert cli("run", "recipe.yaml", cwd=killed).returncode == 0
    final = "runs/tools/stages/02-rl/final/model.safetensors"
    assert (whole / final).read_bytes() == (killed / final).read_bytes()


@pytest.mark.parametrize("edit, expected", [
    ("environment: {name: calculator, max_turns: 3}", None),
    ("environment: {name: abacus}", "stages[1].environment.name: no environment 'abacus' is built in or installed "
                                    "(there are: calculator"),
    ("environment: {name: calculator, max_turns: 0}", "stages[1].environment.max_turns"),
    ("environment: {name: calculator, options: {precision: 3}}",
     "stages[1].environment.options: calculator (built in) rejects them: calculator takes no options"),
])
def test_environment_mistakes_are_plan_errors(tmp_path, edit, expected):
    folder = project(tmp_path)
    text = RECIPE.replace("environment: {name: calculator, max_turns: 3}", edit)
    if expected is None:  # a template that lists tools but writes no tool calls (hf_families' short Qwen2.5)
        config = json.loads((folder / "model/tokenizer_config.json").read_text())
        (folder / "model/tokenizer_config.json").write_text(json.dumps(config | {"chat_template": FAMILIES["qwen2"][2]}))
        text = "\n".join(line for line in text.splitlines() if "calls" not in line)  # sft's data has tool calls too
        expected = "model/tokenizer_config.json: chat_template: the chat template does not write tool calls as JSON"
    (folder / "recipe.yaml").write_text(text)
    result = cli("plan", "recipe.yaml", cwd=folder)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert expected in result.stderr and result.stderr.startswith("error: "), result.stderr
