"""flash_attention (chapter 9) against PyTorch itself: forward, lse, gradients, memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlib
from attnlib.measure import ShapeRecorder
from attnlib.flash import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, flash_attention
from conftest import assert_low_precision_ok, randn

# (batch dims, L, S, E, Ev, block_q, block_k)
CASES = [
    ((1, 1), 1, 1, 1, 1, 4, 4),  # L = S = 1
    ((2, 3), 1, 9, 5, 5, 2, 4),  # a single query, ragged key blocks
    ((2, 3), 7, 5, 9, 4, 3, 2),  # L > S, odd head_dim, Ev != E, ragged both ways
    ((2, 3), 5, 13, 8, 8, 2, 5),  # L < S, ragged both ways
    ((1, 2), 16, 16, 64, 64, 4, 8),  # multiples of the blocks
    ((1, 2), 16, 16, 16, 16, 32, 64),  # blocks larger than L and S: a single tile
    ((4,), 11, 17, 3, 7, 4, 3),  # 3-D input (B, L, E)
    ((), 10, 6, 4, 2, 3, 4),  # 2-D input (L, E)
    ((2, 1, 3), 9, 14, 6, 5, 5, 4),  # three leading dims
    ((2, 2), 33, 20, 7, 3, 8, 7),  # many tiles, L > S
]


def qkv(batch, L, S, E, Ev, dtype=torch.float64, seed=0, requires_grad=False):
    q = randn(*batch, L, E, dtype=dtype, seed=seed)
    k = randn(*batch, S, E, dtype=dtype, seed=seed + 1)
    v = randn(*batch, S, Ev, dtype=dtype, seed=seed + 2)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def naive_scores(q, k, is_causal=False, scale=None):
    """Scaled (masked) scores q k^T * scale: (..., L, S). The L x S matrix flash avoids."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale  # (..., L, S)
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    return s


def naive_attention(q, k, v, is_causal=False, scale=None):
    """q @ k^T -> softmax -> @ v, differentiable by plain autograd."""
    return torch.softmax(naive_scores(q, k, is_causal, scale), dim=-1) @ v  # (..., L, Ev)


def case_id(case):
    batch, L, S, E, Ev, bq, bk = case
    return f"b{batch}-L{L}-S{S}-E{E}-Ev{Ev}-blk{bq}x{bk}"


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("is_causal", [False, True])
def test_forward_matches_torch_sdpa_float64(case, is_causal):
    batch, L, S, E, Ev, bq, bk = case
    q, k, v = qkv(batch, L, S, E, Ev)
    ours = flash_attention(q, k, v, is_causal=is_causal, block_q=bq, block_k=bk)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert ours.shape == (*batch, L, Ev) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [0.0, 0.3, 2.5, -1.0])
@pytest.mark.parametrize("is_causal", [False, True])
def test_custom_scale(scale, is_causal):
    q, k, v = qkv((2, 3), 9, 12, 5, 4, seed=4)
    ours = flash_attention(q, k, v, is_causal=is_causal, scale=scale, block_q=4, block_k=5)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("is_causal", [False, True])
def test_default_blocks_with_several_ragged_tiles(is_causal):
    L, S = DEFAULT_BLOCK_Q * 2 + 37, DEFAULT_BLOCK_K + 11  # 3 query blocks, 2 key blocks
    q, k, v = qkv((1, 2), L, S, 8, 8, seed=5)
    ours = flash_attention(q, k, v, is_causal=is_causal)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_large_logits_do_not_overflow():
    # Scores of several hundred: exp would overflow without the running max, and the max
    # keeps growing from tile to tile (keys sorted by norm), so rescaling is exercised.
    q, k, v = qkv((1, 2), 8, 40, 4, 4, seed=6)
    k = k * torch.linspace(1, 60, 40, dtype=torch.float64)[:, None]  # later keys score higher
    ours = flash_attention(q * 10, k, v, block_q=3, block_k=4)
    theirs = F.scaled_dot_product_attention(q * 10, k, v)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_causal_is_top_left_aligned():
    # L=2, S=4: the first query sees only key 0, so its output is exactly value 0.
    q, k, v = qkv((1, 1), 2, 4, 3, 3, seed=8)
    out = flash_attention(q, k, v, is_causal=True, block_q=1, block_k=1)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0], rtol=0, atol=1e-15)
    changed = v.clone()
    changed[..., 2:, :] += 100.0  # keys 2, 3 are never visible to queries 0, 1
    torch.testing.assert_close(flash_attention(q, k, changed, is_causal=True, block_q=1, block_k=3),
                               out, rtol=0, atol=1e-14)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("is_causal", [False, True])
