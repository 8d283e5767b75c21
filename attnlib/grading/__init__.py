"""Check logic of the graded exercises (see :mod:`attnlib.grading.core`).

``EXERCISES`` maps each exercise id (the learner's function name) to its
:class:`Exercise`; importing this package registers the exercises of chapters 1-5
(:mod:`attnlib.grading.exercises_early`) and of chapters 6-11
(:mod:`attnlib.grading.exercises_late`, once that module exists).

In an nbgrader test cell::

    from attnlib.grading import check
    check("softmax", softmax)
"""

from __future__ import annotations

import importlib
import importlib.util

from .core import (
    EXERCISES,
    Case,
    CaseResult,
    Exercise,
    Mistake,
    call,
    check,
    grade_function,
    judge,
    register,
)
from . import exercises_early  # noqa: E402,F401  (registers chapters 1-5)

# Chapters 6-11 are written separately; import them when the module exists, and let any
# error inside it surface rather than hiding it behind an ImportError handler.
if importlib.util.find_spec(f"{__name__}.exercises_late") is not None:
    importlib.import_module(f"{__name__}.exercises_late")

__all__ = [
    "Case",
    "CaseResult",
    "EXERCISES",
    "Exercise",
    "Mistake",
    "call",
    "check",
    "grade_function",
    "judge",
    "register",
]
