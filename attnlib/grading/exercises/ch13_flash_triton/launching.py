"""What chapter 13's two kernel exercises share: the launchers, the seeded inputs, the
source check of what the interpreter cannot show, and the registration."""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import math
import os
import sys
import textwrap
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ....kernel_lint import lint_kernel_source
from ....triton_flash import INTERPRETED, flash_backward, flash_forward
from ...core import Case, Exercise, Mistake, mistake_message, register, section_url
from ..common import NO_FUSED, NO_SOFTMAX, generator

import triton  # after attnlib.triton_flash, which chooses the interpreter

PAGE = "13_flash_triton.html"
MODEL = f"{PAGE}#triton-s-programming-model"
FORWARD = f"{PAGE}#the-forward-kernel"
BACKWARD = f"{PAGE}#the-backward-kernel-and-dq"
UNSEEN = f"{PAGE}#what-the-interpreter-cannot-show"
TOP_LEFT = "05_self_cross_masks.html#is-causal-when-l-s-top-left-or-bottom-right"

#: What a graded kernel may not call or launch (see the package's docstring).
FORBIDDEN = ("attnlib.triton_flash.flash_fwd_kernel", "attnlib.triton_flash.flash_bwd_kernel",
             "attnlib.triton_flash.flash_attention_triton", "attnlib.attention", "attnlib.flash") \
    + NO_FUSED + NO_SOFTMAX


# ============================================================================ launching


def _device() -> str:
    """Where the kernels run: the CPU under the interpreter, else the GPU."""
    return "cpu" if INTERPRETED else "cuda"


def _is_kernel(obj: Any) -> bool:
    """A Triton kernel: an object of Triton's own classes (``@triton.jit``, and
    ``@triton.autotune`` and the like around it) over a Python function."""
    return _kernel_function(obj) is not None and \
        (getattr(type(obj), "__module__", "") or "").split(".")[0] == "triton"


def _check_kernel(kernel: Any, name: str) -> None:
    if not (_is_kernel(kernel) or isinstance(kernel, _Variant)):
        raise TypeError(f"{name} must be a Triton kernel (a function decorated with @triton.jit), "
                        f"got {type(kernel).__name__}")


