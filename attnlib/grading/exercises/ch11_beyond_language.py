"""Chapter 11, attention beyond language (images as patches): the graded exercises and
their catalogues of common mistakes.

===============  =========================
exercise id      reference
===============  =========================
``patchify``     :func:`attnlib.patchify`
``unpatchify``   :func:`attnlib.unpatchify`
===============  =========================

Each mistake is a small wrong implementation with the reference's signature; the
``_*_variant`` helpers compute every variant with a permutation, so a mistake differs from
the correct computation in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...vision import patchify, unpatchify
from ..core import Case, Exercise, Mistake, register
from .common import NO_ATTNLIB, generator, randn

PAGE = "11_beyond_language.html"


def _patchify_variant(order: tuple[int, ...], *, no_permute: bool = False) -> Callable[..., Tensor]:
    """Cut into (B, C, H/p, p, W/p, p) and permute by ``order`` before flattening."""
    def wrong(images: Tensor, patch_size: int) -> Tensor:
        B, C, H, W = images.shape
        p = patch_size
        if no_permute:
            return images.reshape(B, (H // p) * (W // p), C * p * p)
        x = images.reshape(B, C, H // p, p, W // p, p).permute(*order)
        return x.reshape(B, (H // p) * (W // p), C * p * p)
    return wrong


def _patchify_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("B = 2, C = 3, 8 x 12 image, p = 4", (randn(2, 3, 8, 12, seed=760), 4)),
            Case("B = 1, C = 2, 6 x 6 image, p = 3", (randn(1, 2, 6, 6, seed=761), 3)),
        ]
    g = generator(762)
    return [
        Case("p = 1", (randn(1, 2, 3, 4, seed=763), 1)),
        Case("one patch (p = H = W)", (randn(2, 3, 5, 5, seed=764), 5)),
        Case("grey-scale (C = 1), 4 x 10, p = 2", (randn(2, 1, 4, 10, seed=765), 2)),
        Case("tall image 12 x 4, p = 4", (randn(1, 3, 12, 4, seed=766), 4)),
        Case("uint8 image", (torch.randint(0, 256, (1, 3, 6, 9), generator=g, dtype=torch.uint8), 3)),
    ]


register(Exercise(
    id="patchify",
    chapter=11,
    reference=patchify,
    section=f"{PAGE}#the-maths",
    make_cases=_patchify_cases,
    forbidden=NO_ATTNLIB,
    mistakes=(
        Mistake(
            "patches flattened in (p, p, C) order",
            "Each patch is laid out channel first, then row, then column, (C, p, p), the order of "
            "a conv weight (D, C, p, p); (p, p, C) puts the channels last.",
            f"{PAGE}#the-code",
            _patchify_variant((0, 2, 4, 3, 5, 1)),
        ),
        Mistake(
            "patches in column-major order",
            "Patch n = r * (W / p) + c: left to right along a row of patches, then top to bottom; "
            "this went down each column first.",
            f"{PAGE}#an-image-is-a-sequence-of-patches",
            _patchify_variant((0, 4, 2, 1, 3, 5)),
        ),
        Mistake(
            "each patch transposed (columns before rows)",
            "Inside a patch the numbers go row by row, (C, p_row, p_col); flattening column by "
            "column transposes every patch.",
            f"{PAGE}#the-code",
            _patchify_variant((0, 2, 4, 1, 5, 3)),
        ),
        Mistake(
            "a reshape without a permute",
            "images.reshape(B, N, C * p * p) cuts the flat memory of the image into runs of "
            "C * p * p numbers, mostly pieces of pixel rows, not p x p squares: the patch axes "
            "must be moved together with a permute first.",
            f"{PAGE}#the-maths",
            _patchify_variant((), no_permute=True),
        ),
    ),
))


def _unpatchify_variant(grid: tuple[str, ...], order: tuple[int, ...]) -> Callable[..., Tensor]:
    """Reshape the patches to the 6 axes named by ``grid`` (from "h", "w", "C", "p1", "p2"
    after the batch axis), permute by ``order`` and reshape to (B, C, H, W); ``order = ()``
    reshapes straight to the image."""
    def wrong(patches: Tensor, patch_size: int, height: int, width: int) -> Tensor:
        B, N, P = patches.shape
        p = patch_size
        C = P // (p * p)
        if not order:
            return patches.reshape(B, C, height, width)
        sizes = {"h": height // p, "w": width // p, "C": C, "p1": p, "p2": p}
        x = patches.reshape(B, *(sizes[a] for a in grid)).permute(*order)
        return x.reshape(B, C, height, width)
    return wrong


def _unpatchify_cases(hidden: bool) -> list[Case]:
    def case(name: str, B: int, C: int, H: int, W: int, p: int, seed: int, **kw: Any) -> Case:
        patches = patchify(randn(B, C, H, W, seed=seed), p)  # (B, N, C * p * p)
        return Case(name, (patches, p, H, W), kw)
    if not hidden:
        return [
            case("B = 2, C = 3, 8 x 12 image, p = 4", 2, 3, 8, 12, 4, 770),
            case("B = 1, C = 2, 6 x 6 image, p = 3", 1, 2, 6, 6, 3, 771),
        ]
    g = generator(772)
    return [
        case("p = 1", 1, 2, 3, 4, 1, 773),
        case("one patch (p = H = W)", 2, 3, 5, 5, 5, 774),
        case("grey-scale (C = 1), 4 x 10, p = 2", 2, 1, 4, 10, 2, 775),
        case("tall image 12 x 4, p = 4, keywords", 1, 3, 12, 4, 4, 776),
        Case("uint8 patches", (torch.randint(0, 256, (1, 6, 27), generator=g, dtype=torch.uint8), 3, 6, 9)),
        Case("height and width as keywords, 6 x 4, p = 2", (randn(2, 6, 12, seed=777), 2),
             {"height": 6, "width": 4}),
    ]


register(Exercise(
    id="unpatchify",
    chapter=11,
    reference=unpatchify,
    section=f"{PAGE}#the-code",
    make_cases=_unpatchify_cases,
    forbidden=NO_ATTNLIB + ("torch.nn.functional.fold", "torch.nn.Fold"),
    mistakes=(
        Mistake(
            "patchify's permutation reused",
            "patchify moves the axes (B, C, H/p, p, W/p, p) by permute(0, 2, 4, 1, 3, 5); the "
            "inverse takes (B, H/p, W/p, C, p, p) back by the inverse permutation, (0, 3, 1, 4, 2, 5), "
            "not by the same one.",
            f"{PAGE}#the-code",
            _unpatchify_variant(("h", "w", "C", "p1", "p2"), (0, 2, 4, 1, 3, 5)),
        ),
        Mistake(
            "patch vectors read in (p, p, C) order",
            "Each patch vector is laid out channel first, (C, p, p), as patchify writes it; "
            "reading it as (p, p, C) scatters the channels over the pixels.",
            f"{PAGE}#the-code",
            _unpatchify_variant(("h", "w", "p1", "p2", "C"), (0, 5, 1, 3, 2, 4)),
        ),
        Mistake(
            "patches placed in column-major order",
            "Patch n sits at row n // (W / p) and column n % (W / p) of the patch grid (left to "
            "right, then top to bottom); this filled the grid column by column.",
            f"{PAGE}#an-image-is-a-sequence-of-patches",
            _unpatchify_variant(("w", "h", "C", "p1", "p2"), (0, 3, 2, 4, 1, 5)),
        ),
        Mistake(
            "a reshape without a permute",
            "patches.reshape(B, C, H, W) pours the numbers back in memory order, which is not "
            "the order of the image: the patch axes must be moved next to the pixel axes with a "
            "permute first.",
            f"{PAGE}#the-maths",
            _unpatchify_variant((), ()),
        ),
    ),
))
