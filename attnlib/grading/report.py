"""The report of one graded notebook: every item's points, whether it passed and why, the
notes on the notebook as a whole, the child's output and what the sandbox enforced; printed
as a table (an item's message, and below it the case that failed) or as JSON, each item's
feedback whole (``attnlib grade [--json]``)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass, field

from .notebook import Item, as_number

__all__ = ["Report", "feedback_lines", "format_table", "print_report"]


@dataclass
class Report:
    """The result of :func:`attnlib.grading.runner.grade_notebook`.

    ``notes`` are about the notebook as a whole (cells that failed, test cells that differ
    from the source, what the sandbox enforced); ``log`` is the child processes' combined
    output (bounded: the first and last bytes, :data:`attnlib.grading.supervisor.LOG_LIMIT`
    in all), for a per-learner log; ``sandbox`` what the sandbox enforced (mode, network,
    hidden paths, limits).
    """

    notebook: str
    items: list[Item]
    notes: list[str] = field(default_factory=list)
    log: str = ""
    sandbox: dict = field(default_factory=dict)

    @property
    def score(self) -> float:
        return sum(i.points for i in self.items)

    @property
    def max_score(self) -> float:
        return sum(i.max_points for i in self.items)

    def as_dict(self) -> dict:
        return {"notebook": self.notebook, "score": as_number(self.score), "max_score": as_number(self.max_score),
                "items": [{"id": i.id, "points": as_number(i.points), "max_points": as_number(i.max_points),
                           "passed": i.passed, "feedback": i.feedback} for i in self.items]}


#: The lines of an item's feedback that name where it failed or add a note:
#: ``[softmax, case 'random logits (3, 5), dim=-1']``, ``[softmax]``, ``(note: ...)``.
_DETAIL = re.compile(r"^\[.*\]$|^\(note: .*\)$")


def feedback_lines(feedback: str) -> list[str]:
    """An item's feedback as table lines: the message on one line (its own line breaks folded),
    then each detail line (the failing case, notes) on a line of its own."""
    lines = [ln.strip() for ln in feedback.splitlines() if ln.strip()]
    message = " ".join(" ".join(ln for ln in lines if not _DETAIL.match(ln)).split())
    details = [ln for ln in lines if _DETAIL.match(ln)]
    return ([message] if message else []) + details


def format_table(report: Report, width: int | None = None) -> str:
    """The report as a table: an item's message on its row, the case that failed (and any
    note) on the rows below it, each cut to the width of a terminal, whole when the output
    goes to a file or a pipe (CI logs keep every word)."""
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 10_000
    id_w = max([len("item")] + [len(i.id) for i in report.items])
    pts = [f"{as_number(i.points)}/{as_number(i.max_points)}" for i in report.items]
    pts_w = max([len("points")] + [len(p) for p in pts])
    head = f"{'item':<{id_w}}  {'points':>{pts_w}}  {'passed':<6}  feedback"
    fb_w = max(20, width - (id_w + pts_w + 6 + 8))
    indent = " " * (id_w + pts_w + 6 + 6)
    rows = []
    for item, p in zip(report.items, pts):
        lines = [ln if len(ln) <= fb_w else ln[: fb_w - 4].rstrip() + " ..." for ln in feedback_lines(item.feedback or "")]
        rows.append(f"{item.id:<{id_w}}  {p:>{pts_w}}  {'yes' if item.passed else 'no':<6}  "
                    f"{lines[0] if lines else ''}".rstrip())
        rows += [indent + ln for ln in lines[1:]]
    rule = "-" * min(width, max(len(row) for row in [head, *rows]))
    lines = [f"notebook: {report.notebook}", head, rule, *rows]
    lines.append(f"total: {as_number(report.score)}/{as_number(report.max_score)}")
    return "\n".join(lines)


def print_report(report: Report, as_json: bool = False) -> None:
    """What ``attnlib grade`` prints: the table and the notes on stdout, or the JSON on stdout
    and the notes on stderr."""
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        for note in report.notes:
            print(f"note: {note}", file=sys.stderr)
    else:
        print(format_table(report))
        for note in report.notes:
            print(f"note: {note}")
