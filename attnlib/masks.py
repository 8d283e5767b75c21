"""Boolean attention masks: ``True`` means the query may attend to the key (chapter 5).

This is the convention of ``torch.nn.functional.scaled_dot_product_attention``; note that
``torch.nn.MultiheadAttention`` uses the opposite one (``True`` = blocked).
The sparse patterns of chapter 10 live in :mod:`attnlib.sparse`; the long-context mask of
chapter 12 (a sliding window that keeps the first tokens, the attention sinks) is here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_positive_int, check_tensor

__all__ = ["causal_mask", "padding_mask", "sink_window_mask"]  # attnlib's public names from this module


def causal_mask(
    L: int, S: int | None = None, device: torch.device | str | None = None
) -> Tensor:
    """The causal mask: query ``i`` may attend to keys ``0..i`` (chapter 5).

    Aligned top-left, exactly as ``is_causal=True`` in PyTorch: with ``S > L`` the last
    ``S - L`` keys are never seen; with ``L > S`` the last queries see every key.

    Args:
        L: number of queries.
        S: number of keys; defaults to ``L``.
        device: where to build the mask.

    Returns:
        ``(L, S)`` boolean tensor, broadcastable against ``(B, H, L, S)`` scores.
    """
    S = _valid_sizes(L, S)  # S defaults to L
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


def padding_mask(lengths: Tensor, S: int) -> Tensor:
    """Mask out the padding keys of a batch of sequences of unequal length (chapter 5).

    Args:
        lengths: ``(B,)`` integer tensor; sequence ``b`` has real tokens at positions
            ``0 .. lengths[b] - 1`` and padding after them.
        S: padded length (number of keys).

    Returns:
        ``(B, 1, 1, S)`` boolean tensor, ``True`` at real tokens; it broadcasts against
        ``(B, H, L, S)`` scores. A sequence of length 0 masks every key, so its rows get
        zero weights (see :func:`attnlib.attention_weights`).
    """
    _validate_lengths(lengths, S)
    positions = torch.arange(S, device=lengths.device)  # (S,)
    return (positions[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)


def sink_window_mask(L: int, window: int, n_sink: int, S: int | None = None) -> Tensor:
    """A sliding window that also keeps the first ``n_sink`` keys: StreamingLLM's
    attention sinks (Xiao et al., 2023) on top of a Mistral-style window (chapter 12).

    Query ``i`` may attend to key ``j`` iff ``j <= i`` and (``i - j < window`` or
    ``j < n_sink``): the ``window`` most recent keys, itself included, and the first
    ``n_sink`` keys of the sequence however far back they are. Aligned top-left, as
    :func:`causal_mask` and ``is_causal=True``: with ``S > L`` the last keys are never
    seen.

    ``window`` counts tokens *including the current one* (Mistral's convention), where
    :func:`attnlib.sliding_window_mask` takes a reach: ``sink_window_mask(L, W, 0)``
    equals ``sliding_window_mask(L, W - 1, causal=True)``. With ``window >= S`` it is
    the causal mask.

    Args:
        L: number of queries.
        window: how many of the most recent keys each query sees, itself included
            (``>= 1``).
        n_sink: how many first keys every query sees as well (``>= 0``), if they are
            not in its future.
        S: number of keys; defaults to ``L``.

    Returns:
        ``(L, S)`` boolean tensor, ``True`` = may attend.
    """
    S = _valid_sizes(L, S)  # S defaults to L
    _valid_window(window, n_sink)
    i = torch.arange(L)[:, None]  # (L, 1): query positions
    j = torch.arange(S)[None, :]  # (1, S): key positions
    return (j <= i) & ((i - j < window) | (j < n_sink))  # (L, S)


def _valid_window(window: int, n_sink: int) -> None:
    """Check the window and sink counts of :func:`sink_window_mask`."""
    check_positive_int(window, "window")
    check_positive_int(n_sink, "n_sink", allow_zero=True)


def _valid_sizes(L: int, S: int | None) -> int:
    """Check the sizes of :func:`causal_mask`; return ``S`` (``None``: ``L``)."""
    check_positive_int(L, "L", allow_zero=True)
    return L if S is None else check_positive_int(S, "S", allow_zero=True)


def _validate_lengths(lengths: Tensor, S: int) -> None:
    """The argument checks of :func:`padding_mask`."""
    check_tensor(lengths, "lengths", min_ndim=1)
    if lengths.ndim != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be a 1-D integer tensor of shape (B,), got dtype {lengths.dtype} "
            f"and shape {tuple(lengths.shape)}"
        )
    check_positive_int(S, "S", allow_zero=True)
    if bool((lengths < 0).any()) or bool((lengths > S).any()):
        raise ValueError(f"every length must be between 0 and S={S}, got {lengths.tolist()}")
