"""The watch over the whole run of the grader's child (:class:`RunGuard`), not only the graded calls.

Issue 12: a cell that calls the reference on the public cases and a "solution" that looks the
outputs up is a universal cheat. From the first cell to the end of :mod:`attnlib.grading.child`,
a profiler that consults every exercise's :class:`~attnlib.grading.watcher.CallWatcher` at once
records a forbidden call made by the learner's code anywhere (a cell's top level, a ``__del__``
between two cases, a graded function serving the exercises graded after it) for the exercises
it concerns, and an audit hook refuses and records what no profiler sees (reading attnlib's
source or its ``__pycache__``, building a copy of its code, starting another program); a
seccomp filter refuses new processes and threads (:func:`_block_new_processes`). An exercise
with such a record fails with its message. Switching the watcher off during a cell, or
replacing the grader's code there, costs every exercise. The record is kept in the grader's
directory, which the learner's code cannot reach, so that a restarted child still has it.
"""

from __future__ import annotations

import ctypes
import json
import linecache
import marshal
import os
import threading
import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from attnlib.grading import EXERCISES, protocol
from attnlib.grading.core import ForbiddenCallError
from attnlib.grading.watcher import (
    _ATTNLIB_DIR, _ENTRY_CODES, _EXERCISE_FILES, _IMPORT, _LEARNER_FILES, _MODE_CALLBACKS, _MODE_OFF, _OWN_CODES,
    _ROOTS, CallWatcher, _code_tree, _DisableTorchFunction, _dotted_file, _entry_origin, _getframe, _getprofile,
    _mode_off, _mode_stack, _origin, _qualname, _real_setprofile, _realpath, _short, _tamper_origin,
    _threading_setprofile, _trusted)

_pop_mode, _push_mode = torch._C._pop_torch_function_stack, torch._C._push_on_torch_function_stack
_fsdecode, _marshal_loads, _linecache = os.fsdecode, marshal.loads, linecache.cache
_open, _dumps = open, json.dumps
#: The whole-run record (see :class:`RunGuard`): private to the child, kept across its attempts.
_RECORD = "whole_run.json"


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
_watchers: list[CallWatcher] = []  # every exercise's watcher, once main() made them


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



_OWN_CODES.update({_guarded_setprofile.__code__, _guarded_threading_setprofile.__code__,
                   RunGuard.resume.__code__, RunGuard.pause.__code__, RunGuard.start.__code__})


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
