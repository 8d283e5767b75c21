"""Hidden cases no learner has seen: a course-private secret changes the values of the hidden
cases (never their edge cases and shapes, never the visible cases), and the verdicts on the
references and the catalogue of mistakes stay the same."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from attnlib.grading import EXERCISES, grade_function, secret
from attnlib.grading.core import draw_cases, mistake_as_student

REPO = Path(__file__).resolve().parents[1]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _inputs(ex_id: str, hidden: bool, key: str | None):
    cases = draw_cases(EXERCISES[ex_id], hidden, key)
    return [(c.name, [t for t in _tensors((c.args, c.kwargs, c.state_dict))]) for c in cases]


def _same(a, b) -> bool:
    return all(na == nb and len(ta) == len(tb) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))
        for (na, ta), (nb, tb) in zip(a, b)) and len(a) == len(b)


def _shapes(cases):
    return [(name, [(t.shape, t.dtype) for t in tensors]) for name, tensors in cases]


# --------------------------------------------------------------------------- where it comes from


def test_the_secret_comes_from_the_environment_or_the_course_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(secret.ENV, raising=False)
    course = tmp_path / "course"
    (course / "autograded" / "alice" / "02").mkdir(parents=True)
    (course / "nbgrader_config.py").write_text("c = get_config()\n")
    assert secret.find(course / "autograded" / "alice" / "02") is None  # no file: public cases
    (course / secret.FILE).write_text("staff only\nsecond line ignored\n")
    assert secret.find(course / "autograded" / "alice" / "02") == "staff only"
    assert secret.find(tmp_path) is None  # outside the course folder
    monkeypatch.setenv(secret.ENV, "from the environment")
    assert secret.find(course) == "from the environment"
    monkeypatch.delenv(secret.ENV)
    (course / secret.FILE).write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        secret.find(course)


def test_the_secret_file_is_never_committed():
    ignored = subprocess.run(["git", "check-ignore", "-q", secret.FILE], cwd=REPO)
    assert ignored.returncode == 0, f".gitignore must list {secret.FILE}"
    tracked = subprocess.run(["git", "ls-files", secret.FILE], cwd=REPO, capture_output=True, text=True)
    assert tracked.stdout.strip() == ""


def test_salted_seeds_depend_on_the_secret_only_while_drawing():
    assert secret.salted(12) == 12
    with secret.drawing_with("a"):
        a = secret.salted(12)
        assert secret.salted(12) == a and secret.salted(13) != a
    with secret.drawing_with("b"):
        assert secret.salted(12) != a
    assert secret.salted(12) == 12
    with pytest.raises(ValueError):
        with secret.drawing_with(""):
            pass


# --------------------------------------------------------------------------- what it changes


@pytest.mark.parametrize("ex_id", sorted(EXERCISES))
def test_a_secret_changes_hidden_values_not_shapes_nor_visible_cases(ex_id):
    public, first, second = (_inputs(ex_id, True, key) for key in (None, "course A", "course B"))
    assert _shapes(first) == _shapes(public) == _shapes(second), "same edge cases and shapes"
    assert _same(_inputs(ex_id, False, "course A"), _inputs(ex_id, False, None)), "visible cases are public"
    assert _same(_inputs(ex_id, True, "course A"), first), "one secret, one set of hidden cases"
    floats = [t for _, tensors in public for t in tensors if t.is_floating_point() and t.numel() > 1]
    if floats:  # exercises whose hidden inputs are drawn at random
        assert not _same(first, public) and not _same(first, second), f"{ex_id}: the secret changed nothing"


@pytest.mark.parametrize("ex_id", sorted(EXERCISES))
def test_verdicts_are_the_same_under_two_secrets(ex_id):
    ex = EXERCISES[ex_id]
    for key in ("course A", "course B"):
        assert all(r.passed for r in grade_function(ex_id, ex.reference, True, key)), (ex_id, key)
    for mistake in ex.mistakes:
        verdicts = []
        for key in (None, "course A", "course B"):
            results = grade_function(ex_id, mistake_as_student(ex, mistake), True, key)
            verdicts.append(all(r.passed for r in results))
        assert len(set(verdicts)) == 1, (ex_id, mistake.name, verdicts)


# --------------------------------------------------------------------------- where it is used


def test_the_grader_draws_the_hidden_cases_with_the_courses_secret(monkeypatch, capsys):
    """``attnlib grade`` (grade_notebook) finds the secret and says so; the solution still
    scores full marks, and ``check(..., hidden=True)`` (the hidden test cells that ``nbgrader
    autograde`` runs) draws with it too."""
    from attnlib.grading import check
    from attnlib.grading.runner import grade_notebook

    notebook = REPO / "solutions" / "05_self_cross_masks" / "05_self_cross_masks.ipynb"
    monkeypatch.setenv(secret.ENV, "a course's secret")
    report = grade_notebook(notebook)
    assert report.score == report.max_score > 0
    assert "hidden cases drawn with the course's secret" in report.notes
    public = grade_notebook(notebook, course_secret=None)
    assert "hidden cases drawn with the course's secret" not in public.notes

    import dataclasses

    drawn = []
    real = EXERCISES["padding_mask"]

    def spy(hidden):
        drawn.append((hidden, secret.salted(1)))
        return real.make_cases(hidden)

    monkeypatch.setitem(EXERCISES, "padding_mask", dataclasses.replace(real, make_cases=spy))
    check("padding_mask", real.reference, hidden=True)
    check("padding_mask", real.reference)
    assert [hidden for hidden, _ in drawn] == [True, False]
    assert drawn[0][1] != 1, "the hidden cases were drawn without the secret"
    assert drawn[1][1] == 1, "the visible cases were drawn with the secret"
