"""``attnlib grade notebooks/``: a folder of the course's notebooks graded one after another.

A folder like a learner's copy of ``notebooks/``: chapter 1 filled in with its solution,
chapter 2 half done (its softmax cell copied from the solution), chapter 3 untouched, a file
that is not JSON and a notebook without grade cells; plus copies in ``.ipynb_checkpoints`` and
a hidden folder that must be skipped. The folder is graded twice (table, JSON), each notebook
in a child process (a few seconds each).
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest

from attnlib.grading.folder import Graded, find_notebooks, format_folder_table, grade_folder
from attnlib.grading.notebook import Item
from attnlib.grading.report import Report

ROOT = Path(__file__).resolve().parents[1]
CH1, CH2, CH3 = "01_recurrence", "02_queries_keys_values", "03_scaling"


def _nb(kind: str, name: str) -> Path:
    return ROOT / kind / name / f"{name}.ipynb"


def _half_done_ch2() -> dict:
    """The released chapter 2 with the learner's softmax (the solution's cell), nothing else."""
    released = json.loads(_nb("notebooks", CH2).read_text())
    solution = json.loads(_nb("solutions", CH2).read_text())
    softmax = next(c for c in solution["cells"] if c.get("id") == "softmax-solution")
    for cell in released["cells"]:
        if cell.get("id") == "softmax-solution":
            cell["source"] = softmax["source"]
    return released


@pytest.fixture(scope="module")
def course(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("course")
    (root / CH1).mkdir()
    shutil.copyfile(_nb("solutions", CH1), root / CH1 / f"{CH1}.ipynb")  # full marks
    (root / "b").mkdir()  # folder names in the opposite order to the chapters
    (root / "b" / f"{CH2}.ipynb").write_text(json.dumps(_half_done_ch2()))
    (root / "a").mkdir()
    shutil.copyfile(_nb("notebooks", CH3), root / "a" / f"{CH3}.ipynb")  # untouched
    (root / "broken.ipynb").write_text("{ this is not JSON")
    (root / "notes.ipynb").write_text(json.dumps({
        "nbformat": 4, "nbformat_minor": 5, "metadata": {},
        "cells": [{"cell_type": "markdown", "id": "m", "metadata": {}, "source": "# My notes"}]}))
    for skipped in (root / ".ipynb_checkpoints", root / "a" / ".ipynb_checkpoints", root / ".hidden"):
        skipped.mkdir()
        shutil.copyfile(_nb("notebooks", CH3), skipped / f"{CH3}-checkpoint.ipynb")
    return root


EXPECTED_ORDER = [f"{CH1}/{CH1}.ipynb", f"b/{CH2}.ipynb", f"a/{CH3}.ipynb", "broken.ipynb", "notes.ipynb"]


def _run(folder: Path, as_json: bool) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = grade_folder(folder, timeout=120, as_json=as_json, stream=out, progress=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def table(course: Path) -> tuple[int, str, str]:
    return _run(course, as_json=False)


@pytest.fixture(scope="module")
def as_json(course: Path) -> tuple[int, list, str]:
    code, out, err = _run(course, as_json=True)
    return code, json.loads(out), err


def _by_file(entries: list) -> dict:
    return {Path(e["path"]).name: e for e in entries}


def test_finds_notebooks_in_chapter_order_skipping_checkpoints_and_hidden(course: Path) -> None:
    assert [p.relative_to(course).as_posix() for p in find_notebooks(course)] == EXPECTED_ORDER


def test_json_is_the_only_stdout_and_has_the_fields(as_json: tuple) -> None:
    code, entries, err = as_json
    assert code == 1  # two notebooks could not be graded
    assert [Path(e["path"]).name for e in entries] == [Path(p).name for p in EXPECTED_ORDER]
    for e in entries:
        assert {"path", "chapter", "title", "notebook", "score", "max_score", "items", "next_to_fix",
                "error"} <= e.keys()
    assert [e["chapter"] for e in entries] == [1, 2, 3, None, None]
    assert _by_file(entries)[f"{CH3}.ipynb"]["title"] == "Why divide by √d_k"
    assert "[1/5]" in err and "[5/5]" in err  # progress went to stderr


def test_scores_and_next_to_fix(as_json: tuple) -> None:
    e = _by_file(as_json[1])
    ch1, ch2, ch3 = e[f"{CH1}.ipynb"], e[f"{CH2}.ipynb"], e[f"{CH3}.ipynb"]
    assert ch1["max_score"] > 0 and ch1["score"] == ch1["max_score"] and ch1["next_to_fix"] is None
    assert all(i["passed"] for i in ch1["items"])
    first, second = ch2["items"][:2]  # softmax done, scaled_dot_product_attention not
    assert first["passed"] and not second["passed"]
    assert ch2["score"] == first["max_points"] < ch2["max_score"]
    assert ch2["next_to_fix"] == {"item": second["id"], "feedback": "not implemented yet"}
    assert ch3["score"] == 0 and not any(i["passed"] for i in ch3["items"])
    assert ch3["next_to_fix"]["item"] == ch3["items"][0]["id"]
    for name in ("broken.ipynb", "notes.ipynb"):
        assert e[name]["score"] is None and e[name]["items"] == [] and e[name]["error"]
    assert "not a Jupyter notebook" in e["broken.ipynb"]["error"]
    assert "no grade cells" in e["notes.ipynb"]["error"]


def test_table_rows_order_and_columns(table: tuple, as_json: tuple) -> None:
    code, out, err = table
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split() == ["chapter", "score", "items", "next", "thing", "to", "fix"]
    rows = lines[2:7]
    assert rows[0].startswith(" 1 Why attention replaced recurrence")
    assert rows[1].startswith(" 2 Queries, keys and values")
    assert rows[2].startswith(" 3 Why divide by √d_k")
    assert rows[3].startswith("broken.ipynb") and rows[4].startswith("notes.ipynb")
    e = _by_file(as_json[1])
    for row, name in zip(rows[:3], (f"{CH1}.ipynb", f"{CH2}.ipynb", f"{CH3}.ipynb")):
        items = e[name]["items"]
        assert f" {e[name]['score']}/{e[name]['max_score']} " in row
        assert f" {sum(i['passed'] for i in items)}/{len(items)} " in row
    assert rows[0].endswith(" done")
    assert rows[1].endswith(f"{e[f'{CH2}.ipynb']['items'][1]['id']}: not implemented yet")
    assert rows[2].endswith(f"{e[f'{CH3}.ipynb']['items'][0]['id']}: not implemented yet")
    assert "cannot grade: not a Jupyter notebook" in rows[3]
    assert "cannot grade: no grade cells" in rows[4]
    assert all(len(line) <= 120 for line in lines[:-1])  # cut to 120 columns for a file or a pipe


def test_total_line_names_the_notebook_to_open_next(table: tuple, as_json: tuple, course: Path) -> None:
    graded = [e for e in as_json[1] if e["error"] is None]
    score, most = sum(e["score"] for e in graded), sum(e["max_score"] for e in graded)
    assert table[1].splitlines()[-1] == (f"total: {score}/{most} points over 3 notebooks (2 could not be graded); "
                                         f"open next: {course / 'b' / f'{CH2}.ipynb'}")


def test_progress_line_per_notebook_on_stderr(table: tuple, course: Path) -> None:
    err = table[2].splitlines()
    assert err[0].startswith("grading 5 notebooks under")
    assert [ln.split("] ")[1].split(": ")[0] for ln in err[1:]] == [str(course / p) for p in EXPECTED_ORDER]
    assert all(re.fullmatch(r"\[\d/5\] \S+: \d+/\d+ \(\d+\.\d s\)", ln) for ln in err[1:4]), err
    assert "broken.ipynb: cannot grade (" in err[4] and "notes.ipynb: cannot grade (" in err[5]
    assert "grading" not in table[1]  # nothing of the progress on stdout


def test_all_graded_exits_0_and_says_all_done(tmp_path: Path) -> None:
    shutil.copyfile(_nb("solutions", CH1), tmp_path / f"{CH1}.ipynb")
    code, out, _ = _run(tmp_path, as_json=False)
    assert code == 0
    assert out.splitlines()[-1].endswith("points over 1 notebook; all done, full marks everywhere")


@pytest.mark.parametrize("layout", ["empty", "only checkpoints"])
def test_no_notebook_exits_2_saying_what_was_expected(tmp_path: Path, layout: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    if layout == "only checkpoints":
        (tmp_path / ".ipynb_checkpoints").mkdir()
        (tmp_path / ".ipynb_checkpoints" / "x-checkpoint.ipynb").write_text("{}")
    assert grade_folder(tmp_path, as_json=True) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"no notebook (*.ipynb) under {tmp_path}" in captured.err and "notebooks/" in captured.err


def test_timeout_must_be_positive(course: Path, capsys: pytest.CaptureFixture) -> None:
    assert grade_folder(course, timeout=0) == 2
    assert "--timeout must be positive" in capsys.readouterr().err


def test_long_feedback_is_cut_to_the_width() -> None:
    item = Item("test_flash_attention", 5, feedback="wrong values: " + "x" * 300 + "\n[flash_attention, case 'a']")
    report = Report("n.ipynb", [item, Item("test_other", 2, passed=True, points=2)])
    text = format_folder_table([Graded(Path("09_flash/09_flash.ipynb"), 9, "FlashAttention: exact attention "
                                       "in tiles, and a title far too long to show whole", report)], width=80)
    row = text.splitlines()[2]
    assert len(row) <= 80 and row.endswith("...")
    assert "2/7" in row and "1/2" in row and "test_flash_attention: wrong values" in row
    assert "[flash_attention" not in text  # only the first line of the feedback
