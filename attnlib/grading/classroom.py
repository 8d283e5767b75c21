"""``attnlib grade-class``: grade a whole class's ``submitted/`` folder with the hardened grader.

The course directory is an nbgrader course root (``nbgrader_config.py``; in this repository,
the repository itself). Submissions sit where ``nbgrader collect`` / ``zip_collect`` put them::

    submitted/<student>/<assignment>/<notebook>.ipynb   (+ timestamp.txt, optional)

For every student, every notebook of ``<source>/<assignment>/`` (default ``solutions/``) is
graded with :func:`attnlib.grading.runner.grade_notebook`: the learner's code runs in a
sandboxed child process; grade cells, points and hidden tests come from the source notebook,
never from the submission. Students are graded in parallel (``--jobs``, default: every core).

Nothing is lost, nothing is modified in place:

* submissions are only read (the runner grades a private copy);
* every student gets ``<out>/<student>/<assignment>/result.json`` (scores, per-item
  feedback, what was graded, a hash of the submission) and ``grade.log`` (the tables, the
  notes and the child process's output), each written atomically, ``result.json`` last;
* a run that stops half-way (a crash, Ctrl-C, a reboot) is resumed by running the same
  command again: a student whose ``result.json`` matches the current submission and grader
  is not graded again (``--force`` regrades everyone);
* Ctrl-C (SIGINT), SIGTERM or SIGHUP stop the run promptly: no further student is started,
  the students being graded are abandoned (their sandboxed children killed, their temporary
  folders removed, nothing written for them), the class files are written for the students
  finished so far, and :class:`GradingInterrupted` is raised (``attnlib grade-class`` exits
  with 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM);
* one student's broken notebook (not JSON, missing, renamed, crashing the interpreter)
  costs that student's items only; the others are graded as usual.

With ``--gradebook`` the scores go into nbgrader's gradebook (the ``auto_score`` of each
grade cell, as ``nbgrader autograde`` would write them) and an autograded copy of each
notebook goes to ``autograded/<student>/<assignment>/``, its test cells showing this
grader's feedback, so that ``nbgrader generate_feedback`` and ``nbgrader export`` work
unchanged. The assignment must be in the gradebook already (``nbgrader generate_assignment
<assignment>`` without ``--no-db`` records it).

At the end a table of scores and a count of failures by kind are printed,
``<out>/<assignment>.csv`` / ``<out>/<assignment>.json`` hold the class's results (after an
interruption: the students finished so far; the others are listed as not graded), and
``<out>/<assignment>/report.html`` (and ``report.json``) shows what the class gets wrong
(:mod:`attnlib.grading.class_report`).
"""

from __future__ import annotations

import concurrent.futures
import csv
import datetime as _dt
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .protocol import DEFAULT_TIMEOUT
from .stopping import _kill_sandboxes, _Stop
from .summary import _num, _problems, failure_kind, failures_by_kind, format_summary

__all__ = ["ClassGradingError", "GradingInterrupted", "StudentResult", "grade_class", "failure_kind", "main"]

#: Where results go, relative to the course root (beside nbgrader's autograded/ and feedback/).
DEFAULT_OUT = "graded"
#: Format of result.json; a result of another format is regraded.
RESULT_FORMAT = 1


class ClassGradingError(Exception):
    """The class cannot be graded at all (no such assignment, no submissions, no gradebook)."""


class GradingInterrupted(KeyboardInterrupt):
    """:func:`grade_class` was stopped by a signal (Ctrl-C, SIGTERM, SIGHUP).

    ``results`` are the students finished (graded now or kept), in class order, ``not_graded``
    the others; the class files were written for the finished ones. A subclass of
    ``KeyboardInterrupt``, so code that stops on Ctrl-C stops on it too.
    """

    def __init__(self, signum: int, results: list[StudentResult], not_graded: list[str]):
        self.signum, self.results, self.not_graded = signum, results, not_graded
        super().__init__(f"stopped by {_signal_name(signum)}: {_n_students(len(results))} finished, "
                         f"{len(not_graded)} not graded")


def _n_students(n: int) -> str:
    return f"{n} student{'' if n == 1 else 's'}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Interrupted(Exception):
    """A student's grading abandoned because the run is stopping (nothing written for them)."""


# --------------------------------------------------------------------------- small helpers


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256_files(paths: list[Path], base: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(base)).encode() + b"\0")
        try:
            h.update(p.read_bytes())
        except OSError as exc:
            h.update(f"unreadable: {exc}".encode())
        h.update(b"\0")
    return h.hexdigest()


