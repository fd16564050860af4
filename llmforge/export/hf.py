"""A trained stage -> a Hugging Face `transformers` folder, without importing transformers.

The llama preset's architecture is HF's `LlamaForCausalLM` (RMSNorm, rope in the rotate-half
layout, SwiGLU, grouped-query attention), the gpt2 preset's is `GPT2LMHeadModel`; the tensors
only change names (and, for GPT-2, its Conv1D layout: [in, out], q/k/v fused). A configuration
the target cannot express is refused naming the option: never a silently different model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..generate import load_template, read_model_config
from ..model import ModelConfig
from ..tokenizer import Tokenizer
from .hf_tokenizer import tokenizer_config, tokenizer_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def architecture(cfg: ModelConfig) -> str:
    """"llama" or "gpt2": the HF architecture that computes exactly this model, or an error."""
    parts = (cfg.norm, cfg.positions, cfg.mlp)
    if parts == ("rmsnorm", "rope", "swiglu"):
        return "llama"
    if parts == ("layernorm", "learned", "gelu"):
        if cfg.kv_heads != cfg.n_head:
            raise CheckpointError(f"model.n_kv_head: {cfg.kv_heads} kv heads for {cfg.n_head} query heads; "
                                  "GPT-2 in transformers has no grouped-query attention",
                                  hint="export gpt2-style models with n_kv_head equal to n_head")
        return "gpt2"
    raise CheckpointError(f"model: norm {cfg.norm}, positions {cfg.positions}, mlp {cfg.mlp} is neither Llama "
                          "(rmsnorm, rope, swiglu) nor GPT-2 (layernorm, learned, gelu); transformers has no "
                          "architecture for this combination", hint="train with the llama or gpt2 preset to export")


def export_weights(final: Path, out: Path, dtype: str = "fp32", stop_ids: list[int] | None = None) -> str:
    """Write config.json, generation_config.json and model.safetensors for final/ into out;
    returns the architecture. Generation ends at `stop_ids` (as llmforge's does), the first of
    them the one to pad with."""
    cfg = read_model_config(final)
    arch = architecture(cfg)
    tensors = load_file(str(final / "model.safetensors"))
    convert = _llama if arch == "llama" else _gpt2
    hf_tensors, hf_config = convert(cfg, tensors)
    hf_config |= {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
                  "torch_dtype": _HF_DTYPE[dtype], "bos_token_id": None, "eos_token_id": stop_ids}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in hf_tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    generation = {"do_sample": False, "eos_token_id": stop_ids, "pad_token_id": stop_ids[-1] if stop_ids else None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return arch


_LLAMA_NAMES = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
                "attn.o_proj": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
                "mlp.w2": "mlp.down_proj"}


def _llama(cfg: ModelConfig, t: dict) -> tuple[dict, dict]:
    out = {"model.embed_tokens.weight": t["tok_emb.weight"], "model.norm.weight": t["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    for i in range(cfg.n_layer):
        for ours, theirs in _LLAMA_NAMES.items():
            for kind in ("weight", "bias"):
                if f"blocks.{i}.{ours}.{kind}" in t:
                    out[f"model.layers.{i}.{theirs}.{kind}"] = t[f"blocks.{i}.{ours}.{kind}"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.n_embd,
              "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
              "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
              "rope_scaling": None, "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": 0.0,
              "initializer_range": cfg.init_std}
    return out, config


def _gpt2(cfg: ModelConfig, t: dict) -> tuple[dict, dict]:
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
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": d, "n_layer": cfg.n_layer,
              "n_head": cfg.n_head, "n_inner": cfg.hidden, "n_positions": cfg.seq_len,
              "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0,
              "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": cfg.init_std}
    return out, config


def export_stage(final: Path, out: Path, dtype: str = "fp32") -> tuple[str, list[str]]:
    """The whole export of a stage's final/ folder into out (written aside, then renamed into
    place, so out is complete or absent); returns the architecture and warnings for the user."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out: {out} exists and is not empty", hint="choose another folder or delete it")
    architecture(read_model_config(final))  # refuse what transformers cannot express before anything else
    tokenizer, template = Tokenizer.load(final / "tokenizer.model"), load_template(final)
    # A chat model's turn ends at the template's end tag (as `llmforge chat` stops); text at end-of-text.
    stops = ([template.stop_id(tokenizer)] if template else []) + [tokenizer.eot_id]
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        arch = export_weights(final, tmp, dtype, stops)
        os.chmod(tmp / "model.safetensors", 0o644)  # safetensors writes 0600; models are shared
        shutil.copyfile(final / "tokenizer.model", tmp / "tokenizer.model")
        fast, warnings = tokenizer_json(tokenizer.model_bytes)
        (tmp / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False))
        # apply_chat_template renders conversations as llmforge does
        config = tokenizer_config(tokenizer.model_bytes, read_model_config(final).seq_len,
                                  template.jinja() if template else None)
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return arch, warnings


# -- import: a local Hugging Face folder -> (ModelConfig, our tensors) -------------------------

