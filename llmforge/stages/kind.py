"""What a stage kind is: the one object through which the engine, the plan, run preparation,
`llmforge eval` and recipe/ reach a kind, so none of them names one (torchtitan's TrainSpec, for
stage kinds).

A kind module (pretrain.py, sft.py, ...) builds one `Kind` and `stages/__init__.py` registers it.
Its `Objective`, made per stage from the StagePlan, is what the training loop calls:
  units(batch)            what the step's loss is a mean over (tokens, pairs), for the whole
                          global batch, so micro-batches of unequal content weigh correctly;
  loss(model, batch)      {name: summed tensor}; "loss" is backpropagated, all are logged as means;
  eval_sums(model, batch) summed held-out quantities; summarize(sums) -> the val metrics;
  prepare(...)            work before the first step, on rank 0 (dpo: the reference's log-probs);
  start(...)              every rank, on the starting weights (grpo: a frozen reference copy);
  rollout(...)            each step's batch before its micro-batches (grpo: sampled replies);
  updates                 optimizer steps a step takes on one rollout (grpo's updates_per_rollout).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..core.values import Spec
from ..data.formats import FORMATS
from ..data.rows import PairRows, learned_flags, trim
from ..model.attention import DocLayout
from ..model.kept import Kept
from ..model.transformer import Transformer


class Options(Spec):
    """A kind's own stage keys, with their defaults (a kind without any uses this)."""


class ExampleOptions(Options):
    # An example longer than seq_len+1 tokens is cut to fit, or left out.
    overlong: Literal["truncate", "drop"] = "truncate"


class Objective:
    """The default hooks; a kind's objective overrides units, loss, eval_sums and summarize."""

    def prepare(self, folder: Path, inputs: dict, train: dict, evals: dict, model=None, device=None,
                amp=None) -> None:
        """Before the first step, on the stage's starting weights (model; rank 0 only). With
        model None, what rank 0 prepared is read back (other ranks, `llmforge eval`)."""

    def start(self, model, folder: Path, device) -> None:
        """Every rank, before a checkpoint is loaded: the model holds the stage's starting weights
        (`llmforge eval`: the final ones). folder is the stage's folder."""

    updates = 1

    def rollout(self, model, batch: dict, device, amp, step: int, rank: int, refill=None) -> tuple[dict, dict]:
        """This rank's share of step `step`'s batch -> (the rows the micro-batches are cut from,
        step figures to log). model is the bare module (not DDP's wrapper). refill(need) -> this
        rank's share of the next batch, or None: every rank must call it alike (it agrees whether
        any rank needs more, and draws the same batch on each)."""
        return batch, {}


