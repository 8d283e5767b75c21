"""``attnlib grade notebooks/``: every exercise notebook of a folder, graded one after another,
and the course at a glance.

:func:`grade_folder` finds the notebooks (:func:`find_notebooks`: every ``*.ipynb`` under the
folder, without ``.ipynb_checkpoints`` and hidden folders, in chapter order: the ``NN_``
prefix of the file's name, else of its folder's), grades each with
:func:`attnlib.grading.runner.grade_notebook` (its source notebook found under ``solutions/``
as for one notebook), prints a line on stderr as each finishes (the course takes a few
minutes), then one table: a row per notebook with its chapter, its score, the items passed
and the next thing to fix (the first item not passed and the first line of its feedback, or
``done``), and a last line with the total and the notebook to open next. A notebook that
cannot be graded (not a notebook, no grade cells) gets a row saying why; the others go on.
``--json`` prints a JSON list instead, one object per notebook (:func:`entry`), and nothing
else on stdout. For every item's feedback, ``attnlib grade`` the one notebook.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .notebook import GradingError, as_number, cell_source, read_notebook
from .protocol import DEFAULT_TIMEOUT
from .report import Report, feedback_lines
from .runner import grade_notebook

__all__ = ["Graded", "entry", "find_notebooks", "format_folder_table", "grade_folder", "chapter_of",
           "next_to_fix"]

#: The ``NN_`` prefix of a chapter's file or folder (``03_scaling``).
_NUMBER = re.compile(r"^(\d+)_")
#: The heading of a course notebook's first markdown cell: ``# Chapter 3 exercises: Why divide by √d_k``.
_HEADING = re.compile(r"^#\s+Chapter\s+(\d+)\s+exercises\s*:\s*(.+?)\s*$", re.M)


@dataclass
class Graded:
    """One notebook of the folder: its report, or why it could not be graded (``error``)."""

    path: Path
    chapter: int | None
    title: str
    report: Report | None = None
    error: str = ""
    seconds: float = 0.0

    @property
    def done(self) -> bool:
        return self.report is not None and self.report.score >= self.report.max_score

    @property
    def label(self) -> str:
        """The chapter as the table shows it: its number and title, else the file's name."""
        return f"{self.chapter:>2} {self.title}" if self.chapter is not None and self.title else self.path.name


def _sort_key(path: Path, folder: Path) -> tuple:
    """Chapter order: the ``NN_`` prefix of the file's name, else of the nearest folder's
    (under ``folder``) that has one; notebooks without a number last, by path."""
    rel = path.relative_to(folder)
    for part in (rel.name, *reversed(rel.parts[:-1])):
        m = _NUMBER.match(part)
        if m:
            return (0, int(m.group(1)), rel.as_posix())
    return (1, 0, rel.as_posix())


def find_notebooks(folder: str | os.PathLike) -> list[Path]:
    """Every ``*.ipynb`` file under ``folder`` (not in ``.ipynb_checkpoints`` nor in a hidden
    folder, not hidden itself), in chapter order."""
    folder = Path(folder)
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        found += [Path(top) / f for f in files if f.endswith(".ipynb") and not f.startswith(".")]
    return sorted(found, key=lambda p: _sort_key(p, folder))


def chapter_of(path: Path, folder: Path | None = None) -> tuple[int | None, str]:
    """The chapter's number and title, from the heading ``# Chapter N exercises: Title`` of the
    notebook's first markdown cell; else the number of its ``NN_`` prefix and no title."""
    try:
        nb = read_notebook(path)
        first = next((c for c in nb["cells"] if c.get("cell_type") == "markdown"), None)
        m = _HEADING.search(cell_source(first)) if first is not None else None
        if m:
            return int(m.group(1)), m.group(2)
    except (GradingError, OSError, ValueError, TypeError):
        pass
    key = _sort_key(path, folder if folder is not None else path.parent)
    return (key[1] if key[0] == 0 else None), ""


def next_to_fix(report: Report) -> tuple[str, str] | None:
    """The first item not passed and the first line of its feedback; ``None`` at full marks."""
    for item in report.items:
        if not item.passed:
            lines = feedback_lines(item.feedback or "")
            return item.id, (lines[0] if lines else "")
    return None


def entry(graded: Graded) -> dict:
    """A notebook as ``--json`` prints it: ``path``, ``chapter`` (number or ``null``),
    ``title``, then :meth:`Report.as_dict`'s fields (``notebook``, ``score``, ``max_score``,
    ``items``), ``next_to_fix`` (``{"item", "feedback"}``, ``null`` at full marks) and
    ``error`` (why it could not be graded: then ``score`` and ``max_score`` are ``null``)."""
    out: dict = {"path": str(graded.path), "chapter": graded.chapter, "title": graded.title}
    if graded.report is None:
        out.update(notebook=str(graded.path), score=None, max_score=None, items=[], next_to_fix=None)
    else:
        out.update(graded.report.as_dict())
        fix = next_to_fix(graded.report)
        out["next_to_fix"] = None if fix is None else {"item": fix[0], "feedback": fix[1]}
    out["error"] = graded.error or None
    return out


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 3)].rstrip() + "..."


