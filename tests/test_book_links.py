"""The book's links to the exercise notebooks, without a browser.

Each chapter's ``## Exercise`` section names its released notebook with the
``{exercise-notebook}`` directive (``book/_ext/exercise_links.py``); the notebooks are pages of
the book that are never executed; the Colab/Binder links come from ``_config.yml``'s
repository; Binder's environment installs attnlib. The directive itself is run in a small
Sphinx build (myst-nb, the book's theme): a missing notebook is an error that says so.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
CHAPTERS = sorted(ROOT.glob("book/[0-9][0-9]_*.md"))
NOTEBOOKS = sorted(p for p in ROOT.glob("notebooks/*/*.ipynb") if p.stem == p.parent.name)
DIRECTIVE = re.compile(r"^```\{exercise-notebook\}\s+(\S+)\s*$", re.M)


def load_extension():
    """book/_ext/exercise_links.py, imported as Sphinx imports it (once per process)."""
    if "exercise_links" not in sys.modules:
        spec = importlib.util.spec_from_file_location("exercise_links", ROOT / "book" / "_ext" / "exercise_links.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["exercise_links"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["exercise_links"]


def toc_files() -> list[str]:
    files = [TOC["root"]]
    for part in TOC.get("parts", []):
        files += [entry["file"] for entry in part["chapters"]]
    return files


def exercise_section(text: str) -> str:
    match = re.search(r"^## Exercise\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "no '## Exercise' section"
    return match.group(1)


def test_one_notebook_per_chapter():
    """Chapters are counted, never typed: one notebook per book chapter, numbered 1, 2, ..."""
    assert CHAPTERS, "no chapters found in book/"
    assert [c.stem for c in CHAPTERS] == [n.stem for n in NOTEBOOKS]
    assert [int(c.stem[:2]) for c in CHAPTERS] == list(range(1, len(CHAPTERS) + 1))


def test_readme_totals_are_counted_from_the_notebooks():
    """The README's "(N notebooks, M graded items, P points)" matches the grade cells of the
    released notebooks, read as the book's Exercises page reads them."""
    ext = load_extension()
    items = [item for nb in NOTEBOOKS for item in ext.graded_items(nb)]
    points = ext.points_text(sum(item.points for item in items))
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"\((\d+) notebooks, (\d+) graded\s+items, (\d+(?:\.\d+)?) points\)", readme)
    assert match, "the README no longer states '(N notebooks, M graded items, P points)'"
    assert match.groups() == (str(len(NOTEBOOKS)), str(len(items)), points), (
        f"README says {match.group(0)}; the notebooks hold {len(NOTEBOOKS)} notebooks, "
        f"{len(items)} graded items, {points} points")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_names_its_released_notebook(chapter):
    text = chapter.read_text()
    names = DIRECTIVE.findall(text)
    assert names == [chapter.stem], f"{chapter.name}: exercise-notebook directives {names}"
    assert DIRECTIVE.findall(exercise_section(text)) == names, "the directive is not in '## Exercise'"
    notebook = ROOT / "notebooks" / names[0] / f"{names[0]}.ipynb"
    assert notebook.is_file(), f"{chapter.name} names {notebook.relative_to(ROOT)}, which does not exist"
    assert f"notebooks/{names[0]}/{names[0]}" in toc_files(), "the notebook is not a page of _toc.yml"
    assert "github.com" not in exercise_section(text), "links come from _config.yml, not the chapter"


def test_exercises_part_of_the_toc():
    parts = {part.get("caption"): [e["file"] for e in part["chapters"]] for part in TOC["parts"]}
    assert parts["Exercises"] == ["book/exercises"] + [f"notebooks/{n.stem}/{n.stem}" for n in NOTEBOOKS]
    assert (ROOT / "book" / "exercises.md").is_file()


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_released_notebooks_are_never_executed(notebook):
    patterns = CONFIG["execute"]["exclude_patterns"]
    assert any(PurePosixPath(notebook.as_posix()).match(p) for p in patterns), patterns
    for chapter in CHAPTERS:  # the chapters still are
        assert not any(PurePosixPath(chapter.as_posix()).match(p) for p in patterns)


