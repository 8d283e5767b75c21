"""The graded exercises, one module per chapter of the book.

Each ``chNN_<topic>.py`` holds its chapter's cases, its catalogue of common mistakes and the
``register(...)`` calls; its docstring lists its exercise ids. Importing this package
imports every chapter module in chapter order, which registers the exercises in
:data:`attnlib.grading.core.EXERCISES`. A new chapter's module is found by its file name:
nothing here names a chapter.
"""

from __future__ import annotations

import importlib
import pkgutil

CHAPTER_MODULES = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name[:2] == "ch"
                         and m.name[2:4].isdigit())

for _name in CHAPTER_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