def test_lse_matches_torch_logsumexp(case, is_causal):
    batch, L, S, E, Ev, bq, bk = case
    q, k, v = qkv(batch, L, S, E, Ev, seed=9)
    out, lse = flash_attention(q, k, v, is_causal=is_causal, block_q=bq, block_k=bk,
                               return_lse=True)
    expected = torch.logsumexp(naive_scores(q, k, is_causal), dim=-1)  # (..., L)
    assert lse.shape == (*batch, L) and lse.dtype == torch.float64
    torch.testing.assert_close(lse, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, flash_attention(q, k, v, is_causal=is_causal, block_q=bq,
                                                    block_k=bk), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    L=st.integers(1, 40), S=st.integers(1, 40), E=st.integers(1, 9), Ev=st.integers(1, 9),
    block_q=st.integers(1, 48), block_k=st.integers(1, 48), is_causal=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_property_flash_equals_naive(batch, L, S, E, Ev, block_q, block_k, is_causal, seed):
    q, k, v = qkv(tuple(batch), L, S, E, Ev, seed=seed)
    out, lse = flash_attention(q, k, v, is_causal=is_causal, block_q=block_q, block_k=block_k,
                               return_lse=True)
    scores = naive_scores(q, k, is_causal)
    torch.testing.assert_close(out, naive_attention(q, k, v, is_causal), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [((2, 3), 37, 29, 16, 16), ((1, 4), 64, 100, 32, 8)], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_low_precision_by_the_2x_rule(dtype, shape, is_causal):
    q, k, v = qkv(*shape, dtype=dtype, seed=10)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=is_causal)
    ours, lse = flash_attention(q, k, v, is_causal=is_causal, block_q=16, block_k=8,
                                return_lse=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert_low_precision_ok(ours, theirs, exact)
    # lse is kept in fp32 (fp64 stays fp64); computed in fp32 from the same rounded inputs.
    assert lse.dtype == torch.float32
    exact_lse = torch.logsumexp(naive_scores(q.double(), k.double(), is_causal), dim=-1)
    assert (lse.double() - exact_lse).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype,lse_dtype", [(torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32),
                                             (torch.float64, torch.float64)])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_output_and_lse_dtypes(dtype, lse_dtype, requires_grad):
    q, k, v = qkv((2,), 5, 6, 4, 3, dtype=dtype, requires_grad=requires_grad)
    out, lse = flash_attention(q, k, v, block_q=2, block_k=4, return_lse=True)
    assert out.dtype == dtype and lse.dtype == lse_dtype
    assert out.requires_grad == lse.requires_grad == requires_grad


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("is_causal", [False, True])
def test_rows_without_keys_give_zero_output_and_minus_inf_lse(is_causal):
    q, k, v = qkv((2, 3), 5, 0, 4, 3, requires_grad=True)
    out, lse = flash_attention(q, k, v, is_causal=is_causal, block_q=2, block_k=2,
                               return_lse=True)
    assert out.shape == (2, 3, 5, 3) and lse.shape == (2, 3, 5)
    assert (out == 0).all() and (lse == float("-inf")).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))
    out.sum().backward()
    assert (q.grad == 0).all() and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_no_queries_gives_empty_output():
    q, k, v = qkv((2, 3), 0, 6, 4, 5)
    out, lse = flash_attention(q, k, v, return_lse=True)
    assert out.shape == (2, 3, 0, 5) and lse.shape == (2, 3, 0)


def test_empty_batch():
    q, k, v = qkv((0, 3), 4, 6, 4, 5)
    assert flash_attention(q, k, v, is_causal=True).shape == (0, 3, 4, 5)


# ---------------------------------------------------------------- gradients


