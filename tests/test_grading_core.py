"""The grading framework: registration, calling, judging, messages, forbidden calls, check().

Each test registers its own small exercises under ids starting with ``_test`` and removes
them afterwards; the last part checks invariants of every registered exercise (sections
that exist in the book, cases that survive ``torch.save``/``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import same_value
from docutils.nodes import make_id
from torch import Tensor, nn

import attnlib
import attnlib.grading as grading
from attnlib.grading import (
    EXERCISES,
    Case,
    CaseResult,
    Exercise,
    Mistake,
    call,
    check,
    grade_function,
    judge,
    register,
)
from attnlib.grading.core import (
    DEFAULT_SITE_URL,
    SITE_URL,
    ForbiddenCallError,
    InputModifiedError,
    mistake_as_student,
    section_url,
    site_url,
)

BOOK = Path(__file__).resolve().parent.parent / "book"


def _x(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _double(x: Tensor) -> Tensor:
    """The reference of the toy exercise: 2 x."""
    return 2 * x


def _double_plus_one(x: Tensor) -> Tensor:
    return 2 * x + 1


def _times_three(x: Tensor) -> Tensor:
    return 3 * x


def _raises_value_error(x: Tensor) -> Tensor:
    raise ValueError("cannot run here")


DOUBLE_SECTION = "02_queries_keys_values.html#one-query"
DOUBLE_URL = f"{SITE_URL}book/{DOUBLE_SECTION}"  # the "See ..." of a message: an absolute address


@pytest.fixture
def temp_register():
    """Register exercises for one test and remove them afterwards."""
    added: list[str] = []

    def add(ex: Exercise) -> Exercise:
        register(ex)
        added.append(ex.id)
        return ex

    yield add
    for ex_id in added:
        EXERCISES.pop(ex_id, None)


@pytest.fixture
def double(temp_register) -> Exercise:
    """A toy function exercise with two catalogued mistakes (one of which cannot run)."""
    return temp_register(Exercise(
        id="_test_double", chapter=2, reference=_double, section=DOUBLE_SECTION,
        make_cases=lambda hidden: [Case("hidden" if hidden else "visible", (_x(3, 4, seed=int(hidden)),))],
        mistakes=(
            Mistake("broken mistake", "never runs.", "x.html#a", _raises_value_error),
            Mistake("off by one", "added one.", "02_queries_keys_values.html#the-maths", _double_plus_one),
        ),
    ))


def _judge_one(ex: Exercise, output: object, case: Case | None = None) -> CaseResult:
    return judge(ex, case or ex.make_cases(False)[0], output)


# --------------------------------------------------------------------------- API and registry


def test_package_exports_the_fixed_api():
    assert set(grading.__all__) == {"Exercise", "Case", "Mistake", "CaseResult", "EXERCISES", "register",
                                    "call", "judge", "grade_function", "check"}
    for name in grading.__all__:
        assert getattr(grading, name) is getattr(grading.core, name)


def test_register_returns_the_exercise_and_rejects_a_duplicate_id(temp_register):
    ex = Exercise(id="_test_dup", chapter=1, reference=_double, make_cases=lambda hidden: [])
    assert temp_register(ex) is ex and EXERCISES["_test_dup"] is ex
    with pytest.raises(ValueError, match="already registered"):
        register(Exercise(id="_test_dup", chapter=2, reference=_double, make_cases=lambda hidden: []))
    assert EXERCISES["_test_dup"] is ex


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "class"}, "kind"),
    ({"chapter": 0}, "chapter"),
    ({"chapter": -1}, "chapter"),
    ({"chapter": "3"}, "chapter"),
    ({"chapter": True}, "chapter"),
    ({"make_cases": None}, "make_cases"),
    ({"mistakes": (Mistake("same", "a", "s", _double), Mistake("same", "b", "s", _double))}, "unique"),
])
def test_register_rejects_malformed_exercises(kwargs, match):
    fields = {"id": "_test_bad", "chapter": 3, "reference": _double, "make_cases": lambda hidden: []}
    fields.update(kwargs)
    if fields["make_cases"] is None:
        del fields["make_cases"]
    with pytest.raises(ValueError, match=match):
        register(Exercise(**fields))
    assert "_test_bad" not in EXERCISES


def test_a_new_chapter_registers_without_editing_the_grader(temp_register):
    """No chapter count is typed anywhere: a chapter after the last one registers as is."""
    last = max(ex.chapter for ex in EXERCISES.values())
    ex = Exercise(id="_test_next_chapter", chapter=last + 1, reference=_double,
                  make_cases=lambda hidden: [])
    assert temp_register(ex) is ex and EXERCISES["_test_next_chapter"].chapter == last + 1


def test_unknown_exercise_id_names_the_registered_ones():
    with pytest.raises(KeyError, match="softmax"):
        grade_function("no_such_exercise", _double)


# --------------------------------------------------------------------------- call


def test_call_clones_inputs_so_in_place_changes_do_not_leak(double):
    case = double.make_cases(False)[0]
    before = case.args[0].clone()

    def mutating(x: Tensor) -> Tensor:
        x.mul_(2)
        return x

    with pytest.raises(InputModifiedError):
        call(double, mutating, case)
    assert torch.equal(case.args[0], before)  # the case itself is unchanged


@pytest.mark.parametrize("change, how", [
    (lambda x: x.sub_(x.amax(-1, keepdim=True)), "entries changed, as `x -= m` does"),
    (lambda x: x.__setitem__((0, 0), float("nan")), "1 of 12 entries changed"),
    (lambda x: x.resize_(12), "it went from size (3, 4) to (12,)"),
    (lambda x: setattr(x, "data", x.data.float()), "it went from torch.float64 to torch.float32"),
])
def test_call_fails_a_call_that_changes_its_input(double, change, how):
    """Values (exactly, NaN-aware), shape and dtype: each change is named, with the argument."""
    case = double.make_cases(False)[0]

    def student(x: Tensor) -> Tensor:
        out = 2 * x.detach().clone()
        change(x)
        return out

    with pytest.raises(InputModifiedError) as info:
        call(double, student, case)
    message = str(info.value)
    assert message.startswith("changed its input `x` in place (") and how in message
    assert "the caller's tensor is modified" in message and message.endswith(f"See {DOUBLE_URL}.")
    result = grade_function("_test_double", student)[0]  # the same message, in check() too
    assert not result.passed and result.message == message


def test_an_input_is_compared_exactly_and_nan_equal_to_nan(temp_register):
    nan_case = _x(3, 4)
    nan_case[1, 2] = float("nan")
    ex = temp_register(Exercise(id="_test_nan_input", chapter=2, reference=_double, section=DOUBLE_SECTION,
                                make_cases=lambda hidden: [Case("a NaN entry", (nan_case,))]))

    def rewrites_the_same_values(x: Tensor) -> Tensor:
        x.copy_(x.clone())  # written to, but every value (NaN too) is what it was
        return 2 * x

    assert grade_function(ex.id, rewrites_the_same_values)[0].passed

    def off_by_an_ulp(x: Tensor) -> Tensor:
        out = 2 * x
        x[0, 0] = torch.nextafter(x[0, 0], torch.tensor(math.inf, dtype=x.dtype))
        return out

    assert "1 of 12 entries changed" in grade_function(ex.id, off_by_an_ulp)[0].message


def _pairwise(x: Tensor, pair: list, *, scale: Tensor | None = None) -> Tensor:
    return 2 * x + pair[0] - pair[1] + (0 if scale is None else scale)


def test_a_changed_input_is_named_by_its_parameter_nested_or_keyword(temp_register):
    ex = temp_register(Exercise(
        id="_test_pairwise", chapter=2, reference=_pairwise, section=DOUBLE_SECTION,
        make_cases=lambda hidden: [Case("list and keyword", (_x(3, seed=1), [_x(3, seed=2), _x(3, seed=3)]),
                                        {"scale": _x(3, seed=4)})]))

    def changes_the_list(x, pair, *, scale=None):
        out = _pairwise(x, pair, scale=scale)
        pair[1].zero_()
        return out

    def changes_the_keyword(x, pair, *, scale=None):
        out = _pairwise(x, pair, scale=scale)
        scale += 1
        return out

    def replaces_an_element(x, pair, *, scale=None):
        out = _pairwise(x, pair, scale=scale)
        pair.append(x)
        return out

    assert "changed its input `pair[1]` in place" in grade_function(ex.id, changes_the_list)[0].message
    assert "changed its input `scale` in place" in grade_function(ex.id, changes_the_keyword)[0].message
    message = grade_function(ex.id, replaces_an_element)[0].message
    assert "changed its input `pair` in place (it now holds a list of 3 elements instead of 2" in message


def test_a_catalogued_in_place_mistake_is_named(temp_register):
    ex = temp_register(Exercise(
        id="_test_in_place", chapter=2, reference=_double, section=DOUBLE_SECTION,
        make_cases=lambda hidden: [Case("visible", (_x(3, 4),))],
        mistakes=(Mistake("off by one", "added one.", "02_queries_keys_values.html#the-maths", _double_plus_one),
                  Mistake("modifies its input in place", "x *= 2 doubles the caller's tensor.",
                          "02_queries_keys_values.html#the-code", lambda x: x.mul_(2).clone(),
                          changes_input=True))))
    result = grade_function(ex.id, mistake_as_student(ex, ex.mistakes[1]))[0]
    first, detail = result.message.split("\n")
    assert first == ("Looks like modifies its input in place: x *= 2 doubles the caller's tensor. "
                     f"See {SITE_URL}book/02_queries_keys_values.html#the-code.")
    assert detail.startswith("(changed its input `x` in place (12 of 12 entries changed")
    # a wrong output is never matched against it (it is recognised by the call, not by its output)
    assert "Looks like off by one" in grade_function(ex.id, _double_plus_one)[0].message


class _Affine(nn.Module):
    """A toy module: y = W x + b, and a second method."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)

    def twice(self, x: Tensor, extra: float = 0.0) -> Tensor:
        return 2 * self.lin(x) + extra


