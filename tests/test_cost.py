"""attnlib.cost: the closed forms of chapter 8 against what PyTorch itself counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnlib
from attnlib.cost import attention_flops, attention_score_bytes
from conftest import randn


def _counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "B, H, L, S, E, Ev, causal",
    [
        (1, 1, 32, 32, 8, 8, False),
        (2, 3, 5, 11, 4, 4, False),   # cross-attention, L != S
        (1, 2, 7, 3, 6, 10, False),   # values wider than keys
        (2, 2, 9, 9, 4, 2, True),     # the causal mask changes nothing: every score is computed
        (1, 4, 1, 17, 16, 16, False),  # one decoding step
    ],
)
def test_flops_equal_pytorchs_count(B, H, L, S, E, Ev, causal):
    q = randn(B, H, L, E, seed=1)
    k = randn(B, H, S, E, seed=2)
    v = randn(B, H, S, Ev, seed=3)
    counted = _counted_flops(lambda: attnlib.scaled_dot_product_attention(q, k, v, is_causal=causal))
    assert counted > 0
    assert attention_flops(L, S, E, n_heads=H, batch=B, head_dim_v=Ev) == counted


def test_flops_with_gqa_count_the_query_heads():
    """Repeating KV heads is not arithmetic: each of the 6 query heads does its own products."""
    q = randn(2, 6, 5, 4, seed=4)
    k, v = randn(2, 2, 8, 4, seed=5), randn(2, 2, 8, 4, seed=6)
    counted = _counted_flops(lambda: attnlib.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    assert attention_flops(5, 8, 4, n_heads=6, batch=2) == counted


def test_flops_closed_form_and_defaults():
    assert attention_flops(1024, 1024, 64) == 4 * 1024 * 1024 * 64
    assert attention_flops(10, 20, 8, 3, 2) == 4 * 10 * 20 * 8 * 3 * 2
    assert attention_flops(10, 20, 8, head_dim_v=8) == attention_flops(10, 20, 8)
    assert attention_flops(10, 20, 8, head_dim_v=2) == 2 * 10 * 20 * (8 + 2)
    assert attention_flops(0, 20, 8) == 0
    assert type(attention_flops(3, 4, 5)) is int


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, H, L, S", [(1, 1, 16, 16), (2, 3, 5, 9), (3, 2, 1, 7)])
def test_score_bytes_equal_the_weight_matrix(dtype, B, H, L, S):
    q, k = randn(B, H, L, 4, seed=7, dtype=dtype), randn(B, H, S, 4, seed=8, dtype=dtype)
    weights = attnlib.attention_weights(q, k)  # (B, H, L, S): the matrix being counted
    assert attention_score_bytes(L, S, n_heads=H, batch=B, dtype=dtype) == weights.nbytes


def test_score_bytes_closed_form_and_defaults():
    assert attention_score_bytes(1024, 1024) == 4 * 2**20  # one fp32 matrix at n = 1024: 4 MiB
    assert attention_score_bytes(131072, 131072, 32, 1, torch.bfloat16) == 2 * 32 * 131072**2
    assert attention_score_bytes(8, 0) == 0
    assert attention_score_bytes(3, 5, dtype=torch.int8) == 15
    assert type(attention_score_bytes(3, 5)) is int


@pytest.mark.parametrize(
    "call, error, text",
    [
        (lambda: attention_flops(-1, 4, 8), ValueError, "L must be >= 0"),
        (lambda: attention_flops(4, 4, 0), ValueError, "head_dim must be >= 1"),
        (lambda: attention_flops(4, 4, 8, n_heads=0), ValueError, "n_heads must be >= 1"),
        (lambda: attention_flops(4, 4, 8, head_dim_v=0), ValueError, "head_dim_v must be >= 1"),
        (lambda: attention_flops(4.0, 4, 8), TypeError, "L must be an int"),
        (lambda: attention_flops(4, True, 8), TypeError, "S must be an int"),
        (lambda: attention_score_bytes(4, 4, batch=0), ValueError, "batch must be >= 1"),
        (lambda: attention_score_bytes(4, -2), ValueError, "S must be >= 0"),
        (lambda: attention_score_bytes(4, 4, dtype="float32"), TypeError, "torch.dtype"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, text):
    with pytest.raises(error, match=text):
        call()


def test_docstrings_name_chapter_8():
    for fn in (attention_flops, attention_score_bytes):
        assert "chapter 8" in fn.__doc__
