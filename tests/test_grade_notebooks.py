"""Every solution notebook scores full marks through `attnlib grade`, and every released
notebook, untouched, scores 0 without crashing the grader (the learner's own path)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from attnlib.grading.runner import grade_notebook

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def reports():
    """Grade all 22 notebooks (11 solutions, 11 released) once, two children at a time."""
    paths = [ROOT / kind / a / f"{a}.ipynb" for a in ASSIGNMENTS for kind in ("solutions", "notebooks")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        graded = list(pool.map(lambda p: grade_notebook(p, timeout=300), paths))
    return dict(zip(paths, graded))


def test_there_is_a_notebook_per_chapter():
    assert ASSIGNMENTS == sorted(p.stem for p in (ROOT / "book").glob("[0-9][0-9]_*.md"))


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_solution_scores_full_marks(reports, assignment):
    report = reports[ROOT / "solutions" / assignment / f"{assignment}.ipynb"]
    assert report.max_score > 0
    assert report.score == report.max_score, [(i.id, i.feedback) for i in report.items if not i.passed]
    assert 2 <= len(report.items) <= 6, [i.id for i in report.items]  # 2-6 graded items per chapter
    # no cell of the notebook failed in the grader's child (the install cell included)
    assert not [n for n in report.notes if n.startswith("cell ")], report.notes


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_released_notebook_scores_zero(reports, assignment):
    report = reports[ROOT / "notebooks" / assignment / f"{assignment}.ipynb"]
    solution = reports[ROOT / "solutions" / assignment / f"{assignment}.ipynb"]
    assert report.score == 0 and report.max_score == solution.max_score
    assert all("not implemented" in item.feedback for item in report.items), \
        [(i.id, i.feedback) for i in report.items]
