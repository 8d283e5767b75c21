"""A corpus of bad submissions: the grader must pass all of it (issue 5).

Every case is a notebook derived, here, from the grading fixtures (``tests/fixtures/grading``:
``source.ipynb`` with the hidden tests, ``correct.ipynb`` a full-marks submission; three
items: ``test_softmax`` 2 points, ``test_causal_mask`` 1, ``test_scaled_dot_product_attention``
3): one cell changed, added or broken per case. Expected, for every case: a clear message on
the affected item naming what happened, 0 for that item only, every other item still graded,
no cheat scoring above the honest part, the submission's folder unchanged.

The notebooks are graded once, in a module fixture, two at a time from threads (the way the
class grader calls :func:`grade_notebook`); each test then checks one case. Cases that hang
use short limits. Isolation checks (no network, hidden paths) are asserted where the
sandbox could use namespaces, and the sandbox's note is checked otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from attnlib.cli import main as cli_main
from attnlib.grading import runner, supervisor
from attnlib.grading.runner import GradingError, Report, grade_notebook

FIXTURES = Path(__file__).parent / "fixtures" / "grading"
HOSTILE = Path(__file__).parent / "fixtures" / "hostile"
SOURCE = FIXTURES / "source.ipynb"
CORRECT = json.loads((FIXTURES / "correct.ipynb").read_text())
SRC = json.loads(SOURCE.read_text())
IDS = ("test_softmax", "test_causal_mask", "test_scaled_dot_product_attention")
POINTS = {"test_softmax": 2, "test_causal_mask": 1, "test_scaled_dot_product_attention": 3}
CELL = {"imports": 1, "softmax": 3, "test_softmax": 4, "causal_mask": 6, "test_causal_mask": 7,
        "sdpa": 9, "test_sdpa": 10, "explore": 12}
#: Limits for the corpus: short where a case hangs; with headroom for a loaded 2-core machine.
FAST = {"timeout": 90, "step_timeout": 8, "memory_limit": 1 << 30}


def _src(cell: dict) -> str:
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


def _header(cell_index: int) -> str:
    """The def line and docstring of a solution cell (everything up to the body)."""
    text = _src(CORRECT["cells"][cell_index])
    end = text.index('"""', text.index('"""') + 3) + 3
    return text[:end] + "\n"


def body(cell: str, code: str) -> str:
    """A solution cell whose function body is ``code`` (indented for it)."""
    return _header(CELL[cell]) + textwrap.indent(textwrap.dedent(code).strip("\n"), "    ") + "\n"


def code_cell(source: str, **meta: Any) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": meta, "outputs": [],
            "source": textwrap.dedent(source).lstrip("\n")}


@dataclass
class Case:
    """One bad submission: how to build it, how to grade it, what to expect."""

    build: Callable[[dict, Path], Any]  # edits the notebook (a deep copy of correct.ipynb) in place
    score: float | None = None  # the expected score (None: checked by the test itself)
    passed: tuple[str, ...] | None = None  # the items that must pass (None: checked by the test)
    feedback: dict[str, tuple[str, ...]] = field(default_factory=dict)  # item -> words in its feedback
    notes: tuple[str, ...] = ()  # words that must appear in one note each
    kwargs: dict = field(default_factory=dict)
    raw: bytes | None = None  # the file's bytes instead of a notebook (corrupt JSON)


def replace(cell: str, code: str) -> Callable[[dict, Path], None]:
    def build(nb: dict, folder: Path) -> None:
        nb["cells"][CELL[cell]]["source"] = body(cell, code)
    return build


def insert(after: str, source: str) -> Callable[[dict, Path], None]:
    """A new code cell after the cell ``after`` (before the explore cell: ``"sdpa"``)."""
    def build(nb: dict, folder: Path) -> None:
        nb["cells"].insert(CELL[after] + 1, code_cell(source))
    return build


def both(*builds: Callable[[dict, Path], Any]) -> Callable[[dict, Path], None]:
    """Builds applied from the last cell to the first, so that cell indices stay valid."""
    def build(nb: dict, folder: Path) -> None:
        for b in builds:
            b(nb, folder)
    return build


def edit_test_cells(fn: Callable[[dict], Any]) -> Callable[[dict, Path], None]:
    def build(nb: dict, folder: Path) -> None:
        for cell in nb["cells"]:
            if (cell["metadata"].get("nbgrader") or {}).get("grade"):
                fn(cell)
    return build


def _strip_metadata(nb: dict, folder: Path) -> None:
    nb["cells"][CELL["test_softmax"]]["metadata"] = {}


def _duplicate(nb: dict, folder: Path) -> None:
    nb["cells"].insert(CELL["test_softmax"] + 1, copy.deepcopy(nb["cells"][CELL["test_softmax"]]))


def _delete(nb: dict, folder: Path) -> None:
    del nb["cells"][CELL["test_causal_mask"]]


def no_explore(nb: dict, folder: Path) -> None:
    """Without the explore cell (it calls softmax: a hang there would cost a second restart)."""
    del nb["cells"][CELL["explore"]]


def _extra_grade_cell(nb: dict, folder: Path) -> None:
    nb["cells"].insert(CELL["sdpa"] + 1, code_cell("from attnlib.grading import check\ncheck('softmax', softmax)\n",
                                                   nbgrader={"grade": True, "solution": False, "points": 50,
                                                             "grade_id": "bonus"}))


def _drop_beside(name: str, text: str) -> Callable[[dict, Path], None]:
    def build(nb: dict, folder: Path) -> None:
        (folder / name).write_text(textwrap.dedent(text))
    return build


def _v3(nb: dict, folder: Path) -> dict:
    """The same notebook saved by nbformat 3 (cells in a worksheet, code in ``input``)."""
    cells = []
    for cell in nb["cells"]:
        c = {"cell_type": cell["cell_type"], "metadata": cell["metadata"]}
        if cell["cell_type"] == "code":
            c.update(input=_src(cell), language="python", outputs=[], collapsed=False)
        else:
            c["source"] = _src(cell)
        cells.append(c)
    return {"nbformat": 3, "nbformat_minor": 0, "metadata": {"name": ""}, "worksheets": [{"cells": cells}]}


def _ids(kind: str) -> Callable[[dict, Path], None]:
    def build(nb: dict, folder: Path) -> None:
        nb["nbformat_minor"] = 5
        for n, cell in enumerate(nb["cells"]):
            cell["id"] = {"duplicate": "same", "invalid": f"bad id with spaces/{n}!"}[kind]
    return build


def _v4_0(nb: dict, folder: Path) -> None:
    nb["nbformat_minor"] = 0
    for cell in nb["cells"]:
        cell.pop("id", None)


WRONG_SOFTMAX = "return x"  # a wrong, honest answer: 0 for test_softmax


def _honest(cell: str) -> str:
    """The body of a solution cell (after its docstring), dedented."""
    text = _src(CORRECT["cells"][CELL[cell]])
    return textwrap.dedent(text[len(_header(CELL[cell])):])


# --- the universal cheat (issue 12): softmax's reference outputs on every public case, computed
# at the top level of a cell by one route or another, and a softmax that looks them up
LOOKUP = """
    for args, kwargs, out in globals().get("_TABLE", []):
        if args[0].shape == x.shape and args[0].dtype == x.dtype and torch.equal(args[0], x) \\
                and kwargs.get("dim", -1) == dim:
            return out.clone()
    return x  # not in the table: wrong
"""
TABULATE = """
from attnlib.grading import EXERCISES
_CASES = [c for hidden in (False, True) for c in EXERCISES["softmax"].make_cases(hidden)]
_TABLE = [(c.args, c.kwargs, {ref}(*c.args, **c.kwargs)) for c in _CASES]
"""


def precompute(setup: str, ref: str = "_s", after: str = "") -> Callable[[dict, Path], None]:
    """The cheat: a cell after the imports runs ``setup`` (which makes ``ref``, the route to the
    reference), tabulates ``ref`` on softmax's cases, then ``after``; softmax looks it up."""
    cell = textwrap.dedent(setup).strip("\n") + "\n" + TABULATE.format(ref=ref) + textwrap.dedent(after)
    return both(replace("softmax", LOOKUP), insert("imports", cell))


def _grader_helper_as_softmax(nb: dict, folder: Path) -> None:
    nb["cells"][CELL["softmax"]]["source"] = (
        "from attnlib.grading.exercises.ch02_queries_keys_values import _softmax as softmax\n")


