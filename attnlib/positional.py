"""Positional information: sinusoidal encodings, RoPE and ALiBi (chapter 7).

Attention by itself is blind to order: permute the keys and values together and the
output does not change. Chapter 7 shows three ways of telling the model where each
token sits:

* :func:`sinusoidal_positional_encoding` adds a fixed vector to each token's embedding
  (Vaswani et al., 2017). Its pairs of channels are points on circles, so moving ``k``
  steps is a rotation that does not depend on where you start.
* :func:`apply_rope` rotates the queries and keys themselves (Su et al., RoFormer), so
  the score between query ``m`` and key ``n`` depends only on ``m - n``.
  :func:`apply_rope_interleaved` is the same idea with the channels paired differently.
* :func:`alibi_bias` adds no vector at all: it subtracts a penalty proportional to the
  distance from each score (Press et al., 2022, ALiBi).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validate import check_floating, check_positive_int, check_tensor

__all__ = [  # attnlib's public names from this module
    "sinusoidal_positional_encoding",
    "rope_permutation",
    "apply_rope",
    "apply_rope_interleaved",
    "alibi_slopes",
    "alibi_bias",
]


def _check_base(base: object) -> float:
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise TypeError(f"base must be a number, got {type(base).__name__}")
    if not math.isfinite(base) or base <= 0:
        raise ValueError(f"base must be a finite number > 0, got {base}")
    return base


# ----------------------------------------------------------------------------- sinusoidal


def sinusoidal_positional_encoding(seq_len: int, d_model: int, base: float = 10000.0) -> Tensor:
    """The fixed sinusoidal position encodings of "Attention Is All You Need" (chapter 7).

    For position ``pos`` and channel pair ``i``::

        PE[pos, 2i]     = sin(pos / base ** (2i / d_model))
        PE[pos, 2i + 1] = cos(pos / base ** (2i / d_model))

    Each pair is a point on the unit circle turning at its own speed, from one radian per
    position (``i = 0``) down to one turn every ``2 pi * base`` positions. Hence, for a
    fixed offset ``k``, ``PE[pos + k] = M_k @ PE[pos]`` with ``M_k`` block-diagonal
    (one 2x2 rotation per pair) and independent of ``pos``: relative positions are a
    linear function of absolute ones. An odd ``d_model`` ends with a lone sin channel.

    The values are computed in float64 and rounded once to float32.

    Args:
        seq_len: number of positions (``>= 0``).
        d_model: number of channels (``>= 1``), the model width it is added to.
        base: the wavelength scale, 10000 in the paper.

    Returns:
        ``(seq_len, d_model)`` float32 tensor; add it to ``(B, seq_len, d_model)``
        token embeddings.
    """
    check_positive_int(seq_len, "seq_len", allow_zero=True)
    check_positive_int(d_model, "d_model")
    return _sinusoidal_table(seq_len, d_model, _check_base(base))


def _sinusoidal_table(seq_len: int, d_model: int, base: float) -> Tensor:
    """The table of :func:`sinusoidal_positional_encoding`: sin, cos of pos * w_i."""
    pos = torch.arange(seq_len, dtype=torch.float64)[:, None]  # (seq_len, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (ceil(d_model / 2),)
    angle = pos / base ** (two_i / d_model)  # (seq_len, ceil(d_model / 2))
    pe = torch.empty(seq_len, d_model, dtype=torch.float64)  # (seq_len, d_model)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])  # odd d_model: one cos fewer
    return pe.float()


# ----------------------------------------------------------------------------- RoPE
#
# Two channel layouts are in use for rotary embeddings. Both rotate pairs of channels of
# a head by the angle  position * base ** (-2i / head_dim),  i = 0 .. head_dim/2 - 1:
#
# * "interleaved" pairs (2i, 2i+1): the RoFormer paper, GPT-J, Mesh-TensorFlow.
#   -> apply_rope_interleaved
# * "rotate-half" pairs (i, i + head_dim/2): GPT-NeoX, and the Hugging Face LLaMA code
#   (its rotate_half function). -> apply_rope
#
# They are the same rotation written in two orders of the channels. With
# perm = rope_permutation(head_dim) = [0, 2, 4, ..., 1, 3, 5, ...] (evens, then odds):
#
#     apply_rope_interleaved(x) == apply_rope(x[..., perm])[..., argsort(perm)]
#
# and because only dot products q . k reach the softmax, which a common permutation
# of q's and k's channels leaves unchanged, a checkpoint trained in one layout runs in
# the other once the rows of W_q and W_k are permuted head by head (for an (H * hd, d)
# weight: w.view(H, hd, d)[:, perm].reshape(H * hd, d)). This is what the LLaMA
# conversion script to Hugging Face does.


def rope_permutation(head_dim: int) -> Tensor:
    """The channel order that turns interleaved RoPE pairs into rotate-half pairs (chapter 7).

    ``x[..., perm]`` moves the even channels to the first half and the odd channels to
    the second, so interleaved pair ``(2i, 2i+1)`` lands on rotate-half pair
    ``(i, i + head_dim/2)``. Undo it with ``torch.argsort(perm)``.

    Returns:
        ``(head_dim,)`` int64 tensor ``[0, 2, 4, ..., head_dim-2, 1, 3, ..., head_dim-1]``.
    """
    check_positive_int(head_dim, "head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    return _evens_then_odds(head_dim)


def _evens_then_odds(head_dim: int) -> Tensor:
    """The order of :func:`rope_permutation`: interleaved pair i lands on (i, i + D/2)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _rope_angles(x: Tensor, positions: Tensor | None, base: float) -> Tensor:
    """Check the RoPE inputs; return the fp32 angles, shaped to broadcast against x."""
    positions = _rope_positions(x, positions, base)
    return _rope_angle_table(positions, x.size(-1), base, x.ndim)