def _affine_cases(hidden: bool) -> list[Case]:
    sd = {"lin.weight": _x(3, 3, seed=1), "lin.bias": _x(3, seed=2)}
    return [Case("forward", (_x(2, 3, seed=3),), init_args=(3,), state_dict=sd),
            Case("twice", (_x(2, 3, seed=4),), {"extra": 0.5}, init_args=(3,), state_dict=sd, method="twice")]


@pytest.fixture
def affine(temp_register) -> Exercise:
    def forgot_bias(module: _Affine, x: Tensor, extra: float = 0.0) -> Tensor:
        y = x @ module.lin.weight.T
        return y if not extra else 2 * y + extra

    return temp_register(Exercise(id="_test_affine", chapter=4, reference=_Affine, kind="module",
                                  section="04_multi_head.html#the-code", make_cases=_affine_cases,
                                  mistakes=(Mistake("forgot the bias", "no b.", "04_multi_head.html#the-maths",
                                                    forgot_bias),)))


def test_call_builds_the_module_loads_float64_weights_and_calls_the_method(affine):
    fwd, twice = affine.make_cases(False)
    out = call(affine, _Affine, fwd)
    expected = fwd.args[0] @ fwd.state_dict["lin.weight"].T + fwd.state_dict["lin.bias"]
    assert out.dtype == torch.float64 and torch.allclose(out, expected, atol=1e-12, rtol=0)
    assert torch.allclose(call(affine, _Affine, twice), 2 * (twice.args[0] @ twice.state_dict["lin.weight"].T
                                                            + twice.state_dict["lin.bias"]) + 0.5)
    assert all(r.passed for r in grade_function("_test_affine", _Affine))


