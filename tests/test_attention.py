"""softmax, attention_weights and scaled_dot_product_attention against PyTorch itself."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlib
from conftest import assert_low_precision_ok, randn

# (batch dims, L, S, E, Ev): L = 1, odd head_dim, L != S both ways, 3-D and 4-D inputs.
SHAPES = [
    ((1, 1), 1, 1, 1, 1),
    ((2, 3), 5, 7, 8, 8),
    ((2, 3), 7, 5, 9, 4),
    ((1, 2), 16, 16, 64, 64),
    ((3, 1), 1, 9, 5, 5),
    ((4,), 6, 8, 3, 7),
    ((2, 2), 13, 1, 6, 6),
]


def qkv(batch, L, S, E, Ev, dtype=torch.float64, seed=0):
    return (randn(*batch, L, E, dtype=dtype, seed=seed), randn(*batch, S, E, dtype=dtype, seed=seed + 1),
            randn(*batch, S, Ev, dtype=dtype, seed=seed + 2))


def masks_for(batch, L, S, seed=0):
    """Masks of every kind the API accepts, each broadcastable to (*batch, L, S)."""
    g = torch.Generator().manual_seed(seed)
    full = (*batch, L, S)
    bool_ls = torch.rand(L, S, generator=g) > 0.4
    bool_full = torch.rand(full, generator=g) > 0.4
    float_ls = torch.randn(L, S, generator=g, dtype=torch.float64)
    float_bcast = torch.randn(*([1] * (len(batch) - 1)), batch[-1], 1, S, generator=g, dtype=torch.float64)
    neg_inf = float_ls.masked_fill(torch.rand(L, S, generator=g) > 0.6, float("-inf"))
    return {"none": None, "bool (L,S)": bool_ls, "bool full": bool_full, "float (L,S)": float_ls,
            "float broadcast": float_bcast, "float with -inf": neg_inf}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool (L,S)", "bool full", "float (L,S)",
                                       "float broadcast", "float with -inf"])
def test_sdpa_matches_torch_float64(shape, mask_kind):
    q, k, v = qkv(*shape)
    mask = masks_for(shape[0], shape[1], shape[2])[mask_kind]
    ours = attnlib.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_mask", [False, True])
def test_is_causal_matches_torch_top_left(shape, with_mask):
    q, k, v = qkv(*shape, seed=3)
    mask = masks_for(shape[0], shape[1], shape[2], seed=3)["bool (L,S)"] if with_mask else None
    ours = attnlib.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    if mask is None:
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # attnlib combines the two; torch accepts both only on some code paths
        combined = mask & torch.ones(shape[1], shape[2], dtype=torch.bool).tril()
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=combined)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_is_causal_alignment_is_top_left():
    # Query i sees keys 0..i whatever S is: with L=2, S=4 the first query sees only key 0.
    q, k, v = qkv((1, 1), 2, 4, 3, 3)
    w = attnlib.attention_weights(q, k, is_causal=True)[0, 0]
    assert (w[0, 1:] == 0).all() and w[0, 0] == 1
    assert (w[1, 2:] == 0).all() and (w[1, :2] > 0).all()


@pytest.mark.parametrize("scale", [0.0, 0.1, 1.0, 3.5])
def test_custom_scale(scale):
    q, k, v = qkv((2, 3), 5, 6, 8, 8, seed=5)
    ours = attnlib.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, scale=scale),
                               rtol=1e-12, atol=1e-12)


def test_default_scale_is_one_over_sqrt_head_dim():
    q, k, v = qkv((1, 1), 4, 4, 16, 16)
    default = attnlib.attention_weights(q, k)
    explicit = attnlib.attention_weights(q, k, scale=1 / math.sqrt(16))
    unscaled = attnlib.attention_weights(q, k, scale=1.0)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert (default - unscaled).abs().max() > 1e-3


@pytest.mark.parametrize("n_heads,n_kv_heads", [(6, 2), (6, 3), (8, 1), (4, 4)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_enable_gqa_matches_torch(n_heads, n_kv_heads, is_causal):
    q = randn(2, n_heads, 5, 8, seed=1)
    k, v = randn(2, n_kv_heads, 7, 8, seed=2), randn(2, n_kv_heads, 7, 8, seed=3)
    ours = attnlib.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_low_precision_by_the_2x_rule(dtype, shape, is_causal):
    q64, k64, v64 = qkv(*shape, seed=7)
    mask = masks_for(shape[0], shape[1], shape[2], seed=7)["bool (L,S)"]
    mask[:, 0] = True  # keep every row alive: no 0/0 question here
    if is_causal:
        mask = mask & attnlib.causal_mask(shape[1], shape[2])
    exact = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask)
    q, k, v = q64.to(dtype), k64.to(dtype), v64.to(dtype)
    ours = attnlib.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_low_precision_ok(ours, theirs, exact)


def test_fully_masked_row_gives_zero_weights_and_output():
    q, k, v = qkv((2, 2), 4, 5, 3, 3)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False  # query 2 may attend to nothing
    w = attnlib.attention_weights(q, k, attn_mask=mask)
    out = attnlib.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (w[..., 2, :] == 0).all() and (out[..., 2, :] == 0).all()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(w[..., [0, 1, 3], :].sum(-1), torch.ones(2, 2, 3, dtype=torch.float64))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    # The same for a float mask that is -inf on the whole row.
    float_mask = torch.zeros(4, 5, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    out_f = attnlib.scaled_dot_product_attention(q, k, v, attn_mask=float_mask)
    torch.testing.assert_close(out_f, out, rtol=0, atol=0)


def test_padding_mask_with_empty_sequence():
    lengths = torch.tensor([3, 0, 5])
    mask = attnlib.padding_mask(lengths, 5)
    q, k, v = qkv((3, 2), 4, 5, 6, 6)
    ours = attnlib.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert (ours[1] == 0).all()


def test_gradients_match_torch():
    q, k, v = qkv((2, 3), 5, 6, 4, 4, seed=11)
    mask = masks_for((2, 3), 5, 6, seed=11)["float (L,S)"]
    grads = []
    for fn in (attnlib.scaled_dot_product_attention, F.scaled_dot_product_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves, attn_mask=mask).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- softmax


def test_softmax_matches_torch_and_survives_large_logits():
    x = randn(4, 9) * 30
    torch.testing.assert_close(attnlib.softmax(x), torch.softmax(x, -1), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(attnlib.softmax(x, dim=0), torch.softmax(x, 0), rtol=1e-13, atol=1e-15)
    big = torch.tensor([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4]], dtype=torch.float32)
    out = attnlib.softmax(big)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    # The naive formula overflows on the same input: the test would catch its use.
    naive = big.exp() / big.exp().sum(-1, keepdim=True)
    assert not torch.isfinite(naive).all()


def test_softmax_all_minus_inf_row_is_zero_and_low_precision_ok():
    x = torch.tensor([[float("-inf")] * 3, [0.0, float("-inf"), 1.0]])
    out = attnlib.softmax(x)
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1], torch.softmax(x[1], -1))
    for dtype in (torch.bfloat16, torch.float16):
        x64 = randn(8, 33) * 5
        ours, theirs = attnlib.softmax(x64.to(dtype)), torch.softmax(x64.to(dtype), -1)
        assert_low_precision_ok(ours, theirs, torch.softmax(x64, -1))


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 12), S=st.integers(1, 12), E=st.integers(1, 9),
       spread=st.floats(0.01, 100.0), seed=st.integers(0, 10_000))
def test_weights_rows_sum_to_one(L, S, E, spread, seed):
    q, k = randn(2, L, E, seed=seed) * spread, randn(2, S, E, seed=seed + 1)
    w = attnlib.attention_weights(q, k)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, L, dtype=torch.float64), rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(L=st.integers(1, 10), E=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_self_attention_is_permutation_equivariant(L, E, seed):
    x = randn(2, 3, L, E, seed=seed)
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(seed))
    out = attnlib.scaled_dot_product_attention(x, x, x)
    out_perm = attnlib.scaled_dot_product_attention(x[..., perm, :], x[..., perm, :], x[..., perm, :])
    torch.testing.assert_close(out_perm, out[..., perm, :], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn_name", ["sdpa", "flash", "mha", "mha_fused"])
def test_future_tokens_cannot_change_earlier_outputs(fn_name):
    """Regression: under is_causal, editing tokens t+1.. leaves outputs 0..t unchanged."""
    torch.manual_seed(0)
    mha = attnlib.MultiHeadAttention(16, 4, fused=fn_name == "mha_fused").double()
    fns = {
        "sdpa": lambda x: attnlib.scaled_dot_product_attention(x, x, x, is_causal=True),
        "flash": lambda x: attnlib.flash_attention(x, x, x, is_causal=True, block_q=3, block_k=2),
        "mha": lambda x: mha(x[:, 0], is_causal=True),
        "mha_fused": lambda x: mha(x[:, 0], is_causal=True),
    }
    fn = fns[fn_name]
    x = randn(2, 1, 11, 16, seed=1)
    base = fn(x)
    for t in (0, 4, 9):
        edited = x.clone()
        edited[..., t + 1:, :] = randn(2, 1, 10 - t, 16, seed=t + 100)
        out = fn(edited)
        torch.testing.assert_close(out[..., : t + 1, :], base[..., : t + 1, :], rtol=0, atol=1e-12)
        assert (out[..., t + 1:, :] - base[..., t + 1:, :]).abs().max() > 1e-3  # the test can fail


def test_dropout():
    q, k, v = qkv((2, 2), 6, 6, 4, 4)
    plain = attnlib.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attnlib.scaled_dot_product_attention(q, k, v, dropout_p=0.0), plain)
    a = attnlib.scaled_dot_product_attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(1))
    b = attnlib.scaled_dot_product_attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(1))
    c = attnlib.scaled_dot_product_attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-6
    # Inverted dropout keeps the expectation: the mean over many draws approaches no dropout.
    g = torch.Generator().manual_seed(3)
    mean = torch.stack([attnlib.scaled_dot_product_attention(q, k, v, dropout_p=0.3, generator=g)
                        for _ in range(2000)]).mean(0)
    assert (mean - plain).abs().max() < 0.1
    assert (mean - plain).abs().mean() < 0.03


@pytest.mark.parametrize("call,exc,words", [
    (lambda q, k, v: attnlib.scaled_dot_product_attention(q.numpy(), k, v), TypeError, "torch.Tensor"),
    (lambda q, k, v: attnlib.scaled_dot_product_attention(q, k[..., :3], v), ValueError, "last dimension"),
    (lambda q, k, v: attnlib.scaled_dot_product_attention(q, k.float(), v), TypeError, "dtype"),
    (lambda q, k, v: attnlib.scaled_dot_product_attention(q, k, v[..., :2, :]), ValueError, "same length"),
    (lambda q, k, v: attnlib.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 3, dtype=torch.bool)),
     ValueError, "does not broadcast"),
    (lambda q, k, v: attnlib.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.int64)),
     TypeError, "bool or floating"),
    (lambda q, k, v: attnlib.scaled_dot_product_attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda q, k, v: attnlib.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True),
     ValueError, "multiple"),
    (lambda q, k, v: attnlib.softmax(torch.ones(3, dtype=torch.int64)), TypeError, "floating-point"),
])
def test_bad_input_is_explained(call, exc, words):
    q, k, v = qkv((2, 3), 5, 6, 4, 4)
    with pytest.raises(exc, match=words):
        call(q, k, v)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("L,S", [(1, 1), (4, 4), (3, 6), (6, 3), (5, 0)])
def test_causal_mask_is_torch_is_causal(L, S):
    q, k, v = qkv((1, 2), L, S, 4, 4)
    if S == 0:
        assert attnlib.causal_mask(L, S).shape == (L, 0)
        return
    with_mask = F.scaled_dot_product_attention(q, k, v, attn_mask=attnlib.causal_mask(L, S))
    torch.testing.assert_close(with_mask, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               rtol=1e-12, atol=1e-12)
    mask = attnlib.causal_mask(L, S)
    assert mask.dtype == torch.bool and mask.shape == (L, S)
    for i in range(L):
        for j in range(S):
            assert bool(mask[i, j]) == (j <= i)
    assert attnlib.causal_mask(L).shape == (L, L)


def test_padding_mask_values_and_errors():
    mask = attnlib.padding_mask(torch.tensor([2, 4, 0]), 4)
    assert mask.shape == (3, 1, 1, 4) and mask.dtype == torch.bool
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask[:, 0, 0], expected)
    with pytest.raises(ValueError, match="between 0 and S"):
        attnlib.padding_mask(torch.tensor([5]), 4)
    with pytest.raises(ValueError, match="integer"):
        attnlib.padding_mask(torch.tensor([1.0]), 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        attnlib.padding_mask([1, 2], 4)


# --------------------------------------------------------------------------- attention_entropy


def test_attention_entropy_matches_torch_entr_and_categorical():
    q, k, _ = qkv((2, 3), 5, 7, 8, 8)
    mask = masks_for((2, 3), 5, 7)["bool full"]
    mask[..., 0] = True  # every row keeps a key; masked keys give exact zeros
    for scale in (None, 1.0, 8.0):  # 8.0: saturated rows with weights that underflow to 0
        p = attnlib.attention_weights(q, k, attn_mask=mask, scale=scale)  # (2, 3, 5, 7)
        ours = attnlib.attention_entropy(p)  # (2, 3, 5)
        assert ours.shape == (2, 3, 5) and ours.dtype == torch.float64
        assert torch.allclose(ours, torch.special.entr(p).sum(-1), atol=1e-13, rtol=0)
        assert torch.allclose(ours, torch.distributions.Categorical(probs=p).entropy(), atol=1e-12, rtol=0)
        assert bool((p == 0).any())
    other_axis = attnlib.attention_weights(q, k).transpose(-2, -1)  # keys on axis -2
    assert torch.allclose(attnlib.attention_entropy(other_axis, dim=-2),
                          torch.special.entr(other_axis).sum(-2), atol=1e-13, rtol=0)


def test_attention_entropy_limits_zeros_and_low_precision():
    S = 16
    uniform = torch.full((3, S), 1.0 / S, dtype=torch.float64)
    assert torch.allclose(attnlib.attention_entropy(uniform), torch.full((3,), math.log(S), dtype=torch.float64))
    one_hot = torch.eye(S, dtype=torch.float64)
    masked_row = torch.zeros(1, S, dtype=torch.float64)  # a fully masked row: all-zero weights
    out = attnlib.attention_entropy(torch.cat([one_hot, masked_row]))
    assert torch.equal(out, torch.zeros(S + 1, dtype=torch.float64))  # 0, never NaN, never -0
    assert not bool(torch.signbit(out).any())
    # the gradient at a zero weight is finite as well (no 0 * inf)
    p = torch.tensor([[0.0, 0.25, 0.75]], dtype=torch.float64, requires_grad=True)
    attnlib.attention_entropy(p).sum().backward()
    assert bool(torch.isfinite(p.grad).all())
    for dtype in (torch.float16, torch.bfloat16):
        w = attnlib.attention_weights(randn(2, 9, 16, seed=3), randn(2, 11, 16, seed=4), scale=0.7)
        exact = torch.special.entr(w).sum(-1)
        ours = attnlib.attention_entropy(w.to(dtype))
        torch_low = torch.special.entr(w.to(dtype).float()).sum(-1).to(dtype)
        assert_low_precision_ok(ours, torch_low, torch.special.entr(w.to(dtype).double()).sum(-1))
        assert (ours.double() - exact).abs().max() < 0.05


def test_attention_entropy_falls_without_the_scale():
    # the chapter's claim in one line: unscaled scores of wide heads give near one-hot rows
    q, k = randn(256, 512, seed=5), randn(64, 512, seed=6)
    scaled = attnlib.attention_entropy(attnlib.attention_weights(q, k)).mean()
    unscaled = attnlib.attention_entropy(attnlib.attention_weights(q, k, scale=1.0)).mean()
    assert scaled > 0.5 * math.log(64) and unscaled < 0.1 * math.log(64)
