"""What attention costs: the bytes of the score matrix and the FLOPs of its products
(chapter 8).

Two closed forms from chapter 8, "The maths":

* :func:`attention_score_bytes`: one ``(B, H, L, S)`` matrix of scores ``Z`` (or of
  weights ``P``, the same size) takes ``b * B * H * L * S`` bytes, ``b`` bytes per
  element;
* :func:`attention_flops`: the two matrix products ``Q K^T`` and ``P V`` take
  ``2 * L * S * (head_dim + head_dim_v)`` FLOPs per (batch element, head), which is
  ``4 * L * S * head_dim`` when values and keys have the same width.

A multiply-add counts as 2 FLOPs, the convention of ``torch.utils.flop_counter``, of
hardware peak figures and of the FlashAttention papers. Both counts are exact integers.
"""

from __future__ import annotations

import torch

from ._validate import check_positive_int

__all__ = ["attention_score_bytes", "attention_flops"]  # attnlib's public names from this module


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    return dtype


def attention_score_bytes(
    L: int,
    S: int,
    n_heads: int = 1,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes of one attention score matrix of shape ``(batch, n_heads, L, S)`` (chapter 8).

    ``bytes = b * batch * n_heads * L * S`` with ``b = dtype.itemsize`` bytes per element
    (4 for float32, 2 for float16/bfloat16). This is *one* ``(L, S)`` matrix per batch
    element and head: the scores ``Z`` or the weights ``P``. Naive attention holds at
    least one of them, and briefly both; the count does not include ``Q``, ``K``, ``V`` or
    the output, which are linear in ``L`` and ``S``. It equals
    ``attnlib.attention_weights(q, k).nbytes`` for inputs of that shape and dtype.

    Args:
        L: number of queries (``>= 0``).
        S: number of keys (``>= 0``).
        n_heads: number of (query) heads ``H``, ``>= 1``.
        batch: batch size ``B``, ``>= 1``.
        dtype: element type of the scores.

    Returns:
        The number of bytes, an ``int``.
    """
    check_positive_int(L, "L", allow_zero=True)
    check_positive_int(S, "S", allow_zero=True)
    check_positive_int(n_heads, "n_heads")
    check_positive_int(batch, "batch")
    return _check_dtype(dtype).itemsize * batch * n_heads * L * S


def attention_flops(
    L: int,
    S: int,
    head_dim: int,
    n_heads: int = 1,
    batch: int = 1,
    head_dim_v: int | None = None,
) -> int:
    """FLOPs of the two matrix products of attention, ``Q K^T`` and ``P V`` (chapter 8).

    Per batch element and head, ``Q K^T`` has ``L * S`` entries, each a dot product of
    ``head_dim`` multiply-adds, and ``P V`` has ``L * head_dim_v`` entries, each a sum of
    ``S`` multiply-adds. With 2 FLOPs per multiply-add::

        FLOPs = batch * n_heads * 2 * L * S * (head_dim + head_dim_v)
              = 4 * L * S * head_dim * n_heads * batch     when head_dim_v == head_dim

    Counted: only these two products, every score included (a causal mask applied after
    the scores are computed changes nothing). Not counted: the scaling, the mask, the
    softmax (about ``6 * L * S`` FLOPs per head, elementwise), dropout, and the projections
    before and after attention. This is exactly what ``torch.utils.flop_counter.FlopCounterMode``
    reports for :func:`attnlib.scaled_dot_product_attention`.

    Args:
        L: number of queries (``>= 0``).
        S: number of keys (``>= 0``).
        head_dim: width ``E`` of queries and keys, ``>= 1``.
        n_heads: number of query heads ``H``, ``>= 1`` (with GQA, the query heads: each of
            them does its own products).
        batch: batch size ``B``, ``>= 1``.
        head_dim_v: width ``Ev`` of the values; ``None`` means ``head_dim``.

    Returns:
        The number of FLOPs, an ``int``.
    """
    check_positive_int(L, "L", allow_zero=True)
    check_positive_int(S, "S", allow_zero=True)
    check_positive_int(head_dim, "head_dim")
    check_positive_int(n_heads, "n_heads")
    check_positive_int(batch, "batch")
    if head_dim_v is None:
        head_dim_v = head_dim
    else:
        head_dim_v = check_positive_int(head_dim_v, "head_dim_v")
    return batch * n_heads * 2 * L * S * (head_dim + head_dim_v)
