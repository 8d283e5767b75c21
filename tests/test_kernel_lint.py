"""Tests for attnlib.kernel_lint (chapter 13): the static check of what Triton's interpreter
cannot show, on the course's own kernels and on broken variants of them."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnlib
from attnlib.kernel_lint import KernelProblem, lint_kernel_source

KERNELS = Path(attnlib.__file__).parent / "triton_flash.py"
ATOMIC = "tl.atomic_add(DQ + q_ptrs, dq, mask=row_ok)"
# dQ accumulated by reading, adding and writing back: correct when programs run one after
# another (the interpreter), a lost-update race when they run at once (a GPU).
READ_MODIFY_WRITE = ("tl.store(DQ + q_ptrs, tl.load(DQ + q_ptrs, mask=row_ok, other=0.0) + dq, "
                     "mask=row_ok)")


def _lines(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


def test_the_course_kernels_are_clean():
    assert lint_kernel_source(KERNELS.read_text()) == []


def test_dq_written_without_atomics_is_a_race_on_its_line():
    source = KERNELS.read_text()
    assert ATOMIC in source
    bad = source.replace(ATOMIC, READ_MODIFY_WRITE)
    problems = lint_kernel_source(bad)
    assert [(p.kernel, p.kind, p.line) for p in problems] == [
        ("flash_bwd_kernel", "race", _lines(bad, "tl.store(DQ + q_ptrs"))]
    assert "program axis 0" in problems[0].message and "tl.atomic_add" in problems[0].message


def test_the_interpreter_cannot_see_that_race(tmp_path, monkeypatch):
    """The read-modify-write backward gives the right gradients under the interpreter,
    which is why the race needs a static check."""
    path = tmp_path / "racy_flash.py"
    path.write_text(KERNELS.read_text().replace(ATOMIC, READ_MODIFY_WRITE))
    spec = importlib.util.spec_from_file_location("racy_flash", path)
    racy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "racy_flash", racy)
    spec.loader.exec_module(racy)
    assert racy.INTERPRETED
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 70, 16, generator=g, requires_grad=True) for _ in range(3))
    racy.flash_attention_triton(q, k, v).sum().backward()  # 2 key blocks add into dQ
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attnlib.scaled_dot_product_attention(q2, k2, v2).sum().backward()
    torch.testing.assert_close(q.grad.double(), q2.grad, rtol=0, atol=1e-5)


def test_a_masked_load_without_other():
    source = KERNELS.read_text()
    good = "q = tl.load(q_ptrs, mask=offs_m[:, None] < L, other=0.0)"
    bad = source.replace(good, "q = tl.load(q_ptrs, mask=offs_m[:, None] < L)")
    problems = lint_kernel_source(bad)
    assert [(p.kernel, p.kind) for p in problems] == [("flash_fwd_kernel", "unmasked-other")]
    assert problems[0].line == _lines(bad, "q = tl.load(q_ptrs, mask=offs_m[:, None] < L)")


def test_a_store_that_ignores_a_program_axis_outside_any_loop():
    source = textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(X, Y, N, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            row = tl.program_id(1)
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(X + row * N + offs, mask=offs < N, other=0.0)
            tl.store(Y + offs, x, mask=offs < N)  # every row writes the same place
            tl.store(Y + row * N + offs, x, mask=offs < N)  # fine
    """)
    problems = lint_kernel_source(source)
    assert [(p.kind, p.line) for p in problems] == [("race", 11)]
    assert "program axis 1" in problems[0].message


@pytest.mark.parametrize("line, kind, words", [
    ("p = p.advance((BLOCK, 0))", "version", "tl.advance"),
    ("x = tl.load(P).to(O.type.element_ty)", "version", "dtype.element_ty"),
    ("p = tl.make_block_ptr(base=Q, shape=(8, 8), strides=(8, 1), offsets=(0, 0), "
     "block_shape=(8, 8), order=(1, 0))", "version", "tensor descriptors"),
    ("for i in range(tl.cdiv(8, 4)):\n        pass", "version", "range(tl.cdiv"),
    ("x = tl.zeros([8], dtype=tl.bfloat16)", "interpreter", "bfloat16"),
])
def test_version_and_interpreter_traps_are_named(line, kind, words):
    source = f"import triton\nimport triton.language as tl\n\n@triton.jit\ndef k(P, Q, O):\n    {line}\n"
    problems = lint_kernel_source(source)
    assert [p.kind for p in problems] == [kind], problems
    assert words in problems[0].message and problems[0].line == 6
    assert str(problems[0]).startswith("k, line 6 [")


def test_plain_python_is_not_checked():
    source = "def helper(P):\n    return P.advance(1), tl.store(P, 1)\n"
    assert lint_kernel_source(source) == []


def test_bad_input():
    with pytest.raises(TypeError, match="source must be a str"):
        lint_kernel_source(b"x = 1")
    with pytest.raises(SyntaxError):
        lint_kernel_source("def (")
    assert isinstance(KernelProblem("k", 1, "race", "m"), KernelProblem)