def test_extension_is_registered():
    sphinx = CONFIG["sphinx"]
    assert sphinx["local_extensions"] == {"exercise_links": "book/_ext"}
    # sphinx.config.extensions replaces Jupyter Book's list, so the extension is named there too
    assert "exercise_links" in sphinx["config"]["extensions"]


def test_launch_urls_come_from_the_config():
    ext = load_extension()
    repo = ext.Repository.from_url(CONFIG["repository"]["url"], CONFIG["repository"]["branch"])
    owner, name = CONFIG["repository"]["url"].rstrip("/").split("/")[-2:]
    branch = CONFIG["repository"]["branch"]
    colab_host = CONFIG["launch_buttons"]["colab_url"]
    binder_host = CONFIG["launch_buttons"]["binderhub_url"]
    assert ext.colab_url(repo, "04_multi_head", colab_host) == (
        f"https://colab.research.google.com/github/{owner}/{name}/blob/{branch}"
        "/notebooks/04_multi_head/04_multi_head.ipynb")
    assert ext.binder_url(repo, "04_multi_head", binder_host) == (
        f"https://mybinder.org/v2/gh/{owner}/{name}/{branch}"
        "?labpath=notebooks%2F04_multi_head%2F04_multi_head.ipynb")
    with pytest.raises(Exception, match="must be a GitHub repository"):
        ext.Repository.from_url("https://gitlab.com/someone/course", "main")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_points_shown_are_the_notebook_grade_cells(notebook):
    ext = load_extension()
    items = ext.graded_items(notebook)
    cells = [c for c in json.loads(notebook.read_text())["cells"]
             if (c["metadata"].get("nbgrader") or {}).get("grade") and c["cell_type"] == "code"]
    assert [i.grade_id for i in items] == [c["metadata"]["nbgrader"]["grade_id"] for c in cells]
    assert [i.points for i in items] == [c["metadata"]["nbgrader"]["points"] for c in cells]
    assert all(i.exercises for i in items)


