"""Chapter 13, FlashAttention in Triton: the graded exercises and their catalogues of mistakes.

======================  ======================================================
exercise id             reference
======================  ======================================================
``flash_fwd_kernel``    ``attnlib.triton_flash.flash_fwd_kernel`` (a kernel)
``flash_bwd_kernel``    ``attnlib.triton_flash.flash_bwd_kernel`` (a kernel)
======================  ======================================================

The learner writes the *body of a Triton kernel*, not a function: a case is not a call but a
launch. Each exercise's ``launch`` (:attr:`attnlib.grading.core.Exercise.launch`) runs the
given kernel through the course's launcher, :func:`attnlib.triton_flash.flash_forward` or
:func:`~attnlib.triton_flash.flash_backward` with ``kernel=``, which sets the grid, the block
sizes and the buffers exactly as for the course's own kernel; the learner's kernel, the
reference and every catalogued mistake are launched the same way. Without a GPU the kernels
run on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), one program after another:
slow, so the cases are small (``L, S <= 130``: up to three blocks of 64).

The cases are float32 and float16 (bfloat16 only runs on a GPU), judged by the low-precision
rule against the exact result, which ``launch`` computes in float64 with PyTorch when it is
handed float64 inputs (the rule's upcast run of the reference: a kernel has no float64 path).
The float16 cases keep the default scale, ``1 / sqrt(head_dim)``, a power of two: a kernel that
multiplies its queries by the scale before ``tl.dot`` (as Triton's tutorial once did) is exact
there, where ``q * 0.3`` rounded to float16 would cost it more than the rule's twice the
reference's error; a scale that is not a power of two is tested in float32.

A mistake is a real kernel: ``_fwd_variant`` and ``_bwd_variant`` are the course's kernels
with ``tl.constexpr`` switches, each mistake one of them launched with one switch changed
(:class:`_Variant`). Two mistakes cannot be seen in the values under the interpreter, which
runs the programs one at a time and reads the masked-off lanes of a load as zeros: a masked
``tl.load`` without ``other=`` (``_fwd_without_other``, ``_bwd_without_other``) and a
``tl.store`` of dQ that races with the other programs (``_bwd_without_atomics`` with
``READ_ADD``: a read-modify-write instead of ``tl.atomic_add``). Both exercises'
``extra_check`` (:func:`_kernel_source_check`) reads the kernel's source and names them with
:func:`attnlib.kernel_lint.lint_kernel_source`; it also fails a kernel that calls anything but
Triton's language, other ``@triton.jit`` functions and a few builtins: under the interpreter
any Python runs inside a kernel, on a GPU it would not compile. These mistakes are separate
kernels because the check reads a whole kernel's source: the switches of ``_fwd_variant`` and
``_bwd_variant`` never show it a problem (their mistakes fail on values).

Where Triton is missing, or was imported before ``attnlib.triton_flash`` could select its
interpreter, this module raises :class:`~attnlib.grading.exercises.ChapterUnavailable`: the
other chapters are graded as usual. The hardened grader's child runs with
``TRITON_INTERPRET=1`` (:func:`attnlib.grading.supervisor._child_env`), GPU or not.

Forbidden: the course's kernels (calling or launching them, also by giving the learner's
name to one of them: the watcher of ``attnlib grade`` sees a forbidden kernel started by
Triton's interpreter during a graded call), chapter 5's and chapter 9's attention and PyTorch's.
The launchers ``flash_forward`` and ``flash_backward`` are allowed: the notebook uses them to
run the learner's kernel.
"""

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

from ...kernel_lint import lint_kernel_source
from ..core import Case, Exercise, Mistake, mistake_message, register, section_url
from . import ChapterUnavailable
from .common import NO_FUSED, NO_SOFTMAX, generator

try:  # Triton is the optional extra `kernels`; attnlib.triton_flash must come first
    from ...triton_flash import INTERPRETED, flash_backward, flash_bwd_kernel, flash_forward, flash_fwd_kernel

    import triton
    import triton.language as tl
except ImportError as exc:  # no Triton, or Triton imported before without its interpreter
    raise ChapterUnavailable(f"chapter 13's kernels cannot run here: {exc}") from exc

#: Modules whose code this chapter's checks run on the learner's behalf (the launchers): the
#: grader's child puts their functions back before every case, as its own, should a notebook
#: replace them (:func:`attnlib.grading.child._guarded_modules`).
GUARDED = ("attnlib.triton_flash",)

