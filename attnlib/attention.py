"""Scaled dot-product attention, written out by hand.

Taught in chapter 2 (queries, keys and values), chapter 3 (the 1/sqrt(d_k) scale, and
the entropy of the weights that shows what it prevents), chapter 5 (masks) and chapter 12
(logit soft-capping). Every
function here is checked against PyTorch in ``tests/test_attention.py``: the attention
functions against ``torch.nn.functional.scaled_dot_product_attention``, the entropy
against ``torch.special.entr``.

Each public function checks its arguments and then calls a private core that holds only
the idea (``_softmax``, ``_weights``, ``_attention``): the book shows the cores.

Conventions (the same as PyTorch's fused function):

* shapes are ``(..., L, E)`` for the query and ``(..., S, E)`` for key and value,
  usually ``(B, H, L, head_dim)``;
* a boolean mask holds ``True`` where a query **may attend** to a key;
* a floating-point mask is **added** to the scores before the softmax;
* ``is_causal=True`` with ``L != S`` is aligned **top-left**: query ``i`` sees keys
  ``0 .. i``, whatever ``S`` is (use an explicit mask or a :class:`~attnlib.KVCache`
  for the bottom-right alignment of decoding);
* a query row whose keys are all masked gets **all-zero weights and a zero output**,
  never NaN (PyTorch >= 2.5 does the same).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validate import check_floating, check_tensor, compute_dtype
from .gqa import repeat_kv
from .masks import causal_mask

__all__ = [  # attnlib's public names from this module
    "softmax",
    "attention_weights",
    "scaled_dot_product_attention",
    "attention_entropy",
    "softcap",
]


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Numerically stable softmax along ``dim`` (chapter 2).

    The row maximum is subtracted before exponentiating, so logits of 1e4 give no
    overflow; the result is unchanged because softmax(x) = softmax(x - c) for any c.
    A row that is entirely ``-inf`` (every key masked) returns zeros, not NaN.
    fp16/bf16 inputs are computed in fp32 and cast back.

    Args:
        x: logits of any shape, floating point.
        dim: the axis that sums to one.

    Returns:
        A tensor of the same shape and dtype as ``x``.
    """
    check_tensor(x, "x", min_ndim=0)
    check_floating(x, "x")
    return _softmax(x, dim)


def _softmax(x: Tensor, dim: int) -> Tensor:
    """softmax without the checks: shift by the row maximum, exponentiate, normalise."""
    z = x.to(compute_dtype(x.dtype))  # fp16/bf16 are computed in fp32
    row_max = z.amax(dim=dim, keepdim=True).detach()  # any constant c: the same result
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(z - row_max)  # every exponent <= 0: no overflow
    total = e.sum(dim=dim, keepdim=True)  # >= 1, unless the whole row is -inf
    total = torch.where(total == 0, torch.ones_like(total), total)  # masked row: 0 / 1
    return (e / total).to(x.dtype)


def _check_qkv(query: Tensor, key: Tensor, value: Tensor | None,
               enable_gqa: bool) -> None:
    check_tensor(query, "query", min_ndim=2)
    check_tensor(key, "key", min_ndim=2)
    check_floating(query, "query")
    tensors = {"key": key} if value is None else {"key": key, "value": value}
    if value is not None:
        check_tensor(value, "value", min_ndim=2)
    for name, t in tensors.items():
        if t.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but query has {query.dtype}; "
                            "they must match")
        if t.ndim != query.ndim:
            raise ValueError(
                f"query and {name} must have the same number of dimensions, got "
                f"{tuple(query.shape)} and {tuple(t.shape)}"
            )
    if key.size(-1) != query.size(-1):
        raise ValueError(
            f"query and key must share the last dimension E (the head_dim): query is "
            f"{tuple(query.shape)} (..., L, E), key is {tuple(key.shape)} (..., S, E)"
        )
    if value is not None and value.size(-2) != key.size(-2):
        raise ValueError(
            f"key and value must have the same length S: key is {tuple(key.shape)}, "
            f"value is {tuple(value.shape)} (..., S, Ev)"
        )
    if enable_gqa:
        if query.ndim < 3:
            raise ValueError("enable_gqa needs a head axis: shapes (..., H, L, E)")
        hq, hkv = query.size(-3), key.size(-3)
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(
                f"enable_gqa: the number of query heads ({hq}) must be a multiple of "
                f"the "
                f"number of key/value heads ({hkv})"
            )


