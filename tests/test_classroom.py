"""Unit tests of attnlib.grading.classroom's pieces (the end-to-end flow is tests/test_course.py)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnlib.grading import EXERCISES, judge
from attnlib.grading.classroom import (
    StudentResult,
    _match_notebooks,
    _problems,
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
    ("changed its input `x` in place (15 of 15 entries changed, as `x -= m` does)", "changed its input"),
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


def test_problems_name_the_failed_items():
    """The problems column of a student whose notebook was graded but failed items lists them,
    each with its kind; notes and notebooks not graded are listed as before."""
    items = [{"id": "test_softmax", "points": 0, "max_points": 3, "passed": False,
              "feedback": "wrong values at 15 of 15 positions\n[softmax, case 'random logits']"},
             {"id": "test_sdpa", "points": 0, "max_points": 5, "passed": False, "feedback": "not implemented yet"},
             {"id": "test_mask", "points": 1, "max_points": 1, "passed": True, "feedback": "all 4 cases passed"}]
    ann = StudentResult("ann", "a", 1, 9, [{"name": "a.ipynb", "status": "graded", "items": items}],
                        notes=["a.ipynb was not submitted under that name; graded x.ipynb in its place"])
    ben = StudentResult("ben", "a", 9, 9, [{"name": "a.ipynb", "status": "graded",
                                             "items": [dict(i, passed=True) for i in items]}])
    cal = StudentResult("cal", "a", 0, 9, [{"name": "a.ipynb", "status": "missing", "items": items,
                                             "message": "no notebook named a.ipynb was submitted"}])
    two = StudentResult("two", "a", 0, 9, [{"name": "a.ipynb", "status": "graded", "items": items[:1]},
                                            {"name": "b.ipynb", "status": "graded", "items": items[1:]}])
    assert _problems(ann) == [ann.notes[0], "failed: test_softmax (wrong values), test_sdpa (not implemented)"]
    assert _problems(ben) == []
    assert _problems(cal) == ["no notebook named a.ipynb was submitted"]
    assert _problems(two) == ["failed in a.ipynb: test_softmax (wrong values)",
                              "failed in b.ipynb: test_sdpa (not implemented)"]
    table = format_summary([ann, ben, cal]).splitlines()
    assert table[2].startswith("ann") and table[2].endswith("test_sdpa (not implemented)")
    assert table[3].split() == ["ben", "9/9"]


# --------------------------------------------------------------------------- stopped by a signal


def _student_notebook(slow: bool = False):
    """The released notebook of the assignment with every answer filled in from the source;
    ``slow``: with a cell that never ends first (the grader stops it at the step time limit)."""
    import nbformat

    a = "02_queries_keys_values"
    source = nbformat.read(str(REPO / "solutions" / a / f"{a}.ipynb"), as_version=4)
    answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    nb = nbformat.read(str(REPO / "notebooks" / a / f"{a}.ipynb"), as_version=4)
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            cell.source = answers[meta["grade_id"]]
    if slow:
        nb.cells.insert(1, nbformat.v4.new_code_cell("import time\nwhile True:\n    time.sleep(0.05)\n"))
    return nb


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the grading children in /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_class_promptly_and_the_next_run_resumes(tmp_path, signum):
    """``attnlib grade-class`` in its own process, stopped by Ctrl-C (SIGINT) or SIGTERM while
    the second of three students is being graded (a cell of theirs never ends): it exits
    promptly with 128 + the signal, keeps the first student, writes the class table for them,
    leaves no grading process and no temporary folder, and the next run grades only the
    other two."""
    import nbformat

    a = "02_queries_keys_values"
    root = tmp_path / "course"
    (root / "solutions" / a).mkdir(parents=True)
    shutil.copy(REPO / "solutions" / a / f"{a}.ipynb", root / "solutions" / a)
    for student, slow in (("s1", False), ("s2", True), ("s3", False)):
        (root / "submitted" / student / a).mkdir(parents=True)
        nbformat.write(_student_notebook(slow), str(root / "submitted" / student / a / f"{a}.ipynb"))
    from attnlib.grading.notebook import parse_items, read_notebook

    total = int(sum(i.max_points for i in parse_items(read_notebook(root / "solutions" / a / f"{a}.ipynb"))))
    tmp = tmp_path / "tmp"  # the grader's temporary folders go here (TMPDIR)
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    command = [sys.executable, "-m", "attnlib.cli", "grade-class", a, "--no-progress", "--timeout", "120"]
    proc = subprocess.Popen(command + ["--jobs", "1"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    results = {s: root / "graded" / s / a / "result.json" for s in ("s1", "s2", "s3")}
    try:
        deadline = time.monotonic() + 240
        while not (results["s1"].exists() and _processes_mentioning(str(tmp))):  # s2's child runs
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(1)
        assert list(tmp.glob("attnlib-grade-*"))
        first = results["s1"].read_bytes()
        sent = time.monotonic()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum, (out, err)
    assert took < 20, f"took {took:.1f} s to stop (s2's cell alone runs 30 s)"
    assert "Traceback" not in err and f"stopped by {signum.name}" in err, err
    assert "s1" in out and f"{total}/{total}" in out  # the summary of the finished student
    # nothing left behind
    assert _processes_mentioning(str(tmp)) == []
    assert list(tmp.iterdir()) == []
    assert not list((root / "graded").rglob("*.tmp"))
    # the finished student is kept, the others have nothing; the class files say so
    assert results["s1"].read_bytes() == first
    assert not results["s2"].exists() and not results["s3"].exists()
    assert not (root / "graded" / "s2" / a / "grade.log").exists()
    with open(root / "graded" / f"{a}.csv") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    assert rows["s1"]["score"] == str(total) and rows["s2"]["score"] == rows["s3"]["score"] == ""
    assert "not graded" in rows["s2"]["problems"]
    summary = json.loads((root / "graded" / f"{a}.json").read_text())
    assert [s["student"] for s in summary["students"]] == ["s1"]
    assert summary["not_graded"] == ["s2", "s3"] and summary["stopped_by"] == signum.name
    # the next run grades the other two only (s2 has fixed their notebook meanwhile)
    nbformat.write(_student_notebook(), str(root / "submitted" / "s2" / a / f"{a}.ipynb"))
    rerun = subprocess.run(command + ["--jobs", "2"], cwd=root, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "3 students (2 graded now, 1 kept" in rerun.stdout
    assert results["s1"].read_bytes() == first
    with open(root / "graded" / f"{a}.csv") as f:
        assert {r["student"]: r["score"] for r in csv.DictReader(f)} == {s: str(total) for s in results}
    assert json.loads((root / "graded" / f"{a}.json").read_text())["not_graded"] == []
    assert list(tmp.iterdir()) == []
