"""Tests for attnlib.positional (chapter 7): sinusoidal encodings, RoPE, ALiBi."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlib
from attnlib.positional import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    apply_rope_interleaved,
    rope_permutation,
    sinusoidal_positional_encoding,
)

# ============================================================================ sinusoidal


def _sinusoidal_reference(seq_len: int, d_model: int, base: float) -> np.ndarray:
    """The paper's formula, channel by channel, in float64 numpy."""
    pe = np.zeros((seq_len, d_model), dtype=np.float64)
    for pos in range(seq_len):
        for c in range(d_model):
            angle = pos / base ** ((c - c % 2) / d_model)  # channels 2i and 2i+1 share angle i
            pe[pos, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    return pe


@pytest.mark.parametrize("d_model", [1, 2, 7, 16, 64])
@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_sinusoidal_matches_formula(d_model: int, base: float) -> None:
    pe = sinusoidal_positional_encoding(50, d_model, base=base)
    assert pe.shape == (50, d_model)
    assert pe.dtype == torch.float32
    expected = _sinusoidal_reference(50, d_model, base)
    # float32 rounding of values in [-1, 1] is at most 2**-25 ~ 3e-8
    np.testing.assert_allclose(pe.double().numpy(), expected, rtol=0, atol=1e-7)


def test_sinusoidal_odd_width_ends_with_sin() -> None:
    pe = sinusoidal_positional_encoding(20, 5)
    pos = torch.arange(20, dtype=torch.float64)
    torch.testing.assert_close(pe[:, 4].double(), torch.sin(pos / 10000.0 ** (4 / 5)), rtol=0, atol=1e-7)
    # and the first four channels are those of any width-5 encoding, not of width 4
    assert not torch.allclose(pe[:, :4], sinusoidal_positional_encoding(20, 4))


def _shift_rotation(k: int, d_model: int, base: float) -> torch.Tensor:
    """Block-diagonal M_k with PE[pos + k] = M_k @ PE[pos] (paired channels); built from k alone.

    For the pair (sin a, cos a) with a = pos * w:  sin(a + kw) =  cos(kw) sin a + sin(kw) cos a
                                                   cos(a + kw) = -sin(kw) sin a + cos(kw) cos a
    """
    n = d_model - d_model % 2  # an odd width's last (sin) channel is in no pair: left out
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n // 2):
        kw = k / base ** (2 * i / d_model)
        c, s = math.cos(kw), math.sin(kw)
        m[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    return m


@pytest.mark.parametrize("k", [1, 5, 37, 200])
@pytest.mark.parametrize("d_model", [16, 9])
def test_sinusoidal_offset_is_a_fixed_rotation(k: int, d_model: int) -> None:
    seq_len, base = 300, 10000.0
    pe = sinusoidal_positional_encoding(seq_len + k, d_model, base=base).double()
    even = d_model - d_model % 2  # a lone last sin channel (odd width) is in no pair
    m_k = _shift_rotation(k, d_model, base)
    torch.testing.assert_close(m_k @ m_k.T, torch.eye(even, dtype=torch.float64))  # a rotation
    assert not torch.allclose(m_k, torch.eye(even, dtype=torch.float64), atol=1e-3)
    shifted = pe[:seq_len, :even] @ m_k.T  # row pos: M_k @ PE[pos], the same M_k for every pos
    torch.testing.assert_close(shifted, pe[k:, :even], rtol=0, atol=1e-6)
    # the rotation for another offset does not do it
    wrong = pe[:seq_len, :even] @ _shift_rotation(k + 1, d_model, base).T
    assert (wrong - pe[k:, :even]).abs().max() > 1e-2


def test_sinusoidal_empty_and_errors() -> None:
    assert sinusoidal_positional_encoding(0, 8).shape == (0, 8)
    with pytest.raises(ValueError, match="d_model"):
        sinusoidal_positional_encoding(4, 0)
    with pytest.raises(ValueError, match="seq_len"):
        sinusoidal_positional_encoding(-1, 8)
    with pytest.raises(TypeError, match="seq_len"):
        sinusoidal_positional_encoding(4.0, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base"):
        sinusoidal_positional_encoding(4, 8, base=0.0)
    with pytest.raises(TypeError, match="base"):
        sinusoidal_positional_encoding(4, 8, base="10000")  # type: ignore[arg-type]


# ============================================================================ RoPE


def _hf_rope(q: torch.Tensor, position_ids: torch.Tensor, base: float) -> torch.Tensor:
    """Hugging Face LLaMA: LlamaRotaryEmbedding for cos/sin, then apply_rotary_pos_emb."""
    # transformers is pinned in requirements.txt: a missing install must fail, not skip.
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as llama

    B, H, L, D = q.shape
    config = LlamaConfig(
        hidden_size=H * D,
        num_attention_heads=H,
        num_key_value_heads=H,
        head_dim=D,
        max_position_embeddings=8192,
        rope_theta=base,
    )
    rotary = llama.LlamaRotaryEmbedding(config=config)
    cos, sin = rotary(q, position_ids)  # (B, L, D) each, in q's dtype
    q_embed, k_embed = llama.apply_rotary_pos_emb(q, q.flip(1), cos, sin, unsqueeze_dim=1)
    return q_embed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_rope_matches_hugging_face_llama(dtype: torch.dtype, base: float) -> None:
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 3, 16, 64
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    # per-row positions (B, L) reaching past 4000, as with left padding or a long cache
    position_ids = torch.stack(
        [torch.arange(4090, 4090 + L), torch.randint(0, 8192, (L,), generator=g)]
    )  # (B, L)
    ours = apply_rope(q, position_ids, base=base)
    theirs = _hf_rope(q, position_ids, base)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=1e-5)
    assert torch.equal(ours, theirs)  # same operations in the same order: bit-identical
    # positions shared by the batch, given as (L,)
    shared = torch.arange(4000, 4000 + L)
    torch.testing.assert_close(
        apply_rope(q, shared, base=base), _hf_rope(q, shared[None].expand(B, L), base), rtol=0, atol=0
    )


def _ideal_rope(x: np.ndarray, positions: np.ndarray, base: float, interleaved: bool) -> np.ndarray:
    """RoPE in float64 from its definition: rotate each channel pair by pos * base**(-2i/D)."""
    D = x.shape[-1]
    out = np.empty_like(x)
    for i in range(D // 2):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + D // 2)
        theta = positions * base ** (-2.0 * i / D)  # (L,)
        c, s = np.cos(theta), np.sin(theta)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., a] * s + x[..., b] * c
    return out


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_matches_float64_ideal_at_small_positions(interleaved: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 32, 16, generator=g, dtype=torch.float64)
    fn = apply_rope_interleaved if interleaved else apply_rope
    ours = fn(x)  # positions 0..31
    expected = _ideal_rope(x.numpy(), np.arange(32, dtype=np.float64), 10000.0, interleaved)
    # the angles are fp32 by design: error <~ pos * 2**-23 ~ 4e-6 rad at pos 31, times |x| <~ 5
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=3e-5)
    assert ours.dtype == torch.float64


def test_interleaved_is_rotate_half_up_to_a_channel_permutation() -> None:
    g = torch.Generator().manual_seed(2)
    D = 8
    perm = rope_permutation(D)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]  # evens, then odds
    unperm = torch.argsort(perm)
    x = torch.randn(2, 3, 10, D, generator=g)
    positions = torch.randint(0, 5000, (2, 10), generator=g)
    torch.testing.assert_close(
        apply_rope_interleaved(x, positions), apply_rope(x[..., perm], positions)[..., unperm], rtol=0, atol=0
    )
    # the two layouts really differ without the permutation
    assert not torch.allclose(apply_rope_interleaved(x, positions), apply_rope(x, positions), atol=1e-3)


