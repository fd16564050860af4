"""A training step never makes the host wait for the device: no op whose result the host must read
(`.item()`, `bool(t)`, `.tolist()`) and none whose output shape depends on the data (`x[mask]`,
`nonzero`), which on a GPU block until the queued work is done. The figures are read once per log
line (run/step.py settle). Checked op by op under a dispatch mode, on the real step."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmforge.optim.adamw import OPTIMIZER as ADAMW
from llmforge.optim.muon import OPTIMIZER as MUON
from llmforge.run.step import settle, train_step
from llmforge.stages import dpo, kto, orpo, pretrain, reward, sft, simpo

from .test_scale import model, pair_rows, sft_rows

aten = torch.ops.aten
WAITS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
         aten.masked_scatter.default, aten.masked_scatter_.default}


class Waits(TorchDispatchMode):
    """Records each op that needs the device's result on the host."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and \
            any(i is not None and i.dtype == torch.bool for i in args[1])
        if func in WAITS or masks:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def stage(on_nonfinite="stop", **options):
    return SimpleNamespace(name="s", micro_batch=1, optimizer={"grad_clip": 1.0}, on_nonfinite=on_nonfinite,
                           max_nonfinite=2, options=SimpleNamespace(**options))


def step_figures(m, optimizer, objective, rows, sp, step):
    """What the engine keeps of a step until its log line."""
    out = train_step(m, optimizer, objective, rows, sp, torch.autocast("cpu", enabled=False), torch.device("cpu"),
                     step=step)
    out.pop("work")  # the engine's timer takes it
    return out


DPO = dict(beta=0.1, label_smoothing=0.0, loss="sigmoid", rpo_alpha=0.5)
OBJECTIVES = {
    "pretrain": (lambda sp: pretrain.Objective(sp, None), lambda: {"tokens": np.arange(66).reshape(2, 33) % 80}),
    "sft packed": (lambda sp: sft.Objective(sp, None), sft_rows),
    "sft padded": (lambda sp: sft.Objective(sp, None), lambda: sft_rows(packed=False)),
    "dpo": (lambda sp: dpo.Objective(sp, None), pair_rows),
    "simpo": (lambda sp: simpo.Objective(sp), pair_rows),
    "orpo": (lambda sp: orpo.Objective(sp), pair_rows),
    "kto": (lambda sp: kto.Objective(sp), pair_rows),
    "reward": (lambda sp: reward.Objective(sp, None), pair_rows),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_a_training_step_never_waits_for_the_device(name):
    make, rows = OBJECTIVES[name]
    sp = stage(**DPO, gamma=0.5, desirable_weight=1.0, undesirable_weight=1.0)
    m = model(reward.RewardModel) if name == "reward" else model()
    optimizer = ADAMW.build(m, {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1})
    pending = []
    for step in range(2):  # the second step after the optimizer has state
        with Waits() as waits:
            pending.append(step_figures(m, optimizer, make(sp), rows(), sp, step))
        assert waits.seen == [], f"{name}: {waits.seen}"
    means, _ = settle(pending, 2, sp, 0)  # the log line's one read (.tolist())
    assert np.isfinite(means["loss"]) and means["skipped"] == 0


@pytest.mark.parametrize("optimizer", [ADAMW, MUON])
def test_a_step_that_is_not_finite_is_skipped_and_counted(optimizer):
    """AdamW (fused) drops the update on the device; Muon, under skip, after reading one flag. A
    stop policy ends the run at the next settle, naming the step; skip counts the run in a row."""
    m = model()
    opt = optimizer.build(m, {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "muon_lr": 0.02})
    objective = sft.Objective(stage(), None)
    sp, rows = stage(on_nonfinite="skip"), sft_rows()
    step_figures(m, opt, objective, rows, sp, 0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    m.blocks[0].attn.q_proj.weight.data[0, 0] = float("nan")  # the next gradients are not finite
    before["blocks.0.attn.q_proj.weight"][0, 0] = float("nan")
    pending = [step_figures(m, opt, objective, rows, sp, s) for s in (1, 2)]
    for k, v in m.state_dict().items():
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), k  # not updated
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k  # nor the optimizer's state (nor its step count)
    means, run = settle(pending, 3, sp, bad_run=0)
    assert means["skipped"] == 1.0 and run == 2
    with pytest.raises(Exception, match="not finite 3 steps in a row"):
        settle(pending[:1], 4, sp, bad_run=2)
    with pytest.raises(Exception, match="stage s, step 1: the gradients are not finite"):
        settle(pending, 3, stage(), bad_run=0)


def test_the_plan_says_when_skipping_must_read_a_flag_every_step(tmp_path):
    from llmforge.plan.devices import Device
    from llmforge.plan.mix import SourceStats
    from llmforge.plan.plan import compile_plan
    from llmforge.recipe.loader import load_recipe

    from .conftest import TINY_RECIPE

    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE.format(steps=10, every=5))

    def warnings(*overrides):
        recipe = load_recipe(tmp_path / "recipe.yaml", list(overrides))
        return compile_plan(recipe, vocab_size=320, sources={"corpus": SourceStats(1, 10**6, 10**4)},
                            device=Device("cpu", "cpu", 2 ** 34, "fp32", False, 1, None)).warnings

    assert not any("reads one flag" in w for w in warnings("runtime.on_nonfinite=skip"))
    assert any("runtime.on_nonfinite: skip with optimizer.name: muon reads one flag from the device every step" in w
               for w in warnings("runtime.on_nonfinite=skip", "stages[0].optimizer.name=muon"))


def test_grpo_s_update_never_waits_for_the_device():
    """grpo's rollout reads its replies as text to score them (inherently on the host); its update,
    the loss over the rows it made, does not wait."""
    from llmforge.model.transformer import ModelConfig, Transformer
    from llmforge.stages import grpo, kind

    torch.manual_seed(2)
    m = Transformer(ModelConfig(vocab_size=20, seq_len=8, n_layer=1, n_head=2, n_embd=16))
    options = grpo.Options(reward=[{"verifier": "format"}], group=2, max_new_tokens=3, kl=0.1, clip=0.2)
    objective = grpo.Objective(SimpleNamespace(options=options, seq_len=8, index=0, micro_batch=1),
                               SimpleNamespace(vocab_size=20), SimpleNamespace(stop_ids=lambda tok: (19,)), 0)
    learned = np.zeros((2, 8), dtype=bool)
    learned[0, 1:4], learned[1, 1:3] = True, True
    rows = {"tokens": np.array([[1, 2, 3, 4, 5, 0, 0, 0, 0], [1, 2, 6, 7, 0, 0, 0, 0, 0]]), "learned": learned,
            "sampled": np.full((2, 8), -2.0, dtype=np.float32), "ref": np.full((2, 8), -2.5, dtype=np.float32),
            "advantage": np.array([0.7, -0.7], dtype=np.float32)}
    batch = kind.to_device(rows, torch.device("cpu"))
    with Waits() as waits:
        objective.loss(m, batch)["loss"].backward()
    assert waits.seen == []
