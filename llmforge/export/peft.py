"""A stage's LoRA adapter as a PEFT folder: adapter_config.json + adapter_model.safetensors, with
transformers' module names, which `peft.PeftModel.from_pretrained` loads onto the base model (the
stage's starting weights, exported as a transformers folder, or the folder it was imported from).

llmforge's LoRA is PEFT's: the update scale * B A with the same scale (alpha / rank, or alpha /
sqrt(rank) with rslora), so the two compute the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..model.families import FAMILIES, LLAMA_LAYER, family_of
from ..store.final import check_language_model, read_model_config
from .hf import check_out, write_folder


def export_adapter(final: Path, out: Path) -> tuple[str, dict]:
    """Write final/'s adapter into out as a PEFT folder; returns (family, the adapter's record:
    its `base` and `base_kind`, 'stage' (an earlier stage's name) or 'hf' (a transformers folder))."""
    check_out(out)
    check_language_model(final)
    adapter = json.loads((final / "config.json").read_text()).get("adapter")
    if adapter is None:
        raise CheckpointError(f"{final}: stage {final.parent.name} trained no adapter",
                              hint="export without --adapter: the stage's full model")
    cfg = read_model_config(final)
    family = family_of(cfg)
    if fused := FAMILIES[family].fused:
        raise CheckpointError(f"--adapter: {family} fuses {fused} into one layer in transformers, so a LoRA on "
                              "each projection has no PEFT form",
                              hint="export without --adapter: the merged model")
    tensors, full = {}, {}
    for name, t in load_file(str(final / "adapter.safetensors")).items():
        if name in ("tok_emb.weight", "lm_head.weight"):  # train_embeddings: PEFT's modules_to_save
            full[name] = t
            continue
        layer, part = name.rsplit(".", 1)  # blocks.3.attn.q_proj, lora_A
        _, i, ours = layer.split(".", 2)
        tensors[f"base_model.model.model.layers.{i}.{LLAMA_LAYER[ours]}.{part}.weight"] = t.contiguous()
    lora_modules = sorted({k.split(".")[-3] for k in tensors})
    if full:  # both wrapped (a tied head is the embedding: the same trained table twice)
        tensors["base_model.model.model.embed_tokens.weight"] = full["tok_emb.weight"]
        tensors["base_model.model.lm_head.weight"] = full.get("lm_head.weight", full["tok_emb.weight"]).clone()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter["rank"], "lora_alpha": adapter["alpha"],
              "lora_dropout": adapter["dropout"], "use_rslora": adapter["rslora"], "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True,
              "modules_to_save": ["embed_tokens", "lm_head"] if full else None, "target_modules": lora_modules,
              "base_model_name_or_path": adapter["base"] if adapter.get("base_kind") == "hf" else None}
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    write_folder(out, write)
    return family, adapter
