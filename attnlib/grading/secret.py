"""The course's private secret, from which the hidden cases of a graded class are drawn.

Without a secret, the hidden cases come from the public package: a learner can run
``check(name, fn, hidden=True)`` before submitting (useful for self-study). An instructor who
grades a class sets a secret, known only to the course staff: the hidden cases then keep
their edge cases and shapes, but every seeded random input (:mod:`.exercises.common` draws
them all) comes from a seed mixed with the secret, so no learner has seen their values.

The secret is read from the environment variable :data:`ENV`, or else from the file
:data:`FILE` in the course folder (the folder of ``nbgrader_config.py``), found by walking up
from the current directory: ``attnlib grade``, ``attnlib grade-class`` and the hidden test
cells run by ``nbgrader autograde`` (whose working directory is inside the course folder) all
find it. Never commit the file (``.gitignore`` lists it) or put it in a released notebook.
Standard library only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "ATTNLIB_GRADING_SECRET"
FILE = ".attnlib_grading_secret"  # beside nbgrader_config.py in the instructor's course folder
COURSE_MARKER = "nbgrader_config.py"

_active: str | None = None  # the secret the hidden cases are being drawn with, if any


def find(start: str | os.PathLike | None = None) -> str | None:
    """The course's secret: :data:`ENV` if set and not empty, else the first line of
    :data:`FILE` in the nearest folder at or above ``start`` (default: the current directory)
    that holds ``nbgrader_config.py``; ``None`` where there is none (public hidden cases)."""
    value = os.environ.get(ENV, "").strip()
    if value:
        return value
    here = Path(start if start is not None else os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / COURSE_MARKER).is_file():
            path = folder / FILE
            if path.is_file():
                text = path.read_text(encoding="utf-8").strip()
                if not text:
                    raise ValueError(f"{path} is empty: write the course's secret on its first line")
                return text.splitlines()[0].strip()
            return None
    return None


def salted(seed: int) -> int:
    """``seed`` itself while no secret is active; else a seed derived from the secret and
    ``seed`` (the same pair always gives the same seed)."""
    if _active is None:
        return seed
    digest = hashlib.sha256(f"{_active}\0{seed}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


@contextmanager
def drawing_with(secret: str | None) -> Iterator[None]:
    """Draw every seeded input made inside the block with ``secret`` (``None``: publicly)."""
    global _active
    if secret is not None and (not isinstance(secret, str) or not secret.strip()):
        raise ValueError("the grading secret must be a non-empty string")
    before, _active = _active, secret
    try:
        yield
    finally:
        _active = before
