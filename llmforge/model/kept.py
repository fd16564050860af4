"""The positions of a batch whose logits (or scores) are wanted: its learned targets, a reward
model's last tokens.

`x[mask]` with a boolean mask must learn how many positions are True before it can allocate its
result, which on a GPU means waiting for the device every forward. A Kept carries the positions
as flat indices instead, found on the host where the batch is made (stages/kind.py to_device)
or derived on the device in shapes the host already knows (`at`, `cat`), so gathering by them
never waits."""

from __future__ import annotations

import numpy as np
import torch


class Kept:
    def __init__(self, mask: torch.Tensor, index: torch.Tensor):
        self.mask = mask  # [B, T] bool
        self.index = index  # [N] int64: the True positions of mask.flatten(), in row order

    @staticmethod
    def of(mask: Kept | np.ndarray | torch.Tensor) -> Kept:
        """From a [B, T] bool mask; a device tensor's positions are read back (one sync: for
        evals and callers outside the training step)."""
        if isinstance(mask, Kept):
            return mask
        if isinstance(mask, np.ndarray):
            return Kept(torch.from_numpy(mask), torch.from_numpy(np.flatnonzero(mask)))
        return Kept(mask, mask.flatten().nonzero().squeeze(1))

    @staticmethod
    def at(positions: torch.Tensor, T: int) -> Kept:
        """One position per row: positions [B] in rows of T."""
        rows = torch.arange(len(positions), device=positions.device)
        mask = torch.zeros(len(positions), T, dtype=torch.bool, device=positions.device)
        mask[rows, positions] = True
        return Kept(mask, rows * T + positions)

    @staticmethod
    def last(idx: torch.Tensor) -> Kept:
        """Each row's last position of idx [B, T]: where generation reads its next token's logits
        (the rest of a prompt's would be [B, T, vocab] thrown away: GBs at a long prompt)."""
        return Kept.at(torch.full((idx.shape[0],), idx.shape[1] - 1, device=idx.device), idx.shape[1])

    @staticmethod
    def cat(a: Kept | torch.Tensor, b: Kept | torch.Tensor) -> Kept:
        """b's rows below a's (rows of equal width)."""
        a, b = Kept.of(a), Kept.of(b)
        return Kept(torch.cat([a.mask, b.mask]), torch.cat([a.index, b.index + a.mask.numel()]))

    def to(self, device, non_blocking: bool = False) -> Kept:
        return Kept(self.mask.to(device, non_blocking=non_blocking), self.index.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Kept:
        return Kept(self.mask.pin_memory(), self.index.pin_memory())

    @property
    def rows(self) -> torch.Tensor:
        """[N] the row of each position."""
        return self.index // self.mask.shape[1]

    def counts(self) -> torch.Tensor:
        """[B] positions kept in each row."""
        return self.mask.sum(dim=1)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, ...] -> [N, ...] at the kept positions."""
        return x.flatten(0, 1).index_select(0, self.index)

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """[N] values -> [B, T], 0 where nothing is kept."""
        out = torch.zeros(self.mask.numel(), dtype=values.dtype, device=values.device)
        return out.index_copy(0, self.index, values).view(self.mask.shape)