class Kind:
    """Everything about one stage kind. Row sources follow data/rows.py's protocol."""
    name: str
    formats: tuple[str, ...]  # the data formats it trains on
    Options: type[Options] = Options
    chat: bool = True  # its data is rendered through the chat template
    learns: str = "learned token"  # what an example must keep within seq_len+1 to teach anything
    generates: bool = True  # its model writes text (a reward model scores it)
    fresh: tuple[str, ...] = ()  # weights its model adds to a language model's, new when it starts from one
    unsharded: str = ""  # why it cannot train under FSDP, if it cannot (the plan's error)

    def build_model(self, cfg) -> torch.nn.Module:
        return Transformer(cfg)

    def wrong_format(self, source: str, data_format: str) -> str:
        """Why it cannot train on a source of `data_format` (the recipe loader's and run/resolve.py's
        words): "an sft stage trains on chat, sharegpt or alpaca data; source 'x' is text"."""
        names = self.formats
        either = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else list(names))
        return (f"{'an' if self.name[:1] in 'aeios' else 'a'} {self.name} stage trains on {either} data; "
                f"source {source!r} is {data_format}")

    def sequences(self, options, data_format: str | None = None) -> int:
        """Sequences one row holds (a dpo row is a pair: 2), on data of the stage's format."""
        return 1

    def rows(self, examples, seq_len: int, options, seed: int, overlong: str | None = None):
        """The row source over one split of an example source (`overlong` overrides the
        stage's: held-out examples too long are dropped, never cut); None for a kind whose rows
        are windows of a token stream."""
        return None

    def train_rows(self, source, seq_len: int, options, seed: int):
        return self.rows(source.train, seq_len, options, seed)

    def held_out(self, source, seq_len: int, options, seed: int, tokens: int) -> tuple:
        """(row source, rows to evaluate) of about `tokens` held-out tokens; row source None
        when the second item is the eval batch itself."""
        val = self.rows(source.val, seq_len, options, seed, overlong="drop")
        per_row = self.sequences(options, getattr(source, "format", None))
        return val, min(val.n_rows, max(1, tokens // (per_row * seq_len)))

    def longest(self, examples, options) -> int:
        """Tokens of the longest row one of these examples makes (a sequence; grpo: a prompt
        and its reply's room), for a seq_len derived from the data (0: no examples)."""
        return int(examples.lengths().max()) if len(examples) else 0

    def logit_share(self, source) -> float:
        """The largest share of a row's positions whose logits a step computes (for the memory
        estimate)."""
        return source.logit_share()

    def memory_beside(self, options, cfg, rows: int, seq_len: int, act_bytes: int, weights: float) -> tuple[float, float]:
        """What the stage holds beside training's own memory, for the plan's estimate: (bytes held
        throughout, bytes held while training's activations are not), for `rows` per device of
        seq_len tokens and a model of `weights` bytes (grpo: a frozen reference; its rollout)."""
        return 0.0, 0.0

    def preview(self, template, example, options) -> list | None:
        """One training example as chat-template segments (text, special, learned) for `plan`."""
        return None

    def plan_options(self, spec, recipe):
        """The stage's options as its plan keeps them (grpo: reward model paths made absolute)."""
        return spec.options

    def notes(self, where: str, options) -> list[str]:
        """Lines the plan prints about the stage's options (grpo: which package each plugin comes from)."""
        return []

    def template_problems(self, where: str, options, template) -> list[str]:
        """What its options need of the chat template that it cannot do (grpo: write tool calls)."""
        return []

    def check(self, where: str, index: int, options, recipe, sources: dict, fingerprint: str | None) -> list[str]:
        """Problems only this kind sees, as plan errors naming the key (stage `index` of the
        recipe; sources: name -> SourceStats; fingerprint: the run's tokenizer's, None before
        it exists)."""
        return []

    def objective(self, sp, tokenizer, template, seed: int) -> Objective:
        """The stage's objective (sp: its StagePlan; template: the chat template or None)."""
        raise NotImplementedError


class PairObjective(Objective):
    """Units, held-out sums and summary of an objective over preference pairs."""

    def units(self, batch: dict) -> int:
        return len(batch["chosen"])

    def eval_sums(self, model, batch: dict) -> dict:
        return {k: v.item() for k, v in self.loss(model, batch).items()} | {"pairs": self.units(batch)}

    @staticmethod
    def summarize(sums: dict) -> dict:
        n = sums.get("pairs")
        return {k: v / n for k, v in sums.items() if k != "pairs"} if n else {}


class PairKind(Kind):
    """A kind trained on preference pairs: a row is prompt+chosen and prompt+rejected."""
    formats, Options = ("preference",), ExampleOptions
    learns = "response token (or chosen and rejected equal once cut)"

    def sequences(self, options, data_format=None):
        # A pair is two sequences; unpaired replies (kto) one a row: as many as each example becomes.
        return FORMATS[data_format].per_example if data_format else 2

    def rows(self, examples, seq_len, options, seed, overlong=None):
        return PairRows(examples, seq_len, overlong=overlong or options.overlong, seed=seed)

    def preview(self, template, example, options):
        prompt, chosen, rejected = example
        return template.pair_segments(prompt, chosen) + [("  vs  ", True, False)] \
            + template.pair_segments(prompt, rejected)


def to_device(batch: dict, device) -> dict:
    """A numpy batch as tensors on the device, trimmed to its longest row (data/rows.py trim); to a
    GPU from pinned memory, so the copy overlaps. Packed rows' document ids become the attention
    layout the model takes (model/attention.py), worked out here on the host so the forward never
    waits for the device; so are the positions each row learns (learned, *_learned; sft's targets
    as `learned`), as Kepts (model/kept.py). Object arrays (a prompt's record) stay on the host."""
    batch = trim(batch)
    host = {k: v for k, v in batch.items() if v.dtype == object}
    out = {k: torch.from_numpy(v) for k, v in batch.items() if k != "docs" and k not in host} \
        | {k: Kept.of(v) for k, v in learned_flags(batch).items()}
    if device.type == "cuda":
        out = {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
    if "docs" in batch:
        out["docs"] = DocLayout.from_docs(batch["docs"]).to(device)
    return out | host


def split_rows(n: int, size: int) -> list[np.ndarray]:
    """Row indexes 0..n-1 in chunks of at most `size`."""
    return np.array_split(np.arange(n), max(1, math.ceil(n / size)))
