"""The nbgrader notebook format, as the grader reads it: standard library only.

A notebook of any nbformat version read as nbformat 4 (:func:`read_notebook`); its grade
cells (:func:`is_grade_cell`), their ``check(...)`` calls (:func:`check_calls`) and points,
as graded items (:func:`parse_items`); the hidden-tests markers (:data:`HIDDEN_BLOCK`, :func:`strip_hidden_tests`) and
the comparison of a submission's test cells with the source's (:func:`compare_test_cells`).
It imports neither torch nor the rest of the grader, so the book can count points with it
(``book/_ext/exercise_links.py`` loads this file alone) and a notebook is read the same way
everywhere.
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path


class GradingError(Exception):
    """Grading itself could not run (missing file, not a notebook, no grade cells)."""


@dataclass
class CheckCall:
    exercise_id: str
    name: str
    hidden: bool


@dataclass
class Item:
    """One grade cell: its points are earned when every case of every check call passes."""

    id: str
    max_points: float
    calls: list[CheckCall] = field(default_factory=list)
    problem: str = ""  # why the cell cannot be graded (unparseable, no check call)
    points: float = 0
    passed: bool = False
    feedback: str = ""


def as_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------- notebooks


def _upgrade_v3(raw: dict) -> dict:
    """nbformat 3 (cells in worksheets, code in ``input``) without nbformat installed."""
    cells = []
    for ws in raw.get("worksheets") or []:
        for cell in (ws or {}).get("cells") or []:
            if not isinstance(cell, dict):
                continue
            cell = dict(cell)
            if cell.get("cell_type") == "code" and "input" in cell:
                cell["source"] = cell.pop("input")
            if cell.get("cell_type") == "heading":
                cell["cell_type"] = "markdown"
            cells.append(cell)
    return {"cells": cells, "metadata": raw.get("metadata", {}), "nbformat": 4, "nbformat_minor": 0}


def _convert(text: str, raw: dict) -> dict:
    """An older (or unusual) notebook as nbformat 4, through nbformat when installed."""
    try:
        import nbformat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nb = nbformat.reads(text, as_version=4)
        if isinstance(nb.get("cells"), list):
            return nb
    except Exception:  # nbformat cannot read it: do the essentials here
        pass
    return _upgrade_v3(raw) if not isinstance(raw.get("cells"), list) else raw


def read_notebook(path: Path, notes: list[str] | None = None) -> dict:
    """The notebook as nbformat 4 (a dict with ``cells``); :class:`GradingError` when the
    file cannot be read as a notebook at all."""
    if not path.exists():
        raise GradingError(f"{path}: no such file")
    if not path.is_file():
        raise GradingError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GradingError(f"{path}: not a Jupyter notebook (not valid JSON: {exc})") from None
    except OSError as exc:
        raise GradingError(f"{path}: cannot be read ({exc.strerror})") from None
    if not isinstance(raw, dict) or not (isinstance(raw.get("cells"), list)
                                         or isinstance(raw.get("worksheets"), list)):
        raise GradingError(f"{path}: not a Jupyter notebook (no list of cells)")
    version = raw.get("nbformat")
    if isinstance(raw.get("cells"), list) and version == 4:
        nb = raw  # nbformat 4: read as it is (nbformat itself takes seconds to import)
        ids = [c.get("id") for c in raw["cells"] if isinstance(c, dict) and c.get("id") is not None]
        if notes is not None and len(ids) != len(set(map(str, ids))):
            notes.append(f"{path.name}: duplicate cell ids (ignored: grading uses the nbgrader grade ids)")
    else:
        nb = _convert(text, raw)
        if notes is not None:
            notes.append(f"{path.name} is in nbformat {version}; converted to nbformat 4 for grading")
    nb["cells"] = [c for c in nb["cells"] if isinstance(c, dict)]
    return nb


def cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(str(s) for s in src) if isinstance(src, list) else str(src)


def nbgrader_metadata(cell: dict) -> dict:
    meta = cell.get("metadata") or {}
    nbg = meta.get("nbgrader") if isinstance(meta, dict) else None
    return nbg if isinstance(nbg, dict) else {}


def is_grade_cell(cell: dict) -> bool:
    """An autograded test cell: a code cell with ``grade: true`` that is not an answer cell."""
    nbg = nbgrader_metadata(cell)
    return cell.get("cell_type") == "code" and bool(nbg.get("grade")) and not nbg.get("solution")


def check_calls(source: str) -> tuple[list[CheckCall], str]:
    """The ``check(...)`` calls of a test cell, in source order, or why they cannot be read."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return [], f"the grade cell could not be parsed ({exc.msg}, line {exc.lineno})"
    calls = []
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)),
                   key=lambda n: (n.lineno, n.col_offset))
    for node in nodes:
        fn = node.func
        fname = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
        if fname != "check":
            continue
        args = list(node.args)
        kwargs = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        ex_node = args[0] if args else kwargs.get("exercise_id")
        st_node = args[1] if len(args) > 1 else kwargs.get("student")
        hid_node = args[2] if len(args) > 2 else kwargs.get("hidden")
        if not (isinstance(ex_node, ast.Constant) and isinstance(ex_node.value, str)):
            return [], f"line {node.lineno}: check() needs the exercise id as a string literal"
        if not isinstance(st_node, ast.Name):
            return [], f"line {node.lineno}: check() needs the learner's object as a plain name"
        hidden = False
        if hid_node is not None:
            if not isinstance(hid_node, ast.Constant):
                return [], f"line {node.lineno}: check()'s hidden must be True or False"
            hidden = bool(hid_node.value)
        calls.append(CheckCall(ex_node.value, st_node.id, hidden))
    if not calls:
        return [], "no check(...) call in this grade cell"
    return calls, ""


