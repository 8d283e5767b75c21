"""Chapter 4's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/04_multi_head/`` and ``notebooks/04_multi_head/`` from
this file (see ``tools/exercises/__init__.py``); the cases and named mistakes that grade the
notebook are in ``attnlib/grading/exercises/ch04_multi_head.py``.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor

import attnlib
from attnlib import KVCache  # only for the annotation of forward's kv_cache argument

from . import Exercise

INTRO = """\
You write the three pieces of multi-head attention that are not projections: splitting the
model width into heads, merging them back, and the forward pass that runs attention in
every head at once."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = """\
from attnlib import KVCache  # only for the annotation of forward's kv_cache argument
from attnlib._validate import check_positive_int  # used by the constructor"""


# MultiHeadAttention.split_heads -------------------------------------------------------

class MultiHeadAttention(attnlib.MultiHeadAttention):
    def split_heads(self, x: Tensor, n_heads: int) -> Tensor:
        B, L, _ = x.shape
        return x.reshape(B, L, n_heads, -1).permute(0, 2, 1, 3)  # (B, H, L, head_dim)

    @staticmethod
    def merge_heads(x: Tensor) -> Tensor:
        B, H, L, D = x.shape
        return x.permute(0, 2, 1, 3).reshape(B, L, H * D)  # (B, L, H * head_dim)

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
        q = self.split_heads(self.q_proj(x), self.n_heads)  # (B, H, L, D)
        k = self.split_heads(self.k_proj(source), self.n_kv_heads)  # (B, H_kv, S, D)
        v = self.split_heads(self.v_proj(source), self.n_kv_heads)
        offset = 0 if kv_cache is None else kv_cache.seq_len
        if self.rope_base is not None:  # rotate-half RoPE at absolute positions (chapter 7)
            def rope(t: Tensor, pos: Tensor) -> Tensor:
                D = t.size(-1)
                inv_freq = 1.0 / (self.rope_base ** (torch.arange(0, D, 2, device=t.device).float() / D))
                angle = pos.float()[:, None] * inv_freq  # (L, D/2)
                angle = torch.cat((angle, angle), dim=-1)
                half1, half2 = t[..., : D // 2], t[..., D // 2:]
                return t * angle.cos().to(t.dtype) + torch.cat((-half2, half1), dim=-1) * angle.sin().to(t.dtype)
            q = rope(q, torch.arange(offset, offset + L, device=x.device))
            k_pos = torch.arange(offset, offset + L) if context is None else torch.arange(k.size(-2))
            k = rope(k, k_pos.to(x.device))
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # every cached position, old ones first
            allowed = torch.ones(L, offset + L, dtype=torch.bool, device=x.device).tril(offset)
            if attn_mask is None:
                attn_mask = allowed
            elif attn_mask.dtype == torch.bool:
                attn_mask = allowed & attn_mask
            else:
                attn_mask = attn_mask.to(q.dtype).masked_fill(~allowed, float("-inf"))
            is_causal = False
        n_rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, H, S, D)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        else:
            work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # as in Chapter 2
            scores = q.to(work) @ k.to(work).transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, L, S)
            S = scores.size(-1)
            neg_inf = torch.full_like(scores, float("-inf"))
            if is_causal:
                scores = torch.where(torch.ones(L, S, dtype=torch.bool, device=x.device).tril(), scores, neg_inf)
            if attn_mask is not None:
                scores = torch.where(attn_mask, scores, neg_inf) if attn_mask.dtype == torch.bool \
                    else scores + attn_mask.to(work)
            peak = scores.amax(dim=-1, keepdim=True)
            e = torch.exp(scores - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)))
            total = e.sum(dim=-1, keepdim=True)
            weights = e / torch.where(total == 0, torch.ones_like(total), total)
            y = (weights @ v.to(work)).to(q.dtype)  # (B, H, L, D)
        return self.o_proj(self.merge_heads(y))  # (B, L, d_model)



# MultiHeadAttention.merge_heads -------------------------------------------------------



# MultiHeadAttention.forward -----------------------------------------------------------


def explore_multiheadattention_forward() -> None:
    """Split then merge must give back the input, and the layer must match
    attnlib's with the same weights.
    """
    torch.manual_seed(0)
    ref = attnlib.MultiHeadAttention(16, 4)
    mine = MultiHeadAttention(16, 4)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 16)
    print("merge(split(x)) == x:", torch.equal(mine.merge_heads(mine.split_heads(x, 4)), x))
    with torch.no_grad():
        print("largest difference from attnlib:", (mine(x, is_causal=True) - ref(x, is_causal=True)).abs().max().item())
    heads = mine.split_heads(torch.arange(16.0).expand(1, 1, 16), 4)[0, :, 0]
    plt.imshow(heads.numpy(), cmap="tab20"); plt.xlabel("channel within the head"); plt.ylabel("head")
    plt.title("which model channels each head receives"); plt.colorbar(); plt.show()