def _rope_positions(x: Tensor, positions: Tensor | None, base: float) -> Tensor:
    """Check the RoPE inputs; return the positions (default ``arange(L)``) on x's device."""
    check_tensor(x, "x", min_ndim=2)
    check_floating(x, "x")
    base = _check_base(base)
    L, D = x.size(-2), x.size(-1)
    if D % 2:
        raise ValueError(
            f"the last dimension of x (head_dim) must be even for RoPE, got shape "
            f"{tuple(x.shape)} (..., L, head_dim)"
        )
    if positions is None:
        positions = torch.arange(L, device=x.device)  # (L,)
    else:
        check_tensor(positions, "positions", min_ndim=1)
        if positions.dtype == torch.bool or positions.is_complex():
            raise TypeError(f"positions must hold integers, got dtype {positions.dtype}")
        if positions.is_floating_point() and not bool(
            (torch.isfinite(positions) & (positions == positions.round())).all()
        ):
            raise ValueError("positions must be whole numbers (token indices), not fractions or inf/nan")
        if bool((positions < 0).any()):
            raise ValueError("positions must be >= 0")
        if positions.ndim > 2 or positions.size(-1) != L:
            raise ValueError(
                f"positions must have shape (L,) or (B, L) with L={L} (x is "
                f"{tuple(x.shape)} (..., L, head_dim)), got {tuple(positions.shape)}"
            )
        if positions.ndim == 2 and (x.ndim < 3 or positions.size(0) not in (1, x.size(0))):
            raise ValueError(
                f"positions of shape (B, L) = {tuple(positions.shape)} need x of shape "
                f"(B, ..., L, head_dim) with the same B, got x {tuple(x.shape)}"
            )
        positions = positions.to(x.device)
    return positions