def read_hf(folder: Path) -> tuple[ModelConfig, dict]:
    """The model of a local transformers folder (Llama family or GPT-2), as a ModelConfig and
    tensors named as ours. Anything our model would compute differently is refused by name."""
    cfg = hf_config(folder)
    tensors = _read_tensors(folder)
    ours = _from_llama(cfg, tensors) if cfg.norm == "rmsnorm" else _from_gpt2(cfg, tensors)
    return cfg, ours


def hf_config(folder: Path) -> ModelConfig:
    """The architecture in a transformers folder's config.json, as llmforge's ModelConfig."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot read config.json ({e})", hint="point at a transformers model folder")
    kind = config.get("model_type")
    if kind not in ("llama", "gpt2"):
        raise CheckpointError(f"{folder}/config.json: model_type {kind!r} is not supported",
                              hint="llmforge reads Llama-family (model_type llama) and GPT-2 models")
    try:
        return (_llama_config if kind == "llama" else _gpt2_config)(config, folder / "config.json")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: not a complete {kind} config ({type(e).__name__}: {e})") from None


def recipe_model(folder: Path) -> dict:
    """The recipe's model keys that describe a transformers folder's model (model.init.hf)."""
    cfg = hf_config(folder)
    _weight_files(folder)  # refuse a folder without safetensors weights now, not when the stage starts
    out = {"preset": "llama" if cfg.norm == "rmsnorm" else "gpt2", "vocab_size": cfg.vocab_size,
           "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "seq_len": cfg.seq_len,
           "n_kv_head": cfg.kv_heads, "mlp_hidden": cfg.hidden, "tie_embeddings": cfg.tie_embeddings,
           "bias": cfg.bias, "norm_eps": cfg.norm_eps}
    if cfg.positions == "rope":
        out["rope_theta"] = cfg.rope_theta
    return out


def _refuse(where: Path, key: str, value, why: str):
    raise CheckpointError(f"{where}: {key} = {value!r} {why}", hint="llmforge cannot train this model exactly")


def _llama_config(c: dict, where: Path) -> ModelConfig:
    d, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", c["hidden_act"], "(llmforge's SwiGLU uses silu)")
    if c.get("head_dim") not in (None, d // heads):
        _refuse(where, "head_dim", c["head_dim"], f"differs from hidden_size / num_attention_heads = {d // heads}")
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        _refuse(where, "rope_scaling", rope, "(only plain rope is supported)")
    if bool(c.get("attention_bias")) != bool(c.get("mlp_bias")):
        _refuse(where, "attention_bias", c.get("attention_bias"), "differs from mlp_bias (llmforge has one bias flag)")
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    return ModelConfig(vocab_size=c["vocab_size"], seq_len=c.get("max_position_embeddings", 2048), n_layer=c[
        "num_hidden_layers"], n_head=heads, n_embd=d, n_kv_head=c.get("num_key_value_heads", heads), norm="rmsnorm",
        positions="rope", mlp="swiglu", mlp_hidden=c["intermediate_size"], tie_embeddings=bool(c.get(
            "tie_word_embeddings", False)), bias=bool(c.get("attention_bias")), rope_theta=float(theta),
        norm_eps=c.get("rms_norm_eps", 1e-6), init_std=c.get("initializer_range", 0.02))


def _gpt2_config(c: dict, where: Path) -> ModelConfig:
    if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        _refuse(where, "activation_function", c["activation_function"], "(llmforge's GPT-2 MLP uses tanh GELU)")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if c.get(key):
            _refuse(where, key, c[key], "is not supported")
    return ModelConfig(vocab_size=c["vocab_size"], seq_len=c.get("n_positions", 1024), n_layer=c["n_layer"],
                       n_head=c["n_head"], n_embd=c["n_embd"], norm="layernorm", positions="learned", mlp="gelu",
                       mlp_hidden=c.get("n_inner") or 4 * c["n_embd"], tie_embeddings=bool(c.get(
                           "tie_word_embeddings", True)), bias=True, norm_eps=c.get("layer_norm_epsilon", 1e-5),
                       init_std=c.get("initializer_range", 0.02))


def _read_tensors(folder: Path) -> dict:
    return {k: v for f in _weight_files(folder) for k, v in load_file(str(f)).items()}


def _weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json lists. Never pickle."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if index.is_file():
        return [folder / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if any(folder.glob("pytorch_model*.bin")):
        raise CheckpointError(f"{folder}: only pickle weights (pytorch_model.bin), which can run code when loaded",
                              hint="convert them to safetensors (transformers: save_pretrained(safe_serialization=True))")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _from_llama(cfg: ModelConfig, t: dict) -> dict:
    """Inverse of _llama: map every name we could have to theirs, keep those they have."""
    ours = ["tok_emb.weight", "norm.weight", "lm_head.weight"] + [
        f"blocks.{i}.{name}.{kind}" for i in range(cfg.n_layer) for name in _LLAMA_NAMES for kind in ("weight", "bias")]
    theirs, _ = _llama(cfg, {k: k for k in ours})
    return {mine: t[name].float().contiguous() for name, mine in theirs.items() if name in t}


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
