"""Row sources: what one training row is, and how a source is cut into rows (each stage kind,
in stages/, picks its own).

A row source has `n_rows` rows per epoch, `arrays` (memory-mapped files, for page release) and
`rows(idx, key) -> {name: array}` that builds the given rows; the Sampler (sampler.py) decides
which rows go into which batch. Rows are fixed once per source and stage, so an epoch is a
permutation of them and a checkpoint only needs a counter.

- WindowRows (pretrain): non-overlapping seq_len+1 windows of the token stream.
- PackedRows (sft): conversations packed (best fit) into rows of seq_len inputs, each row carrying
  the document id of every token so attention stays inside each conversation; or, with packing
  off, one conversation per row, padded.
- PairRows (dpo, reward, kto): one preference pair per row: prompt+chosen and prompt+rejected,
  padded, with (dpo, kto) the frozen reference model's log-probabilities of each; or, from an
  unpaired source (kto), one prompt+reply per row with its label.
- PromptRows (grpo): one prompt per row, with room after it for the reply, and its reference
  answer.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from .sampler import permute, seed_hash, windows_per_epoch

IGNORE = -1  # target id of a position that is not learned


TRIM_MULTIPLE = 64  # trimmed rows keep a multiple of this many positions: few distinct shapes


def trim(batch: dict, multiple: int = TRIM_MULTIPLE) -> dict:
    """A micro-batch cut after the last position any of its rows learns from (+1, where a reward
    model reads its score), rounded up to `multiple`. Causal attention means a position never
    changes what comes before it, so the cut changes no result, only the work: short replies in
    rows of seq_len no longer pay for seq_len. Rows that say what they learn (`targets`,
    `*learned`) are trimmed, with every array as wide as them (tokens: one wider); windows of a
    token stream (pretrain) learn everywhere and stay whole."""
    masks = list(learned_flags(batch).values())
    if not masks:
        return batch
    T = masks[0].shape[1]
    used = np.flatnonzero(np.logical_or.reduce([m.any(axis=0) for m in masks]))
    width = min(T, -(-(int(used[-1]) + 2 if len(used) else 1) // multiple) * multiple)
    if width == T:
        return batch
    return {k: v[:, :width + v.shape[1] - T] if v.ndim == 2 and v.shape[1] in (T, T + 1) else v
            for k, v in batch.items()}


# Each token array: its columns beyond the targets', and the key of its learned flags.
_SEQUENCES = {"inputs": (0, "learned"), "tokens": (1, "learned"), "chosen": (1, "chosen_learned"),
              "rejected": (1, "rejected_learned"), "reply": (1, "reply_learned")}


def learned_flags(batch: dict) -> dict[str, np.ndarray]:
    """[n, T] bool arrays of the targets each row learns, by key: `*learned`, and sft's targets
    other than IGNORE as `learned`."""
    out = {k: v for k, v in batch.items() if k.endswith("learned")}
    return out | ({"learned": batch["targets"] != IGNORE} if "targets" in batch else {})


def work(batch: dict) -> np.ndarray:
    """What a forward pass over a (trimmed) micro-batch computes, for tokens/s and MFU:
    [real tokens (a row's positions up to its last learned target), positions (rows x width),
    attention (the sum over documents, or rows, of their length squared), logits (learned
    targets, where the output head runs)]. Windows of a token stream learn at every position."""
    out = np.zeros(4, dtype=np.float64)
    learned = learned_flags(batch)
    for key, (extra, flags_key) in _SEQUENCES.items():
        if key not in batch:
            continue
        n, width = batch[key].shape[0], batch[key].shape[1] - extra
        flags = learned.get(flags_key, np.ones((n, width), dtype=bool))
        used = np.where(flags.any(axis=1), width - np.argmax(flags[:, ::-1], axis=1), 0)  # up to the last learned
        if "docs" in batch and key == "inputs":  # packed: each document attends within itself
            lengths = np.concatenate([np.unique(row[:u], return_counts=True)[1] for row, u in zip(batch["docs"], used)])
        else:
            lengths = used
        out += (used.sum(), n * width, (lengths.astype(np.float64) ** 2).sum(), flags.sum())
    return out


class WindowRows:
    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.arrays = [tokens]
        self.n_rows = windows_per_epoch(len(tokens), seq_len)

    def rows(self, idx: np.ndarray, key) -> dict:
        # Each epoch shifts the window grid by a key-chosen offset, so window edges move.
        T = self.seq_len
        span = len(self.tokens) - (T + 1)
        shift_range = min(T, span - (self.n_rows - 1) * T + 1)
        starts = idx * T + int(np.uint64(key) % np.uint64(shift_range))
        return {"tokens": np.asarray(self.tokens[starts[:, None] + np.arange(T + 1)], dtype=np.int64)}


@dataclass
class Examples:
    """One split of a tokenized example source: sequences laid end to end in `tokens`, with a
    `learned` flag per token (assistant content and its end tag) and [n_seq + 1] `offsets`.
    A preference pair is two consecutive sequences (chosen, rejected)."""
    tokens: np.ndarray
    learned: np.ndarray
    offsets: np.ndarray
    per_example: int  # sequences per example: 1 (chat, prompt, unpaired), 2 (preference pair)
    origins: list  # "file:line" of each example, looked up lazily (see cache.py)
    prompts: list | None = None  # prompt sources: each example's {"answer": str or None, "record": dict}
    labels: np.ndarray | None = None  # unpaired sources: [n] bool, True for a good reply

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // self.per_example

    @property
    def answers(self) -> list | None:
        """Prompt sources: each example's reference answer (str or None)."""
        return None if self.prompts is None else [p["answer"] for p in self.prompts]

    def lengths(self) -> np.ndarray:
        """[n, per_example] tokens of each sequence."""
        return np.diff(self.offsets).reshape(-1, self.per_example)

    def first_learned(self) -> np.ndarray:
        """[n, per_example] index of each sequence's first learned token (its length if none)."""
        hits = np.flatnonzero(np.asarray(self.learned[self.offsets[0]:self.offsets[-1]]))
        hits = hits + self.offsets[0]
        at = np.searchsorted(hits, self.offsets[:-1])
        first = np.where(at < len(hits), hits[np.minimum(at, len(hits) - 1)], self.offsets[-1]) - self.offsets[:-1]
        return np.minimum(first, np.diff(self.offsets)).reshape(-1, self.per_example)

    def learned_targets(self, T: int) -> np.ndarray:
        """[n_seq] learned targets of each sequence cut to T+1 tokens (its first token is none)."""
        starts, lengths = self.offsets[:-1], np.diff(self.offsets)
        flags = np.asarray(self.learned[self.offsets[0]:self.offsets[-1]], dtype=np.int64)
        if not len(flags):
            return np.zeros(len(lengths), dtype=np.int64)
        local = np.minimum(starts - self.offsets[0], len(flags) - 1)
        counts = np.where(lengths > 0, np.add.reduceat(flags, local) - flags[local], 0)
        for i in np.flatnonzero(lengths > T + 1).tolist():
            counts[i] = int(flags[local[i] + 1:local[i] + T + 1].sum())
        return counts

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.tokens[a:b], dtype=np.int64), np.asarray(self.learned[a:b], dtype=bool)


