"""attnlib.measure: the peak-memory counter must see allocations, frees and views correctly."""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.measure import peak_memory_bytes, time_call

MiB = 2**20


def test_counts_allocations_and_frees_exactly():
    def churn():
        for _ in range(10):
            x = torch.empty(1024, 1024)  # 4 MiB, replaced every iteration
            y = x + 1  # 4 MiB
        return y

    # At the third allocation of x, the previous x and y are still alive: 12 MiB.
    assert peak_memory_bytes(churn) == 12 * MiB
    assert peak_memory_bytes(lambda: torch.empty(256, 1024)) == MiB


def test_views_of_existing_tensors_are_free():
    x = torch.randn(1024, 1024)
    assert peak_memory_bytes(lambda: x.t()[:10].unsqueeze(0)) == 0
    assert peak_memory_bytes(lambda: x.t().contiguous()) == 4 * MiB


def test_naive_attention_grows_quadratically_and_flash_does_not():
    def naive(L):
        q = torch.randn(1, 1, L, 64)
        return peak_memory_bytes(lambda: attnlib.scaled_dot_product_attention(q, q, q))

    assert naive(1024) >= 4 * MiB  # at least the (L, L) fp32 score matrix
    assert 3.5 < naive(1024) / naive(512) < 4.5


def test_time_call():
    assert time_call(lambda: torch.ones(10).sum(), repeats=3) > 0
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)