def test_binder_installs_attnlib():
    post_build = ROOT / "binder" / "postBuild"
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable"
    assert "pip install --no-deps -e ." in post_build.read_text()
    requirements = (ROOT / "binder" / "requirements.txt").read_text()
    assert "download.pytorch.org/whl/cpu" in requirements
    pinned = re.search(r"^torch==([\d.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert re.search(rf"^torch=={re.escape(pinned)}\+cpu$", requirements, re.M), "binder's torch != the course's"
    course = (ROOT / "requirements.txt").read_text()
    for dep in ("numpy", "matplotlib", "triton"):  # triton: chapter 13's notebook
        version = re.search(rf"^{dep}==(\S+)$", course, re.M).group(1)
        assert re.search(rf"^{dep}=={re.escape(version)}$", requirements, re.M), f"binder's {dep} != the course's"


# --------------------------------------------------------------------------- the directive, built

CONF = """
extensions = ["myst_nb", "sphinx_design", "exercise_links"]
html_theme = "sphinx_book_theme"
html_theme_options = {{"repository_url": "https://github.com/someone/course", "repository_branch": "{branch}",
                      "launch_buttons": {{"colab_url": "https://colab.research.google.com",
                                         "binderhub_url": "https://mybinder.org"}}}}
nb_execution_mode = "off"
exclude_patterns = ["_build"]
"""


def sphinx_build(tmp_path: Path, chapter: str, notebooks: list[Path], branch: str = "main",
                 warningiserror: bool = False) -> tuple[str, Path, int]:
    """Build a tiny book (index, book/exercises, book/04_multi_head, notebooks); return the
    warnings, the output directory and the exit status."""
    from sphinx.application import Sphinx
    from sphinx.util.docutils import docutils_namespace

    src = tmp_path / "src"
    (src / "book").mkdir(parents=True)
    (src / "conf.py").write_text(CONF.format(branch=branch))
    toctree = "\n".join(["book/exercises", "book/04_multi_head"] +
                        [f"notebooks/{n.stem}/{n.stem}" for n in notebooks])
    (src / "index.md").write_text(f"# Test\n\n```{{toctree}}\n{toctree}\n```\n")
    (src / "book" / "exercises.md").write_text("# Exercises\n\n```{exercise-summary}\n```\n")
    (src / "book" / "04_multi_head.md").write_text(f"# Chapter\n\n## Exercise\n\n{chapter}\n")
    for nb in notebooks:
        (src / "notebooks" / nb.stem).mkdir(parents=True)
        shutil.copy(nb, src / "notebooks" / nb.stem / nb.name)
    warnings = io.StringIO()
    load_extension()  # Sphinx finds it in sys.modules
    with docutils_namespace():  # as sphinx-build: directives registered for this build only
        app = Sphinx(str(src), str(src), str(tmp_path / "out"), str(tmp_path / "doctrees"), "html",
                     status=None, warning=warnings, freshenv=True, warningiserror=warningiserror,
                     keep_going=True)
        app.build()
    return warnings.getvalue(), tmp_path / "out", app.statuscode


def test_directive_renders_links_and_points(tmp_path):
    notebook = ROOT / "notebooks" / "04_multi_head" / "04_multi_head.ipynb"
    warnings, out, status = sphinx_build(tmp_path, "```{exercise-notebook} 04_multi_head\n```", [notebook],
                                         branch="dev", warningiserror=True)
    assert warnings == "" and status == 0
    html = (out / "book" / "04_multi_head.html").read_text()
    assert 'href="../notebooks/04_multi_head/04_multi_head.html"' in html
    assert ("https://colab.research.google.com/github/someone/course/blob/dev/"
            "notebooks/04_multi_head/04_multi_head.ipynb") in html
    assert ("https://mybinder.org/v2/gh/someone/course/dev"
            "?labpath=notebooks%2F04_multi_head%2F04_multi_head.ipynb") in html
    download = re.search(r'class="[^"]*download[^"]*" download="" href="\.\./(_downloads/[^"]+)"', html)
    assert download and download.group(1).endswith("/04_multi_head.ipynb")
    assert (out / download.group(1)).read_bytes() == notebook.read_bytes()
    total = sum(ext_item.points for ext_item in load_extension().graded_items(notebook))
    assert f"<strong>{total:g}</strong>" in html
    # the theme's launch menu is on the notebook's page, not on the chapter's
    assert "dropdown-launch-buttons" in (out / "notebooks" / "04_multi_head" / "04_multi_head.html").read_text()
    assert "dropdown-launch-buttons" not in html


def test_missing_notebook_is_a_clear_error(tmp_path):
    notebook = ROOT / "notebooks" / "04_multi_head" / "04_multi_head.ipynb"
    warnings, _, status = sphinx_build(tmp_path, "```{exercise-notebook} 04_multi_hed\n```", [notebook],
                                       warningiserror=True)
    assert status != 0, "the build (-W) did not fail"
    assert "ERROR" in warnings
    assert "no released notebook notebooks/04_multi_hed/04_multi_hed.ipynb" in warnings
    assert "04_multi_head.md" in warnings  # where


def test_counting_points_imports_neither_torch_nor_the_grader():
    """The book counts points with the grader's notebook reader alone
    (attnlib/grading/notebook.py, standard library only), not through attnlib."""
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('exercise_links', {str(ROOT / 'book' / '_ext' / 'exercise_links.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['exercise_links'] = m\n"
        "spec.loader.exec_module(m)\n"
        f"items = m.graded_items({str(NOTEBOOKS[0])!r})\n"
        "assert items, 'no graded items'\n"
        "print(sorted(n for n in sys.modules if n == 'torch' or n.startswith('attnlib')))\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"modules imported to count points: {out.stdout}"


def test_the_notebook_reader_needs_only_the_standard_library():
    import ast

    tree = ast.parse((ROOT / "attnlib" / "grading" / "notebook.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)), "relative import"
    optional = {"nbformat"}  # used when installed, to convert old notebooks
    assert imported - optional <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
