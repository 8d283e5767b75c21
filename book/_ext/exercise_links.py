"""Links from the book's chapters to their graded exercise notebooks.

A chapter's ``## Exercise`` section holds one directive::

    ```{exercise-notebook} 04_multi_head
    ```

which renders, from the released notebook ``notebooks/04_multi_head/04_multi_head.ipynb``
and ``_config.yml``:

- a link to the notebook's page in the book (the notebook is a page of the "Exercises" part);
- the graded items and their points, read from the notebook's nbgrader grade cells with the
  grader's own reader (:func:`attnlib.grading.notebook.parse_items`, loaded alone: no torch,
  no grader), never typed by hand;
- a download button (the ``.ipynb``, copied into the site by Sphinx's download mechanism),
  an "Open in Colab" and a "Launch on Binder" button, built from ``repository.url`` and
  ``repository.branch`` of ``_config.yml`` (the only place the repository is named) and the
  ``launch_buttons`` hosts there.

Text given as the directive's content is shown after the buttons.

``{exercise-summary}`` (no argument) renders the table of every released notebook, its graded
items and points, with the total, for the book's Exercises page.

A missing notebook, a notebook not listed in ``_toc.yml``, a notebook without grade cells and
a repository URL that is not a GitHub repository are build errors, with the reason.

The theme's launch buttons (``launch_buttons`` in ``_config.yml``) are kept on the exercise
notebooks' pages only: on a chapter (a MyST markdown notebook) they would open the ``.md``
file, which Colab cannot read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from docutils import nodes
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ConfigError
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

#: Released notebooks live at ``notebooks/<name>/<name>.ipynb`` (nbgrader's release layout).
NOTEBOOKS_DIR = "notebooks"
NAME_RE = re.compile(r"^\d\d_[a-z0-9_]+$")
DEFAULT_COLAB = "https://colab.research.google.com"
DEFAULT_BINDER = "https://mybinder.org"
BUTTON = ["sd-btn", "sd-btn-outline-primary", "sd-shadow-sm", "sd-mr-2", "sd-mb-2"]


def notebook_path(name: str) -> str:
    """The notebook's path relative to the repository root (= the book's source directory)."""
    return f"{NOTEBOOKS_DIR}/{name}/{name}.ipynb"


def notebook_docname(name: str) -> str:
    """The Sphinx document name of the notebook's page."""
    return f"{NOTEBOOKS_DIR}/{name}/{name}"


def released_notebooks(srcdir: str | Path) -> list[str]:
    """Names of every released notebook under ``notebooks/``, sorted."""
    root = Path(srcdir) / NOTEBOOKS_DIR
    return sorted(p.parent.name for p in root.glob("*/*.ipynb") if p.stem == p.parent.name)


@dataclass(frozen=True)
class Repository:
    owner: str
    name: str
    branch: str

    @classmethod
    def from_url(cls, url: str, branch: str) -> "Repository":
        parsed = urlparse((url or "").strip())
        parts = [p for p in parsed.path.split("/") if p]
        if parsed.scheme != "https" or parsed.netloc != "github.com" or len(parts) != 2:
            raise ConfigError(
                f"exercise_links: repository.url in _config.yml must be a GitHub repository, "
                f"https://github.com/<owner>/<repo>; got {url!r}")
        owner, name = parts
        name = name.removesuffix(".git")
        if not branch:
            raise ConfigError("exercise_links: set repository.branch in _config.yml")
        return cls(owner, name, branch)


def colab_url(repo: Repository, name: str, host: str = DEFAULT_COLAB) -> str:
    """Colab opens a notebook straight from GitHub."""
    return f"{host.rstrip('/')}/github/{repo.owner}/{repo.name}/blob/{repo.branch}/{notebook_path(name)}"


def binder_url(repo: Repository, name: str, host: str = DEFAULT_BINDER) -> str:
    """Binder builds the repository (``binder/``) and opens the notebook in JupyterLab."""
    return (f"{host.rstrip('/')}/v2/gh/{repo.owner}/{repo.name}/{repo.branch}"
            f"?labpath={quote(notebook_path(name), safe='')}")


def repository(config: Config) -> Repository:
    """The repository of ``_config.yml`` (Jupyter Book passes it to the theme's options)."""
    opts = config.html_theme_options or {}
    return Repository.from_url(opts.get("repository_url", ""), opts.get("repository_branch", ""))


