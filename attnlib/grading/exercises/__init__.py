"""The graded exercises, one module per chapter of the book.

Each ``chNN_<topic>.py`` holds its chapter's cases, its catalogue of common mistakes and the
``register(...)`` calls; its docstring lists its exercise ids. A large chapter is a package
``chNN_<topic>/`` instead, whose ``__init__.py`` holds that docstring and imports its
submodules (one job each) in the order their exercises are registered. Importing this
package imports every chapter module in chapter order, which registers the exercises in
:data:`attnlib.grading.core.EXERCISES`. A new chapter's module is found by its file name:
nothing here names a chapter.

A chapter may need a package that attnlib installs only as an optional extra (chapter 13's
kernels need ``triton``, the extra ``kernels``), and that package may be missing or unusable
in this process (Triton imported by someone else before ``attnlib.triton_flash`` could choose
its interpreter, as ``torch.compile`` does). Such a chapter module raises
:class:`ChapterUnavailable`: it is left out (:data:`UNAVAILABLE`, with the reason) and its
exercises are not registered; every other chapter is graded as usual.
"""

from __future__ import annotations

import importlib
import pkgutil


class ChapterUnavailable(ImportError):
    """Raised while a chapter module is imported: what it needs cannot be used here."""


#: The chapter modules left out, each with the reason.
UNAVAILABLE: dict[str, str] = {}

_FOUND = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name[:2] == "ch" and m.name[2:4].isdigit())

for _name in _FOUND:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ChapterUnavailable as _exc:
        UNAVAILABLE[_name] = str(_exc)

#: The chapter modules imported, in chapter order.
CHAPTER_MODULES = [name for name in _FOUND if name not in UNAVAILABLE]