def _launders_for_sdpa(nb: dict, folder: Path) -> None:
    """An honest softmax whose graded calls also tabulate F.scaled_dot_product_attention (allowed
    to softmax, forbidden to sdpa) on sdpa's cases, and an sdpa that looks them up."""
    tabulate = textwrap.dedent("""
        global _SDPA
        if "_SDPA" not in globals():
            import torch.nn.functional as F
            from attnlib.grading import EXERCISES
            _SDPA = [(c.args, c.kwargs, F.scaled_dot_product_attention(*c.args, **c.kwargs))
                     for hidden in (False, True) for c in EXERCISES["scaled_dot_product_attention"].make_cases(hidden)]
    """)
    nb["cells"][CELL["softmax"]]["source"] = body("softmax", tabulate + _honest("softmax"))
    nb["cells"][CELL["sdpa"]]["source"] = body("sdpa", """
        for args, kwargs, out in globals().get("_SDPA", []):
            if args[0].shape == query.shape and torch.equal(args[0], query) \\
                    and kwargs.get("is_causal", False) == is_causal:
                return out.clone()
        return query
    """)

CASES: dict[str, Case] = {
    # ------------------------------------------------------------------ integrity
    "test_cells_edited": Case(
        edit_test_cells(lambda c: c.update(source="pass\n")), 6, IDS,
        notes=("differs from the source", "code was edited")),
    "points_raised": Case(
        edit_test_cells(lambda c: c["metadata"]["nbgrader"].update(points=100)), 6, IDS,
        notes=("points changed",)),
    "points_raised_wrong_answer": Case(
        both(edit_test_cells(lambda c: c["metadata"]["nbgrader"].update(points=100)),
             replace("softmax", WRONG_SOFTMAX)), 4, IDS[1:],
        feedback={"test_softmax": ("wrong values",)}),
    "unlocked": Case(
        edit_test_cells(lambda c: c["metadata"]["nbgrader"].update(locked=False)), 6, IDS,
        notes=("locked flag changed",)),
    "test_cell_deleted": Case(_delete, 6, IDS, notes=("'test_causal_mask' is missing",)),
    "test_cell_duplicated": Case(_duplicate, 6, IDS, notes=("appears 2 times",)),
    "test_cell_metadata_stripped": Case(
        _strip_metadata, 6, IDS, notes=("without its nbgrader metadata",)),
    "stripped_test_cell_with_wrong_answer": Case(
        both(_strip_metadata, replace("softmax", WRONG_SOFTMAX)), 4, IDS[1:],
        feedback={"test_softmax": ("wrong values",)}),
    "extra_grade_cell": Case(_extra_grade_cell, 6, IDS, notes=("'bonus' that the source notebook does not have",)),
    "corrupt_json": Case(lambda nb, f: None, raw=b'{"cells": [{"cell_type": "code", "sour'),
    "duplicate_cell_ids": Case(_ids("duplicate"), 6, IDS, notes=("duplicate cell ids",)),
    "invalid_cell_ids": Case(_ids("invalid"), 6, IDS),
    "nbformat_4_0_without_ids": Case(_v4_0, 6, IDS),
    "nbformat_3": Case(_v3, 6, IDS, notes=("nbformat 3",)),
    # ------------------------------------------------------------------ faults
    "infinite_loop_ignoring_the_alarm": Case(
        both(no_explore, replace("softmax", """
            import signal
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            while True:
                pass
        """)), 4, IDS[1:], feedback={"test_softmax": ("did not finish within 4 s", "stopped")},
        kwargs={"step_timeout": 4}),
    "infinite_loop_at_import_time": Case(
        lambda nb, f: nb["cells"].__setitem__(CELL["sdpa"], {**nb["cells"][CELL["sdpa"]], "source": _src(
            nb["cells"][CELL["sdpa"]]) + "\nimport signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
            "while True:\n    pass\n"}),
        3, IDS[:2], feedback={"test_scaled_dot_product_attention": (
            "no object named 'scaled_dot_product_attention'", "cell 9, which defines it",
            "did not finish within 4 s")},
        notes=("cell 9", "run again without it"), kwargs={"step_timeout": 4}),
    "loop_in_a_cell": Case(insert("causal_mask", "while True:\n    pass\n"), 6, IDS,
                           notes=("cell 7", "did not finish within 4 s"), kwargs={"step_timeout": 4}),
    "recursion_error": Case(replace("softmax", "return softmax(x, dim)"), 4, IDS[1:],
                            feedback={"test_softmax": ("RecursionError",)}),
    "deep_recursion_crash": Case(
        both(no_explore, replace("softmax", """
            import sys
            sys.setrecursionlimit(10**8)
            def down(n):  # through C (map): the C stack overflows
                return sum(map(down, [n + 1]))
            return down(0)
        """)), 4, IDS[1:], feedback={"test_softmax": ("SIGSEGV", "while calling softmax")}),
    "huge_output_in_a_cell": Case(
        insert("sdpa", "for i in range(10**7):\n    print('line', i)\n"), 6, IDS,
        notes=("printed more than 1 MiB",)),
    "huge_output_in_a_function": Case(
        replace("softmax", """
            for i in range(10**6):
                print('spam', i)
            return x
        """), 4, IDS[1:], feedback={"test_softmax": ("printed more than 1 MiB",)}),
    "huge_output_to_the_file_descriptor": Case(
        insert("sdpa", "import os\nwhile True:\n    os.write(1, b'x' * 65536)\n"), 6, IDS,
        notes=("printed more than 1 MiB", "run again without it")),
    "memory_bomb_in_a_function": Case(
        replace("softmax", "big = torch.ones(1 << 40, dtype=torch.float64)\nreturn x"), 4, IDS[1:],
        feedback={"test_softmax": ("ran out of memory", "memory limit of 1 GiB")}),
    "memory_bomb_list": Case(
        replace("causal_mask", """
            hog = []
            while True:
                hog.append(bytearray(1 << 24))
        """), 5, (IDS[0], IDS[2]), feedback={"test_causal_mask": ("ran out of memory",)}),
    "memory_bomb_shared_mapping": Case(
        insert("sdpa", "import mmap\nm = mmap.mmap(-1, 8 << 30)\nfor i in range(0, 8 << 30, 4096):\n"
                       "    m[i] = 1\n"),
        6, IDS, notes=("cell 10", "memory")),
    "sys_exit_in_a_cell": Case(insert("imports", "import sys\nsys.exit(3)\n"), 6, IDS,
                               notes=("cell 2 of the notebook called sys.exit(3)",)),
    "sys_exit_in_a_function": Case(replace("softmax", "import sys\nsys.exit(3)"), 4, IDS[1:],
                                   feedback={"test_softmax": ("called sys.exit(3)",)}),
    "os_exit_in_a_cell": Case(insert("causal_mask", "import os\nos._exit(7)\n"), 6, IDS,
                              notes=("os._exit(7) ended the process", "cell 7")),
    "os_exit_in_a_function": Case(replace("causal_mask", "import os\nos._exit(0)"), 5, (IDS[0], IDS[2]),
                                  feedback={"test_causal_mask": ("os._exit(0) ended the process",)}),
    "kill_self_in_a_function": Case(replace("causal_mask", "import os, signal\nos.kill(os.getpid(), "
                                                           "signal.SIGKILL)"), 5, (IDS[0], IDS[2]),
                                    feedback={"test_causal_mask": ("SIGKILL",)}),
    "segfault_in_a_function": Case(replace("sdpa", "import ctypes\nreturn ctypes.string_at(0)"), 3, IDS[:2],
                                   feedback={"test_scaled_dot_product_attention": (
                                       "killed by signal SIGSEGV (segmentation fault",
                                       "while calling scaled_dot_product_attention")}),
    "segfault_in_a_cell": Case(insert("softmax", "import ctypes\nctypes.string_at(0)\n"), 6, IDS,
                               notes=("cell 4", "SIGSEGV", "run again without it")),
    "syntax_error": Case(replace("causal_mask", "return torch.ones(L, S dtype=torch.bool)"), 5,
                         (IDS[0], IDS[2]), feedback={"test_causal_mask": (
                             "no object named 'causal_mask'", "cell 6, which defines it", "SyntaxError")}),
    "reads_stdin_in_a_function": Case(replace("softmax", "input('value? ')\nreturn x"), 4, IDS[1:],
                                      feedback={"test_softmax": ("EOFError", "standard input")}),
    "reads_stdin_in_a_cell": Case(insert("imports", "answer = input('name? ')\n"), 6, IDS,
                                  notes=("cell 2", "standard input")),
    # ------------------------------------------------------------------ cheats
    "patched_comparisons": Case(
        both(replace("softmax", WRONG_SOFTMAX), insert("imports", """
            import numpy, torch.testing
            torch.allclose = lambda *a, **k: True
            torch.equal = lambda *a, **k: True
            torch.testing.assert_close = lambda *a, **k: None
            numpy.allclose = lambda *a, **k: True
            numpy.testing.assert_allclose = lambda *a, **k: None
        """)), 4, IDS[1:], feedback={"test_softmax": ("wrong values",)}),
    "input_transformer_blanks_later_cells": Case(
        both(replace("softmax", WRONG_SOFTMAX),
             insert("sdpa", "get_ipython().input_transformers_cleanup.append(lambda lines: [])\n")),
        4, IDS[1:], feedback={"test_softmax": ("wrong values",)}),
    "showtraceback_overridden": Case(
        both(insert("causal_mask", "raise ValueError('hidden failure')\n"),
             replace("softmax", WRONG_SOFTMAX),
             insert("imports", "get_ipython().showtraceback = lambda *a, **k: None\n")),
        4, IDS[1:], feedback={"test_softmax": ("wrong values",)}, notes=("hidden failure",)),
    "always_equal_object": Case(
        replace("softmax", """
            class AlwaysEqual:
                def __eq__(self, other): return True
                def __ne__(self, other): return False
                def allclose(self, *a, **k): return True
            return AlwaysEqual()
        """), 4, IDS[1:], feedback={"test_softmax": ("AlwaysEqual; expected a torch.Tensor",)}),
    "tensor_subclass_always_equal": Case(
        replace("softmax", """
            class Yes(torch.Tensor):
                def __eq__(self, other): return torch.ones_like(other, dtype=torch.bool)
                def allclose(self, *a, **k): return True
            return torch.zeros_like(x).as_subclass(Yes)
        """), 4, IDS[1:], feedback={"test_softmax": ("subclass of torch.Tensor",)}),
    "torch_py_beside_the_notebook": Case(
        _drop_beside("torch.py", "raise SystemExit('the fake torch was imported')\n"), 6, IDS),
    "numpy_py_beside_the_notebook": Case(
        both(_drop_beside("numpy.py", "allclose = lambda *a, **k: True\n"),
             insert("imports", "import numpy\nassert hasattr(numpy, 'ndarray'), 'fake numpy'\n")), 6, IDS),
    "imports_attnlib_in_the_function": Case(
        replace("softmax", "import attnlib\nreturn attnlib.softmax(x, dim)"), 4, IDS[1:],
        feedback={"test_softmax": ("called attnlib",)}),
    "attnlib_alias_from_an_earlier_cell": Case(
        both(no_explore, replace("softmax", "return _reference(x, dim)"),
             insert("imports", "from attnlib import softmax as _reference\n")), 4, IDS[1:],
        feedback={"test_softmax": ("called attnlib.softmax, which this exercise forbids",)}),
    "attnlib_module_alias": Case(
        both(no_explore, replace("softmax", "return _att.softmax(x, dim)"),
             insert("imports", "import attnlib.attention as _att\n")), 4, IDS[1:],
        feedback={"test_softmax": ("called attnlib.softmax, which this exercise forbids",)}),
    "graded_name_is_the_reference": Case(
        insert("softmax", "from attnlib import softmax\n"), 4, IDS[1:],
        feedback={"test_softmax": ("called attnlib.softmax",)}),
    "fused_attention_alias": Case(
        both(replace("sdpa", "return _fused(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, "
                             "is_causal=is_causal, scale=scale)"),
             insert("imports", "import torch.nn.functional as F\n_fused = F.scaled_dot_product_attention\n")),
        3, IDS[:2], feedback={"test_scaled_dot_product_attention": (
            "called torch.nn.functional.scaled_dot_product_attention, which this exercise forbids",)}),
    "fused_attention_through_partial": Case(
        both(replace("sdpa", "return _fused(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, "
                             "is_causal=is_causal, scale=scale)"),
             insert("imports", "import functools, torch.nn.functional as F\n"
                               "_fused = functools.partial(F.scaled_dot_product_attention)\n")),
        3, IDS[:2], feedback={"test_scaled_dot_product_attention": (
            "called torch.nn.functional.scaled_dot_product_attention",)}),
    "tensor_softmax_method_alias": Case(
        both(replace("softmax", "return _sm(x, dim)"),
             insert("imports", "_sm = torch.Tensor.softmax\n")), 4, IDS[1:],
        feedback={"test_softmax": ("called torch.Tensor.softmax",)}),
    "watcher_switched_off": Case(
        both(no_explore, replace("softmax", """
            import sys
            hook = sys.getprofile()
            sys.setprofile(None)
            out = torch.softmax(x, dim)
            sys.setprofile(hook)
            return out
        """)), 0, (),
        feedback={"test_softmax": ("changed the grader's call watcher (sys.setprofile) during a graded call",),
                  **{i: ("changed the grader's call watcher during the graded function of another exercise (softmax)",)
                     for i in IDS[1:]}}),
    "watcher_broken_by_recursion": Case(
        both(no_explore, replace("softmax", """
            def deep(n):
                return deep(n + 1)
            try:
                deep(0)
            except RecursionError:
                pass
            return _reference(x, dim)
        """), insert("imports", "from attnlib import softmax as _reference\n")), 4, IDS[1:],
        feedback={"test_softmax": ("call watcher stopped",)}),
    "grader_code_replaced": Case(
        both(replace("softmax", "return _reference(x, dim)"), insert("imports", """
            import sys
            from attnlib import softmax as _reference
            import gc
            watcher_class = next(o for o in gc.get_objects() if isinstance(o, type) and o.__name__ == "CallWatcher")
            grader = watcher_class.arm.__globals__
            grader["CallWatcher"].arm = lambda self: None
            grader["_grade_exercise"].__code__ = (lambda *a, **k: None).__code__
            sys.modules["attnlib.grading.core"]._forbid = lambda names: __import__("contextlib").nullcontext()
        """)), 0, (), feedback={i: ("replaced the grader's own code", "during cell 2") for i in IDS},
        notes=("replaced the grader's own code", "put back")),
    "reads_hidden_files": Case(lambda nb, f: None),  # built by its test (absolute paths)
    "writes_to_the_gradebook": Case(lambda nb, f: None),  # built by its test
    "mutates_its_inputs": Case(  # its message: see test_mutated_inputs_are_named
        replace("softmax", "x.zero_()\nreturn torch.full_like(x, 1.0 / x.size(dim))"), 4, IDS[1:]),
    "reseeds_the_rng": Case(
        replace("softmax", "torch.manual_seed(0)\nreturn torch.rand_like(x)"), 4, IDS[1:],
        feedback={"test_softmax": ("wrong values",)}),
    "detects_the_grader": Case(
        insert("imports", "import os\nprint('ENV:', sorted(os.environ))\nprint('CWD:', sorted(os.listdir()))\n"
                          "import sys\nprint('PATH:', sys.path)\n"), 6, IDS),
    "network": Case(
        insert("imports", """
            import socket
            try:
                socket.create_connection(("1.1.1.1", 53), timeout=3)
                print("NETWORK: connected")
            except OSError as exc:
                print("NETWORK: failed:", exc)
        """), 6, IDS),
    # ------------------------------------------------------------------ the whole run (issue 12)
    # softmax's reference outputs tabulated at the top level of a cell (cell 2), and looked up
    "top_level_precompute": Case(
        precompute("import attnlib", "attnlib.softmax"), 4, IDS[1:],
        feedback={"test_softmax": ("called attnlib.softmax outside a graded function (cell 2)",
                                   "which this exercise forbids")}),
    "top_level_precompute_alias": Case(
        precompute("from attnlib import softmax as _s"), 4, IDS[1:],
        feedback={"test_softmax": ("called attnlib.softmax outside a graded function (cell 2)",)}),
    "top_level_precompute_module_alias": Case(
        precompute("import attnlib.attention as _att", "_att.softmax"), 4, IDS[1:],
        feedback={"test_softmax": ("called attnlib.softmax outside a graded function (cell 2)",)}),
    "top_level_precompute_through_partial": Case(
        precompute("import functools, attnlib\n_s = functools.partial(attnlib.softmax)"), 4, IDS[1:],
        feedback={"test_softmax": ("called attnlib.softmax outside a graded function (cell 2)",)}),
    "top_level_precompute_function_type": Case(
        precompute("import types, attnlib\n_s = types.FunctionType(attnlib.softmax.__code__, "
                   "attnlib.softmax.__globals__, None, attnlib.softmax.__defaults__)"), 4, IDS[1:],
        feedback={"test_softmax": ("called attnlib.softmax outside a graded function (cell 2)",)}),
    "top_level_precompute_code_replace": Case(
        precompute("import types, attnlib\n_code = attnlib.softmax.__code__.replace(co_filename='mine.py', "
                   "co_name='mine')\n_s = types.FunctionType(_code, attnlib.softmax.__globals__, None, "
                   "attnlib.softmax.__defaults__)"), 4, IDS[1:],
        feedback={"test_softmax": ("copied the code of attnlib.softmax", "code.replace",
                                   "outside a graded function (cell 2)")}),
    "top_level_precompute_getsource_exec": Case(
        precompute("import inspect, attnlib\n_ns = {}\nexec(inspect.getsource(attnlib.softmax), "
                   "attnlib.attention.__dict__ | _ns)\n_s = _ns['softmax']"), 0, (),
        feedback={i: ("read attnlib/attention.py, the source of attnlib.attention",
                      "outside a graded function (cell 2)") for i in IDS}),
    "top_level_precompute_source_file_exec": Case(
        precompute("import attnlib\n_ns = dict(vars(attnlib.attention))\n"
                   "exec(open(attnlib.attention.__file__).read().replace('from .', 'from attnlib.'), _ns)\n"
                   "_s = _ns['softmax']"), 0, (),
        feedback={i: ("read attnlib/attention.py",) for i in IDS}),
    "top_level_precompute_pathlib_read": Case(
        precompute("import pathlib, attnlib\n_ns = dict(vars(attnlib.attention))\n"
                   "exec(pathlib.Path(attnlib.attention.__file__).read_text(), _ns)\n_s = _ns['softmax']"),
        0, (), feedback={i: ("read attnlib/attention.py",) for i in IDS}),
    "top_level_precompute_importlib_reload": Case(
        precompute("import importlib, attnlib.attention\n_s = importlib.reload(attnlib.attention).softmax"),
        0, (), feedback={i: ("the source of attnlib.attention",) for i in IDS}),
    "top_level_precompute_spec_from_file_location": Case(
        precompute("import importlib.util, attnlib.attention\n"
                   "_spec = importlib.util.spec_from_file_location('attnlib.copy', attnlib.attention.__file__)\n"
                   "_m = importlib.util.module_from_spec(_spec)\n_spec.loader.exec_module(_m)\n_s = _m.softmax"),
        0, (), feedback={i: ("the source of attnlib.attention",) for i in IDS}),
    "top_level_precompute_pycache_marshal": Case(
        precompute("import importlib.util, marshal, types, attnlib.attention\n"
                   "_pyc = open(importlib.util.cache_from_source(attnlib.attention.__file__), 'rb').read()\n"
                   "_ns = dict(vars(attnlib.attention))\nexec(marshal.loads(_pyc[16:]), _ns)\n_s = _ns['softmax']"),
        0, (), feedback={i: ("read attnlib/__pycache__/attention",) for i in IDS}),
    "top_level_precompute_marshal": Case(
        precompute("import marshal, types, attnlib\n_code = marshal.loads(marshal.dumps(attnlib.softmax.__code__))\n"
                   "_s = types.FunctionType(_code, attnlib.softmax.__globals__, None, attnlib.softmax.__defaults__)"),
        4, IDS[1:], feedback={"test_softmax": ("copied the code of attnlib.softmax", "(marshal)")}),
    "top_level_precompute_watcher_switched_off": Case(
        precompute("import sys, attnlib\n_hook = sys.getprofile()\nsys.setprofile(None)", "attnlib.softmax",
                   "sys.setprofile(_hook)\n"), 0, (),
        feedback={i: ("changed the grader's call watcher (sys.setprofile) during cell 2",) for i in IDS}),
    "top_level_precompute_threading_setprofile": Case(
        precompute("import threading, attnlib\nthreading.setprofile(None)", "attnlib.softmax"), 0, (),
        feedback={i: ("changed the grader's call watcher (threading.setprofile) during cell 2",) for i in IDS}),
    "top_level_precompute_torch_modes_off": Case(
        precompute("import torch\n_disabled = torch._C.DisableTorchFunction()\n_disabled.__enter__()",
                   "torch.softmax", "_disabled.__exit__(None, None, None)\n"), 0, (),
        feedback={i: ("changed the grader's call watcher (torch function modes) during cell 2",) for i in IDS}),
    "top_level_precompute_then_crash": Case(
        both(insert("causal_mask", "import torch\n_TABLE = torch.load('table.pt')\n"),
             precompute("import attnlib, os, sys, torch", "attnlib.softmax", """
                 torch.save(_TABLE, 'table.pt')  # the working directory outlives the process
                 for name in ('whole_run.json', 'progress.json'):
                     try:
                         os.remove(os.path.join(sys.argv[-1], name))
                     except OSError as exc:
                         print('REMOVE:', exc)
                 sys.stdout.flush()
                 os._exit(1)
             """)),
        4, IDS[1:], feedback={"test_softmax": ("called attnlib.softmax outside a graded function (cell 2)",)},
        notes=("os._exit(1)", "cell 2")),
    "reads_the_source_in_the_function": Case(
        both(no_explore, replace("softmax", "import inspect, attnlib.attention\n"
                                            "source = inspect.getsource(attnlib.attention)\nreturn x")), 0, (),
        feedback={"test_softmax": ("read attnlib/attention.py, the source of attnlib.attention, which this exercise "
                                   "forbids",),
                  **{i: ("read attnlib/attention.py", "inside the graded function of another exercise (softmax)")
                     for i in IDS[1:]}}),
    "top_level_subprocess": Case(
        insert("imports", "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import attnlib'])\n"),
        6, IDS, notes=("cell 2", "does not let the notebook start other programs (subprocess.Popen)")),
    "thread_started_from_c": Case(
        insert("imports", "import _thread, functools, time\n"
                          "functools.partial(_thread.start_new_thread, time.sleep, (0,))()\n"),
        6, IDS),  # and see test_no_thread_or_program_can_start
    "grader_helper_as_the_answer": Case(
        both(no_explore, _grader_helper_as_softmax), 4, IDS[1:],
        feedback={"test_softmax": ("called the grader's own code (attnlib.grading.exercises.ch02_queries_keys_values."
                                   "_softmax), which is not allowed",)}),
    "grader_helper_in_the_function": Case(
        both(no_explore, replace("softmax", "from attnlib.grading.exercises.ch02_queries_keys_values import _softmax\n"
                                            "return _softmax(x, dim)")), 4, IDS[1:],
        feedback={"test_softmax": ("called the grader's own code",)}),
    "grader_helper_at_the_top_level": Case(
        insert("imports", "import torch\nfrom attnlib.grading.exercises.ch02_queries_keys_values import _softmax\n"
                          "_softmax(torch.ones(3))\n"), 0, (),
        feedback={i: ("called the grader's own code (attnlib.grading.exercises.ch02_queries_keys_values._softmax) "
                      "outside a graded function (cell 2)",) for i in IDS}),
    "launders_through_another_graded_call": Case(
        both(no_explore, _launders_for_sdpa), 3, IDS[:2],
        feedback={"test_scaled_dot_product_attention": (
            "called torch.nn.functional.scaled_dot_product_attention inside the graded function of another "
            "exercise (softmax)",)}),
    "top_level_reference_of_no_exercise": Case(
        insert("imports", "import attnlib, torch\nattnlib.attention_weights(torch.ones(1, 2, 3, 4), "
                          "torch.ones(1, 2, 3, 4))\n"), 0, (),
        feedback={i: ("called attnlib.attention_weights outside a graded function (cell 2)",) for i in IDS}),
    "top_level_call_forbidden_to_one_exercise": Case(
        insert("imports", "import torch, torch.nn.functional as F\n_q = torch.ones(1, 2, 3, 4)\n"
                          "F.scaled_dot_product_attention(_q, _q, _q)\n"), 3, IDS[:2],
        feedback={"test_scaled_dot_product_attention": (
            "called torch.nn.functional.scaled_dot_product_attention outside a graded function (cell 2)",)}),
    "course_helpers_at_the_top_level": Case(
        insert("imports", "import attnlib\nfrom attnlib import KVCache\n"
                          "from attnlib._validate import check_positive_int\ncheck_positive_int(4, 'heads')\n"
                          "from attnlib.grading import EXERCISES\n_cases = EXERCISES['softmax'].make_cases(True)\n"),
        6, IDS),
    # ------------------------------------------------------------------ numerics
    "nan_output": Case(replace("softmax", "return torch.full_like(x, float('nan'))"), 4, IDS[1:],
                       feedback={"test_softmax": ("NaN",)}),
    "inf_output": Case(replace("softmax", "return torch.full_like(x, float('inf'))"), 4, IDS[1:],
                       feedback={"test_softmax": ("inf",)}),
    "wrong_dtype": Case(replace("softmax", "z = x.float()\ne = (z - z.amax(dim, keepdim=True)).exp()\n"
                                           "return e / e.sum(dim, keepdim=True)"), 4, IDS[1:],
                        feedback={"test_softmax": ("wrong dtype", "float32")}),
    "float16_answer": Case(
        replace("sdpa", "return torch.zeros(query.shape[:-1] + value.shape[-1:], dtype=torch.float16)"), 3,
        IDS[:2], feedback={"test_scaled_dot_product_attention": ("wrong dtype", "float16")}),
    "wrong_device": Case(replace("softmax", "return torch.empty_like(x, device='meta')"), 4, IDS[1:],
                         feedback={"test_softmax": ("meta",)}),
    "non_contiguous_output": Case(
        replace("causal_mask", "S = L if S is None else S\n"
                               "return torch.ones(S, L, dtype=torch.bool, device=device).triu().t()"), 6, IDS),
}


