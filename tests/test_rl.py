"""Online RL on a user's own task: reward plugins from an installed package (a real package this
file writes and pip-installs into a folder on PYTHONPATH), the math verifier, the policy-loss
variants against hand-computed values, several updates per rollout, dynamic sampling, and exact
resume after kill -9 with all of it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmforge.stages import grpo
from llmforge.stages.rl_loss import policy_loss
from llmforge.stages.verifiers import verify

from .conftest import cli, install_offline, on_path

PLUGIN = '''\
"""Rewards for arithmetic prompts, as a user would write them."""
import random
import time


class Digits:
    """1 per part: the reply has a digit; it names the record's answer; it is short."""

    def check(self, options):
        unknown = set(options) - {"bonus"}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} (known: bonus)")

    def score(self, reply):
        return {"digit": float(any(c.isdigit() for c in reply.text)),
                "answer": float(str(reply.record["answer"]) in reply.text) + reply.options.get("bonus", 0.0)
                * (reply.record["level"] == 1),
                "short": float(reply.tokens < 6)}


digits = Digits()


def noisy(reply):
    """A judge that samples: the same reply seed gives the same score (exact resume)."""
    return random.Random(reply.seed).random()


noisy.parallel = True


def coin(reply):
    """Right now and then: most groups score alike (dynamic sampling replaces them)."""
    return float(random.Random(reply.seed).random() < 0.15)


coin.parallel = True


def levels(reply):
    """A part named by the prompt's level: ranks that drew prompts of different levels log different parts."""
    return {f"level{reply.record['level']}": 1.0}


def broken(reply):
    if reply.seed % 3 == 0:
        raise ValueError("cannot read this reply")
    if reply.seed % 3 == 1:
        time.sleep(30)
    return 1.0
'''
PYPROJECT = '''\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "arith-rewards"
version = "0.1.0"

[project.entry-points."llmforge.rewards"]
digits = "arith_rewards:digits"
noisy = "arith_rewards:noisy"
coin = "arith_rewards:coin"
levels = "arith_rewards:levels"
broken = "arith_rewards:broken"
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The plugin package, pip-installed (offline, no build isolation) into a folder of its own."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "pkg/arith_rewards").mkdir(parents=True)
    (root / "pkg/pyproject.toml").write_text(PYPROJECT)
    (root / "pkg/arith_rewards/__init__.py").write_text(PLUGIN)
    install_offline(root / "pkg", root / "site")
    return root / "site"


def env(site: Path, **more) -> dict:
    return {"PYTHONPATH": on_path(site), **more}


RECIPE = """\
name: rl
seed: 5
tokenizer: {type: bpe, vocab_size: 290, chat_template: default}
model: {preset: llama, n_layer: 1, n_head: 2, n_kv_head: 1, n_embd: 32, seq_len: 48}
data:
  sums: {path: sums.jsonl, format: prompt, val_fraction: 10%}
stages:
  - name: rl
    kind: grpo
    mix: {sums: 1.0}
    steps: 6
    batch_size: 4
    group: 3
    max_new_tokens: 8
    REWARD
    optimizer: {lr: 3e-3, weight_decay: 0.0}
    eval: {every: 3, tokens: 512}
    checkpoint: {every: 2, keep: 3}
runtime: {log_every: 1, threads: 1}
"""


def project(folder: Path, reward: str, extra: str = "") -> Path:
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b), "level": 1 + (a > 4)}
            for a in range(9) for b in range(6)]
    (folder / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "recipe.yaml").write_text(RECIPE.replace("REWARD", reward + extra))
    return folder


