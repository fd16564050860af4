"""What an optimizer declares: its name (a recipe's `optimizer.name`), its own keys beyond the common
ones (lr, betas, eps, weight_decay, grad_clip) with their defaults, whether it trains sharded under
FSDP, and how it builds from the settings a stage's plan records."""

from __future__ import annotations

from ..core.values import Spec


class NoOptions(Spec):
    """An optimizer with only the common keys."""


class Optimizer:
    name: str
    Options: type[Spec] = NoOptions  # its own keys (and defaults): optimizer.<key> in a recipe
    shards: bool = True  # trains under FSDP, whose parameters are shards of the model's
    unsharded: str = ""  # why it cannot, where it cannot (the plan's error)
    skips_on_device: bool = True  # drops a non-finite step without the host reading a flag (run/step.py)

    def build(self, model, settings: dict):
        """A torch optimizer over the model's trainable parameters. settings: name, lr, betas, eps,
        weight_decay and the optimizer's own keys, as the plan records them. Each parameter group
        carries lr_ratio, its peak lr over `lr`, so one schedule drives every group."""
        raise NotImplementedError

    def own(self, settings: dict):
        """Its own keys from the settings, its defaults for those not given (an Options)."""
        return self.Options(**{k: v for k, v in settings.items() if k in self.Options.model_fields})

    def describe(self, settings: dict) -> str:
        """What `plan` shows of its own settings beside the learning rate ('' for nothing)."""
        return ""


def param_groups(model, weight_decay: float, own=lambda name, p: False) -> tuple[list[dict], list]:
    """(AdamW's two groups: weight decay on matrices only (matmul weights, embeddings), none on norms
    and biases, as in GPT-3 / LLaMA training, since decaying a gain toward 0 only hurts; the trainable
    parameters `own(name, p)` claims for the optimizer's own group). Tied tensors appear once."""
    seen, decay, no_decay, claimed = set(), [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (claimed if own(name, p) else decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr_ratio": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_ratio": 1.0}], claimed