PAGE = "13_flash_triton.html"
MODEL = f"{PAGE}#triton-s-programming-model"
FORWARD = f"{PAGE}#the-forward-kernel"
BACKWARD = f"{PAGE}#the-backward-kernel-and-dq"
UNSEEN = f"{PAGE}#what-the-interpreter-cannot-show"
TOP_LEFT = "05_self_cross_masks.html#is-causal-when-l-s-top-left-or-bottom-right"

#: What a graded kernel may not call or launch (see the module's docstring).
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


# ============================================================================ cases


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


def _fwd_case(name: str, B: int, H: int, L: int, S: int, D: int, seed: int, dtype: torch.dtype = F32,
              std: float = 1.0, **kwargs: Any) -> Case:
    return Case(name, _qkv(B, H, L, S, D, seed, dtype, std), kwargs, low_precision=True)


def _fwd_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _fwd_case("float32, L = S = 100 (a ragged second block), head_dim 32", 1, 1, 100, 100, 32, 1300),
            _fwd_case("float32, batch 2, causal, L = S = 100, head_dim 16", 2, 1, 100, 100, 16, 1305,
                      is_causal=True),
            _fwd_case("float16, L = 50, S = 130, head_dim 64", 1, 1, 50, 130, 64, 1310, F16),
            _fwd_case("float32, causal, L = 100 > S = 70, head_dim 32, scale = 0.3", 1, 2, 100, 70, 32, 1315,
                      is_causal=True, scale=0.3),
        ]
    return [
        _fwd_case("L = S = 1", 1, 1, 1, 1, 16, 1320),
        _fwd_case("L = 1, S = 129 (a last key block of one key), scale = 0.05", 1, 1, 1, 129, 32, 1325,
                  scale=0.05),
        _fwd_case("causal, L = 30 < S = 130 (top-left: the last keys are never seen)", 1, 2, 30, 130, 16, 1330,
                  is_causal=True),
        _fwd_case("float16, causal, L = S = 128 (whole blocks), head_dim 64", 1, 1, 128, 128, 64, 1335, F16,
                  is_causal=True),
        _fwd_case("large scores (in the hundreds): the running maximum matters", 1, 1, 70, 90, 16, 1340, std=3.0,
                  scale=1.0),
        _fwd_case("float16, batch 2 x 2 heads, causal, L = 40, S = 70", 2, 2, 40, 70, 16, 1345, F16,
                  is_causal=True),
    ]


def _bwd_case(name: str, B: int, H: int, L: int, S: int, D: int, seed: int, dtype: torch.dtype = F32,
              std: float = 1.0, **kwargs: Any) -> Case:
    """Inputs, and ``output`` and ``lse`` as the forward pass would give them: exact, rounded to
    ``dtype`` (``lse`` to float32)."""
    q, k, v = _qkv(B, H, L, S, D, seed, dtype, std)
    s = _scores(q.double(), k.double(), kwargs.get("is_causal", False), kwargs.get("scale"))
    out = (torch.softmax(s, dim=-1) @ v.double()).to(dtype)
    lse = torch.logsumexp(s, dim=-1).float()
    g = generator(seed + 7)
    grad = torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype)
    return Case(name, (q, k, v, out, lse, grad), kwargs, low_precision=True)


def _bwd_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _bwd_case("float32, L = S = 100 (two key blocks, the second ragged), head_dim 32", 1, 1, 100, 100, 32,
                      1350),
            _bwd_case("float32, causal, L = S = 130 (three blocks), head_dim 16", 1, 1, 130, 130, 16, 1355,
                      is_causal=True),
            _bwd_case("float16, L = 40, S = 130, head_dim 64", 1, 1, 40, 130, 64, 1360, F16),
            _bwd_case("float32, batch 2, causal, L = 100 > S = 70, head_dim 32, scale = 0.3", 2, 1, 100, 70, 32, 1365,
                      is_causal=True, scale=0.3),
        ]
    return [
        _bwd_case("L = S = 1", 1, 1, 1, 1, 16, 1370),
        _bwd_case("L = 1, S = 129 (a last key block of one key)", 1, 1, 1, 129, 32, 1375),
        _bwd_case("causal, L = 30 < S = 130 (keys no query sees get zero gradients)", 1, 2, 30, 130, 16, 1380,
                  is_causal=True),
        _bwd_case("float16, causal, L = S = 128 (whole blocks), head_dim 64", 1, 1, 128, 128, 64, 1385, F16,
                  is_causal=True),
        _bwd_case("large scores (in the hundreds), scale = 1", 1, 1, 70, 90, 16, 1390, std=3.0, scale=1.0),
        _bwd_case("batch 2 x 2 heads, causal, L = 70 > S = 65", 2, 2, 70, 65, 16, 1395, is_causal=True),
    ]