def _submission_files(folder: Path) -> list[Path]:
    """Every regular file of a student's submission folder (not following links)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if d != ".ipynb_checkpoints"]
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out.append(p)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- one student


@dataclass
class StudentResult:
    student: str
    assignment: str
    score: float = 0.0
    max_score: float = 0.0
    notebooks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: bool = False  # an earlier run's result was kept (resume)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"student": self.student, "assignment": self.assignment,
                "score": _num(self.score), "max_score": _num(self.max_score),
                "notebooks": self.notebooks, "notes": self.notes, "seconds": round(self.seconds, 3)}


def _source_items(src: Path) -> list[dict]:
    """The grade cells of a source notebook, as zero-score items (for notebooks not graded)."""
    from .notebook import parse_items, read_notebook

    return [{"id": i.id, "points": 0, "max_points": _num(i.max_points), "passed": False, "feedback": ""}
            for i in parse_items(read_notebook(src))]


def _match_notebooks(expected: list[str], submitted: list[str]) -> tuple[dict[str, str | None], list[str], list[str]]:
    """Map each expected notebook name to the submitted file to grade (or None), the extra
    files, and notes. A single missing notebook with a single unexpected ``.ipynb`` beside it
    is taken to be the same notebook renamed."""
    mapping: dict[str, str | None] = {e: (e if e in submitted else None) for e in expected}
    extra = [s for s in submitted if s not in expected]
    notes = []
    missing = [e for e, s in mapping.items() if s is None]
    if len(missing) == 1 and len(extra) == 1:
        mapping[missing[0]] = extra[0]
        notes.append(f"{missing[0]} was not submitted under that name; graded {extra[0]} in its place "
                     "(renamed?)")
        extra = []
    for e in extra:
        notes.append(f"extra notebook {e} is not part of the assignment and was not graded")
    return mapping, extra, notes


def _grade_student(student: str, assignment: str, root: Path, source_dir: Path, out_dir: Path,
                   grade_kwargs: dict, grade_fn: Callable, stop: threading.Event | None = None) -> StudentResult:
    """Grade one student and write their files; raise :class:`_Interrupted` (writing nothing)
    when ``stop`` is set before or while they are graded: a grading that overlapped the stop
    may have had its child killed, so its result is not trusted."""
    def check_stop() -> None:
        if stop is not None and stop.is_set():
            raise _Interrupted(student)

    check_stop()
    res, log = grade_submission(student, assignment, root, source_dir / assignment, grade_kwargs, grade_fn,
                                check_stop)
    check_stop()
    return _store(res, log, root, source_dir, out_dir)


def grade_submission(student: str, assignment: str, root: Path, src_folder: Path, grade_kwargs: dict,
                     grade_fn: Callable, check_stop: Callable[[], None] = lambda: None) -> tuple[StudentResult, str]:
    """Grade ``root/submitted/<student>/<assignment>/`` against the source notebooks in
    ``src_folder``: the student's result and the text of their ``grade.log``, nothing written
    (a Dask worker runs this on a copy of the files, :mod:`attnlib.grading.cluster`)."""
    t0 = time.perf_counter()
    folder = root / "submitted" / student / assignment
    expected = sorted(p.name for p in src_folder.glob("*.ipynb"))
    files = _submission_files(folder)
    submitted = sorted(p.name for p in files if p.suffix == ".ipynb" and p.parent == folder)
    mapping, _, notes = _match_notebooks(expected, submitted)
    res = StudentResult(student, assignment, notes=list(notes))
    log = io.StringIO()
    log.write(f"student {student}, assignment {assignment}, graded {_now()}\n")
    for note in notes:
        log.write(f"note: {note}\n")
    from .notebook import GradingError
    from .report import format_table

    for name in expected:
        src = src_folder / name
        entry: dict[str, Any] = {"name": name, "file": mapping[name]}
        try:
            items = _source_items(src)
        except Exception as exc:  # the course's own source is broken: say so on every student
            items = []
            entry["problem"] = f"the source notebook {src} cannot be read: {exc}"
        entry["max_score"] = _num(sum(i["max_points"] for i in items))
        if mapping[name] is None:
            message = f"no notebook named {name} was submitted"
            entry.update(status="missing", message=message, score=0,
                         items=[dict(i, feedback=message) for i in items], notes=[])
            log.write(f"\n== {name}: missing ({message})\n")
        else:
            path = folder / mapping[name]
            try:
                report = grade_fn(path, source=src, **grade_kwargs)
                entry.update(status="graded", score=_num(report.score),
                             items=report.as_dict()["items"], notes=list(report.notes))
                entry["max_score"] = _num(report.max_score)
                log.write(f"\n== {name} ({path.relative_to(root)})\n{format_table(report, width=10_000)}\n")
                for note in report.notes:
                    log.write(f"note: {note}\n")
                child_log = getattr(report, "log", "")
                if child_log:
                    log.write(f"-- output of the learner's code (end) --\n{child_log}\n-- end of output --\n")
            except GradingError as exc:
                message = f"cannot grade {mapping[name]}: {exc}"
                entry.update(status="error", message=message, score=0,
                             items=[dict(i, feedback=message) for i in items], notes=[])
                log.write(f"\n== {name}: not graded ({message})\n")
            except Exception as exc:  # a bug of the grader: this student's notebook only
                message = f"internal error of the grader: {type(exc).__name__}: {exc}"
                entry.update(status="error", message=message, score=0,
                             items=[dict(i, feedback=message) for i in items], notes=[])
                log.write(f"\n== {name}: not graded ({message})\n{traceback.format_exc()}\n")
            check_stop()
        res.notebooks.append(entry)
        res.score += float(entry["score"])
        res.max_score += float(entry["max_score"])
    res.seconds = time.perf_counter() - t0
    log.write(f"\ntotal: {_num(res.score)}/{_num(res.max_score)} in {res.seconds:.1f} s\n")
    return res, log.getvalue()


def _store(res: StudentResult, log: str, root: Path, source_dir: Path, out_dir: Path) -> StudentResult:
    """Write a graded student's ``grade.log`` and ``result.json`` (last: it marks them done)."""
    folder = root / "submitted" / res.student / res.assignment
    result = res.as_dict()
    result.update(format=RESULT_FORMAT, graded_at=_now(),
                  submission_sha256=_sha256_files(_submission_files(folder), folder),
                  grader=_grader_fingerprint(source_dir / res.assignment))
    dest = out_dir / res.student / res.assignment
    _atomic_write(dest / "grade.log", log)
    _atomic_write(dest / "result.json", json.dumps(result, indent=2))
    return res


