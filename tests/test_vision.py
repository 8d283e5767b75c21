"""Tests for attnlib.vision (chapter 11): patchify and unpatchify."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlib.vision import patchify, unpatchify
from conftest import randn


@pytest.mark.parametrize(
    "B, C, H, W, p, D",
    [
        (1, 1, 8, 8, 4, 5),
        (2, 3, 16, 16, 4, 7),
        (2, 3, 12, 20, 4, 6),  # not square
        (3, 1, 9, 6, 3, 4),  # odd patch size
        (1, 3, 32, 32, 16, 8),  # ViT's patch size
        (2, 3, 5, 5, 5, 3),  # one patch per image
        (1, 3, 4, 6, 1, 2),  # p = 1: every pixel a token
    ],
)
def test_linear_on_patches_is_the_strided_conv(
    B: int, C: int, H: int, W: int, p: int, D: int
) -> None:
    x = randn(B, C, H, W, seed=1)
    weight = randn(D, C, p, p, seed=2)  # a ViT patch-embedding conv weight
    bias = randn(D, seed=3)
    ours = patchify(x, p) @ weight.reshape(D, -1).T + bias  # (B, N, D)
    conv = F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)  # (B, N, D)
    assert ours.shape == (B, (H // p) * (W // p), D)
    torch.testing.assert_close(ours, conv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.int64])
def test_shape_dtype_and_round_trip(dtype: torch.dtype) -> None:
    x = (randn(2, 3, 12, 8, seed=4) * 10).to(dtype)
    patches = patchify(x, 4)
    assert patches.shape == (2, 3 * 2, 3 * 4 * 4)
    assert patches.dtype == dtype
    assert torch.equal(unpatchify(patches, 4, 12, 8), x)


def test_unpatchify_then_patchify_is_identity() -> None:
    patches = randn(2, 6, 2 * 3 * 3, seed=5)
    assert torch.equal(patchify(unpatchify(patches, 3, 6, 9), 3), patches)


def test_patch_order_is_row_major() -> None:
    # A 2-channel image of 3 x 4 patches of side 2, where patch (row r, column c) is filled
    # with the constant 10 * r + c in channel 0 and -(10 * r + c) in channel 1.
    p, rows, cols = 2, 3, 4
    value = 10.0 * torch.arange(rows)[:, None] + torch.arange(cols)[None, :]  # (rows, cols)
    channel = value.repeat_interleave(p, 0).repeat_interleave(p, 1)  # (rows * p, cols * p)
    image = torch.stack([channel, -channel])[None]  # (1, 2, 6, 8)
    patches = patchify(image, p)[0]  # (12, 2 * p * p)
    # left to right, then top to bottom
    expected = [10.0 * r + c for r in range(rows) for c in range(cols)]
    for n, v in enumerate(expected):
        assert torch.equal(patches[n, : p * p], torch.full((p * p,), v)), n  # channel 0 first
        assert torch.equal(patches[n, p * p :], torch.full((p * p,), -v)), n  # then channel 1


def test_within_patch_order_is_channel_row_column() -> None:
    # One patch of a (C=2, 2, 3) image is simply the image flattened in (C, row, column) order.
    image = torch.arange(2 * 2 * 3, dtype=torch.float64).reshape(1, 2, 2, 3)
    with pytest.raises(ValueError, match="divisible"):
        patchify(image, 2)
    square = torch.arange(2 * 3 * 3, dtype=torch.float64).reshape(1, 2, 3, 3)
    assert torch.equal(patchify(square, 3)[0, 0], torch.arange(18, dtype=torch.float64))


def test_patchify_keeps_gradients() -> None:
    x = randn(1, 3, 8, 8, seed=6).requires_grad_()
    (patchify(x, 4) * torch.arange(48.0, dtype=torch.float64)).sum().backward()
    assert x.grad is not None
    assert torch.equal(patchify(x.grad, 4)[0, 0], torch.arange(48.0, dtype=torch.float64))


@pytest.mark.parametrize(
    "images, p, exc, words",
    [
        (torch.zeros(3, 8, 8), 4, ValueError, "4-D"),
        (torch.zeros(1, 1, 3, 8, 8), 4, ValueError, "4-D"),
        (torch.zeros(1, 3, 10, 8), 4, ValueError, "divisible"),
        (torch.zeros(1, 3, 8, 10), 4, ValueError, "divisible"),
        (torch.zeros(1, 3, 8, 8), 0, ValueError, ">= 1"),
        (torch.zeros(1, 3, 8, 8), 2.0, TypeError, "int"),
        ([[1.0]], 1, TypeError, "torch.Tensor"),
    ],
)
def test_patchify_errors(images: object, p: object, exc: type, words: str) -> None:
    with pytest.raises(exc, match=words):
        patchify(images, p)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "shape, p, height, width, words",
    [
        ((1, 4, 12), 2, 4, 4, None),  # valid: control
        ((4, 12), 2, 4, 4, "3-D"),
        ((1, 5, 12), 2, 4, 4, "has 4 patches"),
        ((1, 4, 10), 2, 4, 4, "C \\* patch_size"),
        ((1, 4, 12), 2, 4, 5, "divisible"),
        ((1, 4, 12), 2, 0, 4, ">= 1"),
    ],
)
def test_unpatchify_errors(
    shape: tuple[int, ...], p: int, height: int, width: int, words: str | None
) -> None:
    patches = torch.zeros(shape)
    if words is None:
        assert unpatchify(patches, p, height, width).shape == (1, 3, 4, 4)
        return
    with pytest.raises(ValueError, match=words):
        unpatchify(patches, p, height, width)
