"""The instructor's flow, end to end, in throw-away nbgrader course directories.

* ``nbgrader autograde`` and ``attnlib grade-class`` give the same scores to every notebook of
  the course as solved, as solved with slow loops, untouched, and (five chapters) with a
  plausible mistake; the solutions and the slow solutions get full marks from both;
* a class of four students (all correct, half correct, untouched, all correct with an edited
  test cell) is graded with nbgrader and with ``attnlib grade-class --gradebook``; the
  exported scores agree, nbgrader's feedback shows the hardened grader's verdicts, and
  neither feedback loads anything from the network or shows the hidden tests' code;
* nbgrader's own runs are quiet: no SQLAlchemy warning, no "checksum has changed" but for
  the test cell a learner edited;
* ``attnlib grade-class`` resumes after a crash without regrading finished students, never
  changes a submission, and handles missing, renamed, extra and unreadable notebooks
  without stopping the class.

nbgrader is run as a command, as an instructor would, with the venv's ``bin`` on ``PATH``
(nbgrader calls ``alembic`` by name when it creates a gradebook).
"""

from __future__ import annotations

import csv
import hashlib
import html as htmllib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ASSIGNMENT = "02_queries_keys_values"
ASSIGNMENTS = sorted(p.name for p in (REPO / "solutions").iterdir() if p.is_dir() and p.name[:2].isdigit())


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def nbgrader(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([str(BIN / "nbgrader"), *args], cwd)


def attnlib_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "attnlib.cli", *args], cwd)