def test_call_loads_weights_strictly(affine):
    class Renamed(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.linear = nn.Linear(n, n)

        def forward(self, x: Tensor) -> Tensor:
            return self.linear(x)

    with pytest.raises(RuntimeError, match="lin.weight"):
        call(affine, Renamed, affine.make_cases(False)[0])
    results = grade_function("_test_affine", Renamed)
    assert not any(r.passed for r in results)
    assert results[0].message.startswith("raised RuntimeError: ") and "Missing key" in results[0].message


def test_call_leaves_the_global_random_state_alone(affine):
    state = torch.random.get_rng_state()
    call(affine, _Affine, affine.make_cases(False)[0])
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_module_may_change_its_own_state_but_not_its_input(affine):
    """The weights (the case's state_dict) and the module's state are not inputs; ``x`` is."""
    class ChangesItsWeights(_Affine):
        def forward(self, x: Tensor) -> Tensor:
            out = self.lin(x)
            with torch.no_grad():
                self.lin.weight.mul_(2)  # its own state: allowed
            self.calls = getattr(self, "calls", 0) + 1
            return out

        def twice(self, x: Tensor, extra: float = 0.0) -> Tensor:
            out = 2 * self.lin(x) + extra
            x.zero_()  # the caller's input: not allowed
            return out

    first, second = grade_function("_test_affine", ChangesItsWeights)
    assert first.passed
    assert not second.passed and second.message.startswith("changed its input `x` in place (6 of 6 entries")
    assert second.message.endswith(f"See {SITE_URL}book/04_multi_head.html#the-code.")


def test_method_style_mistakes_of_modules_are_recognised(affine):
    mistake = affine.mistakes[0]
    student = mistake_as_student(affine, mistake)
    assert issubclass(student, _Affine)
    results = grade_function("_test_affine", student)
    assert [r.passed for r in results] == [False, False]
    see = f"See {SITE_URL}book/04_multi_head.html#the-maths."
    assert all(r.message.startswith(f"Looks like forgot the bias: no b. {see}")
               for r in results)


# --------------------------------------------------------------------------- judge: the checks in order


def test_reference_output_passes(double):
    case = double.make_cases(False)[0]
    result = judge(double, case, 2 * case.args[0])
    assert result == CaseResult("visible", True, "")


@pytest.mark.parametrize("output, expected", [
    (None, "returned None instead of a torch.Tensor: is a `return` missing?"),
    (np.zeros((3, 4)), "returned a numpy.ndarray; return a torch.Tensor"),
    (nn.Parameter(torch.zeros(3, 4, dtype=torch.float64)), "a subclass of torch.Tensor; return a plain"),
    ((torch.zeros(3, 4, dtype=torch.float64),), "returned a tuple of 1 elements; expected a single torch.Tensor"),
    ([1.0, 2.0], "returned a list of 2 elements; expected a single torch.Tensor"),
    (3.0, "returned a float; expected a torch.Tensor"),
])
def test_type_messages(double, output, expected):
    result = _judge_one(double, output)
    assert not result.passed
    assert expected in result.message
    assert result.message.endswith(f"See {DOUBLE_URL}.")


def test_shape_dtype_nan_and_inf_each_have_their_own_message(double):
    x = double.make_cases(False)[0].args[0]
    shape = _judge_one(double, (2 * x).T)
    assert "wrong shape: got (4, 3), expected (3, 4)" in shape.message
    dtype = _judge_one(double, (2 * x).float())
    assert "wrong dtype: got torch.float32, expected torch.float64" in dtype.message
    with_nan = 2 * x
    with_nan[1, 2] = float("nan")
    nan = _judge_one(double, with_nan)
    assert "holds NaN at 1 of 12 positions (first at index (1, 2))" in nan.message
    with_inf = 2 * x
    with_inf[0, 3] = -float("inf")
    inf = _judge_one(double, with_inf)
    assert "holds inf at 1 of 12 positions (first at index (0, 3))" in inf.message
    assert not any(r.passed for r in (shape, dtype, nan, inf))


def test_float64_values_use_allclose_tolerances(double):
    x = double.make_cases(False)[0].args[0]
    ref = 2 * x
    assert _judge_one(double, ref + 0.5 * double.atol).passed
    assert _judge_one(double, ref * (1 + 0.5 * double.rtol)).passed
    off = ref.clone()
    off[2, 1] += 1e-6
    result = _judge_one(double, off)
    assert not result.passed
    assert "wrong values at 1 of 12 positions: largest error 1e-06 at index (2, 1)" in result.message


def test_expected_infinity_must_be_matched_exactly(temp_register):
    ex = temp_register(Exercise(
        id="_test_neg_inf", chapter=5, reference=lambda x: x.masked_fill(x < 0, float("-inf")),
        make_cases=lambda hidden: [Case("c", (torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64),))]))
    case = ex.make_cases(False)[0]
    assert judge(ex, case, torch.tensor([1.0, -float("inf"), 2.0], dtype=torch.float64)).passed
    finite = judge(ex, case, torch.tensor([1.0, -1e300, 2.0], dtype=torch.float64))
    assert not finite.passed and "index (1,)" in finite.message
    wrong_sign = judge(ex, case, torch.tensor([1.0, float("inf"), 2.0], dtype=torch.float64))
    assert not wrong_sign.passed


