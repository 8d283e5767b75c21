"""The graded exercises of chapters 6-11 (attnlib/grading/exercises_late.py).

For every exercise: the reference passes all its visible and hidden cases, the cases are
deterministic and survive ``torch.save``/``torch.load(weights_only=True)``, and every
catalogued mistake fails a visible case with a message that names it and points to a
heading that exists in the book. Then the properties beyond values: flash attention must
not build the L x S matrix, ``KVCache.update`` is judged over several calls, and RoPE
accepts angles computed in float64.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import same_value

from attnlib.attention import scaled_dot_product_attention as naive_attention
from attnlib.flash import flash_attention
from attnlib.grading import EXERCISES, Case, check, grade_function
from attnlib.grading.core import mistake_as_student

LATE = {
    "repeat_kv": 6,
    "kv_cache_bytes": 6,
    "KVCache.update": 6,
    "sinusoidal_positional_encoding": 7,
    "apply_rope": 7,
    "alibi_slopes": 7,
    "alibi_bias": 7,
    "attention_score_bytes": 8,
    "attention_flops": 8,
    "flash_attention": 9,
    "sliding_window_mask": 10,
    "longformer_mask": 10,
    "linear_attention": 10,
    "patchify": 11,
}
BOOK = Path(__file__).resolve().parent.parent / "book"
NO_SCORE_MATRIX = "must never materialise the L x S score matrix"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: the many tiny tensor operations are faster without thread hand-offs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _anchors(page: str) -> set[str]:
    """Anchors of the headings of a book page, as Sphinx/MyST makes them."""
    text = (BOOK / page.replace(".html", ".md")).read_text(encoding="utf-8")
    headings = re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^a-z0-9]+", "-", h.lower()).strip("-") for h in headings}


def _section_exists(section: str) -> bool:
    page, _, anchor = section.partition("#")
    return (BOOK / page.replace(".html", ".md")).is_file() and (not anchor or anchor in _anchors(page))


def test_every_late_exercise_is_registered_in_its_chapter():
    for ex_id, chapter in LATE.items():
        assert ex_id in EXERCISES, ex_id
        assert EXERCISES[ex_id].chapter == chapter


@pytest.mark.parametrize("ex_id", list(LATE))
def test_reference_passes_every_case(ex_id):
    ex = EXERCISES[ex_id]
    for hidden in (False, True):
        results = grade_function(ex_id, ex.reference, hidden=hidden)
        assert results, f"{ex_id}: no cases (hidden={hidden})"
        assert [r for r in results if not r.passed] == []



@pytest.mark.parametrize("ex_id", list(LATE))
def test_cases_are_deterministic_serialisable_and_hidden_ones_differ(ex_id):
    ex = EXERCISES[ex_id]
    visible, hidden = ex.make_cases(False), ex.make_cases(True)
    assert {c.name for c in visible}.isdisjoint({c.name for c in hidden})
    assert len({c.name for c in visible + hidden}) == len(visible + hidden)
    for first, again in zip(visible + hidden, ex.make_cases(False) + ex.make_cases(True)):
        parts = {"args": first.args, "kwargs": first.kwargs, "init_args": first.init_args}
        buffer = io.BytesIO()
        torch.save(parts, buffer)
        buffer.seek(0)
        assert same_value(parts, torch.load(buffer, weights_only=True)), (ex_id, first.name)
        assert same_value(parts, {"args": again.args, "kwargs": again.kwargs, "init_args": again.init_args})


@pytest.mark.parametrize("ex_id", list(LATE))
def test_sections_point_to_existing_headings(ex_id):
    ex = EXERCISES[ex_id]
    for section in [ex.section] + [m.section for m in ex.mistakes]:
        assert _section_exists(section), f"{ex_id}: no heading for {section!r}"



def test_each_exercise_has_enough_mistakes():
    counts = {ex_id: len(EXERCISES[ex_id].mistakes) for ex_id in LATE}
    for core in ("apply_rope", "flash_attention", "linear_attention", "sliding_window_mask",
                 "longformer_mask", "alibi_bias"):
        assert counts[core] >= 4, (core, counts[core])
    assert min(counts.values()) >= 3, counts


# ----------------------------------------------------------------------------- flash


def _naive_flash(query, key, value, is_causal=False, scale=None, block_q=512, block_k=256,
                 return_lse=False):
    """Correct values, but through the full (L, S) score matrix."""
    out = naive_attention(query, key, value, is_causal=is_causal, scale=scale)
    if return_lse:
        scores = (query @ key.transpose(-2, -1)) * (scale or 1 / math.sqrt(query.size(-1)))
        if is_causal:
            keep = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        return out, torch.logsumexp(scores, dim=-1)
    return out


def test_flash_check_flags_naive_attention_by_the_no_score_matrix_message():
    results = grade_function("flash_attention", _naive_flash)
    flagged = [r for r in results if not r.passed]
    assert flagged and all(NO_SCORE_MATRIX in r.message for r in flagged)
    assert any("256, 256)" in r.message for r in flagged)  # the shape that was built
    # Only the cases built for the check fail: the values themselves are right.
    assert len(flagged) == sum("no L x S tensor" in c.name for c in EXERCISES["flash_attention"].make_cases(False))
    hidden = grade_function("flash_attention", _naive_flash, hidden=True)
    assert any(NO_SCORE_MATRIX in r.message for r in hidden)


def test_flash_check_accepts_tiles_and_a_differently_tiled_solution():
    def row_blocks(query, key, value, is_causal=False, scale=None, block_q=512, block_k=256,
                   return_lse=False):
        # The library's own tiles, run with smaller query blocks than asked for: still tiled.
        return flash_attention(query, key, value, is_causal, scale, max(1, block_q // 2), block_k,
                               return_lse)
    assert all(r.passed for r in grade_function("flash_attention", row_blocks))
    assert all(r.passed for r in grade_function("flash_attention", row_blocks, hidden=True))


# ----------------------------------------------------------------------------- KVCache


class _OwnCache:
    """A cache written from scratch (not a subclass of the reference), correct."""

    def __init__(self):
        self.parts = None

    def update(self, key, value):
        if self.parts is None:
            self.parts = [key], [value]
        else:
            self.parts[0].append(key)
            self.parts[1].append(value)
        return torch.cat(self.parts[0], dim=2), torch.cat(self.parts[1], dim=2)


class _BreaksOnSecondCall(_OwnCache):
    def update(self, key, value):
        if self.parts is not None:
            raise RuntimeError("cannot append")
        return super().update(key, value)


def test_kv_cache_is_judged_over_several_updates():
    assert all(r.passed for r in grade_function("KVCache.update", _OwnCache))
    assert all(r.passed for r in grade_function("KVCache.update", _OwnCache, hidden=True))
    results = grade_function("KVCache.update", _BreaksOnSecondCall)
    assert all(not r.passed for r in results)
    assert "update call 2 of" in results[0].message
    assert "raised RuntimeError: cannot append" in results[0].message


# ----------------------------------------------------------------------------- tolerances


def _rope_float64_angles(x, positions=None, base=10000.0):
    L, D = x.size(-2), x.size(-1)
    pos = torch.arange(L) if positions is None else positions
    angles = pos.double()[..., None] * base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    if angles.ndim == 3:
        angles = angles.view(angles.size(0), *([1] * (x.ndim - 3)), L, D // 2)
    emb = torch.cat((angles, angles), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return (x.double() * emb.cos() + torch.cat((-x2, x1), dim=-1).double() * emb.sin()).to(x.dtype)


def test_rope_accepts_float64_angles_but_not_bfloat16_ones():
    for hidden in (False, True):
        assert all(r.passed for r in grade_function("apply_rope", _rope_float64_angles, hidden=hidden))

    def angles_in_input_dtype(x, positions=None, base=10000.0):
        L, D = x.size(-2), x.size(-1)
        pos = torch.arange(L) if positions is None else positions
        inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=x.dtype) / D)
        angles = pos.to(x.dtype)[..., None] * inv_freq
        if angles.ndim == 3:
            angles = angles.view(angles.size(0), *([1] * (x.ndim - 3)), L, D // 2)
        emb = torch.cat((angles, angles), dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()

    failed = [r for r in grade_function("apply_rope", angles_in_input_dtype) if not r.passed]
    assert [r.case for r in failed] == ["bfloat16, positions up to 4000"]
    assert "Looks like computing the angles in the input's low-precision dtype" in failed[0].message


def test_sinusoidal_accepts_float32_arithmetic():
    def in_float32(seq_len, d_model, base=10000.0):
        pos = torch.arange(seq_len, dtype=torch.float32)[:, None]
        angle = pos / base ** (torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
        pe = torch.zeros(seq_len, d_model)
        pe[:, 0::2], pe[:, 1::2] = angle.sin(), angle.cos()[:, : d_model // 2]
        return pe
    for hidden in (False, True):
        assert all(r.passed for r in grade_function("sinusoidal_positional_encoding", in_float32, hidden=hidden))


def test_byte_counts_must_be_python_ints():
    results = grade_function("kv_cache_bytes", lambda *a, **k: float(EXERCISES["kv_cache_bytes"].reference(*a, **k)))
    assert all(not r.passed and "expected a Python int" in r.message for r in results)


def test_check_reports_a_recognised_mistake():
    ex = EXERCISES["linear_attention"]
    mistake = next(m for m in ex.mistakes if m.name == "causal attention over all keys")
    with pytest.raises(AssertionError) as info:
        check("linear_attention", mistake.fn)
    report = str(info.value)
    assert report.startswith("linear_attention: 1/3 cases passed; failed:")
    assert "Looks like causal attention over all keys" in report


def test_cases_use_only_plain_values():
    plain = (torch.Tensor, int, float, bool, str, type(None), torch.dtype)

    def ok(x):
        if isinstance(x, (tuple, list)):
            return all(ok(y) for y in x)
        if isinstance(x, dict):
            return all(isinstance(k, str) and ok(v) for k, v in x.items())
        return isinstance(x, plain)

    for ex_id in LATE:
        for case in EXERCISES[ex_id].make_cases(False) + EXERCISES[ex_id].make_cases(True):
            assert isinstance(case, Case)
            assert ok(case.args) and ok(case.kwargs) and ok(case.init_args), (ex_id, case.name)
