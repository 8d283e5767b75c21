"""Sparse patterns (chapter 10): masks against brute-force loops, banded sliding-window
attention against PyTorch's fused attention with the dense mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlib
from attnlib.measure import ShapeRecorder
from attnlib import sparse
from attnlib.sparse import bigbird_mask, longformer_mask, sliding_window_attention, sliding_window_mask
from conftest import assert_low_precision_ok, randn


# ----------------------------------------------------------------------------------------
# Brute-force references: plain Python loops over (i, j), written from the definitions.
# ----------------------------------------------------------------------------------------

def brute_window(L: int, window: int, causal: bool) -> torch.Tensor:
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            if causal:
                m[i, j] = 0 <= i - j <= window
            else:
                m[i, j] = abs(i - j) <= window
    return m


def brute_longformer(L: int, window: int, globals_: list[int]) -> torch.Tensor:
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            m[i, j] = abs(i - j) <= window or i in globals_ or j in globals_
    return m


def brute_bigbird(L, block_size, n_window_blocks, n_global_blocks, n_random_blocks, seed=0):
    """Block pattern by loops; random blocks follow the documented draw: for each
    non-global query block in order, one randperm over its free key blocks (ascending)."""
    nb = -(-L // block_size)
    half = (n_window_blocks - 1) // 2
    allowed = [[abs(a - c) <= half or a < n_global_blocks or c < n_global_blocks
                for c in range(nb)] for a in range(nb)]
    if n_random_blocks > 0:
        gen = torch.Generator().manual_seed(seed)
        for a in range(nb):
            if a < n_global_blocks:
                continue
            free = [c for c in range(nb) if not allowed[a][c]]
            order = torch.randperm(len(free), generator=gen).tolist()
            for pos in order[:n_random_blocks]:
                allowed[a][free[pos]] = True
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            m[i, j] = allowed[i // block_size][j // block_size]
    return m




# ----------------------------------------------------------------------------------------
# sliding_window_mask
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [0, 1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("window", [0, 1, 2, 3, 5, 20])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_mask_matches_loops(L, window, causal):
    m = sliding_window_mask(L, window, causal)
    assert m.dtype == torch.bool and m.shape == (L, L)
    assert torch.equal(m, brute_window(L, window, causal))


@given(L=st.integers(1, 40), window=st.integers(0, 45), causal=st.booleans())
@settings(max_examples=30, deadline=None)
def test_sliding_window_mask_row_counts(L, window, causal):
    m = sliding_window_mask(L, window, causal)
    for i in range(L):
        if causal:
            expected = min(i, window) + 1  # itself and up to `window` keys before it
        else:
            expected = min(i + window, L - 1) - max(i - window, 0) + 1
        assert int(m[i].sum()) == expected
        assert bool(m[i, i])  # every query sees itself


@pytest.mark.parametrize("L,window", [(1, 0), (7, 2), (16, 3), (10, 30)])
def test_sliding_window_mask_symmetry_and_causality(L, window):
    full, causal = sliding_window_mask(L, window), sliding_window_mask(L, window, causal=True)
    assert torch.equal(full, full.T)
    assert not bool((causal & ~torch.ones(L, L, dtype=torch.bool).tril()).any())  # no future key
    assert torch.equal(causal, full & torch.ones(L, L, dtype=torch.bool).tril())


def test_sliding_window_mask_conventions():
    # window >= L - 1: everything (or the whole causal triangle).
    assert bool(sliding_window_mask(6, 5).all())
    assert torch.equal(sliding_window_mask(6, 9, causal=True), attnlib.causal_mask(6))
    # window 0: only the diagonal.
    assert torch.equal(sliding_window_mask(5, 0), torch.eye(5, dtype=torch.bool))
    # Mistral-style "W tokens including itself" is reach W - 1.
    W = 4
    counts = sliding_window_mask(12, W - 1, causal=True).sum(dim=1)
    assert counts[W - 1:].tolist() == [W] * (12 - W + 1)
    # Longformer total width w (w/2 each side) is reach w // 2: 2 * (w // 2) + 1 keys mid-sequence.
    w = 6
    assert int(sliding_window_mask(20, w // 2)[10].sum()) == w + 1


@pytest.mark.parametrize("bad,exc", [
    (dict(L=-1, window=2), ValueError),
    (dict(L=4, window=-1), ValueError),
    (dict(L=4.0, window=1), TypeError),
    (dict(L=4, window=1.5), TypeError),
    (dict(L=4, window=True), TypeError),
    (dict(L=4, window=1, causal=1), TypeError),
])
def test_sliding_window_mask_bad_input(bad, exc):
    with pytest.raises(exc):
        sliding_window_mask(**bad)


# ----------------------------------------------------------------------------------------
# longformer_mask
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("L,window,globals_", [
    (1, 0, [0]), (6, 1, []), (6, 0, [0]), (9, 1, [0, 8]), (9, 2, [4, 4, 4]),
    (12, 3, [0, 1, 11]), (10, 20, [3]), (15, 2, list(range(15))),
])
def test_longformer_mask_matches_loops(L, window, globals_):
    expected = brute_longformer(L, window, globals_)
    m = longformer_mask(L, window, globals_)
    assert m.dtype == torch.bool and m.shape == (L, L)
    assert torch.equal(m, expected)
    assert torch.equal(longformer_mask(L, window, tuple(globals_)), expected)
    assert torch.equal(longformer_mask(L, window, torch.tensor(globals_, dtype=torch.long)), expected)
    assert torch.equal(m, m.T)  # symmetric
    for g in globals_:  # global rows and columns all True
        assert bool(m[g].all()) and bool(m[:, g].all())


def test_longformer_mask_without_globals_is_the_window():
    assert torch.equal(longformer_mask(11, 2, []), sliding_window_mask(11, 2))
    assert torch.equal(longformer_mask(11, 2, torch.tensor([], dtype=torch.int64)),
                       sliding_window_mask(11, 2))
    # a global token adds exactly its row and column
    m = longformer_mask(11, 2, torch.tensor([5], dtype=torch.int32))
    added = m & ~sliding_window_mask(11, 2)
    rows, cols = added.nonzero().unbind(1)
    assert bool(((rows == 5) | (cols == 5)).all()) and int(added.sum()) == 2 * (11 - 5)


@pytest.mark.parametrize("globals_,exc", [
    ([10], ValueError), ([-1], ValueError), ([0, 3, 10], ValueError),
    ([1.0], TypeError), ([True], TypeError), (torch.tensor([1.0]), TypeError),
    (torch.tensor([[1, 2]]), TypeError), (torch.tensor([True]), TypeError),
    (3, TypeError), ("01", TypeError), (torch.tensor([10]), ValueError),
])
def test_longformer_mask_bad_globals(globals_, exc):
    with pytest.raises(exc):
        longformer_mask(10, 1, globals_)


# ----------------------------------------------------------------------------------------
# bigbird_mask
# ----------------------------------------------------------------------------------------

BIGBIRD_NO_RANDOM = [
    # (L, block_size, n_window_blocks, n_global_blocks)
    (0, 2, 1, 0), (1, 1, 1, 0), (1, 4, 3, 1), (8, 2, 1, 0), (8, 2, 3, 0), (9, 2, 3, 1),
    (10, 3, 3, 1), (13, 4, 5, 0), (16, 4, 3, 2), (11, 4, 1, 1), (12, 5, 3, 9), (20, 3, 7, 0),
]


@pytest.mark.parametrize("L,bs,nw,ng", BIGBIRD_NO_RANDOM)
def test_bigbird_window_and_global_match_loops(L, bs, nw, ng):
    m = bigbird_mask(L, bs, nw, ng, 0)
    assert m.dtype == torch.bool and m.shape == (L, L)
    assert torch.equal(m, brute_bigbird(L, bs, nw, ng, 0))
    assert torch.equal(m, m.T)  # without random blocks the pattern is symmetric
    g = min(ng * bs, L)  # tokens in the global blocks (the last block may be partial)
    assert bool(m[:g].all()) and bool(m[:, :g].all())  # global rows and columns


@pytest.mark.parametrize("L,bs,nw,ng,nr", [
    (12, 2, 1, 0, 1), (12, 2, 3, 1, 2), (17, 3, 1, 1, 1), (30, 4, 3, 1, 2), (24, 2, 3, 2, 3),
    (10, 2, 1, 0, 10), (7, 3, 3, 0, 1),
])
def test_bigbird_random_blocks_match_loops(L, bs, nw, ng, nr):
    m = bigbird_mask(L, bs, nw, ng, nr)
    assert torch.equal(m, brute_bigbird(L, bs, nw, ng, nr, seed=0))  # default = seed 0
    gen = torch.Generator().manual_seed(123)
    assert torch.equal(bigbird_mask(L, bs, nw, ng, nr, generator=gen),
                       brute_bigbird(L, bs, nw, ng, nr, seed=123))


@given(L=st.integers(1, 40), bs=st.integers(1, 6), half=st.integers(0, 2), ng=st.integers(0, 3),
       nr=st.integers(0, 4), seed=st.integers(0, 10_000))
@settings(max_examples=30, deadline=None)
def test_bigbird_block_properties(L, bs, half, ng, nr, seed):
    nw = 2 * half + 1
    m = bigbird_mask(L, bs, nw, ng, nr, generator=torch.Generator().manual_seed(seed))
    base = bigbird_mask(L, bs, nw, ng, 0)
    nb = math.ceil(L / bs)
    assert bool((m | ~base).all())  # window and global blocks are always kept
    g = min(ng, nb) * bs
    assert bool(m[:g].all()) and bool(m[:, :g].all())
    assert torch.equal(m[:g], base[:g])  # global rows get no random blocks (already full)
    # block structure: constant on every (query block, key block) tile
    blocks = m[::bs, ::bs]  # (nb, nb): one token per block
    block_of = torch.arange(L) // bs
    assert torch.equal(m, blocks[block_of[:, None], block_of[None, :]])
    # each non-global query block gains min(nr, free) key blocks
    base_blocks = base[::bs, ::bs]
    for a in range(min(ng, nb), nb):
        free = int((~base_blocks[a]).sum())
        assert int((blocks[a] & ~base_blocks[a]).sum()) == min(nr, free)


def test_bigbird_random_reproducible_and_seed_dependent():
    args = (64, 2, 3, 1, 3)
    a = bigbird_mask(*args, generator=torch.Generator().manual_seed(7))
    b = bigbird_mask(*args, generator=torch.Generator().manual_seed(7))
    c = bigbird_mask(*args, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(bigbird_mask(*args), bigbird_mask(*args))  # default: deterministic
    assert torch.equal(bigbird_mask(*args), bigbird_mask(*args, generator=torch.Generator().manual_seed(0)))
    # the passed generator is consumed: a second call from it draws something else
    gen = torch.Generator().manual_seed(7)
    assert not torch.equal(bigbird_mask(*args, generator=gen), bigbird_mask(*args, generator=gen))


def test_bigbird_random_blocks_are_uniform():
    # 5 blocks, window 1, no globals, one random block: for query block 0 each of the
    # 4 other blocks should be drawn about 1/4 of the time (600 draws: 150 +- ~11).
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(600):
        counts += bigbird_mask(5, 1, 1, 0, 1, generator=gen)[0].float()
    assert counts[0] == 600  # its own block, always
    assert bool(((counts[1:] > 110) & (counts[1:] < 190)).all()), counts.tolist()


@pytest.mark.parametrize("bad,exc", [
    (dict(n_window_blocks=2), ValueError), (dict(n_window_blocks=4), ValueError),
    (dict(n_window_blocks=0), ValueError), (dict(block_size=0), ValueError),
    (dict(L=-3), ValueError), (dict(n_global_blocks=-1), ValueError),
    (dict(n_random_blocks=-1), ValueError), (dict(block_size=2.0), TypeError),
    (dict(n_random_blocks=1.0), TypeError), (dict(generator=0), TypeError),
])
def test_bigbird_bad_input(bad, exc):
    args = dict(L=16, block_size=2, n_window_blocks=3, n_global_blocks=1, n_random_blocks=1)
    args.update(bad)
    with pytest.raises(exc):
        bigbird_mask(**args)


# ----------------------------------------------------------------------------------------
# sliding_window_attention against torch SDPA with the dense mask
# ----------------------------------------------------------------------------------------

def reference(q, k, v, window, causal):
    mask = sliding_window_mask(q.size(-2), window, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("L", [1, 2, 7, 64, 65, 130, 200])
@pytest.mark.parametrize("window", [0, 1, 5, 64, 1000])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_attention_matches_torch(L, window, causal):
    q, k, v = randn(2, 3, L, 8, seed=L), randn(2, 3, L, 8, seed=L + 1), randn(2, 3, L, 5, seed=L + 2)
    ours = sliding_window_attention(q, k, v, window, causal)
    torch.testing.assert_close(ours, reference(q, k, v, window, causal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [(), (4,), (2, 1, 3)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_attention_batch_dims(batch, causal):
    L = 97
    q, k, v = randn(*batch, L, 16, seed=1), randn(*batch, L, 16, seed=2), randn(*batch, L, 3, seed=3)
    ours = sliding_window_attention(q, k, v, 10, causal)
    assert ours.shape == (*batch, L, 3)
    torch.testing.assert_close(ours, reference(q, k, v, 10, causal), rtol=1e-12, atol=1e-12)


@given(L=st.integers(1, 150), window=st.integers(0, 160), causal=st.booleans(),
       E=st.integers(1, 9), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_sliding_window_attention_property(L, window, causal, E, seed):
    q, k, v = randn(2, L, E, seed=seed), randn(2, L, E, seed=seed + 1), randn(2, L, 4, seed=seed + 2)
    ours = sliding_window_attention(q, k, v, window, causal)
    torch.testing.assert_close(ours, reference(q, k, v, window, causal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [1, 3, 64, 100])
def test_sliding_window_attention_any_block_size(monkeypatch, block):
    # The block size is an implementation detail: every choice gives the same result.
    monkeypatch.setattr(sparse, "BLOCK_SIZE", block)
    q, k, v = randn(2, 77, 6, seed=4), randn(2, 77, 6, seed=5), randn(2, 77, 6, seed=6)
    for window, causal in [(0, False), (4, True), (9, False), (80, True)]:
        torch.testing.assert_close(sliding_window_attention(q, k, v, window, causal),
                                   reference(q, k, v, window, causal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_attention_gradients(causal):
    # L = 70, window 2: the last block is mostly padding rows that see no key at all;
    # they must not leak NaN into the gradients.
    L = 70
    leaves = [randn(2, L, 4, seed=s).requires_grad_() for s in (7, 8, 9)]
    grad_out = randn(2, L, 4, seed=10)
    ours = torch.autograd.grad(sliding_window_attention(*leaves, 2, causal), leaves, grad_out)
    theirs = torch.autograd.grad(reference(*leaves, 2, causal), leaves, grad_out)
    for a, b in zip(ours, theirs):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sliding_window_attention_low_precision(dtype):
    q, k, v = (randn(2, 2, 150, 16, seed=s) for s in (11, 12, 13))
    exact = reference(q, k, v, 20, True)
    ours = sliding_window_attention(q.to(dtype), k.to(dtype), v.to(dtype), 20, True)
    theirs = reference(q.to(dtype), k.to(dtype), v.to(dtype), 20, True)
    assert_low_precision_ok(ours, theirs, exact)


def test_sliding_window_attention_never_builds_L_by_L():
    L, window = 512, 16
    q, k, v = (randn(2, 2, L, 32, seed=s) for s in (1, 2, 3))
    with ShapeRecorder() as banded:
        out = sliding_window_attention(q, k, v, window)
        out_causal = sliding_window_attention(q, k, v, window, causal=True)
    assert banded.quadratic(L) == []
    # the watcher did see the work: the (..., blocks, b, b + 2 * window) scores
    b = sparse.BLOCK_SIZE
    assert any(s == (2, 2, L // b, b, b + 2 * window) for s in banded.shapes)
    # and it does flag the dense computation of the same thing
    with ShapeRecorder() as dense:
        ref = attnlib.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(L, window))
    assert dense.quadratic(L) != []
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_causal, reference(q, k, v, window, True), rtol=1e-12, atol=1e-12)


def test_sliding_window_attention_long_sequence_runs():
    # Smoke test at a length where dense attention would need a 16384^2 score matrix
    # (1 GiB in fp32); the banded version stays small. Compared on a few rows by hand.
    L, window = 16384, 32
    q, k, v = (randn(1, L, 16, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    out = sliding_window_attention(q, k, v, window)
    assert out.shape == (1, L, 16)
    for i in (0, 5000, L - 1):
        lo, hi = max(0, i - window), min(L, i + window + 1)
        w = torch.softmax(q[0, i] @ k[0, lo:hi].T / 4.0, dim=-1)
        torch.testing.assert_close(out[0, i], w @ v[0, lo:hi], rtol=1e-4, atol=1e-5)


def test_sliding_window_attention_bad_input():
    q = randn(2, 8, 4)
    with pytest.raises(ValueError, match="same length"):
        sliding_window_attention(q, randn(2, 9, 4), randn(2, 9, 4), 2)
    with pytest.raises(ValueError):
        sliding_window_attention(q, q, q, -1)
    with pytest.raises(TypeError):
        sliding_window_attention(q, q, q, 2.0)
    with pytest.raises(TypeError):
        sliding_window_attention(q, q, q, 2, causal="yes")
    with pytest.raises(TypeError):
        sliding_window_attention(q.numpy(), q, q, 2)
    with pytest.raises(TypeError):
        sliding_window_attention(q.long(), q.long(), q.long(), 2)
    with pytest.raises(TypeError):
        sliding_window_attention(q, q.float(), q, 2)
    with pytest.raises(ValueError):
        sliding_window_attention(q, randn(2, 8, 5), q, 2)  # E differs
    with pytest.raises(ValueError):
        sliding_window_attention(randn(3, 8, 4), randn(2, 8, 4), randn(2, 8, 4), 2)
    with pytest.raises(ValueError):
        sliding_window_attention(randn(4), randn(4), randn(4), 2)
