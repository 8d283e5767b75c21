"""``attnlib grade``: notebooks graded with the learner's code in a child process.

The fixtures in ``tests/fixtures/grading`` are small notebooks following the course's
conventions, with three exercises (softmax 2 points, causal_mask 1, scaled_dot_product_attention
3): ``source.ipynb`` holds the hidden tests; the others are submissions (released form, hidden
tests stripped). Each submission is graded once per module (a child run costs a few seconds).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from attnlib.cli import main as cli_main
from attnlib.grading import notebook, runner, supervisor
from attnlib.grading.report import format_table
from attnlib.grading.runner import GradingError, grade_notebook

FIXTURES = Path(__file__).parent / "fixtures" / "grading"
SOURCE = FIXTURES / "source.ipynb"
IDS = ["test_softmax", "test_causal_mask", "test_scaled_dot_product_attention"]
MAX = {"test_softmax": 2, "test_causal_mask": 1, "test_scaled_dot_product_attention": 3}


def _cli_json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    code = cli_main(["grade", *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


def _items(report: dict) -> dict:
    return {i["id"]: i for i in report["items"]}


@pytest.fixture(scope="module")
def graded() -> dict:
    """Each submission graded once against the source notebook (in-process parent)."""
    names = ("correct", "half_correct", "untouched", "known_mistake", "import_error", "cheat")
    with ThreadPoolExecutor(max_workers=3) as pool:  # the children run in parallel
        reports = pool.map(lambda n: grade_notebook(FIXTURES / f"{n}.ipynb", source=SOURCE, timeout=60), names)
        return dict(zip(names, reports))


def test_correct_gets_full_marks_with_hidden_tests(graded: dict) -> None:
    report = graded["correct"].as_dict()
    assert report["score"] == report["max_score"] == 6
    assert all(i["passed"] for i in report["items"])
    # the hidden cases came from the source: more cases than the visible ones
    assert _items(report)["test_softmax"]["feedback"] == "all 11 cases passed"


def test_half_correct_gets_partial_credit(graded: dict) -> None:
    items = _items(graded["half_correct"].as_dict())
    assert graded["half_correct"].score == 3
    assert items["test_softmax"]["passed"] and items["test_causal_mask"]["passed"]
    assert items["test_scaled_dot_product_attention"]["points"] == 0
    assert "not implemented" in items["test_scaled_dot_product_attention"]["feedback"]


def test_untouched_gets_zero_not_implemented(graded: dict) -> None:
    report = graded["untouched"]
    assert report.score == 0 and report.max_score == 6
    for item in report.items:
        assert not item.passed and item.points == 0
        assert "not implemented" in item.feedback


def test_known_mistakes_are_named(graded: dict) -> None:
    items = _items(graded["known_mistake"].as_dict())
    assert items["test_softmax"]["passed"]
    assert "aligned bottom-right" in items["test_causal_mask"]["feedback"]
    assert "no 1/sqrt(d_k) scaling" in items["test_scaled_dot_product_attention"]["feedback"]
    assert graded["known_mistake"].score == 2


def test_import_error_gives_zero_with_the_error(graded: dict) -> None:
    report = graded["import_error"]
    assert report.score == 0
    for item in report.items:
        assert "my_attention_helpers" in item.feedback
    assert any("ModuleNotFoundError" in n for n in report.notes)


def test_monkeypatched_comparison_in_the_notebook_does_not_help(graded: dict) -> None:
    """The notebook replaces torch.allclose/assert_close (in the child): softmax returning its
    input still fails, because the comparison runs in the parent."""
    items = _items(graded["cheat"].as_dict())
    assert torch.allclose(torch.zeros(1), torch.ones(1)) is False  # untouched here
    assert items["test_softmax"]["points"] == 0
    assert "wrong values" in items["test_softmax"]["feedback"]
    assert items["test_causal_mask"]["points"] == 0
    assert "numpy.ndarray" in items["test_causal_mask"]["feedback"]
    assert items["test_scaled_dot_product_attention"]["passed"]


def test_infinite_loop_in_a_function_costs_only_that_item() -> None:
    start = time.monotonic()
    # Limits with headroom: on a loaded 2-core machine an honest cell can take a few seconds.
    report = grade_notebook(FIXTURES / "infinite_loop.ipynb", source=SOURCE, timeout=60, step_timeout=8)
    assert time.monotonic() - start < 60 + 5
    items = {i.id: i for i in report.items}
    assert items["test_softmax"].points == 0
    assert "did not finish within 8 s" in items["test_softmax"].feedback
    assert items["test_causal_mask"].passed and items["test_scaled_dot_product_attention"].passed


def test_whole_run_timeout_kills_the_child_and_gives_zero() -> None:
    """A loop the per-step alarm does not stop: the parent kills the process group."""
    start = time.monotonic()
    report = grade_notebook(FIXTURES / "infinite_loop.ipynb", source=SOURCE, timeout=5, step_timeout=100)
    assert time.monotonic() - start < 5 + 5
    assert report.score == 0
    softmax = report.items[0]
    assert "timed out" in softmax.feedback and "5 s" in softmax.feedback


def test_top_level_loop_in_a_cell_is_stopped(tmp_path: Path) -> None:
    nb = json.loads((FIXTURES / "correct.ipynb").read_text())
    nb["cells"].insert(2, {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                           "source": "n = 0\nwhile True:\n    n += 1\n"})
    path = tmp_path / "loop_cell.ipynb"
    path.write_text(json.dumps(nb))
    report = grade_notebook(path, timeout=60, step_timeout=8, find=False)
    assert report.score == 6  # the cells after the loop still ran
    assert any("cell 2" in n and "did not finish" in n for n in report.notes)


def test_cli_json_schema_and_notes(capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["grade", str(FIXTURES / "half_correct.ipynb"), "--json", "--timeout", "30"])
    captured = capsys.readouterr()
    assert code == 0
    report = json.loads(captured.out)
    assert set(report) == {"notebook", "score", "max_score", "items"}
    assert report["notebook"] == str(FIXTURES / "half_correct.ipynb")
    assert [i["id"] for i in report["items"]] == IDS
    for item in report["items"]:
        assert set(item) == {"id", "points", "max_points", "passed", "feedback"}
        assert item["max_points"] == MAX[item["id"]]
        assert isinstance(item["passed"], bool) and isinstance(item["feedback"], str)
    assert report["score"] == 3 and report["max_score"] == 6
    # no source notebook: graded on the submission's own (visible) checks, with a note
    assert "no source notebook" in captured.err
    assert _items(report)["test_softmax"]["feedback"] == "all 5 cases passed"


def test_cli_table(capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["grade", str(FIXTURES / "known_mistake.ipynb"), "--source", str(SOURCE)])
    out = capsys.readouterr().out
    assert code == 0
    assert "total: 2/6" in out
    lines = out.splitlines()
    n = next(i for i, ln in enumerate(lines) if ln.startswith("test_causal_mask"))
    assert "0/1" in lines[n] and "no" in lines[n] and "aligned bottom-right" in lines[n]
    # the failing case, the clue to a wrong value, on the row below, under the feedback column
    column = next(ln for ln in lines if ln.startswith("item")).index("feedback")
    assert lines[n + 1][column:].startswith("[causal_mask, ") and "case '" in lines[n + 1]
    assert not lines[n + 1][:column].strip()


def _report(*feedback: str) -> "runner.Report":
    items = [runner.Item(f"test_{n}", 3, feedback=f) for n, f in enumerate(feedback)]
    return runner.Report("nb.ipynb", items)


def test_table_shows_the_failing_case_under_each_message() -> None:
    """The message on the item's row, each detail line (the case, a note) on a row of its own
    under the feedback column; the JSON keeps the feedback as it is."""
    report = _report("wrong values at 3 of 15 positions: largest error 0.1\n[softmax, case 'random logits (3, 5)']",
                     "raised ValueError: bad\nsecond line of the error\n[attn, hidden case 'L != S']\n"
                     "(note: cell 3 of the notebook raised NameError)",
                     "all 5 cases passed")
    lines = format_table(report, width=10_000).splitlines()
    assert lines[3].startswith("test_0") and lines[3].endswith("wrong values at 3 of 15 positions: largest error 0.1")
    column = lines[3].index("wrong values")
    assert lines[4] == " " * column + "[softmax, case 'random logits (3, 5)']"
    assert lines[5].startswith("test_1") and lines[5].endswith("raised ValueError: bad second line of the error")
    assert lines[6] == " " * column + "[attn, hidden case 'L != S']"
    assert lines[7] == " " * column + "(note: cell 3 of the notebook raised NameError)"
    assert lines[8].startswith("test_2") and lines[8].endswith("all 5 cases passed")
    assert lines[9] == "total: 0/9"
    assert report.as_dict()["items"][0]["feedback"] == report.items[0].feedback
    # cut to a narrow terminal: every line fits, the case's start is still there
    narrow = format_table(report, width=60).splitlines()
    assert all(len(ln) <= 60 for ln in narrow)
    assert narrow[4].strip().startswith("[softmax, case") and narrow[4].endswith(" ...")


@pytest.mark.parametrize("content", [None, "not json at all", '{"cells": 3}'])
def test_cli_cannot_grade_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        content: str | None) -> None:
    path = tmp_path / "x.ipynb"
    if content is not None:
        path.write_text(content)
    assert cli_main(["grade", str(path)]) != 0
    err = capsys.readouterr().err
    assert ("no such file" if content is None else "not a Jupyter notebook") in err


def test_no_grade_cells_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "empty.ipynb"
    path.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {}, "source": "x = 1"}],
                                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    with pytest.raises(GradingError, match="no grade cells"):
        grade_notebook(path, find=False)
    assert cli_main(["grade", str(path)]) == 2
    assert "no grade cells" in capsys.readouterr().err


def test_console_script_missing_file() -> None:
    proc = subprocess.run([sys.executable, "-m", "attnlib.cli", "grade", "does/not/exist.ipynb"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_items_come_from_the_source_not_the_edited_submission(tmp_path: Path) -> None:
    """A submission whose test cells were edited (points, checks) is graded on the source's."""
    nb = json.loads((FIXTURES / "source.ipynb").read_text())
    for cell in nb["cells"]:
        meta = cell["metadata"].get("nbgrader", {})
        if meta.get("grade"):
            meta["points"] = 100
            cell["source"] = "pass\n"
    edited = runner.parse_items(nb)
    assert all(i.problem for i in edited)  # no check call left in the submission's cells
    source_items = runner.parse_items(json.loads(SOURCE.read_text()))
    assert [(i.id, i.max_points) for i in source_items] == [(i, MAX[i]) for i in IDS]
    assert [[(c.exercise_id, c.name, c.hidden) for c in i.calls] for i in source_items][0] == \
        [("softmax", "softmax", False), ("softmax", "softmax", True)]


