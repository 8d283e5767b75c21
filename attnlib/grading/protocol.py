"""How the grader (the parent) and the child that runs a notebook talk: through files in a
private directory, named here once for both sides, with the limits and the safe reads and
writes of those files.

The parent writes the sandbox's configuration and the job (cells to run, exercises to check,
their cases); the child writes its progress (which phase, which cell or case), one status file
and one output file per checked case, and a mark when it is done; the sandbox launcher
(:mod:`attnlib.grading.sandbox`, standard library only, so it keeps copies of the two names it
writes: a test checks they agree) writes what it enforced and how the child exited.

Every file is written atomically (:func:`write_atomic`: a fresh file renamed over the old
one, so that a process killed half-way leaves the old file or the whole new one), and the
parent reads what the child wrote without trusting it (:func:`read_bounded`,
:func:`read_json`: no link followed, no FIFO opened, a size limit; :func:`dir_size`).
Standard library only. The child imports this module before any of the learner's code runs,
so the functions below use the ``os`` functions bound here then, whatever a notebook does to
``os`` later.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from typing import Any, Callable

# --------------------------------------------------------------------------- file names

SANDBOX_CONFIG = "sandbox_config.json"  # parent -> sandbox: limits, kept and hidden paths
JOB = "job.json"  # parent -> child: the cells, the exercises to check, the start step
PROGRESS = "progress.json"  # child -> parent: what runs now (phase, cell or case)
DONE = "done.json"  # child -> parent: every cell and check ran
SANDBOX_REPORT = "sandbox.json"  # sandbox -> parent: what was enforced
EXIT = "exit.json"  # sandbox -> parent: how the child ended (status, code)
#: child -> parent: the reference's time on each case (and its extra check), measured before
#: any of the learner's code runs; the time limits follow from it (:func:`case_limit`)
REFERENCE_TIMES = "reference_times.json"
PER_ATTEMPT = (PROGRESS, DONE, EXIT, SANDBOX_REPORT)  # cleared before each (re)start


def cases_file(k: int) -> str:
    """Parent -> child: the cases of the ``k``-th (exercise, learner object) pair."""
    return f"cases_{k}.pt"


def status_file(k: int) -> str:
    """Child -> parent: how each case of pair ``k`` ended (returned, raised, not run)."""
    return f"status_{k}.json"


def output_file(k: int, which: str, i: int) -> str:
    """Child -> parent: the learner's output on case ``i`` of the ``which`` set of pair ``k``."""
    return f"out_{k}_{which}_{i}.pt"


def output_pattern(k: int) -> str:
    """A glob for every output file of pair ``k``."""
    return f"out_{k}_*"


# --------------------------------------------------------------------------- phases

START = "start"  # the child has not run a cell yet
CELL = "cell"  # running the notebook's cell ``cell``
CASE = "case"  # calling the learner's object on case ``i`` of set ``which`` of pair ``k``
EXTRA = "extra"  # an exercise's extra check, on pair ``k``
EXERCISE = "exercise"  # the whole-exercise step of pair ``k``
FINISHED = "done"  # every cell and check ran
CHECK_PHASES = (CASE, EXTRA, EXERCISE)  # phases inside the checks of a pair ``k``

# --------------------------------------------------------------------------- limits

#: Default wall-clock limit (seconds) for all the child processes of one notebook together.
DEFAULT_TIMEOUT = 300.0
#: Default time limit (seconds) of one cell, and the least time one graded case may take.
DEFAULT_STEP_TIMEOUT = 30.0
#: A graded case may take this many times the reference's own time on it (when that is more
#: than the step limit): limits scale with the work, so slow but correct loops pass.
CASE_TIME_MULTIPLE = 1000
#: Default memory limit of the child (bytes): RLIMIT_DATA, and RLIMIT_AS above what it has
#: mapped once torch is imported.
DEFAULT_MEMORY_LIMIT = 4 << 30
#: Default limit on what one cell or one case may print (bytes).
DEFAULT_OUTPUT_LIMIT = 1 << 20
#: Default limit on the size of one file the child writes (bytes).
DEFAULT_FILE_LIMIT = 64 << 20
#: Default limit on the files the child leaves in its private directory (bytes).
DEFAULT_DISK_LIMIT = 256 << 20
#: Default number of fresh children after a crash, a hang or too much output.
DEFAULT_MAX_RESTARTS = 5
#: What the parent reads of a JSON file the child or the sandbox wrote (bytes).
JSON_LIMIT = 1 << 20



