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

import faulthandler
import importlib
import io
import json
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
from attnlib.grading.core import Case, ForbiddenCallError, _forbid, _resolve, call  # noqa: E402

_save, _load, _dumps, _open = torch.save, torch.load, json.dumps, open
_real_exit = os._exit
_real_setprofile = sys.setprofile
_getprofile = sys.getprofile
_threading_setprofile = threading.setprofile
_getframe = sys._getframe
_TensorType = Tensor
_mode_stack = torch.overrides._get_current_function_mode_stack
_THIS = sys.modules[__name__]  # IPython later puts its own module in sys.modules["__main__"]


class StepTimeout(BaseException):
    """Raised by SIGALRM when one cell or one case runs past ``step_timeout``."""


class OutputLimitExceeded(BaseException):
    """Raised when one cell or one case prints more than ``output_limit`` bytes."""


def _on_alarm(signum: int, frame: Any) -> None:
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


_MODE_CALLBACKS = frozenset({"__torch_dispatch__", "__torch_function__"})


class _WatchMode(TorchFunctionMode):
    """Sees torch's builtins however they are called (also from C: ``map``, ``partial``)."""

    def __init__(self, watcher: "CallWatcher") -> None:
        super().__init__()
        self.watcher = watcher

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        name = self.watcher.torch_funcs.get(id(func))
        if name is not None:
            self.watcher.hit(name, _getframe(1))
        return func(*args, **(kwargs or {}))


def _exercise_files(grading_dir: str) -> frozenset[str]:
    """The grader's files whose code may use forbidden names on its own behalf (the
    exercises' cases and extra checks, the class tools): every ``.py`` file under
    ``grading_dir``, the chapter modules in ``exercises/`` included, except the grader's own
    machinery at the top level (whose calls never come from a check)."""
    own = {"core.py", "child.py", "runner.py", "supervisor.py", "report.py", "sandbox.py", "notebook.py",
           "protocol.py", "__init__.py"}
    files = set()
    for top, _dirs, names in os.walk(grading_dir):
        for f in names:
            if f.endswith(".py") and not (top == grading_dir and f in own):
                files.add(os.path.join(top, f))
    return frozenset(files)


class CallWatcher:
    """Fails a graded call that calls one of ``forbidden`` (dotted names, as in
    :attr:`attnlib.grading.core.Exercise.forbidden`), by any route.

    Resolved once, before the learner's code runs: a Python function (its code object), a
    class (the code of its own methods), a module (every code object of its files; for
    ``attnlib``, its reference modules, not ``attnlib.grading``), a builtin (its identity; a
    method such as ``torch.Tensor.softmax`` by its class and name). :meth:`arm` /
    :meth:`disarm` around each graded call; :attr:`violation` names the first forbidden
    call (also when the learner's code caught the :class:`ForbiddenCallError`).
    """

    def __init__(self, forbidden: tuple[str, ...], sentinels: tuple[types.CodeType, ...] = ()) -> None:
        self.codes: dict[types.CodeType, str] = {}
        self.files: dict[str, str] = {}
        self.builtins: dict[int, str] = {}
        self.methods: dict[str, list[tuple[type, str]]] = {}
        self.torch_funcs: dict[int, str] = {}
        self._keep: list[Any] = []  # the resolved objects, alive (their ids are keys)
        self.violation: str | None = None
        self.armed = False
        self.lost = False
        self.sentinels = frozenset(sentinels)
        self._trusted_cache: dict[str, bool] = {}
        self._roots = _trusted_roots()
        grading_dir = os.path.dirname(os.path.abspath(__file__))
        self._attnlib_dir = os.path.dirname(grading_dir) + os.sep
        self.exempt_files = _exercise_files(grading_dir)
        for dotted in forbidden:
            self._add(dotted)
        self.active = bool(self.codes or self.files or self.builtins or self.methods)
        self.hook = self.profile  # one bound method: compared by identity
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
                    if f.endswith(".py"):
                        rel = os.path.relpath(os.path.join(top, f), root)[:-3].replace(os.sep, ".")
                        name = dotted if rel == "__init__" else f"{dotted}.{rel}"
                        self.files[os.path.join(top, f)] = name
        else:
            self.files[os.path.abspath(path)] = dotted
        for attr in getattr(module, "__all__", []):  # the public names, for the messages
            obj = getattr(module, attr, None)
            if obj is not None and not isinstance(obj, types.ModuleType):
                self._add_object(obj, f"{dotted}.{attr}", codes_only=True)

    def _add_function(self, fn: Any, dotted: str) -> None:
        seen = 0
        while fn is not None and seen < 10:
            code = getattr(fn, "__code__", None)
            if isinstance(code, types.CodeType):
                self.codes.setdefault(code, dotted)
            fn = getattr(fn, "__wrapped__", None)
            seen += 1

    def _add_object(self, obj: Any, dotted: str, codes_only: bool = False) -> None:
        if isinstance(obj, type):
            for name, attr in vars(obj).items():
                for fn in (attr, getattr(attr, "__func__", None), getattr(attr, "fget", None)):
                    if isinstance(fn, types.FunctionType):
                        self._add_function(fn, f"{dotted}" if name == "__init__" else f"{dotted}.{name}")
            return
        if isinstance(obj, types.FunctionType):
            self._add_function(obj, dotted)
        if codes_only:
            return
        if isinstance(obj, (types.MethodDescriptorType, types.WrapperDescriptorType)):
            self.methods.setdefault(obj.__name__, []).append((obj.__objclass__, dotted))
        elif not isinstance(obj, types.FunctionType):
            self.builtins[id(obj)] = dotted
        self.torch_funcs[id(obj)] = dotted
        self._keep.append(obj)

    # ------------------------------------------------------------------ watching

    def _trusted(self, filename: str) -> bool:
        known = self._trusted_cache.get(filename)
        if known is None:
            path = os.path.abspath(filename) if filename.startswith(os.sep) else filename
            known = path.startswith("<frozen ") or any(path.startswith(r + os.sep) for r in self._roots)
            self._trusted_cache[filename] = known
        return known

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

    def profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            name = self.codes.get(code)
            if name is None:
                module = self.files.get(code.co_filename)
                if module is None or code.co_name in _MODE_CALLBACKS:
                    return
                name = f"{module}.{getattr(code, 'co_qualname', code.co_name)}"
            elif code.co_name in _MODE_CALLBACKS:
                return
            self.hit(name, frame.f_back)
        elif event == "c_call":
            if arg is _real_setprofile and frame.f_code not in _OWN_CODES:
                self.tampered("sys.setprofile")
            name = self.builtins.get(id(arg))
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


