"""The child process of ``attnlib grade``: runs the learner's notebook code, never judges it.

Started by :mod:`attnlib.grading.supervisor` through :mod:`attnlib.grading.sandbox` as
``python -I -B -X faulthandler -m attnlib.grading.child GRADER_DIR``: in its own process
group, in a private working directory that holds only a copy of the submission, with a
scrubbed environment and resource limits, and with the wall-clock limits enforced by the
parent. ``GRADER_DIR`` holds:

* ``job.json`` (from the parent): the notebook's code cells to run (not the test cells), the
  cells to ``skip`` (they crashed or hung an earlier attempt), the exercises to call with the
  learner's object name for each, ``start`` (the first exercise to grade: a restarted child
  resumes after the one that crashed the previous attempt), ``step_timeout`` (seconds for one
  cell or one case), ``output_limit`` (bytes one cell or case may print) and
  ``memory_limit`` (bytes, or ``null``);
* ``cases_<k>.pt`` (from the parent): for exercise ``k``, ``{"visible": [...], "hidden":
  [...]}`` of cases as plain dicts (loaded with ``torch.load(weights_only=True)``).

The child writes back, each file atomically (:func:`attnlib.grading.protocol.write_atomic`:
written then renamed), so that a parent that kills it still finds everything finished before:

* ``progress.json``: a step counter, what runs now (``{"phase": "cell", "cell": 5}``,
  ``{"phase": "case", "k": 0, "which": "hidden", "i": 3}`` or ``"extra"`` for the
  exercise's extra check), the errors of the cells run so far, and ``exit`` when the
  notebook called ``os._exit``; the parent times each step and names it when the process
  dies;
* ``out_<k>_<visible|hidden>_<i>.pt``: one file per case, ``{"kind": "value", "value": ...}``
  (tensors, numbers, strings, ``None`` and tuples/lists/dicts of these only),
  ``{"kind": "unsupported", "message": "returned numpy.ndarray ..."}`` or ``{"kind":
  "error", "message": ...}``, and ``"extra"``: the exercise's ``extra_check`` verdict
  (``None`` or a failure message; it runs the learner's code, so it runs here);
* ``status_<k>.json``: written once every case of exercise ``k`` is done (or why not);
* ``done.json`` at the very end.

Graded calls run under a **call watcher** (:class:`CallWatcher`): the exercise's forbidden
callables are resolved when the child starts, before any learner code, and while a graded
call runs, ``sys.setprofile`` sees every Python frame that starts (so a call into a
forbidden Python function or class, or into any module forbidden as a whole such as
``attnlib``, is caught however it was reached: an alias captured in an earlier cell, a
``functools.partial``, a subclass) and every builtin called from Python code; for torch's
builtins a ``TorchFunctionMode`` also sees calls made from C (``map``,
``functools.partial``). The case then fails with "called X, which this exercise forbids".
Calls made by the exercise's own ``extra_check`` (code under ``attnlib/grading``) are not
counted.

The whole run is watched too, not only the graded calls (:class:`RunGuard`, issue 12: a cell
that calls the reference on the public cases and a "solution" that looks the outputs up is
a universal cheat): from the first cell to the end, a profiler that consults every
exercise's watcher at once records a forbidden call made by the learner's code anywhere (a
cell's top level, a ``__del__`` between two cases, a graded function serving the exercises
graded after it) for the exercises it concerns, and an audit hook refuses and records what
no profiler sees (reading attnlib's source or its ``__pycache__``, building a copy of its
code, starting another program); a seccomp filter refuses new processes and threads. An
exercise with such a record fails with its message (in ``status_<k>.json``'s ``error``).
Switching the watcher off during a cell, or replacing the grader's code there, costs every
exercise. The record is kept in the grader's directory, which the learner's code cannot
reach, so that a restarted child still has it.

Everything this module needs is imported, and bound to local names, before the learner's
code runs, so that a notebook that replaces ``torch.save`` and the like does not change what
is written (the comparison itself happens in the parent anyway). The grader's own functions
and classes (here, in :mod:`attnlib.grading.core` and in :mod:`attnlib.grading.protocol`, whose
names and writer this module uses) are recorded before the first cell and put back before
every exercise and every case, with a note, should the notebook replace them (found through
``gc``, say). ``os._exit`` is wrapped to record the call, ``sys.stdout`` and
``sys.stderr`` count what each step prints (block-buffered, flushed at every step), and a
file over the size limit raises ``OSError`` instead of killing the process (``SIGXFSZ``
ignored).
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib
import importlib.util
import io
import json
import linecache
import marshal
import os
import posix
import resource
import signal
import sys
import sysconfig
import threading
import traceback
import types
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from attnlib.grading import EXERCISES, protocol  # noqa: E402
import attnlib.grading.core as _core  # noqa: E402
from attnlib.grading.core import Case, ForbiddenCallError, _forbid, _resolve, call  # noqa: E402

_save, _load, _dumps, _open = torch.save, torch.load, json.dumps, open
_real_exit = os._exit
_real_setprofile = sys.setprofile
_getprofile = sys.getprofile
_threading_setprofile = threading.setprofile
_getframe = sys._getframe
_TensorType = Tensor
_mode_stack = torch.overrides._get_current_function_mode_stack
_pop_mode, _push_mode = torch._C._pop_torch_function_stack, torch._C._push_on_torch_function_stack
_THIS = sys.modules[__name__]  # IPython later puts its own module in sys.modules["__main__"]
_realpath, _fsdecode, _fspath, _add_audit_hook = os.path.realpath, os.fsdecode, os.fspath, sys.addaudithook
_marshal_loads, _linecache = marshal.loads, linecache.cache
_bootstrap, _bootstrap_external = sys.modules["importlib._bootstrap"], sys.modules["importlib._bootstrap_external"]
#: Loading a module (an import statement, a reload, a loader's ``exec_module``): its body runs,
#: its ``.pyc`` is unmarshalled, on the import system's behalf (reading a file is another matter).
_IMPORT_CODES = frozenset(f.__code__ for f in (
    _bootstrap._find_and_load, _bootstrap._load_unlocked, _bootstrap._exec,
    _bootstrap_external._LoaderBasics.exec_module, _bootstrap_external.SourceLoader.get_code,
    _bootstrap_external.SourcelessFileLoader.get_code))
_CHILD_FILE = os.path.abspath(__file__)
_GRADING_DIR = os.path.dirname(_CHILD_FILE) + os.sep
_ATTNLIB_DIR = os.path.dirname(os.path.dirname(_CHILD_FILE)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_PYDOC = os.path.join(sysconfig.get_paths()["stdlib"], "pydoc.py")
#: The whole-run record (see :class:`RunGuard`): private to the child, kept across its attempts.
_RECORD = "whole_run.json"


class StepTimeout(BaseException):
    """Raised by SIGALRM when one cell or one case runs past ``step_timeout``."""


class OutputLimitExceeded(BaseException):
    """Raised when one cell or one case prints more than ``output_limit`` bytes."""


def _on_alarm(signum: int, frame: Any) -> None:
    """The step's time is up: :class:`StepTimeout` in the learner's code. Raised inside the
    call watcher it would switch the watcher off (an exception in a profiler removes it), so
    there it comes back 2 ms later instead."""
    f, depth = frame, 0
    while f is not None and depth < 12:
        if f.f_code in _WATCHER_CODES:
            signal.setitimer(signal.ITIMER_REAL, 0.002)
            return
        f, depth = f.f_back, depth + 1
    raise StepTimeout()


def _arm(seconds: float) -> None:
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _disarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


def _write_json(path: str, obj: Any) -> None:
    protocol.write_atomic(path, _dumps(obj).encode())


def _write_pt(path: str, obj: Any) -> None:
    protocol.write_atomic(path, lambda tmp: _save(obj, tmp))


# --------------------------------------------------------------------------- progress


class Progress:
    """``progress.json``: one step at a time, so that the parent can time it and name it."""

    def __init__(self, grader_dir: str) -> None:
        self.path = os.path.join(grader_dir, protocol.PROGRESS)
        self.step = 0
        self.state: dict = {"phase": protocol.START}
        self.errors: list[dict] = []
        self.notes: list[str] = []
        self.exit_code: int | None = None

    def set(self, **state: Any) -> None:
        for stream in (sys.stdout, sys.stderr):  # block-buffered: the log gets each step's output
            try:
                stream.flush()
            except BaseException:
                pass
        self.step += 1
        self.state = state
        self.write()

    def write(self) -> None:
        _write_json(self.path, {"step": self.step, **self.state, "errors": self.errors,
                                "notes": self.notes, "exit": self.exit_code})


_progress: Progress | None = None


def _exit_hook(code: int = 0) -> None:
    """``os._exit`` as the notebook sees it: the call is recorded before the process ends."""
    if _progress is not None:
        try:
            _progress.exit_code = int(code)
            _progress.write()
        except BaseException:
            pass
    _real_exit(code)


# --------------------------------------------------------------------------- output


class LimitedStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr``: at most ``limit`` bytes per step, then
    :class:`OutputLimitExceeded`; the parent also counts the raw bytes (a notebook that
    writes to the file descriptor directly is stopped there)."""

    def __init__(self, stream: Any, counter: list[int], limit: int) -> None:
        self._stream, self._counter, self._limit = stream, counter, limit

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self._counter[0] += len(s)
        if self._counter[0] > self._limit:
            self._counter[0] = 0  # the message below must get through
            raise OutputLimitExceeded()
        return self._stream.write(s)

    def flush(self) -> None:
        self._stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:  # buffer, name, mode... of the real stream
        return getattr(self._stream, name)


