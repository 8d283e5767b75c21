"""The synthetic task, the training loop, attention maps and the head scores (chapter 12)."""

from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attnlib.multihead
from attnlib import tasks
from attnlib.tasks import (
    attention_maps,
    induction_score,
    next_token_accuracy,
    predictable_positions,
    previous_token_score,
    repeated_sequences,
    train,
)
from attnlib.transformer import TinyGPT


# Tiny tensors, and one thread makes the training runs repeatable (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_model(n_kv_heads=None, seed=0, dtype=torch.float32, vocab=16, max_len=16) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab, 16, 4, 2, max_len, n_kv_heads=n_kv_heads).to(dtype)


def period_of(row: torch.Tensor) -> int:
    """The period of a row of distinct tokens repeated: where its first token comes back."""
    return int((row[1:] == row[0]).nonzero()[0]) + 1


# ------------------------------------------------------------------ the public contract


def test_all_lists_exactly_the_public_functions_and_classes():
    public = [name for name, obj in vars(tasks).items()
              if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
              and obj.__module__ == tasks.__name__]
    assert sorted(tasks.__all__) == sorted(public)


@pytest.mark.parametrize("name", tasks.__all__)
def test_public_names_say_chapter_12_and_are_typed(name):
    obj = getattr(tasks, name)
    assert "chapter 12" in (inspect.getdoc(obj) or "").lower(), name
    fn = obj.__init__ if inspect.isclass(obj) else obj
    missing = [p.name for p in inspect.signature(fn).parameters.values()
               if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}: parameters without type hints: {missing}"


# ------------------------------------------------------------------ repeated_sequences


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), lo=st.integers(1, 8), extra=st.integers(0, 5),
       vocab_extra=st.integers(0, 10), len_extra=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_repeated_sequences_repeat_distinct_tokens_with_a_period_in_range(
        n, lo, extra, vocab_extra, len_extra, seed):
    hi = lo + extra
    vocab, seq_len = hi + vocab_extra, hi + len_extra
    x = repeated_sequences(n, vocab, seq_len, (lo, hi), gen(seed))
    assert x.shape == (n, seq_len) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < vocab
    for row in x:
        p = period_of(row)
        assert lo <= p <= hi
        assert len(set(row[:p].tolist())) == p  # distinct within a period
        t = torch.arange(seq_len)
        assert torch.equal(row, row[t % p])  # x[t] = x[t % p]


