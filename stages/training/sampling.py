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