# --------------------------------------------------------------------------- call watcher


def _trusted_roots() -> tuple[str, ...]:
    import attnlib

    roots = {os.path.dirname(os.path.abspath(attnlib.__file__))}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.abspath(path))
    for p in sys.path:
        if p and ("site-packages" in p or "dist-packages" in p):
            roots.add(os.path.abspath(p))
    return tuple(sorted(roots))


_TRUSTED_ROOTS: tuple[str, ...] = ()
_trusted_cache: dict[str, bool] = {}
#: Files of code the notebook compiled or built itself, under whatever name it chose
#: (``compile(src, "/usr/lib/python3.11/os.py", "exec")``, ``code.replace(co_filename=...)``,
#: a cell compiled under a library's name): its code, not a library's (see :class:`RunGuard`).
_LEARNER_FILES: set[str] = set()


def _trusted(filename: str) -> bool:
    """Whether code from ``filename`` is a library's (the standard library, site-packages,
    attnlib), not the notebook's."""
    global _TRUSTED_ROOTS
    if filename in _LEARNER_FILES:
        return False
    known = _trusted_cache.get(filename)
    if known is None:
        if not _TRUSTED_ROOTS:
            _TRUSTED_ROOTS = _trusted_roots()
        path = os.path.abspath(filename) if filename.startswith(os.sep) else filename
        known = path.startswith("<frozen ") or any(path.startswith(r + os.sep) for r in _TRUSTED_ROOTS)
        _trusted_cache[filename] = known
    return known


_MODE_CALLBACKS = frozenset({"__torch_dispatch__", "__torch_function__"})


class _WatchMode(TorchFunctionMode):
    """Sees torch's builtins however they are called (also from C: ``map``, ``partial``)."""

    def __init__(self, watcher: "CallWatcher") -> None:
        super().__init__()
        self.watcher = watcher
        #: the whole run's guard and the builtins only the exercises graded later forbid (RunGuard.pause)
        self.also: Any = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        also = self.also
        try:  # keyed by the function itself: id() would raise an audit event at every torch call
            if also is not None and func in also[1]:
                also[0].flag(also[0].torch_funcs[func], _getframe(1))
            name = self.watcher.torch_funcs.get(func)
        except TypeError:  # an unhashable callable: not one of the forbidden ones
            name = None
        if name is not None:
            self.watcher.hit(name, _getframe(1))
        return func(*args, **(kwargs or {}))


def _exercise_files(grading_dir: str) -> frozenset[str]:
    """The grader's files whose code may use forbidden names on its own behalf (the
    exercises' cases and extra checks, the class tools): every ``.py`` file under
    ``grading_dir``, the chapter modules in ``exercises/`` included, except the grader's own
    machinery at the top level (whose calls never come from a check)."""
    own = {"core.py", "child.py", "runner.py", "supervisor.py", "report.py", "sandbox.py", "notebook.py",
           "protocol.py", "__init__.py", "compare.py", "site.py", "summary.py", "stopping.py"}
    files = set()
    for top, _dirs, names in os.walk(grading_dir):
        for f in names:
            if f.endswith(".py") and not (top == grading_dir and f in own):
                files.add(os.path.join(top, f))
    return frozenset(files)


_EXERCISE_FILES = _exercise_files(_GRADING_DIR.rstrip(os.sep))


def _entry_codes() -> frozenset[types.CodeType]:
    """The exercises' code a notebook may call itself: each exercise's ``make_cases`` (the
    cases are public) and ``build_args`` (arguments from a case), and the input helpers of
    ``exercises/common.py`` (seeded tensors). Everything else there (the catalogued mistakes,
    the correct helpers they are built from, the extra checks) is the grader's own answer key."""
    from attnlib.grading.exercises import common

    codes = {getattr(f, "__code__", None) for e in EXERCISES.values() for f in (e.make_cases, e.build_args)}
    codes |= {getattr(getattr(common, n, None), "__code__", None)
              for n in ("randn", "rand_bool", "state_dict", "clone_args")}
    codes.discard(None)
    return frozenset(codes)  # type: ignore[arg-type]


_ENTRY_CODES = _entry_codes()
#: Where the grader calls the learner's object (the function, the class, its method): the
#: exercises' own code entered from there *is* the learner's object.
_STUDENT_SITES = frozenset({_core.call.__code__, _core._build.__code__})
_IMPORT = "<an import>"  # what _origin answers for an import statement (a str, but never `is` another)
_MODE_OFF = frozenset(f for f in (torch._C._pop_torch_function_stack,
                                  getattr(torch._C, "_set_torch_function_state", None)) if f is not None)
_DisableTorchFunction = torch._C.DisableTorchFunction


def _mode_off(fn: Any) -> bool:
    """``fn`` (a builtin about to be called) takes the torch function modes away: it pops
    them, sets their state, or enters or leaves a ``DisableTorchFunction`` block (``with``
    shows only its ``__exit__``)."""
    return fn in _MODE_OFF or type(getattr(fn, "__self__", None)) is _DisableTorchFunction


def _qualname(code: types.CodeType) -> str:
    return getattr(code, "co_qualname", code.co_name)


def _dotted_file(path: str) -> str:
    """``/.../attnlib/grading/exercises/ch02_x.py`` -> ``attnlib.grading.exercises.ch02_x``."""
    rel = os.path.relpath(path, os.path.dirname(_ATTNLIB_DIR.rstrip(os.sep)))
    if "__pycache__" in rel:
        head, tail = os.path.split(rel)
        rel = os.path.join(os.path.dirname(head), tail.split(".")[0] + ".py")
    rel = rel[:-3] if rel.endswith(".py") else rel
    dotted = rel.replace(os.sep, ".")
    return dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted


def _short(path: str) -> str:
    """An attnlib file as the learner sees it: ``attnlib/attention.py``."""
    return os.path.relpath(path, os.path.dirname(_ATTNLIB_DIR.rstrip(os.sep)))


def _code_tree(obj: Any, found: list, depth: int = 0) -> list:
    """Every code object in ``obj`` (a code object, or tuples and lists holding some), the
    nested ones (functions defined inside functions, classes, comprehensions) included."""
    if depth > 50:
        return found
    if isinstance(obj, types.CodeType):
        found.append(obj)
        for const in obj.co_consts:
            if isinstance(const, types.CodeType):
                _code_tree(const, found, depth + 1)
    elif isinstance(obj, (tuple, list, frozenset, set)):
        for item in obj:
            _code_tree(item, found, depth + 1)
    return found


#: Shorter bytecode than this is too common to call a copy of the reference (``return x``).
_MIN_CODE = 32


def _sources_of(path: str) -> list[str]:
    """A module file and the byte-compiled copies Python keeps of it (``__pycache__``)."""
    paths = [_realpath(path)]
    for opt in ("", 1, 2):
        try:
            paths.append(_realpath(importlib.util.cache_from_source(path, optimization=opt)))
        except (NotImplementedError, ValueError):
            pass
    return paths


def _origin(frame: Any, reads: bool = False) -> str | None:
    """Whether the notebook's code is behind an event seen at ``frame`` (a call, a file opened,
    code built): the text for a message (``""``, or ``" (through attnlib.grading's check)"``
    when the grader's public functions ran it), ``None`` when the grader did it (one of its
    roots below, the exercises' own check code, an instrument of attnlib), or ``_IMPORT`` for an
    import statement. With ``reads``, imports are no excuse, and attnlib's own code reading its
    files (a warning's source line) and pydoc's ``help()`` (docstrings only) are."""
    via = ""
    f = frame
    while f is not None:
        code = f.f_code
        if code in _ROOTS:
            return None
        if code in _IMPORT_CODES and not reads:
            return _IMPORT
        filename = code.co_filename
        if filename in _EXERCISE_FILES:
            return None
        if not _trusted(filename):
            return via
        if filename.startswith(_ATTNLIB_DIR):
            if filename.startswith(_GRADING_DIR):
                if filename != _CHILD_FILE:
                    via = f" (through attnlib.grading's {code.co_name})"
            elif reads or code.co_name in _MODE_CALLBACKS:
                return None
        elif reads and filename == _PYDOC:
            return None
        f = f.f_back
    return None


def _entry_origin(frame: Any) -> bool:
    """Whether the learner's code entered the exercises' own code from ``frame`` (the mistakes,
    the correct helpers they are built from): called by the notebook's code (libraries such
    as functools or torch in between), or handed to the grader as the learner's object (entered
    from :func:`attnlib.grading.core.call` on the grader's behalf, ``functools.partial`` and
    the like included). Not: the exercises' code calling itself, an import, the grader's own
    calls (an extra check, the cases), or the catalogued mistakes run by ``check()``'s judge."""
    student = False
    f = frame
    while f is not None:
        code = f.f_code
        filename = code.co_filename
        if filename in _EXERCISE_FILES or code in _IMPORT_CODES:
            return False
        if code in _STUDENT_SITES:
            student = True
        elif filename == _CHILD_FILE:
            return student
        elif filename.startswith(_GRADING_DIR):
            return False
        elif not _trusted(filename):
            return True
        f = f.f_back
    return False


