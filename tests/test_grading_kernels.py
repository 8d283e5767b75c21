"""Chapter 13's graded kernels (attnlib/grading/exercises/ch13_flash_triton/): Triton kernels,
launched, not called, and run on the CPU under Triton's interpreter.

The parametrised tests of every exercise (tests/test_grading_early.py, test_grading_late.py,
test_exercises.py, test_grade_notebooks.py, test_course.py) cover the cases, the references,
the mistakes and the notebooks. Here: what is particular to kernels. A stub is "not implemented
yet"; the source check names what the interpreter cannot show and fails a kernel that calls
Python; the hardened grader fails the course's kernel (or a catalogued mistake's) under the
learner's name and a cell that launches the course's kernel; and the grading package still
imports, without chapter 13, where Triton cannot be used.
"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import torch

from attnlib.grading import EXERCISES, grade_function
from attnlib.grading.runner import grade_notebook

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "solutions" / "13_flash_triton" / "13_flash_triton.ipynb"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _kernels(tmp_path: Path, source: str):
    """A module of kernels written to a file (Triton reads a kernel's source), imported."""
    path = tmp_path / "learner_kernels.py"
    path.write_text("import attnlib.triton_flash\nimport torch\nimport triton\nimport triton.language as tl\n\n"
                    + textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location("learner_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _solution_source(name: str) -> str:
    from tools.exercises import ch13_flash_triton

    fn = getattr(ch13_flash_triton, name).fn
    return textwrap.dedent(inspect.getsource(fn))


@pytest.fixture(autouse=True, scope="module")
def tools_on_path():
    sys.path.insert(0, str(ROOT))
    yield
    sys.path.remove(str(ROOT))


def test_the_exercises_launch_the_course_kernels():
    from attnlib import triton_flash

    fwd, bwd = EXERCISES["flash_fwd_kernel"], EXERCISES["flash_bwd_kernel"]
    assert fwd.reference is triton_flash.flash_fwd_kernel and bwd.reference is triton_flash.flash_bwd_kernel
    assert fwd.launch is not None and bwd.launch is not None and fwd.chapter == bwd.chapter == 13
    # every case is a low-precision case (float32 or float16), small enough for the interpreter
    for ex in (fwd, bwd):
        for case in ex.make_cases(False) + ex.make_cases(True):
            assert case.low_precision and case.args[0].dtype in (torch.float32, torch.float16)
            assert max(case.args[0].size(-2), case.args[1].size(-2)) <= 130


def test_a_stub_is_not_implemented_yet_and_python_in_a_kernel_fails(tmp_path):
    source = _solution_source("flash_fwd_kernel")
    stub = source.split('    start_m = ', 1)[0].replace("def flash_fwd_kernel(", "def stub(") \
        + "    raise NotImplementedError\n"
    python = source.replace("def flash_fwd_kernel(", "def with_torch(").replace(
        "    out = acc / l[:, None]\n", "    out = acc / l[:, None]\n    torch.manual_seed(0)\n")
    module = _kernels(tmp_path, stub + "\n\n" + python)
    assert {r.message for r in grade_function("flash_fwd_kernel", module.stub)} == {"not implemented yet"}
    results = grade_function("flash_fwd_kernel", module.with_torch)
    assert results and all(not r.passed for r in results)
    assert "calls torch.manual_seed" in results[0].message and "would not compile" in results[0].message


def test_only_a_triton_kernel_is_launched():
    class NotAKernel:  # launched like one, it would compute the result in PyTorch
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for ex_id in ("flash_fwd_kernel", "flash_bwd_kernel"):
        results = grade_function(ex_id, NotAKernel())
        assert results and all("must be a Triton kernel" in r.message for r in results)


def test_a_kernel_whose_source_cannot_be_read_fails_with_a_reason():
    source = _solution_source("flash_fwd_kernel")
    namespace: dict = {}
    exec(compile("import triton\nimport triton.language as tl\n" + source, "<nowhere>", "exec"), namespace)
    results = grade_function("flash_fwd_kernel", namespace["flash_fwd_kernel"])
    assert results and all("could not read the source" in r.message for r in results)


def _variant(tmp_path: Path, name: str, fwd: str | None = None, bwd: str | None = None,
             cell: str | None = None) -> Path:
    """The solution notebook with the forward's or the backward's solution cell replaced, or
    one more cell after the forward's."""
    nb = nbformat.read(str(SOURCE), as_version=4)
    for i, c in enumerate(list(nb.cells)):
        if c.get("id") == "flash_fwd_kernel-solution" and fwd is not None:
            c.source = fwd
        if c.get("id") == "flash_bwd_kernel-solution" and bwd is not None:
            c.source = bwd
    if cell is not None:
        at = next(i for i, c in enumerate(nb.cells) if c.get("id") == "flash_fwd_kernel-solution")
        extra = nbformat.v4.new_code_cell(cell)
        extra["id"] = "extra"
        nb.cells.insert(at + 1, extra)
    path = tmp_path / name / "13_flash_triton.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, str(path))
    return path


def test_the_hardened_grader_fails_a_course_kernel_under_the_learners_name(tmp_path):
    backward = "attnlib.grading.exercises.ch13_flash_triton.backward"  # a catalogued mistake's kernel
    path = _variant(tmp_path, "alias",
                    fwd="from attnlib.triton_flash import flash_fwd_kernel  # the course's own\n",
                    bwd=f"from {backward} import _bwd_variant as flash_bwd_kernel\n")
    report = grade_notebook(path, source=SOURCE)
    feedback = {i.id: i.feedback for i in report.items}
    assert report.score == 0, feedback
    assert "called attnlib.triton_flash.flash_fwd_kernel, which this exercise forbids" in feedback["test_flash_fwd_kernel"]
    assert f"called the grader's own code ({backward}._bwd_variant)" in feedback["test_flash_bwd_kernel"]


def test_the_hardened_grader_fails_a_cell_that_launches_the_course_kernel(tmp_path):
    cell = "q = torch.randn(1, 1, 64, 16)\nout, lse = flash_forward(q, q, q)  # kernel=None: the course's kernel\n"
    report = grade_notebook(_variant(tmp_path, "launch", cell=cell), source=SOURCE)
    assert report.score == 0, [(i.id, i.feedback) for i in report.items]
    assert all("called attnlib.triton_flash.flash_fwd_kernel outside a graded function" in i.feedback
               for i in report.items)


def test_the_hardened_grader_puts_the_launchers_back(tmp_path):
    """A cell that replaces the course's launcher (which would then compute the result in
    PyTorch instead of launching the kernel) fails every exercise; the launcher is put back."""
    cell = ("import attnlib.triton_flash as tf\n"
            "tf._launch_forward = lambda q, k, v, scale, is_causal, kernel=None: (q, q[..., 0].float())\n")
    report = grade_notebook(_variant(tmp_path, "patched", cell=cell), source=SOURCE)
    assert report.score == 0, [(i.id, i.feedback) for i in report.items]
    assert all("replaced the grader's own code (attnlib.triton_flash._launch_forward)" in i.feedback
               for i in report.items)


def test_grading_imports_without_chapter_13_where_triton_cannot_be_used():
    code = ("import triton  # before attnlib.triton_flash, without TRITON_INTERPRET (as torch.compile does)\n"
            "from attnlib.grading import EXERCISES, exercises\n"
            "assert list(exercises.UNAVAILABLE) == ['ch13_flash_triton'], exercises.UNAVAILABLE\n"
            "assert 'flash_fwd_kernel' not in EXERCISES and 'flash_attention' in EXERCISES\n"
            "assert 'ch13_flash_triton' not in exercises.CHAPTER_MODULES\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
