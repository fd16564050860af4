"""Supervised fine-tuning: cross-entropy on the learned tokens of conversations (the assistant's
turns, or every token with train_on: all), in packed rows whose documents do not see each other."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..data.rows import IGNORE, PackedRows
from ..model.kept import Kept
from . import kind
from .pretrain import summarize_lm


class Options(kind.ExampleOptions):
    # Which tokens are learned: the assistant's turns, or every token.
    train_on: Literal["assistant", "all"] = "assistant"
    # Several conversations share a row (best fit; attention kept inside each), or each is padded.
    packing: bool = True


def learned(batch: dict) -> Kept:
    """The learned targets' positions (to_device finds them on the host as `learned`)."""
    return Kept.of(batch["learned"] if "learned" in batch else batch["targets"] != IGNORE)


def learned_losses(model, batch: dict, summed: bool = False) -> torch.Tensor:
    """[N] nats of each learned target, in row order (logits are computed for those alone); with
    summed, their sum, the head finding its gradient in one pass (loss.py)."""
    return -model(batch["inputs"], docs=batch.get("docs"), keep=learned(batch), targets=batch["targets"],
                  summed=summed)


def target_losses(model, batch: dict) -> torch.Tensor:
    """[B, T] nats of each target; 0 where nothing is learned (IGNORE)."""
    return learned(batch).spread(learned_losses(model, batch))


class Objective(kind.Objective):
    def __init__(self, sp, token_bytes: np.ndarray):
        self.token_bytes = token_bytes

    def units(self, batch: dict) -> int:
        return max(1, int((batch["targets"] != IGNORE).sum()))

    def loss(self, model, batch: dict) -> dict:
        return {"loss": learned_losses(model, batch, summed=True)}

    def eval_sums(self, model, batch: dict) -> dict:
        nats = target_losses(model, batch).double().cpu()
        targets = batch["targets"].cpu().numpy()
        learned = targets != IGNORE
        n_bytes = np.where(learned, self.token_bytes[np.where(learned, targets, 0)], 0)
        text = torch.from_numpy(n_bytes > 0)  # the end-of-turn tag is learned, but is no text
        return {"nats": nats.sum().item(), "tokens": int(learned.sum()), "text_nats": nats[text].sum().item(),
                "bytes": int(n_bytes.sum())}

    summarize = staticmethod(summarize_lm)


class Sft(kind.Kind):
    name, formats, Options = "sft", ("chat", "sharegpt", "alpaca", "prompt_response"), Options

    def rows(self, examples, seq_len, options, seed, overlong=None):
        return PackedRows(examples, seq_len, packing=options.packing, overlong=overlong or options.overlong,
                          train_on=options.train_on, seed=seed)

    def preview(self, template, example, options):
        return template.segments(example, options.train_on)

    def objective(self, sp, tokenizer, template, seed):
        return Objective(sp, tokenizer.token_bytes)


KIND = Sft()
