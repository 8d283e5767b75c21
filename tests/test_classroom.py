"""Unit tests of attnlib.grading.classroom's pieces (the end-to-end flow is tests/test_course.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnlib.grading import EXERCISES, judge
from attnlib.grading.classroom import (
    StudentResult,
    _match_notebooks,
    failure_kind,
    failures_by_kind,
    format_summary,
    grade_class,
)
from attnlib.grading.core import mistake_as_student, call

REPO = Path(__file__).resolve().parents[1]


def _softmax_feedback(output) -> str:
    ex = EXERCISES["softmax"]
    case = ex.make_cases(False)[0]
    result = judge(ex, case, output(ex, case))
    assert not result.passed
    return result.message


def _ref(ex, case):
    return call(ex, ex.reference, case)


@pytest.mark.parametrize("make, kind", [
    (lambda ex, c: _ref(ex, c)[..., :1], "wrong shape"),
    (lambda ex, c: _ref(ex, c).float(), "wrong dtype"),
    (lambda ex, c: _ref(ex, c) * float("nan"), "not finite"),
    (lambda ex, c: _ref(ex, c) + 1e-3 * torch.randn_like(_ref(ex, c)), "wrong values"),
    (lambda ex, c: _ref(ex, c).numpy(), "wrong type"),
])
def test_failure_kind_of_real_judge_messages(make, kind):
    assert failure_kind(_softmax_feedback(make)) == kind


def test_failure_kind_of_a_named_mistake():
    ex = EXERCISES["softmax"]
    student = mistake_as_student(ex, ex.mistakes[0])
    messages = [judge(ex, c, call(ex, student, c)).message for c in ex.make_cases(False)]
    failed = [m for m in messages if m]
    assert failed and all(failure_kind(m) == "named mistake" for m in failed), failed


@pytest.mark.parametrize("feedback, kind", [
    ("not implemented yet\n[softmax]", "not implemented"),
    ("did not finish within 30 s (an infinite loop?)", "time limit"),
    ("timed out: the notebook's code did not finish within 120 s", "time limit"),
    ("raised ForbiddenCallError: called torch.softmax, which this exercise asks you to write yourself",
     "forbidden call"),
    ("no object named 'softmax' is defined in the notebook", "not defined"),
    ("no notebook named 02_x.ipynb was submitted", "missing notebook"),
    ("cannot grade a.ipynb: a.ipynb: not a Jupyter notebook (not valid JSON: ...)", "unreadable notebook"),
    ("raised ValueError: bad", "raised an error"),
    ("", "other"),
])
def test_failure_kind_of_runner_messages(feedback, kind):
    assert failure_kind(feedback) == kind


def test_match_notebooks():
    m, extra, notes = _match_notebooks(["a.ipynb"], ["a.ipynb"])
    assert m == {"a.ipynb": "a.ipynb"} and not extra and not notes
    m, extra, notes = _match_notebooks(["a.ipynb"], ["a (1).ipynb"])  # renamed
    assert m == {"a.ipynb": "a (1).ipynb"} and not extra and "renamed" in notes[0]
    m, extra, notes = _match_notebooks(["a.ipynb"], ["a.ipynb", "b.ipynb"])  # extra
    assert m == {"a.ipynb": "a.ipynb"} and extra == ["b.ipynb"] and "b.ipynb" in notes[0]
    m, extra, notes = _match_notebooks(["a.ipynb"], [])  # missing
    assert m == {"a.ipynb": None} and not notes
    m, extra, notes = _match_notebooks(["a.ipynb"], ["x.ipynb", "y.ipynb"])  # ambiguous: not guessed
    assert m == {"a.ipynb": None} and extra == ["x.ipynb", "y.ipynb"] and len(notes) == 2


def test_summary_counts_failures_by_kind():
    items = [{"id": "t1", "points": 0, "max_points": 3, "passed": False, "feedback": "not implemented yet"},
             {"id": "t2", "points": 5, "max_points": 5, "passed": True, "feedback": "all 4 cases passed"}]
    results = [StudentResult("ann", "a", 5, 8, [{"name": "a.ipynb", "status": "graded", "items": items}]),
               StudentResult("ben", "a", 0, 8, [{"name": "a.ipynb", "status": "missing",
                                                  "message": "no notebook named a.ipynb was submitted",
                                                  "items": [dict(i, passed=False, points=0,
                                                                 feedback="no notebook named a.ipynb was submitted")
                                                            for i in items]}], skipped=True)]
    kinds = failures_by_kind(results)
    assert kinds == {"not implemented": 1, "missing notebook": 2}
    text = format_summary(results)
    assert "ann" in text and "5/8" in text and "0/8" in text
    assert "2 students (1 graded now, 1 kept" in text
    assert "missing notebook 2" in text and "not implemented 1" in text


def test_one_failing_student_does_not_stop_the_class(tmp_path):
    """A grader bug on one submission (here: an exception) costs that student only."""
    a = "02_queries_keys_values"
    (tmp_path / "solutions" / a).mkdir(parents=True)
    (tmp_path / "solutions" / a / f"{a}.ipynb").write_bytes((REPO / "solutions" / a / f"{a}.ipynb").read_bytes())
    for s in ("ann", "ben"):
        (tmp_path / "submitted" / s / a).mkdir(parents=True)
        (tmp_path / "submitted" / s / a / f"{a}.ipynb").write_text("{}")

    class FakeReport:
        score, max_score, notes, log = 8, 8, [], ""

        def as_dict(self):
            return {"items": [{"id": "x", "points": 8, "max_points": 8, "passed": True, "feedback": "ok"}]}

    def fake(path, **kwargs):
        if "ben" in str(path):
            raise RuntimeError("boom")
        return FakeReport()

    import attnlib.grading.report as report_module
    saved = report_module.format_table
    report_module.format_table = lambda report, width=None: "table"
    try:
        results = grade_class(a, root=tmp_path, grade_fn=fake, progress=False, jobs=2)
    finally:
        report_module.format_table = saved
    by = {r.student: r for r in results}
    assert by["ann"].score == 8
    assert by["ben"].score == 0
    assert "internal error of the grader: RuntimeError: boom" in by["ben"].notebooks[0]["message"]
    stored = json.loads((tmp_path / "graded" / "ben" / a / "result.json").read_text())
    assert stored["score"] == 0 and "boom" in (tmp_path / "graded" / "ben" / a / "grade.log").read_text()
