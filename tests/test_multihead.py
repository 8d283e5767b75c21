"""MultiHeadAttention, repeat_kv, KVCache and kv_cache_bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attnlib
from conftest import randn


def make(d_model=16, n_heads=4, n_kv_heads=None, seed=0, **kw):
    torch.manual_seed(seed)
    return attnlib.MultiHeadAttention(d_model, n_heads, n_kv_heads, **kw).double()


# ---------------------------------------------------------------- against nn.MultiheadAttention


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_torch_multihead_attention(bias, fused):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(24, 6, bias=bias, batch_first=True).double()
    ours = attnlib.MultiHeadAttention.from_torch(ref, fused=fused)
    x = randn(3, 7, 24, seed=1)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], rtol=1e-12, atol=1e-12)
    # Cross-attention: queries from x, keys and values from another sequence.
    ctx = randn(3, 5, 24, seed=2)
    torch.testing.assert_close(ours(x, context=ctx), ref(x, ctx, ctx, need_weights=False)[0],
                               rtol=1e-12, atol=1e-12)
    # Masks: nn.MultiheadAttention's True means *blocked*, ours means *may attend*.
    lengths = torch.tensor([7, 3, 5])
    pad = attnlib.padding_mask(lengths, 7)  # (B, 1, 1, S)
    torch.testing.assert_close(
        ours(x, attn_mask=pad),
        ref(x, x, x, key_padding_mask=~pad[:, 0, 0], need_weights=False)[0], rtol=1e-12, atol=1e-12)
    causal = attnlib.causal_mask(7)
    torch.testing.assert_close(
        ours(x, is_causal=True), ref(x, x, x, attn_mask=~causal, need_weights=False)[0],
        rtol=1e-12, atol=1e-12)


def test_submodule_names_and_sizes():
    m = attnlib.MultiHeadAttention(32, 8, n_kv_heads=2)
    assert [n for n, _ in m.named_children()] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert all(isinstance(c, nn.Linear) for c in m.children())
    assert m.head_dim == 4
    assert m.q_proj.weight.shape == (32, 32) and m.o_proj.weight.shape == (32, 32)
    assert m.k_proj.weight.shape == (8, 32) and m.v_proj.weight.shape == (8, 32)  # 2 KV heads x 4


@pytest.mark.parametrize("n_heads", [1, 2, 4, 8, 16])
def test_parameter_count_does_not_depend_on_head_count(n_heads):
    m = attnlib.MultiHeadAttention(64, n_heads)
    assert sum(p.numel() for p in m.parameters()) == 4 * 64 * 64


# ---------------------------------------------------------------- manual path == fused path


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, None), (4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("mode", ["plain", "causal", "bool mask", "float mask", "cross", "rope"])
def test_manual_and_fused_paths_agree(n_heads, n_kv_heads, mode):
    d_model = 4 * n_heads
    kw = {"rope_base": 10000.0} if mode == "rope" else {}
    manual = make(d_model, n_heads, n_kv_heads, seed=3, **kw)
    fused = make(d_model, n_heads, n_kv_heads, seed=3, fused=True, **kw)
    x, ctx = randn(2, 9, d_model, seed=4), randn(2, 6, d_model, seed=5)
    args = {
        "plain": {}, "causal": {"is_causal": True}, "rope": {"is_causal": True},
        "bool mask": {"attn_mask": torch.rand(9, 9, generator=torch.Generator().manual_seed(0)) > 0.3},
        "float mask": {"attn_mask": randn(1, n_heads, 9, 9, seed=6)},
        "cross": {"context": ctx},
    }[mode]
    torch.testing.assert_close(manual(x, **args), fused(x, **args), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- GQA: which KV head each query head reads


def test_gqa_query_head_h_reads_kv_head_h_div_n_rep():
    gqa = make(24, 6, 2, seed=7)
    mha = make(24, 6, None, seed=8)
    hd = gqa.head_dim
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for h in range(6):  # MHA head h gets the weights of KV head h // 3
            src = slice((h // 3) * hd, (h // 3 + 1) * hd)
            mha.k_proj.weight[h * hd:(h + 1) * hd] = gqa.k_proj.weight[src]
            mha.v_proj.weight[h * hd:(h + 1) * hd] = gqa.v_proj.weight[src]
    x = randn(2, 5, 24, seed=9)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the tiled mapping h % n_kv_heads is a different model
        for h in range(6):
            src = slice((h % 2) * hd, (h % 2 + 1) * hd)
            mha.k_proj.weight[h * hd:(h + 1) * hd] = gqa.k_proj.weight[src]
            mha.v_proj.weight[h * hd:(h + 1) * hd] = gqa.v_proj.weight[src]
    assert (gqa(x) - mha(x)).abs().max() > 1e-3


@pytest.mark.parametrize("n_rep", [1, 2, 3])
def test_repeat_kv_is_repeat_interleave(n_rep):
    x = randn(2, 3, 5, 4)
    out = attnlib.repeat_kv(x, n_rep)
    assert torch.equal(out, x.repeat_interleave(n_rep, dim=1))
    if n_rep > 1:
        assert not torch.equal(out, x.repeat(1, n_rep, 1, 1))
    with pytest.raises(ValueError, match=">= 1"):
        attnlib.repeat_kv(x, 0)


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("pass_is_causal", [False, True])
def test_token_by_token_decoding_equals_full_causal_forward(n_kv_heads, fused, rope, pass_is_causal):
    m = make(16, 4, n_kv_heads, seed=10, fused=fused, rope_base=10000.0 if rope else None)
    x = randn(2, 8, 16, seed=11)
    full = m(x, is_causal=True)
    cache = attnlib.KVCache()
    steps = [m(x[:, t:t + 1], kv_cache=cache, is_causal=pass_is_causal) for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)
    assert cache.seq_len == len(cache) == 8
    n_kv = n_kv_heads or 4
    assert cache.key.shape == cache.value.shape == (2, n_kv, 8, 4)


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 11), min_size=0, max_size=4, unique=True),
       n_kv_heads=st.sampled_from([None, 2, 1]), rope=st.booleans())
def test_chunked_prefill_equals_full_causal_forward(cuts, n_kv_heads, rope):
    m = make(16, 4, n_kv_heads, seed=12, rope_base=500.0 if rope else None)
    x = randn(1, 12, 16, seed=13)
    full = m(x, is_causal=True)
    bounds = [0, *sorted(cuts), 12]
    cache = attnlib.KVCache()
    chunks = [m(x[:, a:b], kv_cache=cache, is_causal=True) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-12, atol=1e-12)


def test_cache_with_padding_mask_matches_full_forward():
    m = make(16, 4, 2, seed=14)
    x = randn(2, 6, 16, seed=15)
    pad = attnlib.padding_mask(torch.tensor([6, 4]), 6)  # (B, 1, 1, 6)
    full = m(x, attn_mask=pad, is_causal=True)
    cache = attnlib.KVCache()
    steps = [m(x[:, t:t + 1], kv_cache=cache, attn_mask=pad[..., : t + 1]) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1)[0], full[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(steps, 1)[1, :4], full[1, :4], rtol=1e-12, atol=1e-12)


def test_cache_without_causal_flag_still_hides_the_future():
    # A chunk of 3 with a cache: token 0 of the chunk must not see tokens 1 and 2.
    m = make(16, 4, seed=16)
    x = randn(1, 5, 16, seed=17)
    cache = attnlib.KVCache()
    m(x[:, :2], kv_cache=cache)
    chunk = m(x[:, 2:], kv_cache=cache)
    torch.testing.assert_close(chunk, m(x, is_causal=True)[:, 2:], rtol=1e-12, atol=1e-12)


def test_kv_cache_object():
    cache = attnlib.KVCache()
    assert cache.seq_len == 0 and cache.key is None
    k, v = cache.update(randn(1, 2, 3, 4), randn(1, 2, 3, 5))
    assert k.shape == (1, 2, 3, 4) and v.shape == (1, 2, 3, 5)
    k, v = cache.update(randn(1, 2, 1, 4, seed=1), randn(1, 2, 1, 5, seed=1))
    assert cache.seq_len == 4 and torch.equal(k[:, :, 3:], randn(1, 2, 1, 4, seed=1))
    with pytest.raises(ValueError, match="only the sequence axis"):
        cache.update(randn(1, 3, 1, 4), randn(1, 3, 1, 5))
    with pytest.raises(ValueError, match="same number of positions"):
        cache.update(randn(1, 2, 2, 4), randn(1, 2, 1, 5))
    cache.reset()
    assert cache.seq_len == 0


def test_kv_cache_bytes_published_configurations():
    # Llama-2-7B (Touvron et al., 2023): 32 layers, 32 KV heads of 128, fp16, 4096 tokens.
    assert attnlib.kv_cache_bytes(32, 32, 128, 4096) == 2 * 32 * 32 * 128 * 4096 * 2 == 2 * 1024**3
    # Llama-2-70B: 80 layers, GQA with 8 KV heads of 128.
    assert attnlib.kv_cache_bytes(80, 8, 128, 4096) == 1_342_177_280
    assert attnlib.kv_cache_bytes(80, 8, 128, 4096, batch=4, dtype=torch.float32) == 4 * 2 * 1_342_177_280
    # Matches the bytes of a real cache filled by the module.
    m = attnlib.MultiHeadAttention(16, 4, n_kv_heads=2)
    cache = attnlib.KVCache()
    m(torch.randn(3, 7, 16), kv_cache=cache)
    real = cache.key.nbytes + cache.value.nbytes
    assert attnlib.kv_cache_bytes(1, 2, 4, 7, batch=3, dtype=torch.float32) == real
    with pytest.raises(TypeError, match="torch.dtype"):
        attnlib.kv_cache_bytes(1, 1, 1, 1, dtype="fp16")


@pytest.mark.parametrize("call,exc,words", [
    (lambda: attnlib.MultiHeadAttention(10, 3), ValueError, "divisible"),
    (lambda: attnlib.MultiHeadAttention(12, 6, n_kv_heads=4), ValueError, "multiple of n_kv_heads"),
    (lambda: attnlib.MultiHeadAttention(12, 0), ValueError, ">= 1"),
    (lambda: attnlib.MultiHeadAttention(16, 4)(torch.randn(2, 5, 8)), ValueError, "d_model=16"),
    (lambda: attnlib.MultiHeadAttention(16, 4)(torch.randn(2, 5, 16), context=torch.randn(3, 5, 16)),
     ValueError, "context"),
    (lambda: attnlib.MultiHeadAttention(16, 4)(torch.randn(2, 5, 16), context=torch.randn(2, 5, 16),
                                               kv_cache=attnlib.KVCache()), ValueError, "self-attention"),
    (lambda: attnlib.MultiHeadAttention.from_torch(nn.Linear(2, 2)), TypeError, "MultiheadAttention"),
])
def test_bad_input_is_explained(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_self_attention_module_is_permutation_equivariant():
    m = make(16, 4, 2, seed=18)
    x = randn(2, 9, 16, seed=19)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m(x[:, perm]), m(x)[:, perm], rtol=1e-12, atol=1e-12)
    # With RoPE the positions break the symmetry: the assertion above would fail.
    r = make(16, 4, 2, seed=18, rope_base=10000.0)
    assert (r(x[:, perm]) - r(x)[:, perm]).abs().max() > 1e-3