GRAD_CASES = [
    ((2, 3), 7, 5, 9, 4, 3, 2),
    ((2, 3), 5, 13, 8, 6, 2, 5),
    ((1, 2), 16, 16, 16, 16, 4, 8),
    ((4,), 11, 17, 3, 7, 4, 3),
    ((2, 2), 33, 20, 7, 3, 8, 7),
    ((1, 1), 1, 1, 2, 2, 4, 4),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
@pytest.mark.parametrize("is_causal", [False, True])
def test_gradients_match_autograd_through_naive(case, is_causal):
    batch, L, S, E, Ev, bq, bk = case
    q, k, v = qkv(batch, L, S, E, Ev, seed=11, requires_grad=True)
    w = randn(*batch, L, Ev, seed=12)  # a random upstream gradient for the output
    w_lse = randn(*batch, L, seed=13)  # ... and for lse

    out, lse = flash_attention(q, k, v, is_causal=is_causal, block_q=bq, block_k=bk,
                               return_lse=True)
    ours = torch.autograd.grad((out * w).sum() + (lse * w_lse).sum(), (q, k, v))
    scores = naive_scores(q, k, is_causal)
    ref_loss = (torch.softmax(scores, -1) @ v * w).sum() + (torch.logsumexp(scores, -1) * w_lse).sum()
    theirs = torch.autograd.grad(ref_loss, (q, k, v))
    for name, a, b in zip("qkv", ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")


def test_gradients_of_output_alone_and_of_one_input():
    q, k, v = qkv((2, 2), 9, 6, 5, 3, seed=14)
    v.requires_grad_(True)  # only value needs a gradient
    out = flash_attention(q, k, v, is_causal=True, block_q=4, block_k=4)
    assert out.grad_fn is not None
    (dv,) = torch.autograd.grad(out.square().sum(), (v,))
    vv = v.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(naive_attention(q, k, vv, True).square().sum(), (vv,))
    torch.testing.assert_close(dv, expected, rtol=1e-10, atol=1e-10)


def test_no_graph_without_requires_grad_or_under_no_grad():
    q, k, v = qkv((1, 2), 6, 6, 4, 4)
    assert flash_attention(q, k, v).grad_fn is None
    q.requires_grad_(True)
    with torch.no_grad():
        assert flash_attention(q, k, v).grad_fn is None
    assert flash_attention(q, k, v).requires_grad


@pytest.mark.parametrize("is_causal", [False, True])
def test_gradcheck_tiny(is_causal):
    q, k, v = qkv((1, 2), 5, 4, 3, 2, seed=15, requires_grad=True)

    def fn(q, k, v):
        out, lse = flash_attention(q, k, v, is_causal=is_causal, block_q=2, block_k=3,
                                   return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_by_the_2x_rule(dtype):
    q, k, v = qkv((1, 2), 24, 40, 16, 16, dtype=dtype, seed=16, requires_grad=True)
    w = randn(1, 2, 24, 16, dtype=dtype, seed=17)
    exact = torch.autograd.grad(
        (F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), is_causal=True)
         * w.double()).sum(), (q, k, v))
    theirs = torch.autograd.grad((F.scaled_dot_product_attention(q, k, v, is_causal=True) * w).sum(),
                                 (q, k, v))
    ours = torch.autograd.grad(
        (flash_attention(q, k, v, is_causal=True, block_q=8, block_k=16) * w).sum(), (q, k, v))
    for a, b, c in zip(ours, theirs, exact):
        assert_low_precision_ok(a, b, c)


# ---------------------------------------------------------------- memory: never L x S




def _forward_backward(fn, L, S, is_causal):
    q, k, v = qkv((1, 2), L, S, 32, 32, dtype=torch.float32, seed=18, requires_grad=True)
    w = randn(1, 2, L, 32, dtype=torch.float32, seed=19)
    watcher = ShapeRecorder()
    with watcher:
        (fn(q, k, v, is_causal) * w).sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    return watcher


@pytest.mark.parametrize("is_causal", [False, True])
def test_flash_never_builds_an_L_by_S_tensor_forward_or_backward(is_causal):
    L = S = 512

    def flash(q, k, v, is_causal):
        return flash_attention(q, k, v, is_causal=is_causal, block_q=64, block_k=64)

    watcher = _forward_backward(flash, L, S, is_causal)
    assert watcher.quadratic(L, S) == []
    assert (1, 2, 512, 32) in watcher.shapes  # the watcher did see the gradients ...
    assert any(s[-2:] == (64, 64) for s in watcher.shapes)  # ... and the score tiles


@pytest.mark.parametrize("is_causal", [False, True])
def test_the_watcher_catches_naive_attention(is_causal):
    L = S = 512
    watcher = _forward_backward(naive_attention, L, S, is_causal)
    assert (1, 2, 512, 512) in watcher.quadratic(L, S)


def test_the_watcher_catches_naive_attention_with_L_different_from_S():
    q, k, v = qkv((1,), 300, 200, 8, 8)
    watcher = ShapeRecorder()
    with watcher:
        flash_attention(q, k, v, block_q=32, block_k=32)
    assert watcher.quadratic(300, 200) == []
    with watcher:
        naive_attention(q, k, v)
    assert (1, 300, 200) in watcher.quadratic(300, 200)


@pytest.mark.parametrize("L,S,bq,bk,tiles", [
    (10, 10, 2, 2, 25),  # non-causal: every tile
    (6, 10, 2, 2, 15),  # non-causal: 3 x 5 tiles
])
def test_non_causal_visits_every_tile(L, S, bq, bk, tiles):
    q, k, v = qkv((1, 1), L, S, 4, 4)
    watcher = ShapeRecorder()
    with watcher:
        flash_attention(q, k, v, block_q=bq, block_k=bk)
    assert watcher.calls.get("bmm", 0) == tiles  # one q @ k^T product per tile


@pytest.mark.parametrize("L,S,bq,bk,tiles", [
    (10, 10, 2, 2, 15),  # 1 + 2 + 3 + 4 + 5 of 25 tiles
    (6, 10, 2, 2, 6),  # query block [4, 6) sees keys 0..5 only: 1 + 2 + 3
    (10, 4, 2, 2, 1 + 2 + 2 + 2 + 2),  # L > S: later query blocks see every key
    (512, 512, 64, 64, 36),  # 8 * 9 / 2 of 64
])
def test_causal_skips_tiles_above_the_diagonal(L, S, bq, bk, tiles):
    q, k, v = qkv((1, 1), L, S, 4, 4)
    watcher = ShapeRecorder()
    with watcher:
        out = flash_attention(q, k, v, is_causal=True, block_q=bq, block_k=bk)
    assert watcher.calls.get("bmm", 0) == tiles  # one q @ k^T product per visited tile
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("is_causal,tiles", [(False, 25), (True, 15)])
def test_backward_also_skips_tiles_above_the_diagonal(is_causal, tiles):
    q, k, v = qkv((1, 1), 10, 10, 4, 4, requires_grad=True)
    out = flash_attention(q, k, v, is_causal=is_causal, block_q=2, block_k=2)
    watcher = ShapeRecorder()
    with watcher:
        out.sum().backward()
    assert watcher.calls.get("bmm", 0) == 2 * tiles  # q @ k^T and dO @ v^T per visited tile


def test_backward_saves_no_L_by_S_tensor():
    L = S = 256
    q, k, v = qkv((1, 2), L, S, 16, 16, dtype=torch.float32, requires_grad=True)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flash_attention(q, k, v, block_q=32, block_k=32)
    assert saved and all(not (len(s) >= 2 and s[-1] >= L and s[-2] >= S) for s in saved), saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_attention(q, k, v)
    assert (1, 2, L, S) in saved  # the same check flags the naive path


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,exc,words", [
    (lambda q, k, v: flash_attention(q.numpy(), k, v), TypeError, "torch.Tensor"),
    (lambda q, k, v: flash_attention(q[0, 0, 0], k, v), ValueError, "at least 2 dimensions"),
    (lambda q, k, v: flash_attention(q.long(), k, v), TypeError, "floating-point"),
    (lambda q, k, v: flash_attention(q, k.float(), v), TypeError, "dtype"),
    (lambda q, k, v: flash_attention(q, k[..., :3], v), ValueError, "last dimension"),
    (lambda q, k, v: flash_attention(q, k, v[..., :2, :]), ValueError, "same length"),
    (lambda q, k, v: flash_attention(q, k[:1], v[:1]), ValueError, "leading"),
    (lambda q, k, v: flash_attention(q, k[0], v[0]), ValueError, "same number of dimensions"),
    (lambda q, k, v: flash_attention(q[..., :0], k[..., :0], v), ValueError, "E must be >= 1"),
    (lambda q, k, v: flash_attention(q, k, v, block_q=0), ValueError, "block_q must be >= 1"),
    (lambda q, k, v: flash_attention(q, k, v, block_k=-3), ValueError, "block_k must be >= 1"),
    (lambda q, k, v: flash_attention(q, k, v, block_q=2.0), TypeError, "block_q must be an int"),
    (lambda q, k, v: flash_attention(q, k, v, block_k=True), TypeError, "block_k must be an int"),
    (lambda q, k, v: flash_attention(q, k, v, is_causal=1), TypeError, "is_causal must be a bool"),
    (lambda q, k, v: flash_attention(q, k, v, return_lse="yes"), TypeError, "return_lse"),
    (lambda q, k, v: flash_attention(q, k, v, scale="0.5"), TypeError, "scale"),
    (lambda q, k, v: flash_attention(q, k, v, scale=float("nan")), ValueError, "finite"),
])
def test_bad_input_is_explained(call, exc, words):
    q, k, v = qkv((2, 3), 5, 6, 4, 4)
    with pytest.raises(exc, match=words):
        call(q, k, v)


