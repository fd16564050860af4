"""Llama, Qwen2, Qwen3, Mistral and Phi-3: one architecture in transformers' code (RMSNorm, rope
in the rotate-half layout, SwiGLU, grouped-query attention) with a few switches: Llama has biases on
every linear layer when asked and Llama 3.1's rope scaling, Qwen2 biases on q/k/v only, Qwen3
RMSNorm on each head's queries and keys and its own head_dim, Mistral and Phi-3 a sliding window,
Phi-3 fused qkv_proj and gate_up_proj."""

from __future__ import annotations

import torch

from ..transformer import ModelConfig
from .family import Family, refuse

_ARCH = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, tie_embeddings=False)
# Our names in a block -> theirs, in every family here (Phi-3's fused layers are split first).
LLAMA_LAYER = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
               "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
               "attn.o_proj": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
               "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj"}


class LlamaLike(Family):
    bias = False  # biases on every linear layer, when the model has them

    def __init__(self, name: str, hf_class: str):
        self.name, self.hf_class = name, hf_class
        # What the family always has is what its preset switches on.
        self.preset = _ARCH | {k: True for k in ("qkv_bias", "qk_norm") if getattr(self, k)} | {"family": name}

    def problems(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        out = []
        if (cfg.norm, cfg.positions, cfg.mlp) != ("rmsnorm", "rope", "swiglu"):
            out.append(("model.norm/positions/mlp", f"{self.name} is rmsnorm + rope + swiglu, not "
                        f"{cfg.norm} + {cfg.positions} + {cfg.mlp}"))
        if cfg.bias and not self.bias:
            out.append(("model.bias", f"{self.name} has no biases on every linear layer (llama does)"))
        return out

    def hf_config(self, cfg: ModelConfig) -> dict:
        return super().hf_config(cfg) | {
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "hidden_act": "silu", "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "attention_dropout": 0.0}

    def to_hf(self, cfg: ModelConfig, t: dict) -> dict:
        out = {"model.embed_tokens.weight": t["tok_emb.weight"], "model.norm.weight": t["norm.weight"]}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = t["lm_head.weight"]
        for i in range(cfg.n_layer):
            for ours, theirs in LLAMA_LAYER.items():
                for kind in ("weight", "bias"):
                    if f"blocks.{i}.{ours}.{kind}" in t:
                        out[f"model.layers.{i}.{theirs}.{kind}"] = t[f"blocks.{i}.{ours}.{kind}"]
        return out

    def from_hf(self, cfg: ModelConfig, t: dict) -> dict:
        ours = ["tok_emb.weight", "norm.weight", "lm_head.weight"] + [
            f"blocks.{i}.{name}.{kind}" for i in range(cfg.n_layer) for name in LLAMA_LAYER for kind in ("weight", "bias")]
        names = LlamaLike.to_hf(self, cfg, {k: k for k in ours})  # unfused names
        return {mine: t[name].float().contiguous() for name, mine in names.items() if name in t}

    def config(self, c: dict, where) -> ModelConfig:
        d, heads = c["hidden_size"], c["num_attention_heads"]
        if c.get("hidden_act", "silu") != "silu":
            refuse(where, "hidden_act", c["hidden_act"], "(llmforge's SwiGLU uses silu)")
        rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if kind == "llama3" and self.rope_scaling:
            scaling = {"type": "llama3", "factor": float(rope["factor"]),
                       "low_freq_factor": float(rope["low_freq_factor"]),
                       "high_freq_factor": float(rope["high_freq_factor"]),
                       "original_max_position_embeddings": int(rope["original_max_position_embeddings"])}
        elif kind != "default":
            refuse(where, "rope_scaling", rope,
                   f"(llmforge has plain rope{' and llama3 scaling' if self.rope_scaling else ''})")
        partial = c.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            refuse(where, "partial_rotary_factor", partial, "(llmforge rotates every dimension of a head)")
        theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
        bias = False
        if self.bias:
            if bool(c.get("attention_bias")) != bool(c.get("mlp_bias")):
                refuse(where, "attention_bias", c.get("attention_bias"),
                       "differs from mlp_bias (llmforge has one bias flag)")
            bias = bool(c.get("attention_bias"))
        elif not self.qkv_bias and c.get("attention_bias"):
            refuse(where, "attention_bias", True, f"(llmforge's {self.name} has no biases on attention alone)")
        window = self.window(c, where)
        return ModelConfig(
            vocab_size=c["vocab_size"], seq_len=c.get("max_position_embeddings", 2048),
            n_layer=c["num_hidden_layers"], n_head=heads, n_embd=d, n_kv_head=c.get("num_key_value_heads") or heads,
            norm="rmsnorm", positions="rope", mlp="swiglu", mlp_hidden=c["intermediate_size"],
            tie_embeddings=bool(c.get("tie_word_embeddings", False)), bias=bias, rope_theta=float(theta),
            norm_eps=c.get("rms_norm_eps", 1e-6), init_std=c.get("initializer_range", 0.02),
            head_dim=c.get("head_dim") or d // heads, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm,
            rope_scaling=scaling, sliding_window=window, family=self.name)

    def window(self, c: dict, where) -> int | None:
        """The sliding window its config.json sets (None: none)."""
        return None


class Llama(LlamaLike):
    bias = rope_scaling = True

    def hf_config(self, cfg: ModelConfig) -> dict:
        scaling = None if cfg.rope_scaling is None else {
            "rope_type": "llama3", **{k: v for k, v in cfg.rope_scaling.items() if k != "type"}}
        return super().hf_config(cfg) | {"rope_scaling": scaling, "attention_bias": cfg.bias, "mlp_bias": cfg.bias}


class Qwen(LlamaLike):
    def hf_config(self, cfg: ModelConfig) -> dict:
        out = super().hf_config(cfg) | {"use_sliding_window": False, "sliding_window": None,
                                        "max_window_layers": cfg.n_layer}
        return out | ({"attention_bias": False} if self.qk_norm else {})

    def window(self, c: dict, where) -> int | None:
        if c.get("use_sliding_window"):
            refuse(where, "use_sliding_window", True, "(sliding attention on some layers only is not supported)")
        return None


class Qwen2(Qwen):
    qkv_bias = True


class Qwen3(Qwen):
    qk_norm = True


class Mistral(LlamaLike):
    sliding_window = True

    def hf_config(self, cfg: ModelConfig) -> dict:
        return super().hf_config(cfg) | {"sliding_window": cfg.sliding_window}

    def window(self, c: dict, where) -> int | None:
        return c.get("sliding_window")


class Phi3(Mistral):
    fused = "qkv and gate/up"

    def hf_config(self, cfg: ModelConfig) -> dict:
        return super().hf_config(cfg) | {
            "rope_scaling": None, "partial_rotary_factor": 1.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "original_max_position_embeddings": cfg.seq_len, "pad_token_id": None}

    def to_hf(self, cfg: ModelConfig, t: dict) -> dict:
        out = super().to_hf(cfg, t)
        for i in range(cfg.n_layer):  # fused: [q; k; v] rows and [gate; up] rows
            p = f"model.layers.{i}."
            out[p + "self_attn.qkv_proj.weight"] = torch.cat([out.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            out[p + "mlp.gate_up_proj.weight"] = torch.cat([out.pop(p + "mlp.gate_proj.weight"),
                                                            out.pop(p + "mlp.up_proj.weight")])
        return out

    def from_hf(self, cfg: ModelConfig, t: dict) -> dict:
        t, kv = dict(t), cfg.kv_heads * cfg.head_dim
        for i in range(cfg.n_layer):  # split the fused projections back into ours
            p = f"model.layers.{i}."
            if p + "self_attn.qkv_proj.weight" in t:
                parts = t.pop(p + "self_attn.qkv_proj.weight").split([cfg.q_dim, kv, kv])
                t |= {p + f"self_attn.{n}_proj.weight": w for n, w in zip("qkv", parts)}
            if p + "mlp.gate_up_proj.weight" in t:
                gate, up = t.pop(p + "mlp.gate_up_proj.weight").split([cfg.hidden, cfg.hidden])
                t |= {p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up}
        return super().from_hf(cfg, t)


LLAMA = Llama("llama", "LlamaForCausalLM")
QWEN2 = Qwen2("qwen2", "Qwen2ForCausalLM")
QWEN3 = Qwen3("qwen3", "Qwen3ForCausalLM")
MISTRAL = Mistral("mistral", "MistralForCausalLM")
PHI3 = Phi3("phi3", "Phi3ForCausalLM")