def metrics(folder: Path) -> list[dict]:
    lines = (folder / "runs/rl/stages/01-rl/metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "loss" in m]


# --- plugins ------------------------------------------------------------------------------------------

def test_a_plugin_from_an_installed_package_rewards_and_logs_its_parts(tmp_path, site):
    folder = project(tmp_path, "reward: [{plugin: digits, options: {bonus: 0.5}}, {plugin: noisy, weight: 0.1}]")
    plan = cli("plan", "recipe.yaml", cwd=folder, env=env(site))
    assert plan.returncode == 0, plan.stderr
    assert "stages[0].reward[0]: plugin digits from arith-rewards 0.1.0 (arith_rewards:digits; timeout 30 s" in \
        plan.stdout
    assert "plugin noisy from arith-rewards 0.1.0" in plan.stdout and "in worker processes" in plan.stdout
    result = cli("run", "recipe.yaml", cwd=folder, env=env(site))
    assert result.returncode == 0, result.stderr
    steps = metrics(folder)
    assert len(steps) == 6
    for m in steps:  # each named part logged; the term is their sum; the noisy judge in [0, 1)
        assert {"reward/digits/digit", "reward/digits/answer", "reward/digits/short", "reward/digits",
                "reward/noisy", "reward_errors"} <= set(m)
        parts = m["reward/digits/digit"] + m["reward/digits/answer"] + m["reward/digits/short"]
        assert m["reward/digits"] == pytest.approx(parts, abs=1e-5)
        assert 0 < m["reward/noisy"] < 1 and m["reward_errors"] == 0
        assert m["reward"] == pytest.approx(m["reward/digits"] + 0.1 * m["reward/noisy"], abs=1e-5)


def test_a_failing_or_slow_plugin_is_counted_and_scores_zero(tmp_path, site):
    folder = project(tmp_path, "reward: [{plugin: broken, timeout: 0.5}, {verifier: format}]")
    folder.joinpath("recipe.yaml").write_text(folder.joinpath("recipe.yaml").read_text().replace("steps: 6", "steps: 2"))
    result = cli("run", "recipe.yaml", cwd=folder, env=env(site))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    steps = metrics(folder)
    assert all(m["reward_errors"] > 0 for m in steps)
    assert all(m["reward/broken"] < 1 for m in steps)  # the failed replies scored 0
    errors = [json.loads(line) for line in (folder / "runs/rl/stages/01-rl/reward_errors.jsonl").read_text().splitlines()]
    kinds = {e["error"].split(":")[0] for e in errors}
    assert kinds == {"ValueError", "TimeoutError"}, kinds
    assert {e["reward"] for e in errors} == {"broken"} and {e["step"] for e in errors} == {0, 1, "eval"}


def test_on_error_stop_ends_the_run_with_the_plugins_traceback(tmp_path, site):
    folder = project(tmp_path, "reward: [{plugin: broken, timeout: 0.5, on_error: stop}]")
    result = cli("run", "recipe.yaml", cwd=folder, env=env(site))
    assert result.returncode == 2, result.stderr
    assert "arith_rewards/__init__.py" in result.stderr  # the user's own code, where it failed
    line = next(x for x in result.stderr.splitlines() if x.startswith("error:"))
    assert line.startswith("error: stages[0].reward[0].plugin: broken (arith-rewards 0.1.0) failed on a reply of "
                           "the held-out eval: "), line


@pytest.mark.parametrize("reward, expected", [
    ("reward: [{plugin: nobody}]",
     "stages[0].reward[0].plugin: no installed package provides the reward plugin 'nobody' (installed: broken, coin, "
     "digits, levels, noisy)"),
    ("reward: [{plugin: digits, options: {bonsu: 1}}]",
     "stages[0].reward[0].options: digits (arith-rewards 0.1.0) rejects them: unknown option(s) ['bonsu'] (known: bonus)"),
    ("reward: [{verifier: format, options: {a: 1}}]", "stages[0].reward[0]: options applies to a plugin"),
    ("reward: [{verifier: format}]\n    max_rollouts: 2", "stages[0].max_rollouts: applies to dynamic_sampling: true"),
])
def test_plugin_mistakes_are_plan_errors_naming_the_key(tmp_path, site, reward, expected):
    folder = project(tmp_path, reward)
    result = cli("plan", "recipe.yaml", cwd=folder, env=env(site))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert expected in result.stderr, result.stderr


def test_resume_after_kill_9_is_bitwise_with_plugins_updates_and_dynamic_sampling(tmp_path, site):
    """A plugin scoring in worker processes with a per-reply seed, two updates per rollout (pi_old
    from the rollout), dynamic sampling (refills draw further batches from the sampler), cispo."""
    extra = "\n    updates_per_rollout: 2\n    dynamic_sampling: true\n    max_rollouts: 3\n    policy_loss: cispo"
    reward = "reward: [{plugin: coin}]"
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    whole, killed = project(tmp_path / "whole", reward, extra), project(tmp_path / "killed", reward, extra)
    assert cli("run", "recipe.yaml", cwd=whole, env=env(site)).returncode == 0
    first = cli("run", "recipe.yaml", cwd=killed, env=env(site, LLMFORGE_FAULTS="step:01-rl:3=kill"))
    assert first.returncode == -9, first.stderr
    second = cli("run", "recipe.yaml", cwd=killed, env=env(site))
    assert second.returncode == 0, second.stderr
    final = "runs/rl/stages/01-rl/final/model.safetensors"
    assert (whole / final).read_bytes() == (killed / final).read_bytes()
    steps = metrics(whole)
    assert any(m["refills"] > 0 for m in steps) and all("sampler_gap" in m for m in steps)
    resumed = {m["step"]: m for m in metrics(killed)}
    for m in steps:
        assert resumed[m["step"]]["reward"] == m["reward"]


def test_grpo_under_two_processes_sums_figures_by_name_and_refills_alike(tmp_path, site):
    """Two processes, one prompt each a step. A plugin whose named part depends on the prompt's
    level gives the ranks different figures: their sum over ranks still lines up (a part a rank
    lacks counts 0) and each step logs the parts of both (the ranks' figures were summed by
    position: rank 0's part names labelled the other rank's values, and unequal counts of parts
    met in one all-reduce of unequal sizes). Dynamic sampling with coin rewards, which mostly score
    alike: a rank that needs more prompts makes every rank draw them (refills), and the run ends."""
    extra = "\n    dynamic_sampling: true\n    max_rollouts: 3"
    folder = project(tmp_path, "reward: [{plugin: levels, weight: 0.0}, {plugin: coin}]", extra)
    folder.joinpath("recipe.yaml").write_text(folder.joinpath("recipe.yaml").read_text()
                                              .replace("batch_size: 4", "batch_size: 2"))
    result = cli("run", "recipe.yaml", "--nproc-per-node", 2, cwd=folder, env=env(site), timeout=240)
    assert result.returncode == 0, result.stderr
    steps = metrics(folder)
    assert len(steps) == 6 and any(m["refills"] > 0 for m in steps)
    for m in steps:  # each rank's replies score 1 under their own level's part, so the parts sum to the term
        parts = [v for k, v in m.items() if k.startswith("reward/levels/level") and not k.endswith("_std")]
        assert parts and sum(parts) == pytest.approx(m["reward/levels"]) == pytest.approx(1.0)
    assert any(sum(k.startswith("reward/levels/level") for k in m) == 2 for m in steps)  # levels differed


# --- the math verifier ------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, answer, score", [
    ("so x = \\boxed{0.5}", "1/2", 1), ("The answer is \\frac{1}{2}.", "0.5", 1), ("It is 1/2", "\\frac{1}{2}", 1),
    ("3 apples, then 2 more: 5", "5", 1), ("first 5, then \\boxed{7}", "7", 1), ("first 5, then \\boxed{7}", "5", 0),
    ("It is 0.25", "1/2", 0), ("I do not know", "1/2", 0), ("x = 2", "\\sqrt{4}", 1), ("about 3.14", "\\pi", 0),
])
def test_the_math_verifier_compares_final_answers_symbolically(reply, answer, score):
    assert verify("math", reply, answer, True, 5, max_new_tokens=10, within=5) == score


