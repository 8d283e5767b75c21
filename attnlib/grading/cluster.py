"""``attnlib grade-class --scheduler ADDRESS``: the same grading, one submission per task, on the
workers of a Dask cluster (:mod:`dask.distributed`), for a class too large for one machine.

Nothing about grading changes: each task runs
:func:`attnlib.grading.classroom.grade_submission` (one sandboxed child process per notebook,
the same limits and the same course secret) on a copy of one student's notebooks, in a
temporary folder of the worker, and sends back the result and the log. The machine that runs
the command keeps every other job: it reads the submissions, decides who is already graded
(resume), writes ``result.json`` and ``grade.log``, the gradebook and the class files, and
shows the progress. So the workers need no shared file system, only the same ``attnlib``
(and its ``dask[distributed]``) as the command: a worker with another version is refused,
since its grades could differ.

What a task is sent: the student's ``.ipynb`` files of the assignment (the only files the
grader reads; their hash is checked on this machine, as for local grading), the source
notebooks (hidden tests) and the course secret. Use TLS (``tls://`` addresses, Dask's
security settings) on a network you do not trust.

A worker that dies mid-task costs a retry: the scheduler gives the task to another worker (up
to its ``distributed.scheduler.allowed-failures``, 3 by default); after that the student is
reported as not graded (a note, no ``result.json``) and is graded by the next run. Ctrl-C
cancels the tasks not started; tasks already running finish on their workers (the sandbox's
limits bound them) and their results are dropped.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["ClusterError", "DaskGrading", "LocalDaskCluster", "grade_remote", "worker_versions"]

#: Seconds to wait for the scheduler, and for at least one worker to join it.
CONNECT_TIMEOUT = 30.0


class ClusterError(Exception):
    """The cluster cannot be used: Dask missing, the scheduler unreachable, no workers, or
    workers whose attnlib differs from this one."""


def _client(address: str, timeout: float) -> Any:
    try:
        from distributed import Client
    except ImportError as exc:
        raise ClusterError("--scheduler needs Dask's distributed scheduler: pip install 'attnlib[cluster]' "
                           f"(or 'dask[distributed]') here and on the workers ({exc})") from None
    where = {"scheduler_file": address} if address.endswith(".json") and Path(address).is_file() \
        else {"address": address}
    try:
        return Client(**where, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc} (expected an address such as "
                           "tcp://host:8786, or the JSON file of `dask scheduler --scheduler-file`)") from None


def worker_versions() -> dict[str, str]:
    """On a worker: the versions that decide a grade (run by :meth:`Client.run`)."""
    import torch

    import attnlib

    return {"attnlib": attnlib.__version__, "torch": torch.__version__}


def grade_remote(student: str, assignment: str, notebooks: dict[str, bytes], sources: dict[str, bytes],
                 grade_kwargs: dict) -> tuple[Any, str]:
    """On a worker: lay out one student's notebooks and the source notebooks as a small course
    in a temporary folder, grade them as local grading does, and return ``(StudentResult,
    log)``. The folder is hidden from the learner's code and removed afterwards."""
    from .classroom import grade_submission
    from .runner import grade_notebook

    for name in (student, assignment, *notebooks, *sources):
        if not name or name != os.path.basename(name) or name in (".", ".."):
            raise ValueError(f"a file or folder name must be a plain name, got {name!r}")
    with tempfile.TemporaryDirectory(prefix="attnlib-task-") as tmp:
        root = Path(tmp)
        folder, src_folder = root / "submitted" / student / assignment, root / "solutions" / assignment
        for base, files in ((folder, notebooks), (src_folder, sources)):
            base.mkdir(parents=True)
            for name, data in files.items():
                (base / name).write_bytes(data)
        kwargs = dict(grade_kwargs, hide=[root / "submitted", root / "solutions"])
        result, log = grade_submission(student, assignment, root, src_folder, kwargs, grade_notebook)
    try:
        from distributed import get_worker

        where = f"graded on the Dask worker {get_worker().address} (its folder {root} is gone)"
    except (ImportError, ValueError):  # called outside a worker (a test)
        where = f"graded in {root} (gone)"
    return result, log + f"note: {where}\n"  # in the log only: a student's notes are their problems


