"""The exercise notebooks as their authors write them: one module per chapter.

``chNN_<topic>.py`` holds what the notebook ``NN_<topic>`` says and does, in real Python that is
imported (and linted by the tests): ``INTRO`` (the notebook's opening text), ``IMPORTS`` (the
lines its imports cell adds to the common ones) and ``EXERCISES``, a list of :class:`Exercise`
in the notebook's order. A solution is a real function with the reference's signature, or, for
a method, a subclass of the reference class that defines the graded methods; an explore cell is
a function without arguments. Importing a chapter module therefore runs nothing, yet a syntax or
name error shows at once, and the module works as the solution notebook does: its explore
functions can be called.

``tools/build_exercises.py`` turns each module into ``solutions/NN_<topic>/NN_<topic>.ipynb``
(nbgrader's source) and, with ``--release``, ``notebooks/``. The chapter's title comes from its
book page; its number and notebook name from the module's file name. The graded cases and named
mistakes live in ``attnlib/grading/exercises/chNN_<topic>.py`` (or its package ``chNN_<topic>/``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Exercise:
    """One graded item of a notebook.

    ``id`` is the exercise's id in ``attnlib.grading.EXERCISES`` (``"softmax"``,
    ``"MultiHeadAttention.forward"``); ``points`` what its test cell is worth; ``solution`` the
    solution function, or the solution class (a subclass of the reference whose own methods are
    the ones the learner writes; the exercises of one class share it); ``guide`` the markdown
    above the solution cell (``None``: the guide of an earlier exercise of the same class covers
    it); ``hints`` one bullet each; ``explore`` an ungraded cell after the test cell: a function
    whose docstring becomes the cell's opening comment and whose body the cell's code;
    ``slow`` a correct solution written the slow way a learner might (Python loops over the
    batch, the heads, the positions or the tiles where ``solution`` vectorises), in the same
    form (for a method, a subclass of the reference named ``Slow<Object>``). It is in no
    notebook, but the tests grade it with ``attnlib grade`` and with ``nbgrader autograde``:
    it must get full marks within the grader's time limits.
    """

    id: str
    points: int
    solution: Callable | type
    guide: str | None = None
    hints: tuple[str, ...] = ()
    explore: Callable[[], None] | None = None
    slow: Callable | type | None = None

    def __post_init__(self) -> None:
        if isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < 1:
            raise ValueError(f"exercise {self.id!r}: points must be a positive int, got {self.points!r}")
        if isinstance(self.hints, str):
            raise TypeError(f"exercise {self.id!r}: hints must be a tuple of strings, not one string")
        if self.guide is not None:
            object.__setattr__(self, "guide", self.guide.strip("\n"))

    @property
    def object_name(self) -> str:
        """The notebook object the learner writes: ``MultiHeadAttention`` for
        ``MultiHeadAttention.forward``."""
        return self.id.split(".")[0]


CHAPTER_MODULES = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name[:2] == "ch"
                         and m.name[2:4].isdigit())


def assignment_name(module_name: str) -> str:
    """``ch02_queries_keys_values`` -> ``02_queries_keys_values`` (the notebook's name)."""
    return module_name[2:]


def chapters() -> dict[str, ModuleType]:
    """Every chapter's authoring module, by notebook name, in chapter order."""
    return {assignment_name(name): importlib.import_module(f"{__name__}.{name}")
            for name in CHAPTER_MODULES}