def test_masks_and_integer_tensors_are_compared_exactly(temp_register):
    ex = temp_register(Exercise(id="_test_mask", chapter=5, reference=lambda n: torch.ones(n, n, dtype=torch.bool).tril(),
                                make_cases=lambda hidden: [Case("n=3", (3,))]))
    case = ex.make_cases(False)[0]
    good = torch.ones(3, 3, dtype=torch.bool).tril()
    assert judge(ex, case, good).passed
    bad = good.clone()
    bad[0, 2] = True
    result = judge(ex, case, bad)
    assert "1 of 9 entries differ, first at index (0, 2): got True, expected False" in result.message
    as_int = judge(ex, case, good.long())
    assert "wrong dtype: got torch.int64, expected torch.bool" in as_int.message

    counts = temp_register(Exercise(id="_test_int", chapter=6, reference=lambda n: torch.arange(n) * 2,
                                    make_cases=lambda hidden: [Case("n=4", (4,))]))
    c = counts.make_cases(False)[0]
    assert judge(counts, c, torch.tensor([0, 2, 4, 6])).passed
    assert "first at index (3,): got 7, expected 6" in judge(counts, c, torch.tensor([0, 2, 4, 7])).message


def test_python_int_results_are_compared_exactly(temp_register):
    ex = temp_register(Exercise(id="_test_bytes", chapter=6, reference=lambda a, b: a * b * 2,
                                make_cases=lambda hidden: [Case("3 x 5", (3, 5))]))
    case = ex.make_cases(False)[0]
    assert judge(ex, case, 30).passed
    assert "got 31, expected 30" in judge(ex, case, 31).message
    assert "expected a Python int" in judge(ex, case, 30.0).message
    assert "expected a Python int" in judge(ex, case, torch.tensor(30)).message


