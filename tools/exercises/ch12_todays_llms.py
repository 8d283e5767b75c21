"""Chapter 12's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/12_todays_llms/`` and ``notebooks/12_todays_llms/`` from
this file (see ``tools/exercises/__init__.py``); the cases and named mistakes that grade the
notebook are in the package ``attnlib/grading/exercises/ch12_todays_llms/``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable

import matplotlib.pyplot as plt
import torch
from torch import Tensor

import attnlib
from attnlib import KVCache

from . import Exercise

INTRO = """\
You assemble the attention of a modern decoder-only LLM from the parts of the course: the
pre-norm block that wraps attention and an MLP in residual connections, a paged KV cache
that keeps keys and values in fixed-size blocks, the absorbed inference path of multi-head
latent attention, the sliding-window mask with attention sinks, and greedy generation through
a KV cache with a small GPT built from your block."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = """\
import time  # for the explore cell of generate
from collections.abc import Hashable  # for PagedKVCache's annotations

from attnlib import KVCache, MultiHeadAttention, RMSNorm, SwiGLU  # the parts the classes below are built from
from attnlib._validate import check_positive_int, check_tensor  # used by the constructors and checks
from attnlib.paged import _check_hashable  # used by PagedKVCache's checks of seq_id"""


# TransformerBlock.forward -------------------------------------------------------------

class TransformerBlock(attnlib.TransformerBlock):
    def forward(self, x: Tensor, kv_cache: KVCache | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        h = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=True, kv_cache=kv_cache)  # (B, T, d_model)
        x = x + h  # the residual stream itself is never normalised
        return x + self.mlp(self.norm2(x))  # (B, T, d_model)


