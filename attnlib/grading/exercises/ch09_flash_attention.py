"""Chapter 9, flash attention: the graded exercises and their catalogues of common mistakes.

==============================  ========================================
exercise id                     reference
==============================  ========================================
``flash_attention``             :func:`attnlib.flash_attention`
``flash_attention_backward``    :func:`attnlib.flash_attention_backward`
==============================  ========================================

Both exercises have an ``extra_check`` (:func:`_flash_no_score_matrix`) that runs the
learner's function under :class:`_TensorRecorder` and fails it if a tensor that could hold the
whole ``L x S`` score matrix is ever built. Each mistake is a small wrong
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
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..._validate import compute_dtype
from ...flash import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, flash_attention, flash_attention_backward
from ...measure import quadratic_shapes
from ..core import Case, Exercise, Mistake, register, section_url
from .common import F64, NO_ATTNLIB, NO_FUSED, binade_values, clone_args, grid, huge_score_qk, randn

PAGE = "09_flash_attention.html"


def _flash_variant(*, rescale_acc: bool = True, rescale_sum: bool = True, store_max: bool = True,
                   per_tile: bool = False, bottom_right: bool = False, lse_with_max: bool = True,
                   use_scale_arg: bool = True, default_scale: bool = True, m_init: float = -math.inf,
                   max_shift: bool = True, in_place: bool = False) -> Callable[..., Any]:
    """Tiled attention with the online softmax, one thing changed: ``m_init`` is the running
    maximum's starting value, ``max_shift=False`` exponentiates the raw scores (no running
    maximum at all), ``in_place=True`` scales the caller's ``query`` in place."""
    def wrong(query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
              scale: float | None = None, block_q: int = DEFAULT_BLOCK_Q,
              block_k: int = DEFAULT_BLOCK_K, return_lse: bool = False) -> Any:
        dtype = compute_dtype(query.dtype)
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        L, S, E = q.size(-2), k.size(-2), q.size(-1)
        if scale is None or not use_scale_arg:
            scale = 1.0 / math.sqrt(E) if default_scale else 1.0
        shift = S - L if bottom_right else 0  # query i sees keys j <= i + shift
        if in_place:
            q *= scale  # the caller's tensor when it is float32/float64
            scale = 1.0
        out = q.new_zeros(*q.shape[:-1], v.size(-1))
        lse = q.new_zeros(q.shape[:-1])
        for i0 in range(0, L, block_q):
            i1 = min(i0 + block_q, L)
            qb = q[..., i0:i1, :] * scale
            m = q.new_full(qb.shape[:-1], m_init)
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
                if not max_shift:  # exp of the raw scores, summed as they come
                    p = torch.exp(s)
                    l = l + p.sum(dim=-1)
                    acc = acc + p @ v[..., j0:j1, :]
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
            lse[..., i0:i1] = m + torch.log(l) if lse_with_max and max_shift else torch.log(l)
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
            Case("float32, every score near -8192 (batch 0) or +8192 (batch 1), return_lse, blocks 4 x 4",
                 _huge_qkv((2, 2), 6, 10, 675, torch.float32), {"block_q": 4, "block_k": 4, "return_lse": True},
                 low_precision=True),
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
        Case("bfloat16, every score near -8192 (batch 0) or +8192 (batch 1), causal, return_lse, blocks 3 x 4",
             _huge_qkv((2, 1), 7, 9, 704, torch.bfloat16),
             {"is_causal": True, "block_q": 3, "block_k": 4, "return_lse": True}, low_precision=True),
    ]


