"""The check logic of the graded exercises: cases, calling the learner's code, judging it.

Three steps, kept apart so that a hardened grader can run the middle one in a child process:

1. **case generation** (parent): ``exercise.make_cases(hidden)`` returns :class:`Case` objects
   holding only plain values (tensors, numbers, strings, ``None`` and containers of these), so
   they survive ``torch.save``/``torch.load(weights_only=True)``;
2. **calling** (:func:`call`, child): build the learner's module if needed, call the function
   or method on cloned inputs, check that the call left those inputs as they were
   (:class:`InputModifiedError` otherwise), return the raw output;
3. **judging** (:func:`judge`, parent): compare the output with the reference's, in this order:
   type, shape, dtype, finiteness, values. On a failure, every catalogued :class:`Mistake` is
   evaluated on the same case; if the output matches one, the message names it and points to
   the section of the book that explains it, an absolute address on the course site
   (:func:`section_url`).

:func:`grade_function` runs steps 1-3 in-process and :func:`check` turns the result into an
``AssertionError`` for nbgrader test cells.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import compare, protocol, secret, site

#: The course site's address and the low-precision rule's floor, now in :mod:`.site` and
#: :mod:`.compare` (the grader calls those modules' functions), importable from here as before.
SITE_URL, DEFAULT_SITE_URL, BOOK_DIR = site.SITE_URL, site.DEFAULT_SITE_URL, site.BOOK_DIR
site_url, section_url = site.site_url, site.section_url
LOW_PRECISION_FLOOR = compare.LOW_PRECISION_FLOOR

__all__ = [
    "Case",
    "CaseResult",
    "EXERCISES",
    "Exercise",
    "ForbiddenCallError",
    "InputModifiedError",
    "Mistake",
    "SITE_URL",
    "call",
    "check",
    "draw_cases",
    "grade_function",
    "judge",
    "mistake_as_student",
    "register",
    "section_url",
]


@dataclass(frozen=True)
class Case:
    """One input on which the learner's code is compared with the reference.

    Attributes:
        name: shown in the feedback, e.g. ``"L != S, bool mask"``.
        args, kwargs: the call's arguments. Only tensors, ints, floats, bools, ``None``,
            strings and tuples/lists/dicts of these, so that a case can cross a process
            boundary with ``torch.save``/``torch.load(weights_only=True)``.
        init_args: for ``kind="module"``: the constructor's positional arguments.
        state_dict: for ``kind="module"``: weights loaded (strictly) after construction.
        method: for ``kind="module"``: the method called with ``args``/``kwargs``.
        low_precision: judge with the flash-attention rule (error against the float64
            result at most twice the reference's own low-precision error, plus 1e-6)
            instead of the exercise's float64 tolerances.
    """

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    init_args: tuple = ()
    state_dict: dict | None = None
    method: str = "forward"
    low_precision: bool = False


@dataclass(frozen=True)
class Mistake:
    """A common wrong implementation, recognised by its output.

    Attributes:
        name: short, e.g. ``"no 1/sqrt(d_k) scaling"``.
        explanation: one or two sentences: what the code did and why it is wrong.
        section: the page and anchor of the book that explains it,
            e.g. ``"03_scaling.html#the-variance-of-a-dot-product"``.
        fn: the wrong implementation. For ``kind="function"``: same signature as the
            reference. For ``kind="module"``: either a class (built and called like the
            learner's) or a callable ``fn(module, *args, **kwargs)`` that receives a module
            built from the reference with the case's weights, in place of the method.
        changes_input: the mistake is recognised by what the call does to its inputs, not
            by its output: ``fn`` modifies an input in place (``x -= m``). :func:`call`
            names the exercise's first such mistake when a call changes an input.
    """

    name: str
    explanation: str
    section: str
    fn: Callable
    changes_input: bool = False


def _no_cases(hidden: bool) -> list[Case]:
    """Placeholder for :attr:`Exercise.make_cases`; :func:`register` rejects it."""
    raise NotImplementedError("this exercise defines no cases")


@dataclass(frozen=True)
class Exercise:
    """A graded exercise: the learner writes ``reference``'s function (or class) themselves.

    Attributes:
        id: the learner's function name, unique (``"softmax"``,
            ``"MultiHeadAttention.forward"`` for one method of a class).
        chapter: the book's chapter number (1, 2, ...); its notebook is
            ``notebooks/NN_topic/`` with ``NN`` this number.
        reference: the attnlib function or class; the stub copies its signature/docstring.
        kind: ``"function"`` or ``"module"`` (the learner writes a class).
        section: the default section of the book for feedback.
        make_cases: ``make_cases(hidden)`` returns the visible (``False``) or hidden
            (``True``) cases; the two sets differ and the hidden one holds the edge cases.
        mistakes: the catalogued wrong implementations.
        forbidden: dotted names the learner must not call (a function, a method such as
            ``"torch.Tensor.softmax"``, or a whole module such as ``"attnlib"``).
            :func:`grade_function` blocks them while the learner's code runs.
        atol, rtol: float64 tolerances (``torch.allclose`` semantics).
        extra_check: optional ``extra_check(fn, case) -> str | None`` run in-process after a
            case passed, for properties beyond values; a string is the failure message.
        build_args: optional, for ``kind="function"``: ``build_args(args, kwargs) -> (args,
            kwargs)`` turns a case's plain values into arguments a case cannot carry across a
            process boundary (e.g. a model built from its constructor arguments and weights).
            :func:`call` applies it, on the cloned inputs, before every call of a function.
        launch: optional, for ``kind="function"``: ``launch(fn, *args, **kwargs)`` runs the
            learner's object (and the reference and the mistakes) on a case instead of
            ``fn(*args, **kwargs)``: for an object that is not called but launched, such as a
            Triton kernel (chapter 13: ``launch`` is the course's launcher, given the kernel).
    """

    id: str
    chapter: int
    reference: Callable
    kind: str = "function"
    section: str = ""
    make_cases: Callable[[bool], list[Case]] = _no_cases
    mistakes: tuple[Mistake, ...] = ()
    forbidden: tuple[str, ...] = ()
    atol: float = 1e-10
    rtol: float = 1e-8
    extra_check: Callable[[Callable, Case], str | None] | None = None
    build_args: Callable[[tuple, dict], tuple[tuple, dict]] | None = None
    launch: Callable[..., Any] | None = None


@dataclass
class CaseResult:
    """The verdict on one case; ``message`` is empty when it passed."""

    case: str
    passed: bool
    message: str = ""


class ForbiddenCallError(RuntimeError):
    """Raised when the learner's code calls a function the exercise asks them to write."""


class InputModifiedError(Exception):
    """Raised by :func:`call` when the call changed one of its input tensors (in place); the
    message is the case's whole feedback: it names the argument and, if the exercise
    catalogues a mistake with ``changes_input``, that mistake."""


EXERCISES: dict[str, Exercise] = {}


def register(ex: Exercise) -> Exercise:
    """Add an exercise to :data:`EXERCISES` and return it; an id may be registered once."""
    if not isinstance(ex, Exercise):
        raise TypeError(f"register expects an Exercise, got {type(ex).__name__}")
    if ex.id in EXERCISES:
        raise ValueError(f"an exercise with id {ex.id!r} is already registered")
    if ex.kind not in ("function", "module"):
        raise ValueError(f"exercise {ex.id!r}: kind must be 'function' or 'module', got {ex.kind!r}")
    if isinstance(ex.chapter, bool) or not isinstance(ex.chapter, int) or ex.chapter < 1:
        raise ValueError(f"exercise {ex.id!r}: chapter must be a chapter number >= 1, got {ex.chapter!r}")
    if ex.make_cases is _no_cases:
        raise ValueError(f"exercise {ex.id!r} has no make_cases")
    names = [m.name for m in ex.mistakes]
    if len(names) != len(set(names)):
        raise ValueError(f"exercise {ex.id!r}: mistake names must be unique, got {names}")
    EXERCISES[ex.id] = ex
    return ex


def _get(exercise_id: str) -> Exercise:
    try:
        return EXERCISES[exercise_id]
    except KeyError:
        known = ", ".join(sorted(EXERCISES)) or "none"
        from .exercises import UNAVAILABLE  # chapters that cannot be graded in this process

        left_out = "".join(f"; {name} is left out ({why})" for name, why in UNAVAILABLE.items())
        raise KeyError(f"no exercise with id {exercise_id!r}; registered: {known}{left_out}") from None


# --------------------------------------------------------------------------- calling


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _clone(obj: Any) -> Any:
    return _map_tensors(obj, lambda t: t.detach().clone())


def _upcast(obj: Any) -> Any:
    """Floating tensors to float64 (the exact side of the low-precision rule)."""
    return _map_tensors(obj, lambda t: t.detach().double() if t.is_floating_point() else t.detach().clone())


def _upcast_case(case: Case) -> Case:
    return replace(case, args=_upcast(case.args), kwargs=_upcast(case.kwargs), init_args=_upcast(case.init_args),
                   state_dict=None if case.state_dict is None else _upcast(case.state_dict), low_precision=False)


def _build(cls: Callable, case: Case) -> Any:
    """Construct ``cls(*init_args)`` and load the case's weights into it.

    An ``nn.Module`` is first moved to the floating dtype of the given weights (float64 in
    most cases): ``load_state_dict`` copies values into the existing parameters and would
    otherwise keep PyTorch's float32 default. The global random state is left untouched by
    the construction's weight initialisation.
    """
    with torch.random.fork_rng(devices=[]):  # weight init must not move the global RNG
        obj = cls(*_clone(case.init_args))
    if case.state_dict is not None:
        state = _clone(case.state_dict)
        dtypes = {t.dtype for t in state.values() if isinstance(t, Tensor) and t.is_floating_point()}
        if isinstance(obj, nn.Module) and len(dtypes) == 1:
            obj = obj.to(dtypes.pop())
        obj.load_state_dict(state, strict=True)
    return obj


def call(exercise: Exercise, student: Callable, case: Case) -> Any:
    """Run the learner's function (or class) on one case and return its raw output.

    For ``kind="module"``: ``obj = student(*case.init_args)``, the case's ``state_dict`` is
    loaded (strictly), then ``getattr(obj, case.method)(*args, **kwargs)`` is returned. For a
    function, ``exercise.build_args`` (if any) prepares the arguments. The call receives
    clones of the case's inputs, which are then compared with the case's own: a call that
    changed one (its values, NaN-aware and exactly, its dtype or its shape; a learner's
    ``x -= m``) raises :class:`InputModifiedError`, naming the argument. Only the tensors
    of ``args``/``kwargs`` are inputs: the module's weights (``state_dict``) and its state
    may change. Exceptions propagate (:func:`grade_function` turns them into messages).
    """
    args, kwargs = _clone(case.args), _clone(case.kwargs)
    if exercise.kind == "module":
        obj = _build(student, case)
        out = getattr(obj, case.method)(*args, **kwargs)
    else:
        # build_args keeps the tensors it is given (the model it builds copies its weights)
        built_args, built_kwargs = (args, kwargs) if exercise.build_args is None \
            else exercise.build_args(args, kwargs)
        out = student(*built_args, **built_kwargs) if exercise.launch is None \
            else exercise.launch(student, *built_args, **built_kwargs)
    _check_inputs_unchanged(exercise, case, args, kwargs)
    return out


def _run_mistake(exercise: Exercise, mistake: Mistake, case: Case) -> Any:
    """The output of a catalogued mistake on ``case`` (see :class:`Mistake` for ``fn``)."""
    if exercise.kind == "module" and not isinstance(mistake.fn, type):
        obj = _build(exercise.reference, case)
        args, kwargs = _clone(case.args), _clone(case.kwargs)
        out = mistake.fn(obj, *args, **kwargs)
        _check_inputs_unchanged(exercise, case, args, kwargs)
        return out
    return call(exercise, mistake.fn, case)


# --------------------------------------------------------------------------- changed inputs


def _tensor_change(before: Tensor, after: Any) -> str | None:
    """How the tensor a call received differs from the case's, or ``None``: exact values,
    NaN equal to NaN."""
    if not isinstance(after, Tensor):
        return f"it was replaced by {compare._describe_type(after)}"
    if after.dtype != before.dtype:
        return f"it went from {before.dtype} to {after.dtype}"
    if after.shape != before.shape:
        return f"it went from size {tuple(before.shape)} to {tuple(after.shape)}"
    a, b = after.detach(), before.detach()
    if a.device != b.device:
        return f"it moved from {b.device} to {a.device}"
    same = a == b
    if a.is_floating_point() or a.is_complex():
        same = same | (torch.isnan(a) & torch.isnan(b))
    return None if bool(same.all()) else f"{int((~same).sum())} of {b.numel()} entries changed"


def _first_change(before: Any, after: Any, path: str) -> tuple[str, str] | None:
    """``(path, how)`` of the first tensor inside ``before`` (a case's argument) that the call
    changed through ``after`` (the clone it received), or ``None``."""
    if isinstance(before, Tensor):
        how = _tensor_change(before, after)
        return None if how is None else (path, how)
    if isinstance(before, (tuple, list)):
        if type(after) is not type(before) or len(after) != len(before):
            return path, f"it now holds {compare._describe_type(after)} instead of {len(before)} elements"
        for i, (b, a) in enumerate(zip(before, after)):
            found = _first_change(b, a, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(before, dict):
        if not isinstance(after, dict) or after.keys() != before.keys():
            return path, "its keys changed"
        for k, b in before.items():
            found = _first_change(b, after[k], f"{path}[{k!r}]")
            if found:
                return found
    return None


def _parameter_names(exercise: Exercise, case: Case) -> list[inspect.Parameter]:
    """The reference's parameters for the case's call (``self`` left out), or ``[]``."""
    target: Any = exercise.reference
    skip_self = False
    if exercise.kind == "module":
        target = getattr(exercise.reference, case.method, None)
        static = inspect.getattr_static(exercise.reference, case.method, None)
        skip_self = not isinstance(static, (staticmethod, classmethod))
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return []
    return params[1:] if skip_self and params else params


def _positional_name(params: list[inspect.Parameter], i: int) -> str:
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if i < len(positional):
        return positional[i].name
    star = next((p for p in params if p.kind == p.VAR_POSITIONAL), None)
    return f"{star.name}[{i - len(positional)}]" if star is not None else f"argument {i + 1}"


def _check_inputs_unchanged(exercise: Exercise, case: Case, args: tuple, kwargs: dict) -> None:
    """Raise :class:`InputModifiedError` if the call changed a tensor of ``args``/``kwargs``
    (the clones it received) from the case's own."""
    found = None
    for i, (before, after) in enumerate(zip(case.args, args)):
        found = _first_change(before, after, f"#{i}")
        if found:
            break
    if not found:
        for key, before in case.kwargs.items():
            found = _first_change(before, kwargs.get(key), key)
            if found:
                break
    if not found:
        return
    path, how = found
    if path.startswith("#"):  # a positional argument: its parameter's name
        index, _, rest = path[1:].partition("[")
        path = _positional_name(_parameter_names(exercise, case), int(index)) + (f"[{rest}" if rest else "")
    raise InputModifiedError(_input_message(exercise, path, how))


def _input_message(exercise: Exercise, path: str, how: str) -> str:
    """The feedback on a call that changed its input ``path``: the exercise's catalogued
    ``changes_input`` mistake if it has one, else the plain description."""
    top = path.split("[", 1)[0]
    top = top if top.isidentifier() else "x"
    if how.endswith("entries changed"):
        what = (f"changed its input `{path}` in place ({how}, as `{top} -= m` does): the caller's "
                f"tensor is modified; compute on a copy instead, e.g. `{top} = {top} - m`")
    else:
        what = (f"changed its input `{path}` in place ({how}): the caller's tensor is modified; "
                f"leave the inputs as they are and compute new tensors")
    mistake = next((m for m in exercise.mistakes if m.changes_input), None)
    if mistake is not None:
        return mistake_message(mistake, what)
    return f"{_sentence(what)} See {_section_of(exercise)}."


def mistake_as_student(exercise: Exercise, mistake: Mistake) -> Callable:
    """Something :func:`grade_function` can grade as if a learner had written the mistake.

    Functions and mistake classes are returned as they are; a method-style module mistake
    ``fn(module, *args)`` becomes a subclass of the reference whose ``method`` is ``fn``
    (the method of the case; for exercises whose cases call several methods, each call goes
    through ``fn``). Used by the tests to show that every mistake is recognised.
    """
    if exercise.kind != "module" or isinstance(mistake.fn, type):
        return mistake.fn
    methods = {c.method for c in exercise.make_cases(False)} | {c.method for c in exercise.make_cases(True)}
    body = {name: (lambda self, *a, _fn=mistake.fn, **k: _fn(self, *a, **k)) for name in methods}
    return type(f"Mistaken{exercise.reference.__name__}", (exercise.reference,), body)


# --------------------------------------------------------------------------- judging


def _expected(exercise: Exercise, case: Case) -> tuple[Any, Any]:
    """The reference's output on ``case`` and, for low-precision cases, in float64."""
    ref = call(exercise, exercise.reference, case)
    exact = call(exercise, exercise.reference, _upcast_case(case)) if case.low_precision else None
    return _detach(ref), _detach(exact)


def _detach(obj: Any) -> Any:
    return _map_tensors(obj, lambda t: t.detach())


def _sentence(text: str) -> str:
    """``text`` ending with a full stop (or its own ``?``/``!``)."""
    return text if text.endswith((".", "?", "!")) else text + "."


def mistake_message(mistake: Mistake, seen: str) -> str:
    """The feedback on work recognised as ``mistake``: its name, explanation and section of the
    book, then what was seen, in parentheses (:func:`judge`'s words, and an extra check's)."""
    return (f"Looks like {mistake.name}: {_sentence(mistake.explanation)} See "
            f"{site.section_url(mistake.section)}.\n({seen})")


def _section_of(exercise: Exercise) -> str:
    """The exercise's section as an address on the course site, for "See ..."."""
    return site.section_url(exercise.section) if exercise.section else "the chapter of this exercise"


def judge(exercise: Exercise, case: Case, output: Any) -> CaseResult:
    """Compare one output with the reference's; never calls the learner's code.

    Checks, each with its own message: the type (exactly ``torch.Tensor``; the reference's
    tuple structure decides for tuples), shape, dtype, finiteness (NaN/inf where the
    reference has none), and values (``torch.allclose`` semantics with the exercise's
    tolerances, or the low-precision rule; boolean and integer results exactly). On a
    failure, each catalogued mistake is evaluated on the case, and a match is named.
    """
    if isinstance(exercise, str):
        exercise = _get(exercise)
    ref, exact = _expected(exercise, case)
    try:
        compare._compare(output, ref, exact, case, exercise, "")
    except compare._Failure as failure:
        return CaseResult(case.name, False, _explain(exercise, case, output, ref, exact, failure))
    return CaseResult(case.name, True, "")


def _explain(exercise: Exercise, case: Case, output: Any, ref: Any, exact: Any, failure: compare._Failure) -> str:
    """The failure message: a recognised mistake first, else the raw comparison."""
    for mistake in exercise.mistakes:
        if mistake.changes_input:  # recognised by the call itself (:func:`call`), not by an output
            continue
        try:
            candidate = _detach(_run_mistake(exercise, mistake, case))
        except Exception:  # a mistake that cannot run on this case does not match it
            continue
        if compare._matches(output, candidate, ref, exact, case, exercise):
            return mistake_message(mistake, failure.message)
    return f"{_sentence(failure.message)} See {_section_of(exercise)}."


# --------------------------------------------------------------------------- forbidden calls


def _resolve(dotted: str) -> tuple[Any, str] | None:
    """``"torch.nn.functional.softmax"`` -> (the module torch.nn.functional, "softmax")."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:-1]:
                owner = getattr(owner, attr)
            getattr(owner, parts[-1])
        except AttributeError:
            return None
        return owner, parts[-1]
    return None


def _blocker(dotted: str) -> Callable:
    def blocked(*args: Any, **kwargs: Any) -> Any:
        raise ForbiddenCallError(f"called {dotted}, which this exercise asks you to write yourself")
    return blocked


@contextlib.contextmanager
def _forbid(names: tuple[str, ...]) -> Iterator[None]:
    """Replace the forbidden callables by ones that raise, while the learner's code runs.

    A whole module (e.g. ``"attnlib"``) blocks every public callable reached through it,
    such as ``attnlib.softmax``. Names bound before the call (``from attnlib import softmax``)
    cannot be reached this way; the hardened grader inspects the code instead.
    """
    patches: list[tuple[Any, str, Any, bool]] = []  # owner, attribute, old value, was own attribute
    targets: list[tuple[Any, str, str]] = []
    for dotted in names:
        try:
            module = importlib.import_module(dotted)
        except ImportError:
            module = None
        if module is not None:
            public = getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")])
            targets += [(module, n, f"{dotted}.{n}") for n in public
                        if callable(getattr(module, n, None)) and not isinstance(getattr(module, n), type(module))]
            continue
        resolved = _resolve(dotted)
        if resolved is not None:
            targets.append((*resolved, dotted))
    try:
        for owner, attr, dotted in targets:
            own = attr in vars(owner)
            patches.append((owner, attr, vars(owner).get(attr), own))
            setattr(owner, attr, _blocker(dotted))
        yield
    finally:
        for owner, attr, old, own in reversed(patches):
            if own:
                setattr(owner, attr, old)
            else:
                delattr(owner, attr)


# --------------------------------------------------------------------------- grading


def draw_cases(exercise: Exercise, hidden: bool, course_secret: str | None = None) -> list[Case]:
    """The exercise's visible cases, or its hidden ones, drawn with ``course_secret`` when one
    is given (:mod:`attnlib.grading.secret`: the same edge cases and shapes, other values).
    The visible cases are always the public ones."""
    with secret.drawing_with(course_secret if hidden else None):
        return exercise.make_cases(hidden)


def _seconds(fn: Callable[[], Any], repeat: int = 2) -> float:
    """How long ``fn()`` takes, the least of ``repeat`` runs (the first one also pays for what
    torch sets up on first use); it may raise (a case that checks an error message)."""
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        try:
            fn()
        except Exception:
            pass
        best = min(best, time.perf_counter() - began)
    return best


def grade_function(exercise_id: str, student: Callable, hidden: bool = False,
                   course_secret: str | None = None,
                   time_floor: float = protocol.DEFAULT_STEP_TIMEOUT) -> list[CaseResult]:
    """Grade the learner's function (or class) in-process on the visible or hidden cases
    (these drawn with ``course_secret``, if given: see :func:`draw_cases`).

    An exception from the learner's code fails the case with ``"raised <Type>: <message>"``
    (``NotImplementedError``: ``"not implemented yet"``; a changed input,
    :class:`InputModifiedError`: its message alone). A correct call that took longer than the
    case's time limit (:func:`attnlib.grading.protocol.case_limit`: the larger of ``time_floor``
    and :data:`~attnlib.grading.protocol.CASE_TIME_MULTIPLE` times the reference's time on the
    same case, measured here) fails it too, as in ``attnlib grade``, which stops it there.
    """
    exercise = _get(exercise_id)
    results = []
    for case in draw_cases(exercise, hidden, course_secret):
        reference = exercise.reference
        ref_seconds = _seconds(lambda: call(exercise, reference, case))
        began = time.perf_counter()
        try:
            with _forbid(exercise.forbidden):
                output = call(exercise, student, case)
            took = time.perf_counter() - began
        except NotImplementedError:
            results.append(CaseResult(case.name, False, "not implemented yet"))
            continue
        except InputModifiedError as exc:  # the call changed an input: the message is the feedback
            results.append(CaseResult(case.name, False, str(exc)))
            continue
        except Exception as exc:  # the learner's code may raise anything
            results.append(CaseResult(case.name, False, f"raised {type(exc).__name__}: {exc}"))
            continue
        result = judge(exercise, case, output)
        if result.passed and took > protocol.case_limit(ref_seconds, time_floor):
            result = CaseResult(case.name, False, protocol.too_slow_message(took, ref_seconds, time_floor))
        extra = exercise.extra_check
        if result.passed and extra is not None:
            ref_seconds = _seconds(lambda: extra(reference, case))
            began = time.perf_counter()
            try:
                with _forbid(exercise.forbidden):
                    problem = extra(student, case)
            except Exception as exc:
                problem = f"raised {type(exc).__name__}: {exc}"
            took = time.perf_counter() - began
            if not problem and took > protocol.case_limit(ref_seconds, time_floor):
                problem = protocol.too_slow_message(took, ref_seconds, time_floor)
            if problem:
                result = CaseResult(case.name, False, problem)
        results.append(result)
    return results


def check(exercise_id: str, student: Callable, hidden: bool = False) -> None:
    """For nbgrader test cells: raise ``AssertionError`` listing the failed cases.

    On success prints one line, ``"<id>: N/N cases passed"``, and returns ``None``. The hidden
    cases are drawn with the course's secret where there is one (:func:`.secret.find`: the
    environment, or the course folder above the working directory, as under ``nbgrader
    autograde``), publicly otherwise.
    """
    results = grade_function(exercise_id, student, hidden=hidden,
                             course_secret=secret.find() if hidden else None)  # the course's, if any
    failed = [r for r in results if not r.passed]
    if failed:
        lines = [f"{exercise_id}: {len(results) - len(failed)}/{len(results)} cases passed; failed:"]
        for r in failed:
            lines += [f"- {r.case}:", textwrap.indent(r.message, "    ")]
        raise AssertionError("\n".join(lines))
    print(f"{exercise_id}: {len(results)}/{len(results)} cases passed")
