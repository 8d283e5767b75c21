"""A static check of Triton kernels for what Triton's CPU interpreter cannot show (chapter 13).

The interpreter runs a kernel's programs one after another, so two programs that write the
same address never collide there, though they race on a GPU; and some constructs behave
differently, or fail, in particular Triton versions or under the interpreter only. This
module reads a kernel's *source* (no Triton needed) and names those problems:

* ``race``: a ``tl.store`` whose address does not depend on every program axis the kernel
  uses. Two programs that differ only along the missing axis write the same addresses: a
  data race on a GPU, invisible under the interpreter. The classic case is FlashAttention's
  backward with one program per key block writing dQ, which every key block contributes to:
  accumulate with ``tl.atomic_add``, or give each program its own buffer and reduce after.
* ``unmasked-other``: a masked ``tl.load`` without ``other=``: the masked-off lanes hold
  unspecified values (zeros under the interpreter, often not on a GPU), which then flow into
  ``tl.dot``, ``tl.max`` or ``tl.sum``.
* ``version``: constructs that fail or are deprecated in the Triton versions probed for this
  course (``block_ptr.advance()`` and ``*_ptr.type.element_ty`` fail in 3.8, use
  ``tl.advance`` and ``X.dtype.element_ty``; ``tl.make_block_ptr`` is deprecated in favour
  of tensor descriptors; 3.6's interpreter fails on ``range(tl.cdiv(...))`` with numpy 2.4).
* ``interpreter``: ``bfloat16`` in a kernel: the interpreter computes it wrongly (numpy has
  no bfloat16); test it on a GPU only.

The check follows names through assignments inside one kernel: ``pid_m = tl.program_id(0)``,
``rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)``, ``ptrs = Q + rows[:, None] * D`` make
``ptrs`` depend on axis 0. A loop variable depends on no axis, even when the loop's bounds
do: across its iterations it sweeps a range that other programs sweep too. It is a
heuristic on the source, not a proof: it can miss a race hidden behind a helper function,
and it trusts a store whose address names every axis.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

__all__ = ["KernelProblem", "lint_kernel_source"]


@dataclass(frozen=True)
class KernelProblem:
    """One problem found in a kernel's source (chapter 13).

    Attributes:
        kernel: the ``@triton.jit`` function's name.
        line: the line number in the source given.
        kind: ``"race"``, ``"unmasked-other"``, ``"version"`` or ``"interpreter"``.
        message: what is wrong and what to write instead.
    """

    kernel: str
    line: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kernel}, line {self.line} [{self.kind}]: {self.message}"


def lint_kernel_source(source: str) -> list[KernelProblem]:
    """The problems of every ``@triton.jit`` kernel in ``source`` (chapter 13).

    Args:
        source: Python source text holding one or more kernels (a module, a notebook
            cell).

    Returns:
        The problems found, in source order; an empty list when there are none.

    Raises:
        SyntaxError: the source is not valid Python.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str of Python code, got {type(source).__name__}")
    tree = ast.parse(source)
    problems: list[KernelProblem] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
            problems += _lint_kernel(node)
    return sorted(problems, key=lambda p: (p.line, p.kind))


def _is_jit(decorator: ast.expr) -> bool:
    """``@triton.jit``, ``@jit``, ``@triton.jit(...)``."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Attribute) and target.attr == "jit") or \
        (isinstance(target, ast.Name) and target.id == "jit")


def _tl_call(node: ast.AST, name: str) -> bool:
    """Is ``node`` a call of ``tl.<name>`` (or ``triton.language.<name>``)?"""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == name):
        return False
    owner = node.func.value
    return (isinstance(owner, ast.Name) and owner.id in ("tl", "language")) or \
        (isinstance(owner, ast.Attribute) and owner.attr == "language")


def _axes_of(expr: ast.AST, axes: dict[str, set[int]]) -> set[int]:
    """The program axes ``expr`` depends on, through ``tl.program_id`` and named values."""
    found: set[int] = set()
    for sub in ast.walk(expr):
        if _tl_call(sub, "program_id"):
            arg = sub.args[0] if sub.args else next(
                (k.value for k in sub.keywords if k.arg == "axis"), None)
            if isinstance(arg, ast.Constant) and isinstance(arg.value, int):
                found.add(arg.value)
        elif isinstance(sub, ast.Name) and sub.id in axes:
            found |= axes[sub.id]
    return found


def _targets(target: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]


def _lint_kernel(fn: ast.FunctionDef) -> list[KernelProblem]:
    axes: dict[str, set[int]] = {}
    for _ in range(10):  # follow assignments until nothing changes
        changed = False
        for node in ast.walk(fn):
            pairs: list[tuple[list[str], ast.AST]] = []
            if isinstance(node, ast.Assign):
                pairs = [(_targets(t), node.value) for t in node.targets]
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                pairs = [(_targets(node.target), node.value)]
            for names, value in pairs:
                got = _axes_of(value, axes)
                for name in names:
                    if not got <= axes.get(name, set()):
                        axes[name] = axes.get(name, set()) | got
                        changed = True
        if not changed:
            break
    used = _axes_of(fn, {})  # every axis the kernel asks for
    out: list[KernelProblem] = []

    def add(node: ast.AST, kind: str, message: str) -> None:
        out.append(KernelProblem(fn.name, node.lineno, kind, message))

    for node in ast.walk(fn):
        if _tl_call(node, "store") and node.args:
            missing = sorted(used - _axes_of(node.args[0], axes))
            if missing:
                add(node, "race", (
                    f"tl.store writes to an address that does not depend on program axis "
                    f"{', '.join(map(str, missing))} (tl.program_id): programs that differ only "
                    f"there write the same place, a data race on a GPU that the interpreter "
                    f"cannot show (it runs programs one at a time). Accumulate with "
                    f"tl.atomic_add, or give each program its own buffer and reduce after."))
        if _tl_call(node, "load") and any(k.arg == "mask" for k in node.keywords) and \
                not any(k.arg == "other" for k in node.keywords) and len(node.args) < 3:
            add(node, "unmasked-other", (
                "a masked tl.load without other=: the masked-off lanes hold unspecified "
                "values (zeros under the interpreter, often not on a GPU); give other=0.0, "
                "or -inf where a maximum is taken."))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "advance" and not _tl_call(node, "advance"):
            add(node, "version", "block_ptr.advance(...) fails in Triton 3.8; write "
                                 "tl.advance(block_ptr, offsets).")
        if isinstance(node, ast.Attribute) and node.attr == "element_ty" and \
                isinstance(node.value, ast.Attribute) and node.value.attr == "type":
            add(node, "version", "X.type.element_ty fails on block pointers in Triton 3.8; "
                                 "write X.dtype.element_ty.")
        if _tl_call(node, "make_block_ptr"):
            add(node, "version", "tl.make_block_ptr is deprecated in recent Triton in favour "
                                 "of tensor descriptors (tl.make_tensor_descriptor).")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "range" and node.args and _tl_call(node.args[-1], "cdiv"):
            add(node, "version", "range(tl.cdiv(...)) fails under Triton 3.6's interpreter "
                                 "with numpy 2.4; compute the bound outside or use 3.7+.")
        if (isinstance(node, ast.Attribute) and node.attr == "bfloat16") or \
                (isinstance(node, ast.Constant) and node.value == "bf16"):
            add(node, "interpreter", "bfloat16: Triton's interpreter computes it wrongly "
                                     "(numpy has no bfloat16); test bf16 on a GPU only.")
    return out
