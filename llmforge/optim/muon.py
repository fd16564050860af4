"""Muon for the blocks' weight matrices, AdamW for embeddings, head, norms and biases."""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.values import Float, Spec
from .optimizer import Optimizer, param_groups


class Options(Spec):
    muon_lr: Float = Field(default=0.02, gt=0)  # the matrices' peak lr (`lr` is the AdamW part's)


class MuonOptimizer(Optimizer):
    name, Options = "muon", Options
    shards, unsharded = False, "muon orthogonalizes whole matrices, which fsdp shards"
    skips_on_device = False

    def build(self, model, settings: dict):
        """The blocks' matrices take Muon steps at muon_lr, the rest AdamW at lr."""
        # An adapter's low-rank factors take AdamW: orthogonalizing a rank-r factor is not Muon's case.
        groups, hidden = param_groups(model, settings["weight_decay"], own=lambda name, p: p.dim() == 2 and
                                      name.startswith("blocks.") and ".lora_" not in name)
        groups.append({"params": hidden, "weight_decay": settings["weight_decay"],
                       "lr_ratio": self.own(settings).muon_lr / settings["lr"], "muon": True})
        return Muon(groups, lr=settings["lr"], betas=tuple(settings["betas"]), eps=settings["eps"])

    def describe(self, settings: dict) -> str:
        return f" (block matrices: muon lr {self.own(settings).muon_lr:.3g})"


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): for a weight matrix,
    Nesterov momentum, then the update replaced by the nearest semi-orthogonal matrix (five
    Newton-Schulz steps), so every direction moves at the same rate; scaled by
    sqrt(max(1, rows/cols)). Groups without "muon" take plain AdamW steps. Decoupled weight decay
    for both. Speed-run records on GPT-2 use it; it needs whole matrices (not FSDP shards)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params, [p.grad for p in params])

    def _muon(self, group: dict, params: list, grads: list) -> None:
        lr, momentum = group["lr"], group["momentum"]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum)  # Nesterov: the gradient, then the momentum
        # Matrices of one shape (wide, tall ones transposed) are orthogonalized in one batched call.
        by_shape: dict = {}
        for p, u in zip(params, updates):
            by_shape.setdefault(tuple(sorted(p.shape)), []).append((p, u))
        for pairs in by_shape.values():
            wide = torch.stack([u.mT if u.shape[0] > u.shape[1] else u for _, u in pairs])
            for (p, u), o in zip(pairs, orthogonalize(wide)):
                p.add_(o.mT if u.shape[0] > u.shape[1] else o, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)

    def _adamw(self, group: dict, params: list, grads: list) -> None:
        (b1, b2), lr = group["betas"], group["lr"]
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        step = states[0]["step"].item() + 1  # the groups' params step together
        for st in states:
            st["step"].fill_(step)
        avg, sq = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_lerp_(avg, grads, 1 - b1)
        torch._foreach_mul_(sq, b2)
        torch._foreach_addcmul_(sq, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(torch._foreach_div(sq, 1 - b2 ** step))
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, avg, denom, value=-lr / (1 - b1 ** step))


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of Muon's reference implementation: pushes the
    singular values of each matrix in g [n, rows, cols] (normalized, rows <= cols) toward 1
    without an SVD."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # [n, rows, cols], rows <= cols
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x


OPTIMIZER = MuonOptimizer()
