"""Write the exercise notebooks of the course, and (with ``--release``) the student versions.

One source notebook per chapter, ``solutions/<assignment>/<assignment>.ipynb`` (the nbgrader
source directory; see ``nbgrader_config.py``), built from the chapter's authoring module
``tools/exercises/chNN_<topic>.py`` (guide text, hints, points, the solutions as real code and
the explore cells as real functions; see :mod:`tools.exercises`). This file only turns them
into cells:

* the signature and docstring of every stub are copied from the attnlib reference with
  :mod:`inspect`, never typed by hand: for a function exercise the ``def`` line(s) and the
  docstring; for a module exercise the whole reference class, with the bodies of the graded
  methods replaced by ``### BEGIN SOLUTION`` / ``### END SOLUTION`` regions around the
  solution's body;
* an explore function becomes a cell whose code runs inside the one ``try ... except
  NotImplementedError`` wrapper written here (:func:`explore_source`);
* before a notebook is written, each solution's parameters are checked against the
  reference's and every global name its code uses against what the notebook defines.

Usage (from the repository root)::

    .venv/bin/python tools/build_exercises.py            # write solutions/
    .venv/bin/python tools/build_exercises.py --release  # ... then nbgrader -> notebooks/

``--release`` runs ``nbgrader generate_assignment "[0-9][0-9]_*" --force --no-db`` (every
assignment, in one process), so ``notebooks/`` is exactly what nbgrader produces from
``solutions/`` (no gradebook is written anywhere). ``--root DIR`` writes into another course
root (used by the tests).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import inspect
import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path
from types import ModuleType

import nbformat
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: import the repository's attnlib and tools
    sys.path.insert(0, str(REPO))

from attnlib.grading import EXERCISES  # noqa: E402
from attnlib.grading.notebook import HIDDEN_BLOCK  # noqa: E402
from attnlib.grading.protocol import CASE_TIME_MULTIPLE, DEFAULT_STEP_TIMEOUT  # noqa: E402
from tools.exercises import Exercise, chapters  # noqa: E402

SOURCE_DIR = "solutions"
RELEASE_DIR = "notebooks"
CHAPTERS: dict[str, ModuleType] = chapters()  # notebook name -> authoring module

# --------------------------------------------------------------------------- the imports


def repository_install_target(root: Path = REPO) -> str:
    """``git+<repository.url>[@<repository.branch>]`` from ``_config.yml``, the one place the
    course's public repository is named (the book's Colab/Binder links come from it too)."""
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8"))
    repo = config.get("repository") or {}
    url = str(repo.get("url") or "").rstrip("/")
    if not url.startswith("https://"):
        raise ValueError(f"_config.yml: repository.url must be an https URL, got {url!r}")
    branch = str(repo.get("branch") or "")
    return f"git+{url}" + (f"@{branch}" if branch else "")


def install_source() -> str:
    """The first code cell: installs the course package where it is missing (Google Colab),
    and does nothing where it is installed (a clone, Binder, the grader, nbgrader)."""
    return f"""\
# Google Colab (or any Python without the course package): install attnlib from the course's
# repository. Where attnlib is already installed (your clone, Binder, the grader) this does nothing.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("attnlib") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    {json.dumps(repository_install_target())}], check=True)
"""


# What the learner may call, and how slow a solution may be: the notebook's introduction says
# this, in these words unless the chapter's module gives its own RULES or LOOPS (chapter 13,
# whose exercises are Triton kernels).
RULES = """\
Write
plain torch: when the notebook is graded, calling attnlib's version or PyTorch's built-in
version of what an exercise asks you to write, anywhere outside the test and explore cells
(even in a cell of your own, even through `check`), fails that exercise."""
LOOPS = """\
Loops are fine: every exercise here has also been solved with Python loops over rows, heads
or single numbers, and the course's tests check that those solutions get full marks."""


BASE_IMPORTS = """\
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnlib  # the reference: used only by the explore cells, to compare with your result
"""


# --------------------------------------------------------------------------- reading the code


def _function(obj):
    """The Python function of a Triton kernel (``@triton.jit`` wraps it: ``obj.fn``, whose
    source holds the decorator), or ``obj`` itself."""
    fn = getattr(obj, "fn", None)
    if inspect.isfunction(fn) and not inspect.isfunction(obj) and not isinstance(obj, type):
        return fn
    return obj


