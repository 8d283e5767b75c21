"""RMSNorm, SwiGLU, TransformerBlock and TinyGPT (chapter 12)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attnlib
from attnlib.transformer import RMSNorm, SwiGLU, TinyGPT, TransformerBlock
from conftest import assert_low_precision_ok, randn

VOCAB = 11


# The tensors here are tiny: a second thread only adds overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(n_kv_heads=None, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    sizes = dict(vocab_size=VOCAB, d_model=16, n_heads=4, n_layers=2, max_len=24) | kw
    return TinyGPT(**sizes, n_kv_heads=n_kv_heads).to(dtype)


def make_block(d_model=16, n_heads=4, n_kv_heads=None, seed=0, **kw):
    """A float64 block whose every weight (norms included) is random, so none is left at 1."""
    torch.manual_seed(seed)
    block = TransformerBlock(d_model, n_heads, n_kv_heads, **kw).double()
    with torch.no_grad():
        for i, p in enumerate(block.parameters()):
            p.copy_(randn(*p.shape, seed=seed * 100 + i) * (1.0 if p.ndim == 1 else 0.3))
    return block


def tokens(B, T, seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- RMSNorm


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 4), max_size=2), d_model=st.integers(1, 12),
       scale=st.sampled_from([1e-4, 1.0, 1e3]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_rmsnorm_equals_torch_rmsnorm(lead, d_model, scale, seed, dtype):
    ref = nn.RMSNorm(d_model, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(randn(d_model, seed=seed + 1))
    ours = RMSNorm(d_model, eps=1e-6).to(dtype)
    ours.load_state_dict(ref.state_dict())  # same parameter name: weight
    x = randn(*lead, d_model, dtype=dtype, seed=seed) * scale  # 1e-4: eps matters
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(ours(x), ref(x), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rmsnorm_low_precision_as_accurate_as_torch(dtype):
    w, x = randn(32, seed=1), randn(4, 7, 32, seed=2) * 3
    exact = F.rms_norm(x, (32,), w, eps=1e-6)
    ref = nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(w)
    ours = RMSNorm(32)
    ours.load_state_dict(ref.state_dict())
    ref, ours = ref.to(dtype), ours.to(dtype)
    out = ours(x.to(dtype))
    assert out.dtype == dtype
    assert_low_precision_ok(out, ref(x.to(dtype)), exact)


def test_rmsnorm_starts_at_identity_scale_and_learns():
    norm = RMSNorm(8)
    assert torch.equal(norm.weight, torch.ones(8)) and norm.weight.requires_grad
    x = randn(3, 8)
    y = norm.double()(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- SwiGLU


def test_swiglu_is_the_llama_mlp():
    torch.manual_seed(0)
    mlp = SwiGLU(12, d_ff=20).double()
    assert [n for n, _ in mlp.named_children()] == ["w_gate", "w_up", "w_down"]
    assert all(m.bias is None for m in mlp.children())
    assert mlp.w_gate.weight.shape == mlp.w_up.weight.shape == (20, 12)
    assert mlp.w_down.weight.shape == (12, 20)
    x = randn(2, 5, 12)
    gate = x @ mlp.w_gate.weight.T  # (2, 5, 20)
    expected = (gate * torch.sigmoid(gate) * (x @ mlp.w_up.weight.T)) @ mlp.w_down.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(d_model=st.integers(1, 5000))
def test_default_d_ff_is_the_multiple_of_8_nearest_8_thirds_of_d_model(d_model):
    d_ff = SwiGLU.default_d_ff(d_model)
    candidates = range(8, 4 * d_model + 16, 8)
    assert d_ff == min(candidates, key=lambda m: abs(m - 8 * d_model / 3))


@pytest.mark.parametrize("d_model,d_ff", [(1, 8), (4, 8), (12, 32), (16, 40), (64, 168),
                                          (4096, 10920)])
def test_default_d_ff_values(d_model, d_ff):
    assert SwiGLU.default_d_ff(d_model) == d_ff
    if d_model <= 64:  # what d_ff=None builds, in the MLP and in the block
        assert SwiGLU(d_model).d_ff == d_ff
        if d_model % 4 == 0:
            assert TransformerBlock(d_model, d_model // 4).mlp.d_ff == d_ff


# ---------------------------------------------------------------- TransformerBlock


def test_block_structure():
    block = TransformerBlock(16, 4, n_kv_heads=2, d_ff=24)
    assert [n for n, _ in block.named_children()] == ["norm1", "attn", "norm2", "mlp"]
    assert isinstance(block.norm1, RMSNorm) and isinstance(block.norm2, RMSNorm)
    assert isinstance(block.attn, attnlib.MultiHeadAttention)
    assert (block.attn.n_heads, block.attn.n_kv_heads, block.attn.head_dim) == (4, 2, 4)
    assert block.attn.rope_base == 10000.0 and not block.attn.fused
    assert isinstance(block.mlp, SwiGLU) and block.mlp.d_ff == 24
    assert all(name.endswith("weight") for name, _ in block.named_parameters())  # no biases
    assert TransformerBlock(16, 4, fused=True).attn.fused


def _rope(x, base=10000.0):
    """Rotate-half RoPE written out: pair (i, i + D/2) turns by t * base ** (-2i / D).
    Angles in fp32, as in LLaMA (and attnlib.apply_rope)."""
    T, D = x.shape[-2:]
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2).float() / D)  # (D/2,)
    angle = torch.arange(T).float()[:, None] * inv_freq  # (T, D/2)
    cos, sin = angle.cos().repeat(1, 2).to(x.dtype), angle.sin().repeat(1, 2).to(x.dtype)
    rotated = torch.cat([-x[..., D // 2:], x[..., : D // 2]], dim=-1)
    return x * cos + rotated * sin


def _reference_block(block, x):
    """The block computed from its weights with torch's functions only."""
    B, T, d = x.shape
    a, m = block.attn, block.mlp
    H, Hkv, D = a.n_heads, a.n_kv_heads, a.head_dim
    h = F.rms_norm(x, (d,), block.norm1.weight, eps=1e-6)
    q = _rope(F.linear(h, a.q_proj.weight).view(B, T, H, D).transpose(1, 2))
    k = _rope(F.linear(h, a.k_proj.weight).view(B, T, Hkv, D).transpose(1, 2))
    v = F.linear(h, a.v_proj.weight).view(B, T, Hkv, D).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    x = x + F.linear(y.transpose(1, 2).reshape(B, T, d), a.o_proj.weight)
    h = F.rms_norm(x, (d,), block.norm2.weight, eps=1e-6)
    return x + F.linear(F.silu(F.linear(h, m.w_gate.weight)) * F.linear(h, m.w_up.weight),
                        m.w_down.weight)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("fused", [False, True])
