"""Chapter 11's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/11_beyond_language/`` and
``notebooks/11_beyond_language/`` from this file (see ``tools/exercises/__init__.py``); the
cases and named mistakes that grade the notebook are in
``attnlib/grading/exercises/ch11_beyond_language.py``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlib

from . import Exercise

INTRO = """\
A Vision Transformer reads an image as a sequence of patches. You write the cut, in the order
that makes it equal to ViT's convolutional patch embedding, and its inverse, which puts
patches back together into an image."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = ""


# patchify -----------------------------------------------------------------------------

def patchify(images: Tensor, patch_size: int) -> Tensor:
    B, C, H, W = images.shape
    p = patch_size
    tiles = images.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
    tiles = tiles.permute(0, 2, 3, 1, 4, 5)  # (B, H/p, W/p, C, p, p)
    return tiles.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C * p * p)


def explore_patchify() -> None:
    """An image and its patches; the patch embedding equals a strided convolution."""
    torch.manual_seed(0)
    image = torch.linspace(0, 1, 32 * 32).reshape(1, 1, 32, 32) * torch.tensor([1.0, 0.5, 0.2])[None, :, None, None]
    patches = patchify(image, 8)  # (1, 16, 192)
    print("shape:", tuple(patches.shape), " equal to attnlib:", torch.equal(patches, attnlib.patchify(image, 8)))
    weight = torch.randn(5, 3, 8, 8)
    conv = F.conv2d(image, weight, stride=8).flatten(2).transpose(1, 2)
    print("patchify @ W == conv2d:", torch.allclose(patches @ weight.reshape(5, -1).T, conv, atol=1e-5))
    fig, axes = plt.subplots(4, 4, figsize=(4, 4))
    for n, ax in enumerate(axes.flat):
        ax.imshow(patches[0, n].reshape(3, 8, 8).permute(1, 2, 0).numpy()); ax.axis("off")
    plt.show()


# Slow: Python loops over the batch, then the grid of patches (rows of patches, then columns),
# copying one (C, p, p) patch at a time into its row of the output.
def slow_patchify(images: Tensor, patch_size: int) -> Tensor:
    B, C, H, W = images.shape
    p = patch_size
    rows, cols = H // p, W // p  # the grid of patches
    out = images.new_zeros(B, rows * cols, C * p * p)  # same dtype as the images
    for b in range(B):
        for r in range(rows):
            for c in range(cols):
                patch = images[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p]  # (C, p, p)
                out[b, r * cols + c] = patch.reshape(C * p * p)
    return out


# unpatchify ---------------------------------------------------------------------------

def unpatchify(patches: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    B = patches.size(0)
    p = patch_size
    C = patches.size(-1) // (p * p)
    grid = patches.reshape(B, height // p, width // p, C, p, p)  # (B, H/p, W/p, C, p, p)
    grid = grid.permute(0, 3, 1, 4, 2, 5)  # (B, C, H/p, p, W/p, p)
    return grid.reshape(B, C, height, width)  # (B, C, H, W)


def explore_unpatchify() -> None:
    """A round trip, and an image whose patches were shuffled before being
    put back (a transformer without positions sees no difference between the two).
    """
    torch.manual_seed(0)
    image = torch.linspace(0, 1, 32 * 48).reshape(1, 1, 32, 48) * torch.tensor([1.0, 0.6, 0.3])[None, :, None, None]
    patches = patchify(image, 8)  # (1, 24, 192)
    print("unpatchify(patchify(x)) == x:", torch.equal(unpatchify(patches, 8, 32, 48), image))
    shuffled = unpatchify(patches[:, torch.randperm(patches.size(1))], 8, 32, 48)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].imshow(image[0].permute(1, 2, 0).numpy()); axes[0].set_title("image")
    axes[1].imshow(shuffled[0].permute(1, 2, 0).numpy()); axes[1].set_title("patches shuffled")
    for ax in axes:
        ax.axis("off")
    plt.show()


# Slow: Python loops over the batch, then the patches one at a time, each put back as a
# (C, p, p) block at its place in the grid.
def slow_unpatchify(patches: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    B = patches.size(0)
    p = patch_size
    C = patches.size(-1) // (p * p)
    rows, cols = height // p, width // p  # the grid of patches
    images = patches.new_zeros(B, C, height, width)  # same dtype as the patches
    for b in range(B):
        for n in range(rows * cols):
            r, c = n // cols, n % cols  # row-major
            images[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = patches[b, n].reshape(C, p, p)
    return images


EXERCISES = [
    Exercise(
        "patchify",
        points=4,
        solution=patchify,
        guide="""\
Cut `(B, C, H, W)` images into non-overlapping `p x p` patches and flatten each (Chapter 11,
section *An image is a sequence of patches*). Patches are numbered row-major (left to right,
then top to bottom); the `C * p * p` numbers of a patch are laid out channel first, then row,
then column, the order of a convolution weight `(D, C, p, p)`. Keep the dtype (images may be
`uint8`).""",
        hints=(
            "`images.unfold(2, p, p).unfold(3, p, p)` is `(B, C, H/p, W/p, p, p)`.",
            "Move the patch grid in front of the channels, then reshape to `(B, N, C * p * p)`.",
        ),
        explore=explore_patchify,
        slow=slow_patchify,
    ),
    Exercise(
        "unpatchify",
        points=3,
        solution=unpatchify,
        guide="""\
The inverse of `patchify` (Chapter 11, section *The code*): put `(B, N, C * p * p)` patches
back into `(B, C, H, W)` images, so that `unpatchify(patchify(x, p), p, H, W)` equals `x`
exactly. The patches are in `patchify`'s order: row-major over the grid of patches, each
vector laid out `(C, p, p)`. `C` follows from the last axis. Keep the dtype.""",
        hints=(
            "Reshape to `(B, H/p, W/p, C, p, p)`, then permute so that each grid axis sits next to its pixel axis: `(B, C, H/p, p, W/p, p)`; a reshape then merges them.",
            "The permutation is the inverse of patchify's, not the same one. `F.fold` is off limits.",
        ),
        explore=explore_unpatchify,
        slow=slow_unpatchify,
    ),
]
