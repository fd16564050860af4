"""What a model family declares: the Hugging Face architecture llmforge's model computes exactly,
both ways (a transformers config.json <-> ModelConfig, their tensor names <-> ours), the switches
its recipe preset fills in, and what of a config it cannot express."""

from __future__ import annotations

from ...errors import CheckpointError
from ..transformer import ModelConfig


class Family:
    name: str  # the Hugging Face model_type, and the recipe's model.preset
    hf_class: str  # the transformers class export writes and loads
    preset: dict  # the ModelConfig switches model.preset fills in
    # Options the family always has, or can have (each checked against a model in families.family_of):
    qkv_bias = False  # biases on q, k, v alone, always (Qwen2)
    qk_norm = False  # RMSNorm on each head's queries and keys, always (Qwen3)
    rope_scaling = False  # Llama 3.1's rope scaling, when the model has it
    sliding_window = False  # a sliding attention window, when the model has one
    fused: str | None = None  # projections transformers fuses into one layer (then a LoRA has no PEFT form)

    def problems(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        """(recipe key, why) of what this family's own architecture cannot express of cfg."""
        return []

    def hf_config(self, cfg: ModelConfig) -> dict:
        """config.json for the model (vocab, tying, dtype and token ids are added by the caller)."""
        return {"architectures": [self.hf_class], "model_type": self.name, "initializer_range": cfg.init_std}

    def to_hf(self, cfg: ModelConfig, t: dict) -> dict:
        """Our tensors, named (and laid out) as the family's."""
        raise NotImplementedError

    def from_hf(self, cfg: ModelConfig, t: dict) -> dict:
        """Their tensors named as ours (fp32): the inverse of to_hf."""
        raise NotImplementedError

    def config(self, c: dict, where) -> ModelConfig:
        """The ModelConfig of its config.json; refuses, naming the key, what llmforge would compute
        differently. (KeyError, TypeError, ValueError mean an incomplete config: the caller says so.)"""
        raise NotImplementedError


def refuse(where, key: str, value, why: str):
    raise CheckpointError(f"{where}: {key} = {value!r} {why}", hint="llmforge cannot train this model exactly")