def _notebooks(folder: Path) -> dict[str, bytes]:
    """The student's notebooks a task needs: the ``.ipynb`` files at the top of their folder
    (unreadable ones are left out: the task then finds them missing, as a local run would
    fail to read them)."""
    out = {}
    for p in sorted(folder.glob("*.ipynb")):
        if p.is_file() and not p.is_symlink():
            try:
                out[p.name] = p.read_bytes()
            except OSError:
                pass
    return out


class DaskGrading:
    """A run's connection to the cluster: :meth:`submit` one student, get a
    :class:`concurrent.futures.Future` of ``(StudentResult, log)``."""

    def __init__(self, address: str, assignment: str, root: Path, src_folder: Path, grade_kwargs: dict,
                 timeout: float = CONNECT_TIMEOUT):
        from . import secret
        from .classroom import ClassGradingError

        self.assignment, self.root = assignment, root
        try:
            self.client = _client(address, timeout)
            try:
                self.client.wait_for_workers(1, timeout=timeout)
            except TimeoutError:
                raise ClusterError(f"no worker joined the scheduler at {address} within {timeout:g} s "
                                   "(start some with `dask worker ADDRESS`)") from None
            self._check_versions()
        except ClusterError as exc:
            if hasattr(self, "client"):
                self.client.close()
            raise ClassGradingError(str(exc)) from None
        kwargs = {k: v for k, v in grade_kwargs.items() if k != "hide"}  # the worker hides its own folder
        kwargs.setdefault("course_secret", secret.find(src_folder))  # the secret this machine would use
        self.kwargs = kwargs
        # sent with every task, not scattered: scattered data dies with the worker that holds it,
        # and a task that needs it could not be retried
        self._sources = {p.name: p.read_bytes() for p in sorted(src_folder.glob("*.ipynb"))}
        self.executor = self.client.get_executor(pure=False)
        self.workers = len(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def _check_versions(self) -> None:
        mine = worker_versions()
        theirs = self.client.run(worker_versions)
        odd = {w: v for w, v in theirs.items() if v != mine}
        if odd:
            listed = "; ".join(f"{w}: {v}" for w, v in sorted(odd.items())[:5])
            raise ClusterError(f"workers with another attnlib or torch than this machine's {mine}: {listed} "
                               "(their grades could differ: install the same versions there)")

    def submit(self, student: str) -> concurrent.futures.Future:
        folder = self.root / "submitted" / student / self.assignment
        # positional arguments only: the executor passes keywords to Client.submit
        return self.executor.submit(grade_remote, student, self.assignment, _notebooks(folder),
                                    self._sources, self.kwargs)

    def close(self) -> None:
        try:
            self.executor.shutdown(wait=False)
        finally:
            self.client.close()


class LocalDaskCluster:
    """A Dask cluster on this machine, started as an instructor starts one anywhere: ``dask
    scheduler --scheduler-file`` and ``n_workers`` ``dask worker`` processes (one thread each:
    a task is one sandboxed grading at a time; each with a nanny that restarts it if it dies),
    their logs in ``folder``. For the tests and the benchmark; :meth:`close` (or ``with``)
    stops them all. ``address`` is the scheduler file, as ``--scheduler`` takes it."""

    def __init__(self, folder: str | os.PathLike, n_workers: int = 2, timeout: float = 90.0):
        from distributed import Client

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.address = str(self.folder / "scheduler.json")
        self.procs: list[subprocess.Popen] = []
        try:
            self._start("scheduler", ["scheduler", "--scheduler-file", self.address, "--host", "127.0.0.1",
                                      "--port", "0", "--no-dashboard"])
            deadline = time.monotonic() + timeout
            while not Path(self.address).is_file():
                if time.monotonic() > deadline or self.procs[0].poll() is not None:
                    raise ClusterError(f"the scheduler did not start: see {self.folder / 'scheduler.log'}")
                time.sleep(0.2)
            for i in range(n_workers):
                self._start(f"worker{i}", ["worker", "--scheduler-file", self.address, "--nthreads", "1",
                                           "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1",
                                           "--local-directory", str(self.folder / f"worker{i}")])
            self.client = Client(scheduler_file=self.address, timeout=timeout, set_as_default=False)
            self.client.wait_for_workers(n_workers, timeout=timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, args: list[str]) -> None:
        dask = Path(sys.executable).with_name("dask")
        with open(self.folder / f"{name}.log", "w") as log:
            self.procs.append(subprocess.Popen([str(dask), *args], stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        for p in reversed(self.procs):  # each in its own process group: a worker with its nanny
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=15)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue

    def __enter__(self) -> "LocalDaskCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