def _source_lines(obj) -> list[str]:
    return textwrap.dedent(inspect.getsource(_function(obj))).splitlines()


def _find_def(tree: ast.AST, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise LookupError(name)


def _docstring_end(fn: ast.FunctionDef) -> int | None:
    """The last line (1-based) of ``fn``'s docstring, or None if it has none."""
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno
    return None


def _header_end(fn: ast.FunctionDef) -> int:
    """The last line (1-based) of the def line(s) and docstring of a reference function."""
    end = _docstring_end(fn)
    if end is None:
        raise ValueError(f"{fn.name} has no docstring to copy")
    return end


def _signature_end(lines: list[str]) -> int:
    """The line (1-based) of the colon that ends the first ``def`` in ``lines``."""
    depth, seen_def = 0, False
    tokens = tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline)
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.string == "def":
            seen_def = True
        elif tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif seen_def and depth == 0 and tok.type == tokenize.OP and tok.string == ":":
            return tok.start[0]
    raise ValueError("no def found")


def body_source(fn) -> str:
    """The body of ``fn`` as written in its authoring module, at indentation 0, without its
    def line(s) and without its docstring."""
    lines = _source_lines(fn)
    node = _find_def(ast.parse("\n".join(lines)), fn.__name__)
    start = max(_signature_end(lines), _docstring_end(node) or 0)
    return textwrap.dedent("\n".join(lines[start:])).strip("\n") + "\n"


def _parameters(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(_function(fn)).parameters.values()]


def _methods(solution: type) -> dict:
    """The methods a solution class writes: those it defines itself, by name."""
    found = {}
    for name, value in vars(solution).items():
        value = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if inspect.isfunction(value):
            found[name] = value
    return found


def _free_names(fn, annotations: bool = True) -> list[str]:
    """The global names ``fn``'s code reads, in order of first use (builtins left out; with
    ``annotations=False``, names read only by annotations left out too)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(_function(fn))))
    skip: set[int] = set()
    if not annotations:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                notes = [a.annotation for a in args.posonlyargs + args.args + args.kwonlyargs
                         + [args.vararg, args.kwarg] if a is not None] + [node.returns]
            elif isinstance(node, ast.AnnAssign):
                notes = [node.annotation]
            else:
                continue
            skip |= {id(n) for note in notes if note is not None for n in ast.walk(note)}
    bound = {a.arg for node in ast.walk(tree) if isinstance(node, ast.arguments)
             for a in node.posonlyargs + node.args + node.kwonlyargs + [node.vararg, node.kwarg] if a}
    bound |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)}
    bound |= {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    loads = [node for node in ast.walk(tree)
             if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in skip]
    names = []
    for node in sorted(loads, key=lambda n: (n.lineno, n.col_offset)):
        if node.id not in bound and not hasattr(builtins, node.id) and node.id not in names:
            names.append(node.id)
    return names


# --------------------------------------------------------------------------- building cells


def _region(body: str, indent: str) -> list[str]:
    lines = [indent + "### BEGIN SOLUTION"]
    lines += [(indent + line) if line.strip() else "" for line in body.rstrip("\n").splitlines()]
    lines.append(indent + "### END SOLUTION")
    return lines


def function_stub(ref, body: str) -> str:
    """The reference's def line(s) and docstring (copied), then the solution region."""
    lines = _source_lines(ref)
    fn = _find_def(ast.parse("\n".join(lines)), ref.__name__)
    return "\n".join(lines[: _header_end(fn)] + _region(body, " " * 4))


def class_stub(ref, bodies: dict[str, str]) -> str:
    """The reference class, the graded methods' bodies (after the docstring) replaced by regions."""
    lines = _source_lines(ref)
    tree = ast.parse("\n".join(lines))
    cls = tree.body[0]
    assert isinstance(cls, ast.ClassDef) and cls.name == ref.__name__
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    replacements = []  # (first line to drop, last line to drop, new lines), 1-based
    for name, body in bodies.items():
        fn = methods[name]
        indent = " " * (fn.col_offset + 4)
        replacements.append((_header_end(fn) + 1, fn.end_lineno, _region(body, indent)))
    for start, end, new in sorted(replacements, reverse=True):
        lines[start - 1:end] = new
    return "\n".join(lines)


