"""AdamW (Loshchilov & Hutter 2019): decoupled weight decay, on matrices only."""

from __future__ import annotations

import torch

from .optimizer import Optimizer, param_groups


class AdamW(Optimizer):
    name = "adamw"

    def build(self, model, settings: dict):
        groups, _ = param_groups(model, settings["weight_decay"])
        # One fused kernel, on a GPU or CPU and for FSDP's DTensors: on 2 CPU cores it steps 135M
        # parameters in ~0.15 s against foreach's ~0.7 s, and it skips a non-finite step on the device
        # (found_inf), so the training step never waits for the device to learn whether to (run/step.py).
        return torch.optim.AdamW(groups, lr=settings["lr"], betas=tuple(settings["betas"]), eps=settings["eps"],
                                 fused=True)


OPTIMIZER = AdamW()