def case_limit(reference: float, floor: float) -> float:
    """The time limit (seconds) of one graded call, or of an exercise's extra check: the larger
    of ``floor`` (the step limit) and :data:`CASE_TIME_MULTIPLE` times the ``reference``'s own
    time on the same case, as the child measured it before any of the learner's code ran."""
    return max(floor, CASE_TIME_MULTIPLE * reference)


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def limit_text(reference: float, floor: float) -> str:
    """How a case's limit came about, for a person: ``"30 s (the larger of 30 s and 1000 times
    the reference's 2.1 ms on this case)"``."""
    return (f"{case_limit(reference, floor):.3g} s (the larger of {floor:g} s and {CASE_TIME_MULTIPLE} times "
            f"the reference's {_duration(reference)} on this case)")


def timeout_message(reference: float, floor: float, returned: int, slowest: float) -> str:
    """A graded call (or extra check) stopped at its limit: what ran, for how long, the limit;
    an infinite loop is guessed only when no case of the exercise had returned (``returned``
    cases had, the ``slowest`` in that many seconds)."""
    text = f"did not finish within {limit_text(reference, floor)}, this case's time limit, and was stopped"
    if returned:
        before = (f"the case before it returned (in {_duration(slowest)})" if returned == 1 else
                  f"the {returned} cases before it returned (the slowest in {_duration(slowest)})")
        return (f"{text}; {before}: too slow rather than stuck? Python loops over single numbers are slow, "
                "loop over rows or tiles instead")
    return f"{text}; no case of this exercise returned at all: an infinite loop?"


def too_slow_message(seconds: float, reference: float, floor: float) -> str:
    """A graded call that returned, but after its limit (``check()`` in a notebook measures
    after the fact; the grader's child stops the call at the limit)."""
    return (f"took {_duration(seconds)}, over this case's time limit of {limit_text(reference, floor)}; "
            "the grader stops a call there, correct or not")


# --------------------------------------------------------------------------- reads and writes

_os_open, _os_read, _os_write, _os_close, _os_fstat = os.open, os.read, os.write, os.close, os.fstat
_os_replace, _os_unlink, _urandom, _scandir = os.replace, os.unlink, os.urandom, os.scandir
_fspath, _isdir, _islink = os.fspath, os.path.isdir, os.path.islink
_split, _join, _rmtree, _is_regular = os.path.split, os.path.join, shutil.rmtree, stat.S_ISREG
_loads = json.loads
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[str], Any]) -> None:
    """Write ``path`` through a fresh file renamed over it (never through a link, or into a
    directory, left at ``path``). ``data``: the bytes, or a function that writes the fresh
    file given its name (``torch.save``); the fresh file is removed if that fails."""
    path = _fspath(path)
    if _isdir(path) and not _islink(path):
        _rmtree(path, ignore_errors=True)
    head, name = _split(path)
    tmp = _join(head, f".{name}.{_urandom(16).hex()}")
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            fd = _os_open(tmp, _CREATE, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[_os_write(fd, view):]
            finally:
                _os_close(fd)
        else:
            data(tmp)
        _os_replace(tmp, path)
    except BaseException:
        try:
            _os_unlink(tmp)
        except OSError:
            pass
        raise


def read_bounded(path: str | os.PathLike, limit: int) -> bytes | None:
    """A regular file's bytes (no symlink followed, no FIFO opened), ``None`` if it is not
    one or is larger than ``limit``."""
    try:
        fd = _os_open(path, _OPEN)
    except OSError:
        return None
    try:
        st = _os_fstat(fd)
        if not _is_regular(st.st_mode) or st.st_size > limit:
            return None
        chunks, total = [], 0
        while True:
            chunk = _os_read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        _os_close(fd)


def read_json(path: str | os.PathLike, limit: int = JSON_LIMIT) -> Any:
    """The JSON value in ``path`` (read as :func:`read_bounded` does), ``None`` if there is
    none."""
    data = read_bounded(path, limit)
    if data is None:
        return None
    try:
        return _loads(data)
    except ValueError:
        return None


def dir_size(path: str | os.PathLike, cap: int) -> int:
    """Bytes under ``path`` (no link followed), stopping once past ``cap``."""
    total, stack = 0, [_fspath(path)]
    while stack and total <= cap:
        try:
            with _scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        else:
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue
        except OSError:
            continue
    return total
