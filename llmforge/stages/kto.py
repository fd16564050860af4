"""KTO (Ethayarajh et al. 2024): preference tuning from good and bad replies judged one at a time,
against a frozen reference (the stage's starting weights, as dpo's: their log-probs are computed
once, before the first step). Here each preference pair gives one desirable reply (chosen) and
one undesirable one (rejected), scored apart, never against each other:

    r = log pi(y) - log ref(y)          z0 = max(0, mean r over the batch's replies), no gradient
    desirable:   w_d (1 - sigmoid(beta (r - z0)))
    undesirable: w_u (1 - sigmoid(beta (z0 - r)))

averaged over the replies. z0 is the paper's reference point, the policy's KL from the
reference; the paper estimates it on mismatched prompt-reply pairs, this uses the batch's own
replies (so it needs no second reference pass).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..recipe.values import Float
from . import dpo, kind


class Options(kind.ExampleOptions):
    beta: Float = Field(default=0.1, gt=0)
    desirable_weight: Float = Field(default=1.0, gt=0)  # the paper's lambda_D
    undesirable_weight: Float = Field(default=1.0, gt=0)  # lambda_U


def kto_terms(chosen, rejected, ref_chosen, ref_rejected, *, beta: float, desirable_weight: float = 1.0,
              undesirable_weight: float = 1.0) -> dict:
    """Per-pair loss (the mean of its two replies' losses) and rewards, tensors of shape [n]."""
    r_good, r_bad = chosen - ref_chosen, rejected - ref_rejected
    z0 = torch.cat([r_good, r_bad]).mean().clamp(min=0).detach()
    good = desirable_weight * (1 - torch.sigmoid(beta * (r_good - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r_bad)))
    return {"loss": (good + bad) / 2, "reward_chosen": beta * r_good.detach(), "reward_rejected": beta * r_bad.detach(),
            "z0": z0}


class Objective(dpo.Objective):
    def __init__(self, sp):
        self.sp, o = sp, sp.options
        self.options = {"beta": o.beta, "desirable_weight": o.desirable_weight,
                        "undesirable_weight": o.undesirable_weight}

    def loss(self, model, batch):
        chosen, rejected = dpo.pair_logps(model, batch)
        ref = batch["reference"].float()
        t = kto_terms(chosen, rejected, ref[:, 0], ref[:, 1], **self.options)
        margin = t["reward_chosen"] - t["reward_rejected"]
        return {"loss": t["loss"].sum(), "reward_acc": (margin > 0).float().sum(), "reward_margin": margin.sum(),
                "kl": t["z0"] * len(chosen), "logp_chosen": chosen.detach().sum(),
                "logp_rejected": rejected.detach().sum()}


class Kto(kind.PairKind):
    name, Options = "kto", Options

    def objective(self, sp, tokenizer, template, seed):
        return Objective(sp)


KIND = Kto()
