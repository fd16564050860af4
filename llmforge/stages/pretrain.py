"""Pretraining: next-token cross-entropy on packed windows of text."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_losses(model, batch: torch.Tensor) -> torch.Tensor:
    """[B, T+1] token windows -> [B, T] loss in nats for predicting each next token."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    # fp32 log-softmax even under autocast: bf16 loses ~2 digits on a 50k-way softmax.
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return loss.view_as(targets)


def loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean loss in nats per token: what the optimizer minimizes."""
    return token_losses(model, batch).mean()