def _rope_angle_table(positions: Tensor, D: int, base: float, x_ndim: int) -> Tensor:
    """RoPE's angles ``position * base ** (-2i / D)``, in fp32 as in HF's LLaMA."""
    two_i = torch.arange(0, D, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (base ** (two_i / D))  # (D/2,): theta_i, radians per position
    angles = positions.float()[..., None] * inv_freq  # (L, D/2) or (B, L, D/2)
    if angles.ndim == 3:  # (B, L, D/2) -> (B, 1, .., 1, L, D/2): all heads
        angles = angles.view(angles.size(0), *([1] * (x_ndim - 3)), -1, D // 2)
    return angles


def _rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) for the two halves of the last axis: a quarter turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., D/2) each
    return torch.cat((-x2, x1), dim=-1)  # (..., D)


def apply_rope(x: Tensor, positions: Tensor | None = None, base: float = 10000.0) -> Tensor:
    """Rotary position embedding, rotate-half layout (chapter 7).

    Channel ``i`` and channel ``i + D/2`` of each head form a pair, rotated by the angle
    ``position * base ** (-2i / D)``. Apply it to queries and keys (not values) after the
    projections: then ``<apply_rope(q, m), apply_rope(k, n)>`` depends on the positions
    only through ``m - n``, and the norm of every vector is unchanged.

    This is the layout and the exact arithmetic of the Hugging Face LLaMA implementation
    (``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb``): angles, cos and sin in fp32,
    cos and sin then cast to ``x.dtype``, and ``x * cos + rotate_half(x) * sin`` in
    ``x.dtype``; results agree bit for bit. For the interleaved-pairs layout of RoFormer
    and GPT-J, see :func:`apply_rope_interleaved` and the note above it.

    Args:
        x: ``(..., L, D)`` floating point with ``D`` even, typically ``(B, H, L, head_dim)``.
        positions: position of each of the ``L`` tokens, integers ``>= 0``; ``(L,)``
            shared by the whole batch, or ``(B, L)`` one row per batch element (the head
            axis of a 4-D ``x`` is broadcast). Default ``arange(L)``; pass
            ``arange(t, t + L)`` when decoding with a cache of ``t`` tokens.
        base: the wavelength scale ("rope_theta"), 10000 in RoFormer and LLaMA 1/2.

    Returns:
        A tensor of the same shape and dtype as ``x``.
    """
    return _rotate_halves(x, _rope_angles(x, positions, base))


def _rotate_halves(x: Tensor, angles: Tensor) -> Tensor:
    """Turn pair (i, i + D/2) of x (..., L, D) by angle i of angles (..., L, D/2)."""
    emb = torch.cat((angles, angles), dim=-1)  # (..., L, D): i, i + D/2 share angle i
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # (..., L, D)
    return x * cos + _rotate_half(x) * sin  # (..., L, D)


def apply_rope_interleaved(
    x: Tensor, positions: Tensor | None = None, base: float = 10000.0
) -> Tensor:
    """Rotary position embedding, interleaved layout of RoFormer / GPT-J (chapter 7).

    Channels ``2i`` and ``2i + 1`` form a pair, rotated by ``position * base ** (-2i / D)``::

        out[2i]     = x[2i] cos - x[2i+1] sin
        out[2i + 1] = x[2i+1] cos + x[2i] sin

    Same arguments, dtype handling and fp32 angles as :func:`apply_rope`, of which it is
    a relabelling: ``apply_rope_interleaved(x) == apply_rope(x[..., perm])[..., argsort(perm)]``
    with ``perm = rope_permutation(D)``.

    Returns:
        A tensor of the same shape and dtype as ``x``.
    """
    return _rotate_neighbours(x, _rope_angles(x, positions, base))


