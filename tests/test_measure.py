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


def test_cpu_seconds():
    from attnlib.measure import cpu_seconds

    assert cpu_seconds(lambda: torch.randn(256, 256) @ torch.randn(256, 256), repeats=3) > 0
    with pytest.raises(ValueError, match="repeats"):
        cpu_seconds(lambda: None, repeats=0)


def test_loglog_slope_recovers_the_exponent():
    from attnlib.measure import loglog_slope

    xs = [128, 256, 512, 1024]
    assert loglog_slope(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0, abs=1e-12)
    assert loglog_slope(xs, [5 * x for x in xs]) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="positive"):
        loglog_slope([1, 2], [0, 1])
    with pytest.raises(ValueError, match="pairs"):
        loglog_slope([1], [1])


def test_matmul_flops_counts_the_fused_kernel_too():
    from attnlib.measure import matmul_flops

    L, S, E = 64, 96, 32
    q, k, v = torch.randn(1, 2, L, E), torch.randn(1, 2, S, E), torch.randn(1, 2, S, E)
    expected = 2 * 2 * (2 * L * S * E)  # two heads, Q K^T and P V, 2 FLOPs per multiply-add
    assert matmul_flops(lambda: attnlib.scaled_dot_product_attention(q, k, v)) == expected
    fused = torch.nn.functional.scaled_dot_product_attention
    assert matmul_flops(lambda: fused(q, k, v)) == expected
    a, b = torch.randn(3, 5, 7), torch.randn(3, 7, 11)
    assert matmul_flops(lambda: torch.empty(3, 5, 11).baddbmm_(a, b)) == 2 * 3 * 5 * 7 * 11
