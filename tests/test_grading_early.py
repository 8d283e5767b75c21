"""The graded exercises of chapters 1-5: the references pass, every catalogued mistake is
recognised by name, independent correct solutions pass, forbidden shortcuts are refused."""

from __future__ import annotations

import importlib
import math
import time

import pytest
import torch
from torch import Tensor

import attnlib
from attnlib.grading import EXERCISES, check, grade_function
from attnlib.grading.exercises import CHAPTER_MODULES
from attnlib.grading.core import mistake_as_student, section_url

# The exercises of chapters 1-5, read from the registry (tests/test_authoring.py checks that it
# holds exactly the exercises of the notebooks' authoring files, chapter by chapter).
EARLY = sorted(ex_id for ex_id, ex in EXERCISES.items() if ex.chapter <= 5)
# Every catalogued mistake of every chapter (1-11): each must fail a visible case and be named.
MISTAKES = [(ex_id, m.name) for ex_id in sorted(EXERCISES) for m in EXERCISES[ex_id].mistakes]


def test_the_chapter_1_to_5_exercises_grade_the_public_reference():
    assert EARLY, "no exercise registered for chapters 1-5"
    for ex_id in EARLY:
        assert EXERCISES[ex_id].reference is getattr(attnlib, ex_id.split(".")[0])


@pytest.mark.parametrize("ex_id", EARLY)
@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_the_reference_passes_every_case(ex_id, hidden):
    results = grade_function(ex_id, EXERCISES[ex_id].reference, hidden=hidden)
    assert results and all(r.passed for r in results), [r for r in results if not r.passed]


@pytest.mark.parametrize("ex_id", EARLY)
def test_visible_and_hidden_cases_differ_and_grading_is_fast(ex_id):
    ex = EXERCISES[ex_id]
    grade_function(ex_id, ex.reference)  # warm-up: one-time lazy imports inside torch are not grading time
    start = time.perf_counter()
    visible = grade_function(ex_id, ex.reference)
    hidden = grade_function(ex_id, ex.reference, hidden=True)
    elapsed = time.perf_counter() - start
    assert len(hidden) >= len(visible) >= 2
    assert elapsed < 1.5, f"{ex_id}: grading all cases took {elapsed:.2f} s"


@pytest.mark.parametrize("ex_id, mistake_name", MISTAKES)
def test_every_mistake_fails_a_visible_case_and_is_named(ex_id, mistake_name):
    ex = EXERCISES[ex_id]
    mistake = next(m for m in ex.mistakes if m.name == mistake_name)
    results = grade_function(ex_id, mistake_as_student(ex, mistake))
    failed = [r for r in results if not r.passed]
    assert failed, f"{ex_id}: mistake {mistake_name!r} passes every visible case"
    named = [r for r in failed if f"Looks like {mistake_name}: " in r.message]
    assert named, f"{ex_id}: {mistake_name!r} is reported as {[r.message for r in failed]}"
    assert f"See {section_url(mistake.section)}." in named[0].message


@pytest.mark.parametrize("ex_id, minimum", [
    ("ElmanRNN", 4), ("hidden_state_gradient_norms", 4), ("attention_entropy", 4), ("softmax", 4),
    ("scaled_dot_product_attention", 4), ("attention_weights", 4),
    ("MultiHeadAttention.split_heads", 4), ("MultiHeadAttention.merge_heads", 4),
    ("MultiHeadAttention.forward", 4), ("causal_mask", 4), ("padding_mask", 4),
])
def test_core_exercises_catalogue_at_least_four_mistakes(ex_id, minimum):
    assert len(EXERCISES[ex_id].mistakes) >= minimum