def new_course(root: Path, assignments: list[str]) -> Path:
    """A course directory as an instructor has it: the config, the sources, a release with a gradebook."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "nbgrader_config.py", root / "nbgrader_config.py")
    for a in assignments:
        shutil.copytree(REPO / "solutions" / a, root / "solutions" / a)
    pattern = assignments[0] if len(assignments) == 1 else "[0-9][0-9]_*"
    nbgrader("generate_assignment", pattern, "--force", cwd=root)
    for a in assignments:
        assert (root / "notebooks" / a / f"{a}.ipynb").is_file()
    assert (root / "gradebook.db").is_file()
    return root


def _nbg(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def student_notebook(root: Path, assignment: str, solved: list[str] | None) -> nbformat.NotebookNode:
    """The released notebook with the answer cells in ``solved`` (grade ids; None = all)
    filled in from the source, as a learner would have written them."""
    source = nbformat.read(str(root / "solutions" / assignment / f"{assignment}.ipynb"), as_version=4)
    answers = {_nbg(c).get("grade_id"): c.source for c in source.cells if _nbg(c).get("solution")}
    nb = nbformat.read(str(root / "notebooks" / assignment / f"{assignment}.ipynb"), as_version=4)
    for cell in nb.cells:
        gid = _nbg(cell).get("grade_id")
        if _nbg(cell).get("solution") and (solved is None or gid in solved):
            cell.source = answers[gid]
    return nb


def submit(root: Path, student: str, assignment: str, nb, name: str | None = None) -> Path:
    folder = root / "submitted" / student / assignment
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "timestamp.txt").write_text("2026-11-20 10:00:00.000000 UTC")
    path = folder / (name or f"{assignment}.ipynb")
    if isinstance(nb, (str, bytes)):
        path.write_text(nb) if isinstance(nb, str) else path.write_bytes(nb)
    elif nb is not None:
        nbformat.write(nb, str(path))
    return path


def exported(root: Path) -> dict[tuple[str, str], tuple[float, float]]:
    nbgrader("export", cwd=root)
    with open(root / "grades.csv") as f:
        return {(r["student_id"], r["assignment"]): (float(r["score"]), float(r["max_score"]))
                for r in csv.DictReader(f)}


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(oct(p.stat().st_mode).encode())
    return h.hexdigest()


def source_total(root: Path, assignment: str) -> float:
    nb = nbformat.read(str(root / "solutions" / assignment / f"{assignment}.ipynb"), as_version=4)
    return sum(float(_nbg(c)["points"]) for c in nb.cells if _nbg(c).get("grade") and not _nbg(c).get("solution"))


# --------------------------------------------------------------------------- the two graders agree

#: Plausible mistakes, one per notebook for five chapters: (answer cell, the solution's line, the
#: learner's). Each fails at least one item; the two graders must fail the same ones.
MISTAKES = {
    "02_queries_keys_values": ("softmax-solution", "e = torch.exp(z - peak)", "e = torch.exp(z)"),
    "05_self_cross_masks": ("causal_mask-solution", "return cols <= rows", "return cols < rows"),
    "07_positional_encoding": ("apply_rope-solution", "torch.cat((-x2, x1), dim=-1)", "torch.cat((x2, -x1), dim=-1)"),
    "09_flash_attention": ("flash_attention-solution", "acc = rescale[..., None] * acc + p @ v", "acc = acc + p @ v"),
    "13_flash_triton": ("flash_fwd_kernel-solution", "acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)",
                        "acc = acc + tl.dot(p.to(v.dtype), v)"),
}


def _builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_exercises", REPO / "tools" / "build_exercises.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def class_of_four_kinds(root: Path) -> dict[tuple[str, str], str]:
    """Submit, for every assignment, the solution notebook ("solution"), the notebook with every
    exercise's slow solution ("slow", as ``tools/build_exercises.py`` renders it), the released
    notebook untouched ("untouched") and, for the chapters of :data:`MISTAKES`, the released
    notebook filled in with one plausible mistake ("mistaken"); returns (student, assignment) ->
    what was submitted."""
    builder = _builder()
    kinds = {}
    for a in ASSIGNMENTS:
        submit(root, "solution", a, nbformat.read(str(root / "solutions" / a / f"{a}.ipynb"), as_version=4))
        submit(root, "slow", a, builder.build_notebook(a, slow=True))
        submit(root, "untouched", a, nbformat.read(str(root / "notebooks" / a / f"{a}.ipynb"), as_version=4))
        kinds.update({("solution", a): "solution", ("slow", a): "slow solutions", ("untouched", a): "untouched"})
        if a in MISTAKES:
            grade_id, right, wrong = MISTAKES[a]
            nb = student_notebook(root, a, None)
            cell = next(c for c in nb.cells if _nbg(c).get("grade_id") == grade_id)
            assert cell.source.count(right) == 1, f"{a}: the mistake no longer applies to the solution"
            cell.source = cell.source.replace(right, wrong)
            submit(root, "mistaken", a, nb)
            kinds[("mistaken", a)] = f"{grade_id.removesuffix('-solution')}: {wrong}"
    return kinds


def test_the_two_graders_agree_on_solutions_slow_solutions_mistakes_and_untouched_notebooks(tmp_path):
    """Every notebook of the course, four kinds of submission, graded by ``nbgrader autograde``
    (tests in the learner's kernel) and by ``attnlib grade-class`` (sandboxed child, per-case time
    limits): the same score for each, full marks for the solutions and the slow solutions, 0 for
    the untouched notebooks, less than full marks for the mistakes. Their differences, documented
    in the README, are cheats and sandbox faults, none of which is among these."""
    root = new_course(tmp_path / "course", ASSIGNMENTS)
    kinds = class_of_four_kinds(root)
    nbgrader("autograde", "[0-9][0-9]_*", cwd=root)
    by_nbgrader = exported(root)
    by_attnlib: dict[tuple[str, str], tuple[float, float]] = {}
    for a in ASSIGNMENTS:
        attnlib_cli("grade-class", a, "--no-progress", cwd=root)
        with open(root / "graded" / f"{a}.csv") as f:
            by_attnlib.update({(r["student"], a): (float(r["score"]), float(r["max_score"]))
                               for r in csv.DictReader(f)})
    rows = ["| submission | notebook | nbgrader autograde | attnlib grade-class |", "|---|---|---|---|"]
    for (student, a), kind in sorted(kinds.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        nbg, hardened = by_nbgrader[(student, a)], by_attnlib[(student, a)]
        rows.append(f"| {kind} | {a} | {nbg[0]:g}/{nbg[1]:g} | {hardened[0]:g}/{hardened[1]:g} |")
    table = "\n".join(rows)
    print(table)
    for (student, a) in kinds:
        score, max_score = by_nbgrader[(student, a)]
        assert max_score == source_total(root, a) > 0, a
        assert by_attnlib[(student, a)] == (score, max_score), f"the graders disagree:\n{table}"
        expected = {"solution": max_score, "slow": max_score, "untouched": 0.0}.get(student)
        if expected is None:
            assert score < max_score, f"{student} {a}: a mistake that passed\n{table}"
        else:
            assert score == expected, f"{student} {a}\n{table}"


# --------------------------------------------------------------------------- three students


@pytest.fixture(scope="module")
def three_students(tmp_path_factory):
    root = new_course(tmp_path_factory.mktemp("class") / "course", [ASSIGNMENT])
    source = nbformat.read(str(root / "solutions" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"), as_version=4)
    answer_ids = [_nbg(c)["grade_id"] for c in source.cells if _nbg(c).get("solution")]
    test_ids = [_nbg(c)["grade_id"] for c in source.cells if _nbg(c).get("grade") and not _nbg(c).get("solution")]
    assert len(answer_ids) >= 2
    # the class's files as downloaded from a learning platform, collected by nbgrader zip_collect
    archive = root / "downloaded" / ASSIGNMENT / "archive"
    archive.mkdir(parents=True)
    # all correct, first answer only, untouched; dave: all correct, a test cell edited
    work = {"alice": None, "bob": answer_ids[:1], "carol": [], "dave": None}
    with zipfile.ZipFile(archive / "class.zip", "w") as z:
        for student, solved in work.items():
            nb = student_notebook(root, ASSIGNMENT, solved)
            if student == "dave":
                edited = next(c for c in nb.cells if _nbg(c).get("grade_id") == test_ids[0])
                edited.source += "\nprint('my own check')"
            z.writestr(f"{student}__{ASSIGNMENT}.ipynb", nbformat.writes(nb))
    nbgrader("zip_collect", ASSIGNMENT, cwd=root)
    for student in work:
        assert (root / "submitted" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb").is_file(), student
    first_points = next(float(_nbg(c)["points"]) for c in source.cells
                        if _nbg(c).get("grade") and not _nbg(c).get("solution"))
    total = source_total(root, ASSIGNMENT)
    expected = {"alice": total, "bob": first_points, "carol": 0.0, "dave": total}
    before = tree_digest(root / "submitted")
    autograde = nbgrader("autograde", ASSIGNMENT, cwd=root)
    by_nbgrader = exported(root)
    # nbgrader's own autograded notebooks (the hidden tests put back and run) and feedback
    autograded = {s: nbformat.read(str(root / "autograded" / s / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"), as_version=4)
                  for s in work}
    nbgrader("generate_feedback", ASSIGNMENT, cwd=root)
    nbgrader_feedback = {s: (root / "feedback" / s / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text() for s in work}
    hardened = attnlib_cli("grade-class", ASSIGNMENT, "--gradebook", "--no-progress", cwd=root)
    return dict(root=root, expected=expected, total=total, before=before, by_nbgrader=by_nbgrader,
                hardened=hardened, autograde_log=autograde.stdout + autograde.stderr, autograded=autograded,
                nbgrader_feedback=nbgrader_feedback, test_ids=test_ids, source=source)


def test_three_students_nbgrader_scores(three_students):
    t = three_students
    for student, score in t["expected"].items():
        assert t["by_nbgrader"][(student, ASSIGNMENT)] == (score, t["total"]), student


def test_three_students_hardened_grader_writes_the_gradebook(three_students):
    t = three_students
    root = t["root"]
    after = exported(root)  # nbgrader export reads what attnlib grade-class wrote
    for student, score in t["expected"].items():
        assert after[(student, ASSIGNMENT)] == (score, t["total"]), student
        result = json.loads((root / "graded" / student / ASSIGNMENT / "result.json").read_text())
        assert (result["score"], result["max_score"]) == (score, t["total"])
        assert (root / "graded" / student / ASSIGNMENT / "grade.log").read_text().strip()
    summary = t["hardened"].stdout
    for student, score in t["expected"].items():
        assert f"{int(score)}/{int(t['total'])}" in summary
    assert "not implemented" in summary  # failures by kind
    with open(root / "graded" / f"{ASSIGNMENT}.csv") as f:
        table = {r["student"]: float(r["score"]) for r in csv.DictReader(f)}
    assert table == t["expected"]


#: What a page would load from elsewhere: a script, image, frame... by URL, a stylesheet link,
#: a CSS import or url(), a JavaScript module import.
EXTERNAL = re.compile(r"""<(?:script|img|iframe|embed|source|audio|video)\b[^>]*?\bsrc\s*=\s*["']?\s*(?:https?:)?//"""
                      r"""|<link\b[^>]*?\bhref\s*=\s*["']?\s*(?:https?:)?//"""
                      r"""|@import\s+(?:url\()?\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//"""
                      r"""|\bfrom\s+["'](?:https?:)?//|\bimport\s*\(\s*["'](?:https?:)?//""", re.I)


