"""Input checks shared by every public function: one place for the error messages."""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(x: object, name: str, min_ndim: int = 1) -> Tensor:
    """Raise a clear error unless ``x`` is a tensor with at least ``min_ndim`` dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}"
        )
    return x


def check_floating(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_positive_int(value: object, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: fp16/bf16 are computed in fp32 (as fused kernels
    accumulate in fp32) and cast back at the end; fp32 and fp64 run as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
