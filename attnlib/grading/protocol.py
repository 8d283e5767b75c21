"""How the grader (the parent) and the child that runs a notebook talk: through files in a
private directory, named here once for both sides.

The parent writes the sandbox's configuration and the job (cells to run, exercises to check,
their cases); the child writes its progress (which phase, which cell or case), one status file
and one output file per checked case, and a mark when it is done; the sandbox launcher
(:mod:`attnlib.grading.sandbox`, standard library only, so it keeps copies of the two names it
writes: a test checks they agree) writes what it enforced and how the child exited.
Standard library only, no I/O.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- file names

SANDBOX_CONFIG = "sandbox_config.json"  # parent -> sandbox: limits, kept and hidden paths
JOB = "job.json"  # parent -> child: the cells, the exercises to check, the start step
PROGRESS = "progress.json"  # child -> parent: what runs now (phase, cell or case)
DONE = "done.json"  # child -> parent: every cell and check ran
SANDBOX_REPORT = "sandbox.json"  # sandbox -> parent: what was enforced
EXIT = "exit.json"  # sandbox -> parent: how the child ended (status, code)
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
