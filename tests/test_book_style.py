"""The book's pages read as a text, not a lab notebook: checks on the chapter sources.

What a reader sees of a code cell must teach. These checks run on the MyST sources
(``book/*.md``, read with jupytext) and on the ``attnlib`` objects the pages include, without
building anything; the built site has its own checks in ``tests/site`` (formulas, figure
scale, nothing cut, accessibility, numbering).

* A shown code cell (one not tagged ``remove-input``, ``remove-cell``, ``hide-input`` or
  ``hide-cell``) is at most ``MAX_SHOWN_LINES`` lines and holds no bookkeeping: no imports,
  no ``glue``.
* Every line of code a page can show, folded or not, fits ``MAX_COLUMNS`` columns: the code
  cells, and the ``literalinclude``d objects of ``attnlib``.
* A ``literalinclude`` shows the idea, not argument validation: no ``raise`` and no
  ``check_*`` call in an included object (validation lives in the public wrapper).
* No TeX escape inside ``\\text{...}`` (MathJax shows ``\\_`` there as a backslash).
* Figures are drawn for the text column: at most ``MAX_FIGURE_INCHES`` wide, no text under
  ``MIN_FONT_POINTS`` points.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(p for p in (ROOT / "book").glob("*.md") if p.name != "AUTHORING.md")
CHAPTERS = [p for p in PAGES if re.match(r"\d\d_", p.name)]
HIDDEN = {"remove-input", "remove-cell", "hide-input", "hide-cell"}
MAX_SHOWN_LINES = 25
MAX_COLUMNS = 88
MAX_FIGURE_INCHES = 7.5
MIN_FONT_POINTS = 9
INCLUDE = re.compile(r"^```\{literalinclude\}\s+(\S+)\s*\n((?::[\w-]+:.*\n)*)```", re.M)


def code_cells(page: Path) -> list[tuple[int, set[str], str]]:
    """(index, tags, source) of every code cell of a page."""
    nb = jupytext.read(page)
    return [(i, set(c.metadata.get("tags", [])), c.source)
            for i, c in enumerate(nb.cells) if c.cell_type == "code"]


def shown(page: Path) -> list[tuple[int, str]]:
    return [(i, src) for i, tags, src in code_cells(page) if not tags & HIDDEN]


def first_line(src: str) -> str:
    return src.strip().splitlines()[0][:60] if src.strip() else "(empty)"


def included_objects() -> list[tuple[str, Path, str]]:
    """(page name, module path, object name) of every literalinclude with :pyobject:."""
    found = []
    for page in PAGES:
        for match in INCLUDE.finditer(page.read_text()):
            options = dict(re.findall(r"^:([\w-]+):\s*(.*)$", match.group(2), re.M))
            if "pyobject" in options:
                found.append((page.name, (page.parent / match.group(1)).resolve(), options["pyobject"]))
    return found


def object_source(module: Path, dotted: str) -> str:
    """The source of a (possibly nested: Class.method) object, as Sphinx's :pyobject: finds it."""
    tree = ast.parse(module.read_text())
    nodes = tree.body
    node = None
    for part in dotted.split("."):
        node = next(n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
        nodes = node.body
    lines = module.read_text().splitlines()
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return "\n".join(lines[start - 1:node.end_lineno])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_shown_code_cells_are_short(page):
    long = [(i, len(src.splitlines()), first_line(src)) for i, src in shown(page)
            if len(src.splitlines()) > MAX_SHOWN_LINES]
    assert not long, (f"{page.name}: shown code cells over {MAX_SHOWN_LINES} lines (cell, lines, start) "
                      f"{long}: fold the bookkeeping (tags: [hide-input] or [remove-input])")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_shown_code_cells_hold_no_bookkeeping(page):
    bookkeeping = re.compile(r"^\s*(import\s|from\s+\S+\s+import\s)|\bglue\(", re.M)
    bad = [(i, bookkeeping.search(src).group(0).strip()) for i, src in shown(page) if bookkeeping.search(src)]
    assert not bad, (f"{page.name}: shown cells with imports or glue (cell, what) {bad}: "
                     "move them to a hidden cell (tags: [remove-input])")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_code_fits_the_column(page):
    wide = [(i, n + 1, len(line)) for i, _, src in code_cells(page)
            for n, line in enumerate(src.splitlines()) if len(line) > MAX_COLUMNS]
    assert not wide, f"{page.name}: code lines over {MAX_COLUMNS} columns (cell, line, length) {wide}"


def test_every_page_is_checked():
    assert len(CHAPTERS) == len(list((ROOT / "notebooks").glob("*/*.ipynb")))
    assert all(shown(p) or p.stem in {"bibliography", "exercises", "intro"} for p in PAGES)


def test_included_objects_exist_and_fit_the_column():
    found = included_objects()
    assert len(found) >= 20, f"only {len(found)} literalinclude :pyobject: found: is the pattern stale?"
    wide = []
    for page, module, name in found:
        source = object_source(module, name)
        wide += [f"{page}: {module.name}:{name} line {n + 1} ({len(line)} columns)"
                 for n, line in enumerate(source.splitlines()) if len(line) > MAX_COLUMNS]
    assert not wide, wide


def test_included_objects_show_the_idea_not_the_validation():
    validation = re.compile(r"^\s*raise\s|\bcheck_\w+\(|\b_check\w*\(", re.M)
    bad = []
    for page, module, name in included_objects():
        body = object_source(module, name)
        bad += [f"{page}: {module.name}:{name}: {m.group(0).strip()}" for m in validation.finditer(body)]
    assert not bad, ("literalincluded objects that show argument validation (move it into the "
                     f"public wrapper and include the core): {bad}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_no_tex_escapes_inside_text(page):
    bad = re.findall(r"\\text\{[^{}]*\\[^{}]*\}", page.read_text())
    assert not bad, f"{page.name}: MathJax shows these backslashes as they are: {bad[:5]}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_figures_are_drawn_for_the_column(page):
    too_wide, too_small = [], []
    for i, _, src in code_cells(page):
        too_wide += [(i, float(w)) for w in re.findall(r"figsize=\(\s*([\d.]+)", src)
                     if float(w) > MAX_FIGURE_INCHES]
        too_small += [(i, float(s)) for s in
                      re.findall(r"\b(?:fontsize|labelsize|size)\s*=\s*([\d.]+)\b", src)
                      if float(s) < MIN_FONT_POINTS]
    assert not too_wide, (f"{page.name}: figures wider than {MAX_FIGURE_INCHES} in (cell, inches) "
                          f"{too_wide}: the column shows 672 px; stack the panels")
    assert not too_small, f"{page.name}: text under {MIN_FONT_POINTS} pt (cell, points) {too_small}"