def _check_mask(query: Tensor, key: Tensor, attn_mask: Tensor | None,
                enable_gqa: bool) -> None:
    """Raise if ``attn_mask`` is not bool/float or does not broadcast to the scores."""
    if attn_mask is None:
        return
    key_batch = tuple(key.shape[:-2])
    if enable_gqa:  # the key heads are repeated up to the query heads
        key_batch = (*key_batch[:-1], query.size(-3))
    try:
        batch = torch.broadcast_shapes(query.shape[:-2], key_batch)
    except RuntimeError:
        return  # q @ k^T raises PyTorch's own error, as it always has
    check_tensor(attn_mask, "attn_mask", min_ndim=0)
    scores_shape = torch.Size((*batch, query.size(-2), key.size(-2)))  # (..., L, S)
    try:
        shape = torch.broadcast_shapes(attn_mask.shape, scores_shape)
    except RuntimeError:
        shape = None
    if shape != scores_shape:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the "
            f"scores' shape {tuple(scores_shape)} (..., L, S)"
        )
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(
            f"attn_mask must be bool or floating point, got {attn_mask.dtype}")


def _check_args(query: Tensor, key: Tensor, value: Tensor | None,
                attn_mask: Tensor | None, enable_gqa: bool,
                dropout_p: float = 0.0) -> None:
    """Every argument check of the public attention functions, in one place."""
    _check_qkv(query, key, value, enable_gqa)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    _check_mask(query, key, attn_mask, enable_gqa)


def attention_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """The attention weights softmax(q k^T * scale + mask) (chapters 2, 3 and 5).

    Args:
        query: ``(..., L, E)``, e.g. ``(B, H, L, head_dim)``.
        key: ``(..., S, E)``; with ``enable_gqa`` its head axis (``-3``) may be smaller
            than the query's and is repeated with ``repeat_interleave`` (query head ``h``
            uses key head ``h // (H_q / H_kv)``).
        attn_mask: optional, broadcastable to ``(..., L, S)``. Boolean: ``True`` = may
            attend. Floating point: added to the scores.
        is_causal: apply the top-left aligned causal mask (query ``i`` sees keys
            ``0..i``). Combined with ``attn_mask`` if both are given.
        scale: multiplies the scores; default ``1 / sqrt(E)``.
        enable_gqa: allow fewer key heads than query heads (grouped-query attention).

    Returns:
        ``(..., L, S)`` weights in the query's dtype; each row sums to 1, or is all
        zeros if every key of that row is masked.
    """
    _check_args(query, key, None, attn_mask, enable_gqa)
    return _weights(query, key, attn_mask, is_causal, scale, enable_gqa).to(query.dtype)


