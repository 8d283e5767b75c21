"""The graded exercises of chapters 6-11 (attnlib/grading/exercises/ch06_*.py to ch11_*.py).

For every exercise: the reference passes all its visible and hidden cases, the cases are
deterministic and survive ``torch.save``/``torch.load(weights_only=True)``, and every
catalogued mistake fails a visible case with a message that names it and points to a
heading that exists in the book. Then the properties beyond values: flash attention (forward
and backward) must not build the L x S matrix, ``KVCache.update`` is judged over several
calls, the GQA forward is judged through a KV cache chunk by chunk and must cache
``n_kv_heads`` heads, and RoPE accepts angles computed in float64.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

import attnlib
from conftest import same_value

from attnlib.attention import scaled_dot_product_attention as naive_attention
from attnlib.flash import flash_attention, flash_attention_backward
from attnlib.grading import EXERCISES, Case, check, grade_function
from attnlib.grading.core import mistake_as_student

# The exercises of chapters 6-11, read from the registry (tests/test_authoring.py checks that it
# holds exactly the exercises of the notebooks' authoring files, chapter by chapter).
LATE = sorted(ex_id for ex_id, ex in EXERCISES.items() if ex.chapter >= 6)
BOOK = Path(__file__).resolve().parent.parent / "book"
NO_SCORE_MATRIX = "must never materialise the L x S score matrix"


# One thread (tests/conftest.py): the many tiny tensor operations are faster without hand-offs.
pytestmark = pytest.mark.usefixtures("one_thread")


def _anchors(page: str) -> set[str]:
    """Anchors of the headings of a book page, as Sphinx/MyST makes them."""
    text = (BOOK / page.replace(".html", ".md")).read_text(encoding="utf-8")
    headings = re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^a-z0-9]+", "-", h.lower()).strip("-") for h in headings}


def _section_exists(section: str) -> bool:
    page, _, anchor = section.partition("#")
    return (BOOK / page.replace(".html", ".md")).is_file() and (not anchor or anchor in _anchors(page))


def test_every_late_exercise_has_a_chapter_from_6_on():
    assert LATE, "no exercise registered for chapters 6 and later"
    assert all(EXERCISES[ex_id].chapter >= 6 for ex_id in LATE)


@pytest.mark.parametrize("ex_id", LATE)
def test_reference_passes_every_case(ex_id):
    ex = EXERCISES[ex_id]
    for hidden in (False, True):
        results = grade_function(ex_id, ex.reference, hidden=hidden)
        assert results, f"{ex_id}: no cases (hidden={hidden})"
        assert [r for r in results if not r.passed] == []



@pytest.mark.parametrize("ex_id", LATE)
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


@pytest.mark.parametrize("ex_id", LATE)
def test_sections_point_to_existing_headings(ex_id):
    ex = EXERCISES[ex_id]
    for section in [ex.section] + [m.section for m in ex.mistakes]:
        assert _section_exists(section), f"{ex_id}: no heading for {section!r}"



def test_each_exercise_has_enough_mistakes():
    counts = {ex_id: len(EXERCISES[ex_id].mistakes) for ex_id in LATE}
    for core in ("apply_rope", "flash_attention", "linear_attention", "sliding_window_mask",
                 "longformer_mask", "alibi_bias", "MultiHeadAttention", "flash_attention_backward",
                 "unpatchify"):
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


def _precomputed_mask_flash(query, key, value, is_causal=False, scale=None, block_q=512, block_k=256,
                            return_lse=False):
    """Tiled, but with the causal mask built whole first: an (L, S) boolean tensor."""
    L, S = query.size(-2), key.size(-2)
    keep = torch.ones(L, S, dtype=torch.bool).tril()
    assert keep.shape == (L, S)
    return flash_attention(query, key, value, is_causal, scale, block_q, block_k, return_lse)


def test_flash_check_names_a_precomputed_mask_as_a_mask_not_a_score_matrix():
    failed = [r for r in grade_function("flash_attention", _precomputed_mask_flash, hidden=True) if not r.passed]
    assert [r.case for r in failed] == ["causal, L = S = 200, blocks 48 x 40 (no L x S tensor allowed)"]
    message = failed[0].message
    assert message.startswith("built an L x S boolean mask of shape (200, 200) (L = 200, S = 200, blocks 48 x 40)")
    assert "not the score matrix" in message and NO_SCORE_MATRIX not in message
    assert "See https://" in message  # the advice's link is absolute too


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


# ----------------------------------------------------------------------------- GQA forward

GQA = "MultiHeadAttention"  # chapter 6: the class, graded on forward with n_kv_heads < n_heads


def _gqa_cases(hidden):
    return EXERCISES[GQA].make_cases(hidden)


def test_gqa_forward_is_its_own_exercise_of_the_forward_method():
    ex = EXERCISES[GQA]
    assert ex.reference is attnlib.MultiHeadAttention and ex.kind == "module"
    assert {c.method for c in _gqa_cases(False) + _gqa_cases(True)} == {"forward"}
    # chapter 4 grades the same method with n_kv_heads=None only
    assert {c.init_args[2] for c in EXERCISES["MultiHeadAttention.forward"].make_cases(True)} == {None}


def test_gqa_cases_cover_mqa_gqa_masks_cross_attention_and_the_cache():
    for hidden in (False, True):
        cases = _gqa_cases(hidden)
        ratios = {(c.init_args[1], c.init_args[2]) for c in cases}
        assert any(kv == 1 for _, kv in ratios), "MQA"
        assert any(1 < kv < h for h, kv in ratios), "GQA"
        assert any(c.kwargs.get("is_causal") for c in cases)
        assert any(c.kwargs.get("attn_mask") is not None for c in cases)
        assert any(c.kwargs.get("context") is not None and c.kwargs["context"].size(1) != c.args[0].size(1)
                   for c in cases), "cross-attention with L != S"
        assert any("KV cache" in c.name for c in cases)
    hidden = _gqa_cases(True)
    assert any(c.args[0].size(1) == 1 for c in hidden), "L = 1"
    assert any(c.init_args[1] == c.init_args[2] for c in hidden), "n_kv_heads = n_heads"
    assert any(h // kv not in (1, kv) for h, kv in {(c.init_args[1], c.init_args[2]) for c in hidden}), \
        "a group size different from the number of groups"


class MyGQA(attnlib.MultiHeadAttention):
    """GQA written independently: the group axis made explicit with einsum, no repeat at all."""

    def forward(self, x, context=None, attn_mask=None, is_causal=False, kv_cache=None):
        B, L, _ = x.shape
        src = x if context is None else context
        G, R, D = self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, L, G, R, D)  # query head g * R + r belongs to group g
        k = self.k_proj(src).view(B, -1, G, D).transpose(1, 2)  # (B, G, S_new, D)
        v = self.v_proj(src).view(B, -1, G, D).transpose(1, 2)
        past = 0
        if kv_cache is not None:
            past = kv_cache.seq_len
            k, v = kv_cache.update(k, v)
        S = k.size(2)
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # as the course asks
        scores = torch.einsum("blgrd,bgsd->bgrls", q.to(work), k.to(work)) / D ** 0.5  # (B, G, R, L, S)
        keep = torch.ones(L, S, dtype=torch.bool)
        if kv_cache is not None:
            keep = torch.arange(S)[None, :] <= torch.arange(L)[:, None] + past
        elif is_causal:
            keep = torch.arange(S)[None, :] <= torch.arange(L)[:, None]
        scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            m = attn_mask
            if m.dim() == 4:  # (B, 1, 1, S): per batch element
                m = m[:, :, None]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
        top = scores.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
        w = (scores - top).exp()
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
        y = torch.einsum("bgrls,bgsd->blgrd", w, v.to(work)).reshape(B, L, -1)
        return self.o_proj(y.to(x.dtype))


class RepeatsBeforeCaching(attnlib.MultiHeadAttention):
    """Right outputs, but the KV heads are repeated before they are cached."""

    def forward(self, x, context=None, attn_mask=None, is_causal=False, kv_cache=None):
        n_rep = self.n_heads // self.n_kv_heads
        src = x if context is None else context
        q = self.split_heads(self.q_proj(x), self.n_heads)
        k = self.split_heads(self.k_proj(src), self.n_kv_heads).repeat_interleave(n_rep, dim=1)
        v = self.split_heads(self.v_proj(src), self.n_kv_heads).repeat_interleave(n_rep, dim=1)
        L = x.size(1)
        if kv_cache is not None:
            past = kv_cache.seq_len
            k, v = kv_cache.update(k, v)
            attn_mask, is_causal = torch.ones(L, past + L, dtype=torch.bool).tril(past), False
        y = naive_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.o_proj(self.merge_heads(y))


def test_gqa_independent_solution_passes(capsys):
    for hidden in (False, True):
        check(GQA, MyGQA, hidden=hidden)
    assert capsys.readouterr().out.count("cases passed") == 2


def test_gqa_decoding_is_judged_chunk_by_chunk_and_the_cache_must_hold_the_kv_heads():
    failed = [r for r in grade_function(GQA, RepeatsBeforeCaching) if not r.passed]
    cache_cases = [c.name for c in _gqa_cases(False) if "KV cache" in c.name]
    assert [r.case for r in failed] == cache_cases  # the outputs themselves are right
    assert "the KV cache holds keys of shape (2, 8, 6, 2)" in failed[0].message
    assert "n_kv_heads = 2" in failed[0].message

    class StopsAfterPrefill(MyGQA):
        def forward(self, x, context=None, attn_mask=None, is_causal=False, kv_cache=None):
            if kv_cache is not None and kv_cache.seq_len:
                raise RuntimeError("no decoding")
            return super().forward(x, context, attn_mask, is_causal, kv_cache)

    failed = [r for r in grade_function(GQA, StopsAfterPrefill) if not r.passed]
    assert [r.case for r in failed] == cache_cases
    assert "chunk 2 of 3" in failed[0].message and "raised RuntimeError: no decoding" in failed[0].message


def test_gqa_refuses_the_ready_made_head_mapping():
    class Fused(attnlib.MultiHeadAttention):
        def forward(self, x, context=None, attn_mask=None, is_causal=False, kv_cache=None):
            src = x if context is None else context
            q = self.split_heads(self.q_proj(x), self.n_heads)
            k = self.split_heads(self.k_proj(src), self.n_kv_heads)
            v = self.split_heads(self.v_proj(src), self.n_kv_heads)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                                 is_causal=is_causal, enable_gqa=True)
            return self.o_proj(self.merge_heads(y))

    results = grade_function(GQA, Fused)
    assert all("called torch.nn.functional.scaled_dot_product_attention" in r.message for r in results)

    class Library(attnlib.MultiHeadAttention):
        def forward(self, x, context=None, attn_mask=None, is_causal=False, kv_cache=None):
            src = x if context is None else context
            q = self.split_heads(self.q_proj(x), self.n_heads)
            k = attnlib.repeat_kv(self.split_heads(self.k_proj(src), self.n_kv_heads), self.n_heads // self.n_kv_heads)
            v = attnlib.repeat_kv(self.split_heads(self.v_proj(src), self.n_kv_heads), self.n_heads // self.n_kv_heads)
            return self.o_proj(self.merge_heads(naive_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)))

    results = grade_function(GQA, Library)
    assert all("called attnlib.repeat_kv" in r.message for r in results)


# ----------------------------------------------------------------------------- flash backward


def _naive_backward(query, key, value, out, lse, grad_out, is_causal=False, scale=None, block_q=512,
                    block_k=256, grad_lse=None):
    """The formulas of the chapter, right, but on the whole (L, S) matrix at once."""
    scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    s = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    p = torch.exp(s - lse[..., None])
    d = (grad_out * out).sum(-1, keepdim=True) - (0 if grad_lse is None else grad_lse[..., None])
    ds = p * (grad_out @ value.transpose(-2, -1) - d)
    return scale * ds @ key, scale * ds.transpose(-2, -1) @ query, p.transpose(-2, -1) @ grad_out


def test_flash_backward_flags_the_full_matrix_but_accepts_its_values():
    ex_id = "flash_attention_backward"
    results = grade_function(ex_id, _naive_backward)
    flagged = [r for r in results if not r.passed]
    assert flagged and all(NO_SCORE_MATRIX in r.message and "P = exp(scores - lse)" in r.message
                           for r in flagged)
    assert len(flagged) == sum("no L x S tensor" in c.name for c in EXERCISES[ex_id].make_cases(False))
    assert any(NO_SCORE_MATRIX in r.message for r in grade_function(ex_id, _naive_backward, hidden=True))


def test_flash_backward_refuses_autograd():
    def through_autograd(query, key, value, out, lse, grad_out, is_causal=False, scale=None, block_q=512,
                         block_k=256, grad_lse=None):
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        o = naive_attention(q, k, v, is_causal=is_causal, scale=scale)
        return torch.autograd.grad(o, (q, k, v), grad_out)

    results = grade_function("flash_attention_backward", through_autograd)
    assert all("called torch.autograd.grad" in r.message for r in results)


def test_flash_backward_cases_match_autograd_through_torch():
    """The cases' out and lse are the forward's, and the reference's gradients are autograd's."""
    for case in EXERCISES["flash_attention_backward"].make_cases(True)[:4]:
        query, key, value, out, lse, grad_out = case.args
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        kw = {n: case.kwargs[n] for n in ("is_causal", "scale") if n in case.kwargs}
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        torch.testing.assert_close(o.detach(), out, rtol=1e-10, atol=1e-10)
        theirs = torch.autograd.grad(o, (q, k, v), grad_out)
        ours = flash_attention_backward(*case.args, **case.kwargs)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- unpatchify


def test_unpatchify_independent_solution_and_fold_refused():
    def by_loops(patches, patch_size, height, width):
        B, N, P = patches.shape
        p = patch_size
        C = P // (p * p)
        image = patches.new_zeros(B, C, height, width)
        for n in range(N):
            r, c = divmod(n, width // p)
            image[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = patches[:, n].view(B, C, p, p)
        return image

    for hidden in (False, True):
        assert all(r.passed for r in grade_function("unpatchify", by_loops, hidden=hidden))

    def folded(patches, patch_size, height, width):
        return torch.nn.functional.fold(patches.transpose(1, 2), (height, width), patch_size, stride=patch_size)

    assert all("called torch.nn.functional.fold" in r.message for r in grade_function("unpatchify", folded))



# ----------------------------------------------------------------------------- scores far from 0

# The attention-like exercises and how their cases' scores are computed (float64): every one
# has a float32 and a bfloat16 low-precision case where every score of some rows lies far
# below 0 (exp underflows without the max subtraction; a running max started at 0 loses the
# row) and of other rows far above 0 (exp overflows). attention_entropy takes weights, not
# scores, and linear_attention has no softmax: neither has a maximum to subtract.
ATTENTION_LIKE = ("softmax", "scaled_dot_product_attention", "attention_weights", "MultiHeadAttention.forward",
                  "MultiHeadAttention", "flash_attention", "flash_attention_backward")


def _scores(ex_id: str, case: Case) -> Tensor:
    """The (..., L, S) scores of a case in float64, rows along the last axis."""
    if ex_id == "softmax":
        return case.args[0].double().movedim(case.kwargs.get("dim", -1), -1)
    if EXERCISES[ex_id].kind == "module":
        m = attnlib.MultiHeadAttention(*case.init_args).double()
        m.load_state_dict({k: t.double() for k, t in case.state_dict.items()})
        x = case.args[0].double()
        q = m.split_heads(m.q_proj(x), m.n_heads)
        k = attnlib.repeat_kv(m.split_heads(m.k_proj(x), m.n_kv_heads), m.n_heads // m.n_kv_heads)
        return q @ k.transpose(-2, -1) / math.sqrt(m.head_dim)
    q, k = case.args[0].double(), case.args[1].double()
    scale = case.kwargs.get("scale") or 1 / math.sqrt(q.size(-1))
    return q @ k.transpose(-2, -1) * scale


@pytest.mark.parametrize("ex_id", ATTENTION_LIKE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_attention_like_exercises_have_low_precision_cases_with_scores_far_from_0(ex_id, dtype):
    ex = EXERCISES[ex_id]
    found = False
    for case in ex.make_cases(False) + ex.make_cases(True):
        first = case.args[0] if ex.kind == "function" else next(iter(case.state_dict.values()))
        if not (case.low_precision and first.dtype == dtype):
            continue
        rows = _scores(ex_id, case).flatten(0, -2)
        found |= bool((rows <= -1000).all(-1).any() and (rows >= 1000).all(-1).any())
    assert found, f"{ex_id}: no {dtype} case with rows of scores all <= -1000 and rows all >= 1000"


def test_the_mistakes_of_scores_far_from_0_are_catalogued():
    names = {ex_id: {m.name for m in EXERCISES[ex_id].mistakes} for ex_id in ATTENTION_LIKE}
    for ex_id in ATTENTION_LIKE[:5] + ("flash_attention",):
        assert "no max subtraction" in names[ex_id], ex_id
    assert "running max initialised to 0 instead of -inf" in names["flash_attention"]
    assert "P computed as exp(scores) / exp(lse)" in names["flash_attention_backward"]
    in_place = {ex_id for ex_id, ex in EXERCISES.items() if any(m.changes_input for m in ex.mistakes)}
    assert in_place == {"softmax", "scaled_dot_product_attention", "attention_weights", "flash_attention"}