def launch_hosts(config: Config) -> tuple[str, str]:
    """Colab and Binder hosts: ``launch_buttons`` of ``_config.yml``, or the public ones."""
    launch = (config.html_theme_options or {}).get("launch_buttons") or {}
    return launch.get("colab_url") or DEFAULT_COLAB, launch.get("binderhub_url") or DEFAULT_BINDER


@dataclass(frozen=True)
class GradedItem:
    grade_id: str
    exercises: tuple[str, ...]  # the exercise ids its check() calls name
    points: float


def _notebook_format():
    """The grader's notebook reader, ``attnlib/grading/notebook.py``, loaded as a file on its
    own (standard library only): importing it through ``attnlib`` would import torch and the
    whole grader just to count points."""
    name = "_attnlib_notebook_format"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "attnlib" / "grading" / "notebook.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def graded_items(path: str | Path) -> list[GradedItem]:
    """The notebook's grade cells, read as ``attnlib grade`` reads them.

    Raises ``ValueError`` with the reason when the notebook cannot be read or has no
    readable grade cell.
    """
    notebook_format = _notebook_format()
    try:
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable notebook ({exc})") from exc
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError(f"{path}: not a Jupyter notebook (no list of cells)")
    items = []
    for item in notebook_format.parse_items(nb):
        if item.problem:
            raise ValueError(f"{path}: grade cell {item.id}: {item.problem}")
        names = tuple(dict.fromkeys(call.exercise_id for call in item.calls))
        items.append(GradedItem(item.id, names, item.max_points))
    if not items:
        raise ValueError(f"{path}: no nbgrader grade cells (metadata nbgrader.grade: true)")
    return items


def points_text(points: float) -> str:
    return str(int(points)) if float(points).is_integer() else f"{points:g}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class _NotebookDirective(SphinxDirective):
    """Shared checks: the notebook exists, is a page of the book, and has grade cells."""

    def load(self, name: str) -> list[GradedItem]:
        if not NAME_RE.match(name):
            raise self.error(f"exercise-notebook: {name!r} is not a notebook name such as 04_multi_head")
        rel = notebook_path(name)
        path = Path(self.env.srcdir) / rel
        if not path.is_file():
            known = ", ".join(released_notebooks(self.env.srcdir)) or "none"
            raise self.error(f"exercise-notebook: no released notebook {rel} (released: {known}); "
                             f"run `make release`, or fix the name")
        if notebook_docname(name) not in self.env.found_docs:
            raise self.error(f"exercise-notebook: {rel} is not a page of the book: list "
                             f"{notebook_docname(name)} in _toc.yml (part Exercises)")
        self.env.note_dependency(str(path))  # re-read this page when the notebook changes
        try:
            return graded_items(path)
        except ValueError as exc:
            raise self.error(f"exercise-notebook: {exc}") from exc

    def markdown(self, lines: list[str], container: nodes.Element) -> None:
        source, line = self.get_source_info()
        self.state.nested_parse(StringList(lines, source=source), self.content_offset, container)

    def doc_link(self, name: str) -> addnodes.pending_xref:
        """A link to the notebook's page, titled with the page's title."""
        ref = addnodes.pending_xref("", refdomain="std", reftype="doc",
                                    reftarget="/" + notebook_docname(name), refexplicit=False,
                                    refwarn=True, refdoc=self.env.docname)
        ref += nodes.inline("", notebook_docname(name))
        return ref


