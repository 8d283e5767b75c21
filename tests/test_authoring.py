"""The exercises' authoring modules (``tools/exercises/chNN_topic.py``) and the guide to them.

* the modules are real, lint-clean Python whose explore functions run, with the solutions
  standing in for the learner's code, and they declare exactly the registered exercises;
* the builder refuses a solution whose parameters differ from the reference's, a name the
  notebook does not define and an explore cell without its comment, and it writes the README's
  totals;
* ``book/AUTHORING.md``'s "Add an exercise to a chapter" steps, followed on a throw-away copy of
  the repository with a toy exercise, give notebooks that grade: the solution passes, the
  released stub fails, a catalogued mistake is named; and they touch only the files they name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attnlib.grading import EXERCISES  # noqa: E402
from tools.exercises import Exercise, chapters  # noqa: E402

CHAPTERS = chapters()


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_exercises", REPO / "tools" / "build_exercises.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


# --------------------------------------------------------------------------- the modules


def test_authoring_modules_and_builder_are_lint_clean():
    run = subprocess.run([sys.executable, "-m", "pyflakes", "tools"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_the_registry_holds_exactly_the_exercises_of_the_authoring_modules():
    declared = {ex.id: int(name[:2]) for name, module in CHAPTERS.items() for ex in module.EXERCISES}
    registered = {ex_id: ex.chapter for ex_id, ex in EXERCISES.items()}
    assert declared == registered
    chapters_in_book = sorted(p.stem for p in (REPO / "book").glob("[0-9][0-9]_*.md"))
    assert list(CHAPTERS) == chapters_in_book, "one authoring module per book chapter"


@pytest.mark.parametrize("assignment", list(CHAPTERS))
def test_every_exercise_has_a_slow_solution_that_passes_in_process(assignment):
    """Each exercise's ``slow`` solution (issue 12: loops where a learner would write loops) is
    there, in the solution's form, renders into a notebook, and passes the visible and hidden
    cases with ``check()`` (``tests/test_course.py`` grades it with both graders)."""
    from attnlib.grading import check

    for ex in CHAPTERS[assignment].EXERCISES:
        assert ex.slow is not None, f"{ex.id}: no slow solution (Exercise.slow)"
        assert ex.slow is not ex.solution and isinstance(ex.slow, type) == isinstance(ex.solution, type), ex.id
        assert builder.solution_cell_source(ex, slow=True) != builder.solution_cell_source(ex), ex.id
        check(ex.id, ex.slow)
        check(ex.id, ex.slow, hidden=True)
    builder.build_notebook(assignment, slow=True)


@pytest.mark.parametrize("assignment", list(CHAPTERS))
def test_explore_functions_run_with_the_solutions(assignment):
    """An authoring module works as its solution notebook does: every explore function runs,
    calling the module's solutions where the notebook calls the learner's code."""
    explores = [ex.explore for ex in CHAPTERS[assignment].EXERCISES if ex.explore]
    assert explores, f"{assignment} has no explore cell"
    for explore in explores:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                explore()
        finally:
            plt.close("all")
        assert out.getvalue().strip(), f"{explore.__name__} printed nothing"


def test_every_notebook_names_its_authoring_file_first():
    for assignment, module in CHAPTERS.items():
        source = Path(module.__file__).relative_to(REPO).as_posix()
        for kind in ("solutions", "notebooks"):
            nb = json.loads((REPO / kind / assignment / f"{assignment}.ipynb").read_text())
            first = "".join(nb["cells"][0]["source"]).splitlines()[0]
            assert first.startswith("<!--") and source in first and "make release" in first, (kind, first)


# --------------------------------------------------------------------------- builder guards


def softmax(x, axis=-1):  # a "solution" whose parameter is misnamed
    return x


def causal_mask(L, S=None, device=None):  # uses a name no notebook defines
    return undefined_helper(L, S)  # noqa: F821


def explore_without_comment():
    causal_mask(3)


def _fake_chapter(monkeypatch, assignment: str, exercises: list[Exercise]) -> None:
    module = types.ModuleType(f"tools.exercises.ch{assignment}")
    module.__file__ = str(REPO / "tools" / "exercises" / f"ch{assignment}.py")
    module.INTRO, module.IMPORTS, module.EXERCISES = "A test chapter.", "", exercises
    monkeypatch.setitem(builder.CHAPTERS, assignment, module)
    monkeypatch.setattr(builder, "EXERCISES", {ex.id: EXERCISES[ex.id] for ex in exercises}
                        | {k: v for k, v in EXERCISES.items() if not k.startswith(("softmax", "causal"))})


def test_a_solution_must_take_the_references_parameters(monkeypatch):
    _fake_chapter(monkeypatch, "02_queries_keys_values", [Exercise("softmax", points=1, solution=softmax),
                                                         *CHAPTERS["02_queries_keys_values"].EXERCISES[1:]])
    with pytest.raises(TypeError, match=r"softmax: the solution's parameters must be the reference's, \(x: "):
        builder.build_notebook("02_queries_keys_values")


def test_a_name_the_notebook_does_not_define_fails_the_build(monkeypatch):
    masks = CHAPTERS["05_self_cross_masks"].EXERCISES
    _fake_chapter(monkeypatch, "05_self_cross_masks",
                  [Exercise("causal_mask", points=1, solution=causal_mask), *masks[1:]])
    with pytest.raises(NameError, match=r"causal_mask uses \['undefined_helper'\].*add the import to IMPORTS"):
        builder.build_notebook("05_self_cross_masks")


def test_an_explore_cell_needs_its_comment():
    with pytest.raises(ValueError, match="needs a docstring"):
        builder.explore_source(explore_without_comment, {"causal_mask": ("causal_mask", [])})


def test_exercise_fields_are_checked():
    with pytest.raises(ValueError, match="points must be a positive int"):
        Exercise("softmax", points=0, solution=softmax)
    with pytest.raises(TypeError, match="hints must be a tuple"):
        Exercise("softmax", points=1, solution=softmax, hints="one string")


def test_the_readme_totals_are_written_by_the_builder(tmp_path):
    readme = REPO / "README.md"
    stale = re.sub(r"\(\d+ notebooks,", "(3 notebooks,", readme.read_text(), count=1)
    (tmp_path / "README.md").write_text(stale)
    assert builder.write_readme_totals(tmp_path) is True
    assert (tmp_path / "README.md").read_text() == readme.read_text(), "the committed README is stale"
    assert builder.write_readme_totals(tmp_path) is False
    (tmp_path / "README.md").write_text("no totals here\n")
    with pytest.raises(ValueError, match="no longer says"):
        builder.write_readme_totals(tmp_path)


# --------------------------------------------------------------------------- the guide, followed

GUIDE = REPO / "book" / "AUTHORING.md"
CHAPTER = "05_self_cross_masks"  # the chapter that receives the toy exercise
CONCEPT = "masks"

TOY_REFERENCE = '''

def local_mask(L: int, width: int) -> Tensor:
    """A toy exercise of tests/test_authoring.py (chapter 5): the (L, L) mask whose query ``i``
    may attend to the keys ``j`` with ``|i - j| < width``."""
    pos = torch.arange(L)
    return (pos[:, None] - pos[None, :]).abs() < width  # (L, L)
'''

TOY_GRADING = '''

# --------------------------------------------------------------------------- local_mask (a toy)

from ...masks import local_mask  # noqa: E402


def _local_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [Case("L=5, width=2", (5, 2)), Case("L=4, width=1", (4, 1))]
    return [Case("L=1, width=1", (1, 1)), Case("width beyond L", (3, 5)), Case("L=6, width=3", (6, 3))]


def _local_inclusive(L: int, width: int) -> Tensor:
    pos = torch.arange(L)
    return (pos[:, None] - pos[None, :]).abs() <= width


register(Exercise(
    id="local_mask",
    chapter=5,
    reference=local_mask,
    section=f"{PAGE}#the-maths",
    make_cases=_local_cases,
    mistakes=(Mistake("<= instead of <", "keys at distance width are outside the window.",
                      f"{PAGE}#the-maths", _local_inclusive),),
    forbidden=NO_ATTNLIB,
))
'''

TOY_NOTEBOOK = '''

def local_mask(L: int, width: int) -> Tensor:
    pos = torch.arange(L)
    return (pos[:, None] - pos[None, :]).abs() < width  # (L, L)


def explore_local_mask() -> None:
    """The band of a local mask, yours beside attnlib's."""
    print(local_mask(5, 2).int())
    print("equal to attnlib's:", torch.equal(local_mask(5, 2), attnlib.local_mask(5, 2)))