def _tamper_origin(frame: Any) -> bool:
    """Whether the notebook's own code (not torch or attnlib on its behalf) switches a part of
    the watcher at ``frame`` (a profiler, the torch function modes)."""
    f = frame
    while f is not None:
        filename = f.f_code.co_filename
        if filename.startswith((_ATTNLIB_DIR, _TORCH_DIR)) and filename not in _LEARNER_FILES:
            return False
        if not _trusted(filename):
            return True
        f = f.f_back
    return False


class CallWatcher:
    """Fails a graded call that calls one of ``forbidden`` (dotted names, as in
    :attr:`attnlib.grading.core.Exercise.forbidden`), by any route.

    Resolved once, before the learner's code runs: a Python function (its code object), a
    class (the code of its own methods), a module (every code object of its files; for
    ``attnlib``, its reference modules, not ``attnlib.grading`` and not the input checks of
    ``attnlib._validate`` that the released stubs call), a builtin (its identity; a method
    such as ``torch.Tensor.softmax`` by its class and name). :meth:`arm` / :meth:`disarm`
    around each graded call; :attr:`violation` names the first forbidden call (also when the
    learner's code caught the :class:`ForbiddenCallError`). Also resolved, for
    :class:`RunGuard`: the files of the forbidden code under attnlib (:attr:`sources`, with
    their ``__pycache__`` copies) and its bytecode (:attr:`co_codes`), so that a copy of it
    is recognised however it was made. An active watcher also refuses the exercises' own code
    (:data:`_EXERCISE_FILES`: the mistakes, the correct helpers they are built from) when the
    learner's code calls it, but for ``make_cases`` and the input helpers.
    """

    def __init__(self, forbidden: tuple[str, ...], sentinels: tuple[types.CodeType, ...] = ()) -> None:
        self.codes: dict[types.CodeType, str] = {}
        self.files: dict[str, str] = {}
        self.builtins: dict[Any, str] = {}  # keyed by the object (id() raises an audit event)
        self.methods: dict[str, list[tuple[type, str]]] = {}
        self.torch_funcs: dict[Any, str] = {}
        self.sources: dict[str, str] = {}
        self.co_codes: dict[bytes, str] = {}
        self.explicit: set[types.CodeType] = set()  # codes forbidden by name (not as part of a module)
        self._keep: list[Any] = []  # the resolved objects
        self.violation: str | None = None
        self.armed = False
        self.lost = False
        #: while a graded call runs (:meth:`RunGuard.pause`): the guard, and what is forbidden to the
        #: exercises graded later but not to this one (codes, files, builtin ids, method names)
        self.also: Any = None
        self.sentinels = frozenset(sentinels)
        grading_dir = os.path.dirname(os.path.abspath(__file__))
        self._attnlib_dir = os.path.dirname(grading_dir) + os.sep
        self.exempt_files = _exercise_files(grading_dir)
        for dotted in forbidden:
            self._add(dotted)
        self.active = bool(self.codes or self.files or self.builtins or self.methods)
        self.hook = self._make_hook()  # one function: compared by identity
        self.mode = _WatchMode(self) if self.torch_funcs else None

    # ------------------------------------------------------------------ resolution

    def _add(self, dotted: str) -> None:
        try:
            module = importlib.import_module(dotted)
        except ImportError:
            module = None
        if module is not None:
            self._add_module(module, dotted)
            return
        resolved = _resolve(dotted)
        if resolved is None:
            return
        self._add_object(getattr(*resolved), dotted)

    def _add_module(self, module: types.ModuleType, dotted: str) -> None:
        path = getattr(module, "__file__", None)
        if not path:
            return
        if os.path.basename(path) == "__init__.py":
            root = os.path.dirname(os.path.abspath(path))
            skip = os.path.join(root, "grading")
            for top, dirs, files in os.walk(root):
                if top == skip or top.startswith(skip + os.sep):
                    continue
                for f in files:
                    if f.endswith(".py") and not (top == root and f == "_validate.py"):
                        rel = os.path.relpath(os.path.join(top, f), root)[:-3].replace(os.sep, ".")
                        name = dotted if rel == "__init__" else f"{dotted}.{rel}"
                        self.files[os.path.join(top, f)] = name
            if os.path.join(root, "") == self._attnlib_dir:
                # attnlib as a whole: the grader's answer key (the exercises' code) is attnlib too
                for f in _EXERCISE_FILES:
                    self._add_source(f, _dotted_file(f))
        else:
            self.files[os.path.abspath(path)] = dotted
        for attr in getattr(module, "__all__", []):  # the public names, for the messages
            obj = getattr(module, attr, None)
            if obj is not None and not isinstance(obj, types.ModuleType):
                self._add_object(obj, f"{dotted}.{attr}", codes_only=True)
        for f, name in list(self.files.items()):
            if f.startswith(self._attnlib_dir):
                self._add_source(f, name)

    def _add_source(self, path: str, name: str) -> None:
        """A file whose text is forbidden code (read, it can be run again under another name):
        its path, and the bytecode of every function and class its module defines."""
        for p in _sources_of(path):
            self.sources.setdefault(p, name)
        module = sys.modules.get(name)
        if module is None or os.path.abspath(getattr(module, "__file__", "") or "") != path:
            return
        for attr, obj in vars(module).items():
            if isinstance(obj, (types.FunctionType, type)) and getattr(obj, "__module__", None) == name:
                self._add_bytecode(obj, f"{name}.{attr}")

    def _add_bytecode(self, obj: Any, dotted: str) -> None:
        """The bytecode of a function (or a class's methods) defined in an attnlib file."""
        fns = [obj]
        if isinstance(obj, type):
            fns = []
            for attr in vars(obj).values():
                fns += [f for f in (attr, getattr(attr, "__func__", None), getattr(attr, "fget", None))
                        if isinstance(f, types.FunctionType)]
        for fn in fns:
            code = getattr(fn, "__code__", None)
            if not isinstance(code, types.CodeType) or not code.co_filename.startswith(self._attnlib_dir):
                continue
            for c in _code_tree(code, []):
                if len(c.co_code) >= _MIN_CODE:
                    self.co_codes.setdefault(c.co_code, f"{dotted}" if c is code else f"{dotted} ({c.co_name})")

    def _add_function(self, fn: Any, dotted: str, explicit: bool = True) -> None:
        seen = 0
        while fn is not None and seen < 10:
            code = getattr(fn, "__code__", None)
            if isinstance(code, types.CodeType):
                self.codes.setdefault(code, dotted)
                if explicit:
                    self.explicit.add(code)
                for c in _code_tree(code, []):
                    if len(c.co_code) >= _MIN_CODE:
                        self.co_codes.setdefault(c.co_code, dotted)
                if code.co_filename.startswith(self._attnlib_dir):
                    for p in _sources_of(code.co_filename):
                        self.sources.setdefault(p, _dotted_file(code.co_filename))
            fn = getattr(fn, "__wrapped__", None)
            seen += 1

    def _add_object(self, obj: Any, dotted: str, codes_only: bool = False) -> None:
        if isinstance(obj, type):
            for name, attr in vars(obj).items():
                for fn in (attr, getattr(attr, "__func__", None), getattr(attr, "fget", None)):
                    if isinstance(fn, types.FunctionType):
                        self._add_function(fn, f"{dotted}" if name == "__init__" else f"{dotted}.{name}",
                                           not codes_only)
            return
        if isinstance(obj, types.FunctionType):
            self._add_function(obj, dotted, not codes_only)
        if codes_only:
            return
        try:
            if isinstance(obj, (types.MethodDescriptorType, types.WrapperDescriptorType)):
                self.methods.setdefault(obj.__name__, []).append((obj.__objclass__, dotted))
            elif not isinstance(obj, types.FunctionType):
                self.builtins[obj] = dotted
            self.torch_funcs[obj] = dotted
        except TypeError:  # unhashable: no builtin of torch's is
            pass
        self._keep.append(obj)

    # ------------------------------------------------------------------ watching

    def _trusted(self, filename: str) -> bool:
        return _trusted(filename)

    def hit(self, name: str, frame: Any) -> None:
        """A forbidden callable is being called from ``frame``: fail, unless the call
        comes from the exercise's own check code (reached before any learner code)."""
        f = frame
        while f is not None:
            code = f.f_code
            if code in self.sentinels:
                break
            filename = code.co_filename
            if filename in self.exempt_files:
                return
            if code.co_name in _MODE_CALLBACKS and filename.startswith(self._attnlib_dir):
                return  # an attnlib instrument (e.g. measure.ShapeRecorder) an extra check runs
            if not self._trusted(filename):
                break
            f = f.f_back
        if self.violation is None:
            self.violation = name
        raise ForbiddenCallError(f"called {name}, which this exercise forbids (write it yourself)")

    def grader_code(self, code: types.CodeType) -> None:
        """The learner's code called the exercises' own code (:data:`_EXERCISE_FILES`)."""
        name = f"{_dotted_file(code.co_filename)}.{_qualname(code)}"
        if self.violation is None:
            self.violation = (f"!called the grader's own code ({name}), which is not allowed: "
                              "write it yourself")
        raise ForbiddenCallError(f"called the grader's own code ({name}), which is not allowed")

    def _make_hook(self) -> Any:
        """The profiler set while a graded call runs: a closure that hands :meth:`profile` only
        the events that may matter (a call of forbidden code or of the exercises' own code, a
        watched builtin), each other event costing a few lookups; a call of what only the
        exercises graded later forbid goes to the whole run's guard (:attr:`also`)."""
        codes, watcher, slow = self.codes, self, self.profile
        hot_files = frozenset(self.files) | _EXERCISE_FILES
        hot_ids = frozenset(self.builtins) | _MODE_OFF | {_real_setprofile}
        methods, disable = frozenset(self.methods), _DisableTorchFunction

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call":
                code = frame.f_code
                also = watcher.also
                if also is not None and (code in also[1] or code.co_filename in also[2]):
                    also[0].on_call(frame, code)
                if code in codes or code.co_filename in hot_files:
                    slow(frame, event, arg)
            elif event == "c_call":
                also = watcher.also
                if also is not None and (arg in also[3] or (also[4] and arg.__name__ in also[4])):
                    also[0].on_c_call(frame, arg)
                if arg in hot_ids or type(arg.__self__) is disable or (methods and arg.__name__ in methods):
                    slow(frame, event, arg)

        return profile

    def profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            name = self.codes.get(code)
            if name is None:
                module = self.files.get(code.co_filename)
                if module is None:
                    if code.co_filename in _EXERCISE_FILES and code not in _ENTRY_CODES \
                            and _entry_origin(frame.f_back):
                        self.grader_code(code)
                    return
                if code.co_name in _MODE_CALLBACKS:
                    return
                name = f"{module}.{getattr(code, 'co_qualname', code.co_name)}"
            elif code.co_name in _MODE_CALLBACKS:
                return
            self.hit(name, frame.f_back)
        elif event == "c_call":
            if arg is _real_setprofile and frame.f_code not in _OWN_CODES:
                self.tampered("sys.setprofile")
            elif (arg in _MODE_OFF or type(arg.__self__) is _DisableTorchFunction) and _tamper_origin(frame):
                self.tampered("torch function modes")
            name = self.builtins.get(arg)
            if name is None:
                candidates = self.methods.get(getattr(arg, "__name__", None)) if self.methods else None
                if not candidates or type(arg) is not types.BuiltinMethodType:
                    return
                owner = arg.__self__
                for cls, dotted in candidates:
                    if isinstance(owner, cls):
                        name = dotted
                        break
                else:
                    return
            self.hit(name, frame)

    def tampered(self, what: str) -> None:
        if self.violation is None:
            self.violation = (f"!changed the grader's call watcher ({what}) during a graded call, "
                              "which is not allowed")

    def arm(self) -> None:
        self.violation = None
        self.lost = False
        if not self.active:
            return
        self.armed = True
        if self.mode is not None:
            self.mode.__enter__()
        _threading_setprofile(self.hook)
        _real_setprofile(self.hook)

    def disarm(self) -> None:
        if not self.armed:
            return
        current = _getprofile()
        _real_setprofile(None)
        _threading_setprofile(None)
        self.armed = False
        # None: an exception inside the watcher (e.g. a RecursionError) switched it off
        self.lost = current is None
        if current is not None and current is not self.hook and self.violation is None:
            self.tampered("another profiler")
        if self.mode is not None:
            stack = _mode_stack()
            if not stack or stack[-1] is not self.mode:
                if self.violation is None:
                    self.tampered("torch function modes")
                while _mode_stack():
                    torch._C._pop_torch_function_stack()
            else:
                self.mode.__exit__(None, None, None)

    def message(self) -> str | None:
        if self.violation is None:
            return None
        if self.violation.startswith("!"):
            return self.violation[1:]
        return f"called {self.violation}, which this exercise forbids: write it yourself"

    @property
    def tampered_with(self) -> bool:
        """The learner's code switched this watcher off (explicitly) during the graded call."""
        return bool(self.violation and self.violation.startswith("!changed the grader's call watcher"))


