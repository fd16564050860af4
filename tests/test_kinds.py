"""Stage kinds are modules in stages/, reached through one registry: nothing else names a kind.
The reward kind's Bradley-Terry loss and grpo's objective, by hand; batched generation; verifiers."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmforge.model.generate import generate_batch
from llmforge.model.transformer import KVCache, ModelConfig, Transformer
from llmforge.recipe.schema import StageSpec
from llmforge.stages import KINDS, grpo, reward
from llmforge.stages.verifiers import verify

PACKAGE = Path(__file__).resolve().parents[1] / "llmforge"


def _kind_names(node) -> list:
    """Kind names spelled in node: a string, or strings in a tuple, list or set."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in KINDS]


def test_no_module_outside_stages_branches_on_a_kind():
    """The measure of 'a kind is one module': outside stages/, no comparison with a kind's name
    (kind == "dpo", kind in ("sft", "dpo")), no table keyed by one, no lookup by one. (A metric
    may be called "reward"; a branch on the reward kind may not exist.)"""
    named = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "stages":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            spelled = []
            if isinstance(node, ast.Compare):
                spelled = [k for side in [node.left, *node.comparators] for k in _kind_names(side)]
            elif isinstance(node, ast.Dict):
                spelled = [k for key in node.keys if key is not None for k in _kind_names(key)]
            elif isinstance(node, ast.Subscript):
                spelled = _kind_names(node.slice)
            named += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {k!r}" for k in spelled]
    assert not named, named


def test_every_kind_declares_its_data_and_options():
    for name, kind in KINDS.items():
        assert kind.name == name and kind.formats
        stage = StageSpec(name="s", kind=name, mix={"x": 1}, steps=1, batch_size=2)
        assert isinstance(stage.options, kind.Options)  # its defaults, from its own module
    with pytest.raises(ValueError, match="beta applies to dpo, kto, simpo and orpo stages, not reward"):
        StageSpec(name="s", kind="reward", mix={"x": 1}, steps=1, batch_size=2, beta=0.1)
    with pytest.raises(ValueError, match="overlong"):
        StageSpec(name="s", kind="reward", mix={"x": 1}, steps=1, batch_size=2, overlong="cut")


def test_the_reward_is_read_at_each_rows_last_token():
    learned = torch.tensor([[False, True, True, False, False],   # tokens 2, 3 learned: read at 3
                            [False, False, False, True, True],   # cut at seq_len+1: the last input
                            [True, False, False, False, False]])
    assert reward.last_token(learned).mask.nonzero().tolist() == [[0, 3], [1, 4], [2, 1]]