def cell_points(nbg: dict) -> float:
    try:
        points = float(nbg.get("points", 0))
    except (TypeError, ValueError):
        return 0.0
    return points if math.isfinite(points) and points >= 0 else 0.0


def parse_items(nb: dict) -> list[Item]:
    """The graded items of a notebook: one per grade cell, in notebook order (a grade id
    that appears twice counts once, the first time)."""
    items: list[Item] = []
    seen: set[str] = set()
    for n, cell in enumerate(nb["cells"]):
        if not is_grade_cell(cell):
            continue
        nbg = nbgrader_metadata(cell)
        grade_id = str(nbg.get("grade_id") or f"cell-{n}")
        if grade_id in seen:
            continue
        seen.add(grade_id)
        calls, problem = check_calls(cell_source(cell))
        items.append(Item(grade_id, cell_points(nbg), calls, problem))
    return items


# --------------------------------------------------------------------------- integrity


HIDDEN_BLOCK = ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")


def _marker(line: str) -> str:
    """A hidden-tests marker as a pattern: any number of ``#`` and spaces before its words."""
    return r"^[ \t]*#+[ \t]*" + re.escape(line.lstrip("#").strip())


#: A hidden-tests block: from a begin marker's line to the end of the next end marker's line
#: (any number of ``#`` and spaces before a marker's words, anything after them).
HIDDEN_TESTS = re.compile(_marker(HIDDEN_BLOCK[0]) + r".*?" + _marker(HIDDEN_BLOCK[1]) + r"[^\n]*\n?",
                          re.M | re.S)


def strip_hidden_tests(source: str) -> str:
    """A test cell's source without its hidden-tests blocks (markers included)."""
    return HIDDEN_TESTS.sub("", source)


def visible_text(source: str) -> str:
    """A test cell's source as released: the hidden-tests block removed, whitespace folded."""
    lines, hidden = [], False
    for line in source.splitlines():
        if line.strip() == HIDDEN_BLOCK[0]:
            hidden = True
        elif line.strip() == HIDDEN_BLOCK[1]:
            hidden = False
        elif not hidden:
            lines.append(line.rstrip())
    return "\n".join(ln for ln in lines if ln.strip())


