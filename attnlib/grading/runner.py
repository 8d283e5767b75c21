"""``attnlib grade``: grade a learner's notebook without running their code in this process.

The steps (see :mod:`attnlib.grading.core` for the case/call/judge split):

1. **items** (parent): the notebook's grade cells (nbgrader metadata ``grade: true``), with
   their ``grade_id``, ``points`` and the ``check("<exercise id>", <name>[, hidden=True])``
   calls read from the cell source with :mod:`ast` (test cells are never executed). When
   the source notebook exists (``solutions/<assignment>/<same file name>`` under the
   repository of the installed attnlib, or ``--source``), the cells, points and calls come
   from it, since a submission's test cells may have been edited; else from the submission,
   with a note (a released notebook has no hidden tests).
2. **cases** (parent): every needed exercise's visible and hidden cases are written with
   ``torch.save`` to a temporary directory.
3. **running** (child, :mod:`attnlib.grading.child`): a fresh interpreter, in its own
   process group with a wall-clock limit, runs the notebook's non-grade code cells in an
   IPython shell, then calls the learner's objects on the cases and saves the raw outputs.
4. **judging** (parent): outputs are loaded with ``torch.load(weights_only=True)`` and
   compared with :func:`attnlib.grading.core.judge`. An item passes when every case of
   every check call in its cell passes; its points are all or nothing.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .core import EXERCISES, Case, judge

__all__ = ["GradingError", "Item", "Report", "grade_notebook", "find_source", "parse_items",
           "format_table", "main"]

#: Default wall-clock limit (seconds) for the whole child process.
DEFAULT_TIMEOUT = 120.0


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


@dataclass
class Report:
    notebook: str
    items: list[Item]
    notes: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(i.points for i in self.items)

    @property
    def max_score(self) -> float:
        return sum(i.max_points for i in self.items)

    def as_dict(self) -> dict:
        return {"notebook": self.notebook, "score": _num(self.score), "max_score": _num(self.max_score),
                "items": [{"id": i.id, "points": _num(i.points), "max_points": _num(i.max_points),
                           "passed": i.passed, "feedback": i.feedback} for i in self.items]}


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------- notebooks


def _read_notebook(path: Path) -> dict:
    if not path.exists():
        raise GradingError(f"{path}: no such file")
    if not path.is_file():
        raise GradingError(f"{path}: not a file")
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GradingError(f"{path}: not a Jupyter notebook (not valid JSON: {exc})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise GradingError(f"{path}: not a Jupyter notebook (no list of cells)")
    return nb


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _nbgrader(cell: dict) -> dict:
    meta = cell.get("metadata") or {}
    nbg = meta.get("nbgrader") if isinstance(meta, dict) else None
    return nbg if isinstance(nbg, dict) else {}


def _is_grade_cell(cell: dict) -> bool:
    """An autograded test cell: a code cell with ``grade: true`` that is not an answer cell."""
    nbg = _nbgrader(cell)
    return cell.get("cell_type") == "code" and bool(nbg.get("grade")) and not nbg.get("solution")


def _check_calls(source: str) -> tuple[list[CheckCall], str]:
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


def parse_items(nb: dict) -> list[Item]:
    """The graded items of a notebook: one per grade cell, in notebook order."""
    items = []
    for n, cell in enumerate(nb["cells"]):
        if not _is_grade_cell(cell):
            continue
        nbg = _nbgrader(cell)
        points = nbg.get("points", 0)
        try:
            points = float(points)
        except (TypeError, ValueError):
            points = 0.0
        calls, problem = _check_calls(_source(cell))
        items.append(Item(str(nbg.get("grade_id") or f"cell-{n}"), points, calls, problem))
    return items


def repo_root() -> Path:
    """The directory holding the installed ``attnlib`` package (the nbgrader course root)."""
    import attnlib

    return Path(attnlib.__file__).resolve().parent.parent


def find_source(submission: Path, root: Path | None = None) -> Path | None:
    """``solutions/<assignment>/<file name>`` of the course, for ``<assignment>`` the
    submission's folder name or the file's stem; ``None`` when neither exists."""
    root = repo_root() if root is None else root
    for assignment in dict.fromkeys((submission.resolve().parent.name, submission.stem)):
        candidate = root / "solutions" / assignment / submission.name
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------- the child


def _case_fields(case: Case) -> dict:
    return {f.name: getattr(case, f.name) for f in dataclasses.fields(case)}


def _load_output(path: Path) -> dict:
    """One case's entry written by the child; never unpickles anything but plain values."""
    try:
        entry = torch.load(path, weights_only=True)
    except Exception:
        return {"kind": "unsupported", "extra": None,
                "message": "returned an object that is not a plain torch.Tensor (it could not be "
                           "loaded as plain tensors and numbers)"}
    if not isinstance(entry, dict) or entry.get("kind") not in ("value", "unsupported", "error"):
        return {"kind": "error", "extra": None, "message": "the grading process wrote an unreadable result"}
    return entry


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, n: int = 600) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:].strip()