@dataclass(frozen=True)
class Layout:
    """Which examples a stage uses and how they fill rows (computed identically by plan and engine)."""
    keep: np.ndarray  # example indexes in row order
    row_starts: np.ndarray  # [n_rows + 1] positions in `keep` where each row begins
    dropped: int  # longer than seq_len+1 tokens, left out (overlong: drop)
    truncated: int  # cut to seq_len+1 tokens (overlong: truncate)
    empty: np.ndarray  # examples that would learn nothing: no learned token within seq_len+1

    @property
    def n_rows(self) -> int:
        return len(self.row_starts) - 1


def layout(ex: Examples, seq_len: int, *, packing: bool, overlong: str, train_on: str, seed: int) -> Layout:
    """Drop or truncate long examples, then pack them (best fit, in a fixed seeded order) into rows
    of seq_len input positions; an example of L tokens takes L-1 (its inputs). Without packing,
    one example per row."""
    T = seq_len
    lengths = ex.lengths()
    first = np.ones_like(lengths) if train_on == "all" else ex.first_learned()
    long = (lengths > T + 1).any(axis=1)
    nothing = (first > T).any(axis=1) | (first >= lengths).any(axis=1)
    if ex.per_example == 2:  # a pair cut to seq_len+1 may leave chosen and rejected the same tokens
        for i in np.flatnonzero(long & ~nothing).tolist():
            nothing[i] = np.array_equal(ex.sequence(2 * i)[0][:T + 1], ex.sequence(2 * i + 1)[0][:T + 1])
    empty = np.flatnonzero(nothing)
    usable = ~long if overlong == "drop" else np.ones(len(lengths), dtype=bool)
    if overlong == "drop":
        usable[empty] = False
    order = shuffled(np.flatnonzero(usable), seed)
    if packing and ex.per_example == 1:
        rows = pack_best_fit((np.minimum(lengths[order, 0], T + 1) - 1).tolist(), T)
        order = order[np.array([i for row in rows for i in row], dtype=np.int64)]
        row_starts = np.cumsum([0] + [len(row) for row in rows], dtype=np.int64)
    else:
        row_starts = np.arange(len(order) + 1, dtype=np.int64)
    dropped = int(long.sum()) if overlong == "drop" else 0
    truncated = 0 if overlong == "drop" else int(long.sum())
    if overlong == "drop":
        empty = np.setdiff1d(empty, np.flatnonzero(long))
    return Layout(order, row_starts, dropped, truncated, empty)