def _columns(g: Graded) -> tuple[str, str, str]:
    """Score, items passed and the next thing to fix of one row."""
    if g.report is None:
        return "-", "-", f"cannot grade: {g.error}"
    r = g.report
    fix = next_to_fix(r)
    passed = f"{sum(i.passed for i in r.items)}/{len(r.items)}"
    text = "done" if fix is None else f"{fix[0]}: {fix[1]}"
    return f"{as_number(r.score)}/{as_number(r.max_score)}", passed, text


def _open_next(results: list[Graded]) -> Graded | None:
    """The first notebook not at full marks (graded ones first), ``None`` when all are."""
    return next((g for g in results if g.report is not None and not g.done), None) \
        or next((g for g in results if g.report is None), None)


def format_folder_table(results: list[Graded], width: int = 120) -> str:
    """The table of the folder, each row cut to ``width`` columns, and the total line."""
    label_w = min(max(16, min(44, (width - 30) // 2)), max([len("chapter")] + [len(g.label) for g in results]))
    cols = [_columns(g) for g in results]
    score_w = max([len("score")] + [len(c[0]) for c in cols])
    items_w = max([len("items")] + [len(c[1]) for c in cols])
    fix_w = max(20, width - (label_w + score_w + items_w + 6))
    head = f"{'chapter':<{label_w}}  {'score':>{score_w}}  {'items':>{items_w}}  next thing to fix"
    rows = [f"{_cut(g.label, label_w):<{label_w}}  {s:>{score_w}}  {k:>{items_w}}  {_cut(fix, fix_w)}"
            for g, (s, k, fix) in zip(results, cols)]
    graded = [g.report for g in results if g.report is not None]
    total = (f"total: {as_number(sum(r.score for r in graded))}/{as_number(sum(r.max_score for r in graded))} "
             f"points over {len(graded)} notebook{'s' * (len(graded) != 1)}")
    failed = len(results) - len(graded)
    if failed:
        total += f" ({failed} could not be graded)"
    nxt = _open_next(results)
    total += "; all done, full marks everywhere" if nxt is None else f"; open next: {nxt.path}"
    rule = "-" * min(width, max(len(line) for line in [head, *rows]))
    return "\n".join([head, rule, *rows, rule, total])


def grade_folder(folder: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT, as_json: bool = False,
                 stream: TextIO | None = None, progress: TextIO | None = None, width: int | None = None) -> int:
    """The ``attnlib grade FOLDER`` command: grade every notebook under ``folder`` in chapter
    order, one at a time (``timeout`` for each, as ``attnlib grade``), a line on ``progress``
    (default stderr) as each finishes, then the table (or the JSON list) on ``stream``
    (default stdout), cut to ``width`` (default: the terminal's, 120 columns for a file or a
    pipe). Returns 0 when every notebook was graded (whatever the scores), 1 when some could
    not be, 2 when ``folder`` holds no notebook or ``timeout`` is not positive."""
    stream = sys.stdout if stream is None else stream
    progress = sys.stderr if progress is None else progress
    if timeout <= 0:
        print("attnlib grade: --timeout must be positive", file=sys.stderr)
        return 2
    folder = Path(folder)
    paths = find_notebooks(folder)
    if not paths:
        print(f"attnlib grade: no notebook (*.ipynb) under {folder}: expected a notebook, or a folder of "
              "them such as the course's notebooks/ (NN_topic/NN_topic.ipynb)", file=sys.stderr)
        return 2
    print(f"grading {len(paths)} notebook{'s' * (len(paths) != 1)} under {folder}, one at a time "
          "(a few seconds each)", file=progress, flush=True)
    results = []
    for n, path in enumerate(paths, 1):
        g = Graded(path, *chapter_of(path, folder))
        start = time.monotonic()
        try:
            g.report = grade_notebook(path, timeout=timeout)
        except GradingError as exc:
            g.error = str(exc).removeprefix(f"{path}: ")
        except Exception as exc:  # noqa: BLE001  (one notebook's problem never stops the others)
            g.error = f"the grader failed ({type(exc).__name__}: {exc})"
        g.seconds = time.monotonic() - start
        results.append(g)
        score = _columns(g)[0] if g.report is not None else "cannot grade"
        print(f"[{n:>{len(str(len(paths)))}}/{len(paths)}] {path}: {score} ({g.seconds:.1f} s)",
              file=progress, flush=True)
    if as_json:
        print(json.dumps([entry(g) for g in results], indent=2), file=stream)
    else:
        if width is None:
            isatty = getattr(stream, "isatty", lambda: False)()
            width = shutil.get_terminal_size((120, 24)).columns if isatty else 120
        print(format_folder_table(results, width), file=stream)
    return 1 if any(g.report is None for g in results) else 0