_watchers: list[CallWatcher] = []
_OWN_CODES = frozenset({CallWatcher.arm.__code__, CallWatcher.disarm.__code__})


def _guarded_setprofile(func: Any) -> None:
    """``sys.setprofile`` as the notebook sees it: changing the profiler during a graded
    call is recorded (threads started by ``threading`` set the watcher itself: allowed), and
    so is any call of it by the notebook's own code while the whole run is watched."""
    for w in _watchers:
        if w.armed and func is not w.hook:
            w.tampered("sys.setprofile")
    guard = _GUARD[0] if _GUARD else None
    if guard is not None and guard.on and guard.current is None and _tamper_origin(_getframe(1)):
        guard.tampered("sys.setprofile")
    _real_setprofile(func)


def _guarded_threading_setprofile(func: Any) -> None:
    """``threading.setprofile`` as the notebook sees it: the same record."""
    for w in _watchers:
        if w.armed and func is not w.hook:
            w.tampered("threading.setprofile")
    guard = _GUARD[0] if _GUARD else None
    if guard is not None and guard.on and guard.current is None and _tamper_origin(_getframe(1)):
        guard.tampered("threading.setprofile")
    _threading_setprofile(func)


_OWN_CODES = _OWN_CODES | {_guarded_setprofile.__code__, _guarded_threading_setprofile.__code__}


# --------------------------------------------------------------------------- the whole run


class _RunMode(TorchFunctionMode):
    """The whole run's view of torch's builtins (also called from C: ``map``, ``partial``)."""

    def __init__(self, guard: "RunGuard") -> None:
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        try:  # keyed by the function itself (see _WatchMode)
            hits = self.guard.torch_funcs.get(func)
        except TypeError:
            hits = None
        if hits is not None:
            self.guard.flag(hits, _getframe(1))
        return func(*args, **(kwargs or {}))


_PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                             "os.forkpty", "pty.spawn", "os.startfile"})
_PATH_EVENTS = frozenset({"os.remove", "os.rename", "os.truncate", "os.rmdir", "os.link", "os.symlink", "os.chmod",
                          "os.chown", "os.utime", "os.listdir", "os.scandir", "os.chdir", "os.mkdir", "os.chflags",
                          "os.lchflags", "os.lchmod", "os.lchown", "os.mkfifo", "os.mknod", "os.setxattr",
                          "os.removexattr", "os.listxattr", "os.getxattr", "shutil.rmtree", "shutil.copyfile",
                          "shutil.copymode", "shutil.copystat", "shutil.copytree", "shutil.move", "os.fwalk",
                          "os.walk", "glob.glob"})
_CODE_EVENTS = frozenset({"code.__new__", "exec", "compile", "marshal.loads", "marshal.dumps"})
_AUDITED = frozenset({"open", "ctypes.dlsym"}) | _PROCESS_EVENTS | _PATH_EVENTS | _CODE_EVENTS
#: C functions a notebook reaching for through ctypes would start a program or a thread, or
#: switch the profiler off behind the grader's back.
_BLOCKED_SYMBOLS = frozenset({
    "system", "popen", "fork", "vfork", "clone", "clone3", "execv", "execve", "execvp", "execvpe", "execl",
    "execle", "execlp", "fexecve", "posix_spawn", "posix_spawnp", "pthread_create", "syscall", "prctl",
    "seccomp", "PyEval_SetProfile", "PyEval_SetProfileAllThreads", "PyEval_SetTrace",
    "PyEval_SetTraceAllThreads", "_PyEval_SetProfile", "_PyEval_SetTrace", "PyThread_start_new_thread"})


def _learner(via: str | None) -> bool:
    return via is not None and via is not _IMPORT


def _reference_codes(reference: Any) -> frozenset[types.CodeType]:
    """The code of an exercise's reference: a function's (and what it wraps), a class's methods."""
    fns = [reference]
    if isinstance(reference, type):
        fns = [f for v in vars(reference).values()
               for f in (v, getattr(v, "__func__", None), getattr(v, "fget", None))
               if isinstance(f, types.FunctionType)]
    codes = set()
    for fn in fns:
        for _ in range(10):
            code = getattr(fn, "__code__", None)
            if isinstance(code, types.CodeType):
                codes.add(code)
            fn = getattr(fn, "__wrapped__", None)
            if fn is None:
                break
    return frozenset(codes)


