"""The stage's weighted, seeded, resumable sampler of training windows, and the eval windows.

How a batch of B rows is drawn (a row is a seq_len+1 window for pretraining, a packed row of
conversations for sft, a preference pair for dpo; see rows.py):
- *How many from each source*: B x weight, rounded by systematic sampling whose offset follows
  the golden-ratio sequence, so each source's realized share of tokens tracks its weight to
  within a few rows over any span of batches (not just on average).
- *Which rows*: every epoch visits all of a source's rows once in a pseudo-random order (a keyed
  Feistel permutation, so no index array is ever built); the epoch's key also shifts the window
  grid of a token stream. A source repeats only when it runs out.

The state is the batch counter and one row counter per source: a few bytes whatever the
corpus size, exact to save and restore, and enough to compute any batch.
"""

from __future__ import annotations

import functools
import mmap

import numpy as np

_PHI = 0.6180339887498949  # frac of the golden ratio: the most evenly spread offset sequence
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_RELEASE_EVERY = 256  # batches between release_pages() calls


class Sampler:
    def __init__(self, sources: list, batch_size: int, seed: int, stream: int):
        """sources: (row source, weight) pairs (see rows.py), each with at least one row."""
        self.sources = [src for src, _ in sources]
        weights = np.array([w for _, w in sources], dtype=np.float64)
        self.quota = batch_size * weights / weights.sum()  # expected rows per batch per source
        self.batch_size = batch_size
        self.seed, self.stream = seed, stream
        self.batches = 0
        self.drawn = [0] * len(self.sources)  # rows taken from each source so far
        self._keys: dict = {}

    def counts(self, batch: int) -> np.ndarray:
        """Rows per source in batch `batch`: floor(quota) plus the remainders, spread by
        systematic sampling at offset frac((batch+1) x phi). Sums to batch_size exactly."""
        base = np.floor(self.quota).astype(np.int64)
        frac = self.quota - base
        extra = int(round(frac.sum()))
        if extra:
            points = (batch + 1) * _PHI % 1.0 + np.arange(extra)
            edges = np.concatenate([[0.0], np.cumsum(frac)])
            base += np.histogram(points, bins=edges)[0]
        return base

    def next_batch(self) -> dict[str, np.ndarray]:
        """{name: [batch_size, ...] array}: rows drawn by weight from the sources."""
        parts = []
        for s, n in enumerate(self.counts(self.batches)):
            if n:
                parts.append(self._rows(s, np.arange(self.drawn[s], self.drawn[s] + n)))
                self.drawn[s] += int(n)
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if self.batches % _RELEASE_EVERY == _RELEASE_EVERY - 1:
            release_pages([a for src in self.sources for a in src.arrays])
        # Mix sources within the batch, so micro-batches (and later ranks) each see the blend.
        order = np.random.Generator(np.random.PCG64([self.seed, self.stream, self.batches])).permutation(self.batch_size)
        self.batches += 1
        return {k: v[order] for k, v in batch.items()}

    def _rows(self, s: int, j: np.ndarray) -> dict:
        """Rows number j (a running count) of source s: epoch j // n_rows, in that epoch's order."""
        src = self.sources[s]
        epochs = j // src.n_rows
        parts = []
        for epoch in np.unique(epochs):
            key = self._epoch_key(s, int(epoch))
            parts.append(src.rows(permute(j[epochs == epoch] % src.n_rows, src.n_rows, key), key))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _epoch_key(self, s: int, epoch: int) -> np.uint64:
        if (s, epoch) not in self._keys:
            self._keys = {(s, epoch): seed_hash(self.seed, self.stream, s, epoch)}  # only the current one
        return self._keys[(s, epoch)]

    def epochs_drawn(self) -> list[float]:
        """Passes made over each source so far (for reporting)."""
        return [d / src.n_rows for d, src in zip(self.drawn, self.sources)]

    def state_dict(self) -> dict:
        return {"batches": self.batches, "drawn": list(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])
        self.drawn = [int(x) for x in state.get("drawn", [0] * len(self.sources))]


def windows_per_epoch(n_tokens: int, seq_len: int) -> int:
    """Non-overlapping windows of seq_len+1 tokens an epoch visits, leaving room to shift the
    window grid by up to seq_len-1 tokens between epochs."""
    span = n_tokens - (seq_len + 1)
    return max(1, (span + 1 - seq_len) // seq_len + 1) if span >= seq_len - 1 else 1


def release_pages(arrays) -> None:
    """Drop the pages of memory-mapped token files from this process's resident set. They stay in
    the OS page cache (the next read is cheap), but a long run over a corpus larger than memory
    does not look like it holds the corpus."""
    for arr in arrays:
        mapped = getattr(arr, "_mmap", None)
        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)


def seed_hash(*parts: int) -> np.uint64:
    """splitmix64 over the parts: a well-mixed 64-bit key from small integers."""
    h = np.uint64(0x9E3779B97F4A7C15)
    for p in parts:
        h = _mix(h ^ np.uint64(p & 0xFFFFFFFFFFFFFFFF))
    return h


def _mix(x):
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9) & _M64
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB) & _M64
        return x ^ (x >> np.uint64(31))


def permute(i: np.ndarray, n: int, key) -> np.ndarray:
    """A pseudo-random bijection of [0, n), applied to the indexes i, keyed by `key`.

    A 4-round Feistel network on the smallest even number of bits that covers n permutes
    [0, 2^bits); values that land outside [0, n) are sent through again (cycle walking), which
    ends because the walk stays inside a permutation cycle that contains an index below n.
    """
    if n <= 1:
        return np.zeros_like(i)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    keys = _round_keys(int(key))

    def rounds(x):
        left, right = x >> np.uint64(half), x & low
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & low)
        return (left << np.uint64(half)) | right

    x = rounds(np.asarray(i, dtype=np.uint64))
    outside = x >= np.uint64(n)
    while outside.any():
        x[outside] = rounds(x[outside])
        outside = x >= np.uint64(n)
    return x.astype(np.int64)


@functools.lru_cache(maxsize=64)
def _round_keys(key: int) -> list:
    return [_mix(np.uint64(key) + np.uint64(r)) for r in range(4)]


def eval_windows(val: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """Up to max_tokens of non-overlapping held-out windows, spread evenly over the split.

    The same windows at every eval, so val curves compare like with like.
    """
    n_possible = (len(val) - 1) // seq_len
    n = min(n_possible, max(1, max_tokens // seq_len))
    if n_possible <= 0:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    starts = (np.arange(n) * (n_possible // n)) * seq_len
    return np.stack([np.asarray(val[s:s + seq_len + 1], dtype=np.int64) for s in starts])