def hidden_code(source: nbformat.NotebookNode) -> list[str]:
    """Every line of the source notebook's hidden-tests blocks, markers included."""
    from attnlib.grading.notebook import HIDDEN_BLOCK

    lines, inside = [], False
    for cell in source.cells:
        for line in cell.source.splitlines():
            inside = inside or line.strip() == HIDDEN_BLOCK[0]
            if inside and line.strip():
                lines.append(line.strip())
            inside = inside and line.strip() != HIDDEN_BLOCK[1]
    assert lines, "the source notebook has no hidden tests"
    return lines


def check_feedback_page(html: str, source: nbformat.NotebookNode) -> str:
    """The page loads nothing from the network and shows none of the hidden tests' code (in a
    test cell or in a traceback); returns its text."""
    assert not EXTERNAL.findall(html), EXTERNAL.findall(html)
    text = htmllib.unescape(re.sub(r"<[^>]+>", "", html))
    for line in hidden_code(source):
        assert line not in text, f"the feedback shows the hidden test line {line!r}"
    return text


def test_hidden_lines_leave_the_feedback_tracebacks():
    """The feedback preprocessor's pieces: which lines are hidden, and a traceback quoting the
    cell (IPython 8, with colours) without them; other frames untouched."""
    from attnlib.grading.nbgrader_plugins import hidden_lines, strip_hidden, strip_traceback

    source = ('from attnlib.grading import check\ncheck("softmax", softmax)\n### BEGIN HIDDEN TESTS\n'
              'check("softmax", softmax, hidden=True)\n### END HIDDEN TESTS')
    begin, end = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"
    assert hidden_lines(source, begin, end) == {3, 4, 5}
    assert strip_hidden(source, begin, end) == 'from attnlib.grading import check\ncheck("softmax", softmax)'
    green, off = "\x1b[32m", "\x1b[39m"
    cell = "\n".join([f"\x1b[36mCell\x1b[39m {green}In[4]{off}, line 4",
                      f"{green}      2{off} check(\"softmax\", softmax)",
                      f"{green}      3{off} ### BEGIN HIDDEN TESTS",
                      f"{green}----> 4{off} check(\"softmax\", softmax, hidden=True)",
                      f"{green}      5{off} ### END HIDDEN TESTS", ""])
    other = f"File {green}/x/core.py:632{off}, in check(exercise_id, student, hidden)\n    632 raise AssertionError"
    frames = ["\x1b[31m------\x1b[39m", "\x1b[31mAssertionError\x1b[39m  Traceback", cell, other,
              "AssertionError: softmax: 1/6 cases passed"]
    out = strip_traceback(frames, {3, 4, 5})
    assert out[:2] == frames[:2] and out[3:] == frames[3:]
    assert "hidden=True" not in out[2] and "HIDDEN" not in out[2] and 'check("softmax", softmax)' in out[2]
    assert out[2].count("(hidden tests)") == 1