def _pair(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.cumsum(-1), x.sum(-1)


def test_tuple_results_are_judged_element_by_element(temp_register):
    ex = temp_register(Exercise(id="_test_pair", chapter=1, reference=_pair,
                                make_cases=lambda hidden: [Case("c", (_x(2, 5),))]))
    case = ex.make_cases(False)[0]
    x = case.args[0]
    assert judge(ex, case, (x.cumsum(-1), x.sum(-1))).passed
    assert judge(ex, case, [x.cumsum(-1), x.sum(-1)]).passed  # a list is accepted as well
    assert "expected a tuple of 2 elements" in judge(ex, case, x.cumsum(-1)).message
    assert "expected a tuple of 2 elements" in judge(ex, case, (x.cumsum(-1),)).message
    second = judge(ex, case, (x.cumsum(-1), x.sum(-1, keepdim=True)))
    assert "element 1 of the returned tuple: wrong shape: got (2, 1), expected (2,)" in second.message
    first = judge(ex, case, (x.cumsum(-1) + 1, x.sum(-1)))
    assert first.message.startswith("element 0 of the returned tuple: wrong values")


# --------------------------------------------------------------------------- judge: mistakes


def test_an_output_matching_a_mistake_is_named_with_its_section(double):
    x = double.make_cases(False)[0].args[0]
    result = _judge_one(double, 2 * x + 1)
    assert not result.passed
    first_line, detail = result.message.split("\n")
    assert first_line == ("Looks like off by one: added one. "
                          f"See {SITE_URL}book/02_queries_keys_values.html#the-maths.")
    assert detail.startswith("(wrong values at 12 of 12 positions")


def test_an_unrecognised_wrong_output_reports_the_largest_error_and_the_default_section(double):
    x = double.make_cases(False)[0].args[0]
    out = 2 * x
    out[1, 3] += 0.25
    result = _judge_one(double, out)
    assert "Looks like" not in result.message
    assert "largest error 0.25 at index (1, 3)" in result.message
    assert result.message.endswith(f"See {DOUBLE_URL}.")


def test_a_mistake_is_recognised_at_the_shape_and_dtype_stages_too(temp_register):
    def flat(x: Tensor) -> Tensor:
        return x.flatten() * 2

    def single(x: Tensor) -> Tensor:
        return (2 * x).float()

    ex = temp_register(Exercise(
        id="_test_stages", chapter=2, reference=_double,
        make_cases=lambda hidden: [Case("c", (_x(2, 3),))],
        mistakes=(Mistake("flattened", "lost the shape.", "s.html#a", flat),
                  Mistake("float32", "lost precision.", "s.html#b", single))))
    x = ex.make_cases(False)[0].args[0]
    assert _judge_one(ex, flat(x)).message.startswith("Looks like flattened")
    assert "(wrong shape" in _judge_one(ex, flat(x)).message
    assert _judge_one(ex, single(x)).message.startswith("Looks like float32")
    assert "Looks like" not in _judge_one(ex, (3 * x).float()).message


def test_nan_outputs_can_match_a_mistake_that_produces_nan(temp_register):
    def nan_rows(x: Tensor) -> Tensor:
        return torch.where(x[:, :1] < 0, float("nan"), 2 * x)

    ex = temp_register(Exercise(id="_test_nan", chapter=2, reference=_double,
                                make_cases=lambda hidden: [Case("c", (_x(6, 3, seed=5),))],
                                mistakes=(Mistake("NaN rows", "nan.", "s.html#n", nan_rows),)))
    x = ex.make_cases(False)[0].args[0]
    assert bool((x[:, 0] < 0).any())
    assert _judge_one(ex, nan_rows(x)).message.startswith("Looks like NaN rows")


# --------------------------------------------------------------------------- low precision


def _bf16_case(hidden: bool) -> list[Case]:
    return [Case("bf16", (_x(64, seed=9, dtype=torch.bfloat16),), low_precision=True)]


def _exp_in_float32(x: Tensor) -> Tensor:
    """exp computed in float32 and rounded once to the input's dtype."""
    return torch.exp(x.float()).to(x.dtype)


def test_low_precision_rule_compares_with_twice_the_references_error(temp_register):
    ex = temp_register(Exercise(id="_test_lowp", chapter=9, reference=_exp_in_float32, make_cases=_bf16_case))
    case = ex.make_cases(False)[0]
    x = case.args[0]
    exact = torch.exp(x.double())
    ref_err = (_exp_in_float32(x).double() - exact).abs().max().item()
    assert ref_err > 0
    assert judge(ex, case, _exp_in_float32(x)).passed
    # Perturb one entry of the reference's output by several multiples of its own error: the
    # verdict must follow "error <= 2 x ref_err + 1e-6", and both verdicts must occur.
    verdicts = []
    for factor in (0.5, 1.0, 2.0, 3.0, 4.0, 8.0):
        out = _exp_in_float32(x).double()
        out[7] = exact[7] + factor * ref_err
        out = out.to(torch.bfloat16)
        err = (out.double() - exact).abs().max().item()
        result = judge(ex, case, out)
        assert result.passed == (err <= 2 * ref_err + 1e-6), (factor, err, ref_err)
        assert result.passed or "too far from the exact (float64) result" in result.message
        verdicts.append(result.passed)
    assert True in verdicts and False in verdicts
    assert "wrong dtype: got torch.float32, expected torch.bfloat16" in judge(ex, case, _exp_in_float32(x.float())).message


def test_low_precision_modules_are_upcast_for_the_exact_result(temp_register):
    def cases(hidden: bool) -> list[Case]:
        sd = {"lin.weight": _x(3, 3, seed=1, dtype=torch.bfloat16), "lin.bias": _x(3, seed=2, dtype=torch.bfloat16)}
        return [Case("bf16", (_x(4, 3, seed=3, dtype=torch.bfloat16),), init_args=(3,), state_dict=sd,
                     low_precision=True)]

    temp_register(Exercise(id="_test_affine_bf16", chapter=4, reference=_Affine, kind="module", make_cases=cases))
    assert [r.passed for r in grade_function("_test_affine_bf16", _Affine)] == [True]

    class Float32Inside(_Affine):
        def forward(self, x: Tensor) -> Tensor:
            return nn.functional.linear(x.float(), self.lin.weight.float(), self.lin.bias.float()).to(x.dtype)

    assert [r.passed for r in grade_function("_test_affine_bf16", Float32Inside)] == [True]

    class Sloppy(_Affine):
        def forward(self, x: Tensor) -> Tensor:
            return (self.lin(x).double() + 0.05).to(x.dtype)

    result = grade_function("_test_affine_bf16", Sloppy)[0]
    assert not result.passed and "too far from the exact" in result.message


# --------------------------------------------------------------------------- grade_function and check


def test_exceptions_become_failed_cases(double):
    def not_done(x: Tensor) -> Tensor:
        raise NotImplementedError

    assert grade_function("_test_double", not_done) == [CaseResult("visible", False, "not implemented yet")]
    assert grade_function("_test_double", not_done, hidden=True) == [CaseResult("hidden", False, "not implemented yet")]
    assert grade_function("_test_double", _raises_value_error) == [
        CaseResult("visible", False, "raised ValueError: cannot run here")]


def test_extra_check_runs_only_after_a_passed_case(temp_register):
    seen: list[str] = []

    def extra(fn, case: Case) -> str | None:
        seen.append(case.name)
        return "computed an L x S matrix" if fn is _double else None

    temp_register(Exercise(id="_test_extra", chapter=9, reference=_double, extra_check=extra,
                           make_cases=lambda hidden: [Case("a", (_x(2),)), Case("b", (_x(3),))]))
    assert grade_function("_test_extra", _double) == [CaseResult("a", False, "computed an L x S matrix"),
                                                     CaseResult("b", False, "computed an L x S matrix")]

    def also_double(x: Tensor) -> Tensor:
        return x + x

    assert all(r.passed for r in grade_function("_test_extra", also_double))
    seen.clear()
    assert not any(r.passed for r in grade_function("_test_extra", _times_three))
    assert seen == []


def test_forbidden_calls_fail_and_are_restored_afterwards(temp_register):
    temp_register(Exercise(id="_test_forbid", chapter=2, reference=lambda x: torch.softmax(x, -1),
                           make_cases=lambda hidden: [Case("c", (_x(2, 3),))],
                           forbidden=("torch.softmax", "torch.Tensor.softmax", "attnlib",
                                      "torch.no_such_function")))
    original = torch.softmax
    by_function = grade_function("_test_forbid", lambda x: torch.softmax(x, -1))[0]
    assert by_function.message == ("raised ForbiddenCallError: called torch.softmax, which this exercise "
                                   "asks you to write yourself")
    by_method = grade_function("_test_forbid", lambda x: x.softmax(-1))[0]
    assert "called torch.Tensor.softmax" in by_method.message
    via_attnlib = grade_function("_test_forbid", lambda x: attnlib.softmax(x))[0]
    assert "called attnlib.softmax" in via_attnlib.message
    assert grade_function("_test_forbid", lambda x: x.exp() / x.exp().sum(-1, keepdim=True))[0].passed
    # everything is back in place
    assert torch.softmax is original and "softmax" not in vars(torch.Tensor)
    assert attnlib.softmax is attnlib.attention.softmax
    assert torch.equal(_x(2, 3).softmax(-1), torch.softmax(_x(2, 3), -1))
    assert issubclass(ForbiddenCallError, RuntimeError)


def test_check_raises_a_readable_report_or_prints_one_line(double, capsys):
    with pytest.raises(AssertionError) as info:
        check("_test_double", _double_plus_one)
    report = str(info.value)
    assert report.splitlines()[0] == "_test_double: 0/1 cases passed; failed:"
    assert report.splitlines()[1] == "- visible:"
    assert report.splitlines()[2].startswith("    Looks like off by one")
    assert check("_test_double", _double) is None
    assert capsys.readouterr().out == "_test_double: 1/1 cases passed\n"
    assert check("_test_double", _double, hidden=True) is None
    assert capsys.readouterr().out == "_test_double: 1/1 cases passed\n"


# --------------------------------------------------------------------------- every registered exercise


def _book_anchors() -> set[str]:
    """``page.html#id`` for every heading of the chapters (docutils ids, as Sphinx makes them)."""
    anchors = set()
    for md in sorted(BOOK.glob("[0-9][0-9]_*.md")):
        fence = None
        for line in md.read_text().splitlines():
            stripped = line.lstrip()
            m = re.match(r"(`{3,}|~{3,})", stripped)
            if m:
                if fence is None:
                    fence = m.group(1)
                elif stripped.startswith(fence) and stripped.strip() == fence:
                    fence = None
                continue
            if fence is None:
                heading = re.match(r"#{1,6}\s+(.+?)\s*$", line)
                if heading:
                    anchors.add(f"{md.stem}.html#{make_id(heading.group(1))}")
    return anchors


ANCHORS = _book_anchors()


def test_anchor_helper_finds_known_sections():
    assert "02_queries_keys_values.html#a-softmax-that-cannot-overflow" in ANCHORS
    assert "05_self_cross_masks.html#is-causal-when-l-s-top-left-or-bottom-right" in ANCHORS
    assert not any("setup-shared" in a for a in ANCHORS)  # comments inside code cells are not headings


@pytest.mark.parametrize("ex_id", sorted(EXERCISES))
def test_every_section_exists_in_the_book(ex_id):
    ex = EXERCISES[ex_id]
    sections = [ex.section] + [m.section for m in ex.mistakes]
    missing = [s for s in sections if s not in ANCHORS]
    assert not missing, f"{ex_id}: no such section in the book: {missing}"
    chapters = {p.stem[:2] for p in (Path(__file__).resolve().parents[1] / "book").glob("[0-9][0-9]_*.md")}
    assert all(s[:2] in chapters for s in sections), f"{ex_id}: a section outside the chapters"


def _round_trip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)