# Slow: normalises and runs the MLP token by token (a loop over the positions); the attention
# mixes the tokens, so it runs once on the whole chunk, through the cache.
class SlowTransformerBlock(attnlib.TransformerBlock):
    def forward(self, x: Tensor, kv_cache: KVCache | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        normed = torch.stack([self.norm1(x[:, t]) for t in range(T)], dim=1)  # (B, T, d_model)
        x = x + self.attn(normed, attn_mask=attn_mask, is_causal=True, kv_cache=kv_cache)
        out = []
        for t in range(T):  # token t's MLP, on its own
            out.append(x[:, t] + self.mlp(self.norm2(x[:, t])))  # (B, d_model)
        return torch.stack(out, dim=1)  # (B, T, d_model)


def explore_transformerblock() -> None:
    """Your block beside attnlib's with the same weights, and decoding token by token through a
    KV cache, which must reproduce the full causal pass."""
    torch.manual_seed(0)
    ref = attnlib.TransformerBlock(32, 4, n_kv_heads=2).double()
    mine = TransformerBlock(32, 4, n_kv_heads=2).double()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        full = mine(x)
        print("largest difference from attnlib:", (full - ref(x)).abs().max().item())
        cache = attnlib.KVCache()
        steps = torch.cat([mine(x[:, t:t + 1], kv_cache=cache) for t in range(10)], dim=1)
    print("token by token == one causal pass:", torch.allclose(steps, full, atol=1e-12))
    print("the block adds to its input; relative size of the change:",
          round(((full - x).norm() / x.norm()).item(), 3))


# PagedKVCache.append and PagedKVCache.gather --------------------------------------------

class PagedKVCache(attnlib.PagedKVCache):
    def append(self, seq_id: Hashable, k: Tensor, v: Tensor) -> None:
        T = k.size(1)
        table = self._tables.get(seq_id, [])
        start = self._lengths.get(seq_id, 0)
        needed = -(-(start + T) // self.block_size) - len(table)  # ceil((start + T) / block_size) in all
        if needed > len(self._free):  # all or nothing: check before changing anything
            raise RuntimeError(f"PagedKVCache is out of blocks: {needed} needed, {len(self._free)} free")
        table = table + [self._free.pop() for _ in range(needed)]  # from the top of the stack
        self._tables[seq_id], self._lengths[seq_id] = table, start + T
        pos = torch.arange(start, start + T)  # (T,): the positions of the new tokens
        block = torch.tensor(table, dtype=torch.long)[pos // self.block_size]  # (T,)
        slot = pos % self.block_size  # (T,)
        self.k_blocks[block, :, slot] = k.detach().transpose(0, 1)  # (T, n_kv_heads, head_dim)
        self.v_blocks[block, :, slot] = v.detach().transpose(0, 1)

    def gather(self, seq_id: Hashable) -> tuple[Tensor, Tensor]:
        table = torch.tensor(self.block_table(seq_id), dtype=torch.long)  # (n_used,)
        length = self.seq_len(seq_id)
        out = []
        for blocks in (self.k_blocks, self.v_blocks):
            x = blocks[table]  # (n_used, n_kv_heads, block_size, head_dim), a copy, in table order
            x = x.transpose(0, 1).reshape(self.n_kv_heads, -1, self.head_dim)  # (H_kv, n_used * block_size, D)
            out.append(x[:, :length])  # the unused end of the last block trimmed
        return out[0], out[1]


# Slow: counts the blocks and writes the tokens one at a time (loops over the positions and the
# heads); gathers token by token.
class SlowPagedKVCache(attnlib.PagedKVCache):
    def append(self, seq_id: Hashable, k: Tensor, v: Tensor) -> None:
        T = k.size(1)
        table = list(self._tables.get(seq_id, []))
        length = self._lengths.get(seq_id, 0)
        needed = 0
        for pos in range(length, length + T):  # a new block for each block boundary reached
            if pos // self.block_size >= len(table) + needed:
                needed += 1
        if needed > len(self._free):  # before writing anything
            raise RuntimeError(f"PagedKVCache is out of blocks: {needed} needed, {len(self._free)} free")
        for _ in range(needed):
            table.append(self._free.pop())
        self._tables[seq_id] = table  # starts the sequence if it is new, even with T = 0
        for t in range(T):
            pos = length + t
            block, slot = table[pos // self.block_size], pos % self.block_size
            for h in range(self.n_kv_heads):
                self.k_blocks[block, h, slot] = k[h, t]
                self.v_blocks[block, h, slot] = v[h, t]
        self._lengths[seq_id] = length + T

    def gather(self, seq_id: Hashable) -> tuple[Tensor, Tensor]:
        table = self.block_table(seq_id)
        length = self.seq_len(seq_id)
        k = self.k_blocks.new_empty(self.n_kv_heads, length, self.head_dim)
        v = self.v_blocks.new_empty(self.n_kv_heads, length, self.head_dim)
        for t in range(length):  # token t: block table[t // block_size], slot t % block_size
            block, slot = table[t // self.block_size], t % self.block_size
            k[:, t] = self.k_blocks[block, :, slot]
            v[:, t] = self.v_blocks[block, :, slot]
        return k, v


def explore_pagedkvcache() -> None:
    """Four sequences share one pool of blocks: their block tables, a freed block reused, and
    the memory paging saves over preallocating max_len slots per sequence."""
    cache = PagedKVCache(n_blocks=8, block_size=4, n_kv_heads=1, head_dim=2)
    for seq_id, T in (("a", 5), ("b", 3), ("a", 4), ("c", 6)):
        cache.append(seq_id, torch.randn(1, T, 2), torch.randn(1, T, 2))
    for seq_id in ("a", "b", "c"):
        k, v = cache.gather(seq_id)
        print(f"{seq_id}: {cache.seq_len(seq_id)} tokens in blocks {cache.block_table(seq_id)}, "
              f"gathered keys {tuple(k.shape)}")
    cache.free("b")
    cache.append("d", torch.randn(1, 2, 2), torch.randn(1, 2, 2))
    print(f"after free('b'), d gets block {cache.block_table('d')} ({cache.n_free_blocks} blocks free)")
    contiguous, paged = attnlib.kv_memory_waste([9, 3, 6, 2], block_size=4, max_len=64)
    print(f"slots wasted for lengths 9, 3, 6, 2 with max_len 64: contiguous {contiguous}, paged {paged}")


# mla_absorbed_attention ---------------------------------------------------------------

def mla_absorbed_attention(q: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor,
                           w_uk: Tensor, w_uv: Tensor, is_causal: bool = True,
                           scale: float | None = None) -> Tensor:
    B, H, T, D = q.shape
    S, R = c_kv.size(1), c_kv.size(2)
    if scale is None:
        scale = 1.0 / math.sqrt(D + q_rope.size(-1))  # a head's score width, not the latent's
    w_uk = w_uk.view(H, D, R)  # (H, head_dim, kv_rank): W^UK_h
    w_uv = w_uv.view(H, D, R)  # (H, head_dim, kv_rank): W^UV_h
    q_latent = torch.einsum("bhtd,hdr->bhtr", q, w_uk)  # (B, H, T, kv_rank): W^UK absorbed into the query
    scores = q_latent @ c_kv[:, None].transpose(-2, -1)  # (B, H, T, S), against the latents themselves
    scores = (scores + q_rope @ k_rope[:, None].transpose(-2, -1)) * scale  # + the shared rope key
    if is_causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # (T, S), top-left
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # (B, H, T, S)
    o_latent = weights @ c_kv[:, None]  # (B, H, T, kv_rank): the weights average the latents
    return torch.einsum("bhtr,hdr->bhtd", o_latent, w_uv)  # (B, H, T, head_dim): W^UV once per query


# Slow: loops over the heads, the batch, the queries and the keys; one latent query, one score
# and one weighted latent at a time.
def slow_mla_absorbed_attention(q: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor,
                                w_uk: Tensor, w_uv: Tensor, is_causal: bool = True,
                                scale: float | None = None) -> Tensor:
    B, H, T, D = q.shape
    S, R = c_kv.size(1), c_kv.size(2)
    if scale is None:
        scale = 1.0 / math.sqrt(D + q_rope.size(-1))
    out = q.new_zeros(B, H, T, D)
    for h in range(H):
        w_k = w_uk[h * D:(h + 1) * D]  # (head_dim, kv_rank): W^UK_h
        w_v = w_uv[h * D:(h + 1) * D]  # (head_dim, kv_rank): W^UV_h
        for b in range(B):
            for i in range(T):
                q_latent = q[b, h, i] @ w_k  # (kv_rank,)
                seen = min(i + 1, S) if is_causal else S  # keys 0 .. seen - 1
                scores = q.new_empty(seen)
                for j in range(seen):
                    scores[j] = (q_latent @ c_kv[b, j] + q_rope[b, h, i] @ k_rope[b, j]) * scale
                e = torch.exp(scores - scores.max())
                weights = e / e.sum()
                o_latent = c_kv.new_zeros(R)
                for j in range(seen):
                    o_latent = o_latent + weights[j] * c_kv[b, j]
                out[b, h, i] = w_v @ o_latent  # (head_dim,)
    return out


def explore_mla_absorbed_attention() -> None:
    """Your absorbed attention inside attnlib's MLA layer, against the layer's naive path that
    rebuilds every head's keys and values, and what each token costs in the cache."""
    torch.manual_seed(0)
    H, D, R, r = 8, 16, 32, 8
    mla = attnlib.MultiHeadLatentAttention(64, H, D, R, rope_dim=r).double()
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    B, T, _ = x.shape
    with torch.no_grad():
        c_kv, k_rope = mla.latent_cache(x)  # what a cache keeps: (B, T, kv_rank), (B, T, rope_dim)
        q = mla.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, head_dim)
        q_rope = attnlib.apply_rope(mla.q_rope(x).view(B, T, H, r).transpose(1, 2), None, mla.rope_base)
        y = mla_absorbed_attention(q, q_rope, c_kv, k_rope, mla.k_up.weight, mla.v_up.weight)
        out = mla.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
        naive = mla(x, absorb=False)
    print("largest difference from the naive path:", (out - naive).abs().max().item())
    print(f"numbers cached per token and layer: MLA {R + r}, MHA with the same heads {2 * H * D}")


# sink_window_mask ---------------------------------------------------------------------

def sink_window_mask(L: int, window: int, n_sink: int, S: int | None = None) -> Tensor:
    if S is None:
        S = L
    i = torch.arange(L)[:, None]  # (L, 1): query positions
    j = torch.arange(S)[None, :]  # (1, S): key positions
    recent = (j <= i) & (i - j < window)  # the window most recent keys, itself included
    sinks = (j < n_sink) & (j <= i)  # the first n_sink keys, unless in the future
    return recent | sinks  # (L, S) bool


# Slow: loops over the queries i and the keys j, one entry at a time.
def slow_sink_window_mask(L: int, window: int, n_sink: int, S: int | None = None) -> Tensor:
    if S is None:
        S = L
    mask = torch.zeros(L, S, dtype=torch.bool)
    for i in range(L):
        for j in range(S):
            if j <= i and (i - j < window or j < n_sink):
                mask[i, j] = True
    return mask


def explore_sink_window_mask() -> None:
    """A window of 4 tokens with 2 sinks over 12 tokens, yours beside attnlib's."""
    mine, ref = sink_window_mask(12, 4, 2), attnlib.sink_window_mask(12, 4, 2)
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
    axes[0].imshow(mine.numpy())
    axes[0].set_title("sink_window_mask(12, 4, 2)")
    axes[1].imshow(ref.numpy())
    axes[1].set_title("attnlib's")
    plt.show()
    print("equal to attnlib's:", torch.equal(mine, ref))
    print("keys each query sees:", mine.sum(-1).tolist())


# TinyGPT.generate ---------------------------------------------------------------------

class TinyGPT(attnlib.TinyGPT):
    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, use_cache: bool = True) -> Tensor:
        if max_new_tokens == 0:
            return idx
        caches = self.new_cache() if use_cache else None  # one KVCache per block
        logits = self(idx, kv_cache=caches)  # (B, T, vocab_size): the prefill
        for step in range(max_new_tokens):
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1): greedy
            idx = torch.cat([idx, next_token], dim=1)  # (B, T + step + 1)
            if step + 1 < max_new_tokens:  # the last new token needs no forward pass
                logits = self(next_token, kv_cache=caches) if use_cache else self(idx)
        return idx


# Slow: keeps the sequences as Python lists and picks each sequence's most likely token with a
# loop over the vocabulary (the first maximum, as argmax); the same forward passes as above.
class SlowTinyGPT(attnlib.TinyGPT):
    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, use_cache: bool = True) -> Tensor:
        caches = self.new_cache() if use_cache else None
        rows = idx.tolist()  # B lists of token ids
        for step in range(max_new_tokens):
            if step == 0 or not use_cache:  # the prefill, or the whole sequence without a cache
                fed = torch.tensor(rows, dtype=idx.dtype, device=idx.device)
            else:  # only the token added last; the caches hold the others
                fed = torch.tensor([[row[-1]] for row in rows], dtype=idx.dtype, device=idx.device)
            logits = self(fed, kv_cache=caches)  # (B, T_fed, vocab_size)
            for b in range(len(rows)):
                scores = logits[b, -1]
                best = 0
                for token in range(1, scores.size(0)):
                    if scores[token] > scores[best]:
                        best = token
                rows[b].append(best)
        return torch.tensor(rows, dtype=idx.dtype, device=idx.device)


def explore_tinygpt_generate() -> None:
    """Greedy generation by an untrained TinyGPT built from your blocks, with and without the
    KV cache: the same tokens, and the time each takes."""
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=64, d_model=64, n_heads=4, n_layers=2, max_len=128, n_kv_heads=2).eval()
    prompt = torch.randint(0, 64, (1, 8))
    outputs = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        outputs[use_cache] = model.generate(prompt, 60, use_cache=use_cache)
        print(f"use_cache={use_cache}: 60 tokens in {time.perf_counter() - start:.3f} s")
    ref = attnlib.TinyGPT(vocab_size=64, d_model=64, n_heads=4, n_layers=2, max_len=128, n_kv_heads=2).eval()
    ref.load_state_dict(model.state_dict())
    print("its blocks are your TransformerBlock:", type(model.blocks[0]).__name__ == TransformerBlock.__name__)
    print("the same tokens:", torch.equal(outputs[True], outputs[False]))
    print("the same as attnlib's:", torch.equal(outputs[True], ref.generate(prompt, 60)))