def _grader_fingerprint(src_folder: Path) -> dict:
    import attnlib

    return {"attnlib": attnlib.__version__,
            "source_sha256": _sha256_files(sorted(src_folder.glob("*.ipynb")), src_folder)}


def _finished(student: str, assignment: str, root: Path, source_dir: Path, out_dir: Path) -> StudentResult | None:
    """The stored result when it is complete and still matches the submission and grader."""
    path = out_dir / student / assignment / "result.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    folder = root / "submitted" / student / assignment
    if (not isinstance(stored, dict) or stored.get("format") != RESULT_FORMAT
            or stored.get("submission_sha256") != _sha256_files(_submission_files(folder), folder)
            or stored.get("grader") != _grader_fingerprint(source_dir / assignment)):
        return None
    return StudentResult(student, assignment, float(stored["score"]), float(stored["max_score"]),
                         stored.get("notebooks", []), stored.get("notes", []), skipped=True,
                         seconds=float(stored.get("seconds", 0.0)))


# --------------------------------------------------------------------------- the class


class _Progress:
    """A progress bar on stderr when it is a terminal, a line per student otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def interrupted(self) -> None:
        if self.enabled:
            self.stream.write(f"{chr(10) if self.tty and self.done < self.total else ''}stopping: the students "
                              "being graded are abandoned, the finished ones are kept\n")
            self.stream.flush()

    def update(self, result: StudentResult) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * (self.total - self.done)
        what = "kept" if result.skipped else f"{_num(result.score)}/{_num(result.max_score)}"
        if self.tty:
            width = 30
            filled = int(width * self.done / max(1, self.total))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                              f"{elapsed:5.0f} s elapsed, ~{left:.0f} s left  {result.student[:20]:<20} {what:>9}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"[{self.done}/{self.total}] {result.student}: {what} "
                              f"({result.seconds:.1f} s; {elapsed:.0f} s elapsed)\n")
        self.stream.flush()


def _students(root: Path, assignment: str) -> list[str]:
    base = root / "submitted"
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / assignment).is_dir() and not p.name.startswith("."))


def grade_class(assignment: str, root: str | os.PathLike = ".", source: str = "solutions",
                out: str = DEFAULT_OUT, jobs: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                gradebook: bool = False, force: bool = False, students: list[str] | None = None,
                progress: bool = True, grade_fn: Callable | None = None,
                grade_kwargs: dict | None = None, scheduler: str | None = None,
                part: tuple[int, int] | None = None) -> list[StudentResult]:
    """Grade every student's submission of ``assignment``; see the module docstring.

    ``grade_fn`` (default :func:`attnlib.grading.runner.grade_notebook`) is called as
    ``grade_fn(path, source=..., timeout=..., **grade_kwargs)``. With ``scheduler`` (a Dask
    scheduler's address or scheduler file) the students are graded on that cluster's workers
    (:mod:`attnlib.grading.cluster`; ``grade_fn`` and ``jobs`` do not apply). ``part=(k, n)``
    grades only the students at positions ``k, k + n, k + 2n, ...`` of the sorted class (one
    batch job of ``n``; a run without it then merges their results). Raises
    :class:`ClassGradingError` when nothing can be graded.
    """
    from .runner import grade_notebook

    root = Path(root).resolve()
    source_dir = (root / source).resolve()
    out_dir = (root / out).resolve()
    src_folder = source_dir / assignment
    expected = sorted(p.name for p in src_folder.glob("*.ipynb")) if src_folder.is_dir() else []
    if not expected:
        raise ClassGradingError(f"no source notebooks in {src_folder} (is {assignment!r} an assignment of "
                                f"this course? the course root is {root})")
    all_students = _students(root, assignment)
    if students:
        unknown = sorted(set(students) - set(all_students))
        if unknown:
            raise ClassGradingError(f"no submission of {assignment} for {', '.join(unknown)} in {root / 'submitted'}")
        all_students = [s for s in all_students if s in set(students)]
    if part is not None:
        k, n = part
        if not 0 <= k < n:
            raise ClassGradingError(f"a part is K/N with 0 <= K < N, got {k}/{n}")
        if gradebook:
            raise ClassGradingError("--gradebook needs the whole class: grade the parts without it, then "
                                    "run once without --part to merge them into the gradebook")
        all_students = all_students[k::n]
    if not all_students:
        raise ClassGradingError(f"no submissions: expected {root / 'submitted'}/<student>/{assignment}/ "
                                "(nbgrader collect or zip_collect puts them there)")
    if gradebook:
        from .gradebook import check_gradebook

        check_gradebook(root, assignment, expected)
    kwargs = dict(grade_kwargs or {})
    kwargs["timeout"] = timeout
    hide = [root / "submitted", root / "autograded", root / "feedback", out_dir, root / "gradebook.db",
            source_dir, root / "exchange"]
    if grade_fn is None:
        grade_fn = grade_notebook
        import inspect

        if "hide" in inspect.signature(grade_notebook).parameters:
            kwargs.setdefault("hide", [p for p in hide if p.exists()])

    cluster = None
    if scheduler is not None:
        from .cluster import DaskGrading

        cluster = DaskGrading(scheduler, assignment, root, src_folder, kwargs)
    stop = _Stop()
    try:
        with stop.installed():
            return _grade_all(assignment, root, source_dir, out_dir, all_students, jobs, gradebook, force,
                              progress, grade_fn, kwargs, stop, cluster)
    finally:
        if cluster is not None:
            cluster.close()


def _grade_all(assignment: str, root: Path, source_dir: Path, out_dir: Path, all_students: list[str],
               jobs: int | None, gradebook: bool, force: bool, progress: bool, grade_fn: Callable,
               kwargs: dict, stop: _Stop, cluster: Any = None) -> list[StudentResult]:
    from .gradebook import write_autograded, write_gradebook

    results: dict[str, StudentResult] = {}
    todo = []
    for s in all_students:
        if stop.is_set():
            break
        kept = None if force else _finished(s, assignment, root, source_dir, out_dir)
        if kept is not None:
            results[s] = kept
        else:
            todo.append(s)
    bar = _Progress(len(all_students), enabled=progress)
    for s in all_students:
        if s in results:
            bar.update(results[s])
            if gradebook:
                write_gradebook(root, results[s])

    def finished(fut: concurrent.futures.Future, s: str) -> None:
        try:
            r = fut.result()
            if cluster is not None:  # graded on a worker: this machine writes the files
                r = _store(*r, root, source_dir, out_dir)
        except _Interrupted:
            return
        except concurrent.futures.CancelledError:
            if stop.is_set():
                return
            r = StudentResult(s, assignment, notes=["grading failed: the cluster cancelled the task"])
        except Exception as exc:  # writing the result failed (disk full?), or the workers died: go on
            r = StudentResult(s, assignment, notes=[f"grading failed: {type(exc).__name__}: {exc}"])
        results[s] = r
        if gradebook:  # one thread writes the gradebook (SQLite)
            write_gradebook(root, r)
            write_autograded(root, r, source_dir)
        bar.update(r)

    jobs = max(1, jobs or os.cpu_count() or 1)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs) if cluster is None else None
    try:
        if stop.is_set():
            futures = {}
        elif cluster is None:
            futures = {pool.submit(_grade_student, s, assignment, root, source_dir, out_dir, kwargs, grade_fn,
                                   stop.event): s for s in todo}
        else:
            futures = {cluster.submit(s): s for s in todo}
        pending = set(futures)
        while pending and not stop.is_set():
            done, pending = concurrent.futures.wait(pending, timeout=0.2,
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                finished(fut, futures[fut])
        if stop.is_set():
            bar.interrupted()
            for fut in pending:
                fut.cancel()
            # the students in flight here: kill their children until their threads return (on a
            # cluster, their tasks finish on the workers and are dropped)
            running = {f for f in pending if not f.cancelled()} if cluster is None else set()
            while running:
                _kill_sandboxes()
                done, running = concurrent.futures.wait(running, timeout=0.1)
                for fut in done:
                    finished(fut, futures[fut])
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    ordered = [results[s] for s in all_students if s in results]
    not_graded = [s for s in all_students if s not in results]
    if stop.signum is not None and not_graded:
        _write_summary(out_dir, assignment, ordered, not_graded=not_graded, stopped_by=stop.signum)
        raise GradingInterrupted(stop.signum, ordered, not_graded)
    _write_summary(out_dir, assignment, ordered)
    return ordered


def _write_summary(out_dir: Path, assignment: str, results: list[StudentResult],
                   not_graded: list[str] = (), stopped_by: int | None = None) -> None:
    """``<assignment>.csv`` (a row per student; those not graded yet have no score) and
    ``<assignment>.json`` (``not_graded`` and ``stopped_by`` say whether the run finished)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["student", "score", "max_score", "problems"])
    for r in results:
        w.writerow([r.student, _num(r.score), _num(r.max_score), "; ".join(_problems(r))])
    why = f"not graded: the run was stopped by {_signal_name(stopped_by)}" if stopped_by else "not graded"
    for s in not_graded:
        w.writerow([s, "", "", f"{why}; run the command again to grade it"])
    _atomic_write(out_dir / f"{assignment}.csv", buf.getvalue())
    _atomic_write(out_dir / f"{assignment}.json", json.dumps(
        {"assignment": assignment, "students": [r.as_dict() for r in results],
         "failures_by_kind": dict(failures_by_kind(results)), "not_graded": list(not_graded),
         "stopped_by": _signal_name(stopped_by) if stopped_by else None}, indent=2))
    from .class_report import write_assignment_report

    try:  # what the class gets wrong: <assignment>/report.html and .json
        write_assignment_report(out_dir, assignment)
    except Exception as exc:  # the report is an extra: never worth the class's results
        print(f"attnlib grade-class: warning: the class report was not written: {type(exc).__name__}: {exc}",
              file=sys.stderr)