class RunGuard:
    """The watch over the whole run, not only the graded calls (issue 12: no universal cheat).

    A notebook's code that calls the reference anywhere, at the top level of a cell too, could
    compute the reference's outputs on the public cases in advance and have its "solution"
    look them up. From the first cell to the end of the child, one profiler (and, for torch's
    builtins, one ``TorchFunctionMode``) consults every exercise's :class:`CallWatcher` at once
    (their tables merged here, each entry naming the exercises it concerns); a graded call
    switches to its exercise's own watcher (:meth:`pause`), which still passes every call on to
    this profiler what only the exercises graded after it forbid. A forbidden call the
    learner's code makes outside a graded function is recorded for every exercise whose
    ``forbidden`` covers it, with the cell (:meth:`flag`): it does not raise (raising in a
    profiler switches it off), the exercise fails anyway. One audit hook
    (``sys.addaudithook``: it cannot be removed) sees what the profiler cannot, from the
    learner's code (:func:`_origin`): a read of an attnlib
    file whose code is forbidden (its ``.py`` or ``__pycache__`` copy: through ``open``,
    ``pathlib``, ``inspect.getsource``, ``importlib`` reload or ``spec_from_file_location``,
    ``runpy``), code objects built whose bytecode is the reference's (``types.CodeType``,
    ``code.replace``, ``exec``/``compile`` of its source, ``marshal``): these are refused
    (:class:`ForbiddenCallError`) and recorded. It also refuses new programs (``subprocess``,
    ``os.system``, ``fork``; also through ``ctypes``) and any access to the grader's own
    directory (this record lives there); code the notebook compiles or builds counts as the
    notebook's, whatever file name it gives it (:data:`_LEARNER_FILES`). Switching the watcher
    off during a cell (``sys.setprofile``, ``threading.setprofile``, another profiler, popping
    the torch function modes or ``DisableTorchFunction``, replacing the grader's code), or
    losing it (a RecursionError in the profiler), is recorded for every exercise.

    The record (:attr:`records`: exercise index -> message) is written to ``_RECORD`` in the
    grader's directory as it grows and read back by a restarted child, so a cell that cheats
    and then crashes the process still counts. :func:`_grade_exercise` fails an exercise that
    has a record with its message, before and after its cases.
    """

    def __init__(self, watchers: dict[int, CallWatcher], grader_dir: str, exercises: list[tuple[str, str]]) -> None:
        self.watchers = watchers
        self.names = {k: name for k, (_, name) in enumerate(exercises)}  # for the messages
        #: each exercise's reference (the code of its function, or of its class's methods)
        self.references: dict[int, frozenset[types.CodeType]] = {
            k: _reference_codes(EXERCISES[ex_id].reference) for k, (ex_id, _) in enumerate(exercises)
            if k in watchers and ex_id in EXERCISES}
        self.every = tuple(sorted(watchers))
        self.watched = tuple(k for k in self.every if watchers[k].active)
        self.codes: dict[types.CodeType, list[tuple[int, str]]] = {}
        self.files: dict[str, list[tuple[int, str]]] = {}
        self.builtins: dict[Any, list[tuple[int, str]]] = {}
        self.torch_funcs: dict[Any, list[tuple[int, str]]] = {}
        self.sources: dict[str, list[tuple[int, str]]] = {}
        self.co_codes: dict[bytes, list[tuple[int, str]]] = {}
        self.methods: dict[str, list[tuple[type, str, int]]] = {}
        for k in self.watched:
            w = watchers[k]
            for theirs, ours in ((w.codes, self.codes), (w.files, self.files), (w.builtins, self.builtins),
                                 (w.torch_funcs, self.torch_funcs), (w.sources, self.sources),
                                 (w.co_codes, self.co_codes)):
                for key, name in theirs.items():
                    ours.setdefault(key, []).append((k, name))  # type: ignore[attr-defined]
            for attr, pairs in w.methods.items():
                self.methods.setdefault(attr, []).extend((cls, dotted, k) for cls, dotted in pairs)
        self.cell: int | None = None  # the cell running now
        self.current: int | None = None  # the exercise whose graded call runs now
        self.later: frozenset[int] = frozenset()  # the exercises graded after it
        self.on = False
        self.hook = self.profile = self._make_hook()  # one function: compared by identity
        self.audit = self._make_audit()
        self.mode = _RunMode(self) if self.torch_funcs else None
        self.grader_dir = _realpath(grader_dir)
        self.path = os.path.join(grader_dir, _RECORD)
        self.records: dict[int, str] = {}
        self._later_cache: dict[int, tuple] = {}
        self._busy = False
        try:
            with _open(self.path) as f:
                for key, message in json.load(f).items():
                    if int(key) in watchers and isinstance(message, str):
                        self.records[int(key)] = message
        except (OSError, ValueError, AttributeError):
            pass

    # ------------------------------------------------------------------ the record

    def record(self, ks: Any, message: str) -> None:
        new = False
        for k in ks:
            if k in self.watchers and k not in self.records:
                self.records[k] = message
                new = True
        if new:
            self._save()

    def _save(self) -> None:
        try:
            protocol.write_atomic(self.path, _dumps({str(k): m for k, m in self.records.items()}).encode())
        except BaseException:  # the record in memory still fails the exercises
            pass

    def message_for(self, k: int) -> str | None:
        return self.records.get(k)

    def _where(self) -> str:
        if self.current is not None:
            return f"inside the graded function of another exercise ({self.names.get(self.current, '?')})"
        if self.cell is not None:
            return f"outside a graded function (cell {self.cell})"
        return "outside a graded function (between the graded calls)"

    def _during(self) -> str:
        return f"during cell {self.cell}" if self.cell is not None else "between the graded calls"

    def tampered(self, what: str) -> None:
        self.record(self.every, f"changed the grader's call watcher ({what}) {self._during()}, which is not "
                                "allowed: what the notebook did then cannot be checked")

    def _ks(self, hits: list) -> list:
        """The exercises concerned now: every one, or during a graded call those graded later."""
        if self.current is None:
            return hits
        return [h for h in hits if h[0] in self.later]

    def flag(self, hits: list[tuple[int, str]], frame: Any, code: types.CodeType | None = None) -> None:
        """A forbidden callable (``code``, for a Python one) is being called from ``frame``
        (``hits``: the exercises that forbid it, with its name): recorded when the learner's code
        is behind it, for the exercises it concerns. Not for an exercise when the call comes from
        forbidden code already counted for it (attnlib's sdpa calling attnlib's softmax), nor
        when that exercise forbids it only as a part of attnlib while it is the reference of
        another exercise of the notebook (a table of sdpa's outputs costs the sdpa exercise, not
        the softmax one: softmax's own reference, or any other part of attnlib, would)."""
        hits = self._ks(hits)
        if not hits:
            return
        via = _origin(frame)
        if not _learner(via):
            return
        inner = self._inside(frame)
        where = self._where()
        for k, name in hits:
            if k in inner or (code is not None and self._elsewhere(k, code)):
                continue
            self.record((k,), f"called {name}{via} {where}, which this exercise forbids: write it yourself")

    def _inside(self, frame: Any) -> set[int]:
        """The exercises for which a frame between ``frame`` and the learner's code is itself
        forbidden code (so this call is that code's, already counted)."""
        inside: set[int] = set()
        f = frame
        while f is not None:
            code = f.f_code
            if not _trusted(code.co_filename) or code in _ROOTS:
                break
            for k, _ in self.codes.get(code, ()):
                inside.add(k)
            for k, _ in self.files.get(code.co_filename, ()):
                inside.add(k)
            f = f.f_back
        return inside

    def _elsewhere(self, k: int, code: types.CodeType) -> bool:
        """``code`` is forbidden to exercise ``k`` only as a part of a whole module, and it is
        the reference of another exercise graded here."""
        if code in self.watchers[k].explicit:
            return False
        return any(code in refs for j, refs in self.references.items() if j != k)

    def _elsewhere_bytes(self, k: int, co_code: bytes) -> bool:
        """The same for a copy of forbidden code (its bytecode)."""
        if any(c.co_code == co_code for c in self.watchers[k].explicit):
            return False
        return any(c.co_code == co_code for j, refs in self.references.items() if j != k for c in refs)

    # ------------------------------------------------------------------ the profiler

    def _make_hook(self) -> Any:
        """The profiler: a closure over the merged tables, whose every event that is none of
        the watched ones costs a few lookups (it runs for every call of the whole run)."""
        codes, ex_files = self.codes, _EXERCISE_FILES
        hot_files = frozenset(self.files) | ex_files
        hot_ids = frozenset(self.builtins) | _MODE_OFF | {_real_setprofile}
        methods, disable = frozenset(self.methods), _DisableTorchFunction
        on_call, on_c_call = self.on_call, self.on_c_call

        def profile(frame: Any, event: str, arg: Any) -> None:
            try:
                if event == "call":
                    code = frame.f_code
                    if code in codes or code.co_filename in hot_files:
                        on_call(frame, code)
                elif event == "c_call":
                    if arg in hot_ids or type(arg.__self__) is disable \
                            or (methods and arg.__name__ in methods):
                        on_c_call(frame, arg)
            except Exception:  # never let the profiler die of its own error (that switches it off)
                pass

        return profile

    def on_call(self, frame: Any, code: types.CodeType) -> None:
        hits = self.codes.get(code)
        if hits is None:
            modules = self.files.get(code.co_filename)
            if modules is None:  # the exercises' own code
                if code not in _ENTRY_CODES and self.watched and _entry_origin(frame.f_back):
                    name = f"{_dotted_file(code.co_filename)}.{_qualname(code)}"
                    ks = self.watched if self.current is None else self.later
                    self.record(ks, f"called the grader's own code ({name}) {self._where()}, which is "
                                    "not allowed: write it yourself")
                return
            if code.co_name in _MODE_CALLBACKS:
                return
            hits = [(k, f"{module}.{_qualname(code)}") for k, module in modules]
        elif code.co_name in _MODE_CALLBACKS:
            return
        self.flag(hits, frame.f_back, code)

    def on_c_call(self, frame: Any, arg: Any) -> None:
        if arg is _real_setprofile:
            if frame.f_code not in _OWN_CODES and self.current is None and _tamper_origin(frame):
                self.tampered("sys.setprofile")
            return
        if _mode_off(arg):
            if self.current is None and _tamper_origin(frame):
                self.tampered("torch function modes")
            return
        hits = self.builtins.get(arg)
        if hits is None:
            candidates = self.methods.get(arg.__name__) if self.methods else None
            if not candidates or type(arg) is not types.BuiltinMethodType:
                return
            owner = arg.__self__
            hits = [(k, dotted) for cls, dotted, k in candidates if isinstance(owner, cls)]
            if not hits:
                return
        self.flag(hits, frame)

    # ------------------------------------------------------------------ arming

    def start(self) -> None:
        """Before the first cell: the profiler, the torch function mode, the record's file."""
        self.on = True
        self.resume()

    def resume(self) -> None:
        """The whole-run profiler (again), after a graded call or a cell."""
        self.current, self.later = None, frozenset()
        if self.mode is not None and self.mode not in _mode_stack():
            self.mode.__enter__()
        _threading_setprofile(self.hook)
        _real_setprofile(self.hook)

    def pause(self, k: int, watcher: CallWatcher) -> None:
        """A graded call of exercise ``k`` under its own watcher: that watcher passes every
        call on to this profiler, for the exercises graded after ``k`` (and its torch function
        mode, if it has one, every torch call: one mode is enough)."""
        _real_setprofile(None)
        self.current = k
        self.later = frozenset(j for j in self.watched if j > k)
        codes, files, ids, methods, torch_ids = self._later_only(k, watcher)
        watcher.also = (self, codes, files, ids, methods) if codes or files or ids or methods else None
        if self.mode is not None and (not torch_ids or watcher.mode is not None):
            self._drop_mode()
            if watcher.mode is not None and torch_ids:
                watcher.mode.also = (self, torch_ids)

    def _later_only(self, k: int, watcher: CallWatcher) -> tuple:
        """What the exercises graded after ``k`` forbid and ``k`` does not (what ``k`` forbids
        cannot run during its graded call: its watcher stops it before it starts): codes,
        files, builtin ids, method names, torch builtin ids. Once per exercise."""
        cached = self._later_cache.get(k)
        if cached is None:
            def later(hits: list) -> bool:
                return any(j in self.later for j, _ in hits)

            codes = frozenset(c for c, hits in self.codes.items() if later(hits) and c not in watcher.codes
                              and c.co_filename not in watcher.files)
            files = frozenset(f for f, hits in self.files.items() if later(hits) and f not in watcher.files)
            ids = frozenset(i for i, hits in self.builtins.items() if later(hits) and i not in watcher.builtins)
            methods = frozenset(n for n, entries in self.methods.items()
                                if any(j in self.later for _, _, j in entries) and n not in watcher.methods)
            torch_ids = frozenset(i for i, hits in self.torch_funcs.items()
                                  if later(hits) and i not in watcher.torch_funcs)
            cached = self._later_cache[k] = (codes, files, ids, methods, torch_ids)
        return cached

    def _drop_mode(self) -> None:
        """Take this guard's torch function mode off the stack (modes the notebook pushed
        above it stay, in their order)."""
        if self.mode not in _mode_stack():
            return
        above = []
        while _mode_stack():
            mode = _pop_mode()
            if mode is self.mode:
                break
            above.append(mode)
        for mode in reversed(above):
            _push_mode(mode)

    def after_call(self, watcher: CallWatcher) -> None:
        """After a graded call: the watcher switched off then also blinded the whole run."""
        watcher.also = None
        if watcher.mode is not None:
            watcher.mode.also = None
        if watcher.tampered_with and self.later:
            self.record(self.later, f"changed the grader's call watcher during the graded function of another "
                                    f"exercise ({self.names.get(self.current, '?')}), which is not allowed: what "
                                    "the notebook did then cannot be checked")
        self.resume()

    def enter_cell(self, index: int) -> None:
        self.cell = index
        _purge_linecache()

    def leave_cell(self, error: BaseException | None) -> None:
        """After a cell: every part of the watcher must still be in place (else: tampering, or
        a RecursionError that switched the profiler off); then all of it again."""
        current = _getprofile()
        if current is not self.hook:
            if current is None:
                hint = ("a RecursionError: a very deep recursion stops it" if isinstance(error, RecursionError)
                        else "a very deep recursion, or the profiler switched off")
                self.record(self.every, f"the grader's call watcher stopped during cell {self.cell} ({hint}), so "
                                        "what the notebook did there cannot be checked")
            else:
                self.tampered("another profiler")
        if getattr(threading, "_profile_hook", self.hook) is not self.hook:
            self.tampered("threading.setprofile")
        if self.mode is not None and self.mode not in _mode_stack():
            self.tampered("torch function modes")
        _purge_linecache()
        self.cell = None
        self.resume()

    # ------------------------------------------------------------------ the audit hook

    def _make_audit(self) -> Any:
        """The audit hook: a closure, since it runs for every audited event of the process
        (``frame.f_code`` and ``id()`` raise one each, millions in a run)."""
        audited, guard, slow = _AUDITED, self, self._audit

        def audit(event: str, args: tuple) -> None:
            if event in audited and not guard._busy:
                try:
                    refusal = slow(event, args, _getframe(1))
                except Exception:  # never break the notebook's code by a fault of ours
                    return
                if refusal is not None:
                    raise refusal

        return audit

    def _audit(self, event: str, args: tuple, frame: Any) -> BaseException | None:
        if event == "open":
            path = args[0]
            if path is None or isinstance(path, int):
                return None
            real = _realpath(_fsdecode(path))
            if real == self.grader_dir or real.startswith(self.grader_dir + os.sep):
                return self._grader_files(path, frame)
            hits = self.sources.get(real)
            if hits is None:
                return None
            via = _origin(frame, reads=True)
            if not _learner(via):
                return None
            return self._violation(hits, lambda name: f"read {_short(real)}, the source of {name}{via},")
        if event in _PATH_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)):
                    real = _realpath(_fsdecode(path))
                    if real == self.grader_dir or real.startswith(self.grader_dir + os.sep):
                        return self._grader_files(path, frame)
            return None
        if event in _PROCESS_EVENTS:
            if _learner(_origin(frame)):
                return PermissionError(f"the grader does not let the notebook start other programs ({event})")
            return None
        if event == "ctypes.dlsym":
            if args[1] in _BLOCKED_SYMBOLS and _learner(_origin(frame)):
                return PermissionError(f"the grader does not let the notebook use {args[1]} through ctypes")
            return None
        # code: compiled, built, loaded or run
        via = _origin(frame)
        learner = _learner(via)
        if event == "compile":
            if learner and isinstance(args[1], (str, bytes, os.PathLike)):
                _LEARNER_FILES.add(str(_fsdecode(args[1])))
            return None
        if event == "exec":
            codes = _code_tree(args[0], [])
            if via is None and self.cell is not None:  # a cell's own code, whatever its file name
                _LEARNER_FILES.update(c.co_filename for c in codes)
            return self._copies(codes, "exec", via) if learner else None
        if not learner:
            return None
        if event == "code.__new__":
            _LEARNER_FILES.add(str(args[1]))
            hits = self.co_codes.get(args[0]) if isinstance(args[0], bytes) else None
            return self._violation(hits, lambda name: f"copied the code of {name}{via} (types.CodeType or "
                                                      "code.replace)", args[0]) if hits else None
        if event == "marshal.loads":
            self._busy = True
            try:
                loaded = _marshal_loads(args[0])
            finally:
                self._busy = False
            codes = _code_tree(loaded, [])
            _LEARNER_FILES.update(c.co_filename for c in codes)
            return self._copies(codes, "marshal", via)
        if event == "marshal.dumps":
            return self._copies(_code_tree(args[0], []), "marshal", via)
        return None

    def _grader_files(self, path: Any, frame: Any) -> BaseException | None:
        if _learner(_origin(frame)):
            return PermissionError(f"{_fsdecode(path)}: the grader's own files are out of the notebook's reach")
        return None

    def _copies(self, codes: list, how: str, via: str = "") -> BaseException | None:
        """A copy of forbidden code among ``codes`` (the same bytecode): ``how`` it was made."""
        for c in codes:
            hits = self.co_codes.get(c.co_code)
            if hits:
                return self._violation(hits, lambda name: f"copied the code of {name}{via} ({how})", c.co_code)
        return None

    def _violation(self, hits: list[tuple[int, str]], what: Any, co_code: bytes | None = None) -> BaseException | None:
        """The learner's code did ``what(name)`` with forbidden code: recorded for the exercises
        concerned (the graded one: on its own watcher), and refused. A read concerns every
        exercise that forbids the file's module (any of its code can be run from the text); a
        copy of one function (its bytecode ``co_code``) is counted as a call of it would be
        (see :meth:`flag`)."""
        refused = None
        for k, name in hits:
            if co_code is not None and self._elsewhere_bytes(k, co_code):
                continue
            text = what(name)
            if self.current is not None and k == self.current:
                watcher = self.watchers[k]
                if watcher.violation is None:
                    watcher.violation = f"!{text.rstrip(',')}, which this exercise forbids: write it yourself"
            elif self.current is None or k in self.later:
                self.record((k,), f"{text} {self._where()}, which this exercise forbids: write it yourself")
            else:
                continue
            refused = refused or ForbiddenCallError(f"{text.rstrip(',')}: the grader does not allow it")
        return refused


