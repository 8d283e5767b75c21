"""Graded exercises of chapter 3 (scaling): the cases and the catalogue of common mistakes.

==================================  ==========================================
exercise id                          reference
==================================  ==========================================
``attention_weights``                :func:`attnlib.attention_weights`
``attention_entropy``                :func:`attnlib.attention_entropy`
==================================  ==========================================

Every mistake below is a function with the reference's signature. ``attention_weights``
shares its cases and most of its mistakes with ``scaled_dot_product_attention``
(:mod:`.ch02_queries_keys_values`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...attention import attention_entropy, attention_weights
from ..core import Case, Exercise, Mistake, register
from .ch02_queries_keys_values import (_ATTENTION_MISTAKES, _IN_PLACE_SCALE, _NO_MAX_SHIFT, _attention_cases,
                                      _softmax, _weights_variant)
from .common import F64, NO_ATTNLIB, NO_FUSED, rand_bool, randn

PAGE = "03_scaling.html"


# --------------------------------------------------------------------------- attention_weights


def _weights_mistake(**variant: object):
    """A wrong ``attention_weights``."""
    def attention_weights(query: Tensor, key: Tensor, attn_mask: Tensor | None = None,
                          is_causal: bool = False, scale: float | None = None,
                          enable_gqa: bool = False) -> Tensor:
        return _weights_variant(query, key, attn_mask, is_causal, scale, **variant)
    return attention_weights


_WEIGHTS_ONLY_MISTAKES: tuple[tuple[str, str, str, dict], ...] = (
    ("multiplied by sqrt(d_k) instead of dividing",
     "the scores were multiplied by sqrt(d_k), which makes their spread d_k instead of 1.",
     f"{PAGE}#the-variance-of-a-dot-product", {"scale_rule": "times-sqrt"}),
    ("scale applied after the softmax",
     "the weights were multiplied by the scale after the softmax, so rows no longer sum to 1 "
     "and the softmax saw unscaled scores.", f"{PAGE}#the-variance-of-a-dot-product",
     {"scale_after_softmax": True}),
)


register(Exercise(
    id="attention_weights",
    chapter=3,
    reference=attention_weights,
    section=f"{PAGE}#the-variance-of-a-dot-product",
    make_cases=lambda hidden: _attention_cases(hidden, with_value=False),
    mistakes=tuple(Mistake(n, e, s, _weights_mistake(**v))
                   for n, e, s, v in (*_ATTENTION_MISTAKES, *_WEIGHTS_ONLY_MISTAKES, _NO_MAX_SHIFT))
    + (Mistake(*_IN_PLACE_SCALE[:3], _weights_mistake(**_IN_PLACE_SCALE[3]), changes_input=True),),
    forbidden=NO_ATTNLIB + NO_FUSED,
))


# --------------------------------------------------------------------------- attention_entropy


def _weights_rows(seed: int, *shape: int, std: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    """Random attention weights: a softmax of random scores along the last axis."""
    return _softmax(randn(*shape, seed=seed, std=std)).to(dtype)


def _entropy_cases(hidden: bool) -> list[Case]:
    masked = _weights_rows(51, 2, 2, 4, 6)
    keep = rand_bool(2, 2, 4, 6, seed=52)
    masked = masked * keep / (masked * keep).sum(-1, keepdim=True)  # masked keys: exact zeros
    masked[1, 0, 2] = 0.0  # a fully masked row: every weight 0
    one_hot = torch.eye(5, dtype=F64)[torch.tensor([3, 0, 4])]  # (3, 5)
    mixed = torch.cat([one_hot, _weights_rows(53, 2, 5), torch.zeros(1, 5, dtype=F64)])  # (6, 5)
    if not hidden:
        return [
            Case("weights (B, H, L, S) = (2, 3, 4, 6)", (_weights_rows(50, 2, 3, 4, 6),)),
            Case("one-hot rows and a fully masked (all-zero) row", (mixed,)),
            Case("masked keys (zero weights), 4-D", (masked,)),
            Case("dim=-2 (keys on the second-to-last axis)",
                 (_weights_rows(54, 2, 3, 7).transpose(-2, -1),), {"dim": -2}),
            Case("bfloat16 weights (2, 8, 64)", (_weights_rows(55, 2, 8, 64, std=2.0, dtype=torch.bfloat16),),
                 low_precision=True),
        ]
    tiny = _weights_rows(152, 3, 6, std=30.0)  # saturated rows: weights down to ~1e-100
    return [
        Case("one key (S=1): entropy 0", (torch.ones(2, 3, 1, dtype=F64),)),
        Case("uniform rows over S=16 keys: entropy ln 16", (torch.full((4, 16), 1 / 16, dtype=F64),)),
        Case("a single row (1-D)", (_weights_rows(150, 9),)),
        Case("dim=0", (_weights_rows(151, 5, 3).T.contiguous(),), {"dim": 0}),
        Case("saturated rows with tiny weights", (tiny,)),
        Case("masked keys, dim=3 of a 4-D tensor", (masked,), {"dim": 3}),
        Case("float16 weights (3, 40)", (_weights_rows(153, 3, 40, std=3.0, dtype=torch.float16),),
             low_precision=True),
    ]


def _entropy_variant(*, guard: bool = True, log: Callable[[Tensor], Tensor] = torch.log, sign: float = -1.0,
                     last_axis: bool = False):
    """attention_entropy with one thing changed (for the mistakes)."""
    def attention_entropy(weights: Tensor, dim: int = -1) -> Tensor:
        p = weights.float() if weights.dtype in (torch.float16, torch.bfloat16) else weights
        if guard:
            terms = torch.where(p > 0, p * log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
        else:
            terms = p * log(p)  # 0 * log(0) = 0 * -inf = NaN
        return (sign * terms.sum(dim=-1 if last_axis else dim)).to(weights.dtype)
    return attention_entropy


register(Exercise(
    id="attention_entropy",
    chapter=3,
    reference=attention_entropy,
    section=f"{PAGE}#why-large-logits-stop-the-gradient",
    make_cases=_entropy_cases,
    mistakes=(
        Mistake("0 ln 0 computed as NaN",
                "a zero weight (a masked key, a one-hot row) gives 0 * log(0) = 0 * -inf = NaN; "
                "its term is 0, the limit of p ln p as p -> 0.", f"{PAGE}#why-large-logits-stop-the-gradient",
                _entropy_variant(guard=False)),
        Mistake("log base 2 instead of the natural log",
                "the entropy was computed in bits (log2); the course measures it in nats (ln), so "
                "that uniform weights over S keys give ln S.", f"{PAGE}#why-large-logits-stop-the-gradient",
                _entropy_variant(log=torch.log2)),
        Mistake("the minus sign forgotten",
                "sum p ln p is negative (each ln p <= 0); the entropy is -sum p ln p >= 0.",
                f"{PAGE}#why-large-logits-stop-the-gradient", _entropy_variant(sign=1.0)),
        Mistake("dim argument ignored",
                "the sum ran over the last axis whatever dim was; the keys may sit on another axis.",
                f"{PAGE}#without-the-scale-the-softmax-saturates", _entropy_variant(last_axis=True)),
    ),
    forbidden=NO_ATTNLIB + ("torch.special.entr", "torch.xlogy", "torch.special.xlogy", "torch.Tensor.xlogy",
                            "torch.distributions.Categorical"),
))