def grade_notebook(path: str | os.PathLike, source: str | os.PathLike | None = None,
                   timeout: float = DEFAULT_TIMEOUT, step_timeout: float | None = None,
                   find: bool = True) -> Report:
    """Grade ``path``; raise :class:`GradingError` only when grading itself cannot run.

    ``timeout`` bounds the whole child process (wall clock); ``step_timeout`` (default a
    quarter of it, at least 1 s) bounds one notebook cell or one case, so that one infinite
    loop costs only the items that need it. ``find=False`` skips the lookup of the source
    notebook under ``solutions/``.
    """
    path = Path(path)
    nb = _read_notebook(path)
    notes: list[str] = []
    src_path = Path(source) if source is not None else (find_source(path) if find else None)
    if src_path is not None:
        src_nb = _read_notebook(src_path)
        items = parse_items(src_nb)
        source_ids = {i.id for i in items}
        if not items:
            raise GradingError(f"{src_path}: the source notebook has no grade cells "
                               "(nbgrader metadata grade: true)")
        notes.append(f"grade cells, points and checks taken from the source notebook {src_path}")
    else:
        items = parse_items(nb)
        source_ids = set()
        if not items:
            raise GradingError(f"{path}: no grade cells (code cells with nbgrader metadata grade: true)")
        notes.append("no source notebook found: grade cells, points and checks taken from the "
                     "submission itself (hidden tests are not in a released notebook; use --source)")
    step = max(1.0, timeout / 4) if step_timeout is None else float(step_timeout)

    # the learner's code: every code cell that is not a test cell (of the submission or, by
    # its grade_id, of the source)
    cells = []
    for n, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") != "code" or _is_grade_cell(cell):
            continue
        if _nbgrader(cell).get("grade_id") in source_ids:
            continue
        cells.append({"index": n, "source": _source(cell)})

    for item in items:
        for c in item.calls:
            if c.exercise_id not in EXERCISES and not item.problem:
                item.problem = f"unknown exercise id {c.exercise_id!r} in check()"
    needed: list[tuple[str, str]] = list(dict.fromkeys(
        (c.exercise_id, c.name) for item in items if not item.problem for c in item.calls))
    hidden_needed = {(c.exercise_id, c.name) for item in items for c in item.calls if c.hidden}
    visible_needed = {(c.exercise_id, c.name) for item in items for c in item.calls if not c.hidden}

    workdir = Path(tempfile.mkdtemp(prefix="attnlib-grade-"))
    try:
        cases: dict[tuple[str, str], dict[str, list[Case]]] = {}
        for k, key in enumerate(needed):
            ex = EXERCISES[key[0]]
            cases[key] = {"visible": ex.make_cases(False) if key in visible_needed else [],
                          "hidden": ex.make_cases(True) if key in hidden_needed else []}
            torch.save({w: [_case_fields(c) for c in cs] for w, cs in cases[key].items()},
                       workdir / f"cases_{k}.pt")
        job = {"cells": cells, "exercises": needed, "step_timeout": step,
               "cwd": str(path.resolve().parent)}
        (workdir / "job.json").write_text(json.dumps(job))
        run = _run_child(workdir, timeout)
        _judge_items(items, needed, cases, workdir, run, timeout)
        notes += [f"cell {e['index']} of the notebook {e['message']}" for e in run.cell_errors]
        if run.timed_out:
            notes.append(_child_failure(run, timeout))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Report(str(path), items, notes)


@dataclass
class _ChildRun:
    timed_out: bool
    returncode: int | None
    log: str
    cell_errors: list[dict]
    running_cell: int | None


def _run_child(workdir: Path, timeout: float) -> _ChildRun:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    log_path = workdir / "child.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "attnlib.grading.child", str(workdir)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)  # also anything the notebook started in the background
    progress = _read_json(workdir / "progress.json") or {}
    done = (workdir / "done.json").exists()
    return _ChildRun(timed_out and not done, proc.returncode, _tail(log_path),
                     progress.get("errors") or [], progress.get("running"))


def _first_cell_error(run: _ChildRun) -> str:
    if not run.cell_errors:
        return ""
    e = run.cell_errors[0]
    more = f" (and {len(run.cell_errors) - 1} more cells failed)" if len(run.cell_errors) > 1 else ""
    return f"cell {e['index']} of the notebook {e['message']}{more}"


def _child_failure(run: _ChildRun, timeout: float) -> str:
    if run.timed_out:
        where = (f" while running cell {run.running_cell} of the notebook" if run.running_cell is not None
                 else " while calling the learner's code")
        return f"timed out: the notebook's code did not finish within {timeout:g} s{where} (an infinite loop?)"
    msg = (f"the process running the notebook's code ended before grading was done (exit code "
           f"{run.returncode}; does the notebook exit or crash the interpreter?)")
    if run.returncode and run.log:
        msg += ": " + run.log.splitlines()[-1][:300]
    return msg


