"""Graded exercises of chapter 5 (self-attention, cross-attention, masks): the cases and the
catalogue of common mistakes.

==================================  ==========================================
exercise id                          reference
==================================  ==========================================
``causal_mask``                      :func:`attnlib.causal_mask`
``padding_mask``                     :func:`attnlib.padding_mask`
==================================  ==========================================

Every mistake below is a function with the reference's signature. The chapter's
cross-attention cases belong to ``MultiHeadAttention.forward``
(:mod:`.ch04_multi_head`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...masks import causal_mask, padding_mask
from ..core import Case, Exercise, Mistake, register
from .common import NO_ATTNLIB

PAGE = "05_self_cross_masks.html"


# --------------------------------------------------------------------------- causal_mask


def _causal_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [Case("L=4", (4,)), Case("L=3, S=6", (3, 6)), Case("L=5, S=2", (5, 2))]
    return [Case("L=1", (1,)), Case("L=1, S=6 (one new query)", (1, 6)), Case("L=7, S=7 given", (7, 7)),
            Case("L=0 (empty)", (0,)), Case("L=6, S=1", (6, 1)), Case("S as keyword", (2,), {"S": 5})]


def _causal_bottom_right(L: int, S: int | None = None, device: object = None) -> Tensor:
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool).tril(S - L)


def _causal_strict(L: int, S: int | None = None, device: object = None) -> Tensor:
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool).tril(-1)


def _causal_inverted(L: int, S: int | None = None, device: object = None) -> Tensor:
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool).triu(1)


def _causal_float(L: int, S: int | None = None, device: object = None) -> Tensor:
    S = L if S is None else S
    return torch.zeros(L, S).masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))


def _causal_square(L: int, S: int | None = None, device: object = None) -> Tensor:
    return torch.ones(L, L, dtype=torch.bool).tril()


register(Exercise(
    id="causal_mask",
    chapter=5,
    reference=causal_mask,
    section=f"{PAGE}#the-maths",
    make_cases=_causal_cases,
    mistakes=(
        Mistake("aligned bottom-right",
                "with L != S the triangle was shifted by S - L; this mask is aligned top-left "
                "(query i sees keys 0..i), like is_causal=True.",
                f"{PAGE}#is-causal-when-l-s-top-left-or-bottom-right", _causal_bottom_right),
        Mistake("strict triangle (no diagonal)",
                "query i may also attend to key i itself: keep the diagonal (tril, not tril(-1)).",
                f"{PAGE}#the-maths", _causal_strict),
        Mistake("inverted polarity (True = blocked)",
                "True marks the future keys here; in this course (and in "
                "torch.nn.functional.scaled_dot_product_attention) True means may attend.",
                f"{PAGE}#two-boolean-conventions-one-operation", _causal_inverted),
        Mistake("float mask instead of bool",
                "an additive 0/-inf float mask was returned; this function returns a boolean "
                "mask, True where attention is allowed.",
                f"{PAGE}#two-boolean-conventions-one-operation", _causal_float),
        Mistake("S ignored",
                "the mask is L x L whatever S is; it must be (L, S).",
                f"{PAGE}#is-causal-when-l-s-top-left-or-bottom-right", _causal_square),
    ),
    forbidden=NO_ATTNLIB,
))


# --------------------------------------------------------------------------- padding_mask


def _padding_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [Case("lengths [3, 5, 1], S=5", (torch.tensor([3, 5, 1]), 5)),
                Case("lengths [2, 4], S=6", (torch.tensor([2, 4]), 6))]
    return [Case("a sequence of length 0", (torch.tensor([0, 3]), 4)),
            Case("no padding at all", (torch.tensor([4, 4, 4]), 4)),
            Case("B=1, S=1", (torch.tensor([1]), 1)),
            Case("int32 lengths", (torch.tensor([5, 1, 6, 2], dtype=torch.int32), 7)),
            Case("S as keyword", (torch.tensor([2, 1]),), {"S": 3})]


def _positions(lengths: Tensor, S: int) -> tuple[Tensor, Tensor]:
    return torch.arange(S)[None, :], lengths[:, None]


def _pad_2d(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return pos < n


def _pad_le(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return (pos <= n)[:, None, None, :]


def _pad_inverted(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return (pos >= n)[:, None, None, :]


def _pad_float(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return torch.zeros(len(lengths), S).masked_fill(pos >= n, float("-inf"))[:, None, None, :]


def _pad_queries(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return (pos < n)[:, None, :, None]


def _pad_left(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return (pos >= S - n)[:, None, None, :]


register(Exercise(
    id="padding_mask",
    chapter=5,
    reference=padding_mask,
    section=f"{PAGE}#padding-masks-for-a-batch-of-unequal-lengths",
    make_cases=_padding_cases,
    mistakes=(
        Mistake("shape (B, S), not broadcastable",
                "a (B, S) mask does not broadcast against (B, H, L, S) scores (it would line B up "
                "with L); return (B, 1, 1, S).",
                f"{PAGE}#padding-masks-for-a-batch-of-unequal-lengths", _pad_2d),
        Mistake("<= instead of <",
                "position j is real when j < length; with <= the first padding key stays visible.",
                f"{PAGE}#the-maths", _pad_le),
        Mistake("inverted polarity (True = padding)",
                "True marks the padding here; in this course True means the key may be attended.",
                f"{PAGE}#two-boolean-conventions-one-operation", _pad_inverted),
        Mistake("float mask instead of bool",
                "an additive 0/-inf float mask was returned; this function returns a boolean mask.",
                f"{PAGE}#two-boolean-conventions-one-operation", _pad_float),
        Mistake("queries masked instead of keys",
                "the mask has shape (B, 1, S, 1), so it blocks query rows; padding is masked on the "
                "key axis, (B, 1, 1, S).",
                f"{PAGE}#padding-masks-for-a-batch-of-unequal-lengths", _pad_queries),
        Mistake("padding assumed on the left",
                "the real tokens were taken to be the last `length` positions; here they are "
                "positions 0 .. length - 1 and the padding follows them.",
                f"{PAGE}#padding-masks-for-a-batch-of-unequal-lengths", _pad_left),
    ),
    forbidden=NO_ATTNLIB,
))
