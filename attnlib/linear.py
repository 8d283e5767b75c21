"""Linear attention: a feature map in place of the softmax (chapter 10).

Katharopoulos, Vyas, Pappas and Fleuret, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention" (ICML 2020). Replace the similarity
``exp(q . k / sqrt(d))`` by ``phi(q) . phi(k)`` for a positive feature map ``phi``; then

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j (phi(q_i) . phi(k_j))
          = phi(q_i)^T [sum_j phi(k_j) v_j^T] / phi(q_i)^T [sum_j phi(k_j)]

and the two bracketed sums do not depend on ``i``: compute them once, in
``O(S * E' * Ev)``, and every query reads them in ``O(E' * Ev)``. No ``L x S`` matrix.
Causally the sums run over ``j <= i``; carried from one position to the next they are
the state of a recurrent network, which is the paper's title.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ._validate import compute_dtype
from .attention import _check_qkv

__all__ = ["elu_feature_map", "linear_attention"]  # attnlib's public names from this module

CHUNK_SIZE = 64
"""Positions per chunk in causal :func:`linear_attention`.

A chunk costs a ``(c, c)`` block of weights per position group and the chunk states cost
``(L / c, E', Ev)``; with ``E' = Ev = 64`` the two balance at ``c = sqrt(E' * Ev) = 64``.
Measured on a 2-core CPU (one thread, d=64, L=4096..16384), 64 was the fastest of 32, 64,
128 and 256 or within about 10% of it; causal L=16384 takes about 0.04-0.08 s per head.
"""


def elu_feature_map(x: Tensor) -> Tensor:
    """The feature map phi(x) = elu(x) + 1 of Katharopoulos et al. (2020) (chapter 10).

    ``elu(x) + 1`` is ``x + 1`` for ``x > 0`` and ``exp(x)`` for ``x <= 0``: strictly
    positive, so every similarity ``phi(q) . phi(k)`` is positive and the normaliser of
    linear attention does not vanish. It is computed in that two-branch form rather than
    as ``F.elu(x) + 1``: ``(exp(x) - 1) + 1`` cancels catastrophically for negative ``x``
    and rounds to exactly 0 below about -17 in fp32, while ``exp(x)`` stays accurate and
    positive down to about -87. (The ``clamp`` keeps the unused branch from overflowing,
    which would turn the gradient into NaN.)

    Args:
        x: any shape, floating point.

    Returns:
        Tensor of the same shape and dtype, entries ``> 0`` (unless ``exp`` underflows).
    """
    return torch.where(x > 0, x + 1.0, torch.exp(x.clamp(max=0.0)))


def _causal_linear(
    q: Tensor, k: Tensor, v: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """Numerators and normalisers of causal linear attention, chunk by chunk.

    ``q``, ``k``: ``(..., L, E')`` features (through phi); ``v``: ``(..., L, Ev)``.
    Inside a chunk the ``(c, c)`` lower-triangular weights are used directly; all
    that comes before the chunk is summarised by the running state
    ``sum_j phi(k_j) v_j^T`` and normaliser ``sum_j phi(k_j)``, exclusive cumulative
    sums over the chunks.
    Returns ``(..., L, Ev)`` numerators and ``(..., L, 1)`` normalisers.
    """
    L = q.size(-2)
    if L == 0:
        return q.new_zeros(*q.shape[:-1], v.size(-1)), q.new_zeros(*q.shape[:-1], 1)
    nc = math.ceil(L / chunk)

    def chunks(x: Tensor) -> Tensor:  # (..., L, E) -> (..., nc, c, E), zero-padded
        x = torch.nn.functional.pad(x, (0, 0, 0, nc * chunk - L))
        return x.unflatten(-2, (nc, chunk))

    q, k, v = chunks(q), chunks(k), chunks(v)  # zero features add nothing to sums

    # Within each chunk: the small quadratic form, keys j <= i only.
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    a = (q @ k.transpose(-2, -1)).masked_fill(~tril, 0.0)  # (..., nc, c, c)
    num = a @ v  # (..., nc, c, Ev)
    den = a.sum(dim=-1, keepdim=True)  # (..., nc, c, 1)

    # Across chunks: the state of every chunk, summed over the chunks before it.
    state = k.transpose(-2, -1) @ v  # (..., nc, E', Ev): chunk sums of phi(k) v^T
    state = state.cumsum(dim=-3) - state  # (..., nc, E', Ev): exclusive prefix sum
    norm = k.sum(dim=-2, keepdim=True)  # (..., nc, 1, E')
    norm = norm.cumsum(dim=-3) - norm  # (..., nc, 1, E'): exclusive prefix sum
    num = num + q @ state  # (..., nc, c, Ev)
    den = den + (q * norm).sum(dim=-1, keepdim=True)  # (..., nc, c, 1)
    return num.flatten(-3, -2)[..., :L, :], den.flatten(-3, -2)[..., :L, :]


def linear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    causal: bool = False,
    feature_map: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Linear attention, ``O(L)`` in the sequence length (chapter 10).

    ``out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j))``, the sums
    over every key ``j`` or, with ``causal``, over ``j <= i``. This equals the quadratic
    form ``W = phi(Q) phi(K)^T`` (masked lower-triangular if causal), each row divided by
    its sum, times ``V``; but that ``L x S`` matrix is never built:

    * non-causal: ``phi(Q) (phi(K)^T V)``, reassociated, ``O(L * E' * Ev)``;
    * causal: chunks of :data:`CHUNK_SIZE` (64) positions; within a chunk the small
      masked quadratic form, across chunks a running state ``sum phi(k) v^T`` of shape
      ``(..., E', Ev)`` and normaliser ``sum phi(k)``. Memory ``O(L * 64 + L/64 * E' * Ev)``,
      never ``O(L^2)`` nor a per-position ``(L, E', Ev)`` cumulative sum.

    There is no softmax and no ``1/sqrt(E)`` scale (a scale cancels in the ratio). No eps
    is added to the denominator: with a positive feature map (the default) it is never
    zero. If a custom map (e.g. ReLU) gives a zero denominator, that row's numerator is
    zero too and its output is zero, like a fully masked row in softmax attention.
    Causal with ``L != S`` is aligned top-left, as ``is_causal`` in PyTorch: query ``i``
    sees keys ``0 .. i``.

    Args:
        query: ``(..., L, E)``, e.g. ``(B, H, L, head_dim)``.
        key: ``(..., S, E)``.
        value: ``(..., S, Ev)``.
        causal: position ``i`` sees only keys ``j <= i``.
        feature_map: ``phi``, applied to the last axis, ``(..., E) -> (..., E')`` with
            non-negative entries; ``None`` means :func:`elu_feature_map`.

    Returns:
        ``(..., L, Ev)`` in the query's dtype; fp16/bf16 are computed in fp32.
    """
    _check_qkv(query, key, value, enable_gqa=False)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    phi = elu_feature_map if feature_map is None else feature_map
    if not callable(phi):
        raise TypeError(f"feature_map must be callable or None, got {type(phi).__name__}")
    dtype = compute_dtype(query.dtype)
    q = phi(query.to(dtype))  # (..., L, E')
    k = phi(key.to(dtype))  # (..., S, E')
    v = value.to(dtype)  # (..., S, Ev)
    for name, x, feat in (("query", query, q), ("key", key, k)):
        if not isinstance(feat, Tensor) or feat.shape[:-1] != x.shape[:-1]:
            got = tuple(feat.shape) if isinstance(feat, Tensor) else type(feat).__name__
            raise ValueError(
                f"feature_map must map (..., n, E) to (..., n, E'), keeping every axis but "
                f"the last; for the {name} {tuple(x.shape)} it returned {got}"
            )
    if q.size(-1) != k.size(-1):
        raise ValueError(
            f"feature_map gave {q.size(-1)} features for the query but {k.size(-1)} for "
            f"the key; they must match"
        )

    return _linear_attention(q, k, v, causal).to(query.dtype)


def _linear_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """The core of :func:`linear_attention`, on features q = phi(Q), k = phi(K)."""
    if causal:
        num, den = _causal_linear(q, *_causal_keys(k, v, q.size(-2)), CHUNK_SIZE)
    else:
        state = k.transpose(-2, -1) @ v  # (..., E', Ev): sum_j phi(k_j) v_j^T
        norm = k.sum(dim=-2)  # (..., E'): sum_j phi(k_j)
        num = q @ state  # (..., L, Ev)
        den = q @ norm.unsqueeze(-1)  # (..., L, 1)
    return num / torch.where(den == 0, torch.ones_like(den), den)  # (..., L, Ev)


def _causal_keys(k: Tensor, v: Tensor, L: int) -> tuple[Tensor, Tensor]:
    """Keys and values aligned top-left with ``L`` queries: cut or zero-padded."""
    S = k.size(-2)
    if S > L:  # keys past the last query are never seen
        return k[..., :L, :], v[..., :L, :]
    pad = torch.nn.functional.pad  # queries past the last key see all keys
    return pad(k, (0, 0, 0, L - S)), pad(v, (0, 0, 0, L - S))  # length L
