"""The Hugging Face families llmforge's model computes exactly, by name: a recipe's model.preset,
the model_type of a transformers config.json. Each family (one object, in llama.py or gpt2.py)
maps a config.json <-> ModelConfig and their tensor names <-> ours, and says what it cannot express.
Anything else is refused by name: never a silently different model. The schema's presets come
from FAMILIES; adding one is an object there and a line below.
"""

from __future__ import annotations

from ...errors import CheckpointError
from ..transformer import ModelConfig
from .family import Family
from .gpt2 import GPT2_FAMILY
from .llama import LLAMA, LLAMA_LAYER, MISTRAL, PHI3, QWEN2, QWEN3

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, GPT2_FAMILY, QWEN2, QWEN3, MISTRAL, PHI3)}
PRESETS: dict[str, dict] = {name: f.preset for name, f in FAMILIES.items()}  # model.preset -> ModelConfig switches
CLASSES: dict[str, str] = {name: f.hf_class for name, f in FAMILIES.items()}
# Families transformers has that llmforge's model would compute differently (refused by name).
_NOT_YET = {"gemma": "Gemma", "gemma2": "Gemma 2", "gemma3": "Gemma 3", "gemma3_text": "Gemma 3"}

__all__ = ["CLASSES", "FAMILIES", "LLAMA_LAYER", "PRESETS", "Family", "config_from_hf", "family_of", "from_hf",
           "hf_config", "to_hf"]


def _having(option: str) -> str:
    return ", ".join(name for name, f in FAMILIES.items() if getattr(f, option))


def family_of(cfg: ModelConfig) -> str:
    """The family this model exports as (its preset's), or an error naming what it cannot express."""
    name, fam = cfg.family, FAMILIES.get(cfg.family)
    problems = fam.problems(cfg) if fam else [("model.preset", f"unknown family {name!r}")]
    if cfg.qkv_bias and not cfg.bias and not (fam and fam.qkv_bias):
        problems.append(("model.qkv_bias", f"{name} has no biases on q/k/v alone ({_having('qkv_bias')} does)"))
    if fam and fam.qkv_bias and not cfg.qkv_bias:
        problems.append(("model.qkv_bias", f"{name} always has biases on q/k/v"))
    if cfg.qk_norm != bool(fam and fam.qk_norm):
        problems.append(("model.qk_norm", f"{name} always normalizes queries and keys" if fam and fam.qk_norm
                         else f"{name} has no query/key norms ({_having('qk_norm')} does)"))
    if cfg.rope_scaling is not None and not (fam and fam.rope_scaling):
        problems.append(("model.rope_scaling", f"llmforge exports llama3 rope scaling as {_having('rope_scaling')}, "
                         f"not {name}"))
    if cfg.sliding_window is not None and not (fam and fam.sliding_window):
        problems.append(("model.sliding_window", f"{name} in transformers has no sliding window "
                         f"({_having('sliding_window')} do)"))
    if problems:
        key, why = problems[0]
        raise CheckpointError(f"{key}: {why}, so transformers cannot compute this model as {name}",
                              hint=f"pick the preset whose family has these options ({', '.join(FAMILIES)}), "
                                   "or change the options")
    return name


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for the model's family (vocab, tying, dtype and token ids are added by the caller)."""
    return FAMILIES[family_of(cfg)].hf_config(cfg)


def to_hf(cfg: ModelConfig, t: dict) -> dict:
    """Our tensors, named (and laid out) as the family's."""
    return FAMILIES[cfg.family].to_hf(cfg, t)


def from_hf(cfg: ModelConfig, t: dict) -> dict:
    """Their tensors named as ours (fp32): the inverse of to_hf."""
    return FAMILIES[cfg.family].from_hf(cfg, t)


def config_from_hf(c: dict, where) -> ModelConfig:
    """The ModelConfig of a transformers config.json; refuses, naming the key, anything llmforge
    would compute differently."""
    if not isinstance(c, dict):
        raise CheckpointError(f"{where}: not a transformers config (a JSON object), but a {type(c).__name__}")
    name, supported = c.get("model_type"), f"supported: {', '.join(FAMILIES)}"
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: model_type {name!r} is not a model type", hint=supported)
    if name in _NOT_YET:
        raise CheckpointError(f"{where}: model_type {name!r} ({_NOT_YET[name]}) is not supported yet: it scales the "
                              "embeddings by sqrt(n_embd), adds norms after attention and the MLP, and soft-caps "
                              "logits (Gemma 2/3 also alternate local and global attention)", hint=supported)
    if name not in FAMILIES:
        raise CheckpointError(f"{where}: model_type {name!r} is not supported", hint=supported)
    try:
        return FAMILIES[name].config(c, where)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: not a complete {name} config ({type(e).__name__}: {e})") from None
