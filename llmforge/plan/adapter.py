"""A stage's adapter in the plan: its spec resolved from the recipe, what trains and what the
frozen base weighs, checked against the stage kind and the device."""

from __future__ import annotations

from ..errors import PlanError
from ..model.adapters import adapter_params, target_shapes, targeted_weights
from ..stages import KINDS


def plan_adapter(where: str, recipe, spec, cfg, device, shards: int, init: str | None):
    """(the stage's adapter as the engine applies it, the parameters its optimizer steps, the
    frozen weights' bytes for the memory estimate, or None for 4 bytes a weight); refuses what cannot
    train, naming the key."""
    a = recipe.stage_adapter(spec)
    if a is None:
        return None, cfg.num_params(), None
    at = f"{where}.adapter" if spec.adapter is not None else "adapter"
    if init == "none" or (init is None and not recipe.model.init):
        raise PlanError(f"{at}: stage {spec.name} starts from random weights, and an adapter trains only a "
                        "low-rank update of them", hint=f"train {spec.name} in full ({where}.adapter: none), or "
                                                        "start it from an earlier stage (init)")
    if a.kind == "qlora" and device.type != "cuda":
        raise PlanError(f"{at}.kind: qlora keeps the frozen base in 4-bit NF4, which needs a CUDA GPU "
                        f"(this run is on {device.type})", hint="use kind: lora here")
    if a.kind == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise PlanError(f"{at}.kind: qlora needs bitsandbytes, which is not installed",
                            hint="pip install 'llmforge[qlora]'") from None
    if shards > 1:
        raise PlanError(f"{at}: adapters train under ddp, not fsdp (a sharded frozen base is not built yet)",
                        hint="set runtime.parallel: ddp (the frozen base needs no optimizer state, so it "
                             "fits where full training would not)")
    if not target_shapes(cfg, a.targets):
        present = ", ".join(sorted(target_shapes(cfg, ["all-linear"])))
        raise PlanError(f"{at}.targets: {a.targets} select no layer of this model (its linear layers: {present})",
                        hint="use attn, mlp or all-linear")
    options = a.model_dump()
    fresh = cfg.n_embd * len(KINDS[spec.kind].fresh)  # new weights train too: a reward model's head
    if a.train_embeddings:
        heads = 2 if not cfg.tie_embeddings and KINDS[spec.kind].generates else 1
        fresh += cfg.vocab_size * cfg.n_embd * heads
    frozen = None
    if a.kind == "qlora":  # the targeted layers in 4 bits, + ~1/32 for their double-quantized scales
        quantized = targeted_weights(cfg, options)
        frozen = (cfg.num_params() - quantized) * 4 + quantized * (0.5 + 1 / 32)
    return options, adapter_params(cfg, options) + fresh, frozen
