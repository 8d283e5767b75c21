"""Time limits that scale with the work (issue 12, "fair to slow but correct work").

A graded case may take the larger of the step limit and ``CASE_TIME_MULTIPLE`` times the
reference's own time on it: ``attnlib grade``'s child measures the reference before any of the
learner's code runs and stops a call at its limit; ``check()`` (the test cells, hence ``nbgrader
autograde``) measures after the fact and fails a correct call over it. A time-out says what ran,
for how long, and the limit, and guesses an infinite loop only when no case returned at all.
Every exercise's slow solution (``tools/exercises``: loops where a learner would loop) gets full
marks from both graders: ``tests/test_course.py``.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch

from attnlib.grading import protocol
from attnlib.grading.core import grade_function
from attnlib.grading.runner import grade_notebook

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tools.exercises: the course's solutions
ASSIGNMENT = "02_queries_keys_values"
SOURCE = ROOT / "solutions" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"


def test_a_case_limit_is_a_multiple_of_the_reference_time_with_a_floor() -> None:
    assert protocol.case_limit(0.002, 30.0) == 30.0  # a fast reference: the floor
    assert protocol.case_limit(0.05, 30.0) == pytest.approx(protocol.CASE_TIME_MULTIPLE * 0.05)
    assert protocol.case_limit(0.05, 30.0) > 30.0
    text = protocol.limit_text(0.0021, 30.0)
    assert text.startswith("30 s (") and "2.1 ms" in text and str(protocol.CASE_TIME_MULTIPLE) in text


def test_a_time_out_guesses_an_infinite_loop_only_when_nothing_returned() -> None:
    stuck = protocol.timeout_message(0.001, 8.0, returned=0, slowest=0.0)
    slow = protocol.timeout_message(0.001, 8.0, returned=3, slowest=6.5)
    assert stuck.startswith("did not finish within 8 s") and "infinite loop" in stuck
    assert slow.startswith("did not finish within 8 s") and "infinite loop" not in slow
    assert "3 cases before it returned" in slow and "6.5 s" in slow and "too slow" in slow


def test_check_fails_a_correct_call_over_its_limit_and_passes_it_within(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.exercises.ch02_queries_keys_values import softmax  # the course's solution

    def slow_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        time.sleep(0.1)
        return softmax(x, dim)

    assert all(r.passed for r in grade_function("softmax", slow_softmax))  # 0.1 s against the 30 s floor
    # the floor alone (no multiple of the reference's time, which a loaded machine would stretch)
    monkeypatch.setattr(protocol, "CASE_TIME_MULTIPLE", 0)
    results = grade_function("softmax", slow_softmax, time_floor=0.01)
    assert results and not any(r.passed for r in results), [r.message for r in results]
    assert all(r.message.startswith("took ") and "over this case's time limit of " in r.message
               for r in results), results[0].message


def _with_softmax(tmp_path: Path, wrapper: str) -> Path:
    """The solution notebook of chapter 2 with ``wrapper`` after the softmax solution (in the
    same cell), which it may call as ``solved``."""
    nb = nbformat.read(str(SOURCE), as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "softmax-solution")
    cell.source += "\n\nsolved = softmax\n" + wrapper
    folder = tmp_path / ASSIGNMENT
    folder.mkdir()
    path = folder / f"{ASSIGNMENT}.ipynb"
    nbformat.write(nb, str(path))
    return path


def test_a_call_that_gets_slow_is_too_slow_and_one_that_never_returns_is_stuck(tmp_path: Path) -> None:
    """softmax returns on its first two cases, then hangs; sdpa (which calls the notebook's softmax)
    hangs on its first case: the first is told it is too slow, the second that it may loop forever."""
    path = _with_softmax(tmp_path, (
        "import time\n"
        "_calls = []\n\n"
        "def softmax(x, dim=-1):\n"
        "    _calls.append(1)\n"
        "    if len(_calls) > 2:\n"
        "        time.sleep(3600)\n"
        "    return solved(x, dim)\n"))
    report = grade_notebook(path, source=SOURCE, timeout=120, step_timeout=3)
    items = {i.id: i for i in report.items}
    softmax, sdpa = items["test_softmax"].feedback, items["test_scaled_dot_product_attention"].feedback
    assert items["test_softmax"].points == 0 and items["test_scaled_dot_product_attention"].points == 0
    # within 3 s, or 1000 times the reference's time if a loaded machine made that longer
    assert re.search(r"did not finish within [0-9.]+ s \(the larger of 3 s and", softmax), softmax
    assert "this case's time limit" in softmax, softmax
    assert "the 2 cases before it returned" in softmax and "infinite loop" not in softmax, softmax
    assert "did not finish within" in sdpa and "no case of this exercise returned at all" in sdpa, sdpa
    assert "infinite loop" in sdpa


def test_a_slow_call_within_its_limit_gets_full_marks(tmp_path: Path) -> None:
    """Each softmax call sleeps 0.3 s, more than 1000 times the reference's time: the floor
    (here 2 s) keeps it in; the notebook's total is far above any single case's limit."""
    path = _with_softmax(tmp_path, (
        "import time\n\n"
        "def softmax(x, dim=-1):\n"
        "    time.sleep(0.3)\n"
        "    return solved(x, dim)\n"))
    report = grade_notebook(path, source=SOURCE, timeout=240, step_timeout=2)
    assert report.score == report.max_score, [(i.id, i.feedback) for i in report.items if not i.passed]


def test_the_parent_stops_a_case_that_ignores_the_alarm_at_that_case_s_limit(tmp_path: Path) -> None:
    """A call that blocks SIGALRM never sees the child's alarm: the parent, which knows each
    case's limit from the reference times the child wrote before the notebook ran, kills the
    child soon after it and grades the next exercise in a fresh one."""
    path = _with_softmax(tmp_path, (
        "import signal, time\n\n"
        "def softmax(x, dim=-1):\n"
        "    if x.dim() == 2:  # softmax's first case; the attention scores have 3 or 4\n"
        "        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
        "        time.sleep(3600)\n"
        "    return solved(x, dim)\n"))
    start = time.monotonic()
    report = grade_notebook(path, source=SOURCE, timeout=120, step_timeout=2)
    assert time.monotonic() - start < 60
    items = {i.id: i for i in report.items}
    softmax = items["test_softmax"].feedback
    assert items["test_softmax"].points == 0
    assert re.search(r"did not finish within [0-9.]+ s, this case's time limit, and ignored the interruption",
                     softmax), softmax
    assert items["test_scaled_dot_product_attention"].passed, items["test_scaled_dot_product_attention"].feedback
