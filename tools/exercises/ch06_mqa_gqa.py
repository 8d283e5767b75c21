"""Chapter 6's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/06_mqa_gqa/`` and ``notebooks/06_mqa_gqa/`` from this
file (see ``tools/exercises/__init__.py``); the cases and named mistakes that grade the
notebook are in ``attnlib/grading/exercises/ch06_mqa_gqa.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import attnlib

from . import Exercise, ch04_multi_head

INTRO = """\
You write the pieces of decoding with shared keys and values: the head mapping of
grouped-query attention, the memory a KV cache takes, the cache itself, and the attention
layer that puts them together, with fewer key/value heads than query heads."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = "from attnlib._validate import check_positive_int  # used by MultiHeadAttention's constructor"


# repeat_kv ----------------------------------------------------------------------------

def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return x
    return torch.repeat_interleave(x, n_rep, dim=-3)  # (..., n_kv_heads * n_rep, S, head_dim)


# Slow: loops over the KV heads and their n_rep copies, copying one head at a time.
def slow_repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    *lead, n_kv, S, D = x.shape
    out = x.new_empty(*lead, n_kv * n_rep, S, D)  # (..., n_kv_heads * n_rep, S, head_dim)
    for g in range(n_kv):  # KV head g
        for r in range(n_rep):  # becomes heads g * n_rep .. g * n_rep + n_rep - 1
            out[..., g * n_rep + r, :, :] = x[..., g, :, :]
    return out


# kv_cache_bytes -----------------------------------------------------------------------

def kv_cache_bytes(
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    seq_len: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float16,
) -> int:
    bytes_per_element = dtype.itemsize
    return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch * bytes_per_element


# Slow: a formula with nothing to vectorise; written the long way, a loop over the layers and,
# in each, over the two cached tensors (keys, values), adding up each tensor's bytes.
def slow_kv_cache_bytes(
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    seq_len: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float16,
) -> int:
    total = 0
    for layer in range(n_layers):
        for tensor in ("keys", "values"):  # (batch, n_kv_heads, seq_len, head_dim) each
            total += batch * n_kv_heads * seq_len * head_dim * dtype.itemsize
    return total


def explore_kv_cache_bytes() -> None:
    """The cache of a Llama-2-7B-sized model at 4096 tokens, MHA against GQA and MQA."""
    for name, kv_heads in (("MHA", 32), ("GQA-8", 8), ("MQA", 1)):
        gib = kv_cache_bytes(32, kv_heads, 128, 4096) / 2**30
        print(f"{name:6s} {gib:6.3f} GiB   (attnlib: {attnlib.kv_cache_bytes(32, kv_heads, 128, 4096) / 2**30:.3f})")


# KVCache.update -----------------------------------------------------------------------

class KVCache(attnlib.KVCache):
    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.key is None or self.value is None:
            self.key, self.value = key, value
        else:
            self.key = torch.cat([self.key, key], dim=-2)  # (B, H_kv, S + S_new, D)
            self.value = torch.cat([self.value, value], dim=-2)
        return self.key, self.value


# Slow: loops over the new positions, appending them to the cache one at a time.
class SlowKVCache(attnlib.KVCache):
    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.key is None or self.value is None:  # empty: start from zero positions
            self.key, self.value = key[..., :0, :], value[..., :0, :]
        for t in range(key.size(-2)):  # new position t
            self.key = torch.cat([self.key, key[..., t:t + 1, :]], dim=-2)  # (B, H_kv, S + 1, D)
            self.value = torch.cat([self.value, value[..., t:t + 1, :]], dim=-2)
        return self.key, self.value


def explore_kvcache_update() -> None:
    """Decoding token by token fills the cache one position at a time."""
    cache = KVCache()
    sizes = []
    for step in range(5):
        k, v = cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
        sizes.append(k.size(-2))
    print("cached positions after each step:", sizes, "(expected [1, 2, 3, 4, 5])")


# MultiHeadAttention -------------------------------------------------------------------

class MultiHeadAttention(attnlib.MultiHeadAttention):
    forward = ch04_multi_head.MultiHeadAttention.forward  # the solution of chapter 4 serves here too


