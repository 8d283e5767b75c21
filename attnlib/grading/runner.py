"""``attnlib grade``: grade a learner's notebook without running their code in this process.

:func:`grade_notebook` is a list of named steps (the model: nbgrader's ``autograde``
converter and its visible list of preprocessors); each step is one function below, and the
grader's other jobs each have their module:

1. **read the notebook and its source** (:func:`_graded_items`, with
   :mod:`attnlib.grading.notebook`): the notebook is read as nbformat 4 (older formats
   converted, duplicate or missing cell ids repaired); its grade cells (nbgrader metadata
   ``grade: true``) give the items: ``grade_id``, ``points`` and the ``check("<exercise id>",
   <name>[, hidden=True])`` calls read from the cell source with :mod:`ast` (test cells are
   never executed). When the source notebook exists (``solutions/<assignment>/<same file
   name>`` under the repository of the installed attnlib, or ``--source``), the cells,
   points and calls come from it, since a submission's test cells may have been edited,
   deleted, duplicated or stripped of their metadata (a note says so); else from the
   submission, with a note (a released notebook has no hidden tests).
2. **check the submission against its source** (:func:`_graded_items`, :func:`_learner_cells`):
   the learner's code is every code cell that is not a test cell (of the submission or, by its
   grade id, of the source, or a source test cell stripped of its metadata) and not an explore
   cell (:func:`_explore_cells`: the ungraded cells that call attnlib on purpose, to compare;
   they are not the learner's answer, so they are not run).
3. **make the cases** (:func:`_make_cases`, with :mod:`attnlib.grading.core`): every needed
   exercise's visible and hidden cases, saved with ``torch.save`` for the child.
4. **run the child under supervision** (:func:`_run_child`, with
   :mod:`attnlib.grading.supervisor`, :mod:`attnlib.grading.sandbox` and
   :mod:`attnlib.grading.child`, talking through :mod:`attnlib.grading.protocol`): a fresh
   interpreter in a private directory runs the notebook's code cells (not its test cells) in
   an IPython shell, then calls the learner's objects on the cases, under a watcher of
   forbidden calls, and saves the raw outputs; a fault costs one cell or one exercise, and a
   fresh child goes on.
5. **judge each item** (:func:`_judge_items`): the outputs are loaded with
   ``torch.load(weights_only=True)`` and compared with :func:`attnlib.grading.core.judge`. An
   item passes when every case of every check call in its cell passes; its points are all or
   nothing.
6. **write the report** (:class:`attnlib.grading.report.Report`): the items, the notes, the
   child's output and what the sandbox enforced (see :mod:`attnlib.grading.supervisor` for
   what is enforced where).

Notebook files: nbformat 4 is read as JSON (``nbformat`` takes seconds to import); older
formats go through ``nbformat.reads(..., as_version=4)``; corrupt JSON is a
:class:`GradingError`.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import secret
from .core import EXERCISES, Case, Exercise, draw_cases, judge
from .notebook import (
    GradingError,
    Item,
    cell_source,
    compare_test_cells,
    defined_names,
    is_grade_cell,
    nbgrader_metadata,
    parse_items,
    read_notebook,
)
from .protocol import (
    DEFAULT_DISK_LIMIT,
    DEFAULT_FILE_LIMIT,
    DEFAULT_MAX_RESTARTS,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_OUTPUT_LIMIT,
    DEFAULT_STEP_TIMEOUT,
    DEFAULT_TIMEOUT,
)
from .report import Report, format_table, print_report
from .supervisor import Supervisor, sandbox_config

#: ``grade_notebook``'s default ``course_secret``: the course's, found from the source notebook.
FIND_SECRET = object()

__all__ = ["GradingError", "Item", "Report", "grade_notebook", "find_source", "parse_items",
           "format_table", "main", "repo_root", "DEFAULT_TIMEOUT", "DEFAULT_MEMORY_LIMIT",
           "DEFAULT_OUTPUT_LIMIT", "DEFAULT_FILE_LIMIT", "DEFAULT_DISK_LIMIT", "DEFAULT_MAX_RESTARTS"]

Pair = tuple[str, str]  # (exercise id, the learner's name for it)
Cases = dict[Pair, dict[str, list[Case]]]  # pair -> {"visible": [...], "hidden": [...]}


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


# --------------------------------------------------------------------------- the steps


def grade_notebook(path: str | os.PathLike, source: str | os.PathLike | None = None,
                   timeout: float = DEFAULT_TIMEOUT, step_timeout: float | None = None,
                   find: bool = True, *, memory_limit: int | None = DEFAULT_MEMORY_LIMIT,
                   hide: Iterable[str | os.PathLike] = (), isolate: bool = True,
                   output_limit: int = DEFAULT_OUTPUT_LIMIT, file_limit: int = DEFAULT_FILE_LIMIT,
                   disk_limit: int = DEFAULT_DISK_LIMIT, max_restarts: int = DEFAULT_MAX_RESTARTS,
                   course_secret: str | None | object = FIND_SECRET) -> Report:
    """Grade ``path``; raise :class:`GradingError` only when grading itself cannot run.

    ``timeout`` bounds all the child processes together (wall clock); ``step_timeout``
    (default 30 s, or a quarter of ``timeout`` if less, at least 1 s) bounds one notebook cell,
    and one case gets the larger of it and :data:`~attnlib.grading.protocol.CASE_TIME_MULTIPLE`
    times the reference's time on that case (measured in the child before the notebook's code
    runs), so that slow but correct loops pass and one infinite loop costs only the items that
    need it. ``find=False`` skips the lookup of the
    source notebook under ``solutions/``. ``memory_limit`` (bytes, ``None`` for none),
    ``output_limit`` (bytes one cell or case may print), ``file_limit`` (bytes of one file),
    ``disk_limit`` (bytes of files in the private directory) and ``max_restarts`` (fresh
    children after a crash) bound the child; ``hide`` names more paths its code must not
    read or write (e.g. a gradebook, the other submissions), besides the course repository
    (but ``attnlib``), the submission's own folder and the source notebook;
    ``isolate=False`` skips the namespaces (see :mod:`attnlib.grading.supervisor`). The hidden
    cases are drawn with ``course_secret`` (by default the course's, found by
    :func:`attnlib.grading.secret.find` from the source notebook's folder; ``None``: the public
    hidden cases). The submission is never modified: the child works on a copy. Safe to call from several
    threads at once.
    """
    path = Path(path)
    notes: list[str] = []
    # 1. read the notebook and its source, 2. check the submission against its source
    nb = read_notebook(path, notes)
    src_path = Path(source) if source is not None else (find_source(path) if find else None)
    items, test_cells, src_nb = _graded_items(nb, path, src_path, notes)
    cells = _learner_cells(nb, test_cells, _explore_cells(nb, src_nb))
    # 3. make the cases
    if course_secret is FIND_SECRET:
        course_secret = secret.find(src_path.parent if src_path is not None else None)
    needed, cases, case_bytes = _make_cases(items, course_secret)
    if course_secret is not None and any(c.hidden for item in items for c in item.calls):
        notes.append("hidden cases drawn with the course's secret")
    # 4. run the child under supervision
    limits = {"memory": memory_limit, "output": output_limit, "file": file_limit, "disk": disk_limit,
              "cpu": int(math.ceil(timeout)) + 10}
    step = min(DEFAULT_STEP_TIMEOUT, max(1.0, timeout / 4)) if step_timeout is None else float(step_timeout)
    run = _run_child(path, src_path, cells, needed, cases, case_bytes, notes, limits=limits, step=step,
                     timeout=timeout, max_restarts=max_restarts, hide=hide, isolate=isolate)
    # 5. judge each item
    _judge_items(items, needed, cases, run, cells)
    # 6. write the report
    return Report(str(path), items, run.notes, run.log.text(), run.sandbox)


def _graded_items(nb: dict, path: Path, src_path: Path | None,
                  notes: list[str]) -> tuple[list[Item], set[int], dict | None]:
    """Step 1: the graded items (from the source notebook when there is one, the
    submission's test cells compared with it), the indices of the submission's test cells
    (its grade cells, cells with a grade id of the source, source test cells stripped of their
    metadata) and the source notebook (``None`` without one)."""
    stripped: set[int] = set()
    source_ids: set[str] = set()
    src_nb = None
    if src_path is not None:
        src_nb = read_notebook(src_path)
        items = parse_items(src_nb)
        if not items:
            raise GradingError(f"{src_path}: the source notebook has no grade cells "
                               "(nbgrader metadata grade: true)")
        notes.append(f"grade cells, points and checks taken from the source notebook {src_path}")
        if src_path.resolve() != path.resolve():
            integrity, stripped = compare_test_cells(nb, src_nb)
            notes += integrity
        source_ids = {i.id for i in items}
    else:
        items = parse_items(nb)
        if not items:
            raise GradingError(f"{path}: no grade cells (code cells with nbgrader metadata grade: true)")
        notes.append("no source notebook found: grade cells, points and checks taken from the "
                     "submission itself (hidden tests are not in a released notebook; use --source)")
    test_cells = {n for n, cell in enumerate(nb["cells"]) if is_grade_cell(cell) or n in stripped
                  or str(nbgrader_metadata(cell).get("grade_id")) in source_ids}
    return items, test_cells, src_nb


#: The id suffix of the course's explore cells (``tools/exercises``: ``<exercise>-explore``).
EXPLORE_SUFFIX = "-explore"


def _explore_cells(nb: dict, src_nb: dict | None) -> set[int]:
    """Step 2: the submission's explore cells, left out of the run: the ungraded code cells
    whose id ends in ``-explore`` in the source notebook (without one, in the submission), found
    in the submission by that id or, where ids were lost (nbformat 4.0), by their code. They
    call attnlib on purpose (yours beside the reference's); since the whole run is watched
    (no call of the reference anywhere, see :class:`attnlib.grading.guard.RunGuard`), running
    them would fail the exercises. Leaving a cell out can only cost its author: what the
    grader judges comes from the other cells."""
    marked = nb if src_nb is None else src_nb
    ids, texts = set(), set()
    for cell in marked.get("cells", []):
        cid = cell.get("id")
        if cell.get("cell_type") == "code" and isinstance(cid, str) and cid.endswith(EXPLORE_SUFFIX) \
                and not is_grade_cell(cell):
            ids.add(cid)
            text = cell_source(cell).strip()
            if text:
                texts.add(text)
    if not ids:
        return set()
    return {n for n, cell in enumerate(nb["cells"]) if cell.get("cell_type") == "code"
            and (cell.get("id") in ids or cell_source(cell).strip() in texts)}


def _learner_cells(nb: dict, test_cells: set[int], explore: Iterable[int] = ()) -> list[dict]:
    """Step 2: the learner's code: every code cell that is neither a test cell nor an
    explore cell."""
    explore = set(explore)
    return [{"index": n, "source": cell_source(cell)} for n, cell in enumerate(nb["cells"])
            if cell.get("cell_type") == "code" and n not in test_cells and n not in explore]


def _make_cases(items: list[Item], course_secret: str | None = None
                ) -> tuple[list[Pair], Cases, dict[int, bytes]]:
    """Step 3: the (exercise, name) pairs to check, in order, their cases (the hidden ones
    drawn with ``course_secret``, if any), and the cases as the child loads them
    (``torch.save`` of plain dicts); an unknown exercise id is the item's problem."""
    for item in items:
        for c in item.calls:
            if c.exercise_id not in EXERCISES and not item.problem:
                item.problem = f"unknown exercise id {c.exercise_id!r} in check()"
    needed: list[Pair] = list(dict.fromkeys(
        (c.exercise_id, c.name) for item in items if not item.problem for c in item.calls))
    hidden_needed = {(c.exercise_id, c.name) for item in items for c in item.calls if c.hidden}
    visible_needed = {(c.exercise_id, c.name) for item in items for c in item.calls if not c.hidden}
    cases: Cases = {}
    case_bytes: dict[int, bytes] = {}
    for k, key in enumerate(needed):
        ex = EXERCISES[key[0]]
        cases[key] = {"visible": draw_cases(ex, False) if key in visible_needed else [],
                      "hidden": draw_cases(ex, True, course_secret) if key in hidden_needed else []}
        buf = io.BytesIO()
        torch.save({w: [_case_fields(c) for c in cs] for w, cs in cases[key].items()}, buf)
        case_bytes[k] = buf.getvalue()
    return needed, cases, case_bytes


def _case_fields(case: Case) -> dict:
    return {f.name: getattr(case, f.name) for f in dataclasses.fields(case)}


def _run_child(path: Path, src_path: Path | None, cells: list[dict], needed: list[Pair], cases: Cases,
               case_bytes: dict[int, bytes], notes: list[str], *, limits: dict, step: float,
               timeout: float, max_restarts: int, hide: Iterable[str | os.PathLike],
               isolate: bool) -> Supervisor:
    """Step 4: a private directory with a copy of the submission, and the child's attempts
    there under :class:`~attnlib.grading.supervisor.Supervisor`; the directory is removed
    afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="attnlib-grade-"))
    try:
        os.chmod(workdir, 0o755)
        for sub in ("grader", "submission", "home", "tmp"):
            (workdir / sub).mkdir()
        notebook_copy = workdir / "submission" / path.name
        shutil.copyfile(path, notebook_copy)
        config = sandbox_config(workdir, notebook_copy, root=repo_root(), submission=path, src_path=src_path,
                                hide=hide, isolate=isolate, limits=limits)
        run = Supervisor(needed, cases, workdir, step, limits, notes)
        run.run(config, case_bytes, cells, time.monotonic() + timeout, timeout, max_restarts)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return run


# --------------------------------------------------------------------------- step 5: judging


def _judge_items(items: list[Item], needed: list[Pair], cases: Cases, run: Supervisor,
                 cells: list[dict]) -> None:
    """Step 5: every item's points, ``passed`` and feedback, from the child's outputs."""
    defines = {c["index"]: defined_names(c["source"]) for c in cells}

    def cell_error(name: str) -> str:
        return _cell_error_for(run.cell_errors, defines, name)

    verdicts: dict[tuple[str, str, bool], tuple[int, str]] = {}
    for k, key in enumerate(needed):
        for which in ("visible", "hidden"):
            if cases[key][which]:
                verdict = _verdict(k, key, which, cases, run, cell_error)
                verdicts[(key[0], key[1], which == "hidden")] = verdict
    for item in items:
        _item_feedback(item, verdicts, cases, cell_error)


def _cell_error_for(cell_errors: dict[int, str], defines: dict[int, set[str]], name: str) -> str:
    """The failed cell that matters for ``name``: one that defines it, else the first."""
    if not cell_errors:
        return ""
    defining = [i for i in sorted(cell_errors) if name and name in defines.get(i, ())]
    first = min(cell_errors)
    if defining:
        i = defining[0]
        text = f"cell {i}, which defines it, {cell_errors[i]}"
        if first < i:  # the root cause may be earlier (an import that failed)
            text += f" (the first cell that failed: cell {first}, which {cell_errors[first]})"
        return text
    more = f" (and {len(cell_errors) - 1} more cells failed)" if len(cell_errors) > 1 else ""
    return f"cell {first} of the notebook {cell_errors[first]}{more}"


def _verdict(k: int, key: Pair, which: str, cases: Cases, run: Supervisor,
             cell_error: Callable[[str], str]) -> tuple[int, str]:
    """The ``which`` cases of pair ``k``: how many passed, and the first failure (its message,
    then ``[exercise, case 'name']``), or why none was graded."""
    exercise_id, name = key
    status, fault = run.status.get(k), run.faults.get(k)
    hidden = which == "hidden"
    case_list = cases[key][which]
    failure = ""
    if status is not None and "missing" in status:
        failure = f"no object named {name!r} is defined in the notebook"
        error = cell_error(name)
        if error:
            failure += f"; {error}"
    elif status is not None and "error" in status:
        failure = str(status["error"])
    elif status is None and fault is None and not any((k, which, i) in run.results
                                                       for i in range(len(case_list))):
        failure = run.ended or "not graded: the grading process ended before this exercise"
    elif fault is not None and fault[1] is None:
        failure = f"{fault[2]} while calling {name}"
    if failure:
        return 0, failure
    n_passed, first = 0, ""
    n_visible = len(cases[key]["visible"])
    fault_at = None
    if fault is not None:
        fault_at = 0 if fault[1] is None else fault[1] + (n_visible if fault[0] == "hidden" else 0)
    for i, case in enumerate(case_list):
        pos = i + (n_visible if hidden else 0)
        entry = run.results.get((k, which, i))
        message = ""
        if fault_at is not None and pos == fault_at:
            entry, message = None, f"{fault[2]} while calling {name}"
        elif fault_at is not None and pos > fault_at:
            entry, message = None, "not run: the process was stopped by an earlier case"
        elif entry is None:
            message = run.ended or "not graded: the grading process ended first"
        ok, message = (False, message) if entry is None else _judge_entry(EXERCISES[exercise_id], case, entry)
        if ok:
            n_passed += 1
        elif not first:
            label = "hidden case" if hidden else "case"
            first = f"{message}\n[{exercise_id}, {label} '{case.name}']"
    return n_passed, first


def _judge_entry(ex: Exercise, case: Case, entry: dict) -> tuple[bool, str]:
    """One case's entry written by the child: whether it passes, and why not."""
    if entry["kind"] != "value":
        return False, str(entry.get("message", ""))
    try:
        result = judge(ex, case, entry.get("value"))
        ok, message = result.passed, result.message
    except Exception as exc:  # an output the comparison cannot handle
        ok, message = False, f"returned a value the grader cannot compare ({type(exc).__name__}: {exc})"
    if ok and entry.get("extra"):
        ok, message = False, str(entry["extra"])
    return ok, message


def _item_feedback(item: Item, verdicts: dict[tuple[str, str, bool], tuple[int, str]], cases: Cases,
                   cell_error: Callable[[str], str]) -> None:
    """An item's points (all or nothing), ``passed`` and feedback from its check calls."""
    if item.problem:
        item.feedback = item.problem
        return
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
        error = cell_error(item.calls[0].name if item.calls else "")
        if error and "cell " not in first:
            first += f"\n(note: {error})"
        item.feedback = first


# --------------------------------------------------------------------------- the command


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
    print_report(report, as_json)
    return 0