_GUARD: list[RunGuard] = []  # the child's one guard, once main() made it


def _purge_linecache() -> None:
    """Forget attnlib's files in ``linecache`` (a traceback the grader showed through them, a
    warning): ``inspect.getsource`` must open the file, where the audit hook sees it."""
    try:
        for key in [k for k in _linecache if isinstance(k, str) and k.startswith(_ATTNLIB_DIR)]:
            _linecache.pop(key, None)
    except Exception:
        pass


def _block_new_processes() -> str | None:
    """No new process or thread from here on, whatever route the notebook takes (``os.fork``,
    ``subprocess``, ``ctypes`` and ``libc``, a thread started from C where no profiler is
    set): a seccomp filter (``prctl``) refuses ``fork``, ``vfork``, ``clone``, ``clone3``,
    ``execve`` and ``execveat`` with EPERM, and every system call of another ABI (i386 or x32
    on x86_64). It cannot be lifted. ``None``, or why it could not be set."""
    machine = os.uname().machine
    if machine == "x86_64":
        arch, numbers, x32 = 0xC000003E, (56, 57, 58, 59, 322, 435), True
    elif machine in ("aarch64", "arm64"):
        arch, numbers, x32 = 0xC00000B7, (220, 221, 281, 435), False
    else:
        return f"not available on {machine}"
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, refuse = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    checks = ([(jge, 0x40000000)] if x32 else []) + [(jeq, n) for n in numbers]
    program = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, refuse), (ld, 0, 0, 0)]
    program += [(op, len(checks) - i, 0, k) for i, (op, k) in enumerate(checks)]
    program += [(ret, 0, 0, allow), (ret, 0, 0, refuse)]

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*[SockFilter(c, t, f, k) for c, t, f, k in program])
    fprog = SockFprog(len(program), filters)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        if prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            return os.strerror(ctypes.get_errno())
        if prctl(22, 2, ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
            return os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- values


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _unsupported(obj: Any) -> str | None:
    """``None`` when ``obj`` is made only of plain values, else a description of the culprit."""
    if obj is None or type(obj) in (bool, int, float, str):
        return None
    if isinstance(obj, Tensor):
        if type(obj) is not _TensorType:
            return f"returned {_type_name(obj)}, a subclass of torch.Tensor; return a plain torch.Tensor"
        if obj.layout != torch.strided:
            return f"returned a tensor with layout {obj.layout}; return a dense (strided) torch.Tensor"
        if obj.device.type != "cpu":
            return (f"returned a tensor on the {obj.device} device; return it on the device of the "
                    "inputs (cpu)")
        return None
    if type(obj) in (tuple, list):
        for item in obj:
            problem = _unsupported(item)
            if problem:
                return problem
        return None
    if type(obj) is dict:
        for key, item in obj.items():
            problem = _unsupported(key) or _unsupported(item)
            if problem:
                return problem
        return None
    name = _type_name(obj)
    if type(obj).__module__.split(".")[0] == "numpy":
        return f"returned {name}; return a torch.Tensor (stay in torch: no numpy in between)"
    return f"returned {name}; expected a torch.Tensor"


def _plain(obj: Any) -> Any:
    """Detach tensors (a plain copy of the values; grads and views are not needed)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_plain(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


_memory_limit: int | None = None
_output_limit = 1 << 20


def _gib(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


def _error(exc: BaseException, step_timeout: float = 0.0, in_cell: bool = False) -> str:
    """A learner's exception, named for a person."""
    if isinstance(exc, NotImplementedError) and not in_cell:
        return "not implemented yet"
    if isinstance(exc, StepTimeout):
        return f"did not finish within {step_timeout:g} s (an infinite loop?)"
    if isinstance(exc, OutputLimitExceeded):
        return f"printed more than {_gib(_output_limit)} (output limit); stopped"
    if isinstance(exc, SystemExit):
        return f"called sys.exit({'' if exc.code is None else repr(exc.code)})"
    if isinstance(exc, KeyboardInterrupt):
        return "raised KeyboardInterrupt"
    if type(exc) is _core.InputModifiedError:  # the check's own message: which input changed
        try:
            return str(exc)[:2000]
        except BaseException:
            pass
    try:
        text = f"raised {type(exc).__name__}: {exc}"
    except BaseException:  # an exception whose str() fails
        text = f"raised {type(exc).__name__}"
    if len(text) > 2000:
        text = text[:2000] + " [...]"
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == 12) or (
            isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc)
                                               or "not enough memory" in str(exc))):
        limit = f" of {_gib(_memory_limit)}" if _memory_limit else ""
        return f"ran out of memory: exceeded the memory limit{limit} ({text[:300]})"
    if isinstance(exc, EOFError):
        return f"{text} (the notebook reads standard input, which is empty while grading)"
    if isinstance(exc, RecursionError):
        return f"{text} (infinite recursion?)"
    return text