# Slow: splits and merges the heads one at a time, and attends with loops over the batch, the
# query heads (each reading KV head h // n_rep, no repeat) and the query rows; a row's scores
# and its weighted sum of values are loops over the key positions. RoPE loops over positions.
class SlowMultiHeadAttention(attnlib.MultiHeadAttention):
    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        source = x if context is None else context
        B, L, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q_all, k_all, v_all = self.q_proj(x), self.k_proj(source), self.v_proj(source)
        # head h is the h-th block of D channels
        q = torch.stack([q_all[:, :, h * D:(h + 1) * D] for h in range(H)], dim=1)  # (B, H, L, D)
        k = torch.stack([k_all[:, :, g * D:(g + 1) * D] for g in range(H_kv)], dim=1)  # (B, H_kv, S, D)
        v = torch.stack([v_all[:, :, g * D:(g + 1) * D] for g in range(H_kv)], dim=1)
        offset = 0 if kv_cache is None else kv_cache.seq_len
        if self.rope_base is not None:  # rotate-half RoPE at absolute positions (chapter 7)
            def rope(t: Tensor, first: int) -> Tensor:
                inv_freq = 1.0 / (self.rope_base ** (torch.arange(0, D, 2, device=t.device).float() / D))
                out = torch.empty_like(t)
                for p in range(t.size(-2)):  # position first + p
                    angle = torch.cat((inv_freq, inv_freq)) * float(first + p)  # (D,) float32
                    cos, sin = angle.cos().to(t.dtype), angle.sin().to(t.dtype)
                    row = t[..., p, :]
                    rotated = torch.cat((-row[..., D // 2:], row[..., : D // 2]), dim=-1)
                    out[..., p, :] = row * cos + rotated * sin
                return out
            q = rope(q, offset)
            k = rope(k, offset if context is None else 0)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # every cached position, old ones first
        S = k.size(-2)
        n_rep = H // H_kv
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # as in Chapter 2
        mask = None if attn_mask is None else torch.broadcast_to(attn_mask, (B, H, L, S))
        y = torch.zeros(B, H, L, D, dtype=q.dtype, device=x.device)
        for b in range(B):
            for h in range(H):
                g = h // n_rep  # the KV head that query head h reads
                keys, values = k[b, g].to(work), v[b, g].to(work)  # (S, D)
                for i in range(L):
                    query = q[b, h, i].to(work)  # (D,)
                    scores = torch.zeros(S, dtype=work, device=x.device)
                    for j in range(S):
                        scores[j] = torch.dot(query, keys[j]) / math.sqrt(D)
                    if kv_cache is not None:  # new token i sits at position offset + i
                        scores[offset + i + 1:] = float("-inf")
                    elif is_causal:  # top-left: query i sees keys 0..i
                        scores[i + 1:] = float("-inf")
                    if mask is not None:
                        if mask.dtype == torch.bool:
                            scores = scores.masked_fill(~mask[b, h, i], float("-inf"))
                        else:
                            scores = scores + mask[b, h, i].to(work)
                    peak = scores.max() if S > 0 else torch.tensor(float("-inf"))
                    e = torch.exp(scores - peak) if torch.isfinite(peak) else torch.exp(scores)
                    total = e.sum()
                    weights = e / total if total != 0 else e  # a fully masked row: all weights 0
                    out = torch.zeros(D, dtype=work, device=x.device)
                    for j in range(S):
                        out = out + weights[j] * values[j]
                    y[b, h, i] = out.to(q.dtype)
        merged = torch.cat([y[:, h] for h in range(H)], dim=-1)  # (B, L, H * D)
        return self.o_proj(merged)  # (B, L, d_model)


def explore_multiheadattention() -> None:
    """Your GQA layer beside attnlib's with the same weights, and decoding
    token by token through a cache, which must reproduce the full causal pass.
    """
    torch.manual_seed(0)
    ref = attnlib.MultiHeadAttention(32, 8, n_kv_heads=2).double()
    mine = MultiHeadAttention(32, 8, n_kv_heads=2).double()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        full = mine(x, is_causal=True)
        print("largest difference from attnlib:", (full - ref(x, is_causal=True)).abs().max().item())
        cache = attnlib.KVCache()
        steps = torch.cat([mine(x[:, t:t + 1], is_causal=True, kv_cache=cache) for t in range(10)], dim=1)
    print("token by token == one causal pass:", torch.allclose(steps, full, atol=1e-12))
    print("cached keys:", tuple(cache.key.shape), "= (B, n_kv_heads, S, head_dim)")


EXERCISES = [
    Exercise(
        "repeat_kv",
        points=3,
        solution=repeat_kv,
        guide="""\
Repeat each key/value head `n_rep` times along the head axis (axis -3) so that query head
`h` reads KV head `h // n_rep` (Chapter 6, section *The head mapping: interleave, do not
tile*). With 2 KV heads and `n_rep = 3` the heads come out as `[0, 0, 0, 1, 1, 1]`, not
`[0, 1, 0, 1, 0, 1]`. Any number of leading axes may come before the head axis.""",
        hints=(
            "`torch.repeat_interleave(x, n_rep, dim=-3)` interleaves; `x.repeat(...)` tiles (wrong).",
            "Or without copying first: `x.unsqueeze(-3).expand(...)`, then `reshape`.",
        ),
        slow=slow_repeat_kv,
    ),
    Exercise(
        "kv_cache_bytes",
        points=2,
        solution=kv_cache_bytes,
        guide="""\
Count the bytes of a KV cache (Chapter 6, section *KV-cache sizes of published models*):
keys **and** values, for every layer, every **KV** head (not every query head: that is the
saving of GQA and MQA), every channel of a head, every token and every sequence of the batch,
at `dtype`'s bytes per element. Return a Python `int`.""",
        hints=(
            "`torch.float16.itemsize` is 2.",
            "Do not forget the factor 2 for K and V.",
        ),
        explore=explore_kv_cache_bytes,
        slow=slow_kv_cache_bytes,
    ),
    Exercise(
        "KVCache.update",
        points=3,
        solution=KVCache,
        guide="""\
A `KVCache` holds the keys and values of the tokens decoded so far (Chapter 6, section
*Incremental decoding reproduces the full forward pass*). Write `update`: append the new
positions along the sequence axis (-2), after the old ones, and return **all** cached keys
and values. The first call fills an empty cache; later calls may add one token (decoding),
several (a chunked prefill) or none.""",
        hints=(
            "`self.key is None` means the cache is empty.",
            "`torch.cat([old, new], dim=-2)`; store the result on `self` before returning it.",
        ),
        explore=explore_kvcache_update,
        slow=SlowKVCache,
    ),
    Exercise(
        "MultiHeadAttention",
        points=5,
        solution=MultiHeadAttention,
        guide="""\
Chapter 4's `MultiHeadAttention` again, now with `n_kv_heads` key/value heads for `n_heads`
query heads (Chapter 6, sections *The maths* and *The head mapping: interleave, do not
tile*). `split_heads` and `merge_heads` are written for you; write `forward`. `k_proj` and
`v_proj` produce `n_kv_heads * head_dim` features, so keys and values split into
`n_kv_heads` heads, and query head `h` reads KV head `h // (n_heads // n_kv_heads)`:
`n_kv_heads = 1` is MQA, `n_kv_heads = n_heads` plain MHA.

Everything of Chapter 4 still holds: self- and cross-attention, boolean and float masks,
`is_causal`. New is decoding with a `kv_cache` (Chapter 6, section *Incremental decoding
reproduces the full forward pass*): append the new keys and values with `kv_cache.update`
and attend to every cached position. New token `i` of the chunk sits at position
`kv_cache.seq_len + i` (the length before the update) and sees keys `0 .. seq_len + i`. The
grader decodes sequences chunk by chunk through a fresh `attnlib.KVCache`, compares every
chunk's output with the reference, and checks that the cache keeps `n_kv_heads` heads.
`rope_base` belongs to Chapter 7 and is not graded here.""",
        hints=(
            "Split queries with `self.n_heads` and keys and values with `self.n_kv_heads`.",
            "Repeat each KV head `n_heads // n_kv_heads` times with `repeat_interleave` on the head axis (or your `repeat_kv`), never with `repeat`, and only after `kv_cache.update`: the cache keeps the `n_kv_heads` heads, which is the memory GQA saves.",
            "With a cache the causal mask is aligned bottom-right: `torch.ones(L, offset + L, dtype=torch.bool).tril(offset)`, with `offset` read before the update; it replaces `is_causal`.",
            "attnlib, `F.scaled_dot_product_attention` (its `enable_gqa=True` would do the head mapping for you) and `torch.nn.MultiheadAttention` are off limits: write the attention itself as in Chapters 2 and 3.",
        ),
        explore=explore_multiheadattention,
        slow=SlowMultiHeadAttention,
    ),
]
