"""The Hugging Face families llmforge's model computes exactly, both ways: a transformers
config.json <-> ModelConfig, and their tensor names <-> ours.

Llama, Qwen2, Qwen3, Mistral and Phi-3 are one architecture in transformers' code (RMSNorm, rope
in the rotate-half layout, SwiGLU, grouped-query attention) with a few switches: Qwen2 has biases
on q/k/v only, Qwen3 RMSNorm on each head's queries and keys and its own head_dim, Mistral and
Phi-3 a sliding window, Phi-3 fused qkv_proj and gate_up_proj, Llama 3.1 a rope scaling. GPT-2 is
its own (Conv1D layout [in, out], fused q/k/v). Anything else is refused by name: never a
silently different model.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import CheckpointError
from .transformer import ModelConfig

CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "phi3")
_NOT_YET = {"gemma": "Gemma", "gemma2": "Gemma 2", "gemma3": "Gemma 3", "gemma3_text": "Gemma 3"}
LLAMA_LAYER = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
          "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
          "attn.o_proj": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
          "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj"}


# -- export: which family, and its config ------------------------------------------------------

def family_of(cfg: ModelConfig) -> str:
    """The family this model exports as (its preset's), or an error naming what it cannot express."""
    fam = cfg.family
    problems = []
    if fam == "gpt2":
        if (cfg.norm, cfg.positions, cfg.mlp) != ("layernorm", "learned", "gelu"):
            problems.append(("model.preset", "gpt2 is layernorm + learned positions + gelu"))
        if cfg.kv_heads != cfg.n_head:
            problems.append(("model.n_kv_head", "GPT-2 in transformers has no grouped-query attention"))
        if cfg.head_dim * cfg.n_head != cfg.n_embd:
            problems.append(("model.head_dim", "GPT-2's heads split n_embd"))
    elif fam in LLAMA_LIKE:
        if (cfg.norm, cfg.positions, cfg.mlp) != ("rmsnorm", "rope", "swiglu"):
            problems.append(("model.norm/positions/mlp", f"{fam} is rmsnorm + rope + swiglu, not "
                             f"{cfg.norm} + {cfg.positions} + {cfg.mlp}"))
        if cfg.bias and fam != "llama":
            problems.append(("model.bias", f"{fam} has no biases on every linear layer (llama does)"))
    else:
        problems.append(("model.preset", f"unknown family {fam!r}"))
    if cfg.qkv_bias and not cfg.bias and fam != "qwen2":
        problems.append(("model.qkv_bias", f"{fam} has no biases on q/k/v alone (qwen2 does)"))
    if fam == "qwen2" and not cfg.qkv_bias:
        problems.append(("model.qkv_bias", "qwen2 always has biases on q/k/v"))
    if cfg.qk_norm != (fam == "qwen3"):
        problems.append(("model.qk_norm", "qwen3 always normalizes queries and keys" if fam == "qwen3"
                         else f"{fam} has no query/key norms (qwen3 does)"))
    if cfg.rope_scaling is not None and fam != "llama":
        problems.append(("model.rope_scaling", f"llmforge exports llama3 rope scaling as llama, not {fam}"))
    if cfg.sliding_window is not None and fam not in ("mistral", "phi3"):
        problems.append(("model.sliding_window", f"{fam} in transformers has no sliding window (mistral, phi3 do)"))
    if problems:
        key, why = problems[0]
        raise CheckpointError(f"{key}: {why}, so transformers cannot compute this model as {fam}",
                              hint="pick the preset whose family has these options (llama, qwen2, qwen3, mistral, "
                                   "phi3, gpt2), or change the options")
    return fam


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for the model's family (vocab, tying, dtype and token ids are added by the caller)."""
    fam = family_of(cfg)
    base = {"architectures": [CLASSES[fam]], "model_type": fam, "initializer_range": cfg.init_std}
    if fam == "gpt2":
        return base | {"n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.hidden,
                       "n_positions": cfg.seq_len, "activation_function": "gelu_new",
                       "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    out = base | {"hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer,
                  "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
                  "hidden_act": "silu", "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps,
                  "rope_theta": cfg.rope_theta, "attention_dropout": 0.0}
    if fam == "llama":
        scaling = None if cfg.rope_scaling is None else {
            "rope_type": "llama3", **{k: v for k, v in cfg.rope_scaling.items() if k != "type"}}
        out |= {"rope_scaling": scaling, "attention_bias": cfg.bias, "mlp_bias": cfg.bias}
    elif fam in ("qwen2", "qwen3"):
        out |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}
        if fam == "qwen3":
            out["attention_bias"] = False
    else:  # mistral, phi3
        out["sliding_window"] = cfg.sliding_window
        if fam == "phi3":
            out |= {"rope_scaling": None, "partial_rotary_factor": 1.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                    "original_max_position_embeddings": cfg.seq_len, "pad_token_id": None}
    return out


