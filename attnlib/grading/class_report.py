"""What the class gets wrong: a page per assignment, and one for the course, made from the
class summaries that ``attnlib grade-class`` writes (:mod:`attnlib.grading.classroom`).

From ``<out>/<assignment>.json`` (``<out>`` is ``graded/`` by default):

* :func:`assignment_report` gathers, as a JSON-able dict, the number of learners (graded,
  not graded yet, entries that cannot be read), the distribution of scores (each learner's
  score, mean, median, quartiles), each item's pass rate, the named mistakes ranked by how
  many learners made them (with the explanation and the book section that teaches each),
  and the kinds of failure (:func:`attnlib.grading.summary.failure_kind`);
* :func:`write_assignment_report` writes it as ``<out>/<assignment>/report.json`` and a
  page, ``<out>/<assignment>/report.html`` (:mod:`attnlib.grading.class_report_page`);
* :func:`write_course_report` does the same for every assignment graded so far and writes
  ``<out>/report.html`` / ``report.json``: each chapter's mean score, pass rate and most
  common mistakes, and each learner's scores and named mistakes across the course.

A mistake is named by the grader's feedback (``Looks like <mistake>: <explanation> See
<url>.``, then ``[<exercise>, case '...']``): the name is matched against the catalogued
mistakes of that exercise (``EXERCISES[id].mistakes``), then of every exercise; a name
the catalogue no longer holds (results of an older grader) is still counted, without an
explanation. Every file is written atomically; the pages are self-contained (inline CSS
and figures, no script, nothing loaded from anywhere) and escape everything that comes
from a learner (folder names, feedback, file names).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from .summary import _num, failure_kind

__all__ = ["REPORT_FORMAT", "ReportError", "assignment_report", "course_report", "named_mistake",
           "write_assignment_report", "write_course_report"]

#: Format of report.json.
REPORT_FORMAT = 1
#: The file names of the reports, in ``<out>/<assignment>/`` and in ``<out>/``.
REPORT_HTML, REPORT_JSON = "report.html", "report.json"
#: Kinds of failure (:func:`failure_kind`) that mean the learner did not write the code.
NOT_ATTEMPTED = frozenset({"not implemented", "not defined", "missing notebook", "unreadable notebook"})


class ReportError(ValueError):
    """A report cannot be made: the class summary is missing, is not JSON, or is not what
    ``attnlib grade-class`` writes."""


class _Malformed(Exception):
    """One learner's entry in a class summary that cannot be read (reported, not fatal)."""


# --------------------------------------------------------------------------- named mistakes

_LOOKS_LIKE = "Looks like "
#: ``[softmax, case 'random logits']``, ``[softmax, hidden case '...']`` or ``[softmax]``.
_CASE_LINE = re.compile(r"^\[(?P<exercise>[^\[\]',]+?)(?:, (?:hidden )?case '.*')?\]$")


def _registry() -> Mapping[str, Any]:
    from . import EXERCISES  # torch and every chapter's exercises: only when a report is made

    return EXERCISES


def _section_link(section: str) -> str | None:
    """The absolute address of a book section, ``None`` unless it is an http(s) address."""
    from .site import section_url

    url = section_url(section) if section else ""
    return url if urlparse(url).scheme in ("http", "https") else None


def _feedback_exercise(feedback: str) -> str | None:
    """The exercise named by the feedback's last ``[<exercise>, case '...']`` line."""
    found = None
    for line in feedback.splitlines():
        m = _CASE_LINE.match(line.strip())
        if m:
            found = m.group("exercise").strip()
    return found