def _judge_items(items: list[Item], needed: list[tuple[str, str]], cases: dict, workdir: Path,
                 run: _ChildRun, timeout: float) -> None:
    verdicts: dict[tuple[str, str, bool], tuple[int, str]] = {}  # -> (cases passed, first failure)
    for k, key in enumerate(needed):
        exercise_id, name = key
        ex = EXERCISES[exercise_id]
        status = _read_json(workdir / f"status_{k}.json")
        for which in ("visible", "hidden"):
            hidden = which == "hidden"
            case_list = cases[key][which]
            if not case_list:
                continue
            failure = ""
            if status is None:
                failure = _child_failure(run, timeout)
            elif "missing" in status:
                failure = f"no object named {name!r} is defined in the notebook"
                cell_error = _first_cell_error(run)
                if cell_error:
                    failure += f"; {cell_error}"
            elif "error" in status:
                failure = status["error"]
            if failure:
                verdicts[(exercise_id, name, hidden)] = (0, failure)
                continue
            n_passed, first = 0, ""
            for i, case in enumerate(case_list):
                out_path = workdir / f"out_{k}_{which}_{i}.pt"
                entry = _load_output(out_path) if out_path.exists() else \
                    {"kind": "error", "extra": None, "message": _child_failure(run, timeout)}
                if entry["kind"] == "value":
                    result = judge(ex, case, entry.get("value"))
                    ok, message = result.passed, result.message
                    if ok and entry.get("extra"):
                        ok, message = False, str(entry["extra"])
                else:
                    ok, message = False, str(entry.get("message", ""))
                if ok:
                    n_passed += 1
                elif not first:
                    label = "hidden case" if hidden else "case"
                    first = f"{message}\n[{exercise_id}, {label} '{case.name}']"
            verdicts[(exercise_id, name, hidden)] = (n_passed, first)

    cell_error = _first_cell_error(run)
    for item in items:
        if item.problem:
            item.feedback = item.problem
            continue
        first, total = "", 0
        for c in item.calls:
            n_passed, failure = verdicts[(c.exercise_id, c.name, c.hidden)]
            if failure and not first:
                first = failure if "\n[" in failure else f"{failure}\n[{c.exercise_id}]"
            total += len(cases[(c.exercise_id, c.name)]["hidden" if c.hidden else "visible"])
        item.passed = not first
        item.points = item.max_points if item.passed else 0
        if item.passed:
            item.feedback = f"all {total} cases passed"
        else:
            if cell_error and "cell " not in first:
                first += f"\n(note: {cell_error})"
            item.feedback = first


# --------------------------------------------------------------------------- output


def format_table(report: Report, width: int | None = None) -> str:
    """The report as a table, feedback on one line: cut to the width of a terminal, whole when
    the output goes to a file or a pipe (CI logs keep every word)."""
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 10_000
    id_w = max([len("item")] + [len(i.id) for i in report.items])
    pts = [f"{_num(i.points)}/{_num(i.max_points)}" for i in report.items]
    pts_w = max([len("points")] + [len(p) for p in pts])
    head = f"{'item':<{id_w}}  {'points':>{pts_w}}  {'passed':<6}  feedback"
    fb_w = max(20, width - (id_w + pts_w + 6 + 8))
    rows = []
    for item, p in zip(report.items, pts):
        fb = " ".join(item.feedback.splitlines()[0].split()) if item.feedback else ""
        fb = textwrap.shorten(fb, fb_w, placeholder=" ...") if fb else ""
        rows.append(f"{item.id:<{id_w}}  {p:>{pts_w}}  {'yes' if item.passed else 'no':<6}  {fb}")
    rule = "-" * min(width, max(len(row) for row in [head, *rows]))
    lines = [f"notebook: {report.notebook}", head, rule, *rows]
    lines.append(f"total: {_num(report.score)}/{_num(report.max_score)}")
    return "\n".join(lines)


def main(path: str, as_json: bool = False, timeout: float = DEFAULT_TIMEOUT,
         source: str | None = None) -> int:
    """The ``attnlib grade`` command: 0 whatever the score, 2 when grading could not run."""
    if timeout <= 0:
        print("attnlib grade: --timeout must be positive", file=sys.stderr)
        return 2
    try:
        report = grade_notebook(path, source=source, timeout=timeout)
    except GradingError as exc:
        print(f"attnlib grade: cannot grade: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        for note in report.notes:
            print(f"note: {note}", file=sys.stderr)
    else:
        print(format_table(report))
        for note in report.notes:
            print(f"note: {note}")
    return 0
