"""SimPO (Meng et al. 2024): preference tuning without a reference model. A reply's implicit
reward is its length-normalized log-probability, beta/|y| log pi(y|x), and the loss of a pair is

    -log sigmoid(beta/|y_c| log pi(y_c) - beta/|y_r| log pi(y_r) - gamma)

with gamma a target margin. No reference pass: nothing is prepared before the first step.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from ..core.values import Float
from . import kind
from .dpo import lengths, pair_logps


class Options(kind.ExampleOptions):
    # The reward scale and the target margin; the paper's recommended ratio gamma / beta is 0.5.
    beta: Float = Field(default=2.0, gt=0)
    gamma: Float = Field(default=1.0, ge=0)


def simpo_terms(chosen, rejected, chosen_tokens, rejected_tokens, *, beta: float, gamma: float) -> dict:
    """Per-pair loss and rewards (tensors of shape [n]) from summed log-probs and reply lengths."""
    reward_chosen = beta * chosen / chosen_tokens.clamp(min=1)
    reward_rejected = beta * rejected / rejected_tokens.clamp(min=1)
    return {"loss": -F.logsigmoid(reward_chosen - reward_rejected - gamma),
            "reward_chosen": reward_chosen.detach(), "reward_rejected": reward_rejected.detach()}


class Objective(kind.PairObjective):
    def __init__(self, sp):
        self.beta, self.gamma = sp.options.beta, sp.options.gamma

    def loss(self, model, batch):
        chosen, rejected = pair_logps(model, batch)
        t = simpo_terms(chosen, rejected, *lengths(batch),
                        beta=self.beta, gamma=self.gamma)
        margin = t["reward_chosen"] - t["reward_rejected"]
        return {"loss": t["loss"].sum(), "reward_acc": (margin > 0).float().sum(), "reward_margin": margin.sum(),
                "logp_chosen": chosen.detach().sum(), "logp_rejected": rejected.detach().sum()}


class Simpo(kind.PairKind):
    name, Options = "simpo", Options

    def objective(self, sp, tokenizer, template, seed):
        return Objective(sp)


KIND = Simpo()