def solution_cell_source(ex: Exercise, slow: bool = False) -> str:
    """The solution cell: the reference's stub around the solution's code (``slow``: the slow
    solution's, see :class:`tools.exercises.Exercise`), after checking that the solution takes
    exactly the reference's parameters."""
    ref = EXERCISES[ex.id].reference
    solution = ex.slow if slow else ex.solution
    if solution is None:
        raise ValueError(f"{ex.id}: no slow solution (Exercise.slow)")
    if isinstance(solution, type):
        name = f"Slow{ex.object_name}" if slow else ex.object_name
        if solution.__name__ != name or not issubclass(solution, ref):
            raise TypeError(f"{ex.id}: the {'slow ' if slow else ''}solution must be a subclass of "
                            f"attnlib.{ref.__name__} named {name}, got {solution!r}")
        methods = _methods(solution)
        if not methods:
            raise TypeError(f"{ex.id}: the solution class {name} defines no method")
        pairs = [(f"{ex.object_name}.{name}", fn, getattr(ref, name, None)) for name, fn in methods.items()]
    else:
        pairs = [(ex.id, solution, ref)]
    for name, fn, reference in pairs:
        if reference is None or _parameters(fn) != _parameters(reference):
            raise TypeError(f"{name}: the solution's parameters must be the reference's, "
                            f"{inspect.signature(_function(reference)) if reference else 'no such reference'}; "
                            f"got {inspect.signature(_function(fn))}")
    if isinstance(solution, type):
        return class_stub(ref, {name: body_source(fn) for name, fn in _methods(solution).items()})
    return function_stub(ref, body_source(solution))


def test_source(ex_id: str, obj_name: str) -> str:
    begin, end = HIDDEN_BLOCK
    return (f'from attnlib.grading import check\n'
            f'check("{ex_id}", {obj_name})\n'
            f'{begin}\n'
            f'check("{ex_id}", {obj_name}, hidden=True)\n'
            f'{end}')


def explore_source(explore, learner_objects: dict[str, tuple[str, list[str]]]) -> str:
    """An explore cell: its function's docstring as the opening comment, its body inside the
    one wrapper that turns the stubs' NotImplementedError into a sentence naming what to write:
    the learner's objects the body uses, and those their solutions use, found in the code.

    ``learner_objects`` maps each object of the notebook to (how to name it, the other objects
    of the notebook its solution uses)."""
    doc = inspect.getdoc(explore)
    if not doc:
        raise ValueError(f"{explore.__name__}: an explore function needs a docstring (the cell's comment)")
    comment = ["# Explore (not graded). " + doc.splitlines()[0]] + ["# " + line for line in doc.splitlines()[1:]]
    used = [name for name in _free_names(explore, annotations=False) if name in learner_objects]
    for name in used:  # what the learner's code calls may be unwritten too
        used += [n for n in learner_objects[name][1] if n not in used]
    if not used:
        raise ValueError(f"{explore.__name__} uses none of the notebook's exercises")
    what = " or ".join(learner_objects[name][0] for name in used)
    what = what[0].upper() + what[1:] if what.startswith("a method") else what  # starts a sentence
    cells = "the cells above" if len(used) > 1 else "the cell above"
    message = f"{what} is not written yet: fill in {cells} and run this one again."
    body = textwrap.indent(body_source(explore), "    ")
    return "\n".join(comment + ["try:", body.rstrip("\n"), "except NotImplementedError:",
                                f"    print({json.dumps(message)})"])


def _solution_functions(ex: Exercise, slow: bool = False) -> list:
    solution = ex.slow if slow else ex.solution
    if solution is None:
        return []
    return list(_methods(solution).values()) if isinstance(solution, type) else [solution]


def learner_objects(exercises: list[Exercise]) -> dict[str, tuple[str, list[str]]]:
    """Each object the learner writes: how a sentence names it (``softmax``,
    ``ElmanRNN.forward``, ``a method of MultiHeadAttention``) and the notebook's other objects
    its solution uses."""
    found: dict[str, tuple[str, list[str]]] = {}
    for ex in exercises:
        obj = ex.object_name
        if obj in found:
            continue
        if isinstance(ex.solution, type):
            methods = list(_methods(ex.solution))
            label = f"{obj}.{methods[0]}" if len(methods) == 1 else f"a method of {obj}"
        else:
            label = obj
        found[obj] = (label, [])
    for ex in exercises:
        calls = found[ex.object_name][1]
        for fn in _solution_functions(ex):
            calls += [n for n in _free_names(fn, annotations=False) if n in found and n != ex.object_name and n not in calls]
    return found


