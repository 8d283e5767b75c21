"""What ``attnlib grade-class --gradebook`` writes for nbgrader: the scores in its gradebook
(``gradebook.db``, as ``nbgrader autograde`` writes them) and the ``autograded/`` notebooks that
``nbgrader generate_feedback`` turns into feedback pages (part of :mod:`attnlib.grading.classroom`)."""

from __future__ import annotations

import warnings
from pathlib import Path

from .classroom import ClassGradingError, StudentResult, _atomic_write
from .summary import _num

__all__ = ["check_gradebook", "write_autograded", "write_gradebook"]


def _db_url(root: Path) -> str:
    return f"sqlite:///{root / 'gradebook.db'}"


def check_gradebook(root: Path, assignment: str, expected: list[str]) -> None:
    from nbgrader.api import Gradebook, MissingEntry

    if not (root / "gradebook.db").exists():
        raise ClassGradingError(f"no gradebook at {root / 'gradebook.db'}: run `nbgrader generate_assignment "
                                f"{assignment}` (without --no-db) in {root} first")
    with Gradebook(_db_url(root)) as gb:
        try:
            a = gb.find_assignment(assignment)
        except MissingEntry:
            raise ClassGradingError(f"the gradebook has no assignment {assignment!r}: run `nbgrader "
                                    f"generate_assignment {assignment}` (without --no-db) first") from None
        known = sorted(f"{nb.name}.ipynb" for nb in a.notebooks)
        if known != expected:
            raise ClassGradingError(f"the gradebook's notebooks of {assignment} are {known}, the source "
                                    f"folder has {expected}: run `nbgrader generate_assignment {assignment} "
                                    "--force` again")


def _timestamp(folder: Path):
    from nbgrader.utils import parse_utc

    try:
        return parse_utc((folder / "timestamp.txt").read_text().strip())
    except Exception:
        return None


def write_gradebook(root: Path, result: StudentResult) -> None:
    """Scores into nbgrader's gradebook, as ``nbgrader autograde`` writes them."""
    from nbgrader.api import Gradebook

    folder = root / "submitted" / result.student / result.assignment
    with Gradebook(_db_url(root)) as gb, warnings.catch_warnings():
        # nbgrader's add_submission under SQLAlchemy 2: harmless, see nbgrader_config.py
        warnings.filterwarnings("ignore", message=r"Object of type <Submitted\w+> not in session")
        gb.update_or_create_student(result.student)
        stamp = _timestamp(folder)
        if stamp is not None:
            gb.update_or_create_submission(result.assignment, result.student, timestamp=stamp)
        else:
            gb.update_or_create_submission(result.assignment, result.student)
        for entry in result.notebooks:
            nb_id = entry["name"][: -len(".ipynb")]
            points = {i["id"]: i["points"] for i in entry.get("items", [])}
            sub_nb = gb.find_submission_notebook(nb_id, result.assignment, result.student)
            for grade in sub_nb.grades:
                grade.auto_score = float(points.get(grade.name, 0))
                grade.needs_manual_grade = grade.manual_score is not None
        gb.db.commit()


def write_autograded(root: Path, result: StudentResult, source_dir: Path) -> None:
    """``autograded/<student>/<assignment>/<nb>.ipynb`` for ``nbgrader generate_feedback``: the
    submission's cells (never executed here) with the source's test cells in place of the
    submission's, each showing this grader's verdict as its output."""
    import nbformat

    from .notebook import strip_hidden_tests

    for entry in result.notebooks:
        src = nbformat.read(str(source_dir / result.assignment / entry["name"]), as_version=4)
        sub = None
        if entry.get("file") and entry.get("status") == "graded":
            try:
                sub = nbformat.read(str(root / "submitted" / result.student / result.assignment / entry["file"]),
                                    as_version=4)
            except Exception:
                sub = None
        feedback = {i["id"]: i for i in entry.get("items", [])}
        grade_cells = {}
        for cell in src.cells:
            nbg = cell.get("metadata", {}).get("nbgrader", {})
            if nbg.get("grade") and not nbg.get("solution"):
                test = nbformat.from_dict(cell)
                test.source = strip_hidden_tests(test.source).rstrip()
                item = feedback.get(nbg.get("grade_id"), {})
                verdict = (f"{_num(item.get('points', 0))}/{_num(item.get('max_points', nbg.get('points', 0)))} "
                           f"points. {item.get('feedback', '')}").strip()
                test.outputs = [nbformat.v4.new_output("stream", name="stdout", text=verdict + "\n")]
                test.execution_count = None
                grade_cells[nbg.get("grade_id")] = test
        cells = []
        if sub is not None:
            used = set()
            for cell in sub.cells:
                gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
                if gid in grade_cells:
                    if gid not in used:
                        cells.append(grade_cells[gid])
                        used.add(gid)
                    continue
                cell = nbformat.from_dict(cell)
                if cell.cell_type == "code":
                    cell.outputs, cell.execution_count = [], None
                cells.append(cell)
            cells += [c for gid, c in grade_cells.items() if gid not in used]
        else:
            message = entry.get("message", "not graded")
            cells.append(nbformat.v4.new_markdown_cell(f"**{message}**"))
            cells += list(grade_cells.values())
        out = nbformat.v4.new_notebook(cells=cells, metadata=src.metadata)
        for n, cell in enumerate(out.cells):  # ids unique and valid whatever the submission held
            cell["id"] = f"cell-{n}"
        dest = root / "autograded" / result.student / result.assignment / entry["name"]
        _atomic_write(dest, nbformat.writes(out))