def sha(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Graded:
    path: Path
    report: Report | None
    error: Exception | None
    before: dict[str, str]
    after: dict[str, str]
    seconds: float


def _build(name: str, root: Path) -> Path:
    case = CASES[name]
    folder = root / name
    folder.mkdir()
    path = folder / f"{name}.ipynb"
    if case.raw is not None:
        path.write_bytes(case.raw)
        return path
    nb = copy.deepcopy(CORRECT)
    out = case.build(nb, folder)
    path.write_text(json.dumps(out if isinstance(out, dict) else nb, indent=1))
    return path


def grade(path: Path, **kwargs: Any) -> Graded:
    before = sha(path.parent)
    start = time.monotonic()
    report, error = None, None
    try:
        report = grade_notebook(path, source=SOURCE, **{**FAST, **kwargs})
    except GradingError as exc:
        error = exc
    return Graded(path, report, error, before, sha(path.parent), time.monotonic() - start)


SPECIAL = {"reads_hidden_files", "writes_to_the_gradebook"}


class Corpus:
    """The graded cases, each graded once, on first use; ``prefetch``: these first, two at a
    time from threads (the way the class grader calls :func:`grade_notebook`)."""

    def __init__(self, root: Path, prefetch: list[str]) -> None:
        self.root = root
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.futures: dict = {}
        self.lock = threading.Lock()
        for name in prefetch:
            self._submit(name)

    def _submit(self, name: str) -> Any:
        with self.lock:
            if name not in self.futures:
                self.futures[name] = self.pool.submit(lambda: grade(_build(name, self.root), **CASES[name].kwargs))
            return self.futures[name]

    def __getitem__(self, name: str) -> Graded:
        return self._submit(name).result()

    def done(self) -> dict[str, Graded]:
        return {n: f.result() for n, f in self.futures.items() if f.done()}


def _one_process_runs_this_module(config: pytest.Config) -> bool:
    """No xdist, or xdist sending whole files to one worker (``--dist loadfile``, as ``make
    unit`` does); with ``-n 2`` alone the tests are spread and each worker grades its own."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return True
    argv = " ".join(workerinput.get("mainargv", []))
    return any(mode in argv for mode in ("loadfile", "loadscope", "loadgroup"))


@pytest.fixture(scope="module")
def corpus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The cases of the tests selected in this session (``-k`` aside), prefetched where one
    process runs them all."""
    ours = [item for item in request.session.items if item.path == Path(__file__)]
    selected = [item.callspec.params["name"] for item in ours
                if getattr(item, "originalname", "") == "test_case" and hasattr(item, "callspec")]
    if any(getattr(item, "originalname", "") == "test_corrupt_json_is_a_grading_error" for item in ours):
        selected.append("corrupt_json")
    corpus = Corpus(tmp_path_factory.mktemp("hostile"),
                    selected if _one_process_runs_this_module(request.config) else [])
    yield corpus
    corpus.pool.shutdown(wait=True, cancel_futures=True)


def items(report: Report) -> dict[str, runner.Item]:
    return {i.id: i for i in report.items}


def isolated(report: Report) -> bool:
    """Whether this machine gave the child its namespaces and mounts (else: the fallback)."""
    return report.sandbox.get("mode") in ("namespaces", "root") and bool(report.sandbox.get("mounts"))


@pytest.mark.parametrize("name", [n for n in CASES if n not in SPECIAL and CASES[n].raw is None])
def test_case(corpus: Corpus, name: str) -> None:
    case, graded = CASES[name], corpus[name]
    assert graded.error is None, graded.error
    report = graded.report
    assert report is not None
    got = items(report)
    detail = {i.id: (i.points, i.feedback) for i in report.items}
    assert report.max_score == 6, detail  # points always come from the source
    assert [i.id for i in report.items] == list(IDS)
    if case.passed is not None:
        assert {i for i in IDS if got[i].passed} == set(case.passed), (detail, report.notes)
        for i in IDS:  # 0 or all of an item's points
            assert got[i].points == (POINTS[i] if got[i].passed else 0)
    if case.score is not None:
        assert report.score == case.score, (detail, report.notes)
    for item_id, words in case.feedback.items():
        for word in words:
            assert word in got[item_id].feedback, (word, got[item_id].feedback, report.notes)
    for word in case.notes:
        assert any(word in n for n in report.notes), (word, report.notes)
    assert graded.before == graded.after, "the submission's folder changed"
    assert report.log == report.log[:supervisor.LOG_LIMIT + 200]


def test_corrupt_json_is_a_grading_error(corpus: Corpus, capsys: pytest.CaptureFixture) -> None:
    graded = corpus["corrupt_json"]
    assert isinstance(graded.error, GradingError)
    assert "not valid JSON" in str(graded.error)
    assert cli_main(["grade", str(graded.path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_the_corpus_is_fast(corpus: Corpus) -> None:
    """Every case within its limits: a hang costs its step limit, not the whole timeout."""
    times = sorted(((round(g.seconds, 1), n) for n, g in corpus.done().items()), reverse=True)
    print("\nseconds per case:", times)
    slow = {n: t for t, n in times if t > 60}
    assert not slow


def test_the_environment_is_scrubbed(corpus: Corpus) -> None:
    log = corpus["detects_the_grader"].report.log
    env_line = next(line for line in log.splitlines() if line.startswith("ENV:"))
    names = set(eval(env_line[4:]))  # noqa: S307 (a list of names printed by the notebook)
    assert names <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "MPLBACKEND", "MPLCONFIGDIR", "IPYTHONDIR",
                     "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LD_LIBRARY_PATH",
                     "TRITON_INTERPRET",  # the grader's own, for chapter 13's kernels (supervisor._child_env)
                     "COLUMNS", "LINES", "PAGER", "CLICOLOR", "GIT_PAGER", "FORCE_COLOR", "TERM"}, names
    assert not {n for n in names if n.startswith(("PYTEST", "ATTNLIB", "NBGRADER", "CI", "GITHUB"))}
    # the working directory holds the copy of the submission only; it is not on sys.path
    cwd_line = next(line for line in log.splitlines() if line.startswith("CWD:"))
    assert eval(cwd_line[4:]) == ["detects_the_grader.ipynb"]  # noqa: S307
    path_line = next(line for line in log.splitlines() if line.startswith("PATH:"))
    assert "''" not in path_line and str(corpus["detects_the_grader"].path.parent) not in path_line


def test_no_network(corpus: Corpus) -> None:
    report = corpus["network"].report
    line = next(line for line in report.log.splitlines() if line.startswith("NETWORK:"))
    if report.sandbox.get("mode") in ("namespaces", "root"):
        assert "failed" in line and report.sandbox["network"]
    else:
        assert any("NOT protected" in n for n in report.notes)


def test_sandbox_note(corpus: Corpus) -> None:
    report = corpus["test_cells_edited"].report
    note = next(n for n in report.notes if n.startswith("sandbox:"))
    assert "memory 1 GiB" in note
    if isolated(report):
        assert "no network" in note and "hidden" in note
    else:
        assert "NOT" in note


def _probe_notebook(folder: Path, code: str, wrong: bool = True) -> Path:
    nb = copy.deepcopy(CORRECT)
    if wrong:
        nb["cells"][CELL["softmax"]]["source"] = body("softmax", code)
    else:
        nb["cells"].insert(CELL["sdpa"] + 1, code_cell(code))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "probe.ipynb"
    path.write_text(json.dumps(nb))
    return path


def test_hidden_paths_cannot_be_read_or_written(tmp_path: Path) -> None:
    """The course's solutions/ and tools/, the source notebook, the class's gradebook and the
    other submissions: neither readable nor writable from the notebook's code."""
    root = runner.repo_root()
    gradebook = tmp_path / "gradebook.db"
    gradebook.write_text("grades")
    other = tmp_path / "submitted" / "bob" / "probe"
    other.mkdir(parents=True)
    (other / "probe.ipynb").write_text("bob's work")
    targets = [root / "solutions", root / "tools", SOURCE, gradebook, other / "probe.ipynb",
               root / "tests" / "fixtures" / "grading" / "source.ipynb"]
    code = f"""
        import os
        for p in {[str(t) for t in targets]!r}:
            try:
                if os.path.isdir(p):
                    print("READ", p, len(os.listdir(p)))
                else:
                    print("READ", p, len(open(p, 'rb').read()))
            except OSError as exc:
                print("DENIED", p, exc.strerror)
            else:  # readable: no sandbox here; never tamper with the real course
                print("DENIED-WRITE not tried", p)
                continue
            try:
                target = os.path.join(p, 'x') if os.path.isdir(p) else p
                open(target, 'a').write('tampered')
                print("WROTE", p)
            except OSError as exc:
                print("DENIED-WRITE", p, exc.strerror)
        """
    path = _probe_notebook(tmp_path / "submitted" / "alice" / "probe", code, wrong=False)
    before = sha(tmp_path)
    report = grade_notebook(path, source=SOURCE, hide=[gradebook, tmp_path / "submitted"], **FAST)
    assert report.score == 6
    lines = [line for line in report.log.splitlines() if line.startswith(("READ", "DENIED", "WROTE"))]
    assert len(lines) == 2 * len(targets), report.log
    if not isolated(report):
        pytest.skip(f"no namespaces here: {report.sandbox.get('problems')}")
    assert not [line for line in lines if line.startswith(("READ", "WROTE"))], lines
    assert sha(tmp_path) == before
    assert gradebook.read_text() == "grades"


def test_hidden_source_cannot_be_reached_by_a_graded_function(tmp_path: Path) -> None:
    """Reading the hidden tests from inside a graded call: nothing to read, nothing gained."""
    code = f"""
        try:
            data = open({str(SOURCE)!r}).read()
        except OSError:
            return x  # wrong: the honest part of this submission
        return torch.softmax(x, dim) if 'hidden=True' in data else x
    """
    report = grade_notebook(_probe_notebook(tmp_path / "p", code), source=SOURCE, **FAST)
    if isolated(report):
        assert items(report)["test_softmax"].points == 0
        assert "wrong values" in items(report)["test_softmax"].feedback
    else:  # the source is readable, but torch.softmax is forbidden here anyway
        assert items(report)["test_softmax"].points == 0
    assert report.score == 4


def test_fallback_without_namespaces(tmp_path: Path) -> None:
    """isolate=False (what a machine without namespaces gets): the faults are still contained,
    and the note says what is not protected."""
    nb = copy.deepcopy(CORRECT)
    nb["cells"][CELL["softmax"]]["source"] = body("softmax", "import ctypes\nreturn ctypes.string_at(0)")
    nb["cells"].insert(CELL["sdpa"] + 1, code_cell("import os\nos._exit(1)\n"))
    path = tmp_path / "fallback.ipynb"
    path.write_text(json.dumps(nb))
    report = grade_notebook(path, source=SOURCE, isolate=False, **FAST)
    assert report.score == 4
    assert "SIGSEGV" in items(report)["test_softmax"].feedback
    assert report.sandbox["mode"] == "none"
    assert any("NOT protected" in n for n in report.notes)
    assert any("os._exit(1)" in n and "cell 10" in n for n in report.notes)


def test_restarts_are_bounded(tmp_path: Path) -> None:
    """Every cell crashes: the grader gives up after max_restarts fresh processes, in time."""
    nb = copy.deepcopy(CORRECT)
    for n in (3, 6, 9):
        nb["cells"][n]["source"] = _src(nb["cells"][n]) + "\nimport os\nos._exit(1)\n"
    path = tmp_path / "crashes.ipynb"
    path.write_text(json.dumps(nb))
    start = time.monotonic()
    report = grade_notebook(path, source=SOURCE, max_restarts=2, **FAST)
    assert time.monotonic() - start < 60
    assert report.score == 0
    assert any("stopped the grading process 3 times" in n for n in report.notes), report.notes
    for item in report.items:
        assert item.feedback


def test_overall_timeout_covers_the_restarts(tmp_path: Path) -> None:
    nb = copy.deepcopy(CORRECT)
    nb["cells"].insert(CELL["imports"] + 1, code_cell("import time\nwhile True:\n    try:\n        time.sleep(1)\n"
                                                       "    except BaseException:\n        pass\n"))
    path = tmp_path / "slow.ipynb"
    path.write_text(json.dumps(nb))
    start = time.monotonic()
    report = grade_notebook(path, source=SOURCE, timeout=6, step_timeout=100, memory_limit=1 << 30)
    assert time.monotonic() - start < 6 + 10
    assert report.score == 0
    assert all("timed out" in i.feedback and "6 s" in i.feedback for i in report.items)


def test_mutated_inputs_are_named(corpus: Corpus) -> None:
    """The inputs are cloned for every call, so a softmax that zeroes its input only hurts
    itself, and the check names the in-place change (not a raised error, not wrong values)."""
    feedback = items(corpus["mutates_its_inputs"].report)["test_softmax"].feedback
    assert "changed its input `x` in place" in feedback and "raised" not in feedback, feedback


def test_hostile_fixtures_folder_documents_the_corpus() -> None:
    readme = (HOSTILE / "README.md").read_text()
    for name in CASES:
        assert name in readme, name


# --------------------------------------------------------------------------- the whole run (issue 12)

ROOT = Path(__file__).resolve().parents[1]


def test_no_thread_or_program_can_start(corpus: Corpus) -> None:
    """A thread started from C (no profiler can be set in it) and a program (another
    interpreter, where the reference is in reach) are refused: the cell fails, with a note."""
    notes = corpus["thread_started_from_c"].report.notes
    assert any("cell 2" in n and "can't start new thread" in n for n in notes) \
        or any("no seccomp" in n for n in notes), notes
    notes = corpus["top_level_subprocess"].report.notes
    assert any("cell 2" in n and "start other programs" in n for n in notes), notes


def test_the_record_outlives_a_crash(corpus: Corpus) -> None:
    """A cell that cheats, tries to delete the grader's files and crashes the process: the fresh
    process skips the cell (a later cell loads the table the cheat saved, where the working
    directory outlives the process), but the record of the forbidden call was kept, and the
    grader's directory was out of reach."""
    report = corpus["top_level_precompute_then_crash"].report
    removes = [line for line in report.log.splitlines() if line.startswith("REMOVE:")]
    assert len(removes) == 2 and all("out of the notebook's reach" in line for line in removes), report.log
    assert any("run again without it" in n for n in report.notes), report.notes


def _chapter_2_lookup_table(folder: Path) -> Path:
    """The measured universal cheat (issue 12): the released chapter 2 notebook with the honest
    softmax (the solution's) and an sdpa that looks up attnlib's outputs on every public case,
    tabulated at the top level of its cell."""
    name = "02_queries_keys_values"
    released = json.loads((ROOT / "notebooks" / name / f"{name}.ipynb").read_text())
    solution = json.loads((ROOT / "solutions" / name / f"{name}.ipynb").read_text())
    by_id = {c.get("id"): c for c in solution["cells"]}
    for cell in released["cells"]:
        if cell.get("id") == "softmax-solution":
            cell["source"] = by_id["softmax-solution"]["source"]
        elif cell.get("id") == "scaled_dot_product_attention-solution":
            cell["source"] = textwrap.dedent("""
                import attnlib
                from attnlib.grading import EXERCISES
                _TABLE = [(c.args, c.kwargs, attnlib.scaled_dot_product_attention(*c.args, **c.kwargs))
                          for hidden in (False, True)
                          for c in EXERCISES["scaled_dot_product_attention"].make_cases(hidden)]

                def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                                 scale=None, enable_gqa=False, *, generator=None):
                    for args, kwargs, out in _TABLE:
                        if (args[0].shape == query.shape and torch.equal(args[0], query)
                                and kwargs.get("is_causal", False) == is_causal and kwargs.get("scale") == scale):
                            return out.clone()
                    raise NotImplementedError
            """)
    path = folder / name / f"{name}.ipynb"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(released))
    return path


def test_chapter_2_lookup_table_scores_only_the_honest_part(tmp_path: Path) -> None:
    """Measured before issue 12: 8/8. The sdpa table costs the sdpa exercise (its reference was
    called outside a graded function, the message says which and where); the honest softmax
    keeps its points, since the call was sdpa's reference, not softmax's."""
    report = grade_notebook(_chapter_2_lookup_table(tmp_path), timeout=120)
    got = items(report)
    assert (report.score, report.max_score) == (3, 8), [(i.id, i.points, i.feedback) for i in report.items]
    assert got["test_softmax"].passed
    feedback = got["test_scaled_dot_product_attention"].feedback
    assert "called attnlib.scaled_dot_product_attention outside a graded function (cell 8)" in feedback
    assert "which this exercise forbids" in feedback


def test_explore_cells_are_not_run() -> None:
    """The explore cells (ids ending in -explore in the source notebook: they call attnlib on
    purpose) are left out of the run, found by id, or by their code where ids were lost."""
    name = "02_queries_keys_values"
    source = json.loads((ROOT / "solutions" / name / f"{name}.ipynb").read_text())
    released = json.loads((ROOT / "notebooks" / name / f"{name}.ipynb").read_text())
    explore = {n for n, c in enumerate(source["cells"]) if str(c.get("id", "")).endswith("-explore")}
    assert len(explore) == 2
    assert runner._explore_cells(released, source) == explore
    assert runner._explore_cells(released, None) == explore  # no source: the submission's own ids
    for cell in released["cells"]:
        cell.pop("id", None)  # nbformat 4.0: no ids, the cells are found by their code
    assert runner._explore_cells(released, source) == explore
    cells = runner._learner_cells(released, set(), explore)
    assert not {c["index"] for c in cells} & explore and cells
    assert runner._explore_cells(CORRECT, SRC) == set()  # the fixtures have none


def test_run_guard_in_process() -> None:
    """The guard's tables and rules, without a child: what is forbidden to whom, attnlib's
    input checks and the exercises' public helpers allowed, a copy of the reference's bytecode
    recognised, attnlib's files (and their __pycache__) known as its source."""
    import importlib.util

    import attnlib
    from attnlib.grading import EXERCISES, child
    from attnlib.grading import guard as guard_mod
    from attnlib.grading import watcher as watcher_mod

    exercises = [("softmax", "softmax"), ("causal_mask", "causal_mask"),
                 ("scaled_dot_product_attention", "scaled_dot_product_attention")]
    watchers = {k: watcher_mod.CallWatcher(EXERCISES[e].forbidden, child._SENTINELS) for k, (e, _) in enumerate(exercises)}
    with tempfile.TemporaryDirectory() as grader:
        guard = guard_mod.RunGuard(watchers, grader, exercises)
    assert {k for k, _ in guard.codes[attnlib.softmax.__code__]} == {0, 1, 2}
    assert not any(f.endswith("_validate.py") for f in guard.files)  # the stubs' input checks
    source = os.path.realpath(attnlib.attention.__file__)
    assert {k for k, _ in guard.sources[source]} == {0, 1, 2}
    pyc = os.path.realpath(importlib.util.cache_from_source(attnlib.attention.__file__))
    assert pyc in guard.sources
    assert attnlib.softmax.__code__.co_code in guard.co_codes
    # a table of sdpa's outputs concerns sdpa, not softmax (attnlib as a whole) nor causal_mask
    sdpa = attnlib.scaled_dot_product_attention.__code__
    assert [k for k in (0, 1, 2) if not guard._elsewhere(k, sdpa)] == [2]
    assert [k for k in (0, 1, 2) if not guard._elsewhere(k, attnlib.attention_weights.__code__)] == [0, 1, 2]
    # the exercises' public helpers may be called, the rest of their code is the answer key
    assert EXERCISES["softmax"].make_cases.__code__ in watcher_mod._ENTRY_CODES
    from attnlib.grading.exercises import ch02_queries_keys_values as ch02
    assert ch02._softmax.__code__ not in watcher_mod._ENTRY_CODES
    assert ch02.__file__ in watcher_mod._EXERCISE_FILES


def test_root_without_user_namespaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root where user namespaces are off: mount/network/PID namespaces and the user
    nobody; where nobody cannot run this Python (e.g. under /root), the child is started
    again without namespaces, with a note."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    monkeypatch.setattr(supervisor, "_sandbox_options", lambda: {"userns": False})
    nb = copy.deepcopy(CORRECT)
    nb["cells"].insert(CELL["sdpa"] + 1, code_cell("import os\nprint('UID:', os.getuid())\n"))
    path = tmp_path / "root.ipynb"
    path.write_text(json.dumps(nb))
    report = grade_notebook(path, source=SOURCE, **FAST)
    assert report.score == 6
    uid = next(line for line in report.log.splitlines() if line.startswith("UID:"))
    if report.sandbox["mode"] == "root":
        assert uid == "UID: 65534" and report.sandbox["user"] == "nobody"
    else:
        assert any("could not start" in n for n in report.notes)
        assert any("NOT protected" in n for n in report.notes)


# --------------------------------------------------------------------------- the call watcher, in-process


def _watched(forbidden: tuple[str, ...], fn: Callable[[], Any]) -> str | None:
    """Run ``fn`` under a watcher for ``forbidden``; the watcher's verdict."""
    from attnlib.grading import child
    from attnlib.grading import watcher as watcher_mod
    from attnlib.grading.core import ForbiddenCallError

    watcher = watcher_mod.CallWatcher(forbidden, child._SENTINELS)
    watcher.arm()
    try:
        fn()
    except ForbiddenCallError:
        pass
    finally:
        watcher.disarm()
    return watcher.message()


def test_watcher_sees_forbidden_calls_by_any_route() -> None:
    import functools

    import torch
    import torch.nn.functional as F

    import attnlib
    import attnlib.attention

    x = torch.randn(3, 4, dtype=torch.float64)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    alias, fused, method = attnlib.softmax, F.scaled_dot_product_attention, torch.Tensor.softmax
    no_attnlib, no_fused = ("attnlib",), ("torch.nn.functional.scaled_dot_product_attention",)
    no_softmax = ("torch.softmax", "torch.Tensor.softmax", "torch.nn.functional.softmax", "torch.nn.Softmax")
    assert "attnlib.softmax" in _watched(no_attnlib, lambda: alias(x))
    assert "attnlib.softmax" in _watched(no_attnlib, lambda: attnlib.attention.softmax(x))
    assert "attnlib.softmax" in _watched(no_attnlib, lambda: functools.partial(alias, dim=-1)(x))
    assert "attnlib.scaled_dot_product_attention" in _watched(no_attnlib, lambda: list(map(
        attnlib.scaled_dot_product_attention, [q], [q], [q])))
    assert "MultiHeadAttention" in _watched(no_attnlib, lambda: type("Mine", (attnlib.MultiHeadAttention,), {})(4, 2))
    assert "scaled_dot_product_attention" in _watched(no_fused, lambda: fused(q, q, q))
    assert "scaled_dot_product_attention" in _watched(no_fused, lambda: functools.partial(fused)(q, q, q))
    assert "torch.Tensor.softmax" in _watched(no_softmax, lambda: method(x, -1))
    assert "torch.Tensor.softmax" in _watched(no_softmax, lambda: x.softmax(-1))
    assert "torch.Tensor.softmax" in _watched(no_softmax, lambda: list(map(method, [x], [-1])))
    assert "torch.nn.Softmax" in _watched(no_softmax, lambda: torch.nn.Softmax(-1)(x))
    # what is allowed stays allowed, and the watcher leaves no trace behind
    assert _watched(no_softmax + no_attnlib + no_fused, lambda: (x.exp() / x.exp().sum(-1, keepdim=True),
                                                                torch.matmul(q, q.transpose(-2, -1)))) is None
    import sys

    assert sys.getprofile() is None
    assert not torch.overrides._get_current_function_mode_stack()


def test_watcher_spares_the_exercises_own_checks(tmp_path: Path) -> None:
    """An extra check (code under attnlib/grading) may use attnlib (e.g. measure.ShapeRecorder
    around the learner's code): not counted; the learner's code inside it still is."""
    import importlib.util

    import torch

    from attnlib.grading import child
    from attnlib.grading import watcher as watcher_mod

    module_path = tmp_path / "exercises_fake.py"
    module_path.write_text(textwrap.dedent("""
        import attnlib
        from attnlib.measure import ShapeRecorder

        def extra_check(student, x):
            attnlib.softmax(x)
            with ShapeRecorder() as rec:
                student(x)
            return rec.shapes
    """))
    spec = importlib.util.spec_from_file_location("exercises_fake", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = torch.randn(2, 3)
    watcher = watcher_mod.CallWatcher(("attnlib",), child._SENTINELS)
    watcher.exempt_files = watcher.exempt_files | {str(module_path)}

    def run(student: Callable) -> str | None:
        watcher.arm()
        try:
            module.extra_check(student, x)
        except Exception:
            pass
        finally:
            watcher.disarm()
        return watcher.message()

    assert run(lambda t: t.exp() / t.exp().sum()) is None
    import attnlib

    assert "attnlib.softmax" in run(lambda t: attnlib.softmax(t))


def test_watcher_spares_every_chapter_module_and_nothing_of_its_own() -> None:
    """Every chapter's exercise module (``attnlib/grading/exercises/``, a chapter package's
    submodules included) runs checks in the child and is spared like the fake module above;
    the grader's own machinery is not."""
    import os
    import sys

    from attnlib.grading import child, exercises
    from attnlib.grading import watcher as watcher_mod

    watcher = watcher_mod.CallWatcher(("attnlib",), child._SENTINELS)
    modules = [m for name, m in sys.modules.items() if name.startswith(f"{exercises.__name__}.")]
    assert len(modules) >= 11
    assert all(f"{exercises.__name__}.{name}" in sys.modules for name in exercises.CHAPTER_MODULES)
    files = {os.path.abspath(m.__file__) for m in modules} | {os.path.abspath(exercises.__file__)}
    missing = files - watcher.exempt_files
    assert not missing, f"exercise modules the watcher would blame for the learner: {missing}"
    grading_dir = os.path.dirname(os.path.abspath(child.__file__))
    for own in ("core.py", "child.py", "watcher.py", "guard.py", "steps.py", "runner.py", "supervisor.py", "report.py", "protocol.py", "notebook.py",
                "sandbox.py", "__init__.py", "compare.py", "site.py", "summary.py", "stopping.py"):
        assert os.path.join(grading_dir, own) not in watcher.exempt_files, own


def test_the_grader_code_guard_covers_every_module_the_child_runs() -> None:
    """The child puts back the grader's code a notebook replaced: that of every top-level
    grading module it imports (the chapter modules are the exercises' checks), protocol.py's
    names and writer included."""
    import subprocess
    import sys

    from attnlib.grading import child, protocol

    code = ("import sys, attnlib.grading.child\n"
            "print(' '.join(m for m in sys.modules if m.startswith('attnlib.grading.')))")
    loaded = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    top = {m for m in loaded if m.count(".") == 2 and m != "attnlib.grading.exercises"}
    assert {"attnlib.grading.child", "attnlib.grading.core", "attnlib.grading.protocol"} <= top
    chapters = {m for m in loaded if m.startswith("attnlib.grading.exercises.")}
    assert "attnlib.grading.exercises.common" in chapters and len(chapters) > 2, chapters
    guarded = {m.__name__ for m in child._guarded_modules()}
    assert top | chapters <= guarded, (top | chapters) - guarded
    name = protocol.__name__
    intact = {k: v for k, v in child._snapshot().items() if k.startswith(name + ".")}
    write, case, code_of_read = protocol.write_atomic, protocol.CASE, protocol.read_json.__code__
    try:
        protocol.write_atomic = lambda path, data: None
        protocol.CASE = protocol.CELL
        protocol.read_json.__code__ = (lambda path, limit=0: None).__code__
        changed = child._restore(intact)
    finally:
        protocol.write_atomic, protocol.CASE, protocol.read_json.__code__ = write, case, code_of_read
    assert set(changed) == {f"{name}.write_atomic", f"{name}.CASE", f"{name}.read_json.__code__"}, changed
    assert child._restore(intact) == []

    # a chapter module's check, replaced by the notebook, is put back too
    from attnlib.grading.exercises import ch05_self_cross_masks as chapter

    intact = {k: v for k, v in child._snapshot().items() if k.startswith(chapter.__name__ + ".")}
    cases = chapter._causal_cases
    try:
        chapter._causal_cases = lambda hidden: []
        changed = child._restore(intact)
    finally:
        chapter._causal_cases = cases
    assert changed == [f"{chapter.__name__}._causal_cases"], changed

    # and one of a chapter package's submodules, under the submodule's name (not its package's)
    from attnlib.grading.exercises.ch12_todays_llms import paged as submodule

    package = submodule.__name__.rsplit(".", 1)[0]
    intact = {k: v for k, v in child._snapshot().items() if k.startswith(package + ".")}
    schedule = submodule._append_schedule
    try:
        submodule._append_schedule = lambda student, case: None
        changed = child._restore(intact)
        assert submodule._append_schedule is schedule
    finally:
        submodule._append_schedule = schedule
    assert changed == [f"{submodule.__name__}._append_schedule"], changed

    # a function the guard imported from the watcher, replaced under the guard's own name, too
    from attnlib.grading import guard as guard_mod

    intact = {k: v for k, v in child._snapshot().items() if k.startswith(guard_mod.__name__ + ".")}
    origin = guard_mod._origin
    try:
        guard_mod._origin = lambda frame, reads=False: None
        changed = child._restore(intact)
        assert guard_mod._origin is origin
    finally:
        guard_mod._origin = origin
    assert changed == [f"{guard_mod.__name__}._origin"], changed

def test_watcher_notices_being_switched_off() -> None:
    import torch

    from attnlib.grading import child
    from attnlib.grading import guard as guard_mod
    from attnlib.grading import watcher as watcher_mod

    watcher = watcher_mod.CallWatcher(("torch.softmax",), child._SENTINELS)
    guard_mod._watchers.append(watcher)
    try:
        watcher.arm()
        try:
            guard_mod._guarded_setprofile(None)
        finally:
            watcher.disarm()
        assert "call watcher" in watcher.message()

        def deep(n: int) -> int:
            return deep(n + 1)

        watcher.arm()
        try:
            deep(0)
        except RecursionError:
            pass
        finally:
            watcher.disarm()
        assert watcher.lost and watcher.message() is None  # switched off by the RecursionError
        assert torch.softmax is not None
    finally:
        guard_mod._watchers.remove(watcher)


def test_course_under_a_scratch_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A course checked out under /tmp (as a CI clone may be): the fresh tmpfs over /tmp also
    covers the course's venv and attnlib. They come back read-only, the child still starts
    in its namespaces, and the rest of the course stays out of reach. Simulated here by
    making the course's parent folder one of the scratch folders."""
    root = runner.repo_root()
    if root.parent == Path("/"):
        pytest.skip("the course sits at the top of the file system")
    code = f"""
        import os
        import attnlib
        readable = False
        for p in ({str(root / "solutions")!r}, {str(root / "tools")!r}):
            try:
                print("PROBE READ", p, len(os.listdir(p)))
                readable = True
            except OSError as exc:
                print("PROBE DENIED", p, exc.strerror)
        for p in () if readable else (os.path.dirname(attnlib.__file__), {str(root)!r}):
            try:
                open(os.path.join(p, "tampered.txt"), "w").write("x")
                print("PROBE WROTE", p)
            except OSError as exc:
                print("PROBE DENIED-WRITE", p, exc.strerror)
        """
    path = _probe_notebook(tmp_path / "p", code, wrong=False)
    plain = grade_notebook(_probe_notebook(tmp_path / "plain", "pass", wrong=False), source=SOURCE, **FAST)
    if not isolated(plain):
        pytest.skip(f"no namespaces here: {plain.sandbox.get('problems')}")
    scratch = sorted({tempfile.gettempdir(), "/tmp", "/dev/shm", str(root.parent)})
    monkeypatch.setattr(supervisor, "_sandbox_options", lambda: {"scratch": scratch})
    report = grade_notebook(path, source=SOURCE, **FAST)
    assert report.score == 6, report.notes
    assert isolated(report), report.sandbox
    probes = [line for line in report.log.splitlines() if line.startswith("PROBE")]
    assert all("DENIED" in line for line in probes) and len(probes) == 4, probes
    assert not (root / "attnlib" / "tampered.txt").exists() and not (root / "tampered.txt").exists()


def test_namespaces_without_mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Namespaces but no mounts (a user namespace without capabilities, as AppArmor gives on
    recent Ubuntu): the network is still cut, and the note says nothing is hidden."""
    monkeypatch.setattr(supervisor, "_sandbox_options", lambda: {"mount": False})
    path = _build("network", tmp_path)
    report = grade_notebook(path, source=SOURCE, **FAST)
    assert report.score == 6
    if report.sandbox.get("mode") not in ("namespaces", "root"):
        pytest.skip(f"no namespaces here: {report.sandbox.get('problems')}")
    assert not report.sandbox["mounts"]
    line = next(line for line in report.log.splitlines() if line.startswith("NETWORK:"))
    assert "failed" in line
    assert any("NOT hidden" in n for n in report.notes), report.notes


def test_the_sandbox_launchers_file_names_agree_with_the_protocol() -> None:
    """sandbox.py runs before attnlib can be imported, so it keeps copies of the two names it
    writes; the parent reads them by the names in protocol.py."""
    from attnlib.grading import protocol, sandbox

    assert (sandbox.SANDBOX_REPORT, sandbox.EXIT) == (protocol.SANDBOX_REPORT, protocol.EXIT)
    assert {protocol.SANDBOX_REPORT, protocol.EXIT} <= set(protocol.PER_ATTEMPT)
    text = Path(sandbox.__file__).read_text()
    assert "from attnlib" not in text and "import attnlib" not in text  # standard library only


def test_no_protocol_name_is_spelt_out_on_either_side() -> None:
    """The parent (runner.py, supervisor.py, report.py) and the child (child.py) name the
    files and phases through protocol.py only: a literal file name or phase string on one side
    could drift."""
    import re

    from attnlib.grading import child, protocol, report, runner, supervisor

    names = [protocol.SANDBOX_CONFIG, protocol.JOB, protocol.PROGRESS, protocol.DONE,
             protocol.SANDBOX_REPORT, protocol.EXIT, "cases_", "status_", "out_"]
    phases = [protocol.START, protocol.CELL, protocol.CASE, protocol.EXTRA, protocol.EXERCISE,
              protocol.FINISHED]
    for module in (runner, supervisor, report, child):
        code = re.sub(r'"""[\s\S]*?"""', "", Path(module.__file__).read_text())  # not the docs
        code = "\n".join(line.split("#")[0] for line in code.splitlines())  # not the comments
        for name in names:
            assert f'"{name}' not in code and f'f"{name}' not in code, (module.__name__, name)
        for phase in phases:
            spelt = re.findall(rf'phase"?\)?\s*(?:==|!=|=|:)\s*"{phase}"'
                               rf'|phase"\)\s+(?:not\s+)?in\s+\([^)]*"{phase}"', code)
            assert not spelt, (module.__name__, spelt)