@pytest.mark.parametrize("ex_id", sorted(EXERCISES))
def test_cases_are_plain_values_that_cross_a_process_boundary(ex_id):
    ex = EXERCISES[ex_id]
    visible, hidden = ex.make_cases(False), ex.make_cases(True)
    assert visible and hidden, f"{ex_id} needs visible and hidden cases"
    for cases in (visible, hidden):
        names = [c.name for c in cases]
        assert len(names) == len(set(names)), f"{ex_id}: case names repeat: {names}"
        for case in cases:
            payload = {"name": case.name, "args": case.args, "kwargs": case.kwargs, "init_args": case.init_args,
                       "state_dict": case.state_dict, "method": case.method, "low_precision": case.low_precision}
            assert same_value(_round_trip(payload), payload), f"{ex_id}/{case.name} does not survive torch.save/load"
            if ex.kind == "module":
                assert callable(getattr(ex.reference, case.method, None)), f"{ex_id}: no method {case.method}"
    assert {c.name for c in visible}.isdisjoint({c.name for c in hidden}), f"{ex_id}: hidden repeats visible"


@pytest.mark.parametrize("ex_id", sorted(EXERCISES))
def test_exercise_ids_are_the_reference_names(ex_id):
    ex = EXERCISES[ex_id]
    name, _, method = ex_id.partition(".")
    assert name == ex.reference.__name__
    if method:
        assert ex.kind == "module" and {c.method for c in ex.make_cases(False)} == {method}