# ============================================================================ forward mistakes


@triton.jit
def _fwd_variant(
    Q, K, V, O, LSE, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    RESCALE_ACC: tl.constexpr = True,  # the accumulator rescaled by alpha = exp(m_old - m_new)
    RESCALE_SUM: tl.constexpr = True,  # the running sum too
    MASK: tl.constexpr = 1,  # causal: 0 no mask inside a block, 1 top-left (j <= i), 2 bottom-right
    SKIP: tl.constexpr = True,  # causal: the key blocks right of the diagonal skipped
    LSE_MODE: tl.constexpr = 0,  # 0 m + log(l), 1 log(l) (without the maximum), 2 in base 2
    RAGGED: tl.constexpr = 0,  # 0 right, 1 loop bound floor(S / BLOCK_N), 2 padding keys not masked
):
    """The course's forward kernel with switches: the default switches compute attention."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=offs_m[:, None] < L, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = S
    if RAGGED == 1:
        hi = (S // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        if SKIP:
            if MASK == 2:
                hi = tl.minimum(hi, tl.maximum((pid_m + 1) * BLOCK_M + S - L, 0))
            else:
                hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                    mask=cols[:, None] < S, other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        if RAGGED == 2:
            valid = cols[None, :] >= 0
        else:
            valid = cols[None, :] < S
        if IS_CAUSAL:
            if MASK == 1:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            if MASK == 2:
                valid = valid & (cols[None, :] <= offs_m[:, None] + (S - L))
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        if RESCALE_SUM:
            l_i = l_i * alpha + tl.sum(p, 1)
        else:
            l_i = l_i + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=cols[:, None] < S, other=0.0)
        if RESCALE_ACC:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=offs_m[:, None] < L)
    if LSE_MODE == 1:
        lse = tl.log(l_safe)
    elif LSE_MODE == 2:
        lse = m_i * 1.4426950408889634 + tl.log2(l_safe)  # log2(e) * (m + log(l))
    else:
        lse = m_i + tl.log(l_safe)
    lse = tl.where(l_i == 0.0, float("inf"), lse)
    tl.store(LSE + pid_bh * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _fwd_without_other(
    Q, K, V, O, LSE, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """The forward kernel with the key and value blocks loaded without ``other=``: right
    under the interpreter (masked-off lanes read 0), undefined on a GPU."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=offs_m[:, None] < L, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                    mask=cols[:, None] < S)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        valid = cols[None, :] < S
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=cols[:, None] < S)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=offs_m[:, None] < L)
    tl.store(LSE + pid_bh * L + offs_m, tl.where(l_i == 0.0, float("inf"), m_i + tl.log(l_safe)),
             mask=offs_m < L)


_FWD_NO_OTHER = Mistake(
    "a masked tl.load without other=",
    "Masked-off lanes of a tl.load without other= hold undefined values: zeros under the "
    "interpreter, so the values here are right, but whatever memory held on a GPU, which then "
    "flows into tl.dot and tl.max. Give every masked load other=0.0 (or -inf where a maximum "
    "is taken).",
    UNSEEN,
    _fwd_without_other,
)