def test_three_students_feedback_shows_the_hardened_verdicts(three_students):
    root = three_students["root"]
    nbgrader("generate_feedback", ASSIGNMENT, cwd=root)
    for student in three_students["expected"]:
        html = (root / "feedback" / student / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
        assert "points." in html  # the verdict line this grader writes under each test cell
        check_feedback_page(html, three_students["source"])  # offline, hidden tests stay hidden
    carol = (root / "feedback" / "carol" / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
    assert "not implemented yet" in carol
    alice = (root / "feedback" / "alice" / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
    assert "cases passed" in alice


def test_nbgrader_feedback_hides_the_hidden_tests_and_loads_nothing(three_students):
    """``nbgrader autograde`` runs the hidden tests (its autograded notebooks keep them);
    ``nbgrader generate_feedback`` (this course's preprocessor and template) shows the test
    cells as released, tracebacks without the hidden lines, and loads nothing from the network."""
    t = three_students
    for student, nb in t["autograded"].items():
        tests = [c for c in nb.cells if _nbg(c).get("grade_id") in t["test_ids"]]
        assert tests and all("BEGIN HIDDEN TESTS" in c.source for c in tests), student
    for student, html in t["nbgrader_feedback"].items():
        text = check_feedback_page(html, t["source"])
        assert 'check("' in text, student  # the visible checks are shown
    carol = htmllib.unescape(re.sub(r"<[^>]+>", "", t["nbgrader_feedback"]["carol"]))
    assert "Traceback" in carol and "not implemented" in carol.lower()  # the errors are still there
    assert "(hidden tests)" in carol  # where the traceback quoted hidden lines


def test_nbgrader_runs_without_false_alarms(three_students):
    """No SQLAlchemy warning; "checksum has changed" only for the test cell dave edited (the
    released test cells, hidden tests removed, are not taken for edited ones)."""
    log = three_students["autograde_log"]
    assert "SAWarning" not in log and "not in session" not in log, log[-3000:]
    changed = re.findall(r"Attribute 'checksum' for cell (\S+) has changed", log)
    assert changed == [three_students["test_ids"][0]], changed
    assert "SAWarning" not in three_students["hardened"].stderr
    assert three_students["by_nbgrader"][("dave", ASSIGNMENT)] == (three_students["total"],) * 2


def test_grading_never_changes_a_submission(three_students):
    assert tree_digest(three_students["root"] / "submitted") == three_students["before"]


def test_a_second_run_keeps_finished_students(three_students):
    root = three_students["root"]
    out = attnlib_cli("grade-class", ASSIGNMENT, "--no-progress", cwd=root).stdout
    assert "0 graded now, 4 kept" in out
    # a changed submission is graded again; the others are kept
    carol = root / "submitted" / "carol" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    saved = carol.read_bytes()
    try:
        nbformat.write(student_notebook(root, ASSIGNMENT, None), str(carol))
        out = attnlib_cli("grade-class", ASSIGNMENT, "--no-progress", cwd=root).stdout
        assert "1 graded now, 3 kept" in out
        result = json.loads((root / "graded" / "carol" / ASSIGNMENT / "result.json").read_text())
        assert result["score"] == three_students["total"]
    finally:
        carol.write_bytes(saved)
    out = attnlib_cli("grade-class", ASSIGNMENT, "--no-progress", cwd=root).stdout
    assert "1 graded now, 3 kept" in out


# --------------------------------------------------------------------------- a crash mid-class


def test_a_crash_mid_class_resumes_without_regrading(tmp_path):
    root = tmp_path / "course"
    root.mkdir()
    shutil.copy(REPO / "nbgrader_config.py", root / "nbgrader_config.py")
    shutil.copytree(REPO / "solutions" / ASSIGNMENT, root / "solutions" / ASSIGNMENT)
    shutil.copytree(REPO / "notebooks" / ASSIGNMENT, root / "notebooks" / ASSIGNMENT)
    for s in ("s1", "s2", "s3"):
        submit(root, s, ASSIGNMENT, student_notebook(root, ASSIGNMENT, None))
    # the grading process dies (power cut, OOM killer) while grading the second student
    script = textwrap.dedent(f"""
        import os
        from attnlib.grading.classroom import grade_class
        from attnlib.grading.runner import grade_notebook
        calls = []
        def flaky(path, **kw):
            calls.append(path)
            if len(calls) == 2:
                os._exit(9)
            return grade_notebook(path, **kw)
        grade_class({ASSIGNMENT!r}, root={str(root)!r}, jobs=1, grade_fn=flaky, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr
    results = {s: root / "graded" / s / ASSIGNMENT / "result.json" for s in ("s1", "s2", "s3")}
    assert results["s1"].is_file() and not results["s2"].exists() and not results["s3"].exists()
    first = results["s1"].read_text()
    out = attnlib_cli("grade-class", ASSIGNMENT, "--no-progress", cwd=root).stdout
    assert "2 graded now, 1 kept" in out
    assert results["s1"].read_text() == first  # not regraded
    total = source_total(root, ASSIGNMENT)
    for path in results.values():
        assert json.loads(path.read_text())["score"] == total
    assert not list((root / "graded").rglob("*.tmp"))


# --------------------------------------------------------------------------- broken submissions


@pytest.fixture(scope="module")
def broken_class(tmp_path_factory):
    root = new_course(tmp_path_factory.mktemp("broken") / "course", [ASSIGNMENT])
    good = student_notebook(root, ASSIGNMENT, None)
    submit(root, "good", ASSIGNMENT, good)
    submit(root, "renamed", ASSIGNMENT, good, name="my attempt.ipynb")
    submit(root, "extra", ASSIGNMENT, good)
    submit(root, "extra", ASSIGNMENT, good, name="scratch.ipynb")
    submit(root, "missing", ASSIGNMENT, None)  # only timestamp.txt
    submit(root, "corrupt", ASSIGNMENT, '{"cells": [ this is not JSON')
    submit(root, "empty_file", ASSIGNMENT, "")
    before = tree_digest(root / "submitted")
    proc = attnlib_cli("grade-class", ASSIGNMENT, "--gradebook", "--no-progress", "--timeout", "120", cwd=root)
    results = {p.parent.parent.name: json.loads(p.read_text())
               for p in (root / "graded").glob(f"*/{ASSIGNMENT}/result.json")}
    return dict(root=root, results=results, out=proc.stdout, before=before, total=source_total(root, ASSIGNMENT))


def test_broken_submissions_do_not_stop_the_class(broken_class):
    r, total = broken_class["results"], broken_class["total"]
    assert sorted(r) == ["corrupt", "empty_file", "extra", "good", "missing", "renamed"]
    assert r["good"]["score"] == total
    assert tree_digest(broken_class["root"] / "submitted") == broken_class["before"]


def test_renamed_notebook_is_graded_with_a_note(broken_class):
    res = broken_class["results"]["renamed"]
    assert res["score"] == broken_class["total"]
    assert any("my attempt.ipynb" in n and "renamed" in n for n in res["notes"])


def test_extra_notebook_is_reported_not_graded(broken_class):
    res = broken_class["results"]["extra"]
    assert res["score"] == broken_class["total"]
    assert any("scratch.ipynb" in n and "not graded" in n for n in res["notes"])


def test_missing_notebook_scores_zero_with_a_message(broken_class):
    res = broken_class["results"]["missing"]
    assert res["score"] == 0 and res["max_score"] == broken_class["total"]
    nb = res["notebooks"][0]
    assert nb["status"] == "missing"
    assert all("no notebook named" in i["feedback"] for i in nb["items"])
    assert nb["items"], "every item of the source is listed, each with 0 points"


@pytest.mark.parametrize("student", ["corrupt", "empty_file"])
def test_unreadable_notebook_scores_zero_with_a_message(broken_class, student):
    res = broken_class["results"][student]
    nb = res["notebooks"][0]
    assert res["score"] == 0 and nb["status"] == "error"
    assert "not a Jupyter notebook" in nb["message"] or "JSON" in nb["message"], nb["message"]


def test_broken_class_gradebook_and_summary(broken_class):
    root, total = broken_class["root"], broken_class["total"]
    scores = exported(root)
    assert scores[("good", ASSIGNMENT)] == (total, total)
    assert scores[("renamed", ASSIGNMENT)] == (total, total)
    assert scores[("missing", ASSIGNMENT)] == (0.0, total)
    assert scores[("corrupt", ASSIGNMENT)] == (0.0, total)
    out = broken_class["out"]
    assert "missing notebook" in out and "unreadable notebook" in out  # failures by kind
    nbgrader("generate_feedback", ASSIGNMENT, cwd=root)
    html = (root / "feedback" / "corrupt" / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
    assert "not a Jupyter notebook" in html or "JSON" in html


def test_grade_class_refuses_what_it_cannot_grade(tmp_path):
    root = tmp_path / "course"
    (root / "solutions" / ASSIGNMENT).mkdir(parents=True)
    shutil.copy(REPO / "solutions" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", root / "solutions" / ASSIGNMENT)
    def fails(*args):
        proc = subprocess.run([sys.executable, "-m", "attnlib.cli", "grade-class", *args, "--no-progress"],
                              cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        return proc.stderr
    assert "no source notebooks" in fails("no_such_assignment")
    assert "no submissions" in fails(ASSIGNMENT)
    submit(root, "x", ASSIGNMENT, student_notebook_from_repo())
    assert "no gradebook" in fails(ASSIGNMENT, "--gradebook")
    assert "no submission of" in fails(ASSIGNMENT, "--student", "nobody")


def student_notebook_from_repo() -> nbformat.NotebookNode:
    return nbformat.read(str(REPO / "notebooks" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"), as_version=4)
