"""Graded exercises of chapter 2 (queries, keys, values): the cases and the catalogue of common
mistakes.

==================================  ==========================================
exercise id                          reference
==================================  ==========================================
``softmax``                          :func:`attnlib.softmax`
``scaled_dot_product_attention``     :func:`attnlib.scaled_dot_product_attention`
==================================  ==========================================

Every mistake below is a function with the reference's signature. This chapter introduces
the helpers the later chapters' attention mistakes are built from: a correct stable softmax
(:func:`_softmax`), attention weights with one ingredient swapped for a wrong one
(:func:`_weights_variant`), and the attention cases and mistakes that ``attention_weights``
(chapter 3) shares with ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..._validate import compute_dtype
from ...attention import scaled_dot_product_attention, softmax
from ...masks import padding_mask
from ..core import Case, Exercise, Mistake, register
from .common import (F64, HUGE_SCORE, NO_ATTNLIB, NO_FUSED, NO_SOFTMAX, binade_values, grid, huge_score_qk,
                     rand_bool, randn)

PAGE = "02_queries_keys_values.html"


# --------------------------------------------------------------------------- helpers


def _naive_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax with the max subtracted but no guard for all -inf rows (0/0 = NaN there)."""
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def _softmax(x: Tensor, dim: int = -1) -> Tensor:
    """A correct stable softmax (all -inf rows give zeros), for building the mistakes.

    The mistakes never call ``attnlib``'s public functions: the tests grade each mistake as
    if a learner had written it, and a learner's call to ``attnlib`` is blocked.
    """
    m = x.amax(dim=dim, keepdim=True)
    e = torch.exp(x - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    total = e.sum(dim=dim, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def _weights_variant(query: Tensor, key: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                     scale: float | None = None, *, cast: bool = True, **variant: Any) -> Tensor:
    """Attention weights with one ingredient swapped for a wrong one (for the mistakes).

    With no ``variant`` this computes the correct weights. float16/bfloat16 inputs are
    computed in float32, as the reference does, so that a mistake differs from the right
    computation in its one ingredient only; the weights come back in the query's dtype
    (``cast=False``: in the dtype they were computed in, for a product with the values).
    The variants (:func:`_weights_of`): ``scale_rule``, ``softmax_dim``, ``polarity``,
    ``causal``, ``after_softmax``, ``guard``, ``scale_after_softmax``, ``max_shift=False``
    (the softmax exponentiates the raw scores) and ``in_place=True`` (the scale is applied
    to ``query`` in place, ``query *= scale``: the caller's tensor when it is float32/64).
    """
    work = compute_dtype(query.dtype)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(work)
    w = _weights_of(query.to(work), key.to(work), attn_mask, is_causal, scale, **variant)
    return w.to(query.dtype) if cast else w


def _weights_of(query: Tensor, key: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None,
                *, scale_rule: str = "sqrt", softmax_dim: int = -1, polarity: str = "allow",
                causal: str = "top-left", after_softmax: bool = False, guard: bool = True,
                scale_after_softmax: bool = False, max_shift: bool = True, in_place: bool = False) -> Tensor:
    """:func:`_weights_variant` in the inputs' own dtype."""
    E = query.size(-1)
    if scale is None or scale_rule == "ignore-arg":
        s = {"sqrt": 1.0 / math.sqrt(E), "ignore-arg": 1.0 / math.sqrt(E), "none": 1.0,
             "linear": 1.0 / E, "times-sqrt": math.sqrt(E)}[scale_rule]
    else:
        s = scale
    if in_place:
        query *= s  # the learner's tensor, scaled in place
        scores = query @ key.transpose(-2, -1)
    else:
        scores = query @ key.transpose(-2, -1)
    if not scale_after_softmax and not in_place:
        scores = scores * s
    L, S = scores.shape[-2:]
    allowed = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        diag = {"top-left": 0, "bottom-right": S - L, "strict": -1}[causal]
        allowed = allowed.tril(diag)
    additive = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & (attn_mask if polarity == "allow" else ~attn_mask)
        else:
            additive = attn_mask
    if after_softmax:
        w = _softmax(scores, dim=softmax_dim)
        w = w.masked_fill(~allowed, 0.0)
        return w if additive is None else w + additive
    scores = scores.masked_fill(~allowed, float("-inf"))
    if additive is not None:
        scores = scores + additive
    if not max_shift:
        return _softmax_no_shift(scores, dim=softmax_dim)
    w = _softmax(scores, dim=softmax_dim) if guard else _naive_softmax(scores, dim=softmax_dim)
    return w * s if scale_after_softmax else w


def _attention_mistake(**variant: object):
    """A wrong ``scaled_dot_product_attention``: weights from :func:`_weights_variant` times V."""
    def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False, *, generator: torch.Generator | None = None) -> Tensor:
        w = _weights_variant(query, key, attn_mask, is_causal, scale, cast=False, **variant)
        return (w @ value.to(w.dtype)).to(query.dtype)
    return sdpa


# --------------------------------------------------------------------------- softmax


def _softmax_cases(hidden: bool) -> list[Case]:
    if not hidden:
        big = randn(3, 6, seed=3, std=5.0)
        big[0] += 1e4  # every logit of row 0 near 1e4: exp overflows without the shift
        big[1] -= 1e4  # row 1 near -1e4: exp underflows to 0 without the shift
        low = randn(2, 4, 64, seed=5, std=3.0)
        low[1] = _huge_logits(6, torch.bfloat16).double()[:, :64]  # rows near -8192, +8192, -768, +768
        masked = randn(4, 5, seed=4)
        masked[1] = float("-inf")  # a fully masked row
        masked[2, ::2] = float("-inf")  # a partly masked row
        masked[3] += 1e4
        return [
            Case("random logits (3, 5), dim=-1", (randn(3, 5, seed=1),)),
            Case("(2, 3, 4), dim=1", (randn(2, 3, 4, seed=2),), {"dim": 1}),
            Case("large logits (+-1e4), float32", (big.float(),), low_precision=True),
            Case("-inf entries and a fully masked row", (masked,)),
            Case("bfloat16 (2, 4, 64), the rows of item 1 near -8192, +8192, -768 and +768",
                 (low.to(torch.bfloat16),), low_precision=True),
        ]
    huge = randn(2, 3, 8, seed=13, std=2.0) * 1e3
    mixed = randn(3, 7, seed=14)
    mixed[0] = float("-inf")
    mixed[2, 1:] = float("-inf")  # only one finite entry: weight exactly 1
    return [
        Case("dim=0 (5, 3)", (randn(5, 3, seed=11),), {"dim": 0}),
        Case("a single element along dim", (randn(4, 1, seed=12),)),
        Case("logits of order 1e3, dim=-2", (huge,), {"dim": -2}),
        Case("-inf rows and a single finite entry", (mixed,)),
        Case("float16 (3, 33)", (randn(3, 33, seed=15, std=4.0, dtype=torch.float16),), low_precision=True),
        Case("4-D (2, 2, 3, 9), dim=3", (randn(2, 2, 3, 9, seed=16),), {"dim": 3}),
    ]


def _huge_logits(seed: int, dtype: torch.dtype) -> Tensor:
    """Four rows of 64 logits all far from 0, exact in bfloat16: near -HUGE_SCORE (exp
    underflows to 0 without the max subtraction), +HUGE_SCORE (exp overflows), -768 and +768
    (past the range of exp in float64 too), a spread of a few steps of the format around
    each (64 near 8192, 4 near 768)."""
    spread = torch.cat([grid(2, 64, seed=seed, step=64.0, bound=256.0, std=64.0),
                        grid(2, 64, seed=seed + 1, step=4.0, bound=32.0, std=6.0)])
    offset = torch.tensor([-HUGE_SCORE, HUGE_SCORE, -768.0, 768.0], dtype=F64)[:, None]
    return (offset + spread).to(dtype)  # (4, 64)


def _softmax_no_shift(x: Tensor, dim: int = -1) -> Tensor:
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def _softmax_no_shift_guarded(x: Tensor, dim: int = -1) -> Tensor:
    """The shift left out of an otherwise careful softmax: half precision upcast, and a row
    whose exponentials all underflow divided by 1 instead of 0 (zeros, not NaN)."""
    e = torch.exp(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    total = e.sum(dim=dim, keepdim=True)
    return (e / torch.where(total == 0, torch.ones_like(total), total)).to(x.dtype)


def _softmax_ignores_dim(x: Tensor, dim: int = -1) -> Tensor:
    return _softmax(x.float(), dim=-1).to(x.dtype) if x.dtype in (torch.float16, torch.bfloat16) \
        else _softmax(x, dim=-1)


def _softmax_nan_rows(x: Tensor, dim: int = -1) -> Tensor:
    return _naive_softmax(x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x,
                          dim).to(x.dtype)


def _softmax_global_max(x: Tensor, dim: int = -1) -> Tensor:
    z = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    finite = z[torch.isfinite(z)]
    shift = finite.max() if finite.numel() else z.new_zeros(())
    e = torch.exp(z - shift)
    total = e.sum(dim=dim, keepdim=True)
    return (e / torch.where(total == 0, torch.ones_like(total), total)).to(x.dtype)


def _softmax_fp32_out(x: Tensor, dim: int = -1) -> Tensor:
    return _softmax(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim)


def _softmax_in_place(x: Tensor, dim: int = -1) -> Tensor:
    """Right values, but the shift and the exponential overwrite the caller's ``x`` (float32
    and float64; a float16/bfloat16 ``x`` is first copied to float32)."""
    z = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    m = z.amax(dim=dim, keepdim=True)
    z -= torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z.exp_()
    total = z.sum(dim=dim, keepdim=True)
    return (z / torch.where(total == 0, torch.ones_like(total), total)).to(x.dtype)


register(Exercise(
    id="softmax",
    chapter=2,
    reference=softmax,
    section=f"{PAGE}#a-softmax-that-cannot-overflow",
    make_cases=_softmax_cases,
    mistakes=(
        Mistake("fully masked row gives NaN",
                "a row that is entirely -inf becomes exp(-inf - -inf) = exp(NaN); such a row must "
                "return zeros instead.", f"{PAGE}#a-softmax-that-cannot-overflow", _softmax_nan_rows),
        Mistake("no max subtraction",
                "exp(x) overflows to inf for large logits (and underflows to 0 for very negative "
                "ones), giving inf/inf = NaN; subtract each row's maximum first.",
                f"{PAGE}#a-softmax-that-cannot-overflow", _softmax_no_shift),
        Mistake("no max subtraction (empty rows guarded)",
                "exp(x) of the raw scores still overflows to inf for large logits (inf/inf = NaN); "
                "the guard for a row that sums to 0 only hides the underflow of very negative "
                "ones. Subtract each row's maximum first.",
                f"{PAGE}#a-softmax-that-cannot-overflow", _softmax_no_shift_guarded),
        Mistake("max taken over the whole tensor",
                "one maximum for the whole tensor instead of one per row: a row far below it "
                "underflows to all zeros.", f"{PAGE}#a-softmax-that-cannot-overflow", _softmax_global_max),
        Mistake("dim argument ignored",
                "the softmax was taken over the last axis whatever dim was.", f"{PAGE}#all-queries-at-once",
                _softmax_ignores_dim),
        Mistake("result not cast back to the input dtype",
                "the computation was upcast to float32 (good) but the float32 result was "
                "returned; return it in the input's dtype.", f"{PAGE}#a-softmax-that-cannot-overflow",
                _softmax_fp32_out),
        Mistake("modifies its input in place",
                "`x -= x.amax(dim, keepdim=True)` (or `x.sub_(...)`, `x.exp_()`) overwrites the "
                "caller's logits: whoever passed `x` finds it shifted afterwards. The shift must "
                "make a new tensor, `z = x - m`.", f"{PAGE}#a-softmax-that-cannot-overflow",
                _softmax_in_place, changes_input=True),
    ),
    forbidden=NO_ATTNLIB + NO_SOFTMAX + ("torch.nn.functional.log_softmax", "torch.log_softmax"),
))


# --------------------------------------------------------------------------- scaled_dot_product_attention


def _qkv(seed: int, lead: tuple[int, ...], L: int, S: int, E: int, Ev: int | None = None,
         std: float = 1.0, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor, Tensor]:
    Ev = E if Ev is None else Ev
    return (randn(*lead, L, E, seed=seed, std=std, dtype=dtype),
            randn(*lead, S, E, seed=seed + 1, std=std, dtype=dtype),
            randn(*lead, S, Ev, seed=seed + 2, dtype=dtype))


def _attention_cases(hidden: bool, with_value: bool) -> list[Case]:
    """Cases shared by scaled_dot_product_attention and attention_weights."""
    def case(name: str, q: Tensor, k: Tensor, v: Tensor, low: bool = False, **kwargs: object) -> Case:
        args = (q, k, v) if with_value else (q, k)
        return Case(name, args, kwargs, low_precision=low)

    float_mask = randn(4, 6, seed=41)
    float_mask[rand_bool(4, 6, seed=42, p=0.7).logical_not()] = float("-inf")
    dead = rand_bool(5, 5, seed=43)
    dead[2] = False  # query 2 sees no key
    if not hidden:
        return [
            case("B=2, H=3, L=S=4, E=8", *_qkv(1, (2, 3), 4, 4, 8)),
            case("L=3 != S=6, Ev=5", *_qkv(2, (2, 2), 3, 6, 8, Ev=5)),
            case("bool mask (L, S) broadcast over B, H", *_qkv(3, (2, 2), 4, 6, 4),
                 attn_mask=rand_bool(4, 6, seed=30)),
            case("float mask with -inf entries", *_qkv(4, (1, 2), 4, 6, 4), attn_mask=float_mask),
            case("is_causal, L=S=5", *_qkv(5, (2, 2), 5, 5, 8), is_causal=True),
            case("is_causal, L=3 < S=6 (top-left)", *_qkv(6, (1, 2), 3, 6, 4), is_causal=True),
            case("scale=0.3", *_qkv(7, (2, 1), 4, 5, 16), scale=0.3),
            case("a fully masked query row", *_qkv(8, (1, 2), 5, 5, 4), attn_mask=dead),
            case("float32, every score near -8192 (batch 0) or +8192 (batch 1)",
                 *_huge_qkv(9, (2, 2), 4, 6, torch.float32), low=True),
        ]
    pad = torch.tensor([5, 2, 0])  # batch item 2 has no real key at all
    return [
        case("L=1 (one query)", *_qkv(101, (2, 2), 1, 7, 8)),
        case("is_causal, L=6 > S=3", *_qkv(102, (1, 3), 6, 3, 4), is_causal=True),
        case("padding mask (B, 1, 1, S), one empty sequence", *_qkv(103, (3, 2), 4, 5, 6),
             attn_mask=padding_mask(pad, 5)),
        case("is_causal combined with a bool mask", *_qkv(104, (2, 2), 5, 5, 4), is_causal=True,
             attn_mask=rand_bool(5, 5, seed=105)),
        case("large logits (|q.k| ~ 1e3)", *_qkv(106, (2, 2), 4, 4, 16, std=8.0)),
        case("3-D inputs (B, L, E), L=5 != S=2", *_qkv(107, (3,), 5, 2, 4)),
        case("head_dim=64", *_qkv(108, (1, 2), 6, 6, 64)),
        case("float mask with a fully masked row, scale=1.0", *_qkv(109, (2, 1), 4, 6, 4),
             attn_mask=float_mask.clone().index_fill_(0, torch.tensor([1]), float("-inf")), scale=1.0),
        case("bfloat16, is_causal", *_qkv(110, (2, 2), 16, 16, 32, dtype=torch.bfloat16), low=True,
             is_causal=True),
        case("bfloat16, every score near -8192 (batch 0) or +8192 (batch 1), is_causal",
             *_huge_qkv(111, (2, 2), 6, 6, torch.bfloat16), low=True, is_causal=True),
    ]


def _huge_qkv(seed: int, lead: tuple[int, ...], L: int, S: int,
              dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys (E = 16) and values whose scores all lie near -HUGE_SCORE on even batch
    items and +HUGE_SCORE on odd ones (:func:`~.common.huge_score_qk`), exact in ``dtype``;
    values from :func:`~.common.binade_values`."""
    q, k = huge_score_qk(lead, L, S, 16, seed=seed, dtype=dtype)
    return q, k, binade_values(*lead, S, 5, seed=seed + 2, dtype=dtype)


# (name, explanation, section, _weights_variant arguments); attention_weights (chapter 3)
# shares them.
_ATTENTION_MISTAKES: tuple[tuple[str, str, str, dict], ...] = (
    ("no 1/sqrt(d_k) scaling",
     "the scores q.k were not divided by sqrt(d_k), so with large head dimensions the softmax "
     "saturates.", "03_scaling.html#the-variance-of-a-dot-product", {"scale_rule": "none"}),
    ("scaled by 1/d_k instead of 1/sqrt(d_k)",
     "the scores were divided by d_k; the dot product's standard deviation grows like sqrt(d_k), "
     "so that is what brings it back to 1.", "03_scaling.html#the-variance-of-a-dot-product",
     {"scale_rule": "linear"}),
    ("scale argument ignored",
     "the default 1/sqrt(d_k) was used even though a scale was given.", "03_scaling.html#the-code",
     {"scale_rule": "ignore-arg"}),
    ("softmax over the wrong axis (dim=-2)",
     "the softmax normalised over the queries (dim=-2) instead of over the keys (dim=-1): each "
     "query's weights must sum to 1 across the keys.", f"{PAGE}#all-queries-at-once", {"softmax_dim": -2}),
    ("mask applied after the softmax",
     "the masked weights were zeroed after the softmax, so the remaining weights no longer sum "
     "to 1; mask the scores with -inf before the softmax so that they are renormalised.",
     "05_self_cross_masks.html#the-maths", {"after_softmax": True}),
    ("inverted mask polarity",
     "the boolean mask was read as True = blocked; here (as in "
     "torch.nn.functional.scaled_dot_product_attention) True means the query may attend.",
     "05_self_cross_masks.html#two-boolean-conventions-one-operation", {"polarity": "block"}),
    ("is_causal aligned bottom-right",
     "with L != S the causal triangle was shifted by S - L; is_causal is aligned top-left: "
     "query i sees keys 0..i.", "05_self_cross_masks.html#is-causal-when-l-s-top-left-or-bottom-right",
     {"causal": "bottom-right"}),
    ("causal mask without the diagonal",
     "query i was not allowed to see key i itself (a strict triangle); the causal mask allows "
     "keys 0..i inclusive.", "05_self_cross_masks.html#the-maths", {"causal": "strict"}),
    ("fully masked row gives NaN",
     "a query whose keys are all masked got a softmax of all -inf, which is 0/0 = NaN; such a "
     "row must get zero weights.", "05_self_cross_masks.html#what-a-fully-masked-row-does", {"guard": False}),
)
# Catalogued after the mistakes above (and chapter 3's own), so that those keep their names.
_NO_MAX_SHIFT: tuple[str, str, str, dict] = (
    "no max subtraction",
    "the softmax exponentiated the raw scores: when every score of a row is large, exp overflows "
    "to inf (inf / inf = NaN), and when every score is very negative it underflows to 0 "
    "(0 / 0 = NaN). Subtract each row's maximum before exp.",
    f"{PAGE}#a-softmax-that-cannot-overflow", {"max_shift": False})
_IN_PLACE_SCALE: tuple[str, str, str, dict] = (
    "modifies its input in place",
    "`query *= scale` (or `query /= math.sqrt(E)`) scales the caller's tensor too: whoever passed "
    "the queries finds them changed afterwards. Scale into a new tensor, `q = query * scale`, or "
    "scale the scores.", f"{PAGE}#all-queries-at-once", {"in_place": True})


register(Exercise(
    id="scaled_dot_product_attention",
    chapter=2,
    reference=scaled_dot_product_attention,
    section=f"{PAGE}#all-queries-at-once",
    make_cases=lambda hidden: _attention_cases(hidden, with_value=True),
    mistakes=tuple(Mistake(n, e, s, _attention_mistake(**v))
                   for n, e, s, v in (*_ATTENTION_MISTAKES, _NO_MAX_SHIFT))
    + (Mistake(*_IN_PLACE_SCALE[:3], _attention_mistake(**_IN_PLACE_SCALE[3]), changes_input=True),),
    forbidden=NO_ATTNLIB + NO_FUSED,
))