def _huge_qkv(lead: tuple[int, ...], L: int, S: int, seed: int,
              dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Queries and keys (E = 16) whose scores all lie near -HUGE_SCORE on even batch items and
    +HUGE_SCORE on odd ones (:func:`~.common.huge_score_qk`), values from
    :func:`~.common.binade_values`; exact in ``dtype``."""
    q, k = huge_score_qk(lead, L, S, 16, seed=seed, dtype=dtype)
    return q, k, binade_values(*lead, S, 8, seed=seed + 2, dtype=dtype)


_ONLINE_SOFTMAX_ADVICE = ("Keep one (block_q, block_k) tile of scores at a time, with the running max, sum "
                          "and accumulator of the online softmax. See "
                          f"{section_url(f'{PAGE}#the-online-softmax')}.")
_RECOMPUTE_ADVICE = ("Recompute one (block_q, block_k) tile of weights at a time from its scores and lse, "
                     "P = exp(scores - lse), and add its share to dQ, dK and dV. See "
                     f"{section_url(f'{PAGE}#the-backward-pass-recompute-don-t-store')}.")


class _TensorRecorder(TorchFunctionMode):
    """The shape and dtype of every tensor of two or more dimensions that a torch function
    returns while it is active (``tensors``: ``(shape, dtype)`` pairs), so that the check can
    say what was built: a boolean ``(L, S)`` mask is not a score matrix, though it is as large
    as one.

    A torch *function* mode, not :class:`attnlib.measure.ShapeRecorder`'s dispatch mode: it sees
    every call the learner's code makes (factories such as ``torch.ones`` included) and so every
    tensor that code holds, but not the operations inside one call; it costs a loop over single
    numbers about 15 % more time, where the dispatch mode costs it 6 times as much (measured on a
    scalar flash attention, L = S = 256), which the time limits would punish."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in (out,) if isinstance(out, Tensor) else tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.dim() >= 2:
                self.tensors.append((tuple(t.shape), t.dtype))
        return out

    def quadratic_tensors(self, L: int, S: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """The recorded tensors whose shape :func:`attnlib.measure.quadratic_shapes` flags, with
        their dtypes."""
        big = set(quadratic_shapes([shape for shape, _ in self.tensors], L, S))
        return [(shape, dtype) for shape, dtype in self.tensors if shape in big]


def _flash_no_score_matrix(student: Callable[..., Any], case: Case,
                           advice: str = _ONLINE_SOFTMAX_ADVICE) -> str | None:
    """Run the learner's flash attention (or its backward pass) under
    :class:`_TensorRecorder` and fail if any tensor
    could hold the whole ``L x S`` score matrix. The message says what was built: a floating
    one is the score matrix (or the weights), a boolean or integer one a precomputed mask.

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
    with torch.no_grad(), _TensorRecorder() as rec:
        student(*args, **kwargs)
    big = rec.quadratic_tensors(L, S)
    if not big:
        return None
    where = f"(L = {L}, S = {S}, blocks {block_q} x {block_k})"
    values = [shape for shape, dtype in big if dtype.is_floating_point or dtype.is_complex]
    if values:  # numbers per (query, key) pair: scores or weights, whole
        return (f"built a tensor of shape {values[0]} {where}: flash attention must never materialise the "
                f"L x S score matrix. {advice}")
    shape, dtype = big[0]
    kind = "boolean" if dtype == torch.bool else str(dtype).replace("torch.", "")
    return (f"built an L x S {kind} mask of shape {shape} {where}: not the score matrix, but a precomputed "
            f"(L, S) mask takes memory of order L x S as well, which flash attention must not use. Mask each "
            f"tile when it is computed, from its own query and key positions (key j > query i), and skip the "
            f"tiles wholly above the diagonal. {advice}")


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
        Mistake(
            "running max initialised to 0 instead of -inf",
            "The running max must start at m = -inf, below every score. Started at 0, it stays 0 "
            "while every score of a row is very negative: exp(s - 0) underflows to 0 for every "
            "key, l = 0, and the row's output and lse are lost.",
            f"{PAGE}#the-online-softmax",
            _flash_variant(m_init=0.0),
        ),
        Mistake(
            "no max subtraction",
            "The tiles' scores were exponentiated as they are, without the running max: exp "
            "overflows to inf when every score of a row is large (inf / inf = NaN) and underflows "
            "to 0 when every score is very negative. Keep m, and use exp(s - m_new) and the "
            "rescaling by exp(m_old - m_new).",
            f"{PAGE}#the-online-softmax",
            _flash_variant(max_shift=False),
        ),
        Mistake(
            "modifies its input in place",
            "`q *= scale` changes the caller's query tensor: for float32 and float64 inputs "
            "`query.to(dtype)` is `query` itself, not a copy. Scale into a new tensor, "
            "`q = query * scale`, or scale each tile of scores.",
            f"{PAGE}#the-code",
            _flash_variant(in_place=True),
            changes_input=True,
        ),
    ),
))

# ----------------------------------------------------------------------------- backward


def _flash_bwd_variant(*, delta: bool = True, with_lse: bool = True, scale_grads: bool = True,
                       causal: bool = True, split_exp: bool = False) -> Callable[..., Any]:
    """The tiled backward pass with one thing changed: ``delta`` (the D = rowsum(dO * O)
    term), ``with_lse`` (P from lse, or a softmax of each tile alone), ``scale_grads`` (the
    scale in dQ and dK), ``causal`` (the mask applied to the recomputed scores),
    ``split_exp`` (P = exp(scores) / exp(lse), two exponentials that overflow or underflow,
    instead of exp(scores - lse))."""
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
                if split_exp:
                    p = torch.exp(s) / torch.exp(row_lse[..., i0:i1, None])
                elif with_lse:
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

    def huge_case(name: str, lead: tuple[int, ...], L: int, S: int, seed: int, dtype: torch.dtype, *,
                  with_grad_lse: bool = False, **kwargs: Any) -> Case:
        """Scores all near -HUGE_SCORE or +HUGE_SCORE (:func:`_huge_qkv`); ``out`` and ``lse``
        from the forward pass in ``dtype`` (``lse`` float32 for bfloat16)."""
        q, k, v = _huge_qkv(lead, L, S, seed, dtype)
        forward = {n: kwargs[n] for n in ("is_causal", "scale", "block_q", "block_k") if n in kwargs}
        out, lse = flash_attention(q, k, v, **forward, return_lse=True)
        if with_grad_lse:
            kwargs["grad_lse"] = grid(*lead, L, seed=seed + 4, dtype=lse.dtype)
        return Case(name, (q, k, v, out, lse, grid(*lead, L, v.size(-1), seed=seed + 3, dtype=dtype)), kwargs,
                    low_precision=True)
    if not hidden:
        return [
            case("L = S = 8, blocks 4 x 4", (2, 2), 8, 8, 4, 3, 900, block_q=4, block_k=4),
            case("causal, L = S = 10, blocks 4 x 3 (ragged)", (2, 2), 10, 10, 4, 4, 905, is_causal=True,
                 block_q=4, block_k=3),
            case("L = 5, S = 9, scale = 0.3, grad_lse given, blocks 2 x 4", (2, 1), 5, 9, 4, 2, 910,
                 with_grad_lse=True, scale=0.3, block_q=2, block_k=4),
            case("L = S = 256, blocks 32 x 32 (no L x S tensor allowed)", (1, 2), 256, 256, 8, 8, 915,
                 block_q=32, block_k=32),
            huge_case("float32, every score near -8192 (batch 0) or +8192 (batch 1), blocks 4 x 4", (2, 2), 6, 10,
                      918, torch.float32, block_q=4, block_k=4),
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
        huge_case("bfloat16, every score near -8192 (batch 0) or +8192 (batch 1), causal + grad_lse, blocks 3 x 4",
                  (2, 1), 7, 9, 960, torch.bfloat16, with_grad_lse=True, is_causal=True, block_q=3, block_k=4),
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
        Mistake(
            "P computed as exp(scores) / exp(lse)",
            "The backward pass's form of a missing max subtraction: exp(scores) and exp(lse) "
            "overflow to inf when a row's scores are large (inf / inf = NaN) and underflow to 0 "
            "when they are very negative (0 / 0 = NaN). Subtract first: P = exp(scores - lse), "
            "every exponent <= 0.",
            f"{PAGE}#the-backward-pass-recompute-don-t-store",
            _flash_bwd_variant(split_exp=True),
        ),
    ),
))