def test_find_source_under_solutions(tmp_path: Path) -> None:
    (tmp_path / "solutions" / "02_demo").mkdir(parents=True)
    src = tmp_path / "solutions" / "02_demo" / "02_demo.ipynb"
    src.write_text("{}")
    sub = tmp_path / "submitted" / "alice" / "02_demo" / "02_demo.ipynb"
    sub.parent.mkdir(parents=True)
    assert runner.find_source(sub, root=tmp_path) == src
    assert runner.find_source(tmp_path / "elsewhere" / "other.ipynb", root=tmp_path) is None


class Sneaky(torch.Tensor):
    """A tensor subclass, as a learner's function might return."""


def test_objects_that_are_not_plain_tensors_do_not_load(tmp_path: Path) -> None:
    """What the child writes is loaded with weights_only=True: a tensor subclass or any other
    object fails to load and is reported, never unpickled."""
    for i, value in enumerate([torch.zeros(2).as_subclass(Sneaky), Sneaky, runner.Item("x", 1)]):
        path = tmp_path / f"out_{i}.pt"
        torch.save({"kind": "value", "value": value, "extra": None}, path)
        entry = supervisor.load_output(path)
        assert entry["kind"] == "unsupported"
        assert "not a plain torch.Tensor" in entry["message"]
    path = tmp_path / "ok.pt"
    torch.save({"kind": "value", "value": (torch.ones(2), 3, "s", None), "extra": None}, path)
    assert supervisor.load_output(path)["kind"] == "value"
    # what does load (e.g. a set) is still judged by type in the parent
    from attnlib.grading import EXERCISES, judge

    ex = EXERCISES["causal_mask"]
    result = judge(ex, ex.make_cases(False)[0], {1, 2})
    assert not result.passed and "set" in result.message


def test_check_call_parsing() -> None:
    calls, problem = notebook.check_calls(
        'from attnlib.grading import check\ncheck("a", f)\nimport attnlib.grading as g\n'
        'g.check("b", K, hidden=True)\ncheck("c", h, True)\n')
    assert not problem
    assert [(c.exercise_id, c.name, c.hidden) for c in calls] == [("a", "f", False), ("b", "K", True),
                                                                 ("c", "h", True)]
    assert "parsed" in notebook.check_calls("check(")[1]
    assert "string literal" in notebook.check_calls("check(name, f)")[1]
    assert "no check" in notebook.check_calls("x = 1")[1]