def compare_test_cells(sub_nb: dict, src_nb: dict) -> tuple[list[str], set[int]]:
    """Notes on the submission's test cells against the source's, and the indices of
    submission cells that are source test cells stripped of their metadata (not run)."""
    notes: list[str] = []
    src_cells = {}
    for cell in src_nb["cells"]:
        if is_grade_cell(cell):
            src_cells.setdefault(str(nbgrader_metadata(cell).get("grade_id")), cell)
    by_id: dict[str, list[tuple[int, dict]]] = {}
    for n, cell in enumerate(sub_nb["cells"]):
        gid = nbgrader_metadata(cell).get("grade_id")
        if gid is not None and str(gid) in src_cells:
            by_id.setdefault(str(gid), []).append((n, cell))
    src_text = {gid: visible_text(cell_source(c)) for gid, c in src_cells.items()}
    stripped: set[int] = set()
    for n, cell in enumerate(sub_nb["cells"]):
        if cell.get("cell_type") != "code" or nbgrader_metadata(cell).get("grade_id") is not None:
            continue
        text = visible_text(cell_source(cell))
        match = next((gid for gid, t in src_text.items() if t and t == text), None)
        if match is None and "check(" in text:
            calls, _ = check_calls(cell_source(cell))
            src_calls = {gid: check_calls(cell_source(c))[0] for gid, c in src_cells.items()}
            visible = [(c.exercise_id, c.name) for c in calls if not c.hidden]
            match = next((gid for gid, cs in src_calls.items() if visible and visible ==
                          [(c.exercise_id, c.name) for c in cs if not c.hidden]), None)
        if match is not None:
            stripped.add(n)
            notes.append(f"cell {n} is the test cell {match!r} without its nbgrader metadata: it was not "
                         "run (the tests come from the source notebook)")
    for gid, src in src_cells.items():
        cells = by_id.get(gid, [])
        if not cells:
            if not any(f"{gid!r}" in note for note in notes):
                notes.append(f"the test cell {gid!r} is missing from the submission (deleted, or its "
                             "metadata changed); graded from the source notebook")
            continue
        if len(cells) > 1:
            notes.append(f"the test cell {gid!r} appears {len(cells)} times in the submission "
                         f"(cells {', '.join(str(n) for n, _ in cells)}); counted once, from the source")
        n, cell = cells[0]
        nbg, src_nbg = nbgrader_metadata(cell), nbgrader_metadata(src)
        changes = []
        if not is_grade_cell(cell):
            changes.append("it is no longer a grade cell")
        if cell_points(nbg) != cell_points(src_nbg):
            changes.append(f"its points changed ({as_number(cell_points(src_nbg))} -> {nbg.get('points')!r})")
        if bool(nbg.get("locked")) != bool(src_nbg.get("locked")):
            changes.append("its locked flag changed")
        if visible_text(cell_source(cell)) != src_text[gid]:
            changes.append("its code was edited")
        if changes:
            notes.append(f"the test cell {gid!r} (cell {n}) differs from the source: {'; '.join(changes)}. "
                         "Points and checks come from the source notebook")
    for n, cell in enumerate(sub_nb["cells"]):
        gid = nbgrader_metadata(cell).get("grade_id")
        if is_grade_cell(cell) and str(gid) not in src_cells:
            notes.append(f"cell {n} is a grade cell {gid!r} that the source notebook does not have: ignored "
                         "(not run, no points)")
    return notes, stripped


def defined_names(source: str) -> set[str]:
    """Top-level names a cell binds (def, class, assignment, import)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # what the lines look like they define
        return {a or b for a, b in re.findall(r"^(?:async\s+)?(?:def|class)\s+(\w+)|^(\w+)\s*(?::|=(?!=))",
                                              source, re.M)}
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names
