"""The class's results in words: each failed item's kind of failure, each student's problems,
and the table of scores and failures by kind printed at the end of ``attnlib grade-class``
(:mod:`attnlib.grading.classroom` grades the class and writes these into its class files)."""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .classroom import StudentResult


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------- failure kinds

_KINDS: list[tuple[str, re.Pattern]] = [(k, re.compile(p, re.I)) for k, p in [
    ("missing notebook", r"no notebook named|notebook is missing|was not submitted"),
    ("unreadable notebook", r"not a Jupyter notebook|not valid JSON|cannot grade"),
    ("time limit", r"timed out|did not finish within|time limit"),
    ("memory limit", r"memory limit|MemoryError|out of memory"),
    ("output limit", r"printed more than|output limit"),
    ("crash", r"signal|segmentation|killed|os\._exit|exit code|ended the process|crash|sys\.exit|SystemExit"),
    ("forbidden call", r"forbid|off limits|not allowed|built an? L x S|builds an? L x S"),
    ("not implemented", r"not implemented yet|NotImplementedError"),
    ("not defined", r"no object named"),
    ("named mistake", r"looks like|this is the mistake|known mistake|mistake:"),
    ("changed its input", r"changed its input"),
    ("wrong type", r"expected a (single |Python )?(torch\.Tensor|tuple|float|int)|return a (plain )?torch\.Tensor|subclass of torch\.Tensor"),
    ("wrong shape", r"shape"),
    ("wrong dtype", r"dtype"),
    ("wrong device", r"device"),
    ("not finite", r"NaN|inf\b|not finite|non-finite"),
    ("raised an error", r"raised \w+"),
    ("wrong values", r"differ|wrong value|mismatch"),
]]


def failure_kind(feedback: str) -> str:
    """A short category for a failed item's feedback, for the class summary."""
    first = feedback.strip().splitlines()[0] if feedback.strip() else ""
    for kind, pattern in _KINDS:
        if pattern.search(first):
            return kind
    for kind, pattern in _KINDS:  # the first line said nothing recognisable: look further
        if pattern.search(feedback):
            return kind
    return "other"


# --------------------------------------------------------------------------- the class's summary


def _problems(r: StudentResult) -> list[str]:
    """What went wrong for a student: the notes on their submission, each notebook not graded
    (missing, unreadable) and, for graded ones, the failed items with their kind of failure."""
    out = list(r.notes)
    several = len(r.notebooks) > 1
    for nb in r.notebooks:
        if nb.get("status") != "graded":
            out.append(nb.get("message", nb.get("status", "")))
            continue
        failed = [f"{i.get('id')} ({failure_kind(i.get('feedback', ''))})"
                  for i in nb.get("items", []) if not i.get("passed")]
        if failed:
            where = f" in {nb.get('name')}" if several else ""
            out.append(f"failed{where}: {', '.join(failed)}")
    return out


def failures_by_kind(results: list[StudentResult]) -> Counter:
    c: Counter = Counter()
    for r in results:
        for nb in r.notebooks:
            for item in nb.get("items", []):
                if not item.get("passed"):
                    c[failure_kind(item.get("feedback", ""))] += 1
    return c


def format_summary(results: list[StudentResult]) -> str:
    sw = max([len("student")] + [len(r.student) for r in results])
    lines = [f"{'student':<{sw}}  {'score':>9}  problems", "-" * (sw + 30)]
    for r in results:
        score = f"{_num(r.score)}/{_num(r.max_score)}"
        problems = "; ".join(_problems(r))
        lines.append(f"{r.student:<{sw}}  {score:>9}  {problems}".rstrip())
    n = len(results)
    kept = sum(r.skipped for r in results)
    scores = sorted(r.score for r in results)
    if n:
        lines.append(f"{n} students ({n - kept} graded now, {kept} kept from an earlier run); "
                     f"mean {sum(scores) / n:.2f}, median {scores[n // 2] if n % 2 else (scores[n // 2 - 1] + scores[n // 2]) / 2:g}"
                     f" of {_num(max(r.max_score for r in results))}")
    kinds = failures_by_kind(results)
    if kinds:
        lines.append("failed items by kind: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))
    return "\n".join(lines)
