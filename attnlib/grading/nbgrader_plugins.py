"""nbgrader plugins of the course, named in ``nbgrader_config.py`` (only nbgrader imports this
module; it needs nbgrader installed).

* :class:`HideHiddenTests` (``nbgrader generate_feedback``): the feedback page shows each test
  cell as the learner received it, without its hidden-tests block, and an error's traceback
  without the block's lines. The autograded notebook keeps them (the instructor's copy).
* :class:`OverwriteCells` (``nbgrader autograde``): nbgrader's own, silent about the test cells
  that are exactly as released. nbgrader records a test cell in the gradebook (its source and
  checksum) *before* removing the hidden tests from it, so every released test cell with
  hidden tests "changes" in its eyes and ``autograde`` warns ``Attribute 'checksum' for cell
  ... has changed!`` for each of them, for every student, while putting the hidden tests back
  (which is how hidden tests run at all). Here a cell that is the recorded one without its
  hidden-tests block gets the recorded source back first, so the warning is left for cells a
  learner really edited.
* :data:`TEMPLATES`: the folder of the ``attnlib_feedback`` HTML template (nbgrader's feedback
  page without MathJax from a CDN: the page loads nothing from the network).
"""

from __future__ import annotations

import re
from pathlib import Path

from nbconvert.preprocessors import Preprocessor
from nbgrader.api import MissingEntry
from nbgrader.preprocessors import ClearHiddenTests
from traitlets import default
from nbgrader.preprocessors import OverwriteCells as _NbgraderOverwriteCells

__all__ = ["HideHiddenTests", "OverwriteCells", "TEMPLATES", "hidden_lines", "strip_hidden", "strip_traceback"]

#: The folder holding the ``attnlib_feedback`` template (``HTMLExporter.extra_template_basedirs``).
TEMPLATES = Path(__file__).with_name("templates")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: The first line of a traceback frame that quotes a notebook cell (IPython 7 and 8).
_CELL_FRAME = re.compile(r"^\s*(Cell In ?\[|Input In ?\[|<ipython-input-)")
#: A quoted source line: ``      3 code`` or ``----> 4 code``.
_NUMBERED = re.compile(r"^\s*(?:-*>\s*)?(\d+)(?:\s|$)")


def _delimiters(config) -> tuple[str, str]:
    """``ClearHiddenTests``'s markers as configured (read from the config, not by making a
    ``ClearHiddenTests``, which would warn about other preprocessors' options)."""
    section = config.get("ClearHiddenTests") or {}
    traits = ClearHiddenTests.class_traits()
    return tuple(str(section.get(name, traits[name].default_value))
                 for name in ("begin_test_delimeter", "end_test_delimeter"))


def strip_hidden(source: str, begin: str, end: str) -> str:
    """``source`` without its hidden-tests blocks, as ``ClearHiddenTests`` releases it."""
    hidden = hidden_lines(source, begin, end)
    return "\n".join(line for n, line in enumerate(source.split("\n"), start=1) if n not in hidden)


def hidden_lines(source: str, begin: str, end: str) -> set[int]:
    """The (1-based) numbers of the lines of ``source`` in a hidden-tests block, markers
    included, found as nbgrader's ``ClearHiddenTests`` finds them (a line containing a marker)."""
    lines, inside = set(), False
    for n, line in enumerate(source.split("\n"), start=1):
        if begin in line:
            inside = True
        if inside:
            lines.add(n)
        if end in line:
            inside = False
    return lines


def strip_traceback(frames: list[str], hidden: set[int]) -> list[str]:
    """An error output's traceback without the hidden lines IPython quotes from the cell
    (each run of them becomes one ``(hidden tests)`` line); frames of other files unchanged."""
    out = []
    for frame in frames:
        lines = frame.split("\n")
        first = next((_ANSI.sub("", ln) for ln in lines if _ANSI.sub("", ln).strip()), "")
        if not _CELL_FRAME.match(first):
            out.append(frame)
            continue
        kept: list[str] = []
        for line in lines:
            m = _NUMBERED.match(_ANSI.sub("", line))
            if m and int(m.group(1)) in hidden:
                if not kept or kept[-1] != "      (hidden tests)":
                    kept.append("      (hidden tests)")
                continue
            kept.append(line)
        out.append("\n".join(kept))
    return out


class HideHiddenTests(Preprocessor):
    """For ``GenerateFeedback.preprocessors``: every code cell's hidden-tests block removed
    from its source (as ``nbgrader generate_assignment`` removes it on release), and from the
    tracebacks of its errors. Markers: ``ClearHiddenTests``'s configured delimiters."""

    @default("enabled")
    def _enabled_default(self) -> bool:  # nbconvert's preprocessors are off unless enabled
        return True

    def preprocess_cell(self, cell, resources, index):
        begin, end = _delimiters(self.config)
        if cell.get("cell_type") != "code" or begin not in cell.get("source", ""):
            return cell, resources
        hidden = hidden_lines(cell.source, begin, end)
        cell.source = strip_hidden(cell.source, begin, end)
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error" and isinstance(output.get("traceback"), list):
                output["traceback"] = strip_traceback(output["traceback"], hidden)
        return cell, resources


class OverwriteCells(_NbgraderOverwriteCells):
    """nbgrader's ``OverwriteCells`` (configured as ``OverwriteCells``), without the false
    "checksum has changed" warning for test cells exactly as released (see the module's
    docstring). A cell that differs in any other way is reported by nbgrader as before."""

    def preprocess_cell(self, cell, resources, cell_index):
        grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if grade_id is not None:
            try:
                recorded = self.gradebook.find_source_cell(grade_id, self.notebook_id, self.assignment_id)
            except MissingEntry:
                recorded = None
            if (recorded is not None and recorded.locked and recorded.cell_type == cell.cell_type
                    and recorded.source != cell.source):
                begin, end = _delimiters(self.config)
                if begin in recorded.source and strip_hidden(recorded.source, begin, end) == cell.source:
                    self.log.debug("Putting the hidden tests back into cell %s", grade_id)
                    cell.source = recorded.source
        return super().preprocess_cell(cell, resources, cell_index)
