"""Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference: the stage's
starting weights, whose log-probabilities of every pair are computed once before training.

With h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)):
  sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label_smoothing,
           for labels flipped with probability eps; cDPO)
  ipo:     (h - 1 / (2 beta))^2                                        (Azar et al. 2023)
rpo_alpha > 0 adds alpha x the chosen response's NLL per token (RPO, Pang et al. 2024).
The implicit reward of a response is beta (log pi - log ref); reward accuracy is how often the
chosen one's is higher.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..core import faults
from ..core.values import Float
from ..errors import CheckpointError
from ..model.kept import Kept
from . import kind
from .pretrain import token_losses


class Options(kind.ExampleOptions):
    # Strength of the pull toward the reference, smoothing for noisy labels, and the loss
    # (sigmoid: Rafailov et al. 2023; ipo: Azar et al. 2023).
    beta: Float = Field(default=0.1, gt=0)
    label_smoothing: Float = Field(default=0.0, ge=0, lt=0.5)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    # Weight of an added NLL loss on the chosen response (per token; RPO, Pang et al. 2024),
    # which keeps the chosen answers likely while the margin grows (small models drift without it).
    rpo_alpha: Float = Field(default=0.0, ge=0)


def sequence_logps(model, tokens: torch.Tensor, learned: Kept | torch.Tensor) -> torch.Tensor:
    """[n, T+1] rows, [n, T] learned targets -> [n] summed log-probability of the learned tokens."""
    return -token_losses(model, tokens, keep=learned).sum(dim=1)


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected in one forward pass."""
    n = len(batch["chosen"])
    both = sequence_logps(model, torch.cat([batch["chosen"], batch["rejected"]]),
                          Kept.cat(batch["chosen_learned"], batch["rejected_learned"]))
    return both[:n], both[n:]


def lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Learned tokens of each chosen and each rejected reply, [n] each."""
    return Kept.of(batch["chosen_learned"]).counts(), Kept.of(batch["rejected_learned"]).counts()


def dpo_terms(chosen, rejected, ref_chosen, ref_rejected, *, beta: float, label_smoothing: float = 0.0,
              loss: str = "sigmoid") -> dict:
    """Per-pair loss and implicit rewards (tensors of shape [n])."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return {"loss": losses, "reward_chosen": beta * (chosen - ref_chosen).detach(),
            "reward_rejected": beta * (rejected - ref_rejected).detach()}


class Objective(kind.PairObjective):
    def __init__(self, sp, token_bytes: np.ndarray):
        self.sp, o = sp, sp.options
        self.options = {"beta": o.beta, "label_smoothing": o.label_smoothing, "loss": o.loss}
        self.rpo_alpha = o.rpo_alpha

    def loss(self, model, batch: dict) -> dict:
        chosen, rejected = pair_logps(model, batch)
        ref = batch["reference"].float()
        t = dpo_terms(chosen, rejected, ref[:, 0], ref[:, 1], **self.options)
        margin = t["reward_chosen"] - t["reward_rejected"]
        loss = t["loss"].sum()
        if self.rpo_alpha:  # + alpha x the chosen response's mean NLL per token
            loss = loss - self.rpo_alpha * (chosen / Kept.of(batch["chosen_learned"]).counts().clamp(min=1)).sum()
        return {"loss": loss, "reward_acc": (margin > 0).float().sum(), "reward_margin": margin.sum(),
                "logp_chosen": chosen.detach().sum(), "logp_rejected": rejected.detach().sum()}

    @torch.no_grad()
    def reference(self, model, batch: dict) -> np.ndarray:
        """[n, 2] log-probs of chosen and rejected under the frozen reference."""
        chosen, rejected = pair_logps(model, batch)
        return torch.stack([chosen, rejected], dim=1).cpu().numpy()

    def prepare(self, folder, inputs, train, evals, model=None, device=None, amp=None):
        sp = self.sp  # what the log-probs depend on besides the starting weights and the data's tokens
        identity = inputs | {"init": sp.init, "seq_len": sp.seq_len, "options": sp.options.model_dump(),
                             "adapter": sp.adapter}  # qlora's reference is the 4-bit base
        reference = None if model is None else (lambda batch: self.reference(model, kind.to_device(batch, device)))
        attach_reference(folder / "reference.npz", identity, train, evals, reference, sp.micro_batch, model,
                         amp or contextlib.nullcontext())


def attach_reference(path: Path, identity: dict, train: dict, evals: dict, reference, micro_batch: int,
                     model=None, amp=contextlib.nullcontext()) -> None:
    """The frozen reference's log-probs of every pair (or unpaired reply), computed once by `reference(batch)` from
    the stage's starting weights (before any training step) and kept in the stage folder with
    what they were computed from, so a resume reuses them and anything else recomputes them.
    With model None (llmforge eval: the weights at hand are not the reference) a missing or
    stale file is an error."""
    sets = {f"train/{n}": r for n, r in train.items()} | {f"val/{n}": r for n, (r, _) in evals.items()}
    stamp = json.dumps(identity, sort_keys=True)
    try:
        with np.load(path) as saved:
            stored = {k: saved[k] for k in sets}
            fresh = str(saved["identity"]) == stamp and all(len(stored[k]) == r.n_rows for k, r in sets.items())
    except Exception:  # missing, half-written by a crash, or from another version: compute again
        fresh = False
    if not fresh and model is None:
        raise CheckpointError(f"{path}: the dpo reference's log-probs are missing or do not match this data",
                              hint="run the recipe again (with --restart if the data changed)")
    if not fresh:
        model.eval()
        stored = {}
        for key, rows in sets.items():
            # Written into an array made up front: small results kept alive between the batches'
            # large temporaries fragment glibc's heap, and whole quickstart runs grew their
            # resident memory here by ~13 MB a batch (700-830 MB) in about 1 of 4 runs.
            stored[key] = np.zeros((rows.n_rows, len(rows.sides)), dtype=np.float32)
            for i, idx in enumerate(kind.split_rows(rows.n_rows, micro_batch)):
                with amp:
                    stored[key][idx] = reference(rows.rows(idx, with_reference=False))
                faults.reached("reference", path.parent.name, key, i)
        model.train()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        with open(tmp, "wb") as f:
            np.savez(f, identity=np.array(stamp), **stored)
        os.replace(tmp, path)
    for key, rows in sets.items():
        # Indexed by example: rows() looks them up through the layout.
        ref = np.zeros((len(rows.ex), len(rows.sides)), dtype=np.float32)
        ref[rows.layout.keep] = stored[key]
        rows.reference = ref


class Dpo(kind.PairKind):
    name, Options = "dpo", Options

    def objective(self, sp, tokenizer, template, seed):
        return Objective(sp, tokenizer.token_bytes)


KIND = Dpo()
