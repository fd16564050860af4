"""Optimizers by name, and the learning-rate schedule. A recipe names an optimizer
(`optimizer.name`); its own keys, their defaults and what it supports come from its module here,
and the schema's allowed names and keys from OPTIMIZERS. Adding one is a module and a line below."""

from __future__ import annotations

from . import adamw, muon
from .optimizer import Optimizer
from .schedule import lr_at

OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in (adamw.OPTIMIZER, muon.OPTIMIZER)}


def build_optimizer(model, settings: dict):
    """The stage's optimizer over the model's trainable parameters; settings as the plan records them
    (name, lr, betas, eps, weight_decay and the optimizer's own keys)."""
    return OPTIMIZERS[settings["name"]].build(model, settings)


__all__ = ["OPTIMIZERS", "Optimizer", "build_optimizer", "lr_at"]
