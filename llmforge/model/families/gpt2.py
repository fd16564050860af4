"""GPT-2: LayerNorm, learned positions, a GELU MLP; transformers keeps its weights in Conv1D's
[in, out] layout (ours: Linear's [out, in]) and fuses q, k, v into one layer."""

from __future__ import annotations

import torch

from ..transformer import ModelConfig
from .family import Family, refuse


class GPT2(Family):
    name, hf_class, fused = "gpt2", "GPT2LMHeadModel", "q/k/v"
    preset = dict(norm="layernorm", positions="learned", mlp="gelu", bias=True, tie_embeddings=True, family="gpt2")

    def problems(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        out = []
        if (cfg.norm, cfg.positions, cfg.mlp) != ("layernorm", "learned", "gelu"):
            out.append(("model.preset", "gpt2 is layernorm + learned positions + gelu"))
        if cfg.kv_heads != cfg.n_head:
            out.append(("model.n_kv_head", "GPT-2 in transformers has no grouped-query attention"))
        if cfg.head_dim * cfg.n_head != cfg.n_embd:
            out.append(("model.head_dim", "GPT-2's heads split n_embd"))
        return out

    def hf_config(self, cfg: ModelConfig) -> dict:
        return super().hf_config(cfg) | {
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.hidden,
            "n_positions": cfg.seq_len, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}

    def to_hf(self, cfg: ModelConfig, t: dict) -> dict:
        """Its Linear layers and LayerNorms always have biases: ours may not, and then they are zeros."""
        def bias(name: str, size: int) -> torch.Tensor:
            return t.get(name, torch.zeros(size))

        d = cfg.n_embd
        out = {"transformer.wte.weight": t["tok_emb.weight"], "transformer.wpe.weight": t["pos_emb.weight"],
               "transformer.ln_f.weight": t["norm.weight"], "transformer.ln_f.bias": bias("norm.bias", d)}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = t["lm_head.weight"]
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[h + theirs + ".weight"] = t[p + ours + ".weight"]
                out[h + theirs + ".bias"] = bias(p + ours + ".bias", d)
            qkv = ("q_proj", "k_proj", "v_proj")
            out[h + "attn.c_attn.weight"] = torch.cat([t[f"{p}attn.{n}.weight"] for n in qkv]).T
            out[h + "attn.c_attn.bias"] = torch.cat([bias(f"{p}attn.{n}.bias", d) for n in qkv])
            for ours, theirs, size in (("attn.o_proj", "attn.c_proj", d), ("mlp.c_fc", "mlp.c_fc", cfg.hidden),
                                       ("mlp.c_proj", "mlp.c_proj", d)):
                out[h + theirs + ".weight"] = t[p + ours + ".weight"].T
                out[h + theirs + ".bias"] = bias(p + ours + ".bias", size)
        return out

    def from_hf(self, cfg: ModelConfig, t: dict) -> dict:
        d = cfg.n_embd
        out = {"tok_emb.weight": t["transformer.wte.weight"], "pos_emb.weight": t["transformer.wpe.weight"],
               "norm.weight": t["transformer.ln_f.weight"], "norm.bias": t["transformer.ln_f.bias"]}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = t["lm_head.weight"]
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[p + ours + ".weight"], out[p + ours + ".bias"] = t[h + theirs + ".weight"], t[h + theirs + ".bias"]
            for name, w, b in zip(("q_proj", "k_proj", "v_proj"), t[h + "attn.c_attn.weight"].T.split(d),
                                  t[h + "attn.c_attn.bias"].split(d)):
                out[f"{p}attn.{name}.weight"], out[f"{p}attn.{name}.bias"] = w, b
            for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.c_fc", "mlp.c_fc"),
                                 ("mlp.c_proj", "mlp.c_proj")):
                out[p + ours + ".weight"], out[p + ours + ".bias"] = t[h + theirs + ".weight"].T, t[h + theirs + ".bias"]
        return {k: v.float().contiguous() for k, v in out.items()}

    def config(self, c: dict, where) -> ModelConfig:
        if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse(where, "activation_function", c["activation_function"], "(llmforge's GPT-2 MLP uses tanh GELU)")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if c.get(key):
                refuse(where, key, c[key], "is not supported")
        return ModelConfig(vocab_size=c["vocab_size"], seq_len=c.get("n_positions", 1024), n_layer=c["n_layer"],
                           n_head=c["n_head"], n_embd=c["n_embd"], norm="layernorm", positions="learned", mlp="gelu",
                           mlp_hidden=c.get("n_inner") or 4 * c["n_embd"],
                           tie_embeddings=bool(c.get("tie_word_embeddings", True)), bias=True,
                           norm_eps=c.get("layer_norm_epsilon", 1e-5), init_std=c.get("initializer_range", 0.02),
                           family="gpt2")


GPT2_FAMILY = GPT2()
