"""The stage's weighted, seeded, resumable sampler of training windows, and the eval windows.

Batch n of a stage is a pure function of (seed, stage index, n): a counter-based design, so the
sampler's whole state is the number of batches drawn. Saving and restoring it is exact, costs a
few bytes whatever the corpus size, and any rank can compute its share of any global batch.
"""

from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, sources: list[tuple[np.ndarray, float]], seq_len: int, batch_size: int,
                 seed: int, stream: int):
        """sources: (train tokens, weight) pairs; windows are seq_len+1 tokens (inputs + shifted targets)."""
        self.arrays = [a for a, _ in sources]
        weights = np.array([w for _, w in sources], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.stream = seed, stream
        self.batches = 0

    def next_batch(self) -> np.ndarray:
        """[batch_size, seq_len + 1] int64 windows drawn by weight from the sources."""
        rng = np.random.Generator(np.random.PCG64([self.seed, self.stream, self.batches]))
        self.batches += 1
        which = rng.choice(len(self.arrays), size=self.batch_size, p=self.probs)
        out = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for i, s in enumerate(which):
            arr = self.arrays[s]
            start = rng.integers(0, len(arr) - self.seq_len)  # high is exclusive: last full window
            out[i] = arr[start:start + self.seq_len + 1]
        return out

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])


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