def to_hf(cfg: ModelConfig, t: dict) -> dict:
    """Our tensors, named (and laid out) as the family's."""
    if cfg.family == "gpt2":
        return _to_gpt2(cfg, t)
    out = {"model.embed_tokens.weight": t["tok_emb.weight"], "model.norm.weight": t["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    for i in range(cfg.n_layer):
        for ours, theirs in LLAMA_LAYER.items():
            for kind in ("weight", "bias"):
                if f"blocks.{i}.{ours}.{kind}" in t:
                    out[f"model.layers.{i}.{theirs}.{kind}"] = t[f"blocks.{i}.{ours}.{kind}"]
        if cfg.family == "phi3":  # fused: [q; k; v] rows and [gate; up] rows
            p = f"model.layers.{i}."
            out[p + "self_attn.qkv_proj.weight"] = torch.cat([out.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            out[p + "mlp.gate_up_proj.weight"] = torch.cat([out.pop(p + "mlp.gate_proj.weight"),
                                                            out.pop(p + "mlp.up_proj.weight")])
    return out


def _to_gpt2(cfg: ModelConfig, t: dict) -> dict:
    """GPT-2's Conv1D keeps weights as [in, out] (ours: Linear, [out, in]) and fuses q, k, v.
    Its Linear layers and LayerNorms always have biases: ours may not, and then they are zeros."""
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


# -- import: config.json -> ModelConfig, their tensors -> ours ---------------------------------

def config_from_hf(c: dict, where) -> ModelConfig:
    """The ModelConfig of a transformers config.json; refuses, naming the key, anything llmforge
    would compute differently."""
    if not isinstance(c, dict):
        raise CheckpointError(f"{where}: not a transformers config (a JSON object), but a {type(c).__name__}")
    fam = c.get("model_type")
    if not isinstance(fam, str):
        raise CheckpointError(f"{where}: model_type {fam!r} is not a model type", hint=f"supported: {', '.join(CLASSES)}")
    if fam in _NOT_YET:
        raise CheckpointError(f"{where}: model_type {fam!r} ({_NOT_YET[fam]}) is not supported yet: it scales the "
                              "embeddings by sqrt(n_embd), adds norms after attention and the MLP, and soft-caps "
                              "logits (Gemma 2/3 also alternate local and global attention)",
                              hint=f"supported: {', '.join(CLASSES)}")
    if fam not in CLASSES:
        raise CheckpointError(f"{where}: model_type {fam!r} is not supported", hint=f"supported: {', '.join(CLASSES)}")
    try:
        return _gpt2_config(c, where) if fam == "gpt2" else _llama_like_config(fam, c, where)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: not a complete {fam} config ({type(e).__name__}: {e})") from None


def _refuse(where, key: str, value, why: str):
    raise CheckpointError(f"{where}: {key} = {value!r} {why}", hint="llmforge cannot train this model exactly")


def _llama_like_config(fam: str, c: dict, where) -> ModelConfig:
    d, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", c["hidden_act"], "(llmforge's SwiGLU uses silu)")
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind == "llama3" and fam == "llama":
        scaling = {"type": "llama3", "factor": float(rope["factor"]), "low_freq_factor": float(rope["low_freq_factor"]),
                   "high_freq_factor": float(rope["high_freq_factor"]),
                   "original_max_position_embeddings": int(rope["original_max_position_embeddings"])}
    elif kind != "default":
        _refuse(where, "rope_scaling", rope, f"(llmforge has plain rope{' and llama3 scaling' if fam == 'llama' else ''})")
    partial = c.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        _refuse(where, "partial_rotary_factor", partial, "(llmforge rotates every dimension of a head)")
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    bias = qkv_bias = False
    if fam == "llama":
        if bool(c.get("attention_bias")) != bool(c.get("mlp_bias")):
            _refuse(where, "attention_bias", c.get("attention_bias"), "differs from mlp_bias (llmforge has one bias flag)")
        bias = bool(c.get("attention_bias"))
    elif fam == "qwen2":
        qkv_bias = True
    elif c.get("attention_bias"):
        _refuse(where, "attention_bias", True, f"(llmforge's {fam} has no biases on attention alone)")
    window = None
    if fam in ("qwen2", "qwen3") and c.get("use_sliding_window"):
        _refuse(where, "use_sliding_window", True, "(sliding attention on some layers only is not supported)")
    if fam in ("mistral", "phi3"):
        window = c.get("sliding_window")
    return ModelConfig(
        vocab_size=c["vocab_size"], seq_len=c.get("max_position_embeddings", 2048), n_layer=c["num_hidden_layers"],
        n_head=heads, n_embd=d, n_kv_head=c.get("num_key_value_heads") or heads, norm="rmsnorm", positions="rope",
        mlp="swiglu", mlp_hidden=c["intermediate_size"], tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        bias=bias, rope_theta=float(theta), norm_eps=c.get("rms_norm_eps", 1e-6),
        init_std=c.get("initializer_range", 0.02), head_dim=c.get("head_dim") or d // heads, qkv_bias=qkv_bias,
        qk_norm=fam == "qwen3", rope_scaling=scaling, sliding_window=window, family=fam)


def _gpt2_config(c: dict, where) -> ModelConfig:
    if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        _refuse(where, "activation_function", c["activation_function"], "(llmforge's GPT-2 MLP uses tanh GELU)")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if c.get(key):
            _refuse(where, key, c[key], "is not supported")
    return ModelConfig(vocab_size=c["vocab_size"], seq_len=c.get("n_positions", 1024), n_layer=c["n_layer"],
                       n_head=c["n_head"], n_embd=c["n_embd"], norm="layernorm", positions="learned", mlp="gelu",
                       mlp_hidden=c.get("n_inner") or 4 * c["n_embd"], tie_embeddings=bool(c.get(
                           "tie_word_embeddings", True)), bias=True, norm_eps=c.get("layer_norm_epsilon", 1e-5),
                       init_std=c.get("initializer_range", 0.02), family="gpt2")


def from_hf(cfg: ModelConfig, t: dict) -> dict:
    """Their tensors named as ours (fp32): the inverse of to_hf."""
    if cfg.family == "gpt2":
        return _from_gpt2(cfg, t)
    t = dict(t)
    if cfg.family == "phi3":  # split the fused projections back into ours
        kv = cfg.kv_heads * cfg.head_dim
        for i in range(cfg.n_layer):
            p = f"model.layers.{i}."
            if p + "self_attn.qkv_proj.weight" in t:
                parts = t.pop(p + "self_attn.qkv_proj.weight").split([cfg.q_dim, kv, kv])
                t |= {p + f"self_attn.{n}_proj.weight": w for n, w in zip("qkv", parts)}
            if p + "mlp.gate_up_proj.weight" in t:
                gate, up = t.pop(p + "mlp.gate_up_proj.weight").split([cfg.hidden, cfg.hidden])
                t |= {p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up}
    ours = ["tok_emb.weight", "norm.weight", "lm_head.weight"] + [
        f"blocks.{i}.{name}.{kind}" for i in range(cfg.n_layer) for name in LLAMA_LAYER for kind in ("weight", "bias")]
    names = to_hf(dataclasses.replace(cfg, family="llama"), {k: k for k in ours})  # unfused names
    return {mine: t[name].float().contiguous() for name, mine in names.items() if name in t}


def _from_gpt2(cfg: ModelConfig, t: dict) -> dict:
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
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
            out[p + ours + ".weight"], out[p + ours + ".bias"] = t[h + theirs + ".weight"].T, t[h + theirs + ".bias"]
    return {k: v.float().contiguous() for k, v in out.items()}
