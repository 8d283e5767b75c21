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

from ..secret import salted

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


def generator(seed: int) -> torch.Generator:
    """A fresh generator seeded with ``seed``, or, while hidden cases are drawn with the
    course's secret (:mod:`attnlib.grading.secret`), with a seed derived from both."""
    return torch.Generator().manual_seed(salted(seed))


def randn(*shape: int, seed: int, std: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    """Seeded standard-normal tensor times ``std`` (drawn in float64, then cast)."""
    g = generator(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * std).to(dtype)


def rand_bool(*shape: int, seed: int, p: float = 0.6) -> Tensor:
    """Random boolean mask, ``True`` with probability ``p``, with the first key always True
    on every row so that no row is fully masked by accident."""
    g = generator(seed)
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


# Low-precision cases whose scores all lie far from 0 (chapters 2-4, 6 and 9): every score of a
# row near -HUGE_SCORE, where exp underflows to 0 unless the row's maximum is subtracted first
# (and a running maximum started at 0 instead of -inf makes every weight 0), or near
# +HUGE_SCORE, where exp overflows to inf. 8192 = 2**13 is past the range of exp in float64 too.
HUGE_SCORE = 8192.0


def grid(*shape: int, seed: int, step: float = 0.125, bound: float = 4.0, std: float = 1.0,
         dtype: torch.dtype = F64) -> Tensor:
    """Seeded normal numbers times ``std``, rounded to multiples of ``step`` (a power of 2) and
    clipped to ``[-bound, bound]``: exact in bfloat16 and float32, and so are the sums of
    their products, in any order (no rounding in the scores of the huge-score cases)."""
    x = randn(*shape, seed=seed, std=std)
    return ((x / step).round() * step).clamp(-bound, bound).to(dtype)


def huge_score_qk(lead: tuple[int, ...], L: int, S: int, E: int, *, seed: int,
                  dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    """Queries ``(*lead, L, E)`` and keys ``(*lead, S, E)`` whose scores with the default scale
    ``1 / sqrt(E)`` are ``-HUGE_SCORE`` plus a spread of a few units on even indices of the
    first leading axis, and ``+HUGE_SCORE`` plus a spread on odd ones. Coordinate 0 carries the
    offset (each query ``HUGE_SCORE * sqrt(E) / 16``, each key ``+-16``), the others are
    :func:`grid` numbers. ``E`` must be a power of 4 so that the scale is a power of 2 and
    every score is exact in float32 (and in float32 from bfloat16 inputs)."""
    root = math.isqrt(E)
    assert root * root == E and root & (root - 1) == 0, f"E = {E} must be a power of 4"
    q = grid(*lead, L, E, seed=seed)
    k = grid(*lead, S, E, seed=seed + 1)
    sign = torch.tensor([-1.0, 1.0], dtype=F64).repeat(lead[0])[: lead[0]]  # (lead[0],)
    q[..., 0] = HUGE_SCORE * root / 16
    k[..., 0] = 16.0 * sign.reshape(-1, *([1] * (len(lead))))
    return q.to(dtype), k.to(dtype)


def binade_values(*shape: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    """Seeded values in ``[1.03125, 1.96875]``, multiples of 1/32 (exact in bfloat16): every
    weighted average of them stays in ``[1, 2)``, one binade, so that an output's rounding
    error is the same size everywhere. Then the low-precision rule (twice the reference's own
    error) also accepts a route that is a little less precise than the reference, such as
    weights rounded to bfloat16 before they multiply the values, as it does on the other
    low-precision cases; with values of both signs near 0 it would not, by chance of the seed."""
    return (1.5 + grid(*shape, seed=seed, step=1 / 32, std=0.2, bound=0.46875)).to(dtype)