def shuffled(order: np.ndarray, seed: int) -> np.ndarray:
    """A fixed seeded shuffle of example indexes, so neighbours in a file are not always packed
    (or batched) together."""
    if len(order) > 1:
        order = order[permute(np.arange(len(order)), len(order), seed_hash(seed, 0x5F7))]
    return order


def pack_best_fit(sizes: list[int], T: int, open_rows: int = 1024) -> list[list[int]]:
    """Rows of at most T positions, as lists of indexes into sizes: each item, in the given order,
    goes into the open row it fills most tightly, else starts a row. Starting a new row whenever the
    next item does not fit leaves about half an item of padding per row (11.7% for 40-80-token
    conversations in 256-token rows); best fit leaves 5.8% there. Only the `open_rows` roomiest
    rows stay open, so packing a million conversations takes a few seconds (3.2 s measured)."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free positions, row), ascending
    for i, size in enumerate(sizes):
        at = bisect.bisect_left(room, (size, -1))
        free, r = room.pop(at) if at < len(room) else (T, len(rows))
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        if free > size:
            bisect.insort(room, (free - size, r))
            if len(room) > open_rows:
                room.pop(0)
    return rows


class PackedRows:
    def __init__(self, ex: Examples, seq_len: int, *, packing: bool, overlong: str, train_on: str, seed: int):
        self.ex, self.seq_len, self.packing, self.train_on = ex, seq_len, packing, train_on
        self.layout = layout(ex, seq_len, packing=packing, overlong=overlong, train_on=train_on, seed=seed)
        self.arrays = [ex.tokens, ex.learned]
        self.n_rows = self.layout.n_rows

    def logit_share(self) -> float:
        """The largest share of a row's positions that are learned targets: the fraction of the
        logits a step computes (plan/estimates.py)."""
        T, lay = self.seq_len, self.layout
        if self.train_on == "all":
            counts = np.minimum(self.ex.lengths()[:, 0], T + 1) - 1
        else:
            counts = self.ex.learned_targets(T)
        if not lay.n_rows:
            return 1.0
        per_row = np.add.reduceat(counts[lay.keep], lay.row_starts[:-1])
        return float(per_row.max()) / T

    def rows(self, idx: np.ndarray, key=None) -> dict:
        """inputs/targets [n, T] (targets IGNORE where nothing is learned, and in padding) and,
        when packing, docs [n, T]: the row's document number of each position (padding: its own)."""
        T, lay = self.seq_len, self.layout
        inputs = np.zeros((len(idx), T), dtype=np.int64)
        targets = np.full((len(idx), T), IGNORE, dtype=np.int64)
        docs = np.zeros((len(idx), T), dtype=np.int64)
        for r, row in enumerate(np.asarray(idx).tolist()):
            fill = 0
            for d, e in enumerate(lay.keep[lay.row_starts[row]:lay.row_starts[row + 1]].tolist()):
                ids, learned = self.ex.sequence(e)
                ids, learned = ids[:T + 1], learned[:T + 1]
                n = len(ids) - 1
                inputs[r, fill:fill + n] = ids[:-1]
                learn = learned[1:] if self.train_on == "assistant" else np.ones(n, dtype=bool)
                targets[r, fill:fill + n] = np.where(learn, ids[1:], IGNORE)
                docs[r, fill:fill + n] = d
                fill += n
            docs[r, fill:] = d + 1  # padding attends only to padding
        out = {"inputs": inputs, "targets": targets}
        return out | {"docs": docs} if self.packing else out