def test_repeated_sequences_are_seeded():
    a = repeated_sequences(8, 32, 20, (4, 9), gen(3))
    b = repeated_sequences(8, 32, 20, (4, 9), gen(3))
    c = repeated_sequences(8, 32, 20, (4, 9), gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_fixed_period_of_half_the_length_repeats_the_first_half():
    x = repeated_sequences(50, 40, 24, 12, gen(0))
    assert torch.equal(x[:, 12:], x[:, :12])
    assert all(len(set(row[:12].tolist())) == 12 for row in x)
    assert all(period_of(row) == 12 for row in x)


def test_periods_cover_the_range():
    x = repeated_sequences(400, 64, 32, (8, 15), gen(0))
    periods = {period_of(row) for row in x}
    assert periods == set(range(8, 16))


@pytest.mark.parametrize("args, error", [
    ((0, 10, 8, 3), ValueError),  # n
    ((2.0, 10, 8, 3), TypeError),
    ((2, 10, 8, 11), ValueError),  # period > vocab_size
    ((2, 10, 8, 8), ValueError),  # period >= seq_len: nothing repeats
    ((2, 10, 8, (5, 3)), ValueError),  # lo > hi
    ((2, 10, 8, (0, 3)), ValueError),
    ((2, 10, 8, (1, 2, 3)), ValueError),
    ((2, 10, 8, 2.5), TypeError),
    ((2, 10, 8, True), TypeError),
    ((2, 10, 8, (1.0, 3)), TypeError),
])
def test_repeated_sequences_bad_inputs(args, error):
    with pytest.raises(error):
        repeated_sequences(*args)


def test_repeated_sequences_rejects_a_seed_for_a_generator():
    with pytest.raises(TypeError, match="torch.Generator"):
        repeated_sequences(2, 10, 8, 3, generator=0)


# ------------------------------------------------------------------ predictable_positions


@settings(max_examples=40, deadline=None)
@given(lo=st.integers(1, 6), extra=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_predictable_positions_start_one_after_the_period(lo, extra, seed):
    x = repeated_sequences(5, 16, 14, (lo, lo + extra), gen(seed))
    mask = predictable_positions(x)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    for row, m in zip(x, mask):
        p = period_of(row)
        assert torch.equal(m, torch.arange(14) >= p + 1)


def test_predictable_positions_by_hand():
    x = torch.tensor([[5, 1, 5, 2, 1, 7, 1]])
    # token p - 1 occurred before at p = 3 (the second 5) and p = 5 (the second 1); the
    # third 1 sits at the last position, so nothing after it is predicted
    assert predictable_positions(x).tolist() == [[False, False, False, True, False, True, False]]


# ------------------------------------------------------------------ the head scores


def perfect_induction(idx: torch.Tensor, n_heads: int = 1) -> torch.Tensor:
    """Each query whose token occurred before puts all its weight on the key after the most
    recent earlier occurrence; the others attend to themselves."""
    B, T = idx.shape
    w = torch.zeros(B, n_heads, T, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            earlier = [s for s in range(t) if idx[b, s] == idx[b, t]]
            w[b, :, t, earlier[-1] + 1 if earlier else t] = 1.0
    return w


def uniform_causal(B: int, H: int, T: int) -> torch.Tensor:
    allowed = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    w = allowed.double() / allowed.sum(-1, keepdim=True)  # (T, T): 1 / (t + 1) on keys 0..t
    return w.expand(B, H, T, T).clone()


@settings(max_examples=30, deadline=None)
@given(lo=st.integers(1, 6), extra=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_a_perfect_induction_head_scores_one(lo, extra, seed):
    x = repeated_sequences(3, 16, 15, (lo, lo + extra), gen(seed))
    w = perfect_induction(x, n_heads=2)
    assert torch.allclose(induction_score(w, x), torch.ones(2, dtype=torch.float64))
    assert float(previous_token_score(w).max()) < 1.0  # it is not a previous-token head


def test_uniform_attention_scores_one_over_t():
    p, T = 10, 20
    x = repeated_sequences(4, 32, T, p, gen(0))
    w = uniform_causal(4, 3, T)
    # queries t = p .. T - 1 each have one earlier occurrence: 1 / (t + 1) of their weight
    expected = sum(1 / (t + 1) for t in range(p, T)) / (T - p)
    assert torch.allclose(induction_score(w, x), torch.full((3,), expected, dtype=torch.float64))
    assert 1 / T < expected < 1 / p
    prev = sum(1 / (t + 1) for t in range(1, T)) / (T - 1)
    assert torch.allclose(previous_token_score(w), torch.full((3,), prev, dtype=torch.float64))


def test_uniform_attention_with_several_earlier_occurrences_counts_them_all():
    x = repeated_sequences(2, 16, 12, 3, gen(1))  # period 3: token t occurred t // 3 times
    expected = sum((t // 3) / (t + 1) for t in range(3, 12)) / 9
    assert math.isclose(float(induction_score(uniform_causal(2, 1, 12), x)[0]), expected,
                        rel_tol=1e-12)


def test_a_previous_token_head_scores_one_and_not_as_induction():
    T = 12
    w = torch.zeros(2, 1, T, T, dtype=torch.float64)
    w[:, :, 0, 0] = 1.0
    w[:, :, torch.arange(1, T), torch.arange(T - 1)] = 1.0  # t -> t - 1
    x = repeated_sequences(2, 16, T, 6, gen(0))
    assert float(previous_token_score(w)[0]) == 1.0
    assert float(induction_score(w, x)[0]) == 0.0  # t - 1 is never t - 6 + 1 here


def test_scores_tell_heads_apart():
    """Three heads, three patterns: each score picks its head."""
    x = repeated_sequences(3, 20, 16, 7, gen(2))
    ind = perfect_induction(x)
    prev = torch.zeros_like(ind)
    prev[..., 0, 0] = 1.0
    prev[..., torch.arange(1, 16), torch.arange(15)] = 1.0
    w = torch.cat([ind, prev, uniform_causal(3, 1, 16)], dim=1)  # (3, 3, 16, 16)
    assert int(induction_score(w, x).argmax()) == 0
    assert int(previous_token_score(w).argmax()) == 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), T=st.integers(4, 12))
def test_scores_of_any_causal_weights_lie_in_zero_one(seed, T):
    scores = torch.randn(2, 3, T, T, generator=gen(seed), dtype=torch.float64) * 3
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    w = scores.softmax(-1)
    x = repeated_sequences(2, 16, T, 3, gen(seed))
    for s in (induction_score(w, x), previous_token_score(w)):
        assert s.shape == (3,) and bool(((s >= 0) & (s <= 1)).all())


def test_score_bad_inputs():
    x = repeated_sequences(2, 16, 8, 3, gen(0))
    w = uniform_causal(2, 1, 8)
    with pytest.raises(ValueError, match="to match weights"):
        induction_score(w, x[:, :7])
    with pytest.raises(ValueError, match="occurs twice"):
        induction_score(w, torch.arange(16).view(2, 8))
    with pytest.raises(TypeError, match="integer token ids"):
        induction_score(w, x.double())
    with pytest.raises(TypeError, match="floating-point"):
        induction_score(w.long(), x)
    with pytest.raises(ValueError, match=r"\(B, H, T, T\)"):
        previous_token_score(w[..., :7])
    with pytest.raises(ValueError, match="at least 4 dimensions"):
        previous_token_score(w[0])
    with pytest.raises(ValueError, match="T >= 2"):
        previous_token_score(w[..., :1, :1])
    with pytest.raises(TypeError, match="torch.Tensor"):
        previous_token_score(w.tolist())


# ------------------------------------------------------------------ attention_maps


def rope_by_hand(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE written out: pair (i, i + D/2) turns by t * base ** (-2i / D), the
    angles and their cos and sin in fp32 as attnlib (and Hugging Face's LLaMA) computes them."""
    T, D = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2).float() / D)  # (D/2,) fp32
    angle = torch.arange(T).float()[:, None] * inv_freq  # (T, D/2) fp32
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)  # (T, D/2)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_attention_maps_equal_a_recomputation_by_hand(n_kv_heads):
    model = tiny_model(n_kv_heads, dtype=torch.float64)
    idx = repeated_sequences(3, 16, 11, (3, 5), gen(5))
    maps = attention_maps(model, idx)
    assert len(maps) == 2
    B, T, H, D = 3, 11, 4, 4
    with torch.no_grad():
        x = model.tok_emb(idx)  # (B, T, d_model)
        for block, w in zip(model.blocks, maps):
            attn = block.attn
            h = block.norm1(x)  # (B, T, d_model)
            q = (h @ attn.q_proj.weight.T).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            n_kv = attn.n_kv_heads
            k = (h @ attn.k_proj.weight.T).view(B, T, n_kv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = (h @ attn.v_proj.weight.T).view(B, T, n_kv, D).transpose(1, 2)  # (B, Hkv, T, D)
            q, k = rope_by_hand(q, 10000.0), rope_by_hand(k, 10000.0)
            group = torch.arange(H) // (H // n_kv)  # query head h reads KV head h // rep
            scores = q @ k[:, group].transpose(-2, -1) / math.sqrt(D)  # (B, H, T, T)
            future = torch.ones(T, T, dtype=torch.bool).triu(1)
            expected = scores.masked_fill(future, float("-inf")).softmax(-1)
            assert w.shape == (B, H, T, T) and w.dtype == torch.float64
            torch.testing.assert_close(w, expected, rtol=1e-10, atol=1e-12)
            # these are the weights the block multiplies its values by
            out = attn.o_proj((w @ v[:, group]).transpose(1, 2).reshape(B, T, H * D))
            torch.testing.assert_close(out, attn(h, is_causal=True), rtol=1e-10, atol=1e-12)
            x = block(x)


def test_attention_maps_are_bit_for_bit_the_weights_the_model_uses(monkeypatch):
    """Record q and k where MultiHeadAttention hands them to the attention function."""
    seen = []
    original = attnlib.multihead.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False):
        seen.append(attnlib.attention.attention_weights(q, k, attn_mask, is_causal))
        return original(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    model = tiny_model(n_kv_heads=2)
    idx = repeated_sequences(2, 16, 12, 5, gen(0))
    monkeypatch.setattr(attnlib.multihead, "scaled_dot_product_attention", recording)
    model(idx)
    monkeypatch.undo()
    maps = attention_maps(model, idx)
    assert len(seen) == len(maps) == 2
    for ours, theirs in zip(maps, seen):
        assert torch.equal(ours, theirs)


def test_attention_maps_are_causal_rows_that_sum_to_one():
    model = tiny_model(n_kv_heads=2, seed=1)
    idx = repeated_sequences(4, 16, 13, (2, 6), gen(1))
    for w in attention_maps(model, idx):
        assert w.shape == (4, 4, 13, 13)
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 4, 13))
        assert bool((w.triu(1) == 0).all()) and bool((w >= 0).all())
    assert not any(block.attn._forward_pre_hooks for block in model.blocks)  # hooks removed


def test_attention_maps_bad_inputs():
    model = tiny_model()
    with pytest.raises(TypeError, match="TinyGPT"):
        attention_maps(nn.Linear(2, 2), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        attention_maps(model, torch.full((1, 3), 99))
    assert not model.blocks[0].attn._forward_pre_hooks  # removed even when the model raised


# ------------------------------------------------------------------ next_token_accuracy


class Oracle(nn.Module):
    """Logits that put the true next token first, except at chosen (row, position) pairs."""

    def __init__(self, idx: torch.Tensor, vocab: int, wrong: list[tuple[int, int]]) -> None:
        super().__init__()
        nxt = idx.roll(-1, dims=1)  # (B, T): the token after each position
        for b, p in wrong:
            nxt[b, p - 1] = (idx[b, p] + 1) % vocab  # the prediction of token p is wrong
        self.logits = F.one_hot(nxt, vocab).double()  # (B, T, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_next_token_accuracy_counts_by_hand():
    idx = repeated_sequences(2, 16, 8, 3, gen(0))  # predictable: positions 4 .. 7
    wrong = [(0, 1), (0, 5), (1, 6), (1, 7)]
    model = Oracle(idx, 16, wrong)
    assert next_token_accuracy(model, idx) == 1 - 4 / 14
    mask = predictable_positions(idx)
    assert next_token_accuracy(model, idx, mask) == 1 - 3 / 8
    assert next_token_accuracy(model, idx, ~mask) == 1 - 1 / 6  # position 0 left out
    first = torch.zeros_like(mask)
    first[:, 0] = True
    assert math.isnan(next_token_accuracy(model, idx, first))  # nothing scored


def test_next_token_accuracy_bad_inputs():
    idx = repeated_sequences(2, 16, 8, 3, gen(0))
    model = Oracle(idx, 16, [])
    with pytest.raises(ValueError, match="bool tensor"):
        next_token_accuracy(model, idx, predictable_positions(idx).long())
    with pytest.raises(ValueError, match="bool tensor"):
        next_token_accuracy(model, idx, predictable_positions(idx)[:, 1:])
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        next_token_accuracy(model, idx[0])
    with pytest.raises(TypeError, match="integer"):
        predictable_positions(idx.float())


# ------------------------------------------------------------------ train


def small_run(seed=0, steps=150):
    torch.manual_seed(seed)
    model = TinyGPT(16, 32, 2, 2, 12)
    task = functools.partial(repeated_sequences, vocab_size=16, seq_len=12, period=(3, 5))
    return model, train(model, task, steps, 1e-2, batch_size=16, seed=seed, n_eval=64)


def test_training_lowers_the_loss_and_reports_what_it_measured():
    model, history = small_run()
    assert len(history.losses) == 150 and all(math.isfinite(v) for v in history.losses)
    first, last = history.losses[0], sum(history.losses[-10:]) / 10
    assert abs(first - math.log(16)) < 0.2  # starts at chance: ln(vocab_size)
    assert last < first - 0.25, (first, last)
    assert history.eval_loss < math.log(16) - 0.25 and history.seconds > 0
    assert 2 / 16 < history.accuracy_predictable <= 1  # above chance (1/16) on the copies
    assert 0 <= history.accuracy_other <= 1
    # the reported numbers are those of the trained model on the held-out rows, drawn first
    held_out = repeated_sequences(64, 16, 12, (3, 5), gen(0))
    mask = predictable_positions(held_out)
    assert history.accuracy_predictable == next_token_accuracy(model, held_out, mask)
    assert history.accuracy_other == next_token_accuracy(model, held_out, ~mask)
    with torch.no_grad():
        logits = model(held_out)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, 16), held_out[:, 1:].reshape(-1))
    assert history.eval_loss == pytest.approx(loss.item(), rel=1e-6)


def test_training_is_seeded():
    _, a = small_run(seed=1, steps=10)
    _, b = small_run(seed=1, steps=10)
    _, c = small_run(seed=2, steps=10)
    assert a.losses == b.losses and a.eval_loss == b.eval_loss
    assert a.losses != c.losses


def test_train_bad_inputs():
    model = tiny_model()
    task = functools.partial(repeated_sequences, vocab_size=16, seq_len=8, period=3)
    with pytest.raises(TypeError, match="nn.Module"):
        train(lambda x: x, task, 1, 1e-3)
    with pytest.raises(TypeError, match="callable"):
        train(model, repeated_sequences(2, 16, 8, 3), 1, 1e-3)
    with pytest.raises(ValueError, match="steps"):
        train(model, task, 0, 1e-3)
    for lr in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr"):
            train(model, task, 1, lr)
    with pytest.raises(ValueError, match="seed"):
        train(model, task, 1, 1e-3, seed=-1)
    with pytest.raises(TypeError, match="token ids"):
        train(model, lambda n, generator: torch.rand(n, 8, generator=generator), 1, 1e-3)
    with pytest.raises(ValueError, match="T >= 2"):
        train(model, lambda n, generator: torch.zeros(n, 1, dtype=torch.long), 1, 1e-3)