def _rotate_neighbours(x: Tensor, angles: Tensor) -> Tensor:
    """Turn pair (2i, 2i + 1) of x (..., L, D) by angle i of angles (..., L, D/2)."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # (..., L, D/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., L, D/2) each: the two members of a pair
    out1 = x1 * cos + (-x2) * sin  # (..., L, D/2)
    out2 = x2 * cos + x1 * sin  # (..., L, D/2)
    return torch.stack((out1, out2), dim=-1).flatten(-2)  # (..., L, D), pairs in place


# ----------------------------------------------------------------------------- ALiBi


def alibi_slopes(n_heads: int) -> Tensor:
    """The per-head ALiBi slopes of Press et al. (2022) (chapter 7).

    For ``n_heads`` a power of two, the geometric sequence ``2 ** (-8 i / n_heads)`` for
    ``i = 1 .. n_heads`` (8 heads: 1/2, 1/4, ..., 1/256). Otherwise the slopes of the
    power of two ``m`` just below ``n_heads``, followed by the first ``n_heads - m`` of the
    slopes at positions 0, 2, 4, ... of the sequence for ``2m`` (those fall between the
    ones already taken). Heads with a large slope look locally, small slopes far away.

    Returns:
        ``(n_heads,)`` float32 tensor, all in ``(0, 1)``.
    """
    check_positive_int(n_heads, "n_heads")
    return _alibi_slopes(n_heads)


def _alibi_slopes(n_heads: int) -> Tensor:
    """The slopes of :func:`alibi_slopes`: those of the power of two m <= n_heads, then
    the odd-position ones of the sequence for 2m."""
    m = 1 << (n_heads.bit_length() - 1)  # largest power of two <= n_heads
    slopes = [2.0 ** (-8.0 * i / m) for i in range(1, m + 1)]
    between = [2.0 ** (-8.0 * i / (2 * m)) for i in range(1, 2 * m + 1, 2)]  # odd i, 2m
    return torch.tensor(slopes + between[: n_heads - m], dtype=torch.float32)


def alibi_bias(
    n_heads: int,
    L: int,
    S: int,
    *,
    query_offset: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ALiBi additive attention bias: ``-slope_h * |i - j|`` (chapter 7).

    Query ``i`` sits at position ``i + query_offset`` and key ``j`` at position ``j``,
    both counted from 0, so by default the alignment is top-left, as ``is_causal``. Over
    the keys a causal model sees (``j <= i``) this is the paper's ``-m (i - j)``; the
    absolute value makes the same bias usable without a causal mask.

    With a KV cache, the ``L`` new queries are the last ``L`` of ``S`` positions: pass
    ``query_offset = S - L`` (bottom-right alignment), or query 0 would be treated as
    if it sat at the start of the sequence.

    Add it to the scores as a float mask: ``scaled_dot_product_attention(q, k, v,
    attn_mask=alibi_bias(H, L, S))`` broadcasts it over the batch. To combine it with a
    causal mask, set the masked entries to ``-inf``.

    Args:
        n_heads: number of heads ``H`` (``>= 1``); head ``h`` uses ``alibi_slopes(H)[h]``.
        L: number of queries (``>= 0``).
        S: number of keys (``>= 0``).
        query_offset: position of query 0 (keyword-only, may be negative).
        device: where to build the bias.

    Returns:
        ``(n_heads, L, S)`` float32 tensor, ``<= 0``.
    """
    check_positive_int(n_heads, "n_heads")
    check_positive_int(L, "L", allow_zero=True)
    check_positive_int(S, "S", allow_zero=True)
    if isinstance(query_offset, bool) or not isinstance(query_offset, int):
        raise TypeError(f"query_offset must be an int, got {type(query_offset).__name__}")
    return _alibi_bias(n_heads, L, S, query_offset, device)


def _alibi_bias(n_heads: int, L: int, S: int, query_offset: int,
                device: torch.device | str | None) -> Tensor:
    """The bias of :func:`alibi_bias`: minus each head's slope times the distance."""
    q_pos = torch.arange(L, device=device) + query_offset  # (L,)
    k_pos = torch.arange(S, device=device)  # (S,)
    distance = (q_pos[:, None] - k_pos[None, :]).abs().float()  # (L, S)
    slopes = _alibi_slopes(n_heads).to(device)  # (H,)
    return -slopes[:, None, None] * distance  # (H, L, S)