def nbgrader_fields(**fields) -> dict:
    return {"nbgrader": {**fields, "schema_version": 3}}


def grade_id(name: str) -> str:
    return name.replace(".", "_")


def _cell(kind: str, source: str, cell_id: str, metadata: dict | None = None):
    cell = (new_code_cell if kind == "code" else new_markdown_cell)(source, metadata=metadata or {})
    cell["id"] = cell_id
    return cell


def chapter_title(assignment: str, root: Path = REPO) -> str:
    """The chapter's title, the first heading of its book page."""
    page = root / "book" / f"{assignment}.md"
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    raise ValueError(f"{page} has no title (a line starting with '# ')")


def _check_names(assignment: str, module: ModuleType, objects: dict) -> None:
    """Every global name a solution (the slow one too) or explore function reads exists in the
    notebook."""
    namespace: dict = {}
    exec(compile(BASE_IMPORTS + module.IMPORTS, f"<{assignment} imports>", "exec"), namespace)
    for ex in module.EXERCISES:
        explore = [ex.explore] if ex.explore else []
        for fn in _solution_functions(ex) + _solution_functions(ex, slow=True) + explore:
            missing = [n for n in _free_names(fn) if n not in namespace and n not in objects]
            if missing:
                raise NameError(f"{assignment}: {fn.__qualname__} uses {missing}, which the notebook "
                                f"does not define (add the import to IMPORTS in {module.__name__})")


def build_notebook(assignment: str, slow: bool = False) -> nbformat.NotebookNode:
    """The solution notebook of ``assignment`` (``slow``: with the slow solutions in the
    solution cells, as a learner who wrote loops would submit it; used by the tests)."""
    module = CHAPTERS[assignment]
    number = int(assignment[:2])
    title = chapter_title(assignment)
    exercises: list[Exercise] = module.EXERCISES
    ids = [e.id for e in exercises]
    registered = [k for k, e in EXERCISES.items() if e.chapter == number]
    if sorted(ids) != sorted(registered):
        raise ValueError(f"{assignment}: the notebook has {ids}, attnlib.grading registers {registered}")
    objects = learner_objects(exercises)
    _check_names(assignment, module, objects)
    total = sum(e.points for e in exercises)
    listing = "\n".join(f"| `{e.id}` | {e.points} |" for e in exercises)
    source_file = Path(module.__file__).relative_to(REPO).as_posix()
    rules = getattr(module, "RULES", RULES).strip("\n")  # a chapter may say it its own way
    loops = getattr(module, "LOOPS", LOOPS).strip("\n")
    intro = f"""\
<!-- Written by tools/build_exercises.py from {source_file}: edit that file, then run `make release`. -->
# Chapter {number} exercises: {title}

{module.INTRO.strip(chr(10))}

These exercises go with Chapter {number} of the book, *{title}*; the sections to read
are named next to each exercise.

| exercise | points |
|---|---|
{listing}
| **total** | **{total}** |

**How this notebook works.** Run the first two code cells first: the install cell, which
on Google Colab installs the course package `attnlib` from the course's repository (anywhere
it is already installed it does nothing), and the imports. Replace each
`raise NotImplementedError` by your code, then run the test cell below it: it checks your
result against the course's reference on the visible cases and names the mistake when it
recognises one. Hidden cases, with more edge cases, are run when the notebook is graded;
each test cell is worth its points only if every case passes. The *explore* cells are not
graded (the grader does not run them): they put your result next to the reference. {rules}

**Time limits.** Each graded case may take the larger of {DEFAULT_STEP_TIMEOUT:g} s and
{CASE_TIME_MULTIPLE} times the reference's own time on it (the test cells measure it too, and the
grader stops a call at its limit); each of your own cells may take {DEFAULT_STEP_TIMEOUT:g} s.
{loops}"""

    imports = BASE_IMPORTS + (module.IMPORTS.strip("\n") + "\n" if module.IMPORTS.strip() else "")
    cells = [
        _cell("markdown", intro, "intro"),
        _cell("code", install_source().rstrip("\n"), "install"),
        _cell("code", imports, "imports"),
    ]
    done_objects: set[str] = set()
    for ex in exercises:
        obj, gid = ex.object_name, grade_id(ex.id)
        if ex.guide is not None:
            text = f"## `{obj}`\n\n" + ex.guide
            if ex.hints:
                text += "\n\n**Hints**\n\n" + "\n".join(f"- {h}" for h in ex.hints)
            cells.append(_cell("markdown", text, f"{gid}-guide"))
        if obj not in done_objects:
            done_objects.add(obj)
            cells.append(_cell("code", solution_cell_source(ex, slow), f"{grade_id(obj)}-solution",
                               nbgrader_fields(grade=False, grade_id=f"{grade_id(obj)}-solution",
                                               locked=False, solution=True)))
        cells.append(_cell("code", test_source(ex.id, obj), f"test_{gid}",
                           nbgrader_fields(grade=True, grade_id=f"test_{gid}", locked=True,
                                           points=ex.points, solution=False)))
        if ex.explore is not None:
            cells.append(_cell("code", explore_source(ex.explore, objects), f"{gid}-explore"))
    cells.append(_cell("markdown", f"""\
## When you are done

Run every cell from the top (*Kernel → Restart & Run All*): the test cells must pass in a
fresh kernel, not only after your experiments. This notebook is worth {total} points.""",
                       "done"))
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nb.nbformat, nb.nbformat_minor = 4, 5
    nbformat.validate(nb)
    return nb