# --------------------------------------------------------------------------- the course site


ROOT = Path(__file__).resolve().parents[1]


def test_the_site_constant_is_what_the_course_config_gives():
    """The grader's sandboxed child cannot read _config.yml (the course folder is hidden) and
    uses DEFAULT_SITE_URL: it must be the address the parent derives from _config.yml."""
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    base = (config.get("html") or {}).get("baseurl")
    owner, name = config["repository"]["url"].rstrip("/").split("/")[-2:]
    expected = base.rstrip("/") + "/" if base else f"https://{owner.lower()}.github.io/{name}/"
    assert SITE_URL == site_url(ROOT / "_config.yml") == expected
    assert DEFAULT_SITE_URL == expected, "update DEFAULT_SITE_URL in attnlib/grading/site.py"


@pytest.mark.parametrize("text, expected", [
    ("repository:\n  url: https://github.com/Someone/notes\n  branch: main\n", "https://someone.github.io/notes/"),
    ("repository:\n  url: https://github.com/someone/someone.github.io.git\n", "https://someone.github.io/"),
    ("html:\n  baseurl: 'https://course.example.org/attention'  # the site\nrepository:\n"
     "  url: https://github.com/someone/notes\n", "https://course.example.org/attention/"),
    ("title: x\nrepository:\n  url: https://gitlab.com/someone/notes\n", DEFAULT_SITE_URL),
    ("title: x\n", DEFAULT_SITE_URL),
])
def test_site_url_from_a_config(tmp_path, text, expected):
    config = tmp_path / "_config.yml"
    config.write_text(text)
    assert site_url(config) == expected


