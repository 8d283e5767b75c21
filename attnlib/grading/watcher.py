"""Who is behind a call, and the call watcher of one graded call (:class:`CallWatcher`).

Part of the grader's child (:mod:`attnlib.grading.child`). While a graded call runs,
``sys.setprofile`` sees every Python frame that starts (so a call into a forbidden Python
function or class, or into any module forbidden as a whole such as ``attnlib``, is caught
however it was reached: an alias captured in an earlier cell, a ``functools.partial``, a
subclass) and every builtin called from Python code; for torch's builtins a
``TorchFunctionMode`` also sees calls made from C (``map``, ``functools.partial``). The case
then fails with "called X, which this exercise forbids". Calls made by the exercise's own
``extra_check`` (code under ``attnlib/grading``) are not counted.

The functions here also tell, for :mod:`attnlib.grading.guard` (the watch over the whole run),
whether the notebook's code is behind an event (:func:`_origin`): the grader's frames that run
the notebook's code are :data:`_ROOTS`, which the child fills in.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import sysconfig
import threading
import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from attnlib.grading import EXERCISES
import attnlib.grading.core as _core
from attnlib.grading.core import ForbiddenCallError, _resolve

_real_setprofile = sys.setprofile
_getprofile = sys.getprofile
_threading_setprofile = threading.setprofile
_getframe = sys._getframe
_mode_stack = torch.overrides._get_current_function_mode_stack
_realpath = os.path.realpath
_bootstrap, _bootstrap_external = sys.modules["importlib._bootstrap"], sys.modules["importlib._bootstrap_external"]
#: Loading a module (an import statement, a reload, a loader's ``exec_module``): its body runs,
#: its ``.pyc`` is unmarshalled, on the import system's behalf (reading a file is another matter).
_IMPORT_CODES = frozenset(f.__code__ for f in (
    _bootstrap._find_and_load, _bootstrap._load_unlocked, _bootstrap._exec,
    _bootstrap_external._LoaderBasics.exec_module, _bootstrap_external.SourceLoader.get_code,
    _bootstrap_external.SourcelessFileLoader.get_code))
_GRADING_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_ATTNLIB_DIR = os.path.dirname(_GRADING_DIR.rstrip(os.sep)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_PYDOC = os.path.join(sysconfig.get_paths()["stdlib"], "pydoc.py")
#: The child's own machinery (the process that runs the notebook's code): its frames are neither
#: the notebook's nor a check's.
_MACHINERY = frozenset(_GRADING_DIR + f for f in ("child.py", "watcher.py", "guard.py", "steps.py"))
#: The grader's frames that run the notebook's code (filled in by :mod:`attnlib.grading.child`): an
#: event whose frames reach one of these before any of the notebook's is the grader's own doing.
_ROOTS: set[types.CodeType] = set()


def _trusted_roots() -> tuple[str, ...]:
    import attnlib

    paths = sysconfig.get_paths()
    roots = {os.path.dirname(os.path.abspath(attnlib.__file__))}
    roots |= {os.path.abspath(paths[key]) for key in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(key)}
    roots |= {os.path.abspath(p) for p in sys.path if p and ("site-packages" in p or "dist-packages" in p)}
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
    own = {"core.py", "child.py", "watcher.py", "guard.py", "steps.py", "runner.py", "supervisor.py", "report.py",
           "sandbox.py", "notebook.py", "protocol.py", "__init__.py", "compare.py", "site.py", "summary.py",
           "stopping.py"}
    return frozenset(os.path.join(top, f) for top, _dirs, names in os.walk(grading_dir) for f in names
                     if f.endswith(".py") and not (top == grading_dir and f in own))


_EXERCISE_FILES = _exercise_files(_GRADING_DIR.rstrip(os.sep))


def _entry_codes() -> frozenset[types.CodeType]:
    """The exercises' code a notebook may call itself: each exercise's ``make_cases`` (the
    cases are public), ``build_args`` (arguments from a case) and ``launch`` (the launcher of a
    kernel: the learner's kernel runs inside it), and the input helpers of
    ``exercises/common.py`` (seeded tensors), and the handlers of the torch modes the extra
    checks enter (a recorder's ``__torch_function__``: torch calls it at each of the learner's
    torch calls while the check runs the learner's code), found in the classes of every module
    imported under ``attnlib.grading.exercises`` (a chapter's module, or its package and their
    submodules). Everything else there (the catalogued mistakes, the correct helpers they are
    built from, the extra checks) is the grader's own answer key."""
    from attnlib.grading import exercises
    from attnlib.grading.exercises import common

    codes = {getattr(f, "__code__", None) for e in EXERCISES.values() for f in (e.make_cases, e.build_args, e.launch)}
    codes |= {getattr(getattr(common, n, None), "__code__", None)
              for n in ("randn", "rand_bool", "state_dict", "clone_args")}
    for name, module in sorted(sys.modules.items()):
        if name.startswith(f"{exercises.__name__}.") and isinstance(module, types.ModuleType):
            classes = [obj for obj in vars(module).values() if isinstance(obj, type)]
            codes |= {getattr(vars(c).get(n), "__code__", None) for c in classes for n in _MODE_CALLBACKS}
    codes.discard(None)
    return frozenset(codes)  # type: ignore[arg-type]


_ENTRY_CODES = _entry_codes()


def _kernel_starts() -> frozenset[types.CodeType]:
    """Where Triton's interpreter starts a kernel's code (chapter 13): the grid loop of a
    launch, and a kernel called from a kernel. While the notebook runs, the grader launches no
    kernel of its own, so a kernel started there is the learner's object or runs on its behalf,
    even when the exercise's own launcher (an entry code) is further up the stack: the
    course's kernel (or a catalogued mistake's) given the learner's name is caught. Empty
    where Triton's interpreter is not loaded (no Triton, or kernels compiled for a GPU)."""
    interpreter = sys.modules.get("triton.runtime.interpreter")
    codes = [getattr(getattr(getattr(interpreter, owner, None), "__call__", None), "__code__", None)
             for owner in ("GridExecutor", "InterpretedFunction")]
    return frozenset(code for code in codes if isinstance(code, types.CodeType))


_KERNEL_STARTS = _kernel_starts()
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
                if filename not in _MACHINERY:
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
        if code in _KERNEL_STARTS:  # a kernel launched while the notebook runs: the learner's
            return True
        filename = code.co_filename
        if filename in _EXERCISE_FILES or code in _IMPORT_CODES:
            return False
        if code in _STUDENT_SITES:
            student = True
        elif filename in _MACHINERY:
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


def _kernel_function(obj: Any) -> types.FunctionType | None:
    """The Python function of a ``@triton.jit`` kernel (``obj.fn``), or ``None`` for anything
    else."""
    fn = getattr(obj, "fn", None) if not isinstance(obj, (type, types.FunctionType)) else None
    module = getattr(type(obj), "__module__", "") or ""
    return fn if isinstance(fn, types.FunctionType) and module.split(".")[0] == "triton" else None


def _rewritten(kernel: Any) -> types.FunctionType | None:
    """The function Triton's interpreter runs for ``kernel``: a copy of its code compiled from
    its rewritten source (the same file name), made once and cached; ``None`` when the kernel
    is compiled for a GPU, where no Python of it runs."""
    try:
        fn = kernel.rewrite() if callable(getattr(kernel, "rewrite", None)) else None
    except Exception:  # no source to rewrite: the interpreter runs the function itself
        return None
    return fn if isinstance(fn, types.FunctionType) else None


class CallWatcher:
    """Fails a graded call that calls one of ``forbidden`` (dotted names, as in
    :attr:`attnlib.grading.core.Exercise.forbidden`), by any route.

    Resolved once, before the learner's code runs: a Python function (its code object), a
    Triton kernel (its function's code, and the rewritten copy that Triton's interpreter runs;
    a kernel started by the interpreter during a graded call is never excused by the
    exercise's own launcher further up, see :func:`_kernel_starts`), a
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
        kernel = _kernel_function(obj)
        if kernel is not None:  # a Triton kernel: its function, and the copy the interpreter runs
            self._add_function(kernel, dotted, not codes_only)
            rewritten = _rewritten(obj)
            if rewritten is not None:
                self._add_function(rewritten, dotted, not codes_only)
            return
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
            if code in self.sentinels or code in _KERNEL_STARTS:  # a kernel started: the learner's
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


#: The grader's own calls of ``sys.setprofile`` (the guard adds its own).
_OWN_CODES: set[types.CodeType] = {CallWatcher.arm.__code__, CallWatcher.disarm.__code__}