def main(assignment: str, root: str = ".", **options: Any) -> int:
    """The ``attnlib grade-class`` command: 0 when the class was graded (whatever the scores),
    2 when it could not be, 128 + the signal's number when a signal stopped it."""
    out = Path(root).resolve() / options.get("out", DEFAULT_OUT)
    try:
        results = grade_class(assignment, root=root, **options)
    except ClassGradingError as exc:
        print(f"attnlib grade-class: cannot grade: {exc}", file=sys.stderr)
        return 2
    except GradingInterrupted as exc:
        if exc.results:
            print(format_summary(exc.results))
        print(f"attnlib grade-class: stopped by {_signal_name(exc.signum)}: {_n_students(len(exc.results))} "
              f"finished and kept, {len(exc.not_graded)} not graded ({', '.join(exc.not_graded[:5])}"
              f"{', ...' if len(exc.not_graded) > 5 else ''}). Class table so far: {out}/{assignment}.csv. "
              "Run the same command again to grade the others.", file=sys.stderr)
        return 128 + exc.signum
    print(format_summary(results))
    print(f"results: {out}/<student>/{assignment}/result.json and grade.log; class table: {out}/{assignment}.csv; "
          f"what the class gets wrong: {out}/{assignment}/report.html")
    if options.get("gradebook"):
        print("gradebook updated: `nbgrader generate_feedback` and `nbgrader export` work as usual")
    return 0
