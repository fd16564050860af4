"""A reward model: the transformer with a scalar head, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)) (Ouyang et al. 2022, InstructGPT).

The reward of a reply is read at its last token, where the model has seen all of it. Its final/
scores replies for `llmforge eval` and for a grpo stage (`reward: {stage: NAME}`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model.kept import Kept
from ..model.transformer import Transformer
from ..store.final import load_model
from . import kind


class RewardModel(Transformer):
    """The language model's body with a scalar head. An untied lm_head is kept, frozen, so the
    folder stays a complete model, and DDP sees no trainable weight that gets no gradient."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(cfg.n_embd + 1))  # as TRL's reward head
        if not cfg.tie_embeddings:
            self.lm_head.requires_grad_(False)

    def forward(self, idx, cache=None, docs=None, keep=None):
        """[N] rewards read at keep's positions (one per row: its last token)."""
        x = self.hidden_states(idx, cache, docs)
        return self.score(self.norm(x if keep is None else Kept.of(keep).take(x))).squeeze(-1).float()


def last_token(learned: Kept | torch.Tensor) -> Kept:
    """[n, T] learned targets -> each row's last token (the reply's end; the last input position
    if the row was cut to seq_len+1 tokens)."""
    mask = Kept.of(learned).mask
    T = mask.shape[1]
    last = torch.where(mask, torch.arange(T, device=mask.device), -1).max(dim=1).values  # target j is token j+1
    return Kept.at((last + 1).clamp(max=T - 1), T)


def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rewards, [n] each, in one forward pass."""
    n = len(batch["chosen"])
    tokens = torch.cat([batch["chosen"], batch["rejected"]])[:, :-1]
    both = model(tokens, keep=last_token(Kept.cat(batch["chosen_learned"], batch["rejected_learned"])))
    return both[:n], both[n:]


class RewardScorer:
    """A reward stage's final/ as a scorer: the reward of prompt + reply (+ the end tag when the
    turn ended), read at its last token as in training."""

    def __init__(self, final, device):
        self.model = load_model(final, RewardModel, device).requires_grad_(False)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] right-padded, lengths [B] -> [B] rewards."""
        return self.model(tokens, keep=Kept.at((lengths - 1).clamp(max=tokens.shape[1] - 1), tokens.shape[1]))


class Objective(kind.PairObjective):
    def __init__(self, sp, token_bytes: np.ndarray):
        pass

    def loss(self, model, batch: dict) -> dict:
        chosen, rejected = pair_rewards(model, batch)
        margin = chosen - rejected
        return {"loss": -F.logsigmoid(margin).sum(), "accuracy": (margin > 0).float().sum(),
                "margin": margin.detach().sum(), "reward_chosen": chosen.detach().sum(),
                "reward_rejected": rejected.detach().sum()}


class Reward(kind.PairKind):
    name, generates, fresh = "reward", False, ("score.weight",)

    def logit_share(self, source):
        return 0.0  # one scalar per sequence, no vocab-wide logits

    def build_model(self, cfg):
        return RewardModel(cfg)

    def objective(self, sp, tokenizer, template, seed):
        return Objective(sp, tokenizer.token_bytes)


KIND = Reward()