def test_the_catalogue_holds_the_mistakes_the_course_warns_about():
    names = {ex_id: {m.name for m in EXERCISES[ex_id].mistakes} for ex_id in EARLY}
    assert {"no 1/sqrt(d_k) scaling", "softmax over the wrong axis (dim=-2)", "mask applied after the softmax",
            "inverted mask polarity", "is_causal aligned bottom-right",
            "scaled by 1/d_k instead of 1/sqrt(d_k)"} <= names["scaled_dot_product_attention"]
    assert {"aligned bottom-right", "strict triangle (no diagonal)", "inverted polarity (True = blocked)",
            "float mask instead of bool"} <= names["causal_mask"]
    assert {"shape (B, S), not broadcastable", "<= instead of <",
            "inverted polarity (True = padding)"} <= names["padding_mask"]
    assert {"heads split without transpose", "heads merged without transpose", "missing output projection",
            "one big head", "keys and values taken from x instead of context"} <= names["MultiHeadAttention.forward"]


def _cases(ex_id: str, hidden: bool):
    return EXERCISES[ex_id].make_cases(hidden)


def test_hidden_attention_cases_hold_the_edge_cases():
    for ex_id in ("scaled_dot_product_attention", "attention_weights"):
        hidden = _cases(ex_id, True)
        queries = [c.args[0] for c in hidden]
        assert any(q.size(-2) == 1 for q in queries), "L = 1"
        assert any(c.kwargs.get("is_causal") and c.args[0].size(-2) > c.args[1].size(-2) for c in hidden)
        assert any(c.low_precision and c.args[0].dtype == torch.bfloat16 for c in hidden)
        # a fully masked row somewhere: the reference returns zero weights there
        weights = [attnlib.attention_weights(*c.args[:2], attn_mask=c.kwargs.get("attn_mask"),
                                             is_causal=c.kwargs.get("is_causal", False),
                                             scale=c.kwargs.get("scale")) for c in hidden]
        assert any(bool((w.sum(-1) == 0).any()) for w in weights)
        visible = _cases(ex_id, False)
        assert any(c.kwargs.get("is_causal") and c.args[0].size(-2) < c.args[1].size(-2) for c in visible)
        assert any(c.kwargs.get("attn_mask") is not None and c.kwargs["attn_mask"].is_floating_point()
                   for c in visible)


def test_softmax_cases_hold_large_logits_masked_rows_and_low_precision():
    for hidden in (False, True):
        xs = [c.args[0] for c in _cases("softmax", hidden)]
        assert any(bool(torch.isinf(x).all(-1).any()) for x in xs), "a row that is entirely -inf"
        assert any(float(x[torch.isfinite(x)].abs().max()) >= 1e3 for x in xs), "logits of 1e3 or more"
        assert any(x.dtype in (torch.bfloat16, torch.float16) for x in xs)


def test_cross_attention_cases_are_in_the_forward_exercise():
    for hidden in (False, True):
        cross = [c for c in _cases("MultiHeadAttention.forward", hidden) if c.kwargs.get("context") is not None]
        assert cross and any(c.kwargs["context"].size(1) != c.args[0].size(1) for c in cross)


# --------------------------------------------------------------------------- independent solutions


def my_softmax(x: Tensor, dim: int = -1) -> Tensor:
    z = x.double()
    shift = z.amax(dim=dim, keepdim=True).nan_to_num(neginf=0.0)
    e = (z - shift).exp()
    return (e / e.sum(dim=dim, keepdim=True).clamp_min(1e-300)).to(x.dtype) if x.dtype == torch.float64 \
        else (e / e.sum(dim=dim, keepdim=True).clamp_min(1e-300)).float().to(x.dtype)


def my_attention_weights(query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k = query.to(work), key.to(work)
    scores = torch.einsum("...le,...se->...ls", q, k) * (scale if scale is not None else q.shape[-1] ** -0.5)
    L, S = scores.shape[-2:]
    if is_causal:
        keep = torch.arange(S)[None, :] <= torch.arange(L)[:, None]
        scores = torch.where(keep, scores, -math.inf)
    if attn_mask is not None:
        scores = torch.where(attn_mask, scores, -math.inf) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.to(work)
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    w = torch.exp(scores - scores.amax(-1, keepdim=True).where(~dead, 0.0))
    w = torch.where(dead, 0.0, w / w.sum(-1, keepdim=True).where(~dead, 1.0))
    return w.to(query.dtype)


def my_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
            *, generator=None):
    w = my_attention_weights(query, key, attn_mask, is_causal, scale)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    return torch.einsum("...ls,...sv->...lv", w.to(work), value.to(work)).to(query.dtype)