# --- the policy losses, by hand ---------------------------------------------------------------------

def _options(**kw):
    return grpo.Options(**{"reward": [{"verifier": "format"}], "kl": 0.1, "clip": 0.2, "max_new_tokens": 4} | kw)


# Two replies: 2 tokens (A = 1) and 1 token (A = -1); pi has moved away from pi_old.
LOGP = [-1.0, -2.0, -0.5]
OLD = [-1.1, -1.8, -0.9]
REF = [-1.2, -2.0, -0.6]
ADV = [1.0, 1.0, -1.0]
ROWS, COUNTS = torch.tensor([0, 0, 1]), torch.tensor([2, 1])


def _run(options, adv=ADV):
    logp = torch.tensor(LOGP, requires_grad=True)
    out = policy_loss(logp, torch.tensor(OLD), torch.tensor(REF), torch.tensor(adv), ROWS, COUNTS, options)
    out["loss"].backward()
    return {k: v.item() for k, v in out.items()}, logp.grad.tolist()


def _k3(t):
    return math.exp(REF[t] - LOGP[t]) - (REF[t] - LOGP[t]) - 1


def test_grpo_loss_clips_each_token_by_hand():
    out, grad = _run(_options())
    r = [math.exp(a - b) for a, b in zip(LOGP, OLD)]  # 1.105, 0.819, 1.492
    # reply 0: token 0 r=1.105 inside; token 1 r=0.819 inside; reply 1: r=1.492 > 1.2 with A<0: min takes r A
    surrogate = [r[0] * 1, r[1] * 1, r[2] * -1]
    loss = sum((0.1 * _k3(t) - surrogate[t]) * w for t, w in zip(range(3), (0.5, 0.5, 1.0)))
    assert out["loss"] == pytest.approx(loss, rel=1e-6)
    assert out["clip_frac"] == 0  # A<0 with r above 1+eps is not clipped (the min keeps r A)
    # d/dlogp of -r A is -r A (r = exp(logp - old)); the KL's: 0.1 (1 - exp(ref - logp))
    expected = [(-r[t] * ADV[t] + 0.1 * (1 - math.exp(REF[t] - LOGP[t]))) * w for t, w in zip(range(3), (.5, .5, 1))]
    assert grad == pytest.approx(expected, rel=1e-5)