def test_bradley_terry_loss_by_hand():
    cfg = ModelConfig(vocab_size=50, seq_len=8, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = reward.RewardModel(cfg)
    chosen = torch.tensor([[1, 5, 6, 7, 0, 0, 0, 0, 0], [1, 5, 9, 9, 9, 2, 0, 0, 0]])
    rejected = torch.tensor([[1, 5, 8, 0, 0, 0, 0, 0, 0], [1, 5, 3, 0, 0, 0, 0, 0, 0]])
    def learned(ends):  # targets 1..end-1: the reply is tokens 2..end (the prompt is [1, 5])
        return (torch.arange(8) >= 1) & (torch.arange(8) < torch.tensor(ends).unsqueeze(1))
    batch = {"chosen": chosen, "rejected": rejected, "chosen_learned": learned([3, 5]),
             "rejected_learned": learned([2, 2])}
    sums = reward.Objective(None, None).loss(model, batch)
    # By hand: each sequence alone, the score head on the final norm of its last token's state.
    with torch.no_grad():
        def score(ids):
            h = model.norm(model.hidden_states(torch.tensor([ids])))[0, -1]
            return float(model.score.weight[0] @ h)
        r_c = [score([1, 5, 6, 7]), score([1, 5, 9, 9, 9, 2])]
        r_r = [score([1, 5, 8]), score([1, 5, 3])]
    expected = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(r_c, r_r))
    assert sums["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert sums["accuracy"].item() == sum(c > r for c, r in zip(r_c, r_r))
    assert sums["margin"].item() == pytest.approx(sum(r_c) - sum(r_r), rel=1e-5, abs=1e-6)
    sums["loss"].backward()
    assert model.score.weight.grad is not None and model.lm_head.weight.grad is None  # the lm head is frozen


def test_a_reward_model_starts_from_a_language_model_with_a_new_head():
    kind = KINDS["reward"]
    assert not kind.generates and kind.fresh == ("score.weight",)
    cfg = ModelConfig(vocab_size=50, seq_len=8, n_layer=1, n_head=2, n_embd=16)
    model = kind.build_model(cfg)
    assert set(model.state_dict()) - set(KINDS["sft"].build_model(cfg).state_dict()) == set(kind.fresh)


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_left_padded_prompts_generate_as_each_would_alone(preset):
    """One batched, KV-cached generation of prompts of different lengths gives each the ids (and
    log-probs) that generating it alone gives."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, seq_len=24, n_layer=2, n_head=2, n_embd=16,
                      **({"positions": "learned", "norm": "layernorm", "mlp": "gelu"} if preset == "gpt2" else {}))
    model = Transformer(cfg).eval()
    prompts = [[3, 7, 9, 11, 2], [5], [8, 8, 1]]
    rows = torch.zeros(3, 24, dtype=torch.long)
    for i, p in enumerate(prompts):
        rows[i, :len(p)] = torch.tensor(p)
    out = generate_batch(model, rows, torch.tensor([5, 1, 3]), 6, temperature=0, top_k=None, generator=None,
                         stop_ids=(39,), vocab_limit=40)
    for i, p in enumerate(prompts):
        alone = list(model.generate(torch.tensor([p]), 6, temperature=0, stop_ids=(39,)))
        assert out["new"][i, :out["n"][i]].tolist() == alone
        with torch.no_grad():  # the log-prob of each id, from one plain forward over prompt + reply
            logits = model(torch.tensor([p + alone]))[0, len(p) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(alone)[:, None])[:, 0]
        torch.testing.assert_close(out["logps"][i, :len(alone)], expected, rtol=1e-4, atol=1e-5)


def test_a_cache_with_docs_continues_left_padded_rows_exactly():
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=30, seq_len=16, n_layer=2, n_head=2, n_embd=16)).eval()
    ids = torch.tensor([[0, 0, 4, 5, 6, 7]])  # two pads, then the text
    docs = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        whole = model(ids[:, 2:])[0, -1]
        cache = KVCache(2, 6)
        model(ids[:, :5], cache, docs[:, :5])
        step = model(ids[:, 5:], cache, docs)[0, -1]
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-5)


def test_verifiers_by_hand():
    def v(name, reply, answer="In Paris.", ended=True, n=5):
        return verify(name, reply, answer, ended, n, max_new_tokens=20, within=10)
    assert v("exact", " In  Paris. ") == 1 and v("exact", "In Paris. I hope this helps!") == 0
    assert v("contains", "Oh! In Paris. Yes") == 1 and v("contains", "In Lima.") == 0
    assert v("regex", "It is 42.", answer=r"\b42\b") == 1 and v("regex", "It is 420.", answer=r"\b42\b") == 0
    assert v("format", "anything", ended=True) == 1 and v("format", "cut off", ended=False) == 0
    assert v("length", "", n=10) == 0 and v("length", "", n=15) == -0.5 and v("length", "", n=20) == -1
    assert v("exact", "In Paris.", answer=None) == 0  # a prompt without a reference answer scores 0


def test_grpo_loss_by_hand():
    """Two replies of one prompt: the clipped surrogate, the k3 KL and the per-reply token mean."""
    torch.manual_seed(2)
    model = Transformer(ModelConfig(vocab_size=20, seq_len=8, n_layer=1, n_head=2, n_embd=16))
    options = grpo.Options(reward=[{"verifier": "format"}], group=2, max_new_tokens=3, kl=0.1, clip=0.2)
    objective = grpo.Objective(SimpleNamespace(options=options, seq_len=8, index=0, micro_batch=1),
                               SimpleNamespace(vocab_size=20), SimpleNamespace(stop_ids=lambda tok: (19,)), 0)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 0, 0, 0, 0], [1, 2, 6, 7, 0, 0, 0, 0, 0]])
    learned = torch.zeros(2, 8, dtype=torch.bool)
    learned[0, 1:4], learned[1, 1:3] = True, True  # replies: [3, 4, 5] and [6, 7]
    old = torch.zeros(2, 8)
    old[learned] = torch.tensor([-2.0, -3.0, -2.5, -2.8, -3.1])
    ref = torch.zeros(2, 8)
    ref[learned] = torch.tensor([-2.9, -3.0, -2.9, -2.7, -3.0])
    batch = {"tokens": tokens, "learned": learned, "sampled": old, "ref": ref, "advantage": torch.tensor([0.7, -0.7])}
    sums = objective.loss(model, batch)
    # by hand, token by token: pi_old is this forward's own log-prob (one update per rollout), so
    # the ratio is 1 whatever the sampler's log-probs (`old`, far off here, as bf16 kernels can be)
    logp = torch.log_softmax(model(tokens[:, :-1]), -1).gather(2, tokens[:, 1:, None])[..., 0]
    expected, kl_sum, gap = 0.0, 0.0, 0.0
    for r, adv in ((0, 0.7), (1, -0.7)):
        positions = learned[r].nonzero()[:, 0].tolist()
        for t in positions:
            ratio = torch.exp(logp[r, t] - logp[r, t].detach())
            kl = torch.exp(ref[r, t] - logp[r, t]) - (ref[r, t] - logp[r, t]) - 1
            expected = expected + (0.1 * kl - ratio * adv) / len(positions)
            kl_sum += kl.item() / len(positions)
            gap += abs(logp[r, t].item() - old[r, t].item()) / len(positions)
    assert sums["loss"].item() == pytest.approx(float(expected), abs=1e-6)
    assert sums["kl"].item() == pytest.approx(kl_sum, rel=1e-5)
    assert sums["clip_frac"].item() == 0 and sums["sampler_gap"].item() == pytest.approx(gap, rel=1e-5)
    # its gradient is the policy gradient: -A grad log pi (+ the KL's)
    for a, b in zip(torch.autograd.grad(sums["loss"], list(model.parameters())),
                    torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _pair_batch():
    """Two preference pairs of token rows: the chosen replies 2 and 3 tokens, the rejected 1 and 2."""
    chosen = torch.tensor([[1, 4, 5, 6, 0, 0, 0, 0, 0], [1, 7, 8, 9, 3, 0, 0, 0, 0]])
    rejected = torch.tensor([[1, 4, 2, 0, 0, 0, 0, 0, 0], [1, 7, 6, 6, 0, 0, 0, 0, 0]])

    def learned(starts, ends):
        at = torch.arange(8)
        return (at >= torch.tensor(starts)[:, None]) & (at < torch.tensor(ends)[:, None])
    return {"chosen": chosen, "rejected": rejected, "chosen_learned": learned([1, 2], [3, 4]),
            "rejected_learned": learned([1, 2], [2, 3])}


def _by_hand_logps(model, tokens, learned):
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens[:, :-1]), -1).gather(2, tokens[:, 1:, None])[..., 0]
    return [float(logp[r][learned[r]].sum()) for r in range(len(tokens))], learned.sum(1).tolist()


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_preference_losses_by_hand(name):
    torch.manual_seed(3)
    model = Transformer(ModelConfig(vocab_size=12, seq_len=8, n_layer=1, n_head=2, n_embd=16))
    batch = _pair_batch()
    options = KINDS[name].Options(beta=0.5, **({"gamma": 0.3} if name == "simpo" else {}))
    sp = SimpleNamespace(options=options)
    sums = KINDS[name].objective(sp, None, None, 0).loss(model, batch)
    (c, nc), (r, nr) = _by_hand_logps(model, batch["chosen"], batch["chosen_learned"]), \
        _by_hand_logps(model, batch["rejected"], batch["rejected_learned"])
    expected = 0.0
    for lc, tc, lr, tr in zip(c, nc, r, nr):
        if name == "simpo":  # -log sigmoid(beta/|y_c| log pi_c - beta/|y_r| log pi_r - gamma)
            expected += math.log(1 + math.exp(-(0.5 * lc / tc - 0.5 * lr / tr - 0.3)))
        else:  # NLL per token of chosen - beta log sigmoid(log odds_c - log odds_r)
            mc, mr = lc / tc, lr / tr
            log_odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
            expected += -mc + 0.5 * math.log(1 + math.exp(-log_odds))
    assert sums["loss"].item() == pytest.approx(expected, rel=1e-5)
    sums["loss"].backward()  # no reference: the loss reaches the weights directly
    assert model.tok_emb.weight.grad is not None


def test_kto_simpo_and_orpo_stages_run_from_a_recipe(tmp_path):
    """The added preference kinds train from a recipe like any other: pretrain -> kto on pairs
    (with its reference's log-probs prepared as dpo's), kto on unpaired replies, simpo, orpo."""
    import numpy as np

    from .conftest import cli
    from .test_post import RECIPE, preferences, write_data

    write_data(tmp_path)
    # Unpaired: each pair's chosen reply as a good one and its rejected as a bad one, apart.
    (tmp_path / "unpaired.jsonl").write_text("".join(
        json.dumps({"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}) + "\n"
        for p in preferences() for side in ("chosen", "rejected")))
    head = RECIPE.split("  - name: sft")[0].replace("steps: 16", "steps: 4").replace(
        "stages:", "  unpaired: {path: unpaired.jsonl, format: unpaired, val_fraction: 10%}\nstages:")
    text = head + "".join(f"""  - name: {name}
    kind: {kind}
    init: pretrain
    mix: {{{source}: 1.0}}
    steps: 4
    batch_size: 4
    optimizer: {{lr: 1e-3, weight_decay: 0.0}}
    eval: {{tokens: 1024}}
""" for name, kind, source in (("kto", "kto", "prefs"), ("kto-u", "kto", "unpaired"), ("simpo", "simpo", "prefs"),
                               ("orpo", "orpo", "prefs"))) + "runtime: {log_every: 2, threads: 1}\n"
    (tmp_path / "recipe.yaml").write_text(text)
    plan = cli("plan", "recipe.yaml", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "(good)" in plan.stdout or "(bad)" in plan.stdout  # the unpaired stage's example preview
    result = cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stages = tmp_path / "runs/post/stages"
    assert (stages / "02-kto/reference.npz").is_file()
    with np.load(stages / "03-kto-u/reference.npz") as saved:  # one log-prob per reply
        assert saved["train/unpaired"].shape[1] == 1 and np.all(saved["train/unpaired"] < 0)
    for stage, figure in (("02-kto", "val_kl"), ("03-kto-u", "val_reward_good"), ("04-simpo", "val_reward_acc"),
                          ("05-orpo", "val_log_odds")):
        saved = json.loads((stages / stage / "final/eval.json").read_text())
        assert figure in saved and math.isfinite(saved["val_loss"]), saved
    (tmp_path / "mixed.yaml").write_text(text.replace("mix: {unpaired: 1.0}", "mix: {unpaired: 1.0, prefs: 1.0}"))
    mixed = cli("plan", "mixed.yaml", cwd=tmp_path)
    assert mixed.returncode == 2 and "stages[2].mix: a kto stage trains on unpaired replies or on preference " \
        "pairs, not both ('unpaired' is unpaired, 'prefs' is preference)" in mixed.stderr, mixed.stderr


def test_kto_loss_by_hand():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    ref_c, ref_r = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -5.5])
    t = KINDS["kto"].Options(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    from llmforge.stages.kto import kto_terms

    out = kto_terms(chosen, rejected, ref_c, ref_r, beta=t.beta, desirable_weight=t.desirable_weight,
                    undesirable_weight=t.undesirable_weight)
    r_good, r_bad = [0.5, -1.0], [-1.0, 1.0]
    z0 = max(0.0, sum(r_good + r_bad) / 4)  # -0.125 -> 0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [(1 - sig(0.5 * (g - z0)) + 2 * (1 - sig(0.5 * (z0 - b)))) / 2 for g, b in zip(r_good, r_bad)]
    assert out["z0"].item() == z0
    assert out["loss"].tolist() == pytest.approx(expected, rel=1e-6)


def test_kto_unpaired_loss_by_hand():
    """Replies judged one at a time, with a positive reference point z0 (the batch's mean r)."""
    from llmforge.stages.kto import kto_losses

    logps, ref = torch.tensor([-2.0, -6.0, -3.0]), torch.tensor([-3.0, -5.0, -4.0])
    good = torch.tensor([True, False, True])
    out = kto_losses(logps, ref, good, beta=0.5, desirable_weight=1.5, undesirable_weight=1.0)
    r = [1.0, -1.0, 1.0]
    z0 = sum(r) / 3
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [1.5 * (1 - sig(0.5 * (r[0] - z0))), 1 - sig(0.5 * (z0 - r[1])), 1.5 * (1 - sig(0.5 * (r[2] - z0)))]
    assert out["z0"].item() == pytest.approx(z0)
    assert out["loss"].tolist() == pytest.approx(expected, rel=1e-6)
    assert out["reward"].tolist() == pytest.approx([0.5 * x for x in r])
