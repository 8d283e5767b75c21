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
  cell, and the least one case gets: see :func:`attnlib.grading.protocol.case_limit`),
  ``output_limit`` (bytes one cell or case may print) and ``memory_limit`` (bytes, or ``null``);
* ``cases_<k>.pt`` (from the parent): for exercise ``k``, ``{"visible": [...], "hidden":
  [...]}`` of cases as plain dicts (loaded with ``torch.load(weights_only=True)``).

The child writes back, each file atomically (:func:`attnlib.grading.protocol.write_atomic`:
written then renamed), so that a parent that kills it still finds everything finished before:

* ``reference_times.json``: the reference's time on each case and its extra check, measured
  before any of the learner's code runs (:func:`_reference_times`); each case's time limit
  follows from it, and the parent enforces the same limits should the child ignore its alarm;
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


The notebook's code is watched while it runs: each graded call by its exercise's call watcher
(:mod:`attnlib.grading.watcher`), the whole run by :mod:`attnlib.grading.guard` (no call of the
reference anywhere, no reading of its source, no new process); each cell and case is one step
with its own alarm and output limit (:mod:`attnlib.grading.steps`).

Everything this module needs is imported, and bound to local names, before the learner's
code runs, so that a notebook that replaces ``torch.save`` and the like does not change what
is written (the comparison itself happens in the parent anyway). The grader's own functions
and classes (here, in :mod:`attnlib.grading.core`, :mod:`attnlib.grading.protocol` and every
other module of ``attnlib/grading`` loaded here) are recorded before the first cell and put
back before every exercise and every case, with a note, should the notebook replace them
(found through ``gc``, say). A file over the size limit raises ``OSError`` instead of killing
the process (``SIGXFSZ`` ignored).
"""

from __future__ import annotations

import faulthandler
import json
import os
import posix
import resource
import signal
import sys
import threading
import time
import traceback
import types
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from attnlib.grading import EXERCISES, protocol  # noqa: E402
import attnlib.grading.core as _core  # noqa: E402
from attnlib.grading.core import Case, _forbid, _seconds, call  # noqa: E402
from attnlib.grading.guard import (_GUARD, RunGuard, _block_new_processes, _guarded_setprofile,  # noqa: E402
                                   _guarded_threading_setprofile, _purge_linecache, _watchers)
from attnlib.grading.steps import (_PROGRESS, LimitedStream, OutputLimitExceeded, Progress,  # noqa: E402
                                   StepTimeout, _arm, _disarm, _exit_hook, _write_json, _write_pt)
from attnlib.grading.watcher import _ROOTS, CallWatcher  # noqa: E402

_load, _open, _clock = torch.load, open, time.perf_counter
_case_limit, _protocol_timeout = protocol.case_limit, protocol.timeout_message
_real_exit = os._exit
_add_audit_hook = sys.addaudithook
_TensorType = Tensor
_THIS = sys.modules[__name__]  # IPython later puts its own module in sys.modules["__main__"]


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
        return f"did not finish within {step_timeout:g} s, the time limit of one cell (an infinite loop?)"
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


def _call_case(exercise: Any, student: Any, case: Case, watcher: CallWatcher, limit: float,
               extra: bool = False, k: int | None = None) -> Any:
    """One graded call (or the exercise's extra check), under the alarm (at ``limit`` seconds)
    and the watcher (the whole-run guard hands over to it, for exercise ``k``, and takes over
    again after)."""
    guard = _GUARD[0] if _GUARD and k is not None else None
    _purge_linecache()
    _arm(limit)
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


def _reference_times(grader_dir: str, exercises: list[tuple[str, str]], start: int) -> dict[int, dict]:
    """The reference's time on every case of the exercises from ``start`` on (``[call, extra
    check]`` seconds per case, by set), measured here before any of the learner's code runs: in
    the same process, with the same thread count and on the same machine as the learner's calls.
    Written to ``reference_times.json``, where a restarted child and the parent read them."""
    path = os.path.join(grader_dir, protocol.REFERENCE_TIMES)
    known: dict[int, dict] = {}
    try:
        with _open(path) as f:
            known = {int(k): v for k, v in json.load(f).items()}
    except (OSError, ValueError, AttributeError):
        pass
    for k, (exercise_id, _) in enumerate(exercises):
        exercise = EXERCISES.get(exercise_id)
        if k < start or k in known or exercise is None:
            continue
        cases = _load(os.path.join(grader_dir, protocol.cases_file(k)), weights_only=True)
        known[k] = {}
        for which in ("visible", "hidden"):
            known[k][which] = []
            for fields in cases.get(which, []):
                case = Case(**fields)
                ref = exercise.reference
                extra = exercise.extra_check
                known[k][which].append([_seconds(lambda: call(exercise, ref, case)),
                                        _seconds(lambda: extra(ref, case)) if extra is not None else 0.0])
    _write_json(path, {str(k): v for k, v in known.items()})
    return known


def _grade_exercise(k: int, exercise_id: str, name: str, namespace: dict, step_timeout: float,
                    grader_dir: str, progress: Progress, watcher: CallWatcher, counter: list[int],
                    restore: Any = lambda: None, reference: dict | None = None) -> None:
    """Every case of exercise ``k``, each under its own time limit: ``step_timeout`` or, if
    larger, :data:`~attnlib.grading.protocol.CASE_TIME_MULTIPLE` times the ``reference``'s
    time on it (see :func:`_reference_times`)."""
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
    ended, slowest = 0, 0.0  # the calls that returned (or raised), the longest of them
    for which in ("visible", "hidden"):
        times = (reference or {}).get(which) or []
        for i, fields in enumerate(cases.get(which, [])):
            ref_call, ref_extra = times[i] if i < len(times) else (0.0, 0.0)
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
            timed_out = ""
            try:
                timed_out = _protocol_timeout(ref_call, step_timeout, ended, slowest)
                began = _clock()
                output = _call_case(exercise, student, case, watcher, _case_limit(ref_call, step_timeout), k=k)
                entry["seconds"] = took = _clock() - began
                ended, slowest = ended + 1, max(slowest, took)
                forbidden = watcher.message() or (_LOST if watcher.lost else None)
                problem = forbidden or _unsupported(output)
                if problem:
                    entry.update(kind="error" if forbidden else "unsupported", message=problem)
                else:
                    entry.update(kind="value", value=_plain(output))
                    if exercise.extra_check is not None:
                        progress.set(phase=protocol.EXTRA, k=k, which=which, i=i)
                        counter[0] = 0
                        timed_out = _protocol_timeout(ref_extra, step_timeout, ended, slowest)
                        try:
                            extra = _call_case(exercise, student, case, watcher, _case_limit(ref_extra, step_timeout),
                                               extra=True, k=k)
                            forbidden = watcher.message() or (_LOST if watcher.lost else None)
                            entry["extra"] = forbidden or (None if extra is None else str(extra))
                        except BaseException as exc:  # the learner's code may raise anything
                            entry["extra"] = watcher.message() or (timed_out if isinstance(exc, StepTimeout)
                                                                   else _error(exc, step_timeout))
            except BaseException as exc:  # the learner's code may raise anything (sys.exit too)
                message = timed_out if isinstance(exc, StepTimeout) else _error(exc, step_timeout)
                entry.update(kind="error", message=watcher.message() or message)
                if not isinstance(exc, StepTimeout):
                    ended += 1
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
    exercises' own code (their cases, ``build_args`` and extra checks: every module imported
    under :mod:`attnlib.grading.exercises`, each chapter's module or package with its
    submodules, and the helpers they share), and the modules a chapter names in its
    ``GUARDED`` (code its checks run on the learner's behalf: chapter 13's kernel launchers,
    :mod:`attnlib.triton_flash`)."""
    import attnlib.grading.core as core
    from attnlib.grading import exercises

    chapters = tuple(m for name, m in sorted(sys.modules.items())
                     if name.startswith(f"{exercises.__name__}.") and isinstance(m, types.ModuleType))
    named = (_THIS, core, protocol, exercises)
    others = tuple(m for name, m in sorted(sys.modules.items())
                   if name.startswith("attnlib.grading.") and name.count(".") == 2
                   and isinstance(m, types.ModuleType) and not any(m is n for n in named))
    # the modules a chapter's checks run on the learner's behalf (chapter 13's kernel launchers)
    run = dict.fromkeys(name for chapter in chapters for name in getattr(chapter, "GUARDED", ()))
    launchers = tuple(sys.modules[name] for name in run if isinstance(sys.modules.get(name), types.ModuleType))
    return (_THIS, core, protocol, *others, *chapters, *launchers)