def named_mistake(feedback: str, registry: Mapping[str, Any] | None = None) -> dict | None:
    """The catalogued mistake a failed item's feedback names, or ``None`` when it names none.

    Only feedback whose first line starts with ``Looks like`` (as the grader writes it) names
    a mistake: the text a learner's code prints or raises comes later in a message, never
    first. The name is the longest catalogued name of the feedback's exercise followed by
    ``:``; else of any exercise (the one whose section the feedback links to first); else
    the text up to the first ``": "``, with ``known`` false and no explanation.
    Returns ``{"exercise", "mistake", "explanation", "section_url", "known"}``.
    """
    text = feedback.strip()
    if not text.startswith(_LOOKS_LIKE):
        return None
    rest = text.splitlines()[0][len(_LOOKS_LIKE):]
    registry = _registry() if registry is None else registry
    exercise = _feedback_exercise(text)
    own = registry.get(exercise) if exercise else None

    def fits(m: Any) -> bool:
        return rest.startswith(f"{m.name}:")

    candidates = [(exercise, m) for m in getattr(own, "mistakes", ()) if fits(m)]
    if not candidates:
        candidates = [(ex_id, m) for ex_id, ex in registry.items() for m in ex.mistakes if fits(m)]
        candidates.sort(key=lambda c: -int((_section_link(c[1].section) or "\0") in text))
    if candidates:
        longest = max(len(m.name) for _, m in candidates)
        ex_id, m = next(c for c in candidates if len(c[1].name) == longest)
        return {"exercise": exercise if own is not None else ex_id, "mistake": m.name,
                "explanation": m.explanation, "section_url": _section_link(m.section), "known": True}
    name = rest.split(": ", 1)[0].strip() if ": " in rest else rest.strip()
    return {"exercise": exercise, "mistake": name, "explanation": None, "section_url": None, "known": False}


# --------------------------------------------------------------------------- reading a class summary


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _safe_assignment(assignment: str) -> str:
    if (not isinstance(assignment, str) or not assignment or assignment in (".", "..")
            or "/" in assignment or "\\" in assignment or "\0" in assignment):
        raise ReportError(f"expected an assignment's name (a folder of submitted/<student>/), got {assignment!r}")
    return assignment


def _load_summary(path: Path, assignment: str) -> dict:
    """The class summary at ``path``, checked: a dict with ``students`` a list and, when it
    names an assignment, ``assignment``; :class:`ReportError` otherwise."""
    what = (f"the class summary {path}, written by `attnlib grade-class {assignment}` "
            "(a JSON object with a list of students)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"expected {what}: there is no such file (grade the class first)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"expected {what}: it cannot be read ({exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ReportError(f"expected {what}: it is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("students"), list):
        raise ReportError(f"expected {what}: it has no list \"students\"")
    if data.get("assignment", assignment) != assignment:
        raise ReportError(f"expected {what}: it is the summary of {data.get('assignment')!r}")
    return data


def _read_item(raw: Any, where: str) -> dict:
    if not isinstance(raw, dict):
        raise _Malformed(f"{where} is not an object")
    if not isinstance(raw.get("id"), str) or not raw["id"]:
        raise _Malformed(f"{where} has no item id")
    if not isinstance(raw.get("passed"), bool):
        raise _Malformed(f"{where} ({raw['id']}): \"passed\" is not true or false")
    for key in ("points", "max_points"):
        if not _is_number(raw.get(key, 0)):
            raise _Malformed(f"{where} ({raw['id']}): {key!r} is not a number")
    feedback = raw.get("feedback", "")
    return {"id": raw["id"], "passed": raw["passed"], "points": raw.get("points", 0),
            "max_points": raw.get("max_points", 0), "feedback": feedback if isinstance(feedback, str) else str(feedback)}


def _read_entry(raw: Any, index: int) -> dict:
    """One learner's entry of ``students``, checked and normalised; :class:`_Malformed` says
    what is wrong with it."""
    where = f"students[{index}]"
    if not isinstance(raw, dict):
        raise _Malformed(f"{where} is not an object")
    if not isinstance(raw.get("student"), str) or not raw["student"]:
        raise _Malformed(f"{where} has no student name")
    for key in ("score", "max_score"):
        if not _is_number(raw.get(key)):
            raise _Malformed(f"{where}: {key!r} is not a number")
    notebooks = raw.get("notebooks", [])
    if not isinstance(notebooks, list):
        raise _Malformed(f"{where}: \"notebooks\" is not a list")
    out = []
    for n, nb in enumerate(notebooks):
        nb_where = f"{where}.notebooks[{n}]"
        if not isinstance(nb, dict) or not isinstance(nb.get("name"), str):
            raise _Malformed(f"{nb_where} is not a notebook's result")
        items = nb.get("items", [])
        if not isinstance(items, list):
            raise _Malformed(f"{nb_where}: \"items\" is not a list")
        message = nb.get("message", "")
        out.append({"name": nb["name"], "file": nb.get("file") if isinstance(nb.get("file"), str) else None,
                    "status": str(nb.get("status", "")), "message": message if isinstance(message, str) else "",
                    "items": [_read_item(it, f"{nb_where}.items[{i}]") for i, it in enumerate(items)]})
    notes = raw.get("notes", [])
    return {"student": raw["student"], "score": raw["score"], "max_score": raw["max_score"], "notebooks": out,
            "notes": [str(x) for x in notes] if isinstance(notes, list) else [str(notes)]}


# --------------------------------------------------------------------------- one assignment


def _quantiles(values: list[float]) -> dict:
    """Mean, median and quartiles (linear interpolation, as ``numpy.percentile``), min, max."""
    if not values:
        return {k: None for k in ("mean", "median", "q1", "q3", "min", "max")}
    import numpy as np

    a = np.asarray(values, dtype=float)
    q1, median, q3 = np.percentile(a, [25, 50, 75])
    return {k: _num(round(float(v), 4)) for k, v in
            (("mean", a.mean()), ("median", median), ("q1", q1), ("q3", q3), ("min", a.min()), ("max", a.max()))}


def _rate(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def _item_key(nb: dict, item: dict, several: bool) -> str:
    return f"{nb['name']}: {item['id']}" if several else item["id"]


def assignment_report(out_dir: str | os.PathLike, assignment: str) -> dict:
    """What the class got right and wrong on ``assignment``, from ``<out_dir>/<assignment>.json``.

    Raises :class:`ReportError` when that file is missing or is not a class summary; an
    entry of a learner that cannot be read is listed under ``malformed`` and left out of the
    figures. The keys: ``students`` (entries, plus those not graded yet), ``graded``,
    ``not_graded`` (names), ``malformed``, ``scores`` (each learner's and their statistics),
    ``items`` (max points, learners, attempted, passed, pass rate), ``mistakes`` (ranked by
    learners), ``failure_kinds`` (failed items per kind), ``notebooks_not_graded`` and
    ``learners`` (score, items passed, named mistakes and other failures of each).
    """
    assignment = _safe_assignment(assignment)
    source = Path(out_dir) / f"{assignment}.json"
    summary = _load_summary(source, assignment)
    registry = _registry()
    order = {ex_id: n for n, ex_id in enumerate(registry)}
    not_graded = [str(s) for s in summary.get("not_graded") or [] if isinstance(s, (str, int))]
    entries, malformed, seen = [], [], set()
    for index, raw in enumerate(summary["students"]):
        try:
            entry = _read_entry(raw, index)
            if entry["student"] in seen:
                raise _Malformed(f"students[{index}]: {entry['student']!r} is listed twice")
        except _Malformed as exc:
            name = raw.get("student") if isinstance(raw, dict) and isinstance(raw.get("student"), str) else None
            malformed.append({"entry": index, "student": name, "problem": str(exc)})
            continue
        seen.add(entry["student"])
        entries.append(entry)

    items: dict[str, dict] = {}
    mistakes: dict[tuple, dict] = {}
    kinds: dict[str, dict] = {}
    notebooks_not_graded: dict[str, dict] = {}
    learners = []
    for e in entries:
        several = len(e["notebooks"]) > 1
        mine, failures, problems = [], [], list(e["notes"])
        passed_here = total_here = 0
        for nb in e["notebooks"]:
            if nb["status"] != "graded":
                status = "missing" if nb["status"] == "missing" else "not gradable"
                row = notebooks_not_graded.setdefault(status, {"status": status, "notebooks": 0, "learners": []})
                row["notebooks"] += 1
                if e["student"] not in row["learners"]:
                    row["learners"].append(e["student"])
                problems.append(nb["message"] or f"{nb['name']}: {nb['status'] or 'not graded'}")
            for item in nb["items"]:
                key = _item_key(nb, item, several)
                row = items.setdefault(key, {"item": key, "notebook": nb["name"], "id": item["id"],
                                             "max_points": item["max_points"], "learners": 0, "attempted": 0,
                                             "passed": 0})
                row["max_points"] = max(row["max_points"], item["max_points"])
                row["learners"] += 1
                total_here += 1
                if item["passed"]:
                    row["passed"] += 1
                    row["attempted"] += 1
                    passed_here += 1
                    continue
                kind = failure_kind(item["feedback"])
                if nb["status"] == "graded" and kind not in NOT_ATTEMPTED:
                    row["attempted"] += 1
                k = kinds.setdefault(kind, {"kind": kind, "items": 0, "learners": []})
                k["items"] += 1
                if e["student"] not in k["learners"]:
                    k["learners"].append(e["student"])
                found = named_mistake(item["feedback"], registry) if nb["status"] == "graded" else None
                if found is None:
                    if nb["status"] == "graded":
                        failures.append({"item": key, "kind": kind})
                    continue
                mkey = (found["exercise"], found["mistake"])
                m = mistakes.setdefault(mkey, dict(found, learners=0, who=[], items=0))
                m["items"] += 1
                if e["student"] not in m["who"]:
                    m["who"].append(e["student"])
                    m["learners"] += 1
                if not any((x["exercise"], x["mistake"]) == mkey for x in mine):
                    mine.append({"exercise": found["exercise"], "mistake": found["mistake"], "item": key})
        learners.append({"student": e["student"], "score": e["score"], "max_score": e["max_score"],
                         "items_passed": passed_here, "items": total_here, "mistakes": mine,
                         "failures": failures, "problems": problems})

    def mistake_rank(m: dict) -> tuple:
        ex = registry.get(m["exercise"]) if m["exercise"] else None
        names = [x.name for x in getattr(ex, "mistakes", ())]
        return (-m["learners"], -m["items"], order.get(m["exercise"], len(order)),
                names.index(m["mistake"]) if m["mistake"] in names else len(names), m["mistake"])

    for row in items.values():
        row["pass_rate"] = _rate(row["passed"], row["learners"])
        row["pass_rate_of_attempted"] = _rate(row["passed"], row["attempted"])
    scores = [{"student": e["student"], "score": e["score"], "max_score": e["max_score"]} for e in entries]
    max_score = max((e["max_score"] for e in entries), default=0)
    stopped = summary.get("stopped_by")
    return {
        "format": REPORT_FORMAT,
        "assignment": assignment,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(source),
        "stopped_by": stopped if isinstance(stopped, str) else None,
        "students": len(entries) + len(not_graded) + len(malformed),
        "graded": len(entries),
        "not_graded": not_graded,
        "malformed": malformed,
        "scores": {"max_score": _num(max_score), "students": scores,
                   **_quantiles([float(e["score"]) for e in entries])},
        "items": list(items.values()),
        "mistakes": sorted(mistakes.values(), key=mistake_rank),
        "failure_kinds": sorted(kinds.values(), key=lambda k: (-k["items"], k["kind"])),
        "notebooks_not_graded": sorted(notebooks_not_graded.values(), key=lambda r: r["status"]),
        "learners": learners,
    }


# --------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary file beside it and ``os.replace``: a reader sees the
    old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_pair(folder: Path, report: dict, html: str) -> Path:
    _atomic_write(folder / REPORT_JSON, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(folder / REPORT_HTML, html)
    return folder / REPORT_HTML


def write_assignment_report(out_dir: str | os.PathLike, assignment: str) -> Path:
    """Write ``<out_dir>/<assignment>/report.json`` (:func:`assignment_report`) and
    ``report.html`` (its page), each atomically; returns the page's path."""
    from .class_report_page import assignment_page

    report = assignment_report(out_dir, assignment)
    return _write_pair(Path(out_dir) / assignment, report, assignment_page(report))


# --------------------------------------------------------------------------- the course


def _summaries(out_dir: Path) -> tuple[list[str], list[dict]]:
    """The assignments with a class summary in ``out_dir`` (``<assignment>.json`` naming that
    assignment, with a list of students) and the JSON files left out, each with why."""
    found, skipped = [], []
    for path in sorted(out_dir.glob("*.json")):
        if path.name == REPORT_JSON or path.name.startswith("."):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            skipped.append({"file": path.name, "why": f"not readable JSON ({type(exc).__name__})"})
            continue
        if not isinstance(data, dict) or data.get("assignment") != path.stem:
            skipped.append({"file": path.name, "why": "not a class summary (no \"assignment\" of that name)"})
        elif not isinstance(data.get("students"), list):
            skipped.append({"file": path.name, "why": "a class summary without a list of students"})
        else:
            found.append(path.stem)
    return found, skipped


def course_report(out_dir: str | os.PathLike, reports: dict[str, dict] | None = None) -> dict:
    """Every assignment graded so far, from the class summaries in ``out_dir``: per chapter the
    learners graded, mean score, pass rate (passed items over items graded), top three
    mistakes and the relative address of its page; per learner the score of each assignment
    (``None`` where they have none), the total and their named mistakes. ``reports`` are
    assignment reports already made (:func:`assignment_report`), by assignment. Raises
    :class:`ReportError` when ``out_dir`` holds no class summary."""
    out = Path(out_dir)
    names, skipped = _summaries(out) if out.is_dir() else ([], [])
    if not names:
        raise ReportError(f"expected class summaries <assignment>.json written by `attnlib grade-class` "
                          f"in {out}: there are none")
    reports = dict(reports or {})
    chapters, people = [], {}
    for a in names:
        r = reports.get(a)
        if r is None:
            try:
                r = reports[a] = assignment_report(out, a)
            except ReportError as exc:
                skipped.append({"file": f"{a}.json", "why": str(exc)})
                continue
        n_items = sum(i["learners"] for i in r["items"])
        passed = sum(i["passed"] for i in r["items"])
        mean, top = r["scores"]["mean"], r["scores"]["max_score"]
        chapters.append({"assignment": a, "report": f"{a}/{REPORT_HTML}", "students": r["students"],
                         "graded": r["graded"], "max_score": top, "mean": mean,
                         "mean_fraction": _rate(mean, top) if mean is not None else None,
                         "pass_rate": _rate(passed, n_items), "not_graded": len(r["not_graded"]),
                         "malformed": len(r["malformed"]),
                         "top_mistakes": [{k: m[k] for k in ("exercise", "mistake", "learners", "section_url")}
                                          for m in r["mistakes"][:3]]})
        for person in r["learners"]:
            p = people.setdefault(person["student"], {"student": person["student"], "scores": {}, "mistakes": []})
            p["scores"][a] = person["score"]
            p["mistakes"] += [{"assignment": a, "exercise": m["exercise"], "mistake": m["mistake"]}
                              for m in person["mistakes"]]
    max_total = sum(c["max_score"] or 0 for c in chapters)
    learners = []
    for name in sorted(people):
        p = people[name]
        p["scores"] = {c["assignment"]: p["scores"].get(c["assignment"]) for c in chapters}
        p["total"] = _num(sum(s for s in p["scores"].values() if s is not None))
        p["max_total"] = _num(max_total)
        learners.append(p)
    return {"format": REPORT_FORMAT, "out_dir": str(out),
            "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "assignments": chapters, "learners": learners, "skipped": skipped}


def write_course_report(out_dir: str | os.PathLike) -> Path:
    """Write every assignment's report (:func:`write_assignment_report`) and the course's,
    ``<out_dir>/report.json`` and ``<out_dir>/report.html``; returns the course page's path.
    A summary that cannot be read is listed on the course page, not fatal."""
    from .class_report_page import assignment_page, course_page

    out = Path(out_dir)
    names, _ = _summaries(out) if out.is_dir() else ([], [])
    reports = {}
    for a in names:
        try:
            reports[a] = assignment_report(out, a)
        except ReportError:
            continue  # course_report lists it
        _write_pair(out / a, reports[a], assignment_page(reports[a]))
    course = course_report(out, reports)
    return _write_pair(out, course, course_page(course))