# Slow: loops over the queries i and the keys j, one entry at a time.
def slow_local_mask(L: int, width: int) -> Tensor:
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            mask[i, j] = abs(i - j) < width
    return mask


EXERCISES.append(Exercise(
    "local_mask",
    points=2,
    solution=local_mask,
    guide="Return the mask of a window of `width` keys around each query (Chapter 5, section *The maths*).",
    hints=("`torch.arange(L)` twice, as a column and as a row, gives every distance at once.",),
    explore=explore_local_mask,
    slow=slow_local_mask,
))
'''

RUN_CELLS = '''
import contextlib, io, json, sys
nb = json.load(open(sys.argv[1]))
namespace, result = {"__name__": "__main__"}, {}
for cell in nb["cells"]:
    if cell["cell_type"] != "code":
        continue
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile("".join(cell["source"]), cell["id"], "exec"), namespace)
        result[cell["id"]] = [None, out.getvalue()]
    except BaseException as exc:
        result[cell["id"]] = [type(exc).__name__ + ": " + str(exc), out.getvalue()]
print(json.dumps(result))
'''


def _guide_steps() -> list[str]:
    text = GUIDE.read_text(encoding="utf-8")
    section = text.split("### Add an exercise to a chapter\n", 1)[1].split("\n###", 1)[0]
    section = section.split("\n\n`tests/test_authoring.py`", 1)[0]
    return [step.strip() for step in re.split(r"^\d+\. ", section, flags=re.M)[1:]]


def _named(step: str) -> list[str]:
    """The files and commands a step names (in backquotes)."""
    return re.findall(r"`((?:[\w<>.-]+/)+[\w<>.-]+\.py|make \w+)`", step)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


def _run_cells(root: Path, notebook: Path, env: dict) -> dict:
    run = subprocess.run([sys.executable, "-c", RUN_CELLS, str(notebook)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_guide_to_adding_an_exercise_works_on_a_copy(tmp_path):
    steps = _guide_steps()
    assert len(steps) == 5, "the guide's step list changed: update this test with it"
    named = [_named(step) for step in steps]
    place = {"<concept>": CONCEPT, "NN_topic": CHAPTER, "chNN_topic": f"ch{CHAPTER}"}

    def here(path: str) -> str:
        for key, value in place.items():
            path = path.replace(key, value)
        return path

    reference, grading, notebook = (here(named[i][0]) for i in range(3))
    assert (reference, grading, notebook) == (f"attnlib/{CONCEPT}.py", f"attnlib/grading/exercises/ch{CHAPTER}.py",
                                              f"tools/exercises/ch{CHAPTER}.py"), named[:3]
    assert named[3][0] == "make release" and named[4][0] == "make unit", named[3:]
    makefile = (REPO / "Makefile").read_text()
    for command in (c for step in named for c in step if c.startswith("make ")):
        assert re.search(rf"^{command[5:]}:", makefile, re.M), f"the guide names `{command}`: no such target"
    assert "tools/build_exercises.py --release" in makefile.split("\nrelease:", 1)[1].split("\n\n", 1)[0]

    # a throw-away course: the package, the authoring side, the book's pages and the notebooks
    root = tmp_path / "course"
    ignore = shutil.ignore_patterns("__pycache__", "_build", "*.png", "*.svg", "node_modules")
    for folder in ("attnlib", "tools", "book", "solutions", "notebooks"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    for name in ("README.md", "nbgrader_config.py", "_config.yml", "Makefile"):
        shutil.copy(REPO / name, root / name)
    before = _digest(root)

    # steps 1-3, the three files the guide names
    ref_path = root / reference
    _append(ref_path, TOY_REFERENCE)
    text = ref_path.read_text()
    ref_path.write_text(text.replace("__all__ = [", '__all__ = ["local_mask", ', 1))
    grading_path = root / grading
    text = grading_path.read_text()
    row = re.search(r"^``padding_mask``.*\n", text, re.M)
    assert row, "the chapter 5 grading module no longer lists padding_mask in its docstring table"
    grading_path.write_text(text[:row.end()] + "``local_mask``                       :func:`attnlib.local_mask`\n"
                            + text[row.end():] + TOY_GRADING)
    _append(root / notebook, TOY_NOTEBOOK)

    # step 4: make release, as the Makefile runs it (the copy's attnlib and tools, not ours)
    env = {**os.environ, "PYTHONPATH": str(root), "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, "tools/build_exercises.py", "--release"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "updated the totals in README.md" in run.stdout

    changed = sorted(k for k, v in _digest(root).items() if before.get(k) != v)
    nb_name = f"{CHAPTER}/{CHAPTER}.ipynb"
    assert changed == sorted([reference, grading, notebook, "README.md",
                              f"solutions/{nb_name}", f"notebooks/{nb_name}"]), changed
    items = sum(len(m.EXERCISES) for m in CHAPTERS.values()) + 1
    points = sum(ex.points for m in CHAPTERS.values() for ex in m.EXERCISES) + 2
    assert re.search(rf"{items} graded\s+items, {points} points\)", (root / "README.md").read_text())

    # step 5, for the toy: the notebooks built from it grade as they should
    solution = _run_cells(root, root / "solutions" / nb_name, env)
    assert all(error is None for error, _ in solution.values()), solution
    assert "equal to attnlib's: True" in solution["local_mask-explore"][1]

    released = _run_cells(root, root / "notebooks" / nb_name, env)
    error = released["test_local_mask"][0]
    assert error.startswith("AssertionError: local_mask: 0/2 cases passed") and "not implemented yet" in error, error
    assert released["local_mask-explore"] == [None, "local_mask is not written yet: fill in the cell above "
                                                    "and run this one again.\n"]

    nb = json.loads((root / "solutions" / nb_name).read_text())
    cell = next(c for c in nb["cells"] if c["id"] == "local_mask-solution")
    source = "".join(cell["source"])
    assert "### BEGIN SOLUTION" in source and textwrap.dedent(
        '"""A toy exercise of tests/test_authoring.py (chapter 5)') in source  # the reference's docstring
    cell["source"] = source.replace(").abs() < width", ").abs() <= width")
    wrong = tmp_path / "wrong.ipynb"
    wrong.write_text(json.dumps(nb))
    graded = _run_cells(root, wrong, env)
    error = graded["test_local_mask"][0]
    assert error.startswith("AssertionError") and "<= instead of <" in error, error