def _snapshot() -> dict[str, Any]:
    """The grader's own functions and classes as they are before the learner's code runs, under
    every name a guarded module has for them (its own, and those it imported from the others: the
    guard calls the watcher's functions by its own names), and, of
    :mod:`~attnlib.grading.protocol`, every name (the file names, the phases, the ``os`` functions
    it bound)."""
    found: dict[str, Any] = {}
    modules = _guarded_modules()
    names = {m.__name__ for m in modules}
    for module in modules:
        for name, obj in vars(module).items():
            if isinstance(obj, (types.FunctionType, type)) and getattr(obj, "__module__", "") in names:
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
    longest_first = sorted(modules, key=len, reverse=True)  # a chapter package's submodules before it
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
            module_name = next(m for m in longest_first if key.startswith(m + "."))
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
    global _memory_limit, _output_limit
    with _open(os.path.join(grader_dir, protocol.JOB)) as f:
        job = json.load(f)
    step_timeout = float(job["step_timeout"])
    _memory_limit = job.get("memory_limit")
    _output_limit = int(job.get("output_limit") or _output_limit)
    progress = Progress(grader_dir)
    _PROGRESS.append(progress)
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
    reference_times = _reference_times(grader_dir, exercises, start)

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
                        watchers[k], counter, restore, reference_times.get(k))
    progress.set(phase=protocol.FINISHED)
    _write_json(os.path.join(grader_dir, protocol.DONE), {"done": True})
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    return 0


_ROOTS.update({_run_cells.__code__, _grade_exercise.__code__, main.__code__, _call_case.__code__,
               _exit_hook.__code__, RunGuard._save.__code__})


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