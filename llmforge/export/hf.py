"""A trained stage -> a Hugging Face `transformers` folder, and a transformers folder -> the
model a run starts from; without importing transformers.

Which families and how their configs and tensors map: families.py. Export writes the family
the model came as (or its preset's): config.json, generation_config.json, model.safetensors and
the tokenizer with the chat template. A configuration the family cannot express is refused
naming the option: never a silently different model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..generate import check_language_model, load_template, read_model_config
from ..model import ModelConfig
from ..tokenizer_json import JsonTokenizer, load_tokenizer
from .families import config_from_hf, family_of, from_hf, hf_config as family_config, to_hf
from .hf_tokenizer import tokenizer_config, tokenizer_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def export_weights(final: Path, out: Path, dtype: str = "fp32", stop_ids: list[int] | None = None) -> str:
    """Write config.json, generation_config.json and model.safetensors for final/ into out;
    returns the family. Generation ends at `stop_ids` (as llmforge's does), the first of
    them the one to pad with."""
    cfg = read_model_config(final)
    config = family_config(cfg) | {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
                                   "torch_dtype": _HF_DTYPE[dtype], "bos_token_id": None, "eos_token_id": stop_ids}
    tensors = to_hf(cfg, load_file(str(final / "model.safetensors")))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"do_sample": False, "eos_token_id": stop_ids, "pad_token_id": stop_ids[-1] if stop_ids else None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return cfg.family


def export_stage(final: Path, out: Path, dtype: str = "fp32") -> tuple[str, list[str]]:
    """The whole export of a stage's final/ folder into out (written aside, then renamed into
    place, so out is complete or absent); returns the family and warnings for the user."""
    check_out(out)
    check_language_model(final)  # refuse what transformers cannot express before anything else
    family_of(read_model_config(final))
    tokenizer, template = load_tokenizer(final), load_template(final)
    # A chat model's turn ends at the template's end tag (as `llmforge chat` stops); text at end-of-text.
    stops = list(template.stop_ids(tokenizer)) if template else [tokenizer.eot_id]

    def write(tmp: Path):
        arch = export_weights(final, tmp, dtype, stops)
        os.chmod(tmp / "model.safetensors", 0o644)  # safetensors writes 0600; models are shared
        return arch, _write_tokenizer(tmp, tokenizer, template, read_model_config(final).seq_len)
    return write_folder(out, write)


def check_out(out: Path) -> None:
    """An export's --out must not exist, or be empty: nothing of the user's is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out: {out} exists and is not empty", hint="choose another folder or delete it")


def write_folder(out: Path, write):
    """write(folder) into a temporary folder beside out, then renamed into place, so out is
    complete or absent; returns what write returned."""
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        result = write(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _write_tokenizer(out: Path, tokenizer, template, seq_len: int) -> list[str]:
    """tokenizer.json + tokenizer_config.json (with the chat template, so apply_chat_template
    renders conversations as llmforge does); a sentencepiece model also as tokenizer.model."""
    jinja = template.jinja() if template else None
    if isinstance(tokenizer, JsonTokenizer):  # its own files, as the model came
        tokenizer.save(out)
        config = dict(tokenizer.config) or {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len,
                                            "eos_token": tokenizer.decode([tokenizer.eot_id]), "bos_token": None,
                                            "add_bos_token": False, "add_eos_token": False,
                                            "clean_up_tokenization_spaces": False}
        config.pop("chat_template", None)
        (out / "chat_template.jinja").unlink(missing_ok=True)
        if jinja:
            config["chat_template"] = jinja
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return []
    (out / "tokenizer.model").write_bytes(tokenizer.model_bytes)
    fast, warnings = tokenizer_json(tokenizer.model_bytes)
    (out / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False))
    config = tokenizer_config(tokenizer.model_bytes, seq_len, jinja)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return warnings


# -- import: a local Hugging Face folder -> (ModelConfig, our tensors) -------------------------

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
    cfg = hf_config(folder)
    _weight_files(folder)  # refuse a folder without safetensors weights now, not when the stage starts
    out = {"preset": cfg.family, "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
           "n_embd": cfg.n_embd, "seq_len": cfg.seq_len, "n_kv_head": cfg.kv_heads, "mlp_hidden": cfg.hidden,
           "tie_embeddings": cfg.tie_embeddings, "bias": cfg.bias, "norm_eps": cfg.norm_eps}
    if cfg.positions == "rope":
        out |= {"rope_theta": cfg.rope_theta, "head_dim": cfg.head_dim, "qkv_bias": cfg.qkv_bias,
                "qk_norm": cfg.qk_norm}
        out |= {k: getattr(cfg, k) for k in ("rope_scaling", "sliding_window") if getattr(cfg, k) is not None}
    return out


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
