"""Grouped-query attention: several query heads share one key/value head (chapter 6)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_positive_int, check_tensor

__all__ = ["repeat_kv"]  # attnlib's public names from this module


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """Repeat each key/value head ``n_rep`` times along the head axis (chapter 6).

    Heads are repeated *interleaved* (``repeat_interleave``), not tiled: with 2 KV heads
    and ``n_rep=3`` the result holds heads ``[0, 0, 0, 1, 1, 1]``, so query head ``h``
    reads KV head ``h // n_rep``. ``x.repeat`` would give ``[0, 1, 0, 1, 0, 1]``: a
    different (wrong) grouping.

    Args:
        x: ``(..., n_kv_heads, S, head_dim)``, usually ``(B, n_kv_heads, S, head_dim)``.
        n_rep: ``n_heads // n_kv_heads``; 1 returns ``x`` itself.

    Returns:
        ``(..., n_kv_heads * n_rep, S, head_dim)``.
    """
    check_tensor(x, "x", min_ndim=3)
    check_positive_int(n_rep, "n_rep")
    return _repeat_kv(x, n_rep)


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """The work of :func:`repeat_kv`: each KV head repeated in place ``n_rep`` times."""
    if n_rep == 1:
        return x
    *batch, n_kv, s, d = x.shape
    expanded = x.unsqueeze(-3).expand(*batch, n_kv, n_rep, s, d)  # (.., kv, rep, S, D)
    return expanded.reshape(*batch, n_kv * n_rep, s, d)  # (.., n_kv * n_rep, S, D)
