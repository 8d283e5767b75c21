"""PagedKVCache and kv_memory_waste (chapter 12) against a contiguous cache: hand-worked
block tables, random append/free schedules, the out-of-blocks error, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlib.kv_cache import KVCache
from attnlib.paged import PagedKVCache, kv_memory_waste
from conftest import randn

H, D = 2, 3  # n_kv_heads, head_dim of the hand-worked examples


def kv(T, seed, n_kv_heads=H, head_dim=D, dtype=torch.float32):
    """Keys and values of T new tokens: (n_kv_heads, T, head_dim) each, distinct seeds."""
    return (randn(n_kv_heads, T, head_dim, dtype=dtype, seed=2 * seed),
            randn(n_kv_heads, T, head_dim, dtype=dtype, seed=2 * seed + 1))


def poisoned(*args, **kwargs):
    """A cache whose pool is NaN: reading a slot that was never written breaks equality."""
    cache = PagedKVCache(*args, **kwargs)
    cache.k_blocks.fill_(float("nan"))
    cache.v_blocks.fill_(float("nan"))
    return cache


def assert_gathers(cache, seq_id, k, v):
    """gather(seq_id) is exactly the contiguous (k, v): same dtype, shape and values."""
    gk, gv = cache.gather(seq_id)
    assert gk.dtype == k.dtype and gk.shape == k.shape and torch.equal(gk, k)
    assert gv.dtype == v.dtype and gv.shape == v.shape and torch.equal(gv, v)
    assert cache.seq_len(seq_id) == k.size(1)


# ---------------------------------------------------------------- hand-worked examples


def test_a_new_cache_is_preallocated_and_all_free():
    cache = PagedKVCache(5, 4, H, D, dtype=torch.float64)
    assert cache.k_blocks.shape == cache.v_blocks.shape == (5, H, 4, D)
    assert cache.k_blocks.dtype == cache.v_blocks.dtype == torch.float64
    assert cache.n_free_blocks == 5
    assert "a" not in cache


def test_appends_across_block_boundaries():
    """block_size 4: 3 tokens (mid-block), +1 (fills block 0 exactly), +0, +5 (crosses into
    two new blocks, the last one a quarter full)."""
    cache = poisoned(5, 4, H, D)
    k, v = kv(9, seed=0)
    expect = [(3, [0]), (4, [0]), (4, [0]), (9, [0, 1, 2])]
    cuts = [(0, 3), (3, 4), (4, 4), (4, 9)]
    for (a, b), (length, table) in zip(cuts, expect):
        cache.append("s", k[:, a:b], v[:, a:b])
        assert cache.block_table("s") == table
        assert cache.n_free_blocks == 5 - len(table)
        assert_gathers(cache, "s", k[:, :length], v[:, :length])
    # token t sits in block table[t // 4] at slot t % 4
    for t in range(9):
        assert torch.equal(cache.k_blocks[[0, 1, 2][t // 4], :, t % 4], k[:, t])
        assert torch.equal(cache.v_blocks[[0, 1, 2][t // 4], :, t % 4], v[:, t])


def test_exact_fill_takes_no_extra_block():
    cache = poisoned(3, 4, H, D)
    k, v = kv(8, seed=1)
    cache.append(0, k[:, :4], v[:, :4])
    assert cache.block_table(0) == [0] and cache.n_free_blocks == 2
    cache.append(0, k[:, 4:8], v[:, 4:8])  # exactly a second block
    assert cache.block_table(0) == [0, 1] and cache.n_free_blocks == 1
    assert_gathers(cache, 0, k, v)


def test_zero_tokens_start_an_empty_sequence_without_a_block():
    cache = PagedKVCache(2, 4, H, D)
    k, v = kv(0, seed=2)
    cache.append(("user", 7), k, v)  # any hashable seq_id
    assert ("user", 7) in cache
    assert cache.block_table(("user", 7)) == [] and cache.seq_len(("user", 7)) == 0
    assert cache.n_free_blocks == 2
    gk, gv = cache.gather(("user", 7))
    assert gk.shape == gv.shape == (H, 0, D)


def test_one_sequence_spanning_every_block():
    cache = poisoned(6, 3, H, D)
    k, v = kv(17, seed=3)  # ceil(17 / 3) = 6 blocks, the last one 2/3 full
    cache.append("long", k, v)
    assert cache.block_table("long") == [0, 1, 2, 3, 4, 5] and cache.n_free_blocks == 0
    assert_gathers(cache, "long", k, v)


def test_interleaved_sequences():
    """block_size 2; blocks are taken from the free list in order, only when needed."""
    cache = poisoned(6, 2, H, D)
    data = {name: kv(6, seed=10 + i) for i, name in enumerate("abc")}
    done = {name: 0 for name in "abc"}
    schedule = [("a", 3, [0, 1]), ("b", 1, [2]), ("a", 1, [0, 1]), ("c", 2, [3]),
                ("b", 2, [2, 4]), ("a", 1, [0, 1, 5])]
    for name, T, table in schedule:
        k, v = data[name]
        cache.append(name, k[:, done[name]:done[name] + T], v[:, done[name]:done[name] + T])
        done[name] += T
        assert cache.block_table(name) == table
        for other, n in done.items():
            if n:
                assert_gathers(cache, other, data[other][0][:, :n], data[other][1][:, :n])
    assert cache.n_free_blocks == 0


def test_freed_blocks_are_reused_without_stale_values():
    cache = poisoned(4, 2, H, D)
    ka, va = kv(5, seed=20)
    kb, vb = kv(2, seed=21)
    cache.append("a", ka, va)  # blocks [0, 1, 2]
    cache.append("b", kb, vb)  # block [3]: the pool is full
    assert cache.n_free_blocks == 0
    cache.free("a")
    assert "a" not in cache and cache.n_free_blocks == 3
    kd, vd = kv(5, seed=22)
    cache.append("d", kd, vd)  # needs 3 blocks: a's, first block first
    assert cache.block_table("d") == [0, 1, 2] and cache.n_free_blocks == 0
    assert_gathers(cache, "d", kd, vd)
    assert_gathers(cache, "b", kb, vb)
    with pytest.raises(KeyError, match="unknown seq_id 'a'"):
        cache.gather("a")


def test_out_of_blocks_raises_and_leaves_the_cache_unchanged():
    cache = PagedKVCache(3, 2, H, D)
    k, v = kv(4, seed=30)
    cache.append("a", k[:, :3], v[:, :3])  # blocks [0, 1], slot 1 of block 1 empty
    before = (cache.k_blocks.clone(), cache.v_blocks.clone(), cache.block_table("a"),
              cache.seq_len("a"), cache.n_free_blocks)
    big_k, big_v = kv(4, seed=31)
    # length 3 + 4 = 7 tokens need 4 blocks, 2 held: 2 new, 1 free
    with pytest.raises(RuntimeError, match=r"needs 2 new blocks .* only 1 of 3 are free"):
        cache.append("a", big_k, big_v)
    with pytest.raises(RuntimeError, match=r"needs 3 new blocks .* only 1 of 3 are free"):
        cache.append("new", *kv(5, seed=32))
    after = (cache.k_blocks, cache.v_blocks, cache.block_table("a"), cache.seq_len("a"),
             cache.n_free_blocks)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert after[2:] == before[2:]
    assert "new" not in cache  # a failed append does not start the sequence
    assert_gathers(cache, "a", k[:, :3], v[:, :3])
    cache.append("a", k[:, 3:4], v[:, 3:4])  # what fits still fits: slot 1 of block 1
    assert cache.block_table("a") == [0, 1] and cache.n_free_blocks == 1
    assert_gathers(cache, "a", k, v)


def test_stored_values_are_copies():
    """append copies k and v (detached from autograd); gather returns new tensors, not views."""
    cache = PagedKVCache(2, 4, H, D)
    k, v = kv(3, seed=40)
    k0, v0 = k.clone(), v.clone()
    cache.append("a", k, v)
    k.add_(1.0)  # the caller reuses its buffer
    v.add_(1.0)
    gk, gv = cache.gather("a")
    assert torch.equal(gk, k0) and torch.equal(gv, v0)
    gk.zero_()  # the caller writes into what it got back
    gv.zero_()
    assert_gathers(cache, "a", k0, v0)
    cache.append("b", k0.clone().requires_grad_(True), v0)
    assert not cache.k_blocks.requires_grad and not cache.gather("b")[0].requires_grad
    assert_gathers(cache, "b", k0, v0)


def test_decoding_attention_over_the_paged_cache_equals_the_contiguous_cache():
    """Token by token, attention over the gathered keys/values equals attention over the
    course's contiguous KVCache (chapter 6), for two interleaved sequences."""
    n_heads, n_kv_heads, head_dim, block_size = 4, 2, 8, 3
    paged = PagedKVCache(8, block_size, n_kv_heads, head_dim, dtype=torch.float64)
    contiguous = {0: KVCache(), 1: KVCache()}
    for step in range(10):
        for seq in (0, 1):
            T = 2 if step == 0 else 1  # a prompt of 2 tokens, then one token per step
            k, v = kv(T, seed=100 + 2 * step + seq, n_kv_heads=n_kv_heads, head_dim=head_dim,
                      dtype=torch.float64)
            q = randn(1, n_heads, T, head_dim, seed=500 + 2 * step + seq)  # (1, n_heads, T, D)
            paged.append(seq, k, v)
            pk, pv = paged.gather(seq)  # (n_kv_heads, S, head_dim)
            ck, cv = contiguous[seq].update(k[None], v[None])  # (1, n_kv_heads, S, head_dim)
            ours = F.scaled_dot_product_attention(q, pk[None], pv[None], enable_gqa=True)
            theirs = F.scaled_dot_product_attention(q, ck, cv, enable_gqa=True)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert paged.seq_len(0) == paged.seq_len(1) == 11
    assert len(paged.block_table(0)) == len(paged.block_table(1)) == 4  # ceil(11 / 3)