def _scores(q: Tensor, k: Tensor, is_causal: bool, scale: float | None) -> Tensor:
    """The float64 scores, masked top-left (the exact side of the low-precision rule)."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), -math.inf)
    return s


def launch_forward(kernel: Any, query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
                   scale: float | None = None) -> tuple[Tensor, Tensor]:
    """``flash_forward(..., kernel=kernel)`` on the kernels' device: ``(out, lse)`` on the CPU.
    Float64 inputs (the low-precision rule's exact run): the exact ``(out, lse)``, in float64."""
    if query.dtype == torch.float64:
        s = _scores(query, key, is_causal, scale)
        return torch.softmax(s, dim=-1) @ value, torch.logsumexp(s, dim=-1)
    _check_kernel(kernel, "flash_fwd_kernel")
    q, k, v = (t.to(_device()) for t in (query, key, value))
    out, lse = flash_forward(q, k, v, is_causal, scale, kernel=kernel)
    return out.cpu(), lse.cpu()


def launch_backward(kernel: Any, query: Tensor, key: Tensor, value: Tensor, output: Tensor, lse: Tensor,
                    grad_output: Tensor, is_causal: bool = False,
                    scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``flash_backward(..., kernel=kernel)`` on the kernels' device: ``(dq, dk, dv)`` on the
    CPU. Float64 inputs: the exact gradients of attention, in float64 (from the scores, not
    from ``output`` and ``lse``, which the kernels take as the forward pass rounded them)."""
    if query.dtype == torch.float64:
        s = _scores(query, key, is_causal, scale)
        p = torch.softmax(s, dim=-1)
        out = p @ value
        ds = p * (grad_output @ value.transpose(-2, -1) - (grad_output * out).sum(-1, keepdim=True))
        sc = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
        return sc * ds @ key, sc * ds.transpose(-2, -1) @ query, p.transpose(-2, -1) @ grad_output
    _check_kernel(kernel, "flash_bwd_kernel")
    dev = _device()
    tensors = [t.to(dev) for t in (query, key, value, output, lse, grad_output)]
    dq, dk, dv = flash_backward(*tensors, is_causal, scale, kernel=kernel)
    return dq.cpu(), dk.cpu(), dv.cpu()


class _Variant:
    """A catalogued mistake: ``kernel`` launched with some of its ``tl.constexpr`` switches
    set (``kernel[grid](*args, **switches)``); ``fn`` is the kernel's function, whose source
    the extra check reads."""

    def __init__(self, kernel: Any, **switches: Any) -> None:
        self.kernel, self.switches, self.fn = kernel, switches, kernel.fn
        self.__name__ = kernel.fn.__name__

    def __getitem__(self, grid: Any) -> Any:
        run = self.kernel[grid]
        return lambda *args, **kwargs: run(*args, **kwargs, **self.switches)


# ============================================================================ the source check


#: Builtins a kernel may call (Triton compiles these; anything else of Python's it does not).
_KERNEL_BUILTINS = frozenset({"range", "min", "max", "float", "int", "bool", "abs", "len", "print",
                              "isinstance"})


def _kernel_function(kernel: Any) -> types.FunctionType | None:
    """The Python function of a Triton kernel (through ``@triton.autotune`` and the like)."""
    for _ in range(5):
        if isinstance(kernel, types.FunctionType):
            return kernel
        kernel = getattr(kernel, "fn", None)
    return None


_TRITON_DIR = os.path.dirname(os.path.abspath(triton.__file__)) + os.sep


def _is_triton(obj: Any) -> bool:
    """Triton itself: one of its modules (the one imported under that name, from Triton's own
    files), a function or object of Triton's, or a ``@triton.jit`` kernel."""
    if isinstance(obj, types.ModuleType):
        return sys.modules.get(obj.__name__) is obj and \
            os.path.abspath(getattr(obj, "__file__", None) or "").startswith(_TRITON_DIR)
    return _is_kernel(obj) or (getattr(obj, "__module__", "") or "").split(".")[0] == "triton"


def _learner_kernels(fn: types.FunctionType, tree: ast.AST) -> list[types.FunctionType]:
    """The functions of the kernels ``fn`` calls that are not Triton's own (the learner's
    ``@triton.jit`` helpers): their sources are checked too."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            obj = fn.__globals__.get(node.func.id)
            helper = _kernel_function(obj) if _is_kernel(obj) else None
            if helper is not None and not os.path.abspath(helper.__code__.co_filename).startswith(_TRITON_DIR):
                found.append(helper)
    return found


def _foreign_calls(fn: types.FunctionType, tree: ast.AST) -> list[tuple[int, str]]:
    """The calls in a kernel's source of something that is neither Triton nor a method of one
    of the kernel's own values: ``(line, dotted name)``."""
    local = {a.arg for node in ast.walk(tree) if isinstance(node, ast.arguments)
             for a in node.posonlyargs + node.args + node.kwonlyargs}
    local |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        parts, target = [], node.func
        while isinstance(target, ast.Attribute):
            parts.append(target.attr)
            target = target.value
        if not isinstance(target, ast.Name):
            continue  # a method of a computed value: (a + b).to(...)
        root = target.id
        dotted = ".".join([root, *reversed(parts)])
        if root in local:
            continue  # a method of one of the kernel's values, or a constexpr
        if root in fn.__globals__:
            if _is_triton(fn.__globals__[root]):
                continue
        elif hasattr(builtins, root) and root in _KERNEL_BUILTINS and not parts:
            continue
        found.append((node.lineno, dotted))
    return found


def _kernel_source_check(kernel: Any, case: Case, *, race: Mistake | None, no_other: Mistake) -> str | None:
    """What the values cannot show under the interpreter, read from the kernel's source (and
    from the learner's ``@triton.jit`` helpers it calls): a ``tl.store`` racing with other
    programs (``race``), a masked ``tl.load`` without ``other=`` (``no_other``), and calls of
    anything but Triton inside a kernel."""
    if isinstance(kernel, _Variant):  # a catalogued mistake: its switches are its own
        kernel = kernel.kernel
    fn = _kernel_function(kernel) if _is_kernel(kernel) else None
    if fn is None:
        return (f"not a Triton kernel ({type(kernel).__name__}): write the kernel as a function decorated "
                f"with @triton.jit. See {section_url(MODEL)}.")
    todo, seen = [fn], set()
    while todo:
        fn = todo.pop(0)
        if fn in seen or len(seen) > 20:
            continue
        seen.add(fn)
        name = fn.__name__
        try:
            source = textwrap.dedent(inspect.getsource(fn))
            tree = ast.parse(source)
        except (OSError, TypeError, SyntaxError):
            return (f"the grader could not read the source of {name}, which it checks for what the "
                    f"interpreter cannot show: define the kernel with @triton.jit in a cell of the notebook. "
                    f"See {section_url(UNSEEN)}.")
        where = f"{name}, line {{}} of the kernel (its @triton.jit line is 1)"
        for line, dotted in _foreign_calls(fn, tree):
            return (f"{where.format(line)} calls {dotted}: a kernel may call only Triton's language (tl.*), "
                    f"other @triton.jit functions and the builtins {', '.join(sorted(_KERNEL_BUILTINS))}. Under "
                    f"the interpreter any Python runs inside a kernel; on a GPU this kernel would not compile. "
                    f"See {section_url(MODEL)}.")
        problems = lint_kernel_source(source)
        for kind, mistake in (("race", race), ("unmasked-other", no_other)):
            for p in problems:
                if p.kind == kind and mistake is not None:
                    return mistake_message(mistake, f"{where.format(p.line)}: {p.message}")
        todo += _learner_kernels(fn, tree)
    return None


def _register_kernel(ex_id: str, reference: Any, section: str, make_cases: Callable[[bool], list[Case]],
                     mistakes: tuple[Mistake, ...], launch: Callable[..., Any], *, race: Mistake | None,
                     no_other: Mistake) -> Exercise:
    """Register one of the chapter's two kernel exercises: its ``extra_check`` is the source
    check, naming ``race`` and ``no_other`` (:func:`_kernel_source_check`)."""
    return register(Exercise(
        id=ex_id,
        chapter=13,
        reference=reference,
        section=section,
        make_cases=make_cases,
        mistakes=mistakes,
        forbidden=FORBIDDEN,
        extra_check=functools.partial(_kernel_source_check, race=race, no_other=no_other),
        launch=launch,
    ))


# ============================================================================ inputs


def _qkv(B: int, H: int, L: int, S: int, D: int, seed: int, dtype: torch.dtype,
         std: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded ``(B, H, L, D)`` queries and ``(B, H, S, D)`` keys (times ``std``) and values,
    drawn in float64 and rounded to ``dtype``."""
    g = generator(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * std
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64) * std
    v = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


F32, F16 = torch.float32, torch.float16