FWD_MISTAKES = (
    Mistake(
        "no rescaling of the accumulator",
        "When a key block raises a row's running maximum from m_old to m_new, the accumulator of "
        "exp(s - m_old) @ V must be multiplied by alpha = exp(m_old - m_new) before the block's "
        "p @ v is added; otherwise old and new terms are on different scales.",
        FORWARD,
        _Variant(_fwd_variant, RESCALE_ACC=False),
    ),
    Mistake(
        "no rescaling of the running sum",
        "The running sum l of exp(s - m) must be multiplied by alpha = exp(m_old - m_new) when "
        "the maximum changes, like the accumulator; otherwise the final acc / l divides by a sum "
        "on the wrong scale.",
        FORWARD,
        _Variant(_fwd_variant, RESCALE_SUM=False),
    ),
    Mistake(
        "the causal mask forgotten",
        "With IS_CAUSAL, query i sees only keys j <= i: stop the key loop at the diagonal block "
        "and set the scores of the later keys inside it to -inf. This output is attention over "
        "every key.",
        FORWARD,
        _Variant(_fwd_variant, MASK=0, SKIP=False),
    ),
    Mistake(
        "the diagonal block left unmasked",
        "Skipping the key blocks right of the diagonal is not enough: inside the block that "
        "straddles the diagonal, the keys j > i must still get the score -inf.",
        FORWARD,
        _Variant(_fwd_variant, MASK=0),
    ),
    Mistake(
        "the causal mask aligned bottom-right",
        "is_causal is aligned top-left in this course, as in PyTorch: query i sees keys 0..i "
        "whatever S is. Shifting the diagonal by S - L (keys j <= i + S - L) is the alignment "
        "of decoding with a cache.",
        TOP_LEFT,
        _Variant(_fwd_variant, MASK=2),
    ),
    Mistake(
        "the log-sum-exp without the maximum",
        "l is the sum of exp(s - m), so log(l) is the log-sum-exp minus the row's maximum: store "
        "lse = m + log(l).",
        FORWARD,
        _Variant(_fwd_variant, LSE_MODE=1),
    ),
    Mistake(
        "the log-sum-exp in base 2",
        "With tl.exp2 and scores scaled by log2(e), m + log2(l) is the log-sum-exp in base 2: the "
        "backward expects the natural one, so divide it by log2(e) (multiply by ln 2).",
        FORWARD,
        _Variant(_fwd_variant, LSE_MODE=2),
    ),
    Mistake(
        "the ragged last key block dropped",
        "The key loop must run to S, not to a multiple of BLOCK_N: range(0, S, BLOCK_N) visits "
        "the last, partly filled block too (its loads masked), where a bound of (S // BLOCK_N) * "
        "BLOCK_N leaves its keys out.",
        MODEL,
        _Variant(_fwd_variant, RAGGED=1),
    ),
    Mistake(
        "the padding keys of the last block not masked",
        "The last key block reaches past S: its missing keys are loaded as zeros, so their scores "
        "are 0, not -inf, and they take weight from the real keys. Mask the scores with cols < S.",
        MODEL,
        _Variant(_fwd_variant, RAGGED=2),
    ),
    _FWD_NO_OTHER,
)

_register_kernel("flash_fwd_kernel", flash_fwd_kernel, FORWARD, _fwd_cases, FWD_MISTAKES, launch_forward,
                 race=None, no_other=_FWD_NO_OTHER)


# ============================================================================ backward mistakes


@triton.jit
def _bwd_variant(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, sm_scale, H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    USE_DELTA: tl.constexpr = True,  # dS = P * (dP - delta), or P * dP
    DS_SCALE: tl.constexpr = True,  # dS multiplied by the softmax scale
    BOUND: tl.constexpr = 0,  # causal query loop: 0 from the diagonal on, 1 up to it, 2 after it
    MASK: tl.constexpr = True,  # causal: keys after the query masked in the recomputed weights
):
    """The course's backward kernel with switches: the default switches compute the gradients."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = pid_bh * L * HEAD_DIM
    kv_base = pid_bh * S * HEAD_DIM
    kv_ptrs = kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    hi = L
    if IS_CAUSAL:
        if BOUND == 0:
            lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
        if BOUND == 1:
            hi = tl.minimum(L, (pid_n + 1) * BLOCK_N)
        if BOUND == 2:
            lo = (pid_n + 1) * BLOCK_N
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = q_base + rows[:, None] * HEAD_DIM + offs_d[None, :]
        row_ok = rows[:, None] < L
        q = tl.load(Q + q_ptrs, mask=row_ok, other=0.0)
        do = tl.load(DO + q_ptrs, mask=row_ok, other=0.0)
        lse = tl.load(LSE + pid_bh * L + rows, mask=rows < L, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * L + rows, mask=rows < L, other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        valid = (offs_n[None, :] < S) & (rows[:, None] < L)
        if IS_CAUSAL:
            if MASK:
                valid = valid & (offs_n[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        if USE_DELTA:
            ds = p * (dp - delta[:, None])
        else:
            ds = p * dp
        if DS_SCALE:
            ds = ds * sm_scale
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dq = tl.dot(ds.to(k.dtype), k)
        tl.atomic_add(DQ + q_ptrs, dq, mask=row_ok)
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < S)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < S)


@triton.jit
def _bwd_without_atomics(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, sm_scale, H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    READ_ADD: tl.constexpr = False,  # dQ: load, add, store (a race on a GPU), or a plain store
):
    """The backward kernel with dQ written by ``tl.store`` instead of ``tl.atomic_add``
    (kept apart from ``_bwd_variant``, whose source must show no race to the extra check)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ptrs = pid_bh * S * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, L, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = pid_bh * L * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
        row_ok = rows[:, None] < L
        q = tl.load(Q + q_ptrs, mask=row_ok, other=0.0)
        do = tl.load(DO + q_ptrs, mask=row_ok, other=0.0)
        lse = tl.load(LSE + pid_bh * L + rows, mask=rows < L, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * L + rows, mask=rows < L, other=0.0)
        valid = (offs_n[None, :] < S) & (rows[:, None] < L)
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp(tl.dot(q, tl.trans(k)) * sm_scale - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None]) * sm_scale
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dq = tl.dot(ds.to(k.dtype), k)
        if READ_ADD:
            dq += tl.load(DQ + q_ptrs, mask=row_ok, other=0.0)
        tl.store(DQ + q_ptrs, dq, mask=row_ok)
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < S)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < S)