# ---------------------------------------------------------------- random schedules

OPS = st.lists(
    st.one_of(st.tuples(st.just("append"), st.integers(0, 3), st.integers(0, 7)),
              st.tuples(st.just("free"), st.integers(0, 3))),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(n_blocks=st.integers(1, 10), block_size=st.integers(1, 4), n_kv_heads=st.integers(1, 2),
       head_dim=st.integers(1, 3), ops=OPS)
def test_random_schedules_match_a_dict_of_contiguous_tensors(n_blocks, block_size, n_kv_heads,
                                                             head_dim, ops):
    cache = poisoned(n_blocks, block_size, n_kv_heads, head_dim)
    ref: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # seq_id -> contiguous (k, v)

    def blocks_for(n):
        return math.ceil(n / block_size)

    for step, op in enumerate(ops):
        seq = op[1]
        if op[0] == "append":
            k, v = kv(op[2], seed=step, n_kv_heads=n_kv_heads, head_dim=head_dim)
            old = ref.get(seq, (k[:, :0], v[:, :0]))
            new_len = old[0].size(1) + op[2]
            used_by_others = sum(blocks_for(r[0].size(1)) for s, r in ref.items() if s != seq)
            if used_by_others + blocks_for(new_len) <= n_blocks:  # freed blocks count as free
                cache.append(seq, k, v)
                ref[seq] = (torch.cat([old[0], k], dim=1), torch.cat([old[1], v], dim=1))
            else:
                with pytest.raises(RuntimeError, match="out of blocks"):
                    cache.append(seq, k, v)
        elif seq in ref:
            cache.free(seq)
            del ref[seq]
        else:
            with pytest.raises(KeyError, match="unknown seq_id"):
                cache.free(seq)

        assert {s for s in range(4) if s in cache} == set(ref)
        tables = {s: cache.block_table(s) for s in ref}
        held = [b for t in tables.values() for b in t]
        assert len(held) == len(set(held)), f"block tables overlap: {tables}"
        assert all(0 <= b < n_blocks for b in held)
        assert cache.n_free_blocks == n_blocks - len(held)
        assert len(held) == sum(blocks_for(r[0].size(1)) for r in ref.values())
        for s, (k, v) in ref.items():
            assert len(tables[s]) == blocks_for(k.size(1))
            assert_gathers(cache, s, k, v)


# ---------------------------------------------------------------- kv_memory_waste


@pytest.mark.parametrize("lengths, block_size, max_len, expected", [
    ([1, 16, 17, 0], 16, 32, (31 + 16 + 15 + 32, 15 + 0 + 15 + 0)),
    ([5, 9], 4, 12, (7 + 3, 3 + 3)),
    ([5, 9], 1, 12, (10, 0)),  # one-token blocks waste nothing
    ([12, 12], 4, 12, (0, 0)),  # every sequence at max_len, blocks divide it
    ([], 8, 100, (0, 0)),
    (torch.tensor([3, 10]), 8, 10, (7 + 0, 5 + 6)),
])
def test_kv_memory_waste_hand_worked(lengths, block_size, max_len, expected):
    out = kv_memory_waste(lengths, block_size, max_len)
    assert out == expected and all(type(x) is int for x in out)


def test_kv_memory_waste_is_the_slack_of_a_real_paged_cache():
    lengths, block_size = [0, 1, 7, 8, 9, 23], 8
    cache = PagedKVCache(20, block_size, 1, 1)
    for i, n in enumerate(lengths):
        cache.append(i, *kv(n, seed=i, n_kv_heads=1, head_dim=1))
    slots = sum(len(cache.block_table(i)) for i in range(len(lengths))) * block_size
    assert kv_memory_waste(lengths, block_size, 23)[1] == slots - sum(lengths) == 7 + 1 + 0 + 7 + 1


@pytest.mark.parametrize("args, error, match", [
    (([1, -1], 4, 8), ValueError, "must be >= 0"),
    (([1, 9], 4, 8), ValueError, "between 0 and max_len=8"),
    (([1, 2.0], 4, 8), TypeError, "must hold ints"),
    (([1, True], 4, 8), TypeError, "must hold ints"),
    (("12", 4, 8), TypeError, "sequence of ints"),
    ((5, 4, 8), TypeError, "sequence of ints"),
    ((torch.tensor([1.0]), 4, 8), TypeError, "1-D integer tensor"),
    ((torch.tensor([[1]]), 4, 8), TypeError, "1-D integer tensor"),
    (([1], 0, 8), ValueError, "block_size must be >= 1"),
    (([1], 4, 0), ValueError, "max_len must be >= 1"),
    (([1], 4.0, 8), TypeError, "block_size must be an int"),
])
def test_kv_memory_waste_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        kv_memory_waste(*args)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((0, 4, H, D), {}, ValueError, "n_blocks must be >= 1"),
    ((2, 0, H, D), {}, ValueError, "block_size must be >= 1"),
    ((2, 4, 0, D), {}, ValueError, "n_kv_heads must be >= 1"),
    ((2, 4, H, -1), {}, ValueError, "head_dim must be >= 1"),
    ((2, 1.5, H, D), {}, TypeError, "block_size must be an int"),
    ((True, 4, H, D), {}, TypeError, "n_blocks must be an int"),
    ((2, 4, H, D), {"dtype": torch.int64}, TypeError, "floating-point torch.dtype"),
    ((2, 4, H, D), {"dtype": "float32"}, TypeError, "floating-point torch.dtype"),
])
def test_constructor_rejects_bad_sizes(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        PagedKVCache(*args, **kwargs)


GOOD = randn(H, 2, D, dtype=torch.float32)


@pytest.mark.parametrize("seq_id, k, v, error, match", [
    ("a", GOOD.numpy(), GOOD, TypeError, "k must be a torch.Tensor"),
    ("a", GOOD, None, TypeError, "v must be a torch.Tensor"),
    ("a", GOOD[0], GOOD[0], ValueError, "k must have at least 3 dimensions"),
    ("a", GOOD[None], GOOD[None], ValueError, r"k must have shape \(n_kv_heads, T, head_dim\)"),
    ("a", GOOD[:1], GOOD, ValueError, r"= \(2, T, 3\), got \(1, 2, 3\)"),
    ("a", GOOD, GOOD[..., :2], ValueError, r"v must have shape .* got \(2, 2, 2\)"),
    ("a", GOOD.double(), GOOD, TypeError, "k must have the cache's dtype torch.float32"),
    ("a", GOOD, GOOD.half(), TypeError, "v must have the cache's dtype"),
    ("a", GOOD, GOOD[:, :1], ValueError, "same number of tokens"),
    ("a", GOOD.to("meta"), GOOD, ValueError, "k must be on the cache's device cpu"),
    (["a"], GOOD, GOOD, TypeError, "seq_id must be hashable"),
])
def test_append_rejects_bad_inputs_and_changes_nothing(seq_id, k, v, error, match):
    cache = PagedKVCache(2, 4, H, D)
    with pytest.raises(error, match=match):
        cache.append(seq_id, k, v)
    assert cache.n_free_blocks == 2 and "a" not in cache
    assert not cache.k_blocks.any() and not cache.v_blocks.any()


@pytest.mark.parametrize("method", ["gather", "free", "block_table", "seq_len"])
def test_unknown_seq_id_is_a_key_error(method):
    cache = PagedKVCache(2, 4, H, D)
    cache.append("a", GOOD, GOOD)
    with pytest.raises(KeyError, match="unknown seq_id 'b'"):
        getattr(cache, method)("b")
    with pytest.raises(TypeError, match="seq_id must be hashable"):
        getattr(cache, method)({})
    cache.free("a")
    with pytest.raises(KeyError, match="unknown seq_id 'a'"):  # freed twice, or used after free
        getattr(cache, method)("a")
