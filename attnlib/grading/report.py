"""The report of one graded notebook: every item's points, whether it passed and why, the
notes on the notebook as a whole, the child's output and what the sandbox enforced; printed
as a table or as JSON (``attnlib grade [--json]``)."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from dataclasses import dataclass, field

from .notebook import Item, as_number

__all__ = ["Report", "format_table", "print_report"]


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


def format_table(report: Report, width: int | None = None) -> str:
    """The report as a table, feedback on one line: cut to the width of a terminal, whole when
    the output goes to a file or a pipe (CI logs keep every word)."""
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 10_000
    id_w = max([len("item")] + [len(i.id) for i in report.items])
    pts = [f"{as_number(i.points)}/{as_number(i.max_points)}" for i in report.items]
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