def test_block_equals_independent_computation(n_kv_heads, fused):
    block = make_block(16, 4, n_kv_heads, seed=1, fused=fused)
    x = randn(2, 9, 16, seed=2)
    torch.testing.assert_close(block(x), _reference_block(block, x), rtol=1e-10, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(heads=st.sampled_from([(4, None), (4, 2), (4, 1), (2, 2)]), T=st.integers(1, 10),
       split=st.integers(0, 10), seed=st.integers(0, 2**16))
def test_block_manual_and_fused_paths_agree(heads, T, split, seed):
    manual = make_block(16, *heads, seed=seed % 7)
    fused = make_block(16, *heads, seed=seed % 7, fused=True)
    x = randn(2, T, 16, seed=seed)
    torch.testing.assert_close(manual(x), fused(x), rtol=1e-12, atol=1e-12)
    split = min(split, T - 1)  # with a cache: a prefill of `split` tokens, then the rest
    outs = []
    for block in (manual, fused):
        cache = attnlib.KVCache()
        parts = [block(x[:, :split], kv_cache=cache)] if split else []
        outs.append(torch.cat([*parts, block(x[:, split:], kv_cache=cache)], dim=1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[0], manual(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_block_token_by_token_with_cache_equals_full(n_kv_heads):
    block = make_block(16, 4, n_kv_heads, seed=3)
    x = randn(2, 7, 16, seed=4)
    cache = attnlib.KVCache()
    steps = [block(x[:, t:t + 1], kv_cache=cache) for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), block(x), rtol=1e-12, atol=1e-12)
    assert cache.key.shape == (2, n_kv_heads or 4, 7, 4)


# ---------------------------------------------------------------- TinyGPT: structure and init


def test_model_structure_and_parameter_count():
    model = make_model(n_kv_heads=2, n_layers=3)
    assert [n for n, _ in model.named_children()] == ["tok_emb", "blocks", "norm", "lm_head"]
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 3
    assert all(isinstance(b, TransformerBlock) for b in model.blocks)
    assert isinstance(model.norm, RMSNorm) and model.lm_head.bias is None
    assert model.lm_head.weight is model.tok_emb.weight  # tied
    # No learned position table: the only embedding is the token one.
    assert [type(m) for m in model.modules() if isinstance(m, nn.Embedding)] == [nn.Embedding]
    d, d_ff, hd = 16, SwiGLU.default_d_ff(16), 4
    per_block = 2 * d + d * (4 + 2 * 2) * hd + 4 * hd * d + 3 * d * d_ff
    assert sum(p.numel() for p in model.parameters()) == VOCAB * d + 3 * per_block + d


def test_init_is_small_seeded_and_scaled_on_residual_branches():
    def build(seed):
        torch.manual_seed(seed)
        return TinyGPT(vocab_size=200, d_model=64, n_heads=4, n_layers=8, max_len=16)

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    assert abs(a.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(a.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    for w in (a.blocks[0].attn.o_proj.weight, a.blocks[-1].mlp.w_down.weight):
        assert abs(w.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert torch.equal(a.norm.weight, torch.ones(64))
    assert a.blocks[0].mlp.w_gate.weight.mean().abs() < 0.002


# ---------------------------------------------------------------- TinyGPT: causality and the cache


@settings(max_examples=20, deadline=None)
@given(T=st.integers(2, 10), data=st.data(), n_kv_heads=st.sampled_from([None, 2, 1]),
       seed=st.integers(0, 2**16))
def test_future_tokens_never_change_earlier_logits(T, data, n_kv_heads, seed):
    model = make_model(n_kv_heads, seed=seed % 5)
    idx = tokens(2, T, seed=seed)
    t = data.draw(st.integers(0, T - 1), label="t")
    other = idx.clone()
    other[:, t] = (idx[:, t] + data.draw(st.integers(1, VOCAB - 1), label="shift")) % VOCAB
    a, b = model(idx), model(other)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[:, t], b[:, t])  # the perturbation itself is seen


@settings(max_examples=20, deadline=None)
@given(cuts=st.lists(st.integers(1, 11), max_size=4, unique=True),
       n_kv_heads=st.sampled_from([None, 2, 1]), seed=st.integers(0, 2**16))
def test_cached_chunks_equal_full_forward_float64(cuts, n_kv_heads, seed):
    model = make_model(n_kv_heads, seed=seed % 5)
    idx = tokens(2, 12, seed=seed)
    bounds = [0, *sorted(cuts), 12]
    cache = model.new_cache()
    chunks = [model(idx[:, a:b], kv_cache=cache) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(idx), rtol=1e-12, atol=1e-12)
    assert len(cache) == 2 and all(c.seq_len == 12 for c in cache)
    assert cache[0].key.shape == (2, n_kv_heads or 4, 12, 4)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_token_by_token_logits_equal_full_forward_float32(n_kv_heads):
    model = make_model(n_kv_heads, seed=1, dtype=torch.float32)
    idx = tokens(3, 16, seed=2)
    cache = model.new_cache()
    steps = torch.cat([model(idx[:, t:t + 1], kv_cache=cache) for t in range(16)], dim=1)
    full = model(idx)
    assert full.shape == (3, 16, VOCAB) and full.dtype == torch.float32
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 6), new=st.integers(0, 10), n_kv_heads=st.sampled_from([None, 2, 1]),
       seed=st.integers(0, 2**16))
def test_cached_greedy_generation_equals_uncached(T, new, n_kv_heads, seed):
    model = make_model(n_kv_heads, seed=seed % 5)
    prompt = tokens(2, T, seed=seed)
    out = model.generate(prompt, new)
    assert out.shape == (2, T + new) and out.dtype == prompt.dtype
    assert torch.equal(out[:, :T], prompt)
    assert torch.equal(out, model.generate(prompt, new, use_cache=False))
    if new:  # each new token is the argmax of the full forward's logits before it
        with torch.no_grad():
            logits = model(out[:, :-1])
        assert torch.equal(logits[:, T - 1:].argmax(-1), out[:, T:])


def test_generate_prefills_once_then_feeds_one_token_at_a_time():
    model = make_model(2, seed=3, dtype=torch.float32)
    seen = []
    model.tok_emb.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    prompt = tokens(2, 4, seed=4)
    cached = model.generate(prompt, 5)
    assert seen == [(2, 4)] + [(2, 1)] * 4
    seen.clear()
    assert torch.equal(model.generate(prompt, 5, use_cache=False), cached)
    assert seen == [(2, 4), (2, 5), (2, 6), (2, 7), (2, 8)]
    assert not model.generate(prompt, 1).requires_grad and model.tok_emb.weight.grad is None


def test_batch_rows_do_not_interact():
    model = make_model(2, seed=5)
    idx = tokens(3, 8, seed=6)
    torch.testing.assert_close(model(idx)[1:2], model(idx[1:2]), rtol=1e-12, atol=1e-12)


def test_gqa_model_equals_mha_model_with_shared_key_value_weights():
    gqa, mha = make_model(n_kv_heads=2, seed=7), make_model(n_kv_heads=None, seed=8)
    state = gqa.state_dict()
    hd = 4
    for key, value in list(state.items()):  # KV head j serves query heads 2j and 2j + 1
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    idx = tokens(2, 10, seed=9)
    torch.testing.assert_close(gqa(idx), mha(idx), rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in mha.parameters())


# ---------------------------------------------------------------- limits and bad inputs


def test_max_len_counts_cached_positions():
    model = make_model(max_len=6)
    model(tokens(1, 6))  # exactly max_len is fine
    with pytest.raises(ValueError, match="exceeds max_len=6"):
        model(tokens(1, 7))
    cache = model.new_cache()
    model(tokens(1, 4), kv_cache=cache)
    model(tokens(1, 2), kv_cache=cache)
    with pytest.raises(ValueError, match=r"6 cached \+ 1 new\) exceeds max_len=6"):
        model(tokens(1, 1), kv_cache=cache)
    assert model.generate(tokens(1, 2), 4).shape == (1, 6)
    with pytest.raises(ValueError, match="exceeds max_len=6"):
        model.generate(tokens(1, 2), 5)
    assert torch.equal(model.generate(tokens(1, 6), 0), tokens(1, 6))


BAD_CALLS = {
    "float idx": (lambda m: m(torch.zeros(1, 3)), TypeError, "torch.long"),
    "list idx": (lambda m: m([[1, 2]]), TypeError, "torch.Tensor"),
    "1-D idx": (lambda m: m(torch.tensor([1, 2])), ValueError, r"\(B, T\)"),
    "empty idx": (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), ValueError, r"T >= 1"),
    "token id too big": (lambda m: m(torch.tensor([[VOCAB]])), ValueError, "vocab_size=11"),
    "negative token id": (lambda m: m(torch.tensor([[-1]])), ValueError, "vocab_size=11"),
    "cache not a list": (lambda m: m(tokens(1, 2), kv_cache=attnlib.KVCache()), TypeError,
                         "list of KVCache"),
    "cache per layer": (lambda m: m(tokens(1, 2), kv_cache=[attnlib.KVCache()]), ValueError,
                        "one KVCache per block: 2, got 1"),
    "negative new tokens": (lambda m: m.generate(tokens(1, 2), -1), ValueError, ">= 0"),
    "float new tokens": (lambda m: m.generate(tokens(1, 2), 2.0), TypeError, "must be an int"),
    "d_model % n_heads": (lambda m: TinyGPT(VOCAB, 10, 4, 2, 8), ValueError,
                          r"d_model \(10\) must be divisible by n_heads \(4\)"),
    "odd head_dim": (lambda m: TransformerBlock(12, 4), ValueError, "head_dim .* must be even"),
    "n_heads % n_kv_heads": (lambda m: TransformerBlock(16, 4, 3), ValueError,
                             r"multiple of n_kv_heads \(3\)"),
    "vocab_size 0": (lambda m: TinyGPT(0, 16, 4, 2, 8), ValueError, "vocab_size must be >= 1"),
    "n_layers float": (lambda m: TinyGPT(VOCAB, 16, 4, 2.0, 8), TypeError, "n_layers must be an int"),
    "max_len 0": (lambda m: TinyGPT(VOCAB, 16, 4, 2, 0), ValueError, "max_len must be >= 1"),
    "d_ff 0": (lambda m: TransformerBlock(16, 4, d_ff=0), ValueError, "d_ff must be >= 1"),
    "block x width": (lambda m: m.blocks[0](randn(1, 3, 8)), ValueError, r"d_model=16"),
    "block x ints": (lambda m: m.blocks[0](torch.ones(1, 3, 16, dtype=torch.long)), TypeError,
                     "floating-point"),
    "norm width": (lambda m: RMSNorm(8)(torch.ones(2, 4)), ValueError, r"d_model=8"),
    "norm eps": (lambda m: RMSNorm(8, eps=-1.0), ValueError, "eps"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_inputs_give_clear_errors(case):
    call, error, message = BAD_CALLS[case]
    model = make_model()
    with pytest.raises(error, match=message):
        call(model)


# ---------------------------------------------------------------- trainability


def test_a_few_adam_steps_lower_the_loss_on_a_copying_batch():
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=8, d_model=32, n_heads=4, n_layers=2, max_len=16, n_kv_heads=2)
    half = torch.randint(0, 8, (8, 6))
    batch = torch.cat([half, half], dim=1)  # (8, 12): the second half copies the first
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def loss_fn():
        return F.cross_entropy(model(inputs).reshape(-1, 8), targets.reshape(-1))

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = loss_fn()
    assert abs(first.item() - math.log(8)) < 0.05  # small init: near-uniform predictions
    first.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.6 * first.item()


# --- sliding windows, sinks and the rolling cache (chapter 12) ------------------------------

@settings(max_examples=20, deadline=None)
@given(window=st.integers(1, 12), n_sink=st.integers(0, 5), T=st.integers(1, 20),
       n_kv_heads=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_rolling_cache_decoding_equals_the_sink_window_mask(window, n_sink, T, n_kv_heads, seed):
    torch.manual_seed(seed)
    model = TinyGPT(19, 16, 4, 2, 24, n_kv_heads=n_kv_heads).double()
    idx = torch.randint(0, 19, (2, T))
    full = model(idx, attn_mask=attnlib.sink_window_mask(T, window, n_sink))  # (B, T, vocab)
    caches = [attnlib.RollingKVCache(window, n_sink) for _ in model.blocks]
    steps = torch.cat([model(idx[:, t:t + 1], kv_cache=caches) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-12)
    assert caches[0].seq_len == T
    assert caches[0].key.size(-2) == n_sink + window  # fixed, however long the sequence


def test_rolling_cache_keeps_the_sinks_and_the_last_window_tokens():
    cache = attnlib.RollingKVCache(window=3, n_sink=2)
    for t in range(9):  # token t's key holds the number t
        k, v = cache.update(torch.full((1, 1, 1, 1), float(t)), torch.full((1, 1, 1, 1), -t))
    assert sorted(k.flatten().tolist()) == [0.0, 1.0, 6.0, 7.0, 8.0]
    assert sorted(v.flatten().tolist()) == [-8, -7, -6, -1, 0]
    assert [cache.slot(t) for t in range(9)] == [0, 1, 2, 3, 4, 2, 3, 4, 2]
    cache.reset()
    assert cache.seq_len == 0 and cache.key is None


def test_rolling_cache_is_a_plain_window_without_sinks_and_full_before_it_wraps():
    cache = attnlib.RollingKVCache(window=4)
    sizes = [cache.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))[0].size(-2)
             for _ in range(7)]
    assert sizes == [1, 2, 3, 4, 4, 4, 4]


@pytest.mark.parametrize("bad, error, match", [
    (lambda c: c.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)), ValueError, "one token per update"),
    (lambda c: (c.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4)),
                c.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))), ValueError, "do not fit"),
    (lambda c: attnlib.RollingKVCache(0), ValueError, "window must be >= 1"),
    (lambda c: attnlib.RollingKVCache(2, -1), ValueError, "n_sink must be >= 0"),
])
def test_rolling_cache_bad_inputs(bad, error, match):
    with pytest.raises(error, match=match):
        bad(attnlib.RollingKVCache(4, 1))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("float_mask", [False, True])