def _weights(query: Tensor, key: Tensor, attn_mask: Tensor | None, is_causal: bool,
             scale: float | None, enable_gqa: bool) -> Tensor:
    """softmax(q k^T * scale + mask), unchecked, in fp32 for fp16/bf16 inputs."""
    dtype = compute_dtype(query.dtype)
    q, k = query.to(dtype), key.to(dtype)
    if enable_gqa:
        k = repeat_kv(k, q.size(-3) // k.size(-3))  # (..., H_q, S, E)
    L, S = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., L, S)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(L, S, device=q.device), float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))  # True = may attend
    elif attn_mask is not None:
        scores = scores + attn_mask.to(dtype)  # float masks are added
    return _softmax(scores, dim=-1)  # (..., L, S), each row sums to 1


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + mask) V, by hand (chapter 2).

    Same arguments and results as ``torch.nn.functional.scaled_dot_product_attention``;
    see :func:`attention_weights` for the mask conventions.

    Args:
        query: ``(..., L, E)``.
        key: ``(..., S, E)``.
        value: ``(..., S, Ev)``.
        attn_mask, is_causal, scale, enable_gqa: as in :func:`attention_weights`.
        dropout_p: probability of zeroing each weight (the rest are scaled by
            ``1 / (1 - dropout_p)``); applied whenever it is > 0, as PyTorch does.
        generator: random generator for the dropout, for reproducible runs.

    Returns:
        ``(..., L, Ev)`` in the query's dtype. fp16/bf16 are computed in fp32.
    """
    _check_args(query, key, value, attn_mask, enable_gqa, dropout_p)
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                      enable_gqa, generator)


def _attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
               dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
               generator: torch.Generator | None) -> Tensor:
    """scaled_dot_product_attention without the checks: the weights times the values."""
    weights = _weights(query, key, attn_mask, is_causal, scale, enable_gqa)
    if dropout_p > 0.0:
        draw = torch.rand(weights.shape, generator=generator, device=weights.device)
        weights = weights * (draw >= dropout_p) / (1.0 - dropout_p)  # inverted dropout
    v = value.to(weights.dtype)
    if enable_gqa:
        v = repeat_kv(v, query.size(-3) // v.size(-3))  # (..., H_q, S, Ev)
    return (weights @ v).to(query.dtype)  # (..., L, Ev)


def attention_entropy(weights: Tensor, dim: int = -1) -> Tensor:
    """Entropy ``H(p) = -sum_j p_j ln p_j`` of attention weights, in nats (chapter 3).

    It measures how spread a row of weights is: ``ln S`` for uniform weights over ``S``
    keys, 0 for a one-hot row. Without the ``1/sqrt(d_k)`` scale the rows of
    :func:`attention_weights` saturate and their entropy falls towards 0 as ``d_k`` grows.
    A weight of exactly 0 (a masked key, or an underflow) contributes ``0 ln 0 = 0``, the
    limit of ``p ln p``, never NaN; so a fully masked row (all zeros) has entropy 0.
    fp16/bf16 inputs are computed in fp32 and cast back.

    Args:
        weights: non-negative weights of any shape, e.g. ``(B, H, L, S)`` from
            :func:`attention_weights`; each row along ``dim`` sums to 1 (or is all zeros).
        dim: the axis of the keys, summed over.

    Returns:
        ``weights``' shape without ``dim`` (e.g. ``(B, H, L)``), in ``weights``' dtype.
    """
    check_tensor(weights, "weights", min_ndim=1)
    check_floating(weights, "weights")
    p = weights.to(compute_dtype(weights.dtype))
    positive = p > 0
    safe = torch.where(positive, p, torch.ones_like(p))  # log 1 = 0 where p = 0
    zero = torch.zeros_like(p)
    terms = torch.where(positive, -p * torch.log(safe), zero)  # 0 ln 0 = 0
    return terms.sum(dim=dim).to(weights.dtype)


def softcap(scores: Tensor, cap: float) -> Tensor:
    """Logit soft-capping, ``cap * tanh(scores / cap)`` (Gemma 2, 2024; chapter 12).

    Scores far below ``cap`` pass nearly unchanged (``tanh(x) ~ x`` for small ``x``); large
    ones are squashed smoothly into ``(-cap, cap)``, so no score can grow without bound and
    no softmax row collapses onto one key however large the logits become. Gemma 2 caps its
    attention scores at 50 and its final logits at 30. fp16/bf16 inputs are computed in fp32
    and cast back.

    Args:
        scores: attention scores (or logits) of any shape.
        cap: the bound, a positive number.

    Returns:
        ``scores``' shape and dtype, every value between ``-cap`` and ``cap``.
    """
    check_tensor(scores, "scores", min_ndim=0)
    check_floating(scores, "scores")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"cap must be a positive finite number, got {cap!r}")
    return _softcap(scores, cap)


def _softcap(scores: Tensor, cap: float) -> Tensor:
    """:func:`softcap` without the checks."""
    x = scores.to(compute_dtype(scores.dtype))  # fp32 for fp16/bf16
    return (cap * torch.tanh(x / cap)).to(scores.dtype)  # in (-cap, cap)
