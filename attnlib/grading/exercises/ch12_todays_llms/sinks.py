"""``sink_window_mask``: its cases and mistakes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ....masks import sink_window_mask
from ...core import Case, Exercise, Mistake, register
from .sections import SINKS


def _sink_variant(*, reach: bool = False, sinks_see_future: bool = False, bottom_right: bool = False,
                  no_diagonal: bool = False, sinks: bool = True) -> Callable[..., Tensor]:
    """The mask with one thing changed: ``reach`` (``i - j <= window``), ``sinks_see_future``
    (``j < n_sink`` without ``j <= i``), ``bottom_right`` (query i at position i + S - L),
    ``no_diagonal`` (the window is the ``window`` keys before the query, not itself),
    ``sinks=False`` (no sinks)."""
    def wrong(L: int, window: int, n_sink: int, S: int | None = None) -> Tensor:
        S = L if S is None else S
        i = torch.arange(L)[:, None] + (S - L if bottom_right else 0)  # (L, 1)
        j = torch.arange(S)[None, :]  # (1, S)
        back = i - j
        if no_diagonal:
            near = (back >= 1) & (back <= window)
        else:
            near = (back >= 0) & ((back <= window) if reach else (back < window))
        sink = (j < n_sink) & (j <= i) if not sinks_see_future else (j < n_sink)
        return near | sink if sinks else near
    return wrong


def _sink_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("L = 8, window 3, 2 sinks", (8, 3, 2)),
            Case("S = 10 > L = 6 (top-left), window 2, 1 sink", (6, 2, 1, 10)),
            Case("S = 4 < L = 7, window 2, 1 sink", (7, 2, 1, 4)),
            Case("window 1 (itself only), no sinks, L = 5", (5, 1, 0)),
        ]
    return [
        Case("window >= S: the causal mask", (6, 9, 1)),
        Case("window = S exactly, 2 sinks", (5, 5, 2)),
        Case("more sinks than queries (n_sink 7, L = 4)", (4, 2, 7)),
        Case("L = 0 (no queries)", (0, 3, 1)),
        Case("S = 0 (no keys), S as a keyword", (3, 2, 1), {"S": 0}),
        Case("L = S = 12, window 4, no sinks", (12, 4, 0)),
        Case("S = 16 > L = 9, window 3, 4 sinks, S as a keyword", (9, 3, 4), {"S": 16}),
        Case("L = 1 (one query), window 2, 1 sink, S = 5", (1, 2, 1, 5)),
    ]


register(Exercise(
    id="sink_window_mask",
    chapter=12,
    reference=sink_window_mask,
    section=SINKS,
    make_cases=_sink_cases,
    # The other masks are the learner's building blocks (causal_mask is also what every
    # TransformerBlock of this notebook calls); the ready-made window masks are off limits.
    forbidden=("attnlib.sink_window_mask", "attnlib.masks.sink_window_mask", "attnlib.sliding_window_mask",
               "attnlib.sparse.sliding_window_mask"),
    mistakes=(
        Mistake(
            "window off by one (i - j <= window)",
            "window counts the keys a query sees, itself included: keys i - window + 1 .. i, so "
            "i - j < window. With <= each query sees window + 1 recent keys.",
            SINKS,
            _sink_variant(reach=True),
        ),
        Mistake(
            "sinks in the future allowed (j < n_sink without j <= i)",
            "A sink is one of the first n_sink keys, seen by every query that comes after it; a "
            "query before it must not see it: the causal rule j <= i holds for the sinks too.",
            SINKS,
            _sink_variant(sinks_see_future=True),
        ),
        Mistake(
            "aligned bottom-right",
            "The mask is aligned top-left, as causal_mask and is_causal=True: query i is at "
            "position i whatever S is. Shifting the queries by S - L is the alignment of decoding "
            "with a cache.",
            "05_self_cross_masks.html#is-causal-when-l-s-top-left-or-bottom-right",
            _sink_variant(bottom_right=True),
        ),
        Mistake(
            "the query itself left out of the window",
            "The window is the window most recent keys including the query's own position: keys "
            "i - window + 1 .. i. Taking the window keys before it (i - window .. i - 1) drops the "
            "diagonal.",
            SINKS,
            _sink_variant(no_diagonal=True),
        ),
        Mistake(
            "sinks left out",
            "Besides the window, every query sees the first n_sink keys of the sequence (if they "
            "are not in its future): (j < n_sink) & (j <= i), joined to the window with |.",
            SINKS,
            _sink_variant(sinks=False),
        ),
    ),
))
