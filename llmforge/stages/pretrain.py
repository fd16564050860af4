"""Pretraining: next-token cross-entropy on packed windows of text."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.rows import WindowRows
from ..data.sampler import eval_windows
from ..model.kept import Kept
from . import kind


def token_losses(model, batch: torch.Tensor, keep: Kept | torch.Tensor | None = None) -> torch.Tensor:
    """[B, T+1] token windows -> [B, T] loss in nats for predicting each next token; with keep
    (a Kept or [B, T] bool), only those targets' logits are computed and the rest are 0."""
    keep = None if keep is None else Kept.of(keep)
    logp = model(batch[:, :-1], keep=keep, targets=batch[:, 1:])  # in fp32, a chunk of rows at a time
    return -logp if keep is None else keep.spread(-logp)


def summarize_lm(sums: dict) -> dict:
    """Held-out loss in nats per learned token, and bits per UTF-8 byte of the learned text."""
    if not sums.get("tokens"):
        return {}
    return {"loss": sums["nats"] / sums["tokens"], "bpb": sums["text_nats"] / math.log(2) / max(sums["bytes"], 1)}


class Objective(kind.Objective):
    def __init__(self, sp, token_bytes: np.ndarray):
        self.token_bytes = token_bytes

    def units(self, batch: dict) -> int:
        return batch["tokens"][:, 1:].size

    def loss(self, model, batch: dict) -> dict:
        tokens = batch["tokens"]  # the sum alone: the head finds its gradient in one pass (loss.py)
        return {"loss": -model(tokens[:, :-1], targets=tokens[:, 1:], summed=True)}

    def eval_sums(self, model, batch: dict) -> dict:
        # Bits per byte of *text*: targets that decode to no bytes (end-of-text) count in neither sum.
        targets = batch["tokens"][:, 1:].cpu().numpy()
        counted = torch.from_numpy(self.token_bytes[targets] > 0)
        nats = token_losses(model, batch["tokens"]).double().cpu()[counted].sum().item()
        n_bytes = int(self.token_bytes[targets].sum())
        return {"nats": nats, "text_nats": nats, "tokens": int(counted.sum()), "bytes": n_bytes}

    summarize = staticmethod(summarize_lm)


class Pretrain(kind.Kind):
    name, formats, chat = "pretrain", ("text", "jsonl", "parquet"), False

    def train_rows(self, source, seq_len, options, seed):
        return WindowRows(source.train, seq_len)

    def held_out(self, source, seq_len, options, seed, tokens):
        return None, {"tokens": eval_windows(source.val, seq_len, tokens)}

    def objective(self, sp, tokenizer, template, seed):
        return Objective(sp, tokenizer.token_bytes)


KIND = Pretrain()
