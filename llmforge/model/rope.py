"""Rotary position embeddings (RoPE): the cos/sin tables a config implies (with Llama 3.1's
scaling) and the rotation of queries and keys."""

from __future__ import annotations

import math

import torch


def rope_tables(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [seq_len, head_dim] for RoPE (RoFormer, Su et al. 2021) in the "rotate half" layout:
    pair i is (x[i], x[i + head_dim/2]) turning at theta^(-2i/head_dim), as in HF Llama."""
    inv_freq = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    if cfg.rope_scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, cfg.rope_scaling)
    angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's rope scaling: wavelengths longer than the original context / low_freq_factor
    are stretched by `factor`, those shorter than original / high_freq_factor kept, and the band
    between interpolated smoothly (as transformers' _compute_llama3_parameters)."""
    old = s["original_max_position_embeddings"]
    low, high, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, head_dim], cos/sin [T, head_dim]. Rotating in fp32 keeps large angles accurate
    # under bf16 at negligible cost next to the matmuls.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)
