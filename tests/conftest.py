"""Shared test helpers: seeded random tensors, the low-precision error rule, and a module
fixture that runs torch on one thread."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# Without a GPU, Triton must be in interpreter mode before any test imports it: its library
# is built for one mode at import (attnlib.triton_flash refuses the other, with a message).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def randn(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """A standard-normal tensor from its own seeded generator (no global RNG state)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def assert_low_precision_ok(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor,
                            floor: float = 1e-6) -> None:
    """The flash-attn rule: our low-precision error against an fp64 reference is at most
    twice PyTorch's own low-precision error (plus a tiny floor)."""
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    our_err = (ours.double() - exact).abs().max().item()
    their_err = (theirs.double() - exact).abs().max().item()
    assert our_err <= 2 * their_err + floor, f"ours {our_err:.3g} vs torch {their_err:.3g}"


def same_value(a: object, b: object) -> bool:
    """Exact structural equality: tensors (dtype, shape, values), tuples/lists, dicts, scalars."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while a module's tests run, the setting restored afterwards: for tiny
    tensors a second thread only adds hand-off overhead (much of it on a busy machine), and one
    thread makes training runs repeatable. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