class MyElmanRNN(attnlib.ElmanRNN):
    """The forward pass written independently (the constructor is the stub's)."""

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        W, b = self.input_proj.weight, self.input_proj.bias
        U, c = self.hidden_proj.weight, self.hidden_proj.bias
        h = torch.zeros(x.size(0), U.size(0), dtype=x.dtype) if h0 is None else h0
        states = []
        for t in range(x.size(1)):
            pre = x[:, t] @ W.T + h @ U.T
            if b is not None:
                pre = pre + b + c
            h = self.activation(pre)
            states.append(h)
        return torch.stack(states, 1), h


class MyMultiHeadAttention(attnlib.MultiHeadAttention):
    """split/merge/forward written independently with einsum (the constructor is the stub's)."""

    def split_heads(self, x: Tensor, n_heads: int) -> Tensor:
        return torch.stack(x.chunk(n_heads, dim=-1), dim=1)

    @staticmethod
    def merge_heads(x: Tensor) -> Tensor:
        return torch.cat(x.unbind(1), dim=-1)

    def forward(self, x, context=None, attn_mask=None, is_causal=False, kv_cache=None):
        src = x if context is None else context
        q = self.split_heads(self.q_proj(x), self.n_heads)
        k = self.split_heads(self.k_proj(src), self.n_heads)
        v = self.split_heads(self.v_proj(src), self.n_heads)
        return self.o_proj(self.merge_heads(my_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal)))


def my_gradient_norms(model, x):
    """The Jacobian by torch.func, one vector-Jacobian product per component of h_T."""
    x = x.reshape(1, *x.shape[-2:]).detach()

    def last(inputs):
        out = model(inputs)
        return (out[0] if isinstance(out, tuple) else out)[0, -1]

    jac = torch.func.jacrev(last)(x)  # (hidden, 1, T, input_size)
    return torch.linalg.vector_norm(jac.permute(2, 0, 1, 3).flatten(1), dim=1)  # (T,)


def my_entropy(weights, dim=-1):
    p = weights.float() if weights.dtype in (torch.float16, torch.bfloat16) else weights
    return (-(p * p.clamp_min(torch.finfo(p.dtype).tiny).log())).sum(dim).to(weights.dtype)


def my_causal_mask(L, S=None, device=None):
    S = L if S is None else S
    return torch.arange(S)[None, :] <= torch.arange(L)[:, None]


def my_padding_mask(lengths, S):
    return (torch.arange(S).expand(len(lengths), S) < lengths.unsqueeze(1)).view(len(lengths), 1, 1, S)


SOLUTIONS = {
    "ElmanRNN": MyElmanRNN, "hidden_state_gradient_norms": my_gradient_norms,
    "attention_entropy": my_entropy, "softmax": my_softmax, "scaled_dot_product_attention": my_sdpa,
    "attention_weights": my_attention_weights, "MultiHeadAttention.split_heads": MyMultiHeadAttention,
    "MultiHeadAttention.merge_heads": MyMultiHeadAttention, "MultiHeadAttention.forward": MyMultiHeadAttention,
    "causal_mask": my_causal_mask, "padding_mask": my_padding_mask,
}


@pytest.mark.parametrize("ex_id", sorted(SOLUTIONS))
def test_independent_correct_solutions_pass(ex_id, capsys):
    for hidden in (False, True):
        check(ex_id, SOLUTIONS[ex_id], hidden=hidden)
    assert capsys.readouterr().out.count("cases passed") == 2


# --------------------------------------------------------------------------- refusals and messages


