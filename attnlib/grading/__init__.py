"""Check logic of the graded exercises (see :mod:`attnlib.grading.core`).

``EXERCISES`` maps each exercise id (the learner's function name) to its
:class:`Exercise`; importing this package registers every chapter's exercises
(:mod:`attnlib.grading.exercises`, one module per chapter).

In an nbgrader test cell::

    from attnlib.grading import check
    check("softmax", softmax)
"""

from __future__ import annotations

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
from . import exercises  # noqa: E402,F401  (registers every chapter's exercises)

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
