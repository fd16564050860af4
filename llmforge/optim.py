"""Optimizers and learning-rate schedules. A schedule is a pure function of the step."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, name: str, lr: float, betas, eps: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (matmul weights, embeddings); norms and biases
    are left alone, as in GPT-3 / LLaMA training — decaying a gain toward 0 only hurts."""
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    seen, decay, no_decay = set(), [], []
    for p in params:
        if id(p) in seen:  # tied embeddings appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)


def lr_at(step: int, *, peak: float, warmup: int, total: int, decay: str, min_lr: float) -> float:
    """Linear warmup over `warmup` steps, then decay to `min_lr` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay == "constant" or total <= warmup + 1:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup - 1))
    if decay == "linear":
        return peak - (peak - min_lr) * progress
    if decay == "cosine":
        return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay {decay!r}")
