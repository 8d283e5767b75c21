"""Chapter 5's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/05_self_cross_masks/`` and
``notebooks/05_self_cross_masks/`` from this file (see ``tools/exercises/__init__.py``); the
cases and named mistakes that grade the notebook are in
``attnlib/grading/exercises/ch05_self_cross_masks.py``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from torch import Tensor

import attnlib

from . import Exercise

INTRO = """\
You build the two masks of everyday attention: the causal mask of a decoder and the padding
mask of a batch of sequences of unequal length. Both use the convention `True` = may attend."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = ""


# causal_mask --------------------------------------------------------------------------

def causal_mask(
    L: int, S: int | None = None, device: torch.device | str | None = None
) -> Tensor:
    if S is None:
        S = L
    rows = torch.arange(L, device=device)[:, None]  # (L, 1): query i
    cols = torch.arange(S, device=device)[None, :]  # (1, S): key j
    return cols <= rows  # (L, S) bool


# Slow: loops over the query rows i and the key positions j, one entry at a time.
def slow_causal_mask(
    L: int, S: int | None = None, device: torch.device | str | None = None
) -> Tensor:
    if S is None:
        S = L
    mask = torch.zeros(L, S, dtype=torch.bool, device=device)  # (L, S), all blocked
    for i in range(L):  # query i
        for j in range(S):  # key j
            if j <= i:
                mask[i, j] = True
    return mask


# padding_mask -------------------------------------------------------------------------

def padding_mask(lengths: Tensor, S: int) -> Tensor:
    positions = torch.arange(S, device=lengths.device)  # (S,)
    real = positions[None, :] < lengths[:, None]  # (B, S)
    return real[:, None, None, :]  # (B, 1, 1, S)


# Slow: loops over the sequences b of the batch and the key positions j, one entry at a time.
def slow_padding_mask(lengths: Tensor, S: int) -> Tensor:
    B = lengths.size(0)
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=lengths.device)  # all padding
    for b in range(B):
        n = int(lengths[b])  # real tokens of sequence b
        for j in range(S):
            if j < n:
                mask[b, 0, 0, j] = True
    return mask


def explore_padding_mask() -> None:
    """A causal mask and a padding mask, yours beside attnlib's."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    axes[0].imshow(causal_mask(5, 8).numpy()); axes[0].set_title("causal_mask(5, 8)")
    axes[1].imshow(padding_mask(torch.tensor([3, 6, 1]), 6)[:, 0, 0].numpy()); axes[1].set_title("padding, lengths 3, 6, 1")
    axes[2].imshow(attnlib.causal_mask(5, 8).numpy()); axes[2].set_title("attnlib.causal_mask(5, 8)")
    plt.show()
    print("causal masks equal:", torch.equal(causal_mask(5, 8), attnlib.causal_mask(5, 8)))


EXERCISES = [
    Exercise(
        "causal_mask",
        points=2,
        solution=causal_mask,
        guide="""\
Return the `(L, S)` boolean mask in which query `i` may attend to keys `0..i` (Chapter 5,
section *`is_causal` when `L != S`: top-left or bottom-right*). It is aligned top-left, as
`is_causal=True` in PyTorch: with `S > L` the last keys are never seen, with `L > S` the
last queries see every key. `S=None` means `S = L`; build it on `device`.""",
        hints=(
            "Compare a column of query indices with a row of key indices: `j <= i` broadcasts to `(L, S)`.",
            "Or: `torch.ones(L, S, dtype=torch.bool).tril()`. Check `L = 0` too.",
        ),
        slow=slow_causal_mask,
    ),
    Exercise(
        "padding_mask",
        points=3,
        solution=padding_mask,
        guide="""\
Sequence `b` of a padded batch has real tokens at positions `0 .. lengths[b] - 1` and
padding after them (Chapter 5, section *Padding masks for a batch of unequal lengths*).
Return a `(B, 1, 1, S)` boolean mask, `True` at real tokens, which broadcasts against
`(B, H, L, S)` scores. A sequence of length 0 masks every key.""",
        hints=(
            "`torch.arange(S)[None, :] < lengths[:, None]` is `(B, S)`.",
            "Two singleton axes, for heads and queries: `[:, None, None, :]`.",
            "Build the positions on `lengths.device`.",
        ),
        explore=explore_padding_mask,
        slow=slow_padding_mask,
    ),
]
