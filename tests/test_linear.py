"""Linear attention (chapter 10) against the quadratic form it rewrites, computed naively."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlib import linear
from attnlib.measure import ShapeRecorder
from attnlib.linear import elu_feature_map, linear_attention
from conftest import randn


def naive(q, k, v, causal=False, phi=None):
    """W = phi(Q) phi(K)^T (lower-triangular, top-left aligned, if causal), rows divided
    by their sums (a zero row stays zero), times V: the L x S form, built explicitly."""
    phi = (lambda x: F.elu(x) + 1) if phi is None else phi
    w = phi(q) @ phi(k).transpose(-2, -1)  # (..., L, S)
    if causal:
        w = w * torch.ones(w.shape[-2:], dtype=w.dtype).tril()
    total = w.sum(dim=-1, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total) @ v


def recurrent(q, k, v, phi=None):
    """Causal linear attention as an RNN: one position at a time, state S and normaliser z."""
    phi = (lambda x: F.elu(x) + 1) if phi is None else phi
    fq, fk = phi(q), phi(k)
    state = torch.zeros(*q.shape[:-2], fk.size(-1), v.size(-1), dtype=q.dtype)
    z = torch.zeros(*q.shape[:-2], fk.size(-1), dtype=q.dtype)
    outs = []
    for i in range(q.size(-2)):
        state = state + fk[..., i, :, None] * v[..., i, None, :]  # += phi(k_i) v_i^T
        z = z + fk[..., i, :]
        outs.append((fq[..., i, None, :] @ state)[..., 0, :] / (fq[..., i, :] * z).sum(-1, keepdim=True))
    return torch.stack(outs, dim=-2)




def qkv(batch, L, S, E=6, Ev=5, seed=0, dtype=torch.float64):
    return (randn(*batch, L, E, seed=seed, dtype=dtype), randn(*batch, S, E, seed=seed + 1, dtype=dtype),
            randn(*batch, S, Ev, seed=seed + 2, dtype=dtype))


# ----------------------------------------------------------------------------------------

def test_elu_feature_map():
    x = randn(3, 50) * 5
    torch.testing.assert_close(elu_feature_map(x), F.elu(x) + 1, rtol=1e-12, atol=1e-15)
    assert bool((elu_feature_map(x) > 0).all())
    assert elu_feature_map(torch.tensor([0.0])).item() == 1.0
    assert elu_feature_map(torch.tensor([2.5])).item() == 3.5
    assert elu_feature_map(x.half()).dtype == torch.float16
    # accurate and positive far into the negative side, where F.elu(x) + 1 rounds to 0
    far = torch.tensor([-20.0, -50.0])
    assert bool((F.elu(far) + 1 == 0).all())
    torch.testing.assert_close(elu_feature_map(far), far.exp(), rtol=1e-6, atol=0)
    # and the gradient stays finite where exp(x) of the unused branch would overflow
    big = torch.tensor([100.0, -100.0, 0.5], requires_grad=True)
    (grad,) = torch.autograd.grad(elu_feature_map(big).sum(), big)
    torch.testing.assert_close(grad, torch.tensor([1.0, float(torch.tensor(-100.0).exp()), 1.0]))


@pytest.mark.parametrize("L,S", [(1, 1), (1, 9), (9, 1), (5, 7), (64, 64), (65, 30), (200, 200)])
@pytest.mark.parametrize("batch", [(), (2, 3)], ids=str)
def test_non_causal_matches_naive(L, S, batch):
    q, k, v = qkv(batch, L, S, seed=L + S)
    out = linear_attention(q, k, v)
    assert out.shape == (*batch, L, 5)
    torch.testing.assert_close(out, naive(q, k, v), rtol=1e-12, atol=1e-12)


# L around multiples of the chunk (64): 1, 63, 64, 65, 128, 129, 200.
@pytest.mark.parametrize("L", [1, 2, 63, 64, 65, 128, 129, 200])
@pytest.mark.parametrize("batch", [(), (2, 3)], ids=str)
def test_causal_matches_naive(L, batch):
    q, k, v = qkv(batch, L, L, seed=L)
    out = linear_attention(q, k, v, causal=True)
    assert out.shape == (*batch, L, 5)
    torch.testing.assert_close(out, naive(q, k, v, causal=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 500])
@pytest.mark.parametrize("L", [1, 6, 7, 50])
def test_causal_chunk_boundaries(monkeypatch, chunk, L):
    # The chunk size must not change the result: chunks of 1 (pure recurrence), chunks
    # that do not divide L, and a chunk longer than the whole sequence.
    monkeypatch.setattr(linear, "CHUNK_SIZE", chunk)
    q, k, v = qkv((2,), L, L, seed=chunk)
    out = linear_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, naive(q, k, v, causal=True), rtol=1e-12, atol=1e-12)


def test_causal_matches_recurrent_form():
    q, k, v = qkv((2, 2), 80, 80, seed=9)
    torch.testing.assert_close(linear_attention(q, k, v, causal=True), recurrent(q, k, v),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("L,S", [(10, 4), (4, 10), (70, 66), (66, 70), (3, 0)])
def test_causal_top_left_when_lengths_differ(L, S):
    q, k, v = qkv((2,), L, S, seed=L * S)
    out = linear_attention(q, k, v, causal=True)
    assert out.shape == (2, L, 5)
    torch.testing.assert_close(out, naive(q, k, v, causal=True), rtol=1e-12, atol=1e-12)


def exp_map(x):
    return x.exp()


def relu_map(x):
    return torch.relu(x)


def doubling_map(x):  # E' = 2 E: [relu(x), relu(-x)] + 0.1, positive
    return torch.cat([torch.relu(x), torch.relu(-x)], dim=-1) + 0.1


@pytest.mark.parametrize("phi", [exp_map, relu_map, doubling_map], ids=lambda f: f.__name__)
@pytest.mark.parametrize("causal", [False, True])
def test_custom_feature_map(phi, causal):
    q, k, v = qkv((2, 2), 70, 70, seed=5)
    out = linear_attention(q, k, v, causal=causal, feature_map=phi)
    torch.testing.assert_close(out, naive(q, k, v, causal, phi), rtol=1e-11, atol=1e-12)


def test_exp_feature_map_is_unscaled_softmax_attention():
    # phi(x) = exp(x) per coordinate is not softmax attention, but with E = 1 it is:
    # exp(q) exp(k) = exp(q + k), and softmax over j of (q + k_j) = softmax of k_j.
    q, k, v = qkv((3,), 9, 9, E=1, seed=2)
    out = linear_attention(q, k, v, feature_map=exp_map)
    expected = torch.softmax(k[..., 0], dim=-1)[..., None, :] @ v  # (3, 1, Ev)
    torch.testing.assert_close(out, expected.expand_as(out), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_zero_denominator_gives_zero_not_nan(causal):
    # ReLU features of an all-negative query are zero: no similarity to any key.
    q, k, v = qkv((2,), 6, 6, seed=3)
    q[0, 2] = -q[0, 2].abs() - 0.1
    k[1] = -k[1].abs() - 0.1  # sequence 1: every key has zero features
    out = linear_attention(q, k, v, causal=causal, feature_map=relu_map)
    assert bool(torch.isfinite(out).all())
    assert bool((out[0, 2] == 0).all()) and bool((out[1] == 0).all())
    torch.testing.assert_close(out, naive(q, k, v, causal, relu_map), rtol=1e-12, atol=1e-12)


@given(L=st.integers(1, 140), E=st.integers(1, 8), Ev=st.integers(1, 6), causal=st.booleans(),
       seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_matches_naive_property(L, E, Ev, causal, seed):
    q, k, v = qkv((2,), L, L, E=E, Ev=Ev, seed=seed)
    torch.testing.assert_close(linear_attention(q, k, v, causal=causal), naive(q, k, v, causal),
                               rtol=1e-11, atol=1e-12)


@given(L=st.integers(2, 100), cut=st.integers(0, 99), seed=st.integers(0, 1000))
@settings(max_examples=20, deadline=None)
def test_causal_ignores_the_future(L, cut, seed):
    cut = cut % L
    q, k, v = qkv((2,), L, L, seed=seed)
    k2, v2 = k.clone(), v.clone()
    k2[..., cut + 1:, :] += 3.0
    v2[..., cut + 1:, :] -= 5.0
    a = linear_attention(q, k, v, causal=True)
    b = linear_attention(q, k2, v2, causal=True)
    torch.testing.assert_close(a[..., : cut + 1, :], b[..., : cut + 1, :], rtol=1e-12, atol=1e-12)
    if cut + 1 < L:  # and the future does matter to later positions
        assert not torch.allclose(a[..., cut + 1:, :], b[..., cut + 1:, :])


def test_non_causal_key_permutation_invariance():
    q, k, v = qkv((2,), 30, 40, seed=1)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(linear_attention(q, k, v), linear_attention(q, k[:, perm], v[:, perm]),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_naive(causal):
    leaves = [t.requires_grad_() for t in qkv((2,), 70, 70, E=4, Ev=3, seed=4)]
    g = randn(2, 70, 3, seed=20)
    ours = torch.autograd.grad(linear_attention(*leaves, causal=causal), leaves, g)
    theirs = torch.autograd.grad(naive(*leaves, causal), leaves, g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(dtype, causal):
    q, k, v = qkv((2, 2), 100, 100, E=16, Ev=16, seed=8)
    exact = naive(q, k, v, causal)
    out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal)
    assert out.dtype == dtype
    # rounding the inputs alone costs ~eps * |x|; the fp32 computation adds little
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    assert (out.double() - exact).abs().max().item() < tol


@pytest.mark.parametrize("causal", [False, True])
def test_never_builds_L_by_L(causal):
    L = 512
    q, k, v = qkv((2, 2), L, L, E=32, Ev=32, seed=6)
    with ShapeRecorder() as watch:
        out = linear_attention(q, k, v, causal=causal)
    assert watch.quadratic(L) == []
    # no per-position (L, E', Ev) running sum either
    assert not [s for s in watch.shapes if len(s) >= 3 and s[-3] >= L and s[-2:] == (32, 32)]
    # the watcher does flag the naive form
    with ShapeRecorder() as dense:
        ref = naive(q, k, v, causal)
    assert dense.quadratic(L) != []
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_long_sequence_runs():
    L = 16384
    q, k, v = qkv((1,), L, L, E=16, Ev=16, seed=2, dtype=torch.float32)
    out = linear_attention(q, k, v, causal=True)
    assert out.shape == (1, L, 16)
    fq, fk = elu_feature_map(q[0]).double(), elu_feature_map(k[0]).double()
    for i in (0, 777, L - 1):  # spot-check rows against the definition in fp64
        w = fk[: i + 1] @ fq[i]
        torch.testing.assert_close(out[0, i].double(), (w / w.sum()) @ v[0, : i + 1].double(),
                                   rtol=1e-4, atol=1e-4)


def test_bad_input():
    q = randn(2, 8, 4)
    with pytest.raises(TypeError):
        linear_attention(q.numpy(), q, q)
    with pytest.raises(TypeError):
        linear_attention(q.long(), q.long(), q.long())
    with pytest.raises(TypeError):
        linear_attention(q, q.float(), q)
    with pytest.raises(ValueError):
        linear_attention(q, randn(2, 8, 5), q)  # E differs
    with pytest.raises(ValueError):
        linear_attention(q, q, randn(2, 9, 4))  # S differs between key and value
    with pytest.raises(ValueError):
        linear_attention(randn(4), randn(4), randn(4))
    with pytest.raises(TypeError):
        linear_attention(q, q, q, causal=1)
    with pytest.raises(TypeError):
        linear_attention(q, q, q, feature_map="elu")
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, q, q, feature_map=lambda x: x.sum(dim=-2))  # drops an axis
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, q, q, feature_map=lambda x: x.flatten())
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, randn(2, 3, 4), randn(2, 3, 4),
                         feature_map=lambda x: x.exp() if x.size(-2) == 8 else x[..., :2].exp())
