"""How a class run stops: Ctrl-C, SIGTERM and SIGHUP become a request the grading loop
watches (:class:`_Stop`), and the sandboxed children still grading are killed
(:func:`_kill_sandboxes`), for :func:`attnlib.grading.classroom.grade_class`."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any


class _Stop:
    """Ctrl-C, SIGTERM and SIGHUP set :attr:`event` (and remember the first signal) instead of
    interrupting the main thread where it happens to be; the grading loop watches it. A
    signal the process ignores (e.g. SIGHUP under ``nohup``) stays ignored."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self.event.is_set()

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()

    @contextlib.contextmanager
    def installed(self):
        saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                try:
                    if signal.getsignal(sig) == signal.SIG_IGN:
                        continue
                    saved[sig] = signal.signal(sig, self)
                except (OSError, ValueError):
                    pass
        try:
            yield self
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def _kill_sandboxes() -> None:
    """SIGKILL the process group of every grading child this process started: the sandbox
    script, or the child it became (without namespaces it execs ``attnlib.grading.child``).
    The grading threads see their child end, give up and remove their temporary folders.
    Linux: the children are found in /proc; elsewhere nothing is killed and the students in
    flight end within their time limit."""
    from .supervisor import SANDBOX_SCRIPT

    me, marks = os.getpid(), {os.fsencode(str(SANDBOX_SCRIPT)), b"attnlib.grading.child"}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for name in entries:
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not marks & set(f.read().split(b"\0")):
                    continue
        except (OSError, ValueError, IndexError):
            continue
        for kill in (os.killpg, os.kill):  # the child's group (it leads a session), then the child
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
