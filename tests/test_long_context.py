"""Chapter 12's long-context pieces against independent computations: the attention-sink window
mask against a loop over (i, j) and the course's other masks, logit soft-capping against its
formula, and both (with causal and ALiBi) against PyTorch's FlexAttention, run eagerly on the
CPU (``score_mod`` and ``block_mask``)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attnlib
from attnlib import causal_mask, scaled_dot_product_attention, sink_window_mask, sliding_window_mask, softcap


def _by_loops(L: int, window: int, n_sink: int, S: int) -> torch.Tensor:
    mask = torch.zeros(L, S, dtype=torch.bool)
    for i in range(L):
        for j in range(S):
            mask[i, j] = j <= i and (i - j < window or j < n_sink)
    return mask


@settings(max_examples=60, deadline=None)
@given(L=st.integers(0, 12), S=st.integers(0, 12), window=st.integers(1, 14), n_sink=st.integers(0, 5))
def test_sink_window_mask_is_its_definition(L: int, S: int, window: int, n_sink: int) -> None:
    mask = sink_window_mask(L, window, n_sink, S)
    assert mask.dtype == torch.bool and mask.shape == (L, S)
    assert torch.equal(mask, _by_loops(L, window, n_sink, S))
    assert not (mask & ~causal_mask(L, S)).any()  # never a key in the query's future (top-left)


def test_sink_window_mask_against_the_course_s_other_masks() -> None:
    for L in (1, 5, 9):
        for window in (1, 3, 20):
            # no sinks: Mistral's window of W tokens is a causal band of reach W - 1
            assert torch.equal(sink_window_mask(L, window, 0), sliding_window_mask(L, window - 1, causal=True))
            # a window as long as the sequence: plain causal attention, sinks or not
            assert torch.equal(sink_window_mask(L, max(window, L), 2), causal_mask(L))
    mask = sink_window_mask(8, 3, 2)
    assert mask[7].tolist() == [True, True, False, False, False, True, True, True]  # sinks 0, 1; keys 5..7


def test_sink_window_mask_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError, match="window must be >= 1"):
        sink_window_mask(4, 0, 1)
    with pytest.raises(ValueError, match="n_sink must be >= 0"):
        sink_window_mask(4, 2, -1)
    with pytest.raises(TypeError, match="window must be an int"):
        sink_window_mask(4, 2.0, 1)


def test_softcap_is_cap_tanh_and_bounded() -> None:
    x = torch.linspace(-1e4, 1e4, 101, dtype=torch.float64)
    assert torch.allclose(softcap(x, 50.0), 50.0 * torch.tanh(x / 50.0))
    assert softcap(x, 30).abs().max() <= 30
    small = torch.tensor([0.01, -0.2], dtype=torch.float64)
    assert torch.allclose(softcap(small, 50.0), small, atol=1e-6)  # nearly the identity near 0
    half = softcap(torch.tensor([1000.0], dtype=torch.bfloat16), 50.0)
    assert half.dtype == torch.bfloat16 and half.item() == 50.0
    for bad in (0, -1.0, float("inf"), True, "50"):
        with pytest.raises(ValueError, match="cap must be a positive finite number"):
            softcap(x, bad)
    with pytest.raises(TypeError, match="floating-point"):
        softcap(torch.arange(3), 1.0)


# --------------------------------------------------------------------------- FlexAttention


def _flex(q, k, v, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings():  # eager on the CPU: the unfused reference path, as intended here
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, **kwargs)


def _qkv(L: int = 16, S: int = 16, H: int = 2, D: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(12)
    return tuple(torch.randn(1, H, n, D, generator=g, dtype=torch.float32) for n in (L, S, S))


def test_flex_attention_block_masks_equal_attnlib_s_masks() -> None:
    q, k, v = _qkv()
    L = S = q.size(-2)
    patterns = {
        "causal": (lambda b, h, i, j: i >= j, causal_mask(L)),
        "sink window": (lambda b, h, i, j: (j <= i) & ((i - j < 4) | (j < 2)), sink_window_mask(L, 4, 2)),
    }
    for name, (mask_mod, mask) in patterns.items():
        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=S, device="cpu")
        ours = scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.allclose(_flex(q, k, v, block_mask=block_mask), ours, atol=1e-5), name


def test_flex_attention_score_mods_equal_attnlib_s_biases_and_softcap() -> None:
    q, k, v = _qkv(H=4)
    L = S = q.size(-2)
    slopes = attnlib.alibi_slopes(4)

    def alibi(score, b, h, i, j):
        return score + slopes[h] * (j - i)

    bias = attnlib.alibi_bias(4, L, S).masked_fill(~causal_mask(L, S), float("-inf"))  # (H, L, S)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=bias)
    flex = _flex(q, k, v, score_mod=alibi, block_mask=create_block_mask(
        lambda b, h, i, j: i >= j, B=None, H=None, Q_LEN=L, KV_LEN=S, device="cpu"))
    assert torch.allclose(flex, ours, atol=1e-5)

    def capped(score, b, h, i, j):
        return 5.0 * torch.tanh(score / 5.0)

    big_q = q * 20  # scores in the tens: the cap matters
    scores = softcap(big_q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), 5.0)  # (1, H, L, S)
    ours = torch.softmax(scores, dim=-1) @ v
    assert torch.allclose(_flex(big_q, k, v, score_mod=capped), ours, atol=1e-5)