def test_exported_from_the_package():
    assert attnlib.flash_attention is flash_attention


# ---------------------------------------------------------------- flash_attention_backward


@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("with_grad_lse", [False, True])
def test_backward_function_matches_autograd_through_torch(case, is_causal, with_grad_lse):
    batch, L, S, E, Ev, bq, bk = case
    q, k, v = qkv(batch, L, S, E, Ev, seed=21, requires_grad=True)
    d_out = randn(*batch, L, Ev, seed=22)
    d_lse = randn(*batch, L, seed=23) if with_grad_lse else None
    with torch.no_grad():
        out, lse = flash_attention(q, k, v, is_causal=is_causal, block_q=bq, block_k=bk, return_lse=True)
    ours = attnlib.flash_attention_backward(q.detach(), k.detach(), v.detach(), out, lse, d_out, is_causal,
                                            None, bq, bk, grad_lse=d_lse)
    scores = naive_scores(q, k, is_causal)
    loss = (torch.softmax(scores, -1) @ v * d_out).sum()
    if with_grad_lse:
        loss = loss + (torch.logsumexp(scores, -1) * d_lse).sum()
    theirs = torch.autograd.grad(loss, (q, k, v))
    for name, a, b in zip("qkv", ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")


def test_backward_function_with_scale_low_precision_and_no_L_by_S_tensor():
    q, k, v = qkv((1, 2), 256, 256, 8, 8, seed=24, requires_grad=True)
    d_out = randn(1, 2, 256, 8, seed=25)
    out, lse = flash_attention(q, k, v, scale=0.3, is_causal=True, return_lse=True)
    torch.autograd.backward(out, d_out)
    watcher = ShapeRecorder()
    with watcher:
        ours = attnlib.flash_attention_backward(q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                                                d_out, is_causal=True, scale=0.3, block_q=32, block_k=32)
    assert watcher.quadratic(256, 256) == []
    for a, b in zip(ours, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # bfloat16 in, fp32 lse: computed in fp32, gradients cast back to bfloat16
    qb, kb, vb = (t.detach().to(torch.bfloat16) for t in (q, k, v))
    ob, lb = flash_attention(qb, kb, vb, return_lse=True)
    grads = attnlib.flash_attention_backward(qb, kb, vb, ob, lb, d_out.to(torch.bfloat16))
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    q32, k32, v32 = (t.float().requires_grad_(True) for t in (qb, kb, vb))
    torch.autograd.backward(F.scaled_dot_product_attention(q32, k32, v32), d_out.float())
    for g, ref in zip(grads, (q32.grad, k32.grad, v32.grad)):
        assert (g.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_backward_function_explains_bad_input():
    q, k, v = qkv((2, 3), 5, 6, 4, 4)
    out, lse = flash_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="lse must have shape"):
        attnlib.flash_attention_backward(q, k, v, out, lse[..., :2], out)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        attnlib.flash_attention_backward(q, k, v, out, lse, out[..., :1])
    with pytest.raises(TypeError, match="torch.Tensor"):
        attnlib.flash_attention_backward(q, k, v, out, lse, out, grad_lse=[0.0])
