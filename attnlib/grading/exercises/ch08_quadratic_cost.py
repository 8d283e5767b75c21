"""Chapter 8, the quadratic cost of attention: the graded exercises and their mistakes.

===========================  =====================================
exercise id                  reference
===========================  =====================================
``attention_score_bytes``    :func:`attnlib.attention_score_bytes`
``attention_flops``          :func:`attnlib.attention_flops`
===========================  =====================================

Each mistake is a small wrong count with the reference's signature; the ``_*_mistake``
helpers compute every variant of one formula with flags, so a mistake differs from the
correct count in exactly one factor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...cost import attention_flops, attention_score_bytes
from ..core import Case, Exercise, Mistake, register
from .common import NO_ATTNLIB

PAGE = "08_quadratic_cost.html"


def _score_bytes_mistake(*, itemsize: Callable[[torch.dtype], int] = lambda d: d.itemsize,
                         square: bool = False, heads: bool = True, with_batch: bool = True,
                         matrices: int = 1) -> Callable[..., int]:
    def wrong(L: int, S: int, n_heads: int = 1, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        return (matrices * itemsize(dtype) * (batch if with_batch else 1) * (n_heads if heads else 1)
                * L * (L if square else S))
    return wrong


def _score_bytes_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("L = S = 1024, defaults (float32)", (1024, 1024)),
            Case("cross-attention L = 512, S = 77, 8 heads, batch 3, float16", (512, 77, 8, 3, torch.float16)),
            Case("L = 64, S = 200, 5 heads, batch 7, float64 (keywords)", (64, 200),
                 {"n_heads": 5, "batch": 7, "dtype": torch.float64}),
        ]
    return [
        Case("128K tokens, 32 heads, bfloat16", (131072, 131072, 32, 1, torch.bfloat16)),
        Case("decoding: L = 1, S = 4096", (1, 4096, 8, 4)),
        Case("no keys (S = 0)", (10, 0, 2, 2)),
        Case("int8 scores", (33, 17, 3, 2, torch.int8)),
    ]


register(Exercise(
    id="attention_score_bytes",
    chapter=8,
    reference=attention_score_bytes,
    section=f"{PAGE}#the-maths",
    make_cases=_score_bytes_cases,
    forbidden=NO_ATTNLIB,
    mistakes=(
        Mistake(
            "counting elements instead of bytes",
            "B * H * L * S counts scores; each takes dtype.itemsize bytes (4 in float32, 2 in "
            "float16).",
            f"{PAGE}#the-maths",
            _score_bytes_mistake(itemsize=lambda d: 1),
        ),
        Mistake(
            "counting bits instead of bytes",
            "The size per element was taken in bits (32 for float32); the function returns bytes.",
            f"{PAGE}#the-maths",
            _score_bytes_mistake(itemsize=lambda d: 8 * d.itemsize),
        ),
        Mistake(
            "counting Z and P together",
            "The function counts one (L, S) matrix per batch element and head, the scores Z or the "
            "weights P, which have the same size.",
            f"{PAGE}#the-maths",
            _score_bytes_mistake(matrices=2),
        ),
        Mistake(
            "L * L instead of L * S",
            "The score matrix is (L, S): L queries by S keys. They are equal only in "
            "self-attention; in cross-attention or decoding they differ.",
            f"{PAGE}#the-maths",
            _score_bytes_mistake(square=True),
        ),
        Mistake(
            "forgetting the heads",
            "Every head has its own score matrix: the count is multiplied by n_heads.",
            f"{PAGE}#the-maths",
            _score_bytes_mistake(heads=False),
        ),
        Mistake(
            "forgetting the batch",
            "Every sequence in the batch has its own score matrices: the count is multiplied by "
            "batch.",
            f"{PAGE}#the-maths",
            _score_bytes_mistake(with_batch=False),
        ),
        Mistake(
            "assuming 4 bytes per element whatever the dtype",
            "4 bytes is float32 only; use the dtype's itemsize (2 for float16, 8 for float64).",
            f"{PAGE}#the-maths",
            _score_bytes_mistake(itemsize=lambda d: 4),
        ),
    ),
))


def _flops_mistake(*, per_mac: int = 2, with_pv: bool = True, square: bool = False,
                   heads: bool = True, with_batch: bool = True,
                   pv_width_is_head_dim: bool = False) -> Callable[..., int]:
    def wrong(L: int, S: int, head_dim: int, n_heads: int = 1, batch: int = 1,
              head_dim_v: int | None = None) -> int:
        dv = head_dim if head_dim_v is None or pv_width_is_head_dim else head_dim_v
        pairs = L * (L if square else S)
        macs = pairs * (head_dim + (dv if with_pv else 0))
        return per_mac * macs * (n_heads if heads else 1) * (batch if with_batch else 1)
    return wrong


def _flops_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("L = S = 1024, head_dim = 64", (1024, 1024, 64)),
            Case("L = 10, S = 50, head_dim = 16, 4 heads, batch 3, head_dim_v = 8",
                 (10, 50, 16, 4, 3, 8)),
        ]
    return [
        Case("decoding: L = 1, S = 4096, 32 heads", (1, 4096, 128, 32)),
        Case("no queries (L = 0)", (0, 10, 8, 2, 2)),
        Case("L = 7, S = 3, head_dim = 5, head_dim_v = 9 (keywords)", (7, 3, 5),
             {"n_heads": 6, "batch": 2, "head_dim_v": 9}),
        Case("128K tokens, head_dim = 128", (131072, 131072, 128, 64, 1)),
    ]


register(Exercise(
    id="attention_flops",
    chapter=8,
    reference=attention_flops,
    section=f"{PAGE}#the-maths",
    make_cases=_flops_cases,
    forbidden=NO_ATTNLIB,
    mistakes=(
        Mistake(
            "counting one FLOP per multiply-add",
            "A multiply-add is two floating-point operations, a multiplication and an addition; "
            "that is how FlopCounterMode and hardware peak figures count.",
            f"{PAGE}#the-maths",
            _flops_mistake(per_mac=1),
        ),
        Mistake(
            "forgetting the P V product",
            "Attention does two matrix products: the scores Q K^T and the weighted sum P V, which "
            "costs 2 * L * S * head_dim_v FLOPs more.",
            f"{PAGE}#the-maths",
            _flops_mistake(with_pv=False),
        ),
        Mistake(
            "L * L instead of L * S",
            "There are L * S scores, L queries by S keys; L = S only in self-attention.",
            f"{PAGE}#the-maths",
            _flops_mistake(square=True),
        ),
        Mistake(
            "forgetting the heads",
            "Every head does its own two products: the count is multiplied by n_heads.",
            f"{PAGE}#the-maths",
            _flops_mistake(heads=False),
        ),
        Mistake(
            "forgetting the batch",
            "Every sequence of the batch does its own products: the count is multiplied by batch.",
            f"{PAGE}#the-maths",
            _flops_mistake(with_batch=False),
        ),
        Mistake(
            "counting P V with head_dim instead of head_dim_v",
            "P V is (L, S) times (S, head_dim_v): its cost depends on the width of the values, "
            "which may differ from that of the keys.",
            f"{PAGE}#the-maths",
            _flops_mistake(pv_width_is_head_dim=True),
        ),
    ),
))