@triton.jit
def _bwd_without_other(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, sm_scale, H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """The backward kernel with the query and dO blocks loaded without ``other=``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ptrs = pid_bh * S * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, L, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = pid_bh * L * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + q_ptrs, mask=rows[:, None] < L)
        do = tl.load(DO + q_ptrs, mask=rows[:, None] < L)
        lse = tl.load(LSE + pid_bh * L + rows, mask=rows < L, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * L + rows, mask=rows < L, other=0.0)
        valid = (offs_n[None, :] < S) & (rows[:, None] < L)
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp(tl.dot(q, tl.trans(k)) * sm_scale - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None]) * sm_scale
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        tl.atomic_add(DQ + q_ptrs, tl.dot(ds.to(k.dtype), k), mask=rows[:, None] < L)
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < S)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < S)


_BWD_NO_OTHER = Mistake(
    "a masked tl.load without other=",
    "Masked-off lanes of a tl.load without other= hold undefined values: zeros under the "
    "interpreter, so the values here are right, but whatever memory held on a GPU, which then "
    "flows into tl.dot. Give every masked load other=0.0 (other=inf for the lse of missing "
    "rows, so that their weights are 0).",
    UNSEEN,
    _bwd_without_other,
)
_BWD_RACE = Mistake(
    "dQ accumulated without atomics (a race on a GPU)",
    "Every program (one per key block) adds its share to the same rows of dQ. Under the "
    "interpreter the programs run one after another, so a load, an add and a tl.store give the "
    "right sum; on a GPU they run at the same time and overwrite each other's shares. Add with "
    "tl.atomic_add(DQ + ptrs, dq, mask=...).",
    UNSEEN,
    _Variant(_bwd_without_atomics, READ_ADD=True),
)

BWD_MISTAKES = (
    Mistake(
        "dQ stored without atomics (the last key block wins)",
        "Each program handles one block of keys and computes only that block's share of dQ: "
        "tl.store overwrites the shares of the other blocks, so dQ holds the last program's "
        "share. Add the shares with tl.atomic_add into the float32 buffer DQ.",
        BACKWARD,
        _bwd_without_atomics,
    ),
    _BWD_RACE,
    Mistake(
        "delta missing from dS",
        "The softmax's gradient is dS = P * (dP - delta) with delta_i = sum_d dO_id O_id (the "
        "DELTA buffer, one number per query row); dS = P * dP leaves out the term that makes "
        "each row of dS sum to zero.",
        BACKWARD,
        _Variant(_bwd_variant, USE_DELTA=False),
    ),
    Mistake(
        "dS without the softmax scale",
        "The scores are scale * q . k, so the chain rule multiplies dS (hence dQ = dS K and "
        "dK = dS^T Q) by sm_scale.",
        BACKWARD,
        _Variant(_bwd_variant, DS_SCALE=False),
    ),
    Mistake(
        "the causal loop over query blocks stopped at the diagonal",
        "In the backward a program owns a block of keys, and the queries that see key j are "
        "i >= j: causally, the loop over query blocks starts at the diagonal block and runs to "
        "L. Stopping at the diagonal (the forward's bound) visits the query blocks that see none "
        "of these keys.",
        BACKWARD,
        _Variant(_bwd_variant, BOUND=1),
    ),
    Mistake(
        "the diagonal query block skipped",
        "The query block that straddles the diagonal sees some of this program's keys: the "
        "causal loop must start at (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M, the block holding "
        "query pid_n * BLOCK_N, not after it.",
        BACKWARD,
        _Variant(_bwd_variant, BOUND=2),
    ),
    Mistake(
        "the causal mask left out of the recomputed weights",
        "P = exp(s - lse) recomputed must be masked like the forward's: a key after the query "
        "has weight 0, and inside the diagonal block that takes the mask j <= i.",
        BACKWARD,
        _Variant(_bwd_variant, MASK=False),
    ),
    _BWD_NO_OTHER,
)

_register_kernel("flash_bwd_kernel", flash_bwd_kernel, BACKWARD, _bwd_cases, BWD_MISTAKES, launch_backward,
                 race=_BWD_RACE, no_other=_BWD_NO_OTHER)
