"""Attention without a dense [T, T] mask: packed documents, sliding windows, plain causal rows.

A mask passed to SDPA rules out the fused kernels where they matter (flash takes none; with
grouped-query attention the memory-efficient kernel refused unequal head counts up to torch
2.9), so the call falls to the math kernel, which keeps fp32 [B, H, T, T] scores for backward;
the mask itself is B*T*T bytes a layer. Here every training path reaches SDPA as `is_causal`
with no mask, the way torchtitan's SDPA wrapper insists on:

- packed rows: the documents of a micro-batch are regrouped into batches of equal padded
  length (DocLayout, computed on the host from the rows' document ids, so the forward never waits
  on the device), attended causally, and put back. A document is computed as it would be alone,
  and the work is sum(L_doc^2), not T^2. Lengths are grouped by powers of two so padding stays
  under half of any group.
- sliding windows: queries in blocks of `window`, each against its own and the previous block's
  keys, with one [window, 2*window] band mask: memory O(T * window).
- decoding (one query on a KV cache) and a chunk on top of a cache keep a small [T, S] mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# SDPA's `enable_gqa` arrived in torch 2.5; before that we repeat K/V heads ourselves. The builtin
# has no inspectable signature, so compare versions (TorchVersion compares semantically).
SDPA_HAS_GQA = torch.__version__ >= (2, 5)


@dataclass(frozen=True)
class DocLayout:
    """Where each packed document of a [B, T] micro-batch goes: `groups` of (documents, length);
    `gather` [sum(docs*length)] the flat B*T position of each group slot (padding repeats the
    document's first position: causal attention never lets a real token see what comes after
    it); `scatter` [B*T] the group slot each position's output comes back from; `positions`
    [B, T] each token's offset from its document's start (rope restarts per document)."""
    groups: tuple[tuple[int, int], ...]
    gather: torch.Tensor
    scatter: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def from_docs(cls, docs) -> DocLayout:
        """From [B, T] non-decreasing document ids per row (numpy, or a tensor: copied to the host)."""
        docs = docs.cpu().numpy() if isinstance(docs, torch.Tensor) else np.asarray(docs)
        B, T = docs.shape
        first = np.ones((B, T), dtype=bool)
        first[:, 1:] = docs[:, 1:] != docs[:, :-1]
        starts = np.flatnonzero(first)  # flat positions; every row starts a document
        lengths = np.diff(np.append(starts, B * T))
        positions = np.arange(B * T) - np.repeat(starts, lengths)
        bucket = np.ceil(np.log2(lengths)).astype(np.int64)
        groups, gather, scatter, at = [], [], np.zeros(B * T, dtype=np.int64), 0
        for b in np.unique(bucket)[::-1].tolist():
            mine = np.flatnonzero(bucket == b)
            s, n = starts[mine], lengths[mine]
            L = int(n.max())
            j = np.arange(L)
            slots = s[:, None] + np.where(j < n[:, None], j, 0)
            real = j < n[:, None]
            scatter[slots[real]] = at + np.flatnonzero(real.ravel())
            groups.append((len(mine), L))
            gather.append(slots.ravel())
            at += len(mine) * L
        return cls(tuple(groups), torch.from_numpy(np.concatenate(gather)), torch.from_numpy(scatter),
                   torch.from_numpy(positions.reshape(B, T)))

    def to(self, device) -> DocLayout:
        return DocLayout(self.groups, *(t.to(device, non_blocking=True) for t in (self.gather, self.scatter,
                                                                                    self.positions)))


class KVCache:
    """Per-layer keys/values [B, kv_heads, pos, head_dim] of the tokens seen so far (kv_heads, not
    n_head: GQA's memory saving), in buffers of `capacity` positions allocated at the first write
    and written in place. Grown by concatenation instead, each token would copy every layer's
    cache, and on a CPU leave the heap holding freed pieces of every size: grpo's rollout measured
    ~1.6x its cache that way. `pos` is advanced by Transformer.forward once all layers ran."""

    def __init__(self, n_layer: int, capacity: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos, self.capacity = 0, capacity

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this forward's T new keys and values after the pos cached; all of them so far."""
        end = self.pos + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"{end} positions exceed the cache's capacity of {self.capacity}")
        if self.k[layer] is None:
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
        self.k[layer][:, :, self.pos:end], self.v[layer][:, :, self.pos:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def sdpa(q, k, v, *, mask=None, causal=False, dropout=0.0):
    """SDPA over [.., H, T, hd] queries and [.., KV, S, hd] keys/values, GQA by enable_gqa (or K/V
    repeated on torch < 2.5: query head h reads kv head h // (H / KV))."""
    extra = {}
    if q.shape[-3] != k.shape[-3]:
        if SDPA_HAS_GQA:
            extra = {"enable_gqa": True}
        else:
            k, v = (t.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, **extra)


def causal(q, k, v, *, window: int | None = None, dropout: float = 0.0):
    """Causal attention of [B, H, T, hd] queries over as many keys; with a window, a query sees
    only the last `window` keys (itself included), in blocks: no [T, T] anything."""
    T = q.shape[-2]
    if window is None or T <= window:
        return sdpa(q, k, v, causal=True, dropout=dropout)
    B, H, _, hd = q.shape
    W, nb = window, -(-T // window)
    pad = nb * W - T
    # [B * nb, H, W, hd]: 4-D, as SDPA's fused kernels take nothing else
    q = F.pad(q, (0, 0, 0, pad)).view(B, H, nb, W, hd).transpose(1, 2).reshape(B * nb, H, W, hd)
    # keys of block i: positions (i-1)W .. (i+1)W-1, with W zeros in front for block 0
    k, v = (F.pad(t, (0, 0, W, pad)).unfold(2, 2 * W, W).permute(0, 2, 1, 4, 3).reshape(B * nb, t.shape[1], 2 * W, hd)
            for t in (k, v))
    j, m = torch.arange(W, device=q.device)[:, None], torch.arange(2 * W, device=q.device)
    band = (m > j) & (m <= j + W)  # key (i-1)W+m of query iW+j: at most W-1 back, not ahead
    mask = band.expand(B, nb, 1, W, 2 * W).clone()
    mask[:, 0, :, :, :W] = False  # block 0's front keys are the padding
    y = sdpa(q, k, v, mask=mask.view(B * nb, 1, W, 2 * W), dropout=dropout)  # [B * nb, H, W, hd]
    return y.view(B, nb, H, W, hd).transpose(1, 2).reshape(B, H, nb * W, hd)[:, :, :T]


@torch.compiler.disable  # a layout's groups are Python ints: compiled, each new layout would be a new graph
def packed(q, k, v, layout: DocLayout, *, window: int | None = None, dropout: float = 0.0):
    """Causal attention inside each document of a packed [B, H, T, hd] batch (see DocLayout)."""
    B, H, T, hd = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], hd) for t in (q, k, v)]
    out, at = [], 0
    for n, L in layout.groups:
        idx = layout.gather[at:at + n * L]
        qg, kg, vg = (t.index_select(0, idx).view(n, L, t.shape[1], hd).transpose(1, 2) for t in flat)
        out.append(causal(qg, kg, vg, window=window, dropout=dropout).transpose(1, 2).reshape(n * L, H, hd))
        at += n * L
    y = torch.cat(out).index_select(0, layout.scatter)  # [B*T, H, hd]
    return y.view(B, T, H, hd).transpose(1, 2)


def cached_mask(T: int, S: int, docs: torch.Tensor | None, device) -> torch.Tensor | None:
    """[B or 1, 1, T, S] visibility of T new queries over S = cached + new keys: key position <=
    query position, and with docs [B, S] (left-padded prompts) the same document. None when one
    query may see every key."""
    mask = None
    if T > 1:  # a chunk on a cache sits at positions S-T..S-1: is_causal would align it top-left
        mask = torch.arange(S, device=device) <= torch.arange(S - T, S, device=device)[:, None]
    if docs is not None:
        same = docs[:, None, -T:, None] == docs[:, None, None, :]
        mask = same if mask is None else same & mask
    return mask


def windowed(mask: torch.Tensor | None, T: int, S: int, window: int | None, device) -> torch.Tensor | None:
    """mask narrowed to keys less than `window` positions back (a cache past the window)."""
    if window is None or S <= window:
        return mask
    q_pos, k_pos = torch.arange(S - T, S, device=device)[:, None], torch.arange(S, device=device)
    band = (k_pos <= q_pos) & (k_pos > q_pos - window)
    return band if mask is None else mask & band
