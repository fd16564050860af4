"""KTO (Ethayarajh et al. 2024): preference tuning from good and bad replies judged one at a time,
against a frozen reference (the stage's starting weights, as dpo's: their log-probs are computed
once, before the first step). It reads either unpaired data (format: unpaired, one reply and
its label per record, what KTO is for: thumbs up/down collected one at a time), or preference
pairs, whose chosen reply counts as desirable and rejected as undesirable, scored apart, never
against each other:

    r = log pi(y) - log ref(y)          z0 = max(0, mean r over the batch's replies), no gradient
    desirable:   w_d (1 - sigmoid(beta (r - z0)))
    undesirable: w_u (1 - sigmoid(beta (z0 - r)))

averaged over the replies (a pair's loss is the mean of its two). z0 is the paper's reference
point, the policy's KL from the reference; the paper estimates it on mismatched prompt-reply
pairs, this uses the batch's own replies (so it needs no second reference pass).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ..core.values import Float
from . import dpo, kind


class Options(kind.ExampleOptions):
    beta: Float = Field(default=0.1, gt=0)
    desirable_weight: Float = Field(default=1.0, gt=0)  # the paper's lambda_D
    undesirable_weight: Float = Field(default=1.0, gt=0)  # lambda_U


def kto_losses(logps, ref, good, *, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> dict:
    """Per-reply loss and reward of replies judged one at a time: logps, ref [n], good [n] bool."""
    r = logps - ref
    z0 = r.mean().clamp(min=0).detach()
    loss = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return {"loss": loss, "reward": beta * r.detach(), "z0": z0}


def kto_terms(chosen, rejected, ref_chosen, ref_rejected, **options) -> dict:
    """Per-pair loss (the mean of its two replies' losses) and rewards, tensors of shape [n]."""
    n = len(chosen)
    good = torch.arange(2 * n, device=chosen.device) < n
    t = kto_losses(torch.cat([chosen, rejected]), torch.cat([ref_chosen, ref_rejected]), good, **options)
    return {"loss": (t["loss"][:n] + t["loss"][n:]) / 2, "reward_chosen": t["reward"][:n],
            "reward_rejected": t["reward"][n:], "z0": t["z0"]}


class Objective(dpo.Objective):
    def __init__(self, sp):
        self.sp, o = sp, sp.options
        self.options = {"beta": o.beta, "desirable_weight": o.desirable_weight,
                        "undesirable_weight": o.undesirable_weight}

    def units(self, batch: dict) -> int:
        return len(batch["reply" if "reply" in batch else "chosen"])

    def loss(self, model, batch):
        if "reply" in batch:
            return self._unpaired(model, batch)
        chosen, rejected = dpo.pair_logps(model, batch)
        ref = batch["reference"].float()
        t = kto_terms(chosen, rejected, ref[:, 0], ref[:, 1], **self.options)
        margin = t["reward_chosen"] - t["reward_rejected"]
        return {"loss": t["loss"].sum(), "reward_acc": (margin > 0).float().sum(), "reward_margin": margin.sum(),
                "kl": t["z0"] * len(chosen), "logp_chosen": chosen.detach().sum(),
                "logp_rejected": rejected.detach().sum()}

    def _unpaired(self, model, batch):
        """Sums over the batch's replies; the good and bad replies' mean rewards are logged as
        sums scaled by the batch (their share varies), so they read as per-batch means."""
        logps = dpo.sequence_logps(model, batch["reply"], batch["reply_learned"])
        good = batch["label"].bool()
        t = kto_losses(logps, batch["reference"].float()[:, 0], good, **self.options)
        n, goods = len(logps), good.sum().clamp(min=1)
        bads = (~good).sum().clamp(min=1)
        return {"loss": t["loss"].sum(), "kl": t["z0"] * n, "logp": logps.detach().sum(),
                "reward_good": torch.where(good, t["reward"], 0).sum() / goods * n,
                "reward_bad": torch.where(good, 0, t["reward"]).sum() / bads * n}

    @torch.no_grad()
    def reference(self, model, batch: dict) -> np.ndarray:
        """[n, 1] log-probs of each unpaired reply under the frozen reference (pairs: [n, 2])."""
        if "reply" not in batch:
            return super().reference(model, batch)
        return dpo.sequence_logps(model, batch["reply"], batch["reply_learned"])[:, None].cpu().numpy()


class Kto(kind.PairKind):
    name, Options = "kto", Options
    formats = ("unpaired", "preference")

    def check(self, where, index, options, recipe, sources, fingerprint):
        mix = recipe.stages[index].mix
        formats = {name: recipe.data[name].format for name in mix}
        if len(set(formats.values())) > 1:  # a batch is either pairs or single replies
            listed = ", ".join(f"{n!r} is {f}" for n, f in formats.items())
            return [f"{where}.mix: a kto stage trains on unpaired replies or on preference pairs, not both ({listed})"]
        return []

    def preview(self, template, example, options):
        if isinstance(example[-1], bool):  # unpaired: (prompt, reply, label)
            prompt, completion, label = example
            return template.pair_segments(prompt, completion) + [(f"  ({'good' if label else 'bad'})", True, False)]
        return super().preview(template, example, options)

    def objective(self, sp, tokenizer, template, seed):
        return Objective(sp)


KIND = Kto()