_watchers: list[CallWatcher] = []
_OWN_CODES = frozenset({CallWatcher.arm.__code__, CallWatcher.disarm.__code__})


def _guarded_setprofile(func: Any) -> None:
    """``sys.setprofile`` as the notebook sees it: changing the profiler during a graded
    call is recorded (threads started by ``threading`` set the watcher itself: allowed)."""
    for w in _watchers:
        if w.armed and func is not w.hook:
            w.tampered("sys.setprofile")
    _real_setprofile(func)


_OWN_CODES = _OWN_CODES | {_guarded_setprofile.__code__}


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
               progress: Progress, counter: list[int]) -> None:
    run_cell = shell.run_cell
    for cell in cells:
        if cell["index"] in skip:
            continue
        progress.set(phase=protocol.CELL, cell=cell["index"])
        counter[0] = 0
        exc: BaseException | None = None
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
        if exc is not None:
            progress.errors.append({"index": cell["index"], "message": _error(exc, step_timeout, True)})
    progress.write()


# --------------------------------------------------------------------------- graded calls


def _call_case(exercise: Any, student: Any, case: Case, watcher: CallWatcher, step_timeout: float,
               extra: bool = False) -> Any:
    """One graded call (or the exercise's extra check), under the alarm and the watcher."""
    _arm(step_timeout)
    try:
        with _forbid(exercise.forbidden):
            watcher.arm()
            try:
                if extra:
                    return exercise.extra_check(student, case)
                return call(exercise, student, case)
            finally:
                watcher.disarm()
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
                output = _call_case(exercise, student, case, watcher, step_timeout)
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
                            extra = _call_case(exercise, student, case, watcher, step_timeout, extra=True)
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
    _write_json(status, {"done": True})


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
    (:mod:`attnlib.grading.core`), the files it writes (:mod:`attnlib.grading.protocol`) and
    the exercises' own code (their cases, ``build_args`` and extra checks, in
    :mod:`attnlib.grading.exercises`: every chapter module and the helpers they share)."""
    import attnlib.grading.core as core
    from attnlib.grading import exercises

    chapters = tuple(sys.modules[f"{exercises.__name__}.{name}"]
                     for name in ("common", *exercises.CHAPTER_MODULES))
    return (_THIS, core, protocol, *chapters)


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
    found["torch.overrides.TorchFunctionMode.__enter__"] = TorchFunctionMode.__enter__
    found["torch.overrides.TorchFunctionMode.__exit__"] = TorchFunctionMode.__exit__
    return found


def _restore(intact: dict[str, Any]) -> list[str]:
    """Put back every one of the grader's own objects the notebook replaced; their names."""
    modules = {m.__name__: m for m in _guarded_modules()}
    changed = []
    for key, obj in intact.items():
        try:
            if key == "sys.setprofile":
                if sys.setprofile is not obj:
                    changed.append(key)
                    sys.setprofile = obj
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
    if _memory_limit:
        _limit_address_space(int(_memory_limit))

    intact = _snapshot()

    def restore() -> None:
        """The grader's own code as it was, before each exercise and each case."""
        changed = _restore(intact)
        if changed:
            names = ", ".join(c.replace("__main__.", "attnlib.grading.child.") for c in changed[:5])
            note = (f"the notebook replaced the grader's own code ({names}{' ...' if len(changed) > 5 else ''}); "
                    "it was put back before grading")
            if note not in progress.notes:
                progress.notes.append(note)
                progress.write()
    # a resumed attempt (start > 0) runs the cells again: the objects must be defined
    _run_cells(shell, job["cells"], set(job.get("skip", [])), step_timeout, progress, counter)
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
