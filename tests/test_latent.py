"""Multi-head latent attention and its cache (chapter 12; DeepSeek-V2, section 2.1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attnlib
from attnlib.kv_cache import kv_cache_bytes
from attnlib.latent import MultiHeadLatentAttention, mla_kv_cache_bytes
from conftest import randn


def make(d_model=16, n_heads=4, head_dim=8, kv_rank=6, rope_dim=4, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return MultiHeadLatentAttention(d_model, n_heads, head_dim, kv_rank, rope_dim).to(dtype)


def rotate(x, positions, base=10000.0):
    """RoPE, rotate-half pairs (i, i + D/2), written out: angles, cos and sin in fp32 as
    attnlib.apply_rope and Hugging Face's LLaMA compute them, the rest in x's dtype."""
    half = x.size(-1) // 2
    inv_freq = 1.0 / base ** (torch.arange(0, 2 * half, 2).float() / (2 * half))  # (D/2,)
    angles = positions.float()[:, None] * inv_freq  # (T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # (T, D/2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference(m, x, is_causal, positions=None):
    """The naive path from the module's weights by explicit einsums and PyTorch's attention:
    per-head keys and values rebuilt from the latent; RoPE only on the decoupled slices."""
    H, D, R, Dr, M = m.n_heads, m.head_dim, m.kv_rank, m.rope_dim, m.d_model
    positions = torch.arange(x.size(1)) if positions is None else positions
    c = torch.einsum("btm,rm->btr", x, m.kv_down.weight)  # (B, T, R): the latent
    q = torch.einsum("btm,hdm->bhtd", x, m.q_proj.weight.view(H, D, M))  # (B, H, T, D)
    k = torch.einsum("btr,hdr->bhtd", c, m.k_up.weight.view(H, D, R))  # (B, H, T, D)
    v = torch.einsum("btr,hdr->bhtd", c, m.v_up.weight.view(H, D, R))  # (B, H, T, D)
    if Dr:
        q_r = rotate(torch.einsum("btm,hem->bhte", x, m.q_rope.weight.view(H, Dr, M)), positions)
        k_r = rotate(torch.einsum("btm,em->bte", x, m.k_rope.weight), positions)  # (B, T, Dr)
        q = torch.cat([q, q_r], dim=-1)  # (B, H, T, D + Dr)
        k = torch.cat([k, k_r[:, None].expand(-1, H, -1, -1)], dim=-1)  # (B, H, T, D + Dr)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # scale 1/sqrt(D + Dr)
    return torch.einsum("bhtd,mhd->btm", y, m.o_proj.weight.view(M, H, D))  # (B, T, M)


sizes = dict(
    B=st.integers(1, 2), T=st.integers(1, 6), n_heads=st.integers(1, 3),
    head_dim=st.integers(1, 4), kv_rank=st.integers(1, 6), rope_dim=st.sampled_from([0, 2, 4]),
    d_model=st.integers(1, 8), causal=st.booleans(), seed=st.integers(0, 2**16),
)


# ---------------------------------------------------------------- the two paths, and a reference


@settings(max_examples=40, deadline=None)
@given(**sizes)
def test_absorbed_path_equals_naive_path(B, T, n_heads, head_dim, kv_rank, rope_dim, d_model,
                                         causal, seed):
    m = make(d_model, n_heads, head_dim, kv_rank, rope_dim, seed=seed)
    x = 3 * randn(B, T, d_model, seed=seed)
    naive, absorbed = m(x, is_causal=causal), m(x, is_causal=causal, absorb=True)
    assert absorbed.shape == (B, T, d_model)
    torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(**sizes)
def test_naive_path_equals_explicit_computation(B, T, n_heads, head_dim, kv_rank, rope_dim,
                                                d_model, causal, seed):
    m = make(d_model, n_heads, head_dim, kv_rank, rope_dim, seed=seed)
    x = 3 * randn(B, T, d_model, seed=seed)
    torch.testing.assert_close(m(x, is_causal=causal), reference(m, x, causal), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rope_dim", [0, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_absorbed_equals_naive_in_float32(rope_dim, causal):
    m = make(64, 4, 16, 32, rope_dim, dtype=torch.float32)
    x = randn(2, 12, 64, seed=3, dtype=torch.float32)
    exact = reference(m.double(), x.double(), causal)
    m.float()
    naive, absorbed = m(x, is_causal=causal), m(x, is_causal=causal, absorb=True)
    assert naive.dtype == absorbed.dtype == torch.float32
    torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-5)
    torch.testing.assert_close(naive.double(), exact, rtol=0, atol=1e-5)


def test_absorbed_weights_multiplied_out_give_the_same_scores():
    """The paper's wording, W^UK absorbed into W^Q: per head, the matrix W^UK_h^T W^Q_h maps
    a token straight to a query in latent space, scored against the cached latents."""
    m = make(rope_dim=0)
    x = randn(2, 5, 16, seed=1)
    H, D, R = m.n_heads, m.head_dim, m.kv_rank
    w_q_absorbed = torch.einsum("hdr,hdm->hrm", m.k_up.weight.view(H, D, R),
                                m.q_proj.weight.view(H, D, 16))  # (H, R, d_model)
    c = m.kv_down(x)  # (B, T, R)
    scores_latent = torch.einsum("bim,hrm,bjr->bhij", x, w_q_absorbed, c)  # (B, H, T, T)
    q = m.q_proj(x).view(2, 5, H, D).transpose(1, 2)  # (B, H, T, D)
    k = m.k_up(c).view(2, 5, H, D).transpose(1, 2)  # (B, H, T, D)
    torch.testing.assert_close(scores_latent, q @ k.transpose(-2, -1), rtol=0, atol=1e-12)


def test_absorbed_path_never_builds_per_head_keys_or_values():
    m = make()
    x = randn(2, 5, 16, seed=1)

    def forbidden(_):
        raise AssertionError("k_up / v_up called on the latent")

    expected = m(x)
    m.k_up.forward = m.v_up.forward = forbidden
    torch.testing.assert_close(m(x, absorb=True), expected, rtol=0, atol=1e-10)
    with pytest.raises(AssertionError, match="called on the latent"):
        m(x, absorb=False)  # the naive path does up-project: the patch is live


# ---------------------------------------------------------------- causality and positions


@pytest.mark.parametrize("absorb", [False, True])
def test_future_tokens_do_not_change_earlier_outputs(absorb):
    m = make()
    x = randn(2, 8, 16, seed=1)
    x2 = x.clone()
    x2[:, 5:] = randn(2, 3, 16, seed=2)
    y, y2 = m(x, absorb=absorb), m(x2, absorb=absorb)
    torch.testing.assert_close(y2[:, :5], y[:, :5], rtol=0, atol=1e-12)
    assert (y2[:, 5:] - y[:, 5:]).abs().min() > 1e-6  # the changed tokens did change
    y_full, y2_full = m(x, is_causal=False, absorb=absorb), m(x2, is_causal=False, absorb=absorb)
    assert (y2_full[:, :5] - y_full[:, :5]).abs().min() > 1e-6  # without the mask they leak


@pytest.mark.parametrize("absorb", [False, True])
def test_positions_reach_the_output_only_through_the_decoupled_channels(absorb):
    """With W^QR and W^KR zeroed, positions have no effect at all: neither the latent nor
    the up-projected keys are rotated. With them, positions matter."""
    m = make(rope_dim=4)
    x = randn(2, 6, 16, seed=1)
    far = torch.tensor([3, 40, 7, 1000, 12, 5])
    rotated = m(x, absorb=absorb, positions=far)
    assert (rotated - m(x, absorb=absorb)).abs().max() > 1e-4
    torch.testing.assert_close(rotated, reference(m, x, True, far), rtol=0, atol=1e-12)
    with torch.no_grad():
        m.q_rope.weight.zero_()
        m.k_rope.weight.zero_()
    torch.testing.assert_close(m(x, absorb=absorb, positions=far), m(x, absorb=absorb),
                               rtol=0, atol=1e-12)
    m0 = make(rope_dim=0)
    torch.testing.assert_close(m0(x, absorb=absorb, positions=far), m0(x, absorb=absorb),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("absorb", [False, True])
def test_only_relative_positions_matter(absorb):
    m = make(rope_dim=8)
    x = randn(2, 6, 16, seed=1)
    shifted = m(x, absorb=absorb, positions=torch.arange(6) + 57)
    torch.testing.assert_close(shifted, m(x, absorb=absorb), rtol=0, atol=1e-5)  # fp32 angles


def test_without_rope_the_latent_carries_no_order():
    """rope_dim=0, no mask: permuting the tokens permutes the outputs (chapter 7). The
    decoupled channels are what break this symmetry."""
    x = randn(2, 6, 16, seed=1)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    m0, m4 = make(rope_dim=0), make(rope_dim=4)
    for absorb in (False, True):
        torch.testing.assert_close(m0(x[:, perm], is_causal=False, absorb=absorb),
                                   m0(x, is_causal=False, absorb=absorb)[:, perm], rtol=0, atol=1e-12)
        moved = m4(x[:, perm], is_causal=False, absorb=absorb)
        assert (moved - m4(x, is_causal=False, absorb=absorb)[:, perm]).abs().max() > 1e-4


def test_batched_positions_are_per_row():
    m = make()
    x = randn(2, 5, 16, seed=1)
    pos = torch.tensor([[0, 1, 2, 3, 4], [9, 3, 20, 4, 7]])
    for absorb in (False, True):
        both = m(x, absorb=absorb, positions=pos)
        for b in range(2):
            torch.testing.assert_close(both[b:b + 1], reference(m, x[b:b + 1], True, pos[b]),
                                       rtol=0, atol=1e-12)


# ---------------------------------------------------------------- the cache


def test_latent_cache_is_the_unrotated_latent_and_the_rotated_rope_key():
    m = make(rope_dim=4)
    x = randn(2, 5, 16, seed=1)
    c, k_r = m.latent_cache(x)
    assert c.shape == (2, 5, 6) and k_r.shape == (2, 5, 4)
    torch.testing.assert_close(c, x @ m.kv_down.weight.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(k_r, rotate(x @ m.k_rope.weight.T, torch.arange(5)), rtol=0, atol=1e-14)
    c0, k0 = make(rope_dim=0).latent_cache(x)
    assert c0.shape == (2, 5, 6) and k0.shape == (2, 5, 0)


@pytest.mark.parametrize("absorb", [False, True])
def test_the_cache_is_all_the_past_contributes(absorb):
    """Move the earlier tokens within the null space of W^DKV and W^KR: their cache entries
    stay, so the last token's output stays, though the earlier tokens' own outputs move."""
    m = make(d_model=16, kv_rank=5, rope_dim=4)
    x = randn(2, 6, 16, seed=1)
    w = torch.cat([m.kv_down.weight, m.k_rope.weight]).detach()  # (9, 16)
    null = torch.linalg.svd(w).Vh[9:]  # (7, 16): rows orthogonal to every row of w
    x2 = x.clone()
    x2[:, :-1] += randn(2, 5, 7, seed=2) @ null
    for a, b in zip(m.latent_cache(x), m.latent_cache(x2)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for causal in (True, False):
        y, y2 = m(x, is_causal=causal, absorb=absorb), m(x2, is_causal=causal, absorb=absorb)
        torch.testing.assert_close(y2[:, -1], y[:, -1], rtol=0, atol=1e-12)
        assert (y2[:, :-1] - y[:, :-1]).abs().max() > 1e-3


def test_cache_bytes_hand_worked():
    assert mla_kv_cache_bytes(2, 8, 4, 10, batch=3, dtype=torch.float32) == 2 * 3 * 10 * 12 * 4
    assert mla_kv_cache_bytes(1, 512, 64, 1) == 1152  # fp16 by default
    assert mla_kv_cache_bytes(3, 7, 0, 5, dtype=torch.float64) == 3 * 5 * 7 * 8
    assert mla_kv_cache_bytes(4, 16, 2, 0) == 0
    assert type(mla_kv_cache_bytes(1, 1, 0, 1)) is int


def test_cache_bytes_are_what_latent_cache_returns():
    m = make(rope_dim=4, dtype=torch.bfloat16)
    c, k_r = m.latent_cache(randn(3, 7, 16, seed=1, dtype=torch.bfloat16))
    held = sum(t.numel() * t.element_size() for t in (c, k_r))
    assert mla_kv_cache_bytes(5, m.kv_rank, m.rope_dim, 7, batch=3, dtype=torch.bfloat16) == 5 * held


def test_deepseek_v2_cache_against_mha_and_mqa():
    """DeepSeek-V2 (section 3.1.2): 60 layers, 128 heads of d_h = 128, d_c = 512, d_h^R = 64.
    Table 1: MLA caches (d_c + d_h^R) l = 576 l elements per token, MHA 2 n_h d_h l."""
    mla = mla_kv_cache_bytes(60, 512, 64, 1)
    mha = kv_cache_bytes(60, 128, 128, 1)
    mqa = kv_cache_bytes(60, 1, 128, 1)
    assert mla == 60 * 576 * 2 == 69_120  # bytes per token in fp16: 67.5 KiB
    assert mha == 60 * 32_768 * 2 == 3_932_160  # 3.75 MiB
    assert mla * 32_768 == mha * 576  # 56.9 times less
    assert 4 * mla == 9 * mqa  # as much as GQA with 2.25 groups
    long = mla_kv_cache_bytes(60, 512, 64, 128 * 1024, dtype=torch.bfloat16)
    assert long == 60 * 131_072 * 576 * 2 and long / 2**30 == pytest.approx(8.4375)


# ---------------------------------------------------------------- structure and bad inputs


@pytest.mark.parametrize("rope_dim", [0, 6])
def test_submodule_names_and_shapes(rope_dim):
    m = MultiHeadLatentAttention(32, 4, 8, 10, rope_dim)
    expected = {"q_proj": (32, 32), "kv_down": (10, 32), "k_up": (32, 10), "v_up": (32, 10),
                "o_proj": (32, 32)}
    if rope_dim:
        expected.update(q_rope=(4 * rope_dim, 32), k_rope=(rope_dim, 32))
    assert {n: tuple(c.weight.shape) for n, c in m.named_children()} == expected
    assert all(isinstance(c, nn.Linear) and c.bias is None for c in m.children())
    if not rope_dim:
        assert m.q_rope is None and m.k_rope is None


def test_parameter_count():
    d, H, D, R, Dr = 32, 4, 8, 10, 6
    m = MultiHeadLatentAttention(d, H, D, R, Dr)
    assert sum(p.numel() for p in m.parameters()) == 2 * d * H * D + d * R + 2 * R * H * D + d * H * Dr + d * Dr


@pytest.mark.parametrize("args, error, match", [
    ((16, 4, 8, 0), ValueError, "kv_rank must be >= 1"),
    ((16, 4, 8, 2.5), TypeError, "kv_rank must be an int"),
    ((16, 0, 8, 4), ValueError, "n_heads must be >= 1"),
    ((16, 4, 0, 4), ValueError, "head_dim must be >= 1"),
    ((0, 4, 8, 4), ValueError, "d_model must be >= 1"),
    ((16, 4, 8, 4, 3), ValueError, "rope_dim must be even"),
    ((16, 4, 8, 4, -2), ValueError, "rope_dim must be >= 0"),
    ((16, 4, 8, 4, True), TypeError, "rope_dim must be an int"),
])
def test_bad_constructor_arguments(args, error, match):
    with pytest.raises(error, match=match):
        MultiHeadLatentAttention(*args)


@pytest.mark.parametrize("x, kwargs, error, match", [
    (randn(2, 5, 12), {}, ValueError, r"x must be \(B, T, d_model=16\)"),
    (randn(5, 16), {}, ValueError, "at least 3 dimensions"),
    (randn(1, 2, 5, 16), {}, ValueError, r"x must be \(B, T, d_model=16\)"),
    ([[[0.0] * 16]], {}, TypeError, "x must be a torch.Tensor"),
    (torch.ones(2, 5, 16, dtype=torch.int64), {}, TypeError, "floating-point"),
    (randn(2, 5, 16), {"is_causal": 1}, TypeError, "is_causal must be a bool"),
    (randn(2, 5, 16), {"absorb": "yes"}, TypeError, "absorb must be a bool"),
    (randn(2, 5, 16), {"positions": torch.arange(4)}, ValueError, r"positions must have shape"),
    (randn(2, 5, 16), {"positions": torch.arange(5.0)}, TypeError, "integer tensor"),
])
def test_bad_forward_inputs(x, kwargs, error, match):
    m = make()
    with pytest.raises(error, match=match):
        m(x, **kwargs)
    if "is_causal" not in kwargs and "absorb" not in kwargs:
        with pytest.raises(error, match=match):
            m.latent_cache(x, kwargs.get("positions"))


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((60, 0, 64, 1), {}, ValueError, "kv_rank must be >= 1"),
    ((0, 512, 64, 1), {}, ValueError, "n_layers must be >= 1"),
    ((60, 512, -1, 1), {}, ValueError, "rope_dim must be >= 0"),
    ((60, 512, 64, -1), {}, ValueError, "seq_len must be >= 0"),
    ((60, 512, 64, 1), {"batch": 0}, ValueError, "batch must be >= 1"),
    ((60, 512.0, 64, 1), {}, TypeError, "kv_rank must be an int"),
    ((60, 512, 64, 1), {"dtype": "float16"}, TypeError, "torch.dtype"),
])
def test_bad_cache_bytes_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        mla_kv_cache_bytes(*args, **kwargs)


@pytest.mark.parametrize("rope_dim, causal, T, S", [(0, True, 5, 5), (4, True, 6, 6), (4, False, 1, 7),
                                                    (2, False, 3, 5)])
def test_mla_absorbed_attention_equals_per_head_keys_and_values(rope_dim, causal, T, S):
    g = torch.Generator().manual_seed(7)
    B, H, D, R = 2, 3, 4, 10

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, q_rope, c_kv, k_rope = rnd(B, H, T, D), rnd(B, H, T, rope_dim), rnd(B, S, R), rnd(B, S, rope_dim)
    w_uk, w_uv = rnd(H * D, R), rnd(H * D, R)
    k = (c_kv @ w_uk.T).view(B, S, H, D).transpose(1, 2)  # (B, H, S, D): keys rebuilt
    v = (c_kv @ w_uv.T).view(B, S, H, D).transpose(1, 2)
    k = torch.cat([k, k_rope[:, None].expand(-1, H, -1, -1)], dim=-1)
    expected = F.scaled_dot_product_attention(torch.cat([q, q_rope], -1), k, v, is_causal=causal)
    got = attnlib.mla_absorbed_attention(q, q_rope, c_kv, k_rope, w_uk, w_uv, is_causal=causal)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    scaled = attnlib.mla_absorbed_attention(q, q_rope, c_kv, k_rope, w_uk, w_uv, causal, scale=0.3)
    torch.testing.assert_close(scaled, F.scaled_dot_product_attention(
        torch.cat([q, q_rope], -1), k, v, is_causal=causal, scale=0.3), rtol=0, atol=1e-12)


def test_mla_absorbed_attention_bad_shapes_are_named():
    q, c = torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 5)
    e = torch.zeros(1, 2, 3, 0)
    with pytest.raises(ValueError, match=r"w_uk must be \(n_heads \* head_dim, kv_rank\) = \(8, 5\)"):
        attnlib.mla_absorbed_attention(q, e, c, torch.zeros(1, 3, 0), torch.zeros(5, 8), torch.zeros(8, 5))
    with pytest.raises(ValueError, match="shapes do not fit"):
        attnlib.mla_absorbed_attention(q, e, c, torch.zeros(1, 3, 2), torch.zeros(8, 5), torch.zeros(8, 5))
    with pytest.raises(ValueError, match="c_kv must have 3 dimensions"):
        attnlib.mla_absorbed_attention(q, e, c[None], torch.zeros(1, 3, 0), torch.zeros(8, 5), torch.zeros(8, 5))
