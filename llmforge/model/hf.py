"""A local Hugging Face `transformers` folder -> (ModelConfig, tensors named as ours), without
importing transformers. Which families and how they map: families/. Never pickle."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError
from .families import config_from_hf, from_hf
from .transformer import ModelConfig


def read_hf(folder: Path) -> tuple[ModelConfig, dict]:
    """The model of a local transformers folder, as a ModelConfig and tensors named as ours.
    Anything our model would compute differently is refused by name."""
    cfg = hf_config(folder)
    return cfg, from_hf(cfg, _read_tensors(folder))


def hf_config(folder: Path) -> ModelConfig:
    """The architecture in a transformers folder's config.json, as llmforge's ModelConfig."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot read config.json ({e})", hint="point at a transformers model folder")
    return config_from_hf(config, folder / "config.json")


def recipe_model(folder: Path) -> dict:
    """The recipe's model keys that describe a transformers folder's model (model.init.hf)."""
    cfg = hf_config(folder)  # the weights may come later: `plan` sizes a run from config.json alone
    out = {"preset": cfg.family, "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
           "n_embd": cfg.n_embd, "seq_len": cfg.seq_len, "n_kv_head": cfg.kv_heads, "mlp_hidden": cfg.hidden,
           "tie_embeddings": cfg.tie_embeddings, "bias": cfg.bias, "norm_eps": cfg.norm_eps}
    if cfg.positions == "rope":
        out |= {"rope_theta": cfg.rope_theta, "head_dim": cfg.head_dim, "qkv_bias": cfg.qkv_bias,
                "qk_norm": cfg.qk_norm}
        out |= {k: getattr(cfg, k) for k in ("rope_scaling", "sliding_window") if getattr(cfg, k) is not None}
    return out


def check_weights(folder: Path) -> None:
    """Refuse a folder without readable safetensors weights (`run` asks before anything trains)."""
    _weight_files(folder)


def _read_tensors(folder: Path) -> dict:
    out = {}
    for f in _weight_files(folder):
        try:
            out |= load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read the weights ({e})",
                                  hint="the file is damaged or incomplete: copy or download it again") from None
    return out


def _weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json lists. Never pickle."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        # A shard is a file beside the index, never a path elsewhere.
        if missing := [s for s in shards if not isinstance(s, str) or Path(s).name != s or not (folder / s).is_file()]:
            raise CheckpointError(f"{index}: lists {missing[0]!r}, which is not a file in the folder",
                                  hint="copy every shard of the model")
        return [folder / shard for shard in shards]
    if any(folder.glob("pytorch_model*.bin")):
        raise CheckpointError(f"{folder}: only pickle weights (pytorch_model.bin), which can run code when loaded",
                              hint="convert them to safetensors (transformers: save_pretrained(safe_serialization=True))")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
