"""How one output is compared with the reference's: type, shape, dtype, finiteness, values,
and the low-precision rule (:func:`_compare`), and whether an output is a catalogued mistake's
(:func:`_matches`). Used by :func:`attnlib.grading.core.judge`; never calls the learner's code."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .core import Case, Exercise

#: The floor added to twice the reference's own error in the low-precision rule.
LOW_PRECISION_FLOOR = 1e-6


def _describe_type(obj: Any) -> str:
    if obj is None:
        return "None"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} elements"
    t = type(obj)
    return f"a {t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else f"a {t.__name__}"


def _index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    idx = []
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    return tuple(reversed(idx))


def _abs_err(out: Tensor, ref: Tensor) -> Tensor:
    """|out - ref| in float64, 0 where both are equal (also equal infinities) or both NaN."""
    a, b = out.detach().double(), ref.detach().double()
    err = (a - b).abs()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    err = torch.where(same, torch.zeros_like(err), err)
    return torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)


def _tolerance(expected: Tensor, exercise: Exercise) -> Tensor:
    """atol + rtol * |expected| per entry; where ``expected`` is not finite only an exact
    match passes (:func:`_abs_err` is 0 there, or inf)."""
    mag = expected.detach().double().abs()
    mag = torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag))
    return exercise.atol + exercise.rtol * mag


def _fmt(x: float | bool | int) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


class _Failure(Exception):
    """A failed comparison: ``stage`` is type, shape, dtype, nonfinite or values."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage, self.message = stage, message