def test_the_fused_kernel_and_attnlib_are_refused():
    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, *, generator=None):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                                is_causal=is_causal, scale=scale)

    results = grade_function("scaled_dot_product_attention", fused)
    assert all("called torch.nn.functional.scaled_dot_product_attention" in r.message for r in results)
    borrowed = grade_function("softmax", lambda x, dim=-1: attnlib.softmax(x, dim))
    assert all("called attnlib.softmax" in r.message for r in borrowed)
    library = grade_function("softmax", lambda x, dim=-1: torch.nn.functional.softmax(x, dim))
    assert all("called torch.nn.functional.softmax" in r.message for r in library)

    class Wrapped(MyMultiHeadAttention):
        def forward(self, x, context=None, attn_mask=None, is_causal=False, kv_cache=None):
            src = x if context is None else context
            q, k, v = (self.split_heads(p(t), self.n_heads)
                       for p, t in ((self.q_proj, x), (self.k_proj, src), (self.v_proj, src)))
            y = attnlib.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
            return self.o_proj(self.merge_heads(y))

    # the heads exercises may reuse an attention function but not a ready-made module
    assert all(r.passed for r in grade_function("MultiHeadAttention.forward", Wrapped))

    class Delegates(attnlib.MultiHeadAttention):
        def forward(self, x, context=None, attn_mask=None, is_causal=False, kv_cache=None):
            other = attnlib.MultiHeadAttention(self.d_model, self.n_heads)
            other.load_state_dict(self.state_dict())
            return other(x, context, attn_mask, is_causal)

    assert all("called attnlib.MultiHeadAttention" in r.message
               for r in grade_function("MultiHeadAttention.forward", Delegates))


def test_stub_and_wrong_types_get_their_own_messages():
    def stub(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False, *, generator=None):
        raise NotImplementedError

    assert {r.message for r in grade_function("scaled_dot_product_attention", stub)} == {"not implemented yet"}
    as_numpy = grade_function("causal_mask", lambda L, S=None, device=None: my_causal_mask(L, S).numpy())
    assert all("returned a numpy.ndarray" in r.message for r in as_numpy)
    ints = grade_function("causal_mask", lambda L, S=None, device=None: my_causal_mask(L, S).int())
    assert all("wrong dtype: got torch.int32, expected torch.bool" in r.message for r in ints)

    class NoTuple(MyElmanRNN):
        def forward(self, x, h0=None):
            return super().forward(x, h0)[0]

    assert all("expected a tuple of 2 elements" in r.message for r in grade_function("ElmanRNN", NoTuple))


def test_nan_on_fully_masked_rows_is_named():
    def nan_rows(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, *, generator=None):
        scores = query @ key.transpose(-2, -1) * (scale if scale is not None else query.size(-1) ** -0.5)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
        if is_causal:
            scores = scores.masked_fill(~my_causal_mask(*scores.shape[-2:]), -math.inf)
        e = (scores - scores.amax(-1, keepdim=True)).exp()
        return (e / e.sum(-1, keepdim=True)) @ value

    results = grade_function("scaled_dot_product_attention", nan_rows)
    failed = [r for r in results if not r.passed]
    assert [r.case for r in failed] == ["a fully masked query row"]
    assert failed[0].message.startswith("Looks like fully masked row gives NaN")
    assert "holds NaN" in failed[0].message


def test_check_reports_the_failed_cases_of_a_mistake():
    mistake = next(m for m in EXERCISES["causal_mask"].mistakes if m.name == "aligned bottom-right")
    with pytest.raises(AssertionError) as info:
        check("causal_mask", mistake.fn)
    lines = str(info.value).splitlines()
    assert lines[0] == "causal_mask: 1/3 cases passed; failed:"
    assert "- L=3, S=6:" in lines and "- L=5, S=2:" in lines
    assert sum(line.strip().startswith("Looks like aligned bottom-right") for line in lines) == 2


