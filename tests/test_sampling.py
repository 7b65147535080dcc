"""Deterministic data order and draws: a function of (seed, micro-step) alone."""

from __future__ import annotations

import torch

from stages.training.sampling import batch_indices, generator


def test_every_item_once_per_epoch_and_reproducible():
    n, b = 7, 3
    stream = [i for k in range(7) for i in batch_indices(42, k, b, n)]  # 21 positions = 3 epochs
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n], "epochs are reshuffled"
    assert stream == [i for k in range(7) for i in batch_indices(42, k, b, n)]
    assert stream != [i for k in range(7) for i in batch_indices(43, k, b, n)]


def test_noise_regenerates_bit_identically_out_of_order():
    first = [torch.randn(2, 4, 8, 8, generator=generator("noise", 1, k)) for k in range(5)]
    again = [torch.randn(2, 4, 8, 8, generator=generator("noise", 1, k)) for k in reversed(range(5))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
