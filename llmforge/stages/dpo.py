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
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from .pretrain import token_losses


def sequence_logps(model, tokens: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """[n, T+1] rows, [n, T] learned targets -> [n] summed log-probability of the learned tokens."""
    return -token_losses(model, tokens, keep=learned).sum(dim=1)


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected in one forward pass."""
    n = len(batch["chosen"])
    both = sequence_logps(model, torch.cat([batch["chosen"], batch["rejected"]]),
                          torch.cat([batch["chosen_learned"], batch["rejected_learned"]]))
    return both[:n], both[n:]


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


class Objective:
    def __init__(self, sp, token_bytes: np.ndarray):
        self.options = {k: sp.options[k] for k in ("beta", "label_smoothing", "loss")}
        self.rpo_alpha = sp.options.get("rpo_alpha", 0.0)

    def units(self, batch: dict) -> int:
        return len(batch["chosen"])

    def loss(self, model, batch: dict) -> dict:
        chosen, rejected = pair_logps(model, batch)
        ref = batch["reference"].float()
        t = dpo_terms(chosen, rejected, ref[:, 0], ref[:, 1], **self.options)
        margin = t["reward_chosen"] - t["reward_rejected"]
        loss = t["loss"].sum()
        if self.rpo_alpha:  # + alpha x the chosen response's mean NLL per token
            loss = loss - self.rpo_alpha * (chosen / batch["chosen_learned"].sum(dim=1).clamp(min=1)).sum()
        return {"loss": loss, "reward_acc": (margin > 0).float().sum(), "reward_margin": margin.sum(),
                "logp_chosen": chosen.detach().sum(), "logp_rejected": rejected.detach().sum()}

    def eval_sums(self, model, batch: dict) -> dict:
        return {k: v.item() for k, v in self.loss(model, batch).items()} | {"pairs": len(batch["chosen"])}

    @staticmethod
    def summarize(sums: dict) -> dict:
        n = sums.get("pairs")
        return {k: v / n for k, v in sums.items() if k != "pairs"} if n else {}

    @torch.no_grad()
    def reference(self, model, batch: dict) -> np.ndarray:
        """[n, 2] log-probs of chosen and rejected under the frozen reference."""
        chosen, rejected = pair_logps(model, batch)
        return torch.stack([chosen, rejected], dim=1).cpu().numpy()


def attach_reference(path: Path, identity: dict, train: dict, evals: dict, reference, micro_batch: int,
                     model=None, amp=contextlib.nullcontext()) -> None:
    """The frozen reference's log-probs of every pair, computed once by `reference(batch)` from
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
            stored[key] = np.zeros((rows.n_rows, 2), dtype=np.float32)
            for idx in np.array_split(np.arange(rows.n_rows), max(1, math.ceil(rows.n_rows / micro_batch))):
                with amp:
                    stored[key][idx] = reference(rows.rows(idx, with_reference=False))
        model.train()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        with open(tmp, "wb") as f:
            np.savez(f, identity=np.array(stamp), **stored)
        os.replace(tmp, path)
    for key, rows in sets.items():
        # Indexed by example: rows() looks them up through the layout.
        ref = np.zeros((len(rows.ex), 2), dtype=np.float32)
        ref[rows.layout.keep] = stored[key]
        rows.reference = ref


def reference_identity(tokenizer, sources: dict, sp) -> dict:
    """What a dpo reference's log-probs depend on, besides the starting weights (a finished init
    stage never changes without --restart): tokens, and which pairs are cut or left out."""
    return {"tokenizer": tokenizer.fingerprint, "data": {s.name: sources[s.name].path.name for s in sp.mix},
            "init": sp.init, "seq_len": sp.seq_len, "options": sp.options}