class ExerciseNotebook(_NotebookDirective):
    """``{exercise-notebook} NN_name``: the chapter's exercise, its points and its buttons."""

    required_arguments = 1
    has_content = True

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0].strip()
        items = self.load(name)
        repo = repository(self.config)
        colab_host, binder_host = launch_hosts(self.config)
        total = sum(item.points for item in items)

        box = nodes.container(classes=["exercise-notebook"])
        box["ids"].append(f"exercise-notebook-{name.replace('_', '-')}")
        intro = nodes.paragraph()
        intro += nodes.Text("The graded notebook for this chapter is ")
        intro += self.doc_link(name)
        intro += nodes.Text(f" ({plural(len(items), 'graded exercise')}, {points_text(total)} points):")
        box += intro

        table = ["| you write | points |", "| :-- | --: |"]
        for item in items:
            names = ", ".join(f"`{n}`" for n in item.exercises)
            table.append(f"| {names} | {points_text(item.points)} |")
        table.append(f"| **total** | **{points_text(total)}** |")
        self.markdown(table, box)

        buttons = nodes.paragraph(classes=["exercise-buttons"])
        download = addnodes.download_reference(
            "", "", refdomain="", reftype="download", refexplicit=True, refwarn=False,
            reftarget="/" + notebook_path(name), refdoc=self.env.docname,
            classes=BUTTON + ["exercise-download"])
        download += nodes.inline("", "Download the notebook")
        buttons += download
        for text, url, cls in (("Open in Colab", colab_url(repo, name, colab_host), "exercise-colab"),
                               ("Launch on Binder", binder_url(repo, name, binder_host), "exercise-binder")):
            buttons += nodes.Text(" ")
            buttons += nodes.reference("", text, refuri=url, classes=BUTTON + [cls])
        box += buttons

        how = nodes.paragraph()
        how += nodes.Text("Fill it in, run its test cells as you go, then grade your copy with ")
        how += nodes.literal("", f"attnlib grade path/to/{name}.ipynb")
        how += nodes.Text(". ")
        guide = addnodes.pending_xref("", refdomain="std", reftype="doc", reftarget="/book/exercises",
                                      refexplicit=True, refwarn=True, refdoc=self.env.docname)
        guide += nodes.inline("", "How the exercises work")
        how += guide
        how += nodes.Text(": local set-up, Colab, Binder and grading.")
        box += how

        if self.content:
            self.state.nested_parse(self.content, self.content_offset, box)
        return [box]


class ExerciseSummary(_NotebookDirective):
    """``{exercise-summary}``: every released notebook, its graded items and points."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        names = released_notebooks(self.env.srcdir)
        if not names:
            raise self.error(f"exercise-summary: no released notebook under {NOTEBOOKS_DIR}/")
        rows = ["| notebook | graded exercises | points |", "| :-- | :-- | --: |"]
        grand = 0.0
        for name in names:
            items = self.load(name)
            total = sum(item.points for item in items)
            grand += total
            exercises = ", ".join(f"`{n}`" for item in items for n in item.exercises)
            rows.append(f"| {{doc}}`/{notebook_docname(name)}` "
                        f"({{download}}`{name}.ipynb </{notebook_path(name)}>`) "
                        f"| {exercises} | {points_text(total)} |")
        rows.append(f"| **{plural(len(names), 'notebook')}** | | **{points_text(grand)}** |")
        box = nodes.container(classes=["exercise-summary"])
        self.markdown(rows, box)
        return [box]


def keep_launch_buttons_on_exercises(app: Sphinx, pagename: str, templatename: str,
                                     context: dict[str, Any], doctree: Any) -> None:
    """Drop the theme's launch buttons (and the ``.ipynb`` download they bring) from every page
    that is not a released exercise notebook."""
    if pagename.startswith(NOTEBOOKS_DIR + "/") or "header_buttons" not in context:
        return
    kept = []
    for button in context["header_buttons"]:
        if button.get("label") == "launch-buttons":
            continue
        if button.get("label") == "download-buttons":
            button["buttons"] = [b for b in button["buttons"]
                                 if b.get("label") != "download-notebook-button"]
        kept.append(button)
    context["header_buttons"] = kept


def add_substitutions(app: Sphinx, config: Config) -> None:
    """Check the repository (fail early, with the reason, when _config.yml does not name a
    GitHub repository) and offer it to pages as MyST substitutions: ``{{ repository_link }}``
    (a link), ``{{ repository_url }}`` and ``{{ repository_branch }}``."""
    repo = repository(config)
    url = f"https://github.com/{repo.owner}/{repo.name}"
    subs = dict(config.myst_substitutions or {})
    subs.setdefault("repository_url", url)
    subs.setdefault("repository_branch", repo.branch)
    subs.setdefault("repository_link", f"[{repo.owner}/{repo.name}]({url})")
    config.myst_substitutions = subs


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("exercise-notebook", ExerciseNotebook)
    app.add_directive("exercise-summary", ExerciseSummary)
    app.connect("config-inited", add_substitutions)
    # after sphinx-book-theme's add_launch_buttons / add_header_buttons (priority 501)
    app.connect("html-page-context", keep_launch_buttons_on_exercises, priority=502)
    # env_version from this file's content: editing the extension re-reads every page on the
    # next build (Sphinx does not otherwise notice that an extension changed).
    env_version = int(hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8], 16)
    return {"version": "1.0", "env_version": env_version,
            "parallel_read_safe": True, "parallel_write_safe": True}
