"""LoRA adapters (Hu et al. 2021): a stage trains a low-rank update of chosen linear layers while
the model's own weights stay frozen (no gradients, no optimizer state).

A targeted nn.Linear becomes a LoRALinear in place: it keeps its `weight` and `bias` under the
same names, so the base loads and saves as before, and gains `lora_A` [rank, in] and `lora_B`
[out, rank]. Its output is  x W^T + b + scale * dropout(x) A^T B^T,  scale = alpha / rank
(rslora: alpha / sqrt(rank), Kalajdzievski 2023). B starts at zero, so training starts exactly
at the base model; A as PEFT initializes it (Kaiming-uniform). A checkpoint holds the adapter
alone; the stage's final/ holds the merged model (W + scale * B A) and the adapter beside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Group names for `targets`, as the modules are named in model.py (llama's MLP: w1 gate, w3 up,
# w2 down; gpt2's: c_fc, c_proj). transformers' names are accepted as aliases.
GROUPS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("w1", "w3", "w2", "c_fc", "c_proj")}
GROUPS["all-linear"] = GROUPS["attn"] + GROUPS["mlp"]  # PEFT's: every linear layer but the output head
ALIASES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
PROJECTIONS = tuple(GROUPS["all-linear"]) + tuple(ALIASES)


class LoRALinear(nn.Linear):
    """An nn.Linear with a trainable low-rank update (made by `apply`, never constructed)."""
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    scale: float
    lora_dropout: float

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return out + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        """scale * B A: what merging adds to the weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


def projections(targets: list[str]) -> set[str]:
    """The module names a targets list selects (groups expanded, aliases resolved)."""
    out = set()
    for t in targets:
        out |= set(GROUPS.get(t, (ALIASES.get(t, t),)))
    return out


def targeted(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of each linear layer in the transformer blocks that targets select."""
    wanted = projections(targets)
    return [(name, m) for name, m in model.named_modules()
            if name.startswith("blocks.") and name.rsplit(".", 1)[-1] in wanted and isinstance(m, nn.Linear)]


def apply(model: nn.Module, spec: dict, trainable: tuple[str, ...] = ()) -> list[str]:
    """Freeze the model and add LoRA to the targeted layers (under the caller's RNG: the same seed
    gives the same A). Weights named in `trainable` stay trainable (a reward model's new head).
    Returns the names of the adapter's parameters, which is what a checkpoint saves."""
    rank, alpha = spec["rank"], spec["alpha"]
    scale = alpha / math.sqrt(rank) if spec.get("rslora") else alpha / rank
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    names = []
    for name, m in targeted(model, spec["targets"]):
        m.__class__ = LoRALinear
        w = m.weight
        m.lora_A = nn.Parameter(torch.empty(rank, m.in_features, device=w.device, dtype=w.dtype))
        m.lora_B = nn.Parameter(torch.zeros(m.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))
        m.scale, m.lora_dropout = scale, spec.get("dropout", 0.0)
        names += [f"{name}.lora_A", f"{name}.lora_B"]
    return names + [n for n in trainable if n in dict(model.named_parameters())]


def merge(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight (W + scale * B A) and make the layers plain
    nn.Linear again, so the model saves as a model without adapters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.weight.add_(m.delta().to(m.weight.dtype))
                del m.lora_A, m.lora_B
                m.__class__ = nn.Linear


def saved_names(model: nn.Module, adapter: dict | None) -> list[str]:
    """What a checkpoint holds: every weight, or with an adapter only what trains (the frozen base
    is the stage's starting weights, rebuilt on resume). Each shared tensor once."""
    from .checkpoint import weight_names

    names = weight_names(model)
    if not adapter:
        return names
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    return [n for n in names if n in trains]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors by parameter name (blocks.0.attn.q_proj.lora_A, ...)."""
    return {f"{name}.{part}": getattr(m, part).detach().cpu().contiguous()
            for name, m in model.named_modules() if isinstance(m, LoRALinear) for part in ("lora_A", "lora_B")}


def count(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameters, each shared tensor once."""
    seen, trainable, frozen = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def adapter_params(cfg, spec: dict) -> int:
    """The adapter's parameter count for a model config, without building the model: rank x
    (in + out) per targeted layer."""
    wanted, d, q, kv, h = projections(spec["targets"]), cfg.n_embd, cfg.q_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
    shapes |= {"w1": (d, h), "w3": (d, h), "w2": (h, d)} if cfg.mlp == "swiglu" else {"c_fc": (d, h), "c_proj": (h, d)}
    return cfg.n_layer * spec["rank"] * sum(i + o for name, (i, o) in shapes.items() if name in wanted)