def test_gspo_clips_the_sequence_ratio_by_hand():
    out, grad = _run(_options(policy_loss="gspo", clip=0.05))
    s0 = math.exp(((LOGP[0] - OLD[0]) + (LOGP[1] - OLD[1])) / 2)  # exp(-0.05) = 0.951: inside [0.95, 1.05]
    s1 = math.exp(LOGP[2] - OLD[2])  # 1.492: above 1.05 with A<0, the min keeps s A
    loss = (0.1 * _k3(0) - s0) * 0.5 + (0.1 * _k3(1) - s0) * 0.5 + (0.1 * _k3(2) + s1)
    assert out["loss"] == pytest.approx(loss, rel=1e-6)
    # the gradient through s: s A / |y| for each token of the reply
    expected = [-s0 * 0.5 + 0.1 * (1 - math.exp(REF[0] - LOGP[0])) * 0.5,
                -s0 * 0.5 + 0.1 * (1 - math.exp(REF[1] - LOGP[1])) * 0.5, s1 + 0.1 * (1 - math.exp(REF[2] - LOGP[2]))]
    assert grad == pytest.approx(expected, rel=1e-5)
    assert out["clip_frac"] == 0  # PPO's min clips only where the ratio moved the way A rewards
    clipped, _ = _run(_options(policy_loss="gspo", clip=0.01), adv=[-1.0, -1.0, 1.0])
    assert clipped["clip_frac"] == pytest.approx(2.0)  # s0 < 0.99 with A<0, s1 > 1.01 with A>0: both whole replies


