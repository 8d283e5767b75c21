"""The exercise notebooks: sources (solutions/) and released student versions (notebooks/).

* both directories are exactly what ``tools/build_exercises.py --release`` produces (so
  neither was edited by hand nor is stale), with no outputs;
* every stub's signature and docstring are the attnlib reference's;
* released: every graded body is ``raise NotImplementedError`` and no hidden test is left;
* the solutions earn full marks (every test cell passes, hidden tests included), the
  released notebooks zero (every test cell fails), and explore cells never crash.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import io
import json
import linecache
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("nbformat")
import nbformat  # noqa: E402

from attnlib.grading import EXERCISES  # noqa: E402


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_exercises", REPO / "tools" / "build_exercises.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()
ASSIGNMENTS = list(builder.CHAPTERS)


def _path(kind: str, assignment: str, root: Path = REPO) -> Path:
    return root / kind / assignment / f"{assignment}.ipynb"


def _read(kind: str, assignment: str) -> nbformat.NotebookNode:
    return nbformat.read(str(_path(kind, assignment)), as_version=4)


def _nbg(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _method(exercise) -> str:
    """The method a module exercise grades: the one its cases call (``ElmanRNN`` and
    chapter 6's ``MultiHeadAttention`` name no method: they grade ``forward``)."""
    methods = {c.method for c in exercise.make_cases(False) + exercise.make_cases(True)}
    assert len(methods) == 1, (exercise.id, methods)
    return methods.pop()


# --------------------------------------------------------------------------- (a) generated


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    """A fresh course root: sources written by the builder, released by nbgrader."""
    if shutil.which("nbgrader", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("nbgrader is not installed in this environment")
    root = tmp_path_factory.mktemp("course")
    subprocess.run([sys.executable, str(REPO / "tools" / "build_exercises.py"), "--release", "--root", str(root)],
                   check=True, capture_output=True, text=True, cwd=REPO)
    return root


def test_every_chapter_has_a_notebook_with_its_registered_exercises():
    chapters = sorted(p.stem for p in (REPO / "book").glob("[0-9][0-9]_*.md"))
    assert ASSIGNMENTS == chapters, "one notebook per book chapter, counted from book/"
    assert {ex.chapter for ex in EXERCISES.values()} == set(range(1, len(chapters) + 1)), \
        "every chapter has a registered exercise, and every exercise a chapter"
    for number, assignment in enumerate(ASSIGNMENTS, start=1):
        assert assignment.startswith(f"{number:02d}_")
        assert (REPO / "book" / f"{assignment}.md").exists()
        nb = _read("notebooks", assignment)
        graded = [_nbg(c)["grade_id"] for c in nb.cells if _nbg(c).get("grade")]
        registered = [k for k, e in EXERCISES.items() if e.chapter == number]
        assert sorted(graded) == sorted(f"test_{k.replace('.', '_')}" for k in registered)
        assert 2 <= len(graded) <= 6, (assignment, graded)  # 2-6 graded items per chapter
        total = sum(_nbg(c)["points"] for c in nb.cells if _nbg(c).get("grade"))
        assert f"| **total** | **{total}** |" in nb.cells[0].source
        assert f"worth {total} points" in nb.cells[-1].source


@pytest.mark.parametrize("kind", ["solutions", "notebooks"])
@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_committed_notebook_is_what_the_build_produces(regenerated, kind, assignment):
    committed = json.loads(_path(kind, assignment).read_text())
    fresh = json.loads(_path(kind, assignment, regenerated).read_text())
    assert committed == fresh, (f"{kind}/{assignment} differs from what `tools/build_exercises.py "
                                f"--release` produces: edit the builder, not the notebook, and rerun it")


def test_no_stray_files_in_the_notebook_directories():
    for kind in ("solutions", "notebooks"):
        found = sorted(p.relative_to(REPO / kind).as_posix() for p in (REPO / kind).rglob("*") if p.is_file())
        assert found == [f"{a}/{a}.ipynb" for a in ASSIGNMENTS], kind
    assert not (REPO / "gradebook.db").exists()


@pytest.mark.parametrize("kind", ["solutions", "notebooks"])
def test_no_outputs_and_valid_format(kind):
    for assignment in ASSIGNMENTS:
        nb = _read(kind, assignment)
        nbformat.validate(nb)
        assert (nb.nbformat, nb.nbformat_minor) == (4, 5)
        for cell in nb.cells:
            assert cell.get("id")
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (assignment, cell.id)


# --------------------------------------------------------------------------- (b) stubs


def _defs(nb) -> dict[str, ast.AST]:
    """Top-level functions and classes defined in the notebook's solution cells."""
    found = {}
    for cell in nb.cells:
        if cell.cell_type == "code" and _nbg(cell).get("solution"):
            for node in ast.parse(cell.source).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    found[node.name] = node
    return found


def _reference_def(ref, name: str) -> ast.FunctionDef:
    return builder._find_def(ast.parse(textwrap.dedent(inspect.getsource(ref))), name)


def _same_signature(node: ast.FunctionDef, ref_node: ast.FunctionDef, ref_fn) -> None:
    """Parameters (names, kinds, defaults, annotations), return annotation and decorators of
    the stub ``node`` against the reference's source, and the names against its signature."""
    assert ast.dump(node.args) == ast.dump(ref_node.args), ref_fn.__qualname__
    assert (node.returns and ast.dump(node.returns)) == (ref_node.returns and ast.dump(ref_node.returns)), \
        ref_fn.__qualname__  # a kernel has no return annotation
    assert [ast.dump(d) for d in node.decorator_list] == [ast.dump(d) for d in ref_node.decorator_list]
    names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    if node.args.vararg:
        names.append(node.args.vararg.arg)
    if node.args.kwarg:
        names.append(node.args.kwarg.arg)
    assert sorted(names) == sorted(inspect.signature(ref_fn).parameters), ref_fn.__qualname__
    for param in inspect.signature(ref_fn).parameters.values():  # attnlib's annotations are strings
        if isinstance(param.annotation, str):
            arg = next(a for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                       if a.arg == param.name)
            assert ast.unparse(arg.annotation) == ast.unparse(ast.parse(param.annotation, mode="eval").body)


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_stubs_copy_the_reference_signature_and_docstring(assignment):
    nb = _read("notebooks", assignment)
    defs = _defs(nb)
    number = int(assignment[:2])
    for ex_id, exercise in EXERCISES.items():
        if exercise.chapter != number:
            continue
        ref = builder._function(exercise.reference)  # a Triton kernel: its Python function
        if exercise.kind == "function":
            node = defs[ref.__name__]
            assert isinstance(node, ast.FunctionDef)
            _same_signature(node, _reference_def(ref, ref.__name__), ref)
            assert ast.get_docstring(node) == inspect.getdoc(ref)
        else:
            cls_node = defs[ref.__name__]
            assert isinstance(cls_node, ast.ClassDef)
            assert ast.get_docstring(cls_node) == inspect.getdoc(ref)
            method = _method(exercise)
            node = next(n for n in cls_node.body if isinstance(n, ast.FunctionDef) and n.name == method)
            ref_method = inspect.getattr_static(ref, method)
            ref_fn = ref_method.__func__ if isinstance(ref_method, (staticmethod, classmethod)) else ref_method
            _same_signature(node, _reference_def(ref, method), ref_fn)
            assert ast.get_docstring(node) == inspect.getdoc(ref_fn)
            # the constructor is the reference's, statement for statement (the grader loads
            # its weights by the reference's parameter names)
            init = next(n for n in cls_node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
            assert ast.dump(init) == ast.dump(_reference_def(ref, "__init__"))


# --------------------------------------------------------------------------- (c) released


def _graded_names(assignment: str) -> list[tuple[str, str | None]]:
    """(object, method or None) for every graded exercise of the chapter."""
    number = int(assignment[:2])
    out = []
    for ex_id, exercise in EXERCISES.items():
        if exercise.chapter == number:
            if exercise.kind == "function":
                out.append((ex_id, None))
            else:
                out.append((ex_id.partition(".")[0], _method(exercise)))
    return out


def _body_without_docstring(node: ast.FunctionDef) -> list[ast.stmt]:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return body


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_released_stubs_raise_and_hide_the_tests(assignment):
    nb = _read("notebooks", assignment)
    defs = _defs(nb)
    for obj, method in _graded_names(assignment):
        node = defs[obj]
        if method is not None:
            node = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
        assert ast.unparse(ast.Module(_body_without_docstring(node), [])) == "raise NotImplementedError", \
            (assignment, obj, method)
    for cell in nb.cells:
        text = cell.source
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
        assert "HIDDEN TESTS" not in text and "hidden=True" not in text, (assignment, cell.get("id"))
        if _nbg(cell).get("grade"):
            assert _nbg(cell)["locked"] and _nbg(cell)["points"] > 0
    sources = _read("solutions", assignment)
    tests = [c for c in sources.cells if _nbg(c).get("grade")]
    for cell in tests:  # the source test cells do hold the hidden tests
        assert "### BEGIN HIDDEN TESTS" in cell.source and "hidden=True" in cell.source


# --------------------------------------------------------------------------- (d) execution


def _run(nb) -> list[tuple[object, BaseException | None]]:
    """Execute the code cells in order in a fresh namespace; (cell, exception or None)."""
    namespace: dict = {"__name__": "__main__"}
    results = []
    with torch.random.fork_rng(devices=[]):  # the notebooks seed torch; leave other tests' RNG alone
        for cell in nb.cells:
            if cell.cell_type == "code":
                results.append((cell, _run_cell(cell, namespace)))
    return results


def _run_cell(cell, namespace: dict) -> BaseException | None:
    error = None
    filename = f"<{cell.get('id')}>"
    # as Jupyter does, keep the cell's source where inspect finds it: Triton reads a kernel's
    # source (chapter 13), and so does the grader's check of it
    linecache.cache[filename] = (len(cell.source), None, cell.source.splitlines(True), filename)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(cell.source, filename, "exec"), namespace)
    except Exception as exc:  # noqa: BLE001  (recorded, judged by the caller)
        error = exc
    finally:
        plt.close("all")
    return error


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_solution_notebook_gets_full_marks(assignment):
    results = _run(_read("solutions", assignment))
    for cell, error in results:
        assert error is None, f"{assignment}, cell {cell.get('id')}: {type(error).__name__}: {error}"
    assert sum(1 for cell, _ in results if _nbg(cell).get("grade")) >= 1


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_released_notebook_gets_zero_marks_and_explores_safely(assignment):
    results = _run(_read("notebooks", assignment))
    for cell, error in results:
        if _nbg(cell).get("grade"):
            assert isinstance(error, (AssertionError, NotImplementedError)), \
                f"{assignment}, test cell {cell.get('id')} did not fail: {error!r}"
        else:
            assert error is None, f"{assignment}, cell {cell.get('id')}: {type(error).__name__}: {error}"


# --------------------------------------------------------------------------- install cell


def test_install_cell_comes_first_and_names_the_configured_repository():
    import yaml

    url = yaml.safe_load((REPO / "_config.yml").read_text())["repository"]["url"]
    assert url.startswith("https://github.com/")
    for kind in ("solutions", "notebooks"):
        for assignment in ASSIGNMENTS:
            nb = _read(kind, assignment)
            code = [c for c in nb.cells if c.cell_type == "code"]
            install, imports = code[0], code[1]
            assert install.get("id") == "install" and not _nbg(install), (kind, assignment)
            assert 'importlib.util.find_spec("attnlib") is None' in install.source
            assert f'"git+{url}' in install.source, (kind, assignment)
            assert "import attnlib" in imports.source
            assert "install cell" in nb.cells[0].source and "Colab" in nb.cells[0].source


def test_install_target_is_read_from_the_config(tmp_path):
    (tmp_path / "_config.yml").write_text("repository:\n  url: https://github.com/someone/fork/\n  branch: dev\n")
    assert builder.repository_install_target(tmp_path) == "git+https://github.com/someone/fork@dev"
    (tmp_path / "_config.yml").write_text("repository:\n  url: https://github.com/someone/fork\n")
    assert builder.repository_install_target(tmp_path) == "git+https://github.com/someone/fork"
    (tmp_path / "_config.yml").write_text("title: no repository\n")
    with pytest.raises(ValueError, match="repository.url"):
        builder.repository_install_target(tmp_path)


def test_install_cell_does_nothing_where_attnlib_is_installed(monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError(f"the install cell ran {args}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    source = next(c for c in _read("notebooks", ASSIGNMENTS[0]).cells if c.get("id") == "install").source
    exec(compile(source, "<install>", "exec"), {"__name__": "__main__"})  # attnlib is importable here

    # where attnlib is missing, it asks pip for the repository, with this interpreter
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append((cmd, check)))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "attnlib" else object())
    exec(compile(source, "<install>", "exec"), {"__name__": "__main__"})
    assert calls == [([sys.executable, "-m", "pip", "install", "--quiet", builder.repository_install_target()], True)]


# --------------------------------------------------------------------------- guidance text


def test_guidance_names_sections_that_exist_in_the_chapter():
    import re

    for assignment, module in builder.CHAPTERS.items():
        headings = {" ".join(line.lstrip("#").split()) for line in
                    (REPO / "book" / f"{assignment}.md").read_text().splitlines() if line.startswith("#")}
        cited = []
        for ex in module.EXERCISES:
            text = " ".join((ex.guide or "").split())
            for match in re.finditer(r"sections? \*([^*]+)\*(?: and \*([^*]+)\*)?", text):
                cited += [g for g in match.groups() if g]
        assert all(ex.guide is None or "section" in ex.guide for ex in module.EXERCISES)
        missing = [c for c in cited if c not in headings]
        assert cited and not missing, (assignment, missing)


def test_nbgrader_config_uses_the_graders_hidden_test_markers_and_time_limit():
    """The markers are written once, in attnlib.grading.notebook; nbgrader's configuration (which
    removes the hidden tests on release) must name the same ones."""
    from traitlets.config import Config

    from attnlib.grading.notebook import HIDDEN_BLOCK

    config = Config()
    exec(compile((REPO / "nbgrader_config.py").read_text(), "nbgrader_config.py", "exec"),
         {"get_config": lambda: config, "__file__": str(REPO / "nbgrader_config.py")})
    begin, end = (marker.lstrip("#").strip() for marker in HIDDEN_BLOCK)
    assert config.ClearHiddenTests.begin_test_delimeter == begin
    assert config.ClearHiddenTests.end_test_delimeter == end
    # a test cell under nbgrader gets as long as a whole notebook under attnlib grade
    from attnlib.grading.protocol import DEFAULT_TIMEOUT

    assert config.Execute.timeout == DEFAULT_TIMEOUT
