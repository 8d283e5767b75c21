"""What the chapters' exercise modules share: seeded inputs and the names a graded call may
not use. Chapter-specific helpers live in their chapter's module; a later chapter imports
what an earlier one introduced from that module.

Every input is deterministic: each tensor comes from its own seeded ``torch.Generator``
(the global RNG is never touched), float64 unless a case is about a dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

F64 = torch.float64

# Names a graded call may not use (see :attr:`attnlib.grading.core.Exercise.forbidden`).
NO_ATTNLIB = ("attnlib",)
NO_SOFTMAX = ("torch.softmax", "torch.nn.functional.softmax", "torch.Tensor.softmax",
              "torch.special.softmax", "torch.nn.Softmax")
NO_FUSED = ("torch.nn.functional.scaled_dot_product_attention",)
# The heads exercises may reuse an attention function (their own, attnlib's or PyTorch's);
# only ready-made multi-head modules are off limits.
NO_MHA = ("attnlib.MultiHeadAttention", "torch.nn.MultiheadAttention",
          "torch.nn.functional.multi_head_attention_forward")


def randn(*shape: int, seed: int, std: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    """Seeded standard-normal tensor times ``std`` (drawn in float64, then cast)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * std).to(dtype)


def rand_bool(*shape: int, seed: int, p: float = 0.6) -> Tensor:
    """Random boolean mask, ``True`` with probability ``p``, with the first key always True
    on every row so that no row is fully masked by accident."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(*shape, generator=g) < p
    m[..., 0] = True
    return m


def state_dict(cls: type, init_args: tuple, seed: int, dtype: torch.dtype = F64) -> dict[str, Tensor]:
    """Random weights for ``cls(*init_args)``: each tensor N(0, 1/fan_in), seeded."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in cls(*init_args).state_dict().items()}
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        fan_in = shape[-1] if len(shape) > 1 else shape[0]
        out[name] = randn(*shape, seed=seed * 100 + i, std=1.0 / math.sqrt(fan_in), dtype=dtype)
    return out


def clone_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Fresh copies of the tensors among a case's top-level arguments."""

    def fresh(x: Any) -> Any:
        return x.detach().clone() if isinstance(x, Tensor) else x

    return tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()}