def test_cispo_bounds_the_weight_and_keeps_every_gradient_by_hand():
    out, grad = _run(_options(policy_loss="cispo", clip=0.2, clip_high=0.3))
    r = [math.exp(a - b) for a, b in zip(LOGP, OLD)]
    w = [min(max(x, 0.8), 1.3) for x in r]  # 1.105, 0.819, 1.3 (clipped from 1.492)
    loss = sum((0.1 * _k3(t) - w[t] * ADV[t] * LOGP[t]) * m for t, m in zip(range(3), (0.5, 0.5, 1.0)))
    assert out["loss"] == pytest.approx(loss, rel=1e-6)
    assert out["clip_frac"] == pytest.approx(1.0)  # reply 1's one token
    expected = [(-w[t] * ADV[t] + 0.1 * (1 - math.exp(REF[t] - LOGP[t]))) * m for t, m in zip(range(3), (.5, .5, 1))]
    assert grad == pytest.approx(expected, rel=1e-5)  # the clipped token's gradient is bounded, not dropped


def test_constant_loss_mean_divides_by_max_new_tokens():
    out, _ = _run(_options(loss_mean="constant"))
    r = [math.exp(a - b) for a, b in zip(LOGP, OLD)]
    assert out["loss"] == pytest.approx(sum((0.1 * _k3(t) - r[t] * ADV[t]) / 4 for t in range(3)), rel=1e-6)


def test_dynamic_sampling_keeps_informative_groups_in_order_then_fills():
    def round_(informative, tag):
        n = len(informative) * 2
        return {"informative": np.array(informative), "rows": {"id": np.array([f"{tag}{i // 2}" for i in range(n)])}}
    rows = grpo._keep_groups([round_([True, False, False], "a"), round_([False, True, False], "b")], 3, 2)
    assert rows["id"].tolist() == ["a0", "a0", "b1", "b1", "a1", "a1"]  # a's and b's informative, then a set-aside


def test_several_updates_take_pi_old_once_from_the_rollout():
    torch.manual_seed(0)
    from llmforge.model.transformer import ModelConfig, Transformer
    model = Transformer(ModelConfig(vocab_size=20, seq_len=8, n_layer=1, n_head=2, n_embd=16))
    options = _options(updates_per_rollout=2, group=2)
    objective = grpo.Objective(SimpleNamespace(options=options, seq_len=8, index=0, micro_batch=1),
                               SimpleNamespace(vocab_size=20), SimpleNamespace(stop_ids=lambda tok: (19,)), 0)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 0, 0, 0, 0], [1, 2, 6, 7, 0, 0, 0, 0, 0]])
    learned = torch.zeros(2, 8, dtype=torch.bool)
    learned[0, 1:4], learned[1, 1:3] = True, True
    rows = {"tokens": tokens.numpy(), "learned": learned.numpy()}
    with torch.no_grad():  # as in rollout
        old = torch.from_numpy(objective._logps(model, rows))
    batch = {"tokens": tokens, "learned": learned, "old": old, "sampled": old, "ref": old,
             "advantage": torch.tensor([1.0, -1.0])}
    first = objective.loss(model, batch)
    assert first["clip_frac"].item() == 0 and first["kl"].item() == pytest.approx(0, abs=1e-6)
    with torch.no_grad():  # the first update moved the policy; pi_old stays what it was
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    second = objective.loss(model, batch)
    from llmforge.model.kept import Kept
    kept = Kept.of(learned)
    logp = objective.token_logps(model, {"tokens": tokens, "learned": kept}).detach()
    adv = batch["advantage"][kept.rows]
    against = lambda reference: policy_loss(logp, reference, kept.take(old), adv, kept.rows, kept.counts(),  # noqa: E731
                                            options)["loss"].item()
    assert second["loss"].item() == pytest.approx(against(kept.take(old)), rel=1e-6)  # ratio pi / pi_old(rollout)
    assert abs(against(logp) - against(kept.take(old))) > 1e-3  # not pi / pi (what one update would use)
    assert second["kl"].item() > 0 and objective.updates == 2
