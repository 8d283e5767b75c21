"""Chapter 9, flash attention: the graded exercises and their catalogues of common mistakes.

==============================  ========================================
exercise id                     reference
==============================  ========================================
``flash_attention``             :func:`attnlib.flash_attention`
``flash_attention_backward``    :func:`attnlib.flash_attention_backward`
==============================  ========================================

Both exercises have an ``extra_check`` (:func:`_flash_no_score_matrix`) that runs the
learner's function under :class:`attnlib.measure.ShapeRecorder` and fails it if a tensor that
could hold the whole ``L x S`` score matrix is ever built. Each mistake is a small wrong
implementation with the reference's signature; ``_flash_variant`` and
``_flash_bwd_variant`` compute every variant of the tiled pass with flags, so a mistake
differs from the correct computation in exactly one place.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..._validate import compute_dtype
from ...flash import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, flash_attention, flash_attention_backward
from ...measure import ShapeRecorder
from ..core import Case, Exercise, Mistake, register
from .common import F64, NO_ATTNLIB, NO_FUSED, clone_args, randn

PAGE = "09_flash_attention.html"


def _flash_variant(*, rescale_acc: bool = True, rescale_sum: bool = True, store_max: bool = True,
                   per_tile: bool = False, bottom_right: bool = False, lse_with_max: bool = True,
                   use_scale_arg: bool = True, default_scale: bool = True) -> Callable[..., Any]:
    """Tiled attention with the online softmax, one thing changed."""
    def wrong(query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
              scale: float | None = None, block_q: int = DEFAULT_BLOCK_Q,
              block_k: int = DEFAULT_BLOCK_K, return_lse: bool = False) -> Any:
        dtype = compute_dtype(query.dtype)
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        L, S, E = q.size(-2), k.size(-2), q.size(-1)
        if scale is None or not use_scale_arg:
            scale = 1.0 / math.sqrt(E) if default_scale else 1.0
        shift = S - L if bottom_right else 0  # query i sees keys j <= i + shift
        out = q.new_zeros(*q.shape[:-1], v.size(-1))
        lse = q.new_zeros(q.shape[:-1])
        for i0 in range(0, L, block_q):
            i1 = min(i0 + block_q, L)
            qb = q[..., i0:i1, :] * scale
            m = q.new_full(qb.shape[:-1], -math.inf)
            l = q.new_zeros(qb.shape[:-1])
            acc = q.new_zeros(*qb.shape[:-1], v.size(-1))
            true_m, true_l = m.clone(), l.clone()  # the right statistics, for per_tile's lse
            for j0 in range(0, S, block_k):
                j1 = min(j0 + block_k, S)
                if is_causal and j0 > i1 - 1 + shift:
                    break  # every later tile lies above the diagonal
                s = qb @ k[..., j0:j1, :].transpose(-2, -1)
                if is_causal:
                    rows = torch.arange(i0, i1)[:, None] + shift
                    s = s.masked_fill(torch.arange(j0, j1)[None, :] > rows, -math.inf)
                tile_max = s.amax(dim=-1)
                if per_tile:  # a softmax of the tile alone, added up
                    safe = torch.where(torch.isfinite(tile_max), tile_max, 0.0)
                    p = torch.exp(s - safe[..., None])
                    den = p.sum(dim=-1, keepdim=True)
                    acc = acc + (p / torch.where(den == 0, 1.0, den)) @ v[..., j0:j1, :]
                    new = torch.maximum(true_m, tile_max)
                    new_safe = torch.where(torch.isfinite(new), new, 0.0)
                    true_l = true_l * torch.exp(true_m - new_safe) + torch.exp(s - new_safe[..., None]).sum(-1)
                    true_m = new
                    continue
                m_new = torch.maximum(m, tile_max)
                m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
                alpha = torch.exp(m - m_safe)
                p = torch.exp(s - m_safe[..., None])
                l = (alpha * l if rescale_sum else l) + p.sum(dim=-1)
                acc = (alpha[..., None] * acc if rescale_acc else acc) + p @ v[..., j0:j1, :]
                if store_max:
                    m = m_new
            if per_tile:
                out[..., i0:i1, :], m, l = acc, true_m, true_l
            else:
                out[..., i0:i1, :] = acc / torch.where(l == 0, 1.0, l)[..., None]
            lse[..., i0:i1] = m + torch.log(l) if lse_with_max else torch.log(l)
        out = out.to(query.dtype)
        return (out, lse) if return_lse else out
    return wrong


def _flash_cases(hidden: bool) -> list[Case]:
    def qkv(shape_q: tuple[int, ...], S: int, Ev: int, seed: int, dtype: torch.dtype = F64,
            scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        *lead, _, E = shape_q
        return (randn(*shape_q, seed=seed, dtype=dtype, std=scale),
                randn(*lead, S, E, seed=seed + 1, dtype=dtype, std=scale),
                randn(*lead, S, Ev, seed=seed + 2, dtype=dtype))
    if not hidden:
        return [
            Case("L = S = 8, blocks 4 x 4", qkv((2, 2, 8, 4), 8, 3, 660), {"block_q": 4, "block_k": 4}),
            Case("causal, L = S = 10, blocks 4 x 3 (ragged)", qkv((2, 2, 10, 4), 10, 4, 663),
                 {"is_causal": True, "block_q": 4, "block_k": 3}),
            Case("causal, L = 6 < S = 11, blocks 4 x 4", qkv((1, 2, 6, 4), 11, 4, 666),
                 {"is_causal": True, "block_q": 4, "block_k": 4}),
            Case("return_lse, L = 5, S = 9, blocks 2 x 4, scale = 0.3", qkv((2, 1, 5, 4), 9, 2, 669),
                 {"scale": 0.3, "block_q": 2, "block_k": 4, "return_lse": True}),
            Case("L = S = 256, blocks 32 x 32 (no L x S tensor allowed)", qkv((1, 2, 256, 8), 256, 8, 672),
                 {"block_q": 32, "block_k": 32}),
        ]
    return [
        Case("blocks larger than L and S", qkv((2, 2, 5, 4), 7, 3, 680), {"block_q": 64, "block_k": 64}),
        Case("L = 1, S = 13, blocks 1 x 5", qkv((1, 3, 1, 6), 13, 6, 683), {"block_q": 1, "block_k": 5}),
        Case("causal, L = 9 > S = 5, blocks 4 x 2", qkv((1, 2, 9, 4), 5, 4, 686),
             {"is_causal": True, "block_q": 4, "block_k": 2}),
        Case("large logits (scores in the hundreds), blocks 3 x 3", qkv((1, 2, 7, 4), 8, 4, 689, scale=12.0),
             {"scale": 1.0, "block_q": 3, "block_k": 3}),
        Case("causal + return_lse, L = S = 11, blocks 3 x 4", qkv((2, 2, 11, 4), 11, 5, 692),
             {"is_causal": True, "block_q": 3, "block_k": 4, "return_lse": True}),
        Case("3-D inputs (N, L, E), default blocks", qkv((3, 6, 4), 6, 4, 695)),
        Case("bfloat16, causal, blocks 4 x 4", qkv((1, 2, 12, 8), 12, 8, 698, dtype=torch.bfloat16),
             {"is_causal": True, "block_q": 4, "block_k": 4}, low_precision=True),
        Case("causal, L = S = 200, blocks 48 x 40 (no L x S tensor allowed)", qkv((1, 1, 200, 4), 200, 4, 701),
             {"is_causal": True, "block_q": 48, "block_k": 40}),
    ]


_ONLINE_SOFTMAX_ADVICE = ("Keep one (block_q, block_k) tile of scores at a time, with the running max, sum "
                          f"and accumulator of the online softmax. See {PAGE}#the-online-softmax.")
_RECOMPUTE_ADVICE = ("Recompute one (block_q, block_k) tile of weights at a time from its scores and lse, "
                     "P = exp(scores - lse), and add its share to dQ, dK and dV. See "
                     f"{PAGE}#the-backward-pass-recompute-don-t-store.")


def _flash_no_score_matrix(student: Callable[..., Any], case: Case,
                           advice: str = _ONLINE_SOFTMAX_ADVICE) -> str | None:
    """Run the learner's flash attention (or its backward pass) under
    :class:`attnlib.measure.ShapeRecorder` and fail if any tensor could hold the whole
    ``L x S`` score matrix.

    Checked only on the cases built for it: at least 128 queries and keys and tiles at most a
    quarter of that, so that no honest tensor (a tile, the ``(N, L)`` statistics of the
    online softmax, the inputs) has two trailing dimensions of ``min(L, S)`` or more.
    """
    query, key = case.args[0], case.args[1]
    L, S = query.size(-2), key.size(-2)
    block_q = case.kwargs.get("block_q", DEFAULT_BLOCK_Q)
    block_k = case.kwargs.get("block_k", DEFAULT_BLOCK_K)
    if min(L, S) < 128 or 4 * max(block_q, block_k) > min(L, S):
        return None
    args, kwargs = clone_args(case.args, case.kwargs)
    with torch.no_grad(), ShapeRecorder() as rec:
        student(*args, **kwargs)
    big = rec.quadratic(L, S)
    if big:
        return (f"built a tensor of shape {big[0]} (L = {L}, S = {S}, blocks {block_q} x {block_k}): "
                f"flash attention must never materialise the L x S score matrix. {advice}")
    return None


register(Exercise(
    id="flash_attention",
    chapter=9,
    reference=flash_attention,
    section=f"{PAGE}#the-online-softmax",
    make_cases=_flash_cases,
    forbidden=NO_ATTNLIB + NO_FUSED,
    extra_check=_flash_no_score_matrix,
    mistakes=(
        Mistake(
            "online softmax without rescaling the accumulator",
            "When a tile raises the running max from m_old to m_new, the accumulated sum of "
            "exp(s - m_old) * v must be multiplied by alpha = exp(m_old - m_new) before the tile's "
            "terms are added; otherwise old and new terms are on different scales.",
            f"{PAGE}#the-online-softmax",
            _flash_variant(rescale_acc=False),
        ),
        Mistake(
            "online softmax without rescaling the running sum",
            "The running sum l of exp(s - m) must be multiplied by alpha = exp(m_old - m_new) "
            "whenever the max changes, like the accumulator; otherwise the final division uses a "
            "normaliser on the wrong scale.",
            f"{PAGE}#the-online-softmax",
            _flash_variant(rescale_sum=False),
        ),
        Mistake(
            "never storing the new running max (m = m_new forgotten)",
            "With m stuck at -inf, alpha = exp(m - m_new) is 0 at every tile and wipes what was "
            "accumulated: the output is the attention over the last key tile only.",
            f"{PAGE}#the-online-softmax",
            _flash_variant(store_max=False),
        ),
        Mistake(
            "normalising each tile separately",
            "A softmax over one tile makes that tile's weights sum to 1 on their own; the weights "
            "must be normalised over all keys, through the running max and sum, and divided once "
            "at the end.",
            f"{PAGE}#a-worked-example-one-row-three-blocks",
            _flash_variant(per_tile=True),
        ),
        Mistake(
            "causal mask aligned bottom-right",
            "is_causal is aligned top-left, as in PyTorch: query i sees keys 0..i whatever S is. "
            "Shifting the diagonal by S - L is the decoding alignment.",
            "05_self_cross_masks.html#is-causal-when-l-s-top-left-or-bottom-right",
            _flash_variant(bottom_right=True),
        ),
        Mistake(
            "log-sum-exp without the max added back",
            "l is the sum of exp(s - m), so log(l) is the log-sum-exp minus m: return m + log(l).",
            f"{PAGE}#the-online-softmax",
            _flash_variant(lse_with_max=False),
        ),
        Mistake(
            "ignoring the scale argument",
            "1/sqrt(E) is only the default; when scale is given, the scores are multiplied by it.",
            f"{PAGE}#the-code",
            _flash_variant(use_scale_arg=False),
        ),
        Mistake(
            "no 1/sqrt(E) scaling",
            "With scale=None the scores are q . k / sqrt(E), as in standard attention.",
            "03_scaling.html#the-variance-of-a-dot-product",
            _flash_variant(default_scale=False),
        ),
    ),
))

# ----------------------------------------------------------------------------- backward


def _flash_bwd_variant(*, delta: bool = True, with_lse: bool = True, scale_grads: bool = True,
                       causal: bool = True) -> Callable[..., Any]:
    """The tiled backward pass with one thing changed: ``delta`` (the D = rowsum(dO * O)
    term), ``with_lse`` (P from lse, or a softmax of each tile alone), ``scale_grads`` (the
    scale in dQ and dK), ``causal`` (the mask applied to the recomputed scores)."""
    def wrong(query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
              is_causal: bool = False, scale: float | None = None, block_q: int = DEFAULT_BLOCK_Q,
              block_k: int = DEFAULT_BLOCK_K, grad_lse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        dtype = compute_dtype(query.dtype)
        q, k, v, o, d_o = (t.to(dtype) for t in (query, key, value, out, grad_out))
        row_lse = lse.to(dtype)  # (..., L)
        L, S = q.size(-2), k.size(-2)
        if scale is None:
            scale = 1.0 / math.sqrt(q.size(-1))
        d = (d_o * o).sum(dim=-1) if delta else torch.zeros_like(row_lse)  # (..., L)
        if grad_lse is not None:
            d = d - grad_lse.to(dtype)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        g = scale if scale_grads else 1.0
        for i0 in range(0, L, block_q):
            i1 = min(i0 + block_q, L)
            for j0 in range(0, S, block_k):
                j1 = min(j0 + block_k, S)
                s = (q[..., i0:i1, :] @ k[..., j0:j1, :].transpose(-2, -1)) * scale  # (..., bq, bk)
                if is_causal and causal:
                    future = torch.arange(j0, j1)[None, :] > torch.arange(i0, i1)[:, None]
                    s = s.masked_fill(future, -math.inf)
                if with_lse:
                    p = torch.exp(s - row_lse[..., i0:i1, None])
                else:  # a softmax of the tile alone
                    peak = s.amax(dim=-1, keepdim=True)
                    e = torch.exp(s - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)))
                    total = e.sum(dim=-1, keepdim=True)
                    p = e / torch.where(total == 0, torch.ones_like(total), total)
                dv[..., j0:j1, :] += p.transpose(-2, -1) @ d_o[..., i0:i1, :]
                ds = p * (d_o[..., i0:i1, :] @ v[..., j0:j1, :].transpose(-2, -1) - d[..., i0:i1, None])
                dq[..., i0:i1, :] += g * (ds @ k[..., j0:j1, :])
                dk[..., j0:j1, :] += g * (ds.transpose(-2, -1) @ q[..., i0:i1, :])
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)
    return wrong


def _flash_bwd_cases(hidden: bool) -> list[Case]:
    def case(name: str, lead: tuple[int, ...], L: int, S: int, E: int, Ev: int, seed: int, *,
             with_grad_lse: bool = False, logit_scale: float = 1.0, **kwargs: Any) -> Case:
        q = randn(*lead, L, E, seed=seed, std=logit_scale)
        k = randn(*lead, S, E, seed=seed + 1, std=logit_scale)
        v = randn(*lead, S, Ev, seed=seed + 2)
        forward = {n: kwargs[n] for n in ("is_causal", "scale", "block_q", "block_k") if n in kwargs}
        out, lse = flash_attention(q, k, v, **forward, return_lse=True)
        if with_grad_lse:
            kwargs["grad_lse"] = randn(*lead, L, seed=seed + 4)
        return Case(name, (q, k, v, out, lse, randn(*lead, L, Ev, seed=seed + 3)), kwargs)
    if not hidden:
        return [
            case("L = S = 8, blocks 4 x 4", (2, 2), 8, 8, 4, 3, 900, block_q=4, block_k=4),
            case("causal, L = S = 10, blocks 4 x 3 (ragged)", (2, 2), 10, 10, 4, 4, 905, is_causal=True,
                 block_q=4, block_k=3),
            case("L = 5, S = 9, scale = 0.3, grad_lse given, blocks 2 x 4", (2, 1), 5, 9, 4, 2, 910,
                 with_grad_lse=True, scale=0.3, block_q=2, block_k=4),
            case("L = S = 256, blocks 32 x 32 (no L x S tensor allowed)", (1, 2), 256, 256, 8, 8, 915,
                 block_q=32, block_k=32),
        ]
    return [
        case("blocks larger than L and S", (2, 2), 5, 7, 4, 3, 920, block_q=64, block_k=64),
        case("L = 1, S = 13, blocks 1 x 5", (1, 3), 1, 13, 6, 6, 925, block_q=1, block_k=5),
        case("causal, L = 9 > S = 5, blocks 4 x 2", (1, 2), 9, 5, 4, 4, 930, is_causal=True,
             block_q=4, block_k=2),
        case("causal, L = 6 < S = 11, blocks 4 x 4", (1, 2), 6, 11, 4, 4, 935, is_causal=True,
             block_q=4, block_k=4),
        case("large logits (scores in the hundreds), blocks 3 x 3", (1, 2), 7, 8, 4, 4, 940, logit_scale=12.0,
             scale=1.0, block_q=3, block_k=3),
        case("causal + grad_lse, L = S = 11, blocks 3 x 4", (2, 2), 11, 11, 4, 5, 945, with_grad_lse=True,
             is_causal=True, block_q=3, block_k=4),
        case("3-D inputs (N, L, E), default blocks", (3,), 6, 6, 4, 4, 950),
        case("causal, L = S = 200, blocks 48 x 40 (no L x S tensor allowed)", (1, 1), 200, 200, 4, 4, 955,
             is_causal=True, block_q=48, block_k=40),
    ]


register(Exercise(
    id="flash_attention_backward",
    chapter=9,
    reference=flash_attention_backward,
    section=f"{PAGE}#the-backward-pass-recompute-don-t-store",
    make_cases=_flash_bwd_cases,
    forbidden=NO_ATTNLIB + NO_FUSED + ("torch.autograd.grad", "torch.autograd.backward",
                                        "torch.Tensor.backward"),
    extra_check=functools.partial(_flash_no_score_matrix, advice=_RECOMPUTE_ADVICE),
    mistakes=(
        Mistake(
            "the D = rowsum(dO * O) term forgotten",
            "The softmax's Jacobian gives dS = P * (dP - D) with D_i = dO_i . O_i (minus grad_lse "
            "when it is given); dS = P * dP leaves out the term that keeps each row of dS summing "
            "to zero.",
            f"{PAGE}#the-backward-pass-recompute-don-t-store",
            _flash_bwd_variant(delta=False),
        ),
        Mistake(
            "each tile's weights normalised on their own",
            "The weights of a tile are a slice of the whole row's softmax: P = exp(scores - lse), "
            "with the lse of the forward pass; a softmax over the tile alone makes each tile sum "
            "to 1.",
            f"{PAGE}#the-backward-pass-recompute-don-t-store",
            _flash_bwd_variant(with_lse=False),
        ),
        Mistake(
            "dQ and dK without the scale",
            "The scores are scale * q . k, so the chain rule multiplies dQ = dS K and dK = dS^T Q "
            "by the scale.",
            f"{PAGE}#the-backward-pass-recompute-don-t-store",
            _flash_bwd_variant(scale_grads=False),
        ),
        Mistake(
            "causal mask left out of the recomputed scores",
            "The recomputed tile must be masked like the forward one: a key after the query "
            "has weight 0, exp(-inf - lse), and must not receive a gradient.",
            f"{PAGE}#the-backward-pass-recompute-don-t-store",
            _flash_bwd_variant(causal=False),
        ),
    ),
))
