"""The child process of ``attnlib grade``: runs the learner's notebook code, never judges it.

Started by :mod:`attnlib.grading.runner` as ``python -m attnlib.grading.child WORKDIR``, in
its own process group, with a wall-clock limit enforced by the parent. ``WORKDIR`` holds:

* ``job.json`` (from the parent): the notebook's non-grade code cells, the exercises to
  call with the learner's object name for each, and ``step_timeout``, the limit (seconds)
  for one cell or one case;
* ``cases_<k>.pt`` (from the parent): for exercise ``k``, ``{"visible": [...], "hidden":
  [...]}`` of cases as plain dicts (loaded with ``torch.load(weights_only=True)``).

The child writes back, each file atomically (written then renamed), so that a parent that
kills it on timeout still finds everything finished before:

* ``progress.json``: the cell running now, and the errors of the cells run so far;
* ``out_<k>_<visible|hidden>_<i>.pt``: one file per case, ``{"kind": "value", "value": ...}``
  (tensors, numbers, strings, ``None`` and tuples/lists/dicts of these only),
  ``{"kind": "unsupported", "message": "returned numpy.ndarray ..."}`` or ``{"kind":
  "error", "message": ...}``, and ``"extra"``: the exercise's ``extra_check`` verdict
  (``None`` or a failure message; it runs the learner's code, so it runs here);
* ``status_<k>.json``: written once every case of exercise ``k`` is done (or why not).

Everything this module needs is imported, and bound to local names, before the learner's
code runs, so that a notebook that replaces ``torch.save`` and the like does not change what
is written (the comparison itself happens in the parent anyway).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from attnlib.grading import EXERCISES  # noqa: E402
from attnlib.grading.core import Case, _forbid, call  # noqa: E402

_save, _load, _replace, _dumps = torch.save, torch.load, os.replace, json.dumps
_TensorType = Tensor


class StepTimeout(BaseException):
    """Raised by SIGALRM when one cell or one case runs past ``step_timeout``."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise StepTimeout()


def _arm(seconds: float) -> None:
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _disarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(_dumps(obj))
    _replace(tmp, path)


def _write_pt(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    _save(obj, tmp)
    _replace(tmp, path)


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


def _error(exc: BaseException) -> str:
    if isinstance(exc, NotImplementedError):
        return "not implemented yet"
    return f"raised {type(exc).__name__}: {exc}"


def _run_cells(shell: Any, cells: list[dict], step_timeout: float, workdir: str) -> list[dict]:
    errors: list[dict] = []
    progress = os.path.join(workdir, "progress.json")
    for cell in cells:
        _write_json(progress, {"running": cell["index"], "errors": errors})
        try:
            _arm(step_timeout)
            result = shell.run_cell(cell["source"], store_history=False, silent=False)
        except StepTimeout:  # the alarm fired outside IPython's own handler
            result = None
            exc: BaseException | None = StepTimeout()
        finally:
            _disarm()
        if result is not None:
            exc = result.error_before_exec or result.error_in_exec
        if exc is not None:
            if isinstance(exc, StepTimeout):
                message = f"did not finish within {step_timeout:g} s (an infinite loop?)"
            else:
                message = f"raised {type(exc).__name__}: {exc}"
            errors.append({"index": cell["index"], "message": message})
    _write_json(progress, {"running": None, "errors": errors})
    return errors


def _grade_exercise(k: int, exercise_id: str, name: str, namespace: dict, step_timeout: float,
                    workdir: str) -> None:
    status = os.path.join(workdir, f"status_{k}.json")
    exercise = EXERCISES.get(exercise_id)
    if exercise is None:
        _write_json(status, {"error": f"unknown exercise id {exercise_id!r}"})
        return
    if name not in namespace:
        _write_json(status, {"missing": name})
        return
    student = namespace[name]
    cases = _load(os.path.join(workdir, f"cases_{k}.pt"), weights_only=True)
    timed_out = False
    for which in ("visible", "hidden"):
        for i, fields in enumerate(cases.get(which, [])):
            path = os.path.join(workdir, f"out_{k}_{which}_{i}.pt")
            if timed_out:
                _write_pt(path, {"kind": "error", "message": "not run: an earlier case did not finish "
                                 "in time", "extra": None})
                continue
            case = Case(**fields)
            entry: dict = {"extra": None}
            try:
                _arm(step_timeout)
                with _forbid(exercise.forbidden):
                    output = call(exercise, student, case)
                _disarm()
                problem = _unsupported(output)
                if problem:
                    entry.update(kind="unsupported", message=problem)
                else:
                    entry.update(kind="value", value=_plain(output))
                    if exercise.extra_check is not None:
                        try:
                            _arm(step_timeout)
                            with _forbid(exercise.forbidden):
                                extra = exercise.extra_check(student, case)
                            _disarm()
                            entry["extra"] = None if extra is None else str(extra)
                        except StepTimeout:
                            entry["extra"] = f"did not finish within {step_timeout:g} s (an infinite loop?)"
                        except Exception as exc:  # the learner's code may raise anything
                            entry["extra"] = _error(exc)
            except StepTimeout:
                timed_out = True
                entry.update(kind="error", message=f"did not finish within {step_timeout:g} s "
                             "(an infinite loop?)")
            except Exception as exc:  # the learner's code may raise anything
                entry.update(kind="error", message=_error(exc))
            finally:
                _disarm()
            try:
                _write_pt(path, entry)
            except Exception as exc:  # e.g. an output torch.save cannot write
                _write_pt(path, {"kind": "unsupported", "extra": None,
                                 "message": f"returned an object that cannot be saved ({_error(exc)})"})
    _write_json(status, {"done": True})


def main(workdir: str) -> int:
    with open(os.path.join(workdir, "job.json")) as f:
        job = json.load(f)
    step_timeout = float(job["step_timeout"])
    try:
        import matplotlib

        matplotlib.use("Agg")
    except Exception:  # matplotlib is optional
        pass
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    # `%matplotlib inline` and friends: keep the non-interactive backend
    shell.enable_matplotlib = lambda gui=None: ("agg", "agg")  # type: ignore[method-assign]
    if job.get("cwd"):
        os.chdir(job["cwd"])
    _run_cells(shell, job["cells"], step_timeout, workdir)
    namespace = shell.user_ns
    for k, (exercise_id, name) in enumerate(job["exercises"]):
        _grade_exercise(k, exercise_id, name, namespace, step_timeout, workdir)
    _write_json(os.path.join(workdir, "done.json"), {"done": True})
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1])
    except BaseException:
        traceback.print_exc()
        code = 3
    os._exit(code)
