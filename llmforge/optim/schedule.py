"""The learning-rate schedule: a pure function of the step."""

from __future__ import annotations

import math


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
