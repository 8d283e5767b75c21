"""Images as token sequences: cutting an image into patches and back (chapter 11).

A Vision Transformer (Dosovitskiy et al., 2021) never sees pixels one by one. It cuts a
``(C, H, W)`` image into non-overlapping ``p x p`` patches, flattens each patch into a
vector of ``C * p * p`` numbers and projects it linearly to ``d_model``: from then on a
patch is a token like any word. A 224 x 224 RGB image with ``p = 16`` becomes
``14 * 14 = 196`` tokens of ``3 * 16 * 16 = 768`` numbers.

* :func:`patchify`: ``(B, C, H, W)`` images -> ``(B, N, C * p * p)`` patches, in
  row-major order (left to right, then top to bottom), each flattened in ``(C, p, p)``
  order. With that order, a linear layer on the patches is exactly the strided
  convolution that ViT code usually writes::

      patchify(x, p) @ W.reshape(D, -1).T
          == conv2d(x, W, stride=p).flatten(2).transpose(1, 2)   # W: (D, C, p, p)

* :func:`unpatchify`: the inverse, back to ``(B, C, H, W)``.
"""

from __future__ import annotations

from torch import Tensor

from ._validate import check_positive_int, check_tensor

__all__ = ["patchify", "unpatchify"]  # attnlib's public names from this module


def _validate_images(images: object, patch_size: int) -> tuple[int, int, int, int]:
    """Check a ``(B, C, H, W)`` batch of images whose sides are multiples of ``patch_size``."""
    check_tensor(images, "images", min_ndim=0)
    if images.ndim != 4:
        raise ValueError(
            f"images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}; "
            f"add a batch axis with images[None] for a single image"
        )
    check_positive_int(patch_size, "patch_size")
    B, C, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(
            f"image height and width must be divisible by patch_size={patch_size}, "
            f"got H={H}, W={W} (crop or pad the image first)"
        )
    return B, C, H, W


def _validate_patches(
    patches: object, patch_size: int, height: int, width: int
) -> tuple[int, int, int]:
    """Check ``(B, N, C * p * p)`` patches against the image size they should rebuild."""
    check_tensor(patches, "patches", min_ndim=0)
    if patches.ndim != 3:
        raise ValueError(
            f"patches must be 3-D (B, N, C * p * p), got shape {tuple(patches.shape)}"
        )
    check_positive_int(patch_size, "patch_size")
    check_positive_int(height, "height")
    check_positive_int(width, "width")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"height and width must be divisible by patch_size={patch_size}, "
            f"got height={height}, width={width}"
        )
    B, N, P = patches.shape
    n_expected = (height // patch_size) * (width // patch_size)
    if N != n_expected:
        raise ValueError(
            f"a {height} x {width} image in {patch_size} x {patch_size} patches has "
            f"{n_expected} patches, got N={N}"
        )
    if P % (patch_size * patch_size):
        raise ValueError(
            f"the last axis of patches must be C * patch_size**2 = "
            f"C * {patch_size * patch_size}, got {P}"
        )
    return B, P // (patch_size * patch_size), N


def _patchify(images: Tensor, p: int) -> Tensor:
    """The computation of :func:`patchify`, on checked arguments."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, H/p, p, W/p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p): patch grid first
    return x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C * p * p)


def _unpatchify(patches: Tensor, p: int, height: int, width: int) -> Tensor:
    """The computation of :func:`unpatchify`, on checked arguments."""
    B, C = patches.shape[0], patches.shape[2] // (p * p)
    x = patches.reshape(B, height // p, width // p, C, p, p)  # (B, H/p, W/p, C, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, H/p, p, W/p, p): channel first
    return x.reshape(B, C, height, width)  # (B, C, H, W)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping square patches, one flat vector each (chapter 11).

    Patch ``n = r * (W / p) + c`` is the block of rows ``r*p .. r*p + p - 1`` and columns
    ``c*p .. c*p + p - 1`` (row-major: left to right, then top to bottom). Its ``C * p * p``
    numbers are laid out channel first, then row, then column, the order of a conv weight
    ``(D, C, p, p)``, so ``patchify(x, p) @ W.reshape(D, -1).T`` equals the ViT patch
    embedding ``conv2d(x, W, stride=p).flatten(2).transpose(1, 2)``.

    Args:
        images: ``(B, C, H, W)``, with ``H`` and ``W`` multiples of ``patch_size``.
        patch_size: side ``p`` of a square patch (16 in ViT-Base/16).

    Returns:
        ``(B, N, C * p * p)`` with ``N = (H / p) * (W / p)``; same dtype and device.
    """
    _validate_images(images, patch_size)
    return _patchify(images, patch_size)


def unpatchify(patches: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """Put patches back together into images: the inverse of :func:`patchify` (chapter 11).

    Args:
        patches: ``(B, N, C * p * p)`` in the order :func:`patchify` produces.
        patch_size: side ``p`` of a square patch.
        height, width: size ``H, W`` of the image to rebuild; multiples of ``p``, with
            ``N = (H / p) * (W / p)``.

    Returns:
        ``(B, C, H, W)``; ``unpatchify(patchify(x, p), p, H, W)`` equals ``x`` exactly.
    """
    _validate_patches(patches, patch_size, height, width)
    return _unpatchify(patches, patch_size, height, width)
