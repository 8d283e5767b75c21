"""One step of the grader's child at a time (a cell, a case): its alarm, its output limit, ``progress.json``.

Part of :mod:`attnlib.grading.child`. Each step runs under ``SIGALRM`` (:func:`_arm`: the
step's time is up, :class:`StepTimeout` in the learner's code, but never inside the call
watcher, which an exception would switch off); ``sys.stdout`` and ``sys.stderr`` count what
each step prints (:class:`LimitedStream`, block-buffered, flushed at every step);
``progress.json`` says which step runs now, so that the parent can time it and name it; and
``os._exit`` as the notebook sees it (:func:`_exit_hook`) records the call before the process
ends.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import types
from typing import Any

import torch

from attnlib.grading import protocol
from attnlib.grading.guard import (RunGuard, _RunMode, _guarded_setprofile, _guarded_threading_setprofile,
                                   _learner, _purge_linecache)
from attnlib.grading.watcher import (CallWatcher, _WatchMode, _code_tree, _dotted_file, _entry_origin, _mode_off,
                                     _origin, _qualname, _short, _sources_of, _tamper_origin, _trusted)

_save, _dumps = torch.save, json.dumps
_real_exit = os._exit


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


_PROGRESS: list[Progress] = []  # the child's progress file, once main() made it


def _exit_hook(code: int = 0) -> None:
    """``os._exit`` as the notebook sees it: the call is recorded before the process ends."""
    if _PROGRESS:
        try:
            _PROGRESS[0].exit_code = int(code)
            _PROGRESS[0].write()
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



#: The watcher's own code: the step's alarm waits until it is out of it (see :func:`_on_alarm`).
_WATCHER_CODES = frozenset(
    c for fn in [f for cls in (CallWatcher, RunGuard, _RunMode, _WatchMode) for v in vars(cls).values()
                 for f in (v, getattr(v, "fget", None)) if isinstance(f, types.FunctionType)]
    + [_origin, _entry_origin, _tamper_origin, _trusted, _code_tree, _mode_off, _qualname, _dotted_file, _short,
       _learner, _guarded_setprofile, _guarded_threading_setprofile, _purge_linecache, _sources_of]
    for c in _code_tree(fn.__code__, []))