def test_permuting_weight_rows_converts_a_checkpoint() -> None:
    """Scores of an interleaved model == scores of a rotate-half model with permuted W_q, W_k rows."""
    g = torch.Generator().manual_seed(3)
    H, hd, d, L = 2, 8, 16, 6
    wq, wk = torch.randn(H * hd, d, generator=g), torch.randn(H * hd, d, generator=g)
    tokens = torch.randn(1, L, d, generator=g)
    perm = rope_permutation(hd)

    def scores(w_q: torch.Tensor, w_k: torch.Tensor, rope) -> torch.Tensor:
        q = (tokens @ w_q.T).view(1, L, H, hd).transpose(1, 2)  # (1, H, L, hd)
        k = (tokens @ w_k.T).view(1, L, H, hd).transpose(1, 2)  # (1, H, L, hd)
        return rope(q) @ rope(k).transpose(-2, -1)  # (1, H, L, L)

    def permute_rows(w: torch.Tensor) -> torch.Tensor:
        return w.view(H, hd, d)[:, perm].reshape(H * hd, d)

    torch.testing.assert_close(
        scores(wq, wk, apply_rope_interleaved), scores(permute_rows(wq), permute_rows(wk), apply_rope)
    )
    assert not torch.allclose(scores(wq, wk, apply_rope_interleaved), scores(wq, wk, apply_rope), atol=1e-2)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 512),
    n=st.integers(0, 512),
    shift=st.integers(0, 512),
    half=st.sampled_from([1, 2, 4, 8, 32]),
    interleaved=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rope_score_depends_only_on_relative_position(
    m: int, n: int, shift: int, half: int, interleaved: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 2 * half, generator=g, dtype=torch.float64)  # (L=1, D) each
    fn = apply_rope_interleaved if interleaved else apply_rope

    def score(pq: int, pk: int) -> float:
        return float((fn(q, torch.tensor([pq])) * fn(k, torch.tensor([pk]))).sum())

    # x is float64, but the angles pos * inv_freq and their cos/sin are computed in fp32
    # by design (as Hugging Face does), so the property holds only to fp32 accuracy: an
    # angle at position p is off by up to a few ulps, ~p * 1e-7 rad, and the score by
    # about |q| |k| times that. We allow 1e-7 |q||k| per unit of position (plus a floor
    # of 10 units for the rounding of cos/sin themselves): ~1e-4 |q||k| at the top of the
    # range, over 10x the worst error seen in 9000 random trials, while any dependence
    # on the positions beyond m - n shows up at order |q||k| (next test).
    tol = 1e-7 * (max(m, n) + shift + 10) * float(q.norm() * k.norm())
    assert abs(score(m + shift, n + shift) - score(m, n)) <= tol


def test_rope_relative_property_detects_absolute_dependence() -> None:
    """The property above fails for a function that is not a RoPE: e.g. scaling by position."""
    q, k = torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fake = lambda x, p: apply_rope(x, p) * (1 + p.double()[:, None])  # noqa: E731
    s0 = float((fake(q, torch.tensor([3])) * fake(k, torch.tensor([1]))).sum())
    s1 = float((fake(q, torch.tensor([103])) * fake(k, torch.tensor([101]))).sum())
    tol = 1e-7 * (103 + 10) * float(q.norm() * k.norm())
    assert abs(s1 - s0) > tol


@pytest.mark.parametrize("fn", [apply_rope, apply_rope_interleaved])
def test_rope_preserves_norms(fn) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 64, 32, generator=g)
    positions = torch.randint(0, 10000, (2, 64), generator=g)
    y = fn(x, positions)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # even pair by pair: each pair is rotated, not mixed with the others
    pairs_x = x.view(2, 4, 64, 2, 16) if fn is apply_rope else x.view(2, 4, 64, 16, 2).transpose(-1, -2)
    pairs_y = y.view(2, 4, 64, 2, 16) if fn is apply_rope else y.view(2, 4, 64, 16, 2).transpose(-1, -2)
    torch.testing.assert_close(pairs_y.norm(dim=-2), pairs_x.norm(dim=-2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, x, atol=1e-2)


@pytest.mark.parametrize("fn", [apply_rope, apply_rope_interleaved])
def test_rope_position_zero_is_identity(fn) -> None:
    x = torch.randn(2, 3, 5, 16)
    assert torch.equal(fn(x, torch.zeros(5, dtype=torch.long)), x)
    y = fn(x)  # default positions arange(L): the first token is left alone, the others are not
    assert torch.equal(y[..., 0, :], x[..., 0, :])
    assert not torch.allclose(y[..., 1:, :], x[..., 1:, :], atol=1e-3)


def test_rope_positions_layouts_agree() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 7, 8, generator=g)  # (B, H, L, D)
    assert torch.equal(apply_rope(x), apply_rope(x, torch.arange(7)))
    # (B, L) positions = one (L,) call per batch row, the same for every head
    pos = torch.randint(0, 100, (3, 7), generator=g)
    per_row = torch.stack([apply_rope(x[b], pos[b]) for b in range(3)])
    assert torch.equal(apply_rope(x, pos), per_row)
    # 3-D x (B, L, D) with (B, L) positions
    assert torch.equal(apply_rope(x[:, 0], pos), per_row[:, 0])
    # decoding with a cache: the token at position t is rotated as in the full sequence
    assert torch.equal(apply_rope(x[..., 4:, :], torch.arange(4, 7)), apply_rope(x)[..., 4:, :])
    # whole-number float positions are accepted and mean the same
    assert torch.equal(apply_rope(x, pos.double()), apply_rope(x, pos))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_rope_keeps_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(1, 2, 5, 8).to(dtype)
    y = apply_rope(x, torch.arange(5))
    assert y.dtype == dtype and y.shape == x.shape
    assert apply_rope_interleaved(x).dtype == dtype


def test_rope_errors() -> None:
    x = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="even"):
        apply_rope_interleaved(torch.randn(2, 5, 7))
    with pytest.raises(TypeError, match="floating"):
        apply_rope(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        apply_rope([[1.0, 2.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="whole numbers"):
        apply_rope(x, torch.tensor([0.0, 1.5, 2.0, 3.0, 4.0]))
    with pytest.raises(TypeError, match="integers"):
        apply_rope(x, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=">= 0"):
        apply_rope(x, torch.tensor([-1, 0, 1, 2, 3]))
    with pytest.raises(ValueError, match="L=5"):
        apply_rope(x, torch.arange(6))
    with pytest.raises(ValueError, match="same B"):
        apply_rope(x, torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="same B"):
        apply_rope(torch.randn(5, 8), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="base"):
        apply_rope(x, base=-1.0)
    with pytest.raises(ValueError, match="even"):
        rope_permutation(5)


# ============================================================================ ALiBi


def _paper_slopes(n: int) -> list[float]:
    """The ALiBi paper's recipe, written recursively as in its reference code."""
    if math.log2(n).is_integer():
        first = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))  # = 2**(-8/n)
        return [first * first**i for i in range(n)]
    m = 2 ** math.floor(math.log2(n))
    return _paper_slopes(m) + _paper_slopes(2 * m)[0::2][: n - m]


def test_alibi_slopes_hand_values() -> None:
    torch.testing.assert_close(
        alibi_slopes(8), torch.tensor([1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256])
    )
    # 6 heads: the 4-head slopes 2**-2, -4, -6, -8, then 2**-1, 2**-3 from the 8-head ones
    torch.testing.assert_close(
        alibi_slopes(6), torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])
    )
    # 12 heads: the 8-head slopes, then 2**-0.5, -1.5, -2.5, -3.5 from the 16-head ones
    expected12 = [2.0**-e for e in range(1, 9)] + [2.0**-e for e in (0.5, 1.5, 2.5, 3.5)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected12))
    assert alibi_slopes(1).tolist() == [2.0**-8]


@pytest.mark.parametrize("n", list(range(1, 41)) + [64, 96, 100])
def test_alibi_slopes_follow_the_paper(n: int) -> None:
    s = alibi_slopes(n)
    assert s.shape == (n,) and s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor(_paper_slopes(n), dtype=torch.float32))


@pytest.mark.parametrize("n", [1, 2, 6, 8, 12, 16, 24, 31])
def test_alibi_slopes_monotone(n: int) -> None:
    s = alibi_slopes(n)
    m = 1 << (n.bit_length() - 1)
    assert bool(((s > 0) & (s < 1)).all())
    assert bool((s[1:m] < s[: m - 1]).all())  # the power-of-two part decreases geometrically
    assert bool((s[m + 1 :] < s[m:-1]).all())  # so do the extra, in-between slopes
    assert len(set(s.tolist())) == n  # every head gets its own slope
    if n != m:  # the extra slopes start above the last power-of-two one: not globally sorted
        assert s[m] > s[m - 1]


def test_alibi_bias_hand_case() -> None:
    bias = alibi_bias(2, 3, 4)
    assert bias.shape == (2, 3, 4) and bias.dtype == torch.float32
    distance = torch.tensor([[0, 1, 2, 3], [1, 0, 1, 2], [2, 1, 0, 1]], dtype=torch.float32)
    torch.testing.assert_close(bias[0], -distance / 16)  # 2 heads: slopes 2**-4, 2**-8
    torch.testing.assert_close(bias[1], -distance / 256)
    # causal part: the paper's -m (i - j)
    i, j = 2, 0
    assert bias[0, i, j].item() == -(i - j) / 16


def test_alibi_bias_query_offset() -> None:
    H, L, S = 4, 2, 5
    full = alibi_bias(H, S, S)
    # the last L queries of a sequence of S, as when decoding with a cache
    torch.testing.assert_close(alibi_bias(H, L, S, query_offset=S - L), full[:, S - L :])
    assert not torch.allclose(alibi_bias(H, L, S), full[:, S - L :])
    assert alibi_bias(H, 0, S).shape == (H, 0, S)
    with pytest.raises(TypeError, match="query_offset"):
        alibi_bias(H, L, S, query_offset=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_heads"):
        alibi_bias(0, L, S)
    with pytest.raises(ValueError, match="n_heads"):
        alibi_slopes(0)
    with pytest.raises(TypeError, match="n_heads"):
        alibi_slopes(2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_bias_as_float_mask_in_sdpa(causal: bool) -> None:
    g = torch.Generator().manual_seed(6)
    B, H, L, S, E = 2, 4, 6, 9, 8
    q = torch.randn(B, H, L, E, generator=g)
    k = torch.randn(B, H, S, E, generator=g)
    v = torch.randn(B, H, S, E, generator=g)
    mask = alibi_bias(H, L, S)  # (H, L, S), broadcast over the batch
    if causal:
        mask = mask.masked_fill(~attnlib.causal_mask(L, S), float("-inf"))
    ours = attnlib.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the bias matters
    assert not torch.allclose(ours, attnlib.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-3)