EXERCISES = [
    Exercise(
        "TransformerBlock.forward",
        points=4,
        solution=TransformerBlock,
        guide="""\
One decoder block of today's LLMs (section *A pre-norm decoder block*). The constructor is
written for you: `self.norm1` and `self.norm2` are RMSNorms, `self.attn` is the course's
`MultiHeadAttention` (GQA and RoPE, Chapters 6 and 7) and `self.mlp` a SwiGLU MLP. Write
`forward` with these submodules, pre-norm: normalise the input of each sublayer, and add the
sublayer's output to the residual stream `x`, which itself is never normalised:
`x + attn(norm1(x))`, then `+ mlp(norm2(x))`.

The attention is causal. `attn_mask` narrows it further (a sliding window: section *Sliding
windows and attention sinks*) and goes to `self.attn` together with the causal rule. With a
`kv_cache`, `x` holds only the new tokens (section *Generation with a KV cache*): hand the
cache to `self.attn`, which appends their keys and values and attends over every cached
position. The grader loads weights into the submodules (the two norms have different ones),
and decodes some sequences chunk by chunk through a fresh `attnlib.KVCache`, comparing every
chunk's output with the reference.""",
        hints=(
            "`self.attn(h, attn_mask=attn_mask, is_causal=True, kv_cache=kv_cache)`: the keyword names of `MultiHeadAttention.forward`.",
            "Two residual additions, one per sublayer; `norm1` before the attention, `norm2` before the MLP.",
            "`attnlib.TransformerBlock` itself is off limits; the submodules are yours to use.",
        ),
        explore=explore_transformerblock,
        slow=SlowTransformerBlock,
    ),
    Exercise(
        "PagedKVCache.append",
        points=4,
        solution=PagedKVCache,
        guide="""\
A paged KV cache keeps every sequence's keys and values in fixed-size blocks of one shared
pool (section *Paged KV cache: blocks and a block table*). The constructor and the small
methods are written for you: `self.k_blocks` and `self.v_blocks` are the pool, `(n_blocks,
n_kv_heads, block_size, head_dim)`; `self._tables[seq_id]` is a sequence's block table (its
block ids, in token order), `self._lengths[seq_id]` its number of tokens, and `self._free` the
free list, a stack: `self._free.pop()` hands out the next block, and `free` pushes a finished
sequence's blocks back so that the first of them is reused first. Two methods are yours,
each graded on its own.

**`append`** stores `T` new tokens at the end of a sequence, starting it if it is new (even
with `T = 0`). Token `t` of a sequence lives in block `table[t // block_size]` at slot
`t % block_size`; a chunk may cross one block boundary or several. If the free list cannot
cover the blocks the chunk needs, raise `RuntimeError` and change nothing.

**`gather`** returns all keys and values of a sequence, each `(n_kv_heads, seq_len,
head_dim)`: its blocks in block-table order, the unused end of the last one trimmed, as new
tensors (not views of the pool).

The test cell `PagedKVCache.append` drives your cache through schedules of appends to
several sequences (with a `free`, the reuse of its blocks, and running out of blocks) and
compares, after every step, the block tables, lengths, free blocks and the pool's used slots
with the reference's. The test cell `PagedKVCache` grades `gather`, on caches filled by the
reference after every step of the same schedules, so each method is graded on its own; but
each of its cases starts with one call of your `append`, so write that one first.""",
        hints=(
            "Blocks needed: `ceil((length + T) / block_size) - len(table)`, with integers: `-(-(length + T) // block_size)`.",
            "Check that enough blocks are free before you change anything (the table, the length, the pool).",
            "Write all new tokens at once: their positions `torch.arange(length, length + T)` give the blocks and slots, and `self.k_blocks[block, :, slot] = k.transpose(0, 1)` fills them (one row per token).",
            "`gather`: `self.k_blocks[torch.tensor(table)]` is `(n_used, n_kv_heads, block_size, head_dim)`; move the head axis first, merge the block and slot axes, trim to `seq_len`.",
            "`attnlib.PagedKVCache` itself is off limits.",
        ),
        explore=explore_pagedkvcache,
        slow=SlowPagedKVCache,
    ),
    Exercise(
        "PagedKVCache",  # grades gather: its cases call append once (see the grading module)
        points=3,
        solution=PagedKVCache,
        slow=SlowPagedKVCache,
    ),
    Exercise(
        "mla_absorbed_attention",
        points=4,
        solution=mla_absorbed_attention,
        guide="""\
Multi-head latent attention caches one small latent `c_kv` per token instead of every head's
key and value (section *Latent attention and weight absorption*). Head `h` would rebuild its
keys `c_kv W^UK_h^T` and values `c_kv W^UV_h^T`; at inference neither is built: move `W^UK_h`
into the query, `q_h W^UK_h` (`kv_rank` numbers), score that against `c_kv` directly, add the
decoupled RoPE part `q_rope . k_rope` (one rope key shared by every head), scale, mask,
softmax, average the latents with the weights, and only then apply `W^UV_h`. Head `h`'s
`W^UK_h` is rows `h * head_dim .. (h + 1) * head_dim - 1` of `w_uk`. The default scale is the
naive path's, `1 / sqrt(head_dim + rope_dim)`; `is_causal` is top-left as in the course.

The grader compares the values with the reference, and on the cases marked so it watches the
tensors your function builds: one with an axis of the `S` cached tokens and one of
`head_dim` (or `n_heads * head_dim`) means per-head keys or values were rebuilt, and fails
the case.""",
        hints=(
            "`w_uk.view(n_heads, head_dim, kv_rank)`, then `torch.einsum(\"bhtd,hdr->bhtr\", q, w_uk)` is the absorbed query.",
            "`c_kv[:, None]` is `(B, 1, S, kv_rank)`: one key/value \"head\" that broadcasts over all query heads, as in MQA.",
            "The weights times the latents give `(B, H, T, kv_rank)`; `torch.einsum(\"bhtr,hdr->bhtd\", ..., w_uv)` finishes each head.",
            "`torch.softmax` and attnlib's `scaled_dot_product_attention` (Chapter 2) are allowed for the attention over the latents; attnlib's MLA and PyTorch's fused `F.scaled_dot_product_attention` are not.",
        ),
        explore=explore_mla_absorbed_attention,
        slow=slow_mla_absorbed_attention,
    ),
    Exercise(
        "sink_window_mask",
        points=2,
        solution=sink_window_mask,
        guide="""\
Build the `(L, S)` boolean mask of sliding-window attention with attention sinks (section
*Sliding windows and attention sinks*): query `i` may attend to key `j` when `j <= i` and
either `j` is one of the `window` most recent keys, itself included (`i - j < window`), or
one of the first `n_sink` keys of the sequence. It is aligned top-left, as `causal_mask`:
query `i` is at position `i` whatever `S` is (`S=None` means `S = L`).""",
        hints=(
            "A column of query positions and a row of key positions broadcast to `(L, S)`, as for the causal mask of Chapter 5.",
            "The causal rule `j <= i` holds for the sinks too.",
            "Check `L = 0`, `S = 0`, `window >= S` and `n_sink > L`.",
        ),
        explore=explore_sink_window_mask,
        slow=slow_sink_window_mask,
    ),
    Exercise(
        "TinyGPT.generate",
        points=3,
        solution=TinyGPT,
        guide="""\
`TinyGPT` stacks blocks of the first exercise (yours: write that one first) between a token
embedding and an output head; its `forward` gives the next-token logits at every position.
Write `generate`, greedy decoding (section *Generation with a KV cache*): append the most
likely next token `max_new_tokens` times and return the prompt followed by the new tokens.
With `use_cache=True`, make one `KVCache` per block (`self.new_cache()`), run the prompt
through them once (the prefill), then feed each new token alone with the same caches; with
`use_cache=False`, run the whole sequence at every step. Both give the same tokens. The
grader counts the forward passes: the prompt, then one per new token but the last (it needs
no forward pass), through the caches when `use_cache=True`, without them otherwise.""",
        hints=(
            "`logits[:, -1]` scores the token after the last position; `argmax(dim=-1, keepdim=True)` gives `(B, 1)`.",
            "`self(next_token, kv_cache=caches)`: the caches already hold every earlier token.",
            "`max_new_tokens = 0` returns the prompt; `T + max_new_tokens` may reach `max_len`, so run no forward pass you do not need.",
            "`attnlib.TinyGPT` itself is off limits.",
        ),
        explore=explore_tinygpt_generate,
        slow=SlowTinyGPT,
    ),
]