def test_site_url_falls_back_without_a_config(tmp_path):
    assert site_url(tmp_path / "missing.yml") == DEFAULT_SITE_URL


def test_section_url_is_absolute_and_sections_stay_relative():
    assert section_url("03_scaling.html#the-code") == f"{SITE_URL}book/03_scaling.html#the-code"
    assert section_url("https://example.org/x.html#y") == "https://example.org/x.html#y"
    for ex in EXERCISES.values():
        assert "://" not in ex.section and all("://" not in m.section for m in ex.mistakes), ex.id


# --------------------------------------------------------------------------- through the grader's child


def test_a_changed_input_reaches_the_graders_report(tmp_path):
    """The sandboxed child calls :func:`call` too: its InputModifiedError becomes the item's
    feedback, with the catalogued mistake and an absolute link."""
    import json

    from attnlib.grading.runner import grade_notebook

    fixtures = ROOT / "tests" / "fixtures" / "grading"
    nb = json.loads((fixtures / "correct.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "def softmax" in "".join(c["source"]))
    source = "".join(cell["source"])
    assert "    e = torch.exp(z - m)\n" in source
    cell["source"] = source.replace("    e = torch.exp(z - m)\n", "    z -= m\n    e = torch.exp(z)\n")
    path = tmp_path / "in_place.ipynb"
    path.write_text(json.dumps(nb))
    report = grade_notebook(path, source=fixtures / "source.ipynb", timeout=120)
    items = {i.id: i for i in report.items}
    feedback = items["test_softmax"].feedback
    assert items["test_softmax"].points == 0 and items["test_causal_mask"].passed
    assert "Looks like modifies its input in place: " in feedback
    assert f"See {section_url('02_queries_keys_values.html#a-softmax-that-cannot-overflow')}." in feedback
    assert "changed its input `x` in place (15 of 15 entries changed" in feedback