def test_each_chapter_module_docstring_lists_its_exercises():
    for ex_id in EXERCISES:
        chapter = EXERCISES[ex_id].chapter
        [name] = [m for m in CHAPTER_MODULES if m.startswith(f"ch{chapter:02d}_")]
        module = importlib.import_module(f"attnlib.grading.exercises.{name}")
        assert f"``{ex_id}``" in module.__doc__, (ex_id, name)


# --------------------------------------------------------------------------- models as arguments


def test_gradient_norm_cases_carry_models_as_plain_values():
    """A model cannot cross the grader's process boundary: a case names it, with its
    constructor arguments and weights, and build_args builds it where the function runs."""
    import io

    ex = EXERCISES["hidden_state_gradient_norms"]
    cases = ex.make_cases(False) + ex.make_cases(True)
    kinds = {c.args[0]["model"] for c in cases}
    assert kinds == {"ElmanRNN", "MultiHeadAttention", "LSTM"}
    assert any(c.args[1].ndim == 2 for c in cases) and any(c.args[1].ndim == 3 for c in cases)
    assert any(c.args[1].shape[-2] == 1 for c in cases), "T = 1"
    for case in cases:
        buffer = io.BytesIO()
        torch.save({"args": case.args}, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)  # plain values only
    before = torch.random.get_rng_state()
    args, _ = ex.build_args(cases[0].args, {})
    assert torch.equal(torch.random.get_rng_state(), before)  # building the model leaves the RNG alone
    assert isinstance(args[0], torch.nn.Module) and next(args[0].parameters()).dtype == torch.float64


def test_gradient_norms_refuse_attnlib_and_accept_another_correct_route():
    results = grade_function("hidden_state_gradient_norms",
                             lambda model, x: attnlib.hidden_state_gradient_norms(model, x))
    assert results and all("called attnlib.hidden_state_gradient_norms" in r.message for r in results)

    def finite_differences(model, x, eps=1e-6):  # no autograd at all: central differences
        x = x.reshape(1, *x.shape[-2:]).detach()

        def last(inputs):
            with torch.no_grad():
                out = model(inputs)
            return (out[0] if isinstance(out, tuple) else out)[0, -1]

        T, n = x.shape[1:]
        norms = torch.zeros(T, dtype=x.dtype)
        for t in range(T):
            for i in range(n):
                step = torch.zeros_like(x)
                step[0, t, i] = eps
                norms[t] += ((last(x + step) - last(x - step)) / (2 * eps)).pow(2).sum()
        return norms.sqrt()

    ex = EXERCISES["hidden_state_gradient_norms"]
    for case in ex.make_cases(False):
        args, _ = ex.build_args(case.args, {})
        torch.testing.assert_close(finite_differences(*args), attnlib.hidden_state_gradient_norms(*args),
                                   rtol=1e-6, atol=1e-7)


def test_entropy_cases_hold_zeros_masked_rows_and_low_precision():
    for hidden in (False, True):
        ws = [c.args[0] for c in _cases("attention_entropy", hidden)]
        assert any(bool((w == 0).any()) for w in ws), "exact zeros: 0 ln 0"
        assert any(w.dtype in (torch.float16, torch.bfloat16) for w in ws)
    visible = _cases("attention_entropy", False)
    assert any(bool((c.args[0] == 0).all(-1).any()) for c in visible), "a fully masked (all-zero) row"
    assert any(c.kwargs.get("dim", -1) != -1 for c in visible)


def test_entropy_refuses_the_builtins():
    refused = {
        "torch.special.entr": lambda w, dim=-1: torch.special.entr(w).sum(dim),
        "torch.xlogy": lambda w, dim=-1: -torch.xlogy(w, w).sum(dim),
        "torch.distributions.Categorical": lambda w, dim=-1: torch.distributions.Categorical(probs=w).entropy(),
    }
    for name, fn in refused.items():
        results = grade_function("attention_entropy", fn)
        assert results and all(f"called {name}" in r.message for r in results), name