def write_sources(root: Path) -> list[Path]:
    paths = []
    for assignment in CHAPTERS:
        path = root / SOURCE_DIR / assignment / f"{assignment}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(build_notebook(assignment), str(path))
        paths.append(path)
    return paths


README_TOTALS = re.compile(r"\((\d+) notebooks,(\s+)(\d+) graded(\s+)items,(\s+)(\d+) points\)")


def write_readme_totals(root: Path) -> bool:
    """Rewrite the README's "(N notebooks, M graded items, P points)" from the authoring modules
    (line breaks kept); True if the README changed. A README without the phrase is an error."""
    readme = root / "README.md"
    if not readme.exists():  # a course root without a README (the tests' throw-away roots)
        return False
    exercises = [ex for module in CHAPTERS.values() for ex in module.EXERCISES]
    text = readme.read_text(encoding="utf-8")
    if not README_TOTALS.search(text):
        raise ValueError("README.md no longer says '(N notebooks, M graded items, P points)'")
    new = README_TOTALS.sub(lambda m: f"({len(CHAPTERS)} notebooks,{m[2]}{len(exercises)} graded{m[4]}items,"
                                      f"{m[5]}{sum(ex.points for ex in exercises)} points)", text, count=1)
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


def release(root: Path) -> None:
    """``nbgrader generate_assignment`` for every assignment, without a database.

    One nbgrader process for all of them (the assignment id is a glob, which nbgrader
    expands over ``solutions/``): the same notebooks as one call per assignment, in a
    fraction of the time. ``--no-db`` keeps nbgrader from writing a gradebook.
    """
    nbgrader = Path(sys.executable).with_name("nbgrader")
    cmd = [str(nbgrader)] if nbgrader.exists() else [sys.executable, "-m", "nbgrader"]
    cmd += ["generate_assignment", "[0-9][0-9]_*", "--force", "--no-db", "--quiet",
            f"--CourseDirectory.root={root}"]
    release_dir = root / RELEASE_DIR
    if release_dir.exists():  # nothing stale: notebooks/ holds exactly this release
        shutil.rmtree(release_dir)
    subprocess.run(cmd, cwd=root, check=True)
    released = sorted(p.name for p in release_dir.iterdir())
    if released != sorted(CHAPTERS):
        raise RuntimeError(f"nbgrader released {released}, expected {sorted(CHAPTERS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", action="store_true", help="also run nbgrader into notebooks/")
    parser.add_argument("--root", type=Path, default=REPO, help="course root (default: the repository)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if root != REPO and not (root / "nbgrader_config.py").exists():
        shutil.copy(REPO / "nbgrader_config.py", root / "nbgrader_config.py")
    for path in write_sources(root):
        print("wrote", path.relative_to(root))
    if write_readme_totals(root):
        print("updated the totals in README.md")
    if args.release:
        release(root)
        print("released into", root / RELEASE_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
