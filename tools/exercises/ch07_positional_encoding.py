"""Chapter 7's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/07_positional_encoding/`` and
``notebooks/07_positional_encoding/`` from this file (see ``tools/exercises/__init__.py``);
the cases and named mistakes that grade the notebook are in
``attnlib/grading/exercises/ch07_positional_encoding.py``.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from torch import Tensor

import attnlib

from . import Exercise

INTRO = """\
Attention alone does not know the order of its inputs. You write the three classic ways of
telling it: sinusoidal encodings added to the embeddings, rotary embeddings (RoPE) applied to
queries and keys, and ALiBi's distance penalty added to the scores."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = ""


# sinusoidal_positional_encoding -------------------------------------------------------

def sinusoidal_positional_encoding(seq_len: int, d_model: int, base: float = 10000.0) -> Tensor:
    pos = torch.arange(seq_len, dtype=torch.float64)[:, None]  # (seq_len, 1)
    even = torch.arange(0, d_model, 2, dtype=torch.float64)  # (ceil(d/2),): the channels 2i
    angle = pos / base ** (even / d_model)  # (seq_len, ceil(d/2))
    pe = torch.zeros(seq_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.to(torch.float32)


# Slow: loops over the positions p and the pairs of channels (2i, 2i + 1), one angle at a time
# (Python floats are float64).
def slow_sinusoidal_positional_encoding(seq_len: int, d_model: int, base: float = 10000.0) -> Tensor:
    pe = torch.zeros(seq_len, d_model, dtype=torch.float64)
    for p in range(seq_len):
        for c in range(0, d_model, 2):  # c = 2i, the even channel of pair i
            angle = p / base ** (c / d_model)
            pe[p, c] = math.sin(angle)
            if c + 1 < d_model:  # an odd d_model ends with a lone sine channel
                pe[p, c + 1] = math.cos(angle)
    return pe.to(torch.float32)


def explore_sinusoidal_positional_encoding() -> None:
    """The encoding table, channel against position."""
    pe = sinusoidal_positional_encoding(100, 64)
    print("largest difference from attnlib:", (pe - attnlib.sinusoidal_positional_encoding(100, 64)).abs().max().item())
    plt.imshow(pe.T.numpy(), aspect="auto", cmap="RdBu"); plt.xlabel("position"); plt.ylabel("channel")
    plt.colorbar(); plt.show()


# apply_rope ---------------------------------------------------------------------------

def apply_rope(x: Tensor, positions: Tensor | None = None, base: float = 10000.0) -> Tensor:
    L, D = x.shape[-2], x.shape[-1]
    if positions is None:
        positions = torch.arange(L, device=x.device)
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, device=x.device).float() / D))  # (D/2,) fp32
    angles = positions.to(x.device).float()[..., None] * inv_freq  # (L, D/2) or (B, L, D/2)
    if angles.ndim == 3:  # one row of positions per batch element: broadcast over the other axes
        angles = angles.reshape(angles.size(0), *([1] * (x.ndim - 3)), L, D // 2)
    emb = torch.cat((angles, angles), dim=-1)  # (..., L, D): pair (i, i + D/2) shares angle i
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# Slow: loops over the pairs of channels (i, i + D/2), the positions and, for (B, L) positions,
# the batch elements; each step turns one pair of channels at one position (of every head).
def slow_apply_rope(x: Tensor, positions: Tensor | None = None, base: float = 10000.0) -> Tensor:
    L, D = x.shape[-2], x.shape[-1]
    half = D // 2
    if positions is None:
        positions = torch.arange(L, device=x.device)
    positions = positions.to(x.device)
    out = torch.empty_like(x)
    for i in range(half):  # pair (i, i + D/2)
        two_i = torch.tensor(2.0 * i, dtype=torch.float32, device=x.device)
        inv_freq = 1.0 / (base ** (two_i / D))  # float32 scalar
        for t in range(L):  # position t of the sequence
            if positions.ndim == 1:  # the same positions for the whole batch
                angle = positions[t].float() * inv_freq  # float32
                cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
                a, c = x[..., t, i], x[..., t, i + half]  # the pair's two channels
                out[..., t, i] = a * cos - c * sin
                out[..., t, i + half] = c * cos + a * sin
            else:  # (B, L): row b of positions turns batch element b
                for b in range(positions.size(0)):
                    angle = positions[b, t].float() * inv_freq  # float32
                    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
                    a, c = x[b, ..., t, i], x[b, ..., t, i + half]
                    out[b, ..., t, i] = a * cos - c * sin
                    out[b, ..., t, i + half] = c * cos + a * sin
    return out


def explore_apply_rope() -> None:
    """With RoPE, the score of q at position m and k at position n depends on m - n only."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def score(m, n):
        return (apply_rope(q, torch.tensor([m])) * apply_rope(k, torch.tensor([n]))).sum().item()
    print("score(5, 2) =", round(score(5, 2), 6), " score(105, 102) =", round(score(105, 102), 6))
    offsets = range(-20, 21)
    plt.plot(offsets, [score(50 + d, 50) for d in offsets], label="yours")
    plt.plot(offsets, [(attnlib.apply_rope(q, torch.tensor([50 + d])) * attnlib.apply_rope(k, torch.tensor([50]))).sum().item()
                       for d in offsets], "--", label="attnlib")
    plt.xlabel("offset m - n"); plt.ylabel("score"); plt.legend(); plt.show()


# alibi_slopes -------------------------------------------------------------------------

def alibi_slopes(n_heads: int) -> Tensor:
    m = 2 ** int(math.floor(math.log2(n_heads)))  # largest power of two <= n_heads
    slopes = [2.0 ** (-8.0 * i / m) for i in range(1, m + 1)]
    if n_heads > m:
        between = [2.0 ** (-8.0 * i / (2 * m)) for i in range(1, 2 * m + 1, 2)]
        slopes += between[: n_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)


# Slow: loops to find the power of two m, then over the heads, one slope at a time (the
# reference's lists are loops over heads too; here each head's slope is worked out alone).
def slow_alibi_slopes(n_heads: int) -> Tensor:
    m = 1
    while m * 2 <= n_heads:  # the largest power of two <= n_heads
        m *= 2
    slopes = torch.zeros(n_heads, dtype=torch.float32)
    for h in range(n_heads):
        if h < m:  # the sequence of m heads: 2^(-8 i / m), i = h + 1
            slopes[h] = 2.0 ** (-8.0 * (h + 1) / m)
        else:  # then slopes 1, 3, 5, ... of the sequence of 2m heads
            slopes[h] = 2.0 ** (-8.0 * (2 * (h - m) + 1) / (2 * m))
    return slopes


# alibi_bias ---------------------------------------------------------------------------

def alibi_bias(
    n_heads: int,
    L: int,
    S: int,
    *,
    query_offset: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    q_pos = torch.arange(L, device=device) + query_offset  # (L,)
    k_pos = torch.arange(S, device=device)  # (S,)
    distance = (q_pos[:, None] - k_pos[None, :]).abs().to(torch.float32)  # (L, S)
    slopes = alibi_slopes(n_heads).to(device)  # (H,)
    return -slopes[:, None, None] * distance  # (H, L, S)


# Slow: loops over the heads, the query rows and the key positions, one entry at a time.
def slow_alibi_bias(
    n_heads: int,
    L: int,
    S: int,
    *,
    query_offset: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    slopes = alibi_slopes(n_heads)  # (H,) float32
    bias = torch.zeros(n_heads, L, S, dtype=torch.float32, device=device)
    for h in range(n_heads):
        for i in range(L):  # query i, at position i + query_offset
            for j in range(S):  # key j, at position j
                bias[h, i, j] = -slopes[h] * abs(i + query_offset - j)
    return bias


def explore_alibi_bias() -> None:
    """The ALiBi bias of a few heads; steep heads look locally."""
    bias = alibi_bias(4, 12, 12)
    print("slopes:", alibi_slopes(4), " attnlib:", attnlib.alibi_slopes(4))
    fig, axes = plt.subplots(1, 4, figsize=(12, 3))
    for h in range(4):
        axes[h].imshow(bias[h].numpy(), cmap="magma"); axes[h].set_title(f"head {h}")
    plt.show()


EXERCISES = [
    Exercise(
        "sinusoidal_positional_encoding",
        points=3,
        solution=sinusoidal_positional_encoding,
        guide=r"""
Return the `(seq_len, d_model)` float32 table of "Attention Is All You Need" (Chapter 7,
section *Sinusoidal encodings: many clocks at different speeds*):
$PE[p, 2i] = \sin(p / \text{base}^{2i/d})$ and $PE[p, 2i+1] = \cos(p / \text{base}^{2i/d})$.
An odd `d_model` ends with a lone sine channel. Compute in float64 and round once to float32.""",
        hints=(
            "`torch.arange(0, d_model, 2)` gives the even channels $2i$.",
            "Fill `pe[:, 0::2]` with the sines and `pe[:, 1::2]` with the cosines; with an odd `d_model` there is one cosine fewer.",
        ),
        explore=explore_sinusoidal_positional_encoding,
        slow=slow_sinusoidal_positional_encoding,
    ),
    Exercise(
        "apply_rope",
        points=4,
        solution=apply_rope,
        guide="""\
Rotate queries or keys by their positions, in the rotate-half layout of LLaMA (Chapter 7,
section *RoPE: the score depends only on the offset*): channel `i` and channel `i + D/2`
form a pair, turned by the angle `position * base ** (-2i / D)`. The arithmetic the tests
expect is that of Hugging Face's implementation: the angles, their cosine and sine in
float32; cosine and sine then cast to `x.dtype`; and `x * cos + rotate_half(x) * sin` in
`x.dtype`, where `rotate_half` maps the halves `(x1, x2)` to `(-x2, x1)`.

`positions` is `(L,)` for the whole batch or `(B, L)`, one row per batch element (then
broadcast over the head axis of a 4-D `x`); it defaults to `0 .. L-1`.""",
        hints=(
            "`inv_freq = 1.0 / (base ** (torch.arange(0, D, 2).float() / D))`, then `positions.float()[..., None] * inv_freq`.",
            "Repeat the angles for both halves: `torch.cat((angles, angles), dim=-1)`.",
            "For `(B, L)` positions and a 4-D `x`, insert a head axis: `angles[:, None]`.",
        ),
        explore=explore_apply_rope,
        slow=slow_apply_rope,
    ),
    Exercise(
        "alibi_slopes",
        points=2,
        solution=alibi_slopes,
        guide="""\
ALiBi (Chapter 7, section *ALiBi: a distance penalty per head*) gives head `h` a slope. For
`n_heads` a power of two they are $2^{-8i/n}$ for $i = 1..n$. Otherwise take the slopes of
the power of two $m$ just below `n_heads`, then the first `n_heads - m` of the slopes at
positions 0, 2, 4, ... of the sequence for $2m$. Return a float32 tensor.""",
        hints=(
            "The largest power of two `<= n`: `1 << (n.bit_length() - 1)`.",
            "For 6 heads: the 4 slopes of $m = 4$, then 2 of the 8-head sequence's slopes 1, 3 (counting from 1).",
        ),
        slow=slow_alibi_slopes,
    ),
    Exercise(
        "alibi_bias",
        points=3,
        solution=alibi_bias,
        guide=r"""
Return the `(n_heads, L, S)` float32 bias $-\text{slope}_h \cdot |i' - j|$ with query `i` at
position `i' = i + query_offset` and key `j` at position `j` (Chapter 7, section *ALiBi: a
distance penalty per head*). The slopes are those of your `alibi_slopes`. Add the result to
the scores as a float mask; when decoding with a cache, `query_offset = S - L` puts the new
queries at the end.""",
        hints=(
            "Distances: `(q_pos[:, None] - k_pos[None, :]).abs()`, then to float32.",
            "Broadcast the slopes over the last two axes: `slopes[:, None, None]`.",
        ),
        explore=explore_alibi_bias,
        slow=slow_alibi_bias,
    ),
]