# --------------------------------------------------------------------------- cells


def _run_cells(shell: Any, cells: list[dict], skip: set[int], step_timeout: float,
               progress: Progress, counter: list[int], guard: "RunGuard | None" = None,
               check: Any = lambda index: None) -> None:
    """Every cell but ``skip``, each under the alarm and the whole-run guard (its cell number
    for the messages; after it, ``check(index)``: the grader's own code must be as it was)."""
    run_cell = shell.run_cell
    for cell in cells:
        if cell["index"] in skip:
            continue
        progress.set(phase=protocol.CELL, cell=cell["index"])
        counter[0] = 0
        exc: BaseException | None = None
        if guard is not None:
            guard.enter_cell(cell["index"])
        try:
            _arm(step_timeout)
            result = run_cell(cell["source"], store_history=False, silent=False)
        except BaseException as caught:  # the alarm or the output limit outside IPython's handler
            result = None
            exc = caught
        finally:
            _disarm()
        if result is not None:
            exc = getattr(result, "error_before_exec", None) or getattr(result, "error_in_exec", None)
        if guard is not None:
            check(cell["index"])
            guard.leave_cell(exc)
        if exc is not None:
            progress.errors.append({"index": cell["index"], "message": _error(exc, step_timeout, True)})
    progress.write()


# --------------------------------------------------------------------------- graded calls


def _call_case(exercise: Any, student: Any, case: Case, watcher: CallWatcher, step_timeout: float,
               extra: bool = False, k: int | None = None) -> Any:
    """One graded call (or the exercise's extra check), under the alarm and the watcher (the
    whole-run guard hands over to it, for exercise ``k``, and takes over again after)."""
    guard = _GUARD[0] if _GUARD and k is not None else None
    _purge_linecache()
    _arm(step_timeout)
    try:
        with _forbid(exercise.forbidden):
            if guard is not None:
                guard.pause(k, watcher)
            watcher.arm()
            try:
                if extra:
                    return exercise.extra_check(student, case)
                return call(exercise, student, case)
            finally:
                watcher.disarm()
                if guard is not None:
                    guard.after_call(watcher)
    finally:
        _disarm()


_SENTINELS = (_call_case.__code__,)
_LOST = ("the grader's call watcher stopped during this call (a very deep recursion, or the profiler "
         "switched off): its result cannot be trusted")


def _grade_exercise(k: int, exercise_id: str, name: str, namespace: dict, step_timeout: float,
                    grader_dir: str, progress: Progress, watcher: CallWatcher, counter: list[int],
                    restore: Any = lambda: None) -> None:
    status = os.path.join(grader_dir, protocol.status_file(k))
    exercise = EXERCISES.get(exercise_id)
    if exercise is None:
        _write_json(status, {"error": f"unknown exercise id {exercise_id!r}"})
        return
    guard = _GUARD[0] if _GUARD else None
    if guard is not None and guard.message_for(k):  # the notebook's code reached the reference
        _write_json(status, {"error": guard.message_for(k)})
        return
    if name not in namespace:
        _write_json(status, {"missing": name})
        return
    student = namespace[name]
    cases = _load(os.path.join(grader_dir, protocol.cases_file(k)), weights_only=True)
    stopped = ""  # why the remaining cases are not run (a hang, too much output, no memory)
    for which in ("visible", "hidden"):
        for i, fields in enumerate(cases.get(which, [])):
            path = os.path.join(grader_dir, protocol.output_file(k, which, i))
            if stopped:
                _write_pt(path, {"kind": "error", "message": f"not run: an earlier case {stopped}",
                                 "extra": None})
                continue
            case = Case(**fields)
            entry: dict = {"extra": None}
            restore()
            progress.set(phase=protocol.CASE, k=k, which=which, i=i)
            counter[0] = 0
            try:
                output = _call_case(exercise, student, case, watcher, step_timeout, k=k)
                forbidden = watcher.message() or (_LOST if watcher.lost else None)
                problem = forbidden or _unsupported(output)
                if problem:
                    entry.update(kind="error" if forbidden else "unsupported", message=problem)
                else:
                    entry.update(kind="value", value=_plain(output))
                    if exercise.extra_check is not None:
                        progress.set(phase=protocol.EXTRA, k=k, which=which, i=i)
                        counter[0] = 0
                        try:
                            extra = _call_case(exercise, student, case, watcher, step_timeout, extra=True, k=k)
                            forbidden = watcher.message() or (_LOST if watcher.lost else None)
                            entry["extra"] = forbidden or (None if extra is None else str(extra))
                        except BaseException as exc:  # the learner's code may raise anything
                            entry["extra"] = watcher.message() or _error(exc, step_timeout)
            except BaseException as exc:  # the learner's code may raise anything (sys.exit too)
                message = _error(exc, step_timeout)
                entry.update(kind="error", message=watcher.message() or message)
                if isinstance(exc, StepTimeout):
                    stopped = "did not finish in time"
                elif isinstance(exc, OutputLimitExceeded):
                    stopped = "printed too much"
                elif message.startswith("ran out of memory"):
                    stopped = "ran out of memory"
            try:
                _write_pt(path, entry)
            except BaseException as exc:  # e.g. an output torch.save cannot write
                _write_pt(path, {"kind": "unsupported", "extra": None,
                                 "message": f"returned an object that cannot be saved ({_error(exc)})"})
    late = guard.message_for(k) if guard is not None else None  # e.g. from a __del__ between the cases
    _write_json(status, {"error": late} if late else {"done": True})


