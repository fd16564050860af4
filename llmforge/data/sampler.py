"""The stage's weighted, seeded, resumable sampler of training windows, and the eval windows.

How a batch of B windows (seq_len+1 tokens each) is drawn:
- *How many from each source*: B x weight, rounded by systematic sampling whose offset follows
  the golden-ratio sequence, so each source's realized share of tokens tracks its weight to
  within a few windows over any span of batches (not just on average).
- *Which windows*: each source is cut into non-overlapping windows; every epoch visits all of them
  once in a pseudo-random order (a keyed Feistel permutation, so no index array is ever built)
  with an epoch-specific shift of the window grid. A source repeats only when it runs out.

The state is the batch counter and one window counter per source: a few bytes whatever the
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
    def __init__(self, sources: list[tuple[np.ndarray, float]], seq_len: int, batch_size: int,
                 seed: int, stream: int):
        """sources: (train tokens, weight) pairs; each needs at least seq_len+1 tokens."""
        self.arrays = [a for a, _ in sources]
        weights = np.array([w for _, w in sources], dtype=np.float64)
        self.quota = batch_size * weights / weights.sum()  # expected windows per batch per source
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.stream = seed, stream
        self.batches = 0
        self.drawn = [0] * len(self.arrays)  # windows taken from each source so far
        self._keys: dict = {}

    def counts(self, batch: int) -> np.ndarray:
        """Windows per source in batch `batch`: floor(quota) plus the remainders, spread by
        systematic sampling at offset frac((batch+1) x phi). Sums to batch_size exactly."""
        base = np.floor(self.quota).astype(np.int64)
        frac = self.quota - base
        extra = int(round(frac.sum()))
        if extra:
            points = (batch + 1) * _PHI % 1.0 + np.arange(extra)
            edges = np.concatenate([[0.0], np.cumsum(frac)])
            base += np.histogram(points, bins=edges)[0]
        return base

    def next_batch(self) -> np.ndarray:
        """[batch_size, seq_len + 1] int64 windows, drawn by weight from the sources."""
        rows = []
        for s, n in enumerate(self.counts(self.batches)):
            if n:
                rows.append(self._windows(s, np.arange(self.drawn[s], self.drawn[s] + n)))
                self.drawn[s] += int(n)
        batch = np.concatenate(rows)
        if self.batches % _RELEASE_EVERY == _RELEASE_EVERY - 1:
            release_pages(self.arrays)
        # Mix sources within the batch, so micro-batches (and later ranks) each see the blend.
        order = np.random.Generator(np.random.PCG64([self.seed, self.stream, self.batches])).permutation(len(batch))
        self.batches += 1
        return batch[order]

    def _windows(self, s: int, j: np.ndarray) -> np.ndarray:
        """Windows number j (a running count) of source s."""
        arr, T = self.arrays[s], self.seq_len
        span = len(arr) - (T + 1)  # the last possible start
        n_windows = windows_per_epoch(len(arr), T)
        shift_range = min(T, span - (n_windows - 1) * T + 1)
        out = np.empty((len(j), T + 1), dtype=np.int64)
        epochs = j // n_windows
        for epoch in np.unique(epochs):
            key = self._epoch_key(s, int(epoch))
            mask = epochs == epoch
            idx = permute(j[mask] % n_windows, n_windows, key)
            starts = idx * T + int(key % np.uint64(shift_range))
            out[mask] = arr[starts[:, None] + np.arange(T + 1)]
        return out

    def _epoch_key(self, s: int, epoch: int) -> np.uint64:
        if (s, epoch) not in self._keys:
            self._keys = {(s, epoch): _hash(self.seed, self.stream, s, epoch)}  # only the current one
        return self._keys[(s, epoch)]

    def epochs_drawn(self) -> list[float]:
        """Passes made over each source so far (for reporting)."""
        T = self.seq_len
        return [d / windows_per_epoch(len(a), self.seq_len) for d, a in zip(self.drawn, self.arrays)]

    def state_dict(self) -> dict:
        return {"batches": self.batches, "drawn": list(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])
        self.drawn = [int(x) for x in state.get("drawn", [0] * len(self.arrays))]


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


def _hash(*parts: int) -> np.uint64:
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
