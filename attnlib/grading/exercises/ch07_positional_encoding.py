"""Chapter 7, positional encoding: the graded exercises and their catalogues of common mistakes.

====================================  ===============================================
exercise id                           reference
====================================  ===============================================
``sinusoidal_positional_encoding``    :func:`attnlib.sinusoidal_positional_encoding`
``apply_rope``                        :func:`attnlib.apply_rope` (rotate-half layout)
``alibi_slopes``                      :func:`attnlib.alibi_slopes`
``alibi_bias``                        :func:`attnlib.alibi_bias`
====================================  ===============================================

Each mistake is a small wrong implementation with the reference's signature; the
``_*_variant`` helpers compute every variant of one algorithm with flags, so a mistake
differs from the correct computation in exactly one place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...positional import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    apply_rope_interleaved,
    sinusoidal_positional_encoding,
)
from ..core import Case, Exercise, Mistake, register
from .common import F64, NO_ATTNLIB, randn

PAGE = "07_positional_encoding.html"


# ----------------------------------------------------------------------------- sinusoidal


def _sinusoidal_variant(*, swap: bool = False, halves: bool = False, own_freq: bool = False,
                        exponent_i: bool = False, times: bool = False,
                        start: int = 0) -> Callable[..., Tensor]:
    def wrong(seq_len: int, d_model: int, base: float = 10000.0) -> Tensor:
        pos = torch.arange(start, start + seq_len, dtype=F64)[:, None]  # (L, 1)
        n_cos = d_model // 2
        if own_freq:  # channel c uses exponent c / d_model, the cos channels too
            ang_sin = pos / base ** (torch.arange(0, d_model, 2, dtype=F64) / d_model)
            ang_cos = pos / base ** (torch.arange(1, d_model, 2, dtype=F64) / d_model)
        else:
            two_i = torch.arange(0, d_model, 2, dtype=F64)
            exps = (two_i / 2) / d_model if exponent_i else two_i / d_model
            ang_sin = pos * base ** exps if times else pos / base ** exps
            ang_cos = ang_sin[:, :n_cos]
        first, second = torch.sin(ang_sin), torch.cos(ang_cos)
        if swap:
            first, second = torch.cos(ang_sin), torch.sin(ang_cos)
        if halves:
            pe = torch.cat([first, second], dim=1)
        else:
            pe = torch.empty(seq_len, d_model, dtype=F64)
            pe[:, 0::2], pe[:, 1::2] = first, second
        return pe.float()
    return wrong


def _sinusoidal_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("seq_len=10, d_model=8", (10, 8)),
            Case("seq_len=12, d_model=6, base=100", (12, 6), {"base": 100.0}),
        ]
    return [
        Case("one position", (1, 4)),
        Case("no positions (seq_len=0)", (0, 4)),
        Case("odd d_model=5", (7, 5)),
        Case("d_model=1", (3, 1)),
        Case("seq_len=200, d_model=16", (200, 16)),
        Case("seq_len=50, d_model=32, base=10", (50, 32, 10.0)),
    ]


register(Exercise(
    id="sinusoidal_positional_encoding",
    chapter=7,
    reference=sinusoidal_positional_encoding,
    section=f"{PAGE}#the-maths",
    make_cases=_sinusoidal_cases,
    forbidden=NO_ATTNLIB,
    # float32 output: computing in float32 throughout (instead of float64, rounded once)
    # differs by ~5e-6 at 200 positions, which is not the point of the exercise.
    atol=1e-5,
    rtol=1e-5,
    mistakes=(
        Mistake(
            "sin and cos swapped",
            "Even channels hold the sine and odd channels the cosine: PE[pos, 2i] = sin(pos w_i), "
            "PE[pos, 2i+1] = cos(pos w_i).",
            f"{PAGE}#the-maths",
            _sinusoidal_variant(swap=True),
        ),
        Mistake(
            "all sines first, then all cosines",
            "The sine and the cosine of a pair sit side by side, in channels 2i and 2i + 1 "
            "(interleaved), not in two halves.",
            f"{PAGE}#the-maths",
            _sinusoidal_variant(halves=True),
        ),
        Mistake(
            "giving each channel its own frequency",
            "The exponent is 2i / d_model for both channels of pair i; using the channel index c "
            "for the cosine channel gives it a different frequency, so the pair is no longer a "
            "point on a circle.",
            f"{PAGE}#sinusoidal-encodings-many-clocks-at-different-speeds",
            _sinusoidal_variant(own_freq=True),
        ),
        Mistake(
            "exponent i / d_model instead of 2i / d_model",
            "With the pair index i the frequencies only go down to base^(-1/2); the exponent is "
            "2i / d_model, so the slowest pair turns once every ~2 pi base positions.",
            f"{PAGE}#the-maths",
            _sinusoidal_variant(exponent_i=True),
        ),
        Mistake(
            "multiplying by base^(2i/d) instead of dividing",
            "The angle is pos / base^(2i/d_model): frequencies fall from 1 towards 1/base. "
            "Multiplying makes them grow instead.",
            f"{PAGE}#the-maths",
            _sinusoidal_variant(times=True),
        ),
        Mistake(
            "positions starting at 1",
            "Positions are counted from 0, so row 0 is sin(0) = 0 and cos(0) = 1.",
            f"{PAGE}#the-maths",
            _sinusoidal_variant(start=1),
        ),
    ),
))

# ----------------------------------------------------------------------------- apply_rope


def _rope_variant(*, sign: float = 1.0, swap: bool = False, exponent_i: bool = False,
                  own_freq: bool = False, ignore_positions: bool = False,
                  positions_on_heads: bool = False,
                  angle_dtype: torch.dtype | None = torch.float32) -> Callable[..., Tensor]:
    """Rotate-half RoPE with one thing changed; ``angle_dtype=None`` means x.dtype."""
    def wrong(x: Tensor, positions: Tensor | None = None, base: float = 10000.0) -> Tensor:
        L, D = x.size(-2), x.size(-1)
        adt = x.dtype if angle_dtype is None else angle_dtype
        if positions is None or ignore_positions:
            positions = torch.arange(L)
        if own_freq:  # D frequencies, one per channel: no pairs sharing an angle
            inv_freq = 1.0 / base ** (torch.arange(D, dtype=adt) / D)
            emb = positions.to(adt)[..., None] * inv_freq
        else:
            two_i = torch.arange(0, D, 2, dtype=adt)
            inv_freq = 1.0 / base ** ((two_i / 2 if exponent_i else two_i) / D)
            angles = positions.to(adt)[..., None] * inv_freq  # (L, D/2) or (B, L, D/2)
            emb = torch.cat((angles, angles), dim=-1)
        if emb.ndim == 3 and not positions_on_heads:  # (B, L, D) -> (B, 1, .., 1, L, D)
            emb = emb.view(emb.size(0), *([1] * (x.ndim - 3)), L, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        if swap:
            cos, sin = sin, cos
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1) * sign
        return x * cos + rotated * sin
    return wrong


def _rope_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("(B, H, L, D) = (2, 3, 6, 8), default positions", (randn(2, 3, 6, 8, seed=640),)),
            Case("positions (L,) with gaps", (randn(2, 2, 5, 8, seed=641), torch.tensor([0, 3, 4, 17, 60]))),
            Case("positions (B, L), one row per batch element (B = H = 2)",
                 (randn(2, 2, 4, 8, seed=642), torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]]))),
            Case("bfloat16, positions up to 4000",
                 (randn(1, 2, 6, 16, seed=643, dtype=torch.bfloat16),
                  torch.tensor([0, 1, 999, 2048, 3500, 4000])), low_precision=True),
        ]
    return [
        Case("L=1 at position 7", (randn(2, 2, 1, 8, seed=650), torch.tensor([7]))),
        Case("2-D x (L, D)", (randn(5, 4, seed=651),)),
        Case("3-D x (B, L, D) with positions (B, L)",
             (randn(2, 3, 6, seed=652), torch.tensor([[5, 6, 7], [0, 40, 41]]))),
        Case("head_dim=32, base=500000, positions up to 4000",
             (randn(1, 2, 4, 32, seed=653), torch.tensor([0, 1000, 3999, 4000])), {"base": 500000.0}),
        Case("head_dim=2", (randn(1, 1, 5, 2, seed=654),)),
        Case("bfloat16, positions (B, L) up to 4000",
             (randn(2, 3, 5, 8, seed=655, dtype=torch.bfloat16),
              torch.tensor([[0, 1, 2, 3, 4], [3996, 3997, 3998, 3999, 4000]])), low_precision=True),
        Case("float16, positions up to 3000",
             (randn(1, 2, 4, 16, seed=656, dtype=torch.float16), torch.tensor([5, 700, 1500, 3000])),
             low_precision=True),
    ]


register(Exercise(
    id="apply_rope",
    chapter=7,
    reference=apply_rope,
    section=f"{PAGE}#rope-the-score-depends-only-on-the-offset",
    make_cases=_rope_cases,
    forbidden=NO_ATTNLIB,
    # The reference computes the angles in float32 (as LLaMA does). Angles computed in
    # float64 are not a mistake: they differ by < 1e-4 at position 4000.
    atol=1e-3,
    rtol=1e-6,
    mistakes=(
        Mistake(
            "interleaved pairs (2i, 2i+1) instead of rotate-half pairs (i, i + D/2)",
            "That is the RoFormer/GPT-J layout; this function uses the rotate-half layout of "
            "GPT-NeoX and LLaMA, where channel i is paired with channel i + D/2. Both are "
            "rotations, but of different pairs of channels.",
            f"{PAGE}#two-layouts-of-the-same-rotation",
            apply_rope_interleaved,
        ),
        Mistake(
            "rotate_half with the sign flipped",
            "rotate_half maps (x1, x2) to (-x2, x1), a quarter turn forward; (x2, -x1) turns the "
            "other way, so every pair is rotated by minus the angle.",
            f"{PAGE}#the-maths",
            _rope_variant(sign=-1.0),
        ),
        Mistake(
            "sin and cos swapped",
            "The rotation is x * cos + rotate_half(x) * sin; with the two swapped it is no longer "
            "a rotation (position 0 should leave x unchanged).",
            f"{PAGE}#the-maths",
            _rope_variant(swap=True),
        ),
        Mistake(
            "exponent i / D instead of 2i / D in the frequencies",
            "Pair i turns by base^(-2i/D) per position, computed from arange(0, D, 2) / D; with "
            "arange(D // 2) / D the frequencies decay half as fast.",
            f"{PAGE}#the-maths",
            _rope_variant(exponent_i=True),
        ),
        Mistake(
            "one frequency per channel instead of per pair",
            "Frequencies from arange(D) / D give channel i and channel i + D/2 different angles, "
            "so they no longer form a rotating pair; the D/2 angles are computed once and "
            "repeated, torch.cat((angles, angles)).",
            f"{PAGE}#the-maths",
            _rope_variant(own_freq=True),
        ),
        Mistake(
            "ignoring the positions argument",
            "The angles were computed for positions 0..L-1 whatever was passed; with a KV cache "
            "the new tokens sit at positions t..t+L-1.",
            f"{PAGE}#the-code",
            _rope_variant(ignore_positions=True),
        ),
        Mistake(
            "(B, L) positions applied per head instead of per batch element",
            "Angles of shape (B, L, D) broadcast against (B, H, L, D) line up with the head axis; "
            "insert a head axis, (B, 1, L, D), so row b of positions applies to batch element b.",
            f"{PAGE}#the-maths",
            _rope_variant(positions_on_heads=True),
        ),
        Mistake(
            "computing the angles in the input's low-precision dtype",
            "A bfloat16 angle at position 4000 is off by whole radians; compute the angles, cos "
            "and sin in float32 and only then cast cos and sin to x.dtype.",
            f"{PAGE}#rope-the-score-depends-only-on-the-offset",
            _rope_variant(angle_dtype=None),
        ),
    ),
))

# ----------------------------------------------------------------------------- ALiBi


def _slopes_variant(*, from_zero: bool = False, naive: bool = False, reverse: bool = False,
                    no_eight: bool = False) -> Callable[[int], Tensor]:
    def wrong(n_heads: int) -> Tensor:
        if from_zero:
            slopes = torch.tensor([2.0 ** (-8.0 * h / n_heads) for h in range(n_heads)])
        elif naive:
            slopes = torch.tensor([2.0 ** (-8.0 * h / n_heads) for h in range(1, n_heads + 1)])
        elif no_eight:
            slopes = torch.tensor([2.0 ** (-1.0 * h / n_heads) for h in range(1, n_heads + 1)])
        else:
            slopes = alibi_slopes(n_heads)
        slopes = slopes.float()
        return slopes.flip(0) if reverse else slopes
    return wrong


def _alibi_variant(*, slopes: Callable[[int], Tensor] = alibi_slopes, sign: float = -1.0,
                   absolute: bool = True, offset: str = "given") -> Callable[..., Tensor]:
    """``offset``: "given" (correct), "ignored" (always top-left) or "bottom-right"."""
    def wrong(n_heads: int, L: int, S: int, *, query_offset: int = 0,
              device: torch.device | str | None = None) -> Tensor:
        shift = {"given": query_offset, "ignored": 0, "bottom-right": S - L}[offset]
        dist = (torch.arange(L)[:, None] + shift - torch.arange(S)[None, :]).float()
        if absolute:
            dist = dist.abs()
        return (sign * slopes(n_heads)[:, None, None] * dist).to(device)
    return wrong


_SLOPE_MISTAKES = (
    ("slopes starting at h = 0", "The slopes are 2^(-8h/H) for h = 1..H: the first head gets "
     "2^(-8/H), not 2^0 = 1.", _slopes_variant(from_zero=True)),
    ("the power-of-two formula for any head count", "For a head count that is not a power of two, "
     "ALiBi takes the slopes of the power of two just below and adds every other slope of the next "
     "power of two; 2^(-8h/H) with H = 6 gives other values.", _slopes_variant(naive=True)),
    ("slopes in reverse order", "Head 0 gets the largest slope (the most local head), 2^(-8/H); the "
     "slopes then shrink head by head.", _slopes_variant(reverse=True)),
    ("ratio 2^(-1/H) instead of 2^(-8/H)", "The geometric sequence starts at 2^(-8/H) and has that "
     "ratio: for 8 heads 1/2, 1/4, ..., 1/256.", _slopes_variant(no_eight=True)),
)


def _alibi_slopes_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [Case("8 heads", (8,)), Case("6 heads (not a power of two)", (6,))]
    return [Case(f"{n} heads", (n,)) for n in (1, 2, 3, 5, 12, 16, 64)]


register(Exercise(
    id="alibi_slopes",
    chapter=7,
    reference=alibi_slopes,
    section=f"{PAGE}#alibi-a-distance-penalty-per-head",
    make_cases=_alibi_slopes_cases,
    forbidden=NO_ATTNLIB,
    atol=1e-7,
    rtol=1e-6,
    mistakes=tuple(Mistake(name, expl, f"{PAGE}#alibi-a-distance-penalty-per-head", fn)
                   for name, expl, fn in _SLOPE_MISTAKES),
))


def _alibi_bias_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("8 heads, L = S = 6", (8, 6, 6)),
            Case("6 heads, L = 4, S = 7 (top-left)", (6, 4, 7)),
            Case("4 heads, L = 3, S = 8, query_offset = 5 (decoding)", (4, 3, 8), {"query_offset": 5}),
        ]
    return [
        Case("1 head, L = S = 1", (1, 1, 1)),
        Case("3 heads, L = 5 > S = 2", (3, 5, 2)),
        Case("12 heads, L = S = 4", (12, 4, 4)),
        Case("no queries (L = 0)", (16, 0, 5)),
        Case("negative query_offset", (2, 4, 6), {"query_offset": -2}),
        Case("query_offset = 2, L = S = 5", (5, 5, 5), {"query_offset": 2}),
    ]


register(Exercise(
    id="alibi_bias",
    chapter=7,
    reference=alibi_bias,
    section=f"{PAGE}#alibi-a-distance-penalty-per-head",
    make_cases=_alibi_bias_cases,
    forbidden=NO_ATTNLIB,
    atol=1e-5,
    rtol=1e-5,
    mistakes=(
        Mistake(
            "a positive bias (sign flipped)",
            "ALiBi subtracts slope * |i - j| from the score: the farther the key, the lower its "
            "score. A positive bias favours distant keys.",
            f"{PAGE}#the-maths",
            _alibi_variant(sign=1.0),
        ),
        Mistake(
            "i - j without the absolute value",
            "The penalty is proportional to the distance |i - j|; -(i - j) becomes a bonus for "
            "keys after the query.",
            f"{PAGE}#the-maths",
            _alibi_variant(absolute=False),
        ),
        *(Mistake(name, expl, f"{PAGE}#alibi-a-distance-penalty-per-head", _alibi_variant(slopes=fn))
          for name, expl, fn in _SLOPE_MISTAKES),
        Mistake(
            "aligning the queries bottom-right",
            "Query i sits at position i + query_offset and the default offset is 0 (top-left, as "
            "is_causal); the last L of S positions are selected with query_offset = S - L.",
            "05_self_cross_masks.html#is-causal-when-l-s-top-left-or-bottom-right",
            _alibi_variant(offset="bottom-right"),
        ),
        Mistake(
            "ignoring query_offset",
            "With a KV cache the L new queries are the last L positions: query i is at position "
            "i + query_offset, not at i.",
            f"{PAGE}#alibi-a-distance-penalty-per-head",
            _alibi_variant(offset="ignored"),
        ),
    ),
))
