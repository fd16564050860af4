"""ORPO (Hong et al. 2024): supervised fine-tuning and preference tuning in one loss, without a
reference model. With P(y|x) = exp(mean log pi over y's tokens) and odds(y) = P / (1 - P):

    loss = -mean log pi(y_c) per token  -  beta log sigmoid(log odds(y_c) - log odds(y_r))

(beta is the paper's lambda; TRL's ORPOTrainer calls it beta too, default 0.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..core.values import Float
from . import kind
from .dpo import lengths, pair_logps


class Options(kind.ExampleOptions):
    beta: Float = Field(default=0.1, gt=0)  # the weight of the odds-ratio term


def orpo_terms(chosen, rejected, chosen_tokens, rejected_tokens, *, beta: float) -> dict:
    """Per-pair loss and log odds ratio (tensors of shape [n]) from summed log-probs and lengths."""
    mean_c, mean_r = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
    # log odds = log P - log(1 - P), with log(1 - P) = log1p(-exp(log P)); P < 1 always.
    log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c)) - torch.log1p(-torch.exp(mean_r)))
    return {"loss": -mean_c - beta * F.logsigmoid(log_odds), "log_odds": log_odds.detach(), "nll": -mean_c.detach()}


class Objective(kind.PairObjective):
    def __init__(self, sp):
        self.beta = sp.options.beta

    def loss(self, model, batch):
        chosen, rejected = pair_logps(model, batch)
        t = orpo_terms(chosen, rejected, *lengths(batch),
                       beta=self.beta)
        return {"loss": t["loss"].sum(), "nll": t["nll"].sum(), "log_odds": t["log_odds"].sum(),
                "reward_acc": (t["log_odds"] > 0).float().sum(), "logp_chosen": chosen.detach().sum(),
                "logp_rejected": rejected.detach().sum()}


class Orpo(kind.PairKind):
    name, Options = "orpo", Options

    def objective(self, sp, tokenizer, template, seed):
        return Objective(sp)


KIND = Orpo()
