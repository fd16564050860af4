"""A trained stage -> a Hugging Face `transformers` folder, and a transformers folder -> the
model a run starts from; without importing transformers.

Which families and how their configs and tensors map: model/families/. Export writes the family
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
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..model.families import family_of, to_hf
from ..model.families import hf_config as family_config
from ..store.final import check_language_model, final_template, read_model_config
from ..text.hf_tokenizer import tokenizer_config, tokenizer_json
from ..text.tokenizer_json import JsonTokenizer, load_tokenizer

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
    tokenizer, template = load_tokenizer(final), final_template(final)
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