def _compare(out: Any, ref: Any, exact: Any, case: Case, exercise: Exercise, where: str) -> None:
    """Raise :class:`_Failure` at the first check ``out`` fails against ``ref``.

    ``exact`` is the reference evaluated in float64 on upcast inputs (low-precision cases
    only, else ``None``). ``where`` names the element inside a returned tuple.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)):
            raise _Failure("type", f"{prefix}returned {_describe_type(out)}; expected a tuple of "
                           f"{len(ref)} elements")
        if len(out) != len(ref):
            raise _Failure("type", f"{prefix}returned {_describe_type(out)}; expected a tuple of "
                           f"{len(ref)} elements")
        for i, (o, r) in enumerate(zip(out, ref)):
            e = None if exact is None else exact[i]
            _compare(o, r, e, case, exercise, f"{where}[{i}]" if where else f"element {i} of the returned tuple")
        return
    if not isinstance(ref, Tensor):
        _compare_scalar(out, ref, exercise, prefix)
        return

    # 1. type
    if type(out) is not Tensor:
        if out is None:
            msg = "returned None instead of a torch.Tensor: is a `return` missing?"
        elif isinstance(out, Tensor):
            msg = (f"returned {_describe_type(out)}, a subclass of torch.Tensor; return a plain "
                   f"torch.Tensor")
        elif type(out).__module__ == "numpy":
            msg = (f"returned {_describe_type(out)}; return a torch.Tensor (stay in torch: no "
                   f"numpy in between)")
        elif isinstance(out, (tuple, list)):
            msg = f"returned {_describe_type(out)}; expected a single torch.Tensor"
        else:
            msg = f"returned {_describe_type(out)}; expected a torch.Tensor"
        raise _Failure("type", prefix + msg)
    # 2. shape
    if out.shape != ref.shape:
        raise _Failure("shape", f"{prefix}wrong shape: got {tuple(out.shape)}, expected {tuple(ref.shape)}")
    # 3. dtype
    if out.dtype != ref.dtype:
        raise _Failure("dtype", f"{prefix}wrong dtype: got {out.dtype}, expected {ref.dtype}")
    out, ref = out.detach(), ref.detach()
    if out.device != ref.device:
        out = out.to(ref.device)
    # exact comparison for masks and integer tensors
    if not (ref.is_floating_point() or ref.is_complex()):
        diff = out != ref
        if bool(diff.any()):
            n = int(diff.sum())
            first = _index(int(diff.flatten().nonzero()[0]), ref.shape)
            raise _Failure("values", f"{prefix}{n} of {ref.numel()} entries differ, first at index "
                           f"{first}: got {_fmt(out[first].item())}, expected {_fmt(ref[first].item())}")
        return
    # 4. finiteness
    for label, bad in (("NaN", torch.isnan), ("inf", torch.isinf)):
        wrong = bad(out) & ~bad(ref)
        if bool(wrong.any()):
            first = _index(int(wrong.flatten().nonzero()[0]), ref.shape)
            raise _Failure("nonfinite", f"{prefix}the output holds {label} at {int(wrong.sum())} of "
                           f"{ref.numel()} positions (first at index {first}) where the expected "
                           f"result is {_fmt(ref[first].item())}")
    # 5. values
    if ref.numel() == 0:
        return
    if case.low_precision:
        assert exact is not None
        ours = _abs_err(out, exact)
        allowed = 2 * _abs_err(ref, exact).max().item() + LOW_PRECISION_FLOOR
        worst = ours.max().item()
        if worst > allowed:
            first = _index(int(ours.flatten().argmax()), ref.shape)
            raise _Failure("values", f"{prefix}too far from the exact (float64) result: largest error "
                           f"{worst:.3g} at index {first} (got {_fmt(out[first].item())}, exact "
                           f"{_fmt(exact[first].item())}); the reference run in {ref.dtype} is within "
                           f"{(allowed - LOW_PRECISION_FLOOR) / 2:.3g}, and {allowed:.3g} is allowed")
        return
    err = _abs_err(out, ref)
    bad = err > _tolerance(ref, exercise)
    if bool(bad.any()):
        first = _index(int(err.flatten().argmax()), ref.shape)
        raise _Failure("values", f"{prefix}wrong values at {int(bad.sum())} of {ref.numel()} positions: "
                       f"largest error {err.max().item():.3g} at index {first} (got "
                       f"{_fmt(out[first].item())}, expected {_fmt(ref[first].item())})")


def _compare_scalar(out: Any, ref: Any, exercise: Exercise, prefix: str) -> None:
    """Python numbers (e.g. a byte count): ints and bools exactly, floats with the tolerances."""
    if isinstance(ref, bool) or isinstance(ref, int):
        ok_type = type(out) is type(ref)
        if not ok_type:
            raise _Failure("type", f"{prefix}returned {_describe_type(out)}; expected a Python "
                           f"{type(ref).__name__}")
        if out != ref:
            raise _Failure("values", f"{prefix}got {out}, expected {ref}")
        return
    if isinstance(ref, float):
        if not isinstance(out, (float, int)) or isinstance(out, bool):
            raise _Failure("type", f"{prefix}returned {_describe_type(out)}; expected a Python float")
        if not math.isclose(out, ref, rel_tol=exercise.rtol, abs_tol=exercise.atol):
            raise _Failure("values", f"{prefix}got {out!r}, expected {ref!r}")
        return
    if out != ref:
        raise _Failure("values", f"{prefix}got {out!r}, expected {ref!r}")


def _matches(out: Any, candidate: Any, reference: Any, exact: Any, case: Case, exercise: Exercise) -> bool:
    """Whether ``out`` is (to the case's tolerance) the same as a mistake's output."""
    if isinstance(candidate, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(candidate):
            return False
        refs = reference if isinstance(reference, (tuple, list)) and len(reference) == len(candidate) \
            else [None] * len(candidate)
        exacts = exact if isinstance(exact, (tuple, list)) else [None] * len(candidate)
        return all(_matches(o, c, r, e, case, exercise) for o, c, r, e in zip(out, candidate, refs, exacts))
    if not isinstance(candidate, Tensor):
        try:
            _compare_scalar(out, candidate, exercise, "")
            return True
        except _Failure:
            return False
    if not isinstance(out, Tensor) or out.shape != candidate.shape or out.dtype != candidate.dtype:
        return False
    out, candidate = out.detach(), candidate.detach().to(out.device)
    if not (candidate.is_floating_point() or candidate.is_complex()):
        return bool(torch.equal(out, candidate))
    if out.numel() == 0:
        return True
    err = _abs_err(out, candidate)
    if case.low_precision and isinstance(reference, Tensor) and isinstance(exact, Tensor) \
            and reference.shape == exact.shape:
        allowed = 2 * _abs_err(reference, exact).max().item() + LOW_PRECISION_FLOOR
        return err.max().item() <= allowed
    return bool((err <= _tolerance(candidate, exercise)).all())
