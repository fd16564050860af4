"""AdamW (Loshchilov & Hutter 2019): decoupled weight decay, on matrices only."""

from __future__ import annotations

import torch

from .optimizer import Optimizer, param_groups


class AdamW(Optimizer):
    name = "adamw"

    def build(self, model, settings: dict):
        groups, _ = param_groups(model, settings["weight_decay"])
        params = [p for g in groups for p in g["params"]]
        # One fused kernel for plain tensors (DDP or one device) on a GPU or CPU: on 2 CPU cores it
        # steps 135M parameters in ~0.15 s against foreach's ~0.7 s. foreach for FSDP's DTensors.
        fused = all(p.device.type in ("cuda", "cpu") and type(p.data) is torch.Tensor for p in params)
        return torch.optim.AdamW(groups, lr=settings["lr"], betas=tuple(settings["betas"]), eps=settings["eps"],
                                 **({"fused": True} if fused else {"foreach": True}))


OPTIMIZER = AdamW()