class PairRows:
    def __init__(self, ex: Examples, seq_len: int, *, overlong: str, seed: int):
        self.ex, self.seq_len = ex, seq_len
        self.sides = ("chosen", "rejected") if ex.per_example == 2 else ("reply",)
        self.layout = layout(ex, seq_len, packing=False, overlong=overlong, train_on="assistant", seed=seed)
        self.arrays = [ex.tokens, ex.learned]
        self.n_rows = self.layout.n_rows
        self.reference: np.ndarray | None = None  # [len(ex), sides] log-probs under the frozen reference

    def logit_share(self) -> float:
        """The largest share of a row's sides x T positions that are response tokens."""
        if not self.layout.n_rows:
            return 1.0
        k = len(self.sides)
        counts = self.ex.learned_targets(self.seq_len).reshape(-1, k).sum(axis=1)
        return float(counts[self.layout.keep].max()) / (k * self.seq_len)

    def rows(self, idx: np.ndarray, key=None, with_reference: bool = True) -> dict:
        """chosen/rejected (unpaired: reply) [n, T+1] token rows and *_learned [n, T] target flags,
        plus `reference` [n, sides]: the reference model's summed log-probs of each response, and
        (unpaired) `label` [n], True for a good reply."""
        T, k = self.seq_len, len(self.sides)
        examples = self.layout.keep[np.asarray(idx)]
        out = {}
        for side, name in enumerate(self.sides):
            tokens = np.zeros((len(idx), T + 1), dtype=np.int64)
            learned = np.zeros((len(idx), T), dtype=bool)
            for r, e in enumerate(examples.tolist()):
                ids, flags = self.ex.sequence(k * e + side)
                ids, flags = ids[:T + 1], flags[:T + 1]
                tokens[r, :len(ids)] = ids
                learned[r, :len(ids) - 1] = flags[1:]
            out[name], out[f"{name}_learned"] = tokens, learned
        if with_reference and self.reference is not None:  # dpo's (a reward model has none)
            out["reference"] = self.reference[examples]
        if self.ex.labels is not None:
            out["label"] = self.ex.labels[examples]
        return out


ANSWER_BYTES = 512  # the UTF-8 bytes of a reference answer a prompt row carries


class PromptRows:
    """One prompt per row: its tokens through the tag that opens the reply, left-aligned in
    seq_len positions; prompts that leave fewer than `room` positions for the reply are left out.
    The reference answer travels as UTF-8 bytes (answer_len -1: none), so batches stay arrays;
    the record it came from (for reward plugins and environments) as an object array of dicts."""

    def __init__(self, ex: Examples, seq_len: int, *, room: int, seed: int):
        self.ex, self.seq_len = ex, seq_len
        lengths = ex.lengths()[:, 0]
        fits = lengths + room <= seq_len
        order = shuffled(np.flatnonzero(fits), seed)
        self.layout = Layout(order, np.arange(len(order) + 1, dtype=np.int64), int((~fits).sum()), 0,
                             np.zeros(0, dtype=np.int64))
        self.arrays = [ex.tokens]
        self.n_rows = self.layout.n_rows
        self.room = room

    def logit_share(self) -> float:
        return self.room / self.seq_len  # logits are computed for the reply's positions

    def answers_missing(self) -> int:
        return sum(a is None for a in (self.ex.answers or [None] * len(self.ex)))

    def longest_answer(self) -> int:
        return max((len(a.encode()) for a in self.ex.answers or [] if a is not None), default=0)

    def rows(self, idx: np.ndarray, key=None) -> dict:
        examples = self.layout.keep[np.asarray(idx)]
        prompt = np.zeros((len(idx), self.seq_len), dtype=np.int64)
        lengths = np.zeros(len(idx), dtype=np.int64)
        answer = np.zeros((len(idx), ANSWER_BYTES), dtype=np.uint8)
        answer_len = np.full(len(idx), -1, dtype=np.int64)
        record, messages = np.empty(len(idx), dtype=object), np.empty(len(idx), dtype=object)
        for r, e in enumerate(examples.tolist()):
            ids, _ = self.ex.sequence(e)
            prompt[r, :len(ids)], lengths[r] = ids, len(ids)
            text = self.ex.prompts[e]["answer"] if self.ex.prompts else None
            record[r] = self.ex.prompts[e]["record"] if self.ex.prompts else {}
            messages[r] = self.ex.prompts[e]["messages"] if self.ex.prompts else []
            if text is not None:
                raw = text.encode()[:ANSWER_BYTES]
                answer[r, :len(raw)], answer_len[r] = np.frombuffer(raw, dtype=np.uint8), len(raw)
        return {"prompt": prompt, "prompt_len": lengths, "answer": answer, "answer_len": answer_len, "record": record,
                "messages": messages}
