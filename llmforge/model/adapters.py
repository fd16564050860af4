"""LoRA adapters (Hu et al. 2021): a stage trains a low-rank update of chosen linear layers while
the model's own weights stay frozen (no gradients, no optimizer state).

A targeted nn.Linear becomes a LoRALinear in place: it keeps its `weight` and `bias` under the
same names, so the base loads and saves as before, and gains `lora_A` [rank, in] and `lora_B`
[out, rank]. Its output is  x W^T + b + scale * dropout(x) A^T B^T,  scale = alpha / rank
(rslora: alpha / sqrt(rank), Kalajdzievski 2023). B starts at zero, so training starts exactly
at the base model; A as PEFT initializes it (Kaiming-uniform). A checkpoint holds the adapter
alone; the stage's final/ holds the merged model (W + scale * B A) and the adapter beside it.

QLoRA (Dettmers et al. 2023; CUDA only, through bitsandbytes): each targeted layer's frozen
weight is kept in 4-bit NF4 (double-quantized scales) and dequantized blockwise inside the
matmul, in bf16. Merging dequantizes it: final/ holds W_nf4 + scale * B A, as PEFT's merge does.
Written for a CUDA machine and tested only there (`pytest -m cuda`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.durable import stamp
from .weights import weight_names

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
        if hasattr(self, "quant_state"):  # qlora: the frozen weight in NF4
            import bitsandbytes as bnb

            # bitsandbytes' 4-bit matmul is not autocast-aware: an fp32 input (a norm's output, the
            # fp32 residual stream) would run the dequantized GEMM in fp32, and its fused kernel
            # refuses a bias of another dtype than the input. Compute in the weight's dtype, as
            # bnb's own Linear4bit does.
            dtype = self.quant_state.dtype
            bias = None if self.bias is None else self.bias.to(dtype)
            out = bnb.matmul_4bit(x.to(dtype), self.weight_4bit.t(), bias=bias, quant_state=self.quant_state)
        else:
            out = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        delta = F.linear(F.linear(h, self.lora_A) * self.scale, self.lora_B)  # scaled while rank-wide
        # In place: one output-sized tensor per layer, not three (F.linear keeps no output for its
        # backward). bitsandbytes' autograd Function may return a view, which must not be modified.
        return out + delta if hasattr(self, "quant_state") else out.add_(delta)

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


def apply(model: nn.Module, spec: dict, trainable: tuple[str, ...] = (), lm_head: bool = True,
          device: torch.device | None = None) -> list[str]:
    """Freeze the model and add LoRA to the targeted layers (under the caller's RNG: the same seed
    gives the same A). Weights named in `trainable` stay trainable (a reward model's new head);
    with train_embeddings the token embeddings too, and the output head unless `lm_head` is
    False (a reward model never uses it: a weight without gradients would stall DDP). Returns
    the names of the parameters that train, which is what a checkpoint saves."""
    rank, alpha = spec["rank"], spec["alpha"]
    scale = alpha / math.sqrt(rank) if spec.get("rslora") else alpha / rank
    if spec.get("train_embeddings"):
        trainable = (*trainable, "tok_emb.weight", *(("lm_head.weight",) if lm_head else ()))
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
        if spec["kind"] == "qlora":
            _quantize(m, device or w.device)
        names += [f"{name}.lora_A", f"{name}.lora_B"]
    return names + [n for n in trainable if n in dict(model.named_parameters())]


def _quantize(m: LoRALinear, device) -> None:
    """The layer's frozen weight as NF4 on the device (a buffer, so checkpoints never hold it).
    Called on a model still on the CPU, one layer at a time: the device never holds the base in
    fp32 (32 GB for 8B parameters), only each weight's bf16 copy while it is quantized."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(m.weight.data.to(device, torch.bfloat16), quant_type="nf4",
                                       compress_statistics=True)
    del m.weight
    m.register_buffer("weight_4bit", packed, persistent=False)
    m.quant_state = state


def merge(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight (W + scale * B A) and make the layers plain
    nn.Linear again, so the model saves as a model without adapters (qlora: W dequantized)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                if hasattr(m, "quant_state"):
                    import bitsandbytes.functional as bnbf

                    w = bnbf.dequantize_4bit(m.weight_4bit, m.quant_state).float()
                    del m.weight_4bit, m.quant_state
                    m.weight = nn.Parameter(w, requires_grad=False)
                m.weight.add_(m.delta().to(m.weight.dtype))
                del m.lora_A, m.lora_B
                m.__class__ = nn.Linear


def base_stamp(start: Path | None, adapter: dict | None) -> dict:
    """What an adapter's checkpoint must be resumed on: the stage's starting weights (it holds only
    the update to them), by their checksums when sealed (an earlier stage's final/: the same if
    rebuilt), else the size and time of each weight file. {} without an adapter."""
    if not adapter or start is None:
        return {}
    if sealed := stamp(start):  # lists, as the checkpoint's JSON reads them back
        return {"base": [[name, sums] for name, sums in sealed
                         if name.endswith(".safetensors") and name != "adapter.safetensors"]}
    files = sorted(start.glob("*.safetensors")) if start.is_dir() else []
    return {"base": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.name != "adapter.safetensors"]}


def record(adapter: dict, init: str | None, model_init: str | None) -> dict:
    """The adapter as final/config.json records it, with the base it is an update to: an earlier
    stage (`base_kind` stage), the transformers folder the run imported (hf), or random weights."""
    base, kind = (init, "stage") if init else (model_init, "hf") if model_init else ("", "random")
    return adapter | {"base": base, "base_kind": kind}


def saved_names(model: nn.Module, adapter: dict | None) -> list[str]:
    """What a checkpoint holds: every weight, or with an adapter only what trains (the frozen base
    is the stage's starting weights, rebuilt on resume). Each shared tensor once."""
    names = weight_names(model)
    if not adapter:
        return names
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    return [n for n in names if n in trains]


def finish(model: nn.Module) -> tuple[dict, dict]:
    """(what trained, the merged model's weights), merging the model in place."""
    trained = adapter_state(model)
    merge(model)
    names = set(weight_names(model))
    return trained, {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the stage trained, by parameter name: the adapter's factors (blocks.0.attn.q_proj.lora_A,
    ...) and any weight that trained in full beside them (embeddings, a reward model's head)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


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


def target_shapes(cfg, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(in, out) of each targeted linear layer of one block, by name, from the model config alone."""
    wanted, d, q, kv, h = projections(targets), cfg.n_embd, cfg.q_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
    shapes |= {"w1": (d, h), "w3": (d, h), "w2": (h, d)} if cfg.mlp == "swiglu" else {"c_fc": (d, h), "c_proj": (h, d)}
    return {name: shape for name, shape in shapes.items() if name in wanted}


def adapter_params(cfg, spec: dict) -> int:
    """The adapter's parameter count: rank x (in + out) per targeted layer."""
    return cfg.n_layer * spec["rank"] * sum(i + o for i, o in target_shapes(cfg, spec["targets"]).values())


def targeted_weights(cfg, spec: dict) -> int:
    """The weights the adapter's layers hold (what qlora keeps in 4 bits)."""
    return cfg.n_layer * sum(i * o for i, o in target_shapes(cfg, spec["targets"]).values())


# --- planning: what the plan says of a stage's adapter, before any compute -------------------------