# --------------------------------------------------------------------------- main


def _limit_address_space(memory_limit: int) -> None:
    """RLIMIT_AS = what is mapped now + the memory limit: also catches what RLIMIT_DATA
    does not count (shared anonymous mappings such as ``mmap.mmap(-1, n)``)."""
    try:
        with _open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return
    limit = size + memory_limit
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        pass


def _guarded_modules() -> tuple[types.ModuleType, ...]:
    """The grader's modules whose code runs in this process: this one, the checks
    (:mod:`attnlib.grading.core`), the files it writes (:mod:`attnlib.grading.protocol`), any
    other module of ``attnlib/grading`` they import (e.g. the course's secret) and the
    exercises' own code (their cases, ``build_args`` and extra checks, in
    :mod:`attnlib.grading.exercises`: every chapter module and the helpers they share)."""
    import attnlib.grading.core as core
    from attnlib.grading import exercises

    chapters = tuple(sys.modules[f"{exercises.__name__}.{name}"]
                     for name in ("common", *exercises.CHAPTER_MODULES))
    named = (_THIS, core, protocol, exercises)
    others = tuple(m for name, m in sorted(sys.modules.items())
                   if name.startswith("attnlib.grading.") and name.count(".") == 2
                   and isinstance(m, types.ModuleType) and not any(m is n for n in named))
    return (_THIS, core, protocol, *others, *chapters)


def _snapshot() -> dict[str, Any]:
    """The grader's own functions and classes as they are before the learner's code runs (and,
    of :mod:`~attnlib.grading.protocol`, every name: the file names, the phases, the ``os``
    functions it bound)."""
    found: dict[str, Any] = {}
    for module in _guarded_modules():
        for name, obj in vars(module).items():
            if isinstance(obj, (types.FunctionType, type)) and getattr(obj, "__module__", "") == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
                if isinstance(obj, type):
                    for attr, value in vars(obj).items():
                        found[f"{module.__name__}.{name}.{attr}"] = value
                else:
                    found[f"{module.__name__}.{name}.__code__"] = obj.__code__
            elif module is protocol and not name.startswith("__") and not isinstance(obj, types.ModuleType):
                found[f"{module.__name__}.{name}"] = obj
    found["sys.setprofile"] = _guarded_setprofile
    found["threading.setprofile"] = _guarded_threading_setprofile
    found["torch.overrides.TorchFunctionMode.__enter__"] = TorchFunctionMode.__enter__
    found["torch.overrides.TorchFunctionMode.__exit__"] = TorchFunctionMode.__exit__
    return found


def _restore(intact: dict[str, Any]) -> list[str]:
    """Put back every one of the grader's own objects the notebook replaced; their names."""
    modules = {m.__name__: m for m in _guarded_modules()}
    changed = []
    for key, obj in intact.items():
        try:
            if key in ("sys.setprofile", "threading.setprofile"):
                owner = sys if key == "sys.setprofile" else threading
                if owner.setprofile is not obj:
                    changed.append(key)
                    owner.setprofile = obj
                continue
            if key.startswith("torch.overrides.TorchFunctionMode."):
                attr = key.rsplit(".", 1)[1]
                if vars(TorchFunctionMode).get(attr) is not obj:
                    changed.append(key)
                    setattr(TorchFunctionMode, attr, obj)
                continue
            module_name = next(m for m in modules if key.startswith(m + "."))
            parts = key[len(module_name) + 1:].split(".")
            module = modules[module_name]
            if len(parts) == 1:
                if vars(module).get(parts[0]) is not obj:
                    changed.append(key)
                    setattr(module, parts[0], obj)
                continue
            owner = intact[f"{module_name}.{parts[0]}"]
            if parts[1] == "__code__":
                if owner.__code__ is not obj:
                    changed.append(key)
                    owner.__code__ = obj
            elif vars(owner).get(parts[1]) is not obj:
                changed.append(key)
                setattr(owner, parts[1], obj)
        except (AttributeError, TypeError, ValueError):
            changed.append(key)
    return changed


def main(grader_dir: str) -> int:
    global _progress, _memory_limit, _output_limit
    with _open(os.path.join(grader_dir, protocol.JOB)) as f:
        job = json.load(f)
    step_timeout = float(job["step_timeout"])
    _memory_limit = job.get("memory_limit")
    _output_limit = int(job.get("output_limit") or _output_limit)
    progress = _progress = Progress(grader_dir)
    progress.write()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file over the size limit: an OSError
    torch.set_num_threads(1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401  (its first import builds a font cache: millions of
        # calls, many times slower under the whole run's profiler)
    except Exception:  # matplotlib is optional
        pass
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False  # no sqlite file, no thread
    config.InteractiveShell.colors = "nocolor"
    shell = InteractiveShell.instance(config=config)
    # `%matplotlib inline` and friends: keep the non-interactive backend
    shell.enable_matplotlib = lambda gui=None: ("agg", "agg")  # type: ignore[method-assign]

    exercises = [tuple(e) for e in job["exercises"]]
    start = int(job.get("start", 0))
    watchers = {k: CallWatcher(EXERCISES[ex_id].forbidden if ex_id in EXERCISES else (), _SENTINELS)
                for k, (ex_id, _) in enumerate(exercises) if k >= start}
    _watchers.extend(watchers.values())
    counter = [0]
    sys.stdout = LimitedStream(sys.stdout, counter, _output_limit)
    sys.stderr = LimitedStream(sys.stderr, counter, _output_limit)
    os._exit = posix._exit = _exit_hook  # type: ignore[assignment]
    sys.setprofile = _guarded_setprofile
    threading.setprofile = _guarded_threading_setprofile
    if _memory_limit:
        _limit_address_space(int(_memory_limit))

    intact = _snapshot()

    def restore() -> list[str]:
        """The grader's own code as it was, before each exercise and each case."""
        changed = _restore(intact)
        if changed:
            names = ", ".join(c.replace("__main__.", "attnlib.grading.child.") for c in changed[:5])
            note = (f"the notebook replaced the grader's own code ({names}{' ...' if len(changed) > 5 else ''}); "
                    "it was put back before grading")
            if note not in progress.notes:
                progress.notes.append(note)
                progress.write()
        return changed

    guard = RunGuard(watchers, grader_dir, exercises)
    _GUARD.append(guard)

    def check(index: int) -> None:
        """After each cell: the grader's code replaced there may have blinded the watcher."""
        changed = restore()
        if changed:
            names = ", ".join(c.replace("__main__.", "attnlib.grading.child.") for c in changed[:3])
            guard.record(guard.every, f"replaced the grader's own code ({names}{' ...' if len(changed) > 3 else ''}) "
                                      f"during cell {index}, which is not allowed: what the notebook did then "
                                      "cannot be checked")

    why = _block_new_processes()
    if why:
        progress.notes.append(f"the notebook's code could start other programs and threads here (no seccomp: "
                              f"{why}); the grader's audit hook refuses the usual routes")
    _add_audit_hook(guard.audit)
    guard.start()
    # a resumed attempt (start > 0) runs the cells again: the objects must be defined
    _run_cells(shell, job["cells"], set(job.get("skip", [])), step_timeout, progress, counter, guard, check)
    namespace = shell.user_ns
    for k, (exercise_id, name) in enumerate(exercises):
        if k < start:
            continue
        progress.set(phase=protocol.EXERCISE, k=k)
        restore()
        _grade_exercise(k, exercise_id, name, namespace, step_timeout, grader_dir, progress,
                        watchers[k], counter, restore)
    progress.set(phase=protocol.FINISHED)
    _write_json(os.path.join(grader_dir, protocol.DONE), {"done": True})
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    return 0


#: The grader's frames that run the notebook's code: an event whose frames reach one of these
#: before any of the notebook's is the grader's own doing (see :func:`_origin`).
_ROOTS = frozenset({_run_cells.__code__, _grade_exercise.__code__, main.__code__, _call_case.__code__,
                    _exit_hook.__code__, RunGuard._save.__code__})
#: The watcher's own code: the step's alarm waits until it is out of it (see :func:`_on_alarm`).
_WATCHER_CODES = frozenset(
    c for fn in [f for cls in (CallWatcher, RunGuard, _RunMode, _WatchMode) for v in vars(cls).values()
                 for f in (v, getattr(v, "fget", None)) if isinstance(f, types.FunctionType)]
    + [_origin, _entry_origin, _tamper_origin, _trusted, _code_tree, _mode_off, _qualname, _dotted_file, _short,
       _learner, _guarded_setprofile, _guarded_threading_setprofile, _purge_linecache, _sources_of]
    for c in _code_tree(fn.__code__, []))
_OWN_CODES = _OWN_CODES | {RunGuard.resume.__code__, RunGuard.pause.__code__, RunGuard.start.__code__}


if __name__ == "__main__":
    faulthandler.enable()
    try:
        code = main(sys.argv[1])
    except BaseException:
        try:
            traceback.print_exc(file=sys.__stderr__)
        except BaseException:
            pass
        code = 3
    _real_exit(code)