def test_block_attn_mask_is_applied_on_top_of_the_causal_rule(fused, float_mask):
    torch.manual_seed(3)
    block = TransformerBlock(16, 4, 2, fused=fused).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    allowed = torch.rand(9, 9) < 0.6
    allowed.fill_diagonal_(True)
    mask = torch.zeros(9, 9, dtype=torch.float64).masked_fill(~allowed, -math.inf) if float_mask else allowed
    h = block.norm1(x)
    attn = block.attn(h, attn_mask=allowed & torch.ones(9, 9, dtype=torch.bool).tril())  # no is_causal
    expected = x + attn
    expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(block(x, attn_mask=mask), expected, rtol=0, atol=1e-12)


def test_model_attn_mask_reaches_every_block():
    torch.manual_seed(4)
    model = TinyGPT(11, 16, 2, 3, 12).double()
    idx = torch.randint(0, 11, (1, 12))
    window = attnlib.sink_window_mask(12, 3, 0)
    x = model.tok_emb(idx)
    for block in model.blocks:
        x = block(x, attn_mask=window)
    torch.testing.assert_close(model(idx, attn_mask=window), model.lm_head(model.norm(x)))
    assert not torch.allclose(model(idx, attn_mask=window), model(idx))
    # a window as wide as the sequence is the causal mask
    torch.testing.assert_close(model(idx, attn_mask=attnlib.sink_window_mask(12, 12, 0)), model(idx))
