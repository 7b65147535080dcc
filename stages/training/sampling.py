"""Deterministic data order, timesteps and noise.

Everything random in a training step derives from (seed, micro-step index) alone, never from a
generator's history, so a resumed run draws exactly what an uninterrupted one would, and a later
phase can regenerate an earlier phase's draws bit for bit on the CPU.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache


def derive_seed(*parts) -> int:
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def generator(*parts):
    import torch

    return torch.Generator("cpu").manual_seed(derive_seed(*parts))


@lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    import torch

    return tuple(torch.randperm(n, generator=generator("order", seed, epoch)).tolist())


def batch_indices(seed: int, micro_step: int, batch_size: int, n_items: int) -> list[int]:
    """Items of micro-step k: positions k*B .. k*B+B-1 of an endless stream of per-epoch shuffles."""
    out = []
    for pos in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch, offset = divmod(pos, n_items)
        out.append(_epoch_order(seed, epoch, n_items)[offset])
    return out


@lru_cache(maxsize=8)
def _bucket_epoch(seed: int, epoch: int, groups: tuple[tuple[int, ...], ...], batch_size: int) -> tuple:
    """The batches of one epoch over bucketed items: each bucket's items shuffled and cut into batches (the last
    one filled up with the bucket's first items of the epoch), then the batches of every bucket shuffled."""
    import torch

    batches = []
    for b, members in enumerate(groups):
        order = [members[i] for i in torch.randperm(len(members), generator=generator("order", seed, epoch, b))]
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            batches.append(tuple(batch + [order[i % len(order)] for i in range(batch_size - len(batch))]))
    shuffled = torch.randperm(len(batches), generator=generator("batches", seed, epoch)).tolist()
    return tuple(batches[i] for i in shuffled)


class BatchOrder:
    """Which items each micro-step's slots take, from (seed, micro-step) alone. Without groups the endless stream
    of per-epoch shuffles of batch_indices; with groups (the items of each aspect-ratio bucket) every batch holds
    items of one bucket, a bucket's last batch filled up with its first items of the epoch so that every batch has
    batch_size slots (kohya trains a short batch instead)."""

    def __init__(
        self,
        seed: int,
        batch_size: int,
        n_items: int,
        groups: tuple[tuple[int, ...], ...] | None = None,
        repeats: tuple[int, ...] | None = None,
    ):
        # repeats (data.subsets' num_repeats): item i counts repeats[i] times in every epoch, as kohya's
        # DreamBooth-style data sets do; the order is drawn over those copies
        self.copies = None
        if repeats and any(r != 1 for r in repeats):
            self.copies = tuple(i for i, r in enumerate(repeats) for _ in range(r))
            if groups:
                of = {i: n for n, g in enumerate(groups) for i in g}
                groups = tuple(tuple(c for c, i in enumerate(self.copies) if of[i] == n) for n in range(len(groups)))
            n_items = len(self.copies)
        self.seed, self.batch_size, self.n_items = seed, batch_size, n_items
        self.groups = groups if groups and len(groups) > 1 else None  # one bucket: the plain order
        if self.groups:
            self.per_epoch = sum(-(-len(g) // batch_size) for g in self.groups)

    def batch(self, k: int) -> list[int]:
        if self.groups is None:
            drawn = batch_indices(self.seed, k, self.batch_size, self.n_items)
        else:
            epoch, j = divmod(k, self.per_epoch)
            drawn = list(_bucket_epoch(self.seed, epoch, self.groups, self.batch_size)[j])
        return drawn if self.copies is None else [self.copies[c] for c in drawn]

    def epoch(self, k: int, slot: int) -> int:
        """The epoch (from 1, as kohya counts) of a slot: the pass over the items it belongs to."""
        if self.groups is None:
            return (k * self.batch_size + slot) // self.n_items + 1
        return k // self.per_epoch + 1