# Slow: split_heads and merge_heads copy one head_dim block at a time, in loops over the
# batch, the heads and the positions; forward runs attention in loops over the batch, the
# heads, the query positions and the key positions (one dot product, one mask entry and one
# weighted value at a time). RoPE and the KV cache, which this chapter does not grade, are left out.
class SlowMultiHeadAttention(attnlib.MultiHeadAttention):
    def split_heads(self, x: Tensor, n_heads: int) -> Tensor:
        B, L, d = x.shape
        D = d // n_heads
        out = x.new_zeros(B, n_heads, L, D)
        for b in range(B):
            for h in range(n_heads):
                for t in range(L):
                    out[b, h, t] = x[b, t, h * D:(h + 1) * D]  # head h: the h-th block of D channels
        return out  # (B, H, L, head_dim)

    @staticmethod
    def merge_heads(x: Tensor) -> Tensor:
        B, H, L, D = x.shape
        out = x.new_zeros(B, L, H * D)
        for b in range(B):
            for t in range(L):
                for h in range(H):
                    out[b, t, h * D:(h + 1) * D] = x[b, h, t]
        return out  # (B, L, H * head_dim)

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
        q = self.split_heads(self.q_proj(x), self.n_heads)  # (B, H, L, D)
        k = self.split_heads(self.k_proj(source), self.n_kv_heads)  # (B, H_kv, S, D)
        v = self.split_heads(self.v_proj(source), self.n_kv_heads)
        if self.rope_base is not None or kv_cache is not None:  # what this chapter asks for, no more
            raise NotImplementedError("RoPE (chapter 7) and the KV cache (chapter 6) come later")
        H, S, D = self.n_heads, k.size(-2), q.size(-1)
        n_rep = self.n_heads // self.n_kv_heads
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # as in Chapter 2
        mask = None if attn_mask is None else attn_mask.expand(B, H, L, S)
        y = torch.zeros(B, H, L, D, dtype=work, device=x.device)
        for b in range(B):
            for h in range(H):
                kv = h // n_rep  # the key/value head that query head h reads
                for i in range(L):
                    scores = torch.zeros(S, dtype=work, device=x.device)
                    for j in range(S):
                        s = (q[b, h, i].to(work) * k[b, kv, j].to(work)).sum() / math.sqrt(D)
                        if is_causal and j > i:  # query i sees keys 0..i
                            s = torch.full_like(s, float("-inf"))
                        if mask is not None:
                            if mask.dtype == torch.bool:
                                if not mask[b, h, i, j]:
                                    s = torch.full_like(s, float("-inf"))
                            else:
                                s = s + mask[b, h, i, j].to(work)
                        scores[j] = s
                    peak = scores.max()
                    if not torch.isfinite(peak):  # every key masked: shift by 0
                        peak = torch.zeros_like(peak)
                    e = torch.exp(scores - peak)
                    total = e.sum()
                    if total == 0:  # every key masked: zero weights, not NaN
                        total = torch.ones_like(total)
                    row = torch.zeros(D, dtype=work, device=x.device)
                    for j in range(S):
                        row = row + e[j] / total * v[b, kv, j].to(work)
                    y[b, h, i] = row
        return self.o_proj(self.merge_heads(y.to(q.dtype)))  # (B, L, d_model)


EXERCISES = [
    Exercise(
        "MultiHeadAttention.split_heads",
        points=2,
        solution=MultiHeadAttention,
        slow=SlowMultiHeadAttention,
        guide="""\
The class below is the course's `MultiHeadAttention`; its constructor is written for you
(the grader loads weights into `q_proj`, `k_proj`, `v_proj` and `o_proj`). Three of its
methods are yours, each graded on its own.

**`split_heads`** turns `(B, L, n_heads * head_dim)` into `(B, n_heads, L, head_dim)`
(Chapter 4, section *The maths*): the channels of head `h` are the `h`-th block of
`head_dim` consecutive channels.

**`merge_heads`** is its inverse, `(B, n_heads, L, head_dim)` to `(B, L, n_heads * head_dim)`.

**`forward`** projects, splits, attends in every head, merges and projects out. It handles
self-attention (`context=None`), cross-attention (keys and values from `context`), boolean
and float masks and `is_causal`, as in Chapters 2 and 5. A module in float16/bfloat16
computes the attention itself in float32 and casts the result back, as in Chapter 2: a
score near $10^4$ has no digit left after the point in bfloat16.""",
        hints=(
            "Reshape to `(B, L, n_heads, head_dim)` first, then move the head axis: a plain reshape to `(B, n_heads, L, head_dim)` mixes heads and positions.",
            "`merge_heads` must undo exactly that: transpose back, then reshape (`.reshape`, since the transposed tensor is not contiguous).",
            "In `forward`, keys and values come from `context` when it is given; queries always come from `x`.",
            "With fewer key/value heads (`n_kv_heads < n_heads`), repeat each KV head `n_heads // n_kv_heads` times with `repeat_interleave`.",
            "`torch.nn.MultiheadAttention` is off limits.",
        ),
    ),
    Exercise(
        "MultiHeadAttention.merge_heads",
        points=2,
        solution=MultiHeadAttention,
        slow=SlowMultiHeadAttention,
    ),
    Exercise(
        "MultiHeadAttention.forward",
        points=5,
        solution=MultiHeadAttention,
        slow=SlowMultiHeadAttention,
        explore=explore_multiheadattention_forward,
    ),
]
