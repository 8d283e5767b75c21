"""Sparse attention: local windows, global tokens, random blocks (chapter 10).

Dense attention scores every query against every key, so time and memory grow as
``L^2``. The patterns here keep a fixed number of keys per query instead:

* :func:`sliding_window_mask`: each query sees its neighbours within a reach ``window``;
* :func:`longformer_mask`: the window plus a few *global* tokens (Beltagy et al., 2020);
* :func:`bigbird_mask`: window, global and random *blocks* (Zaheer et al., 2020);
* :func:`sliding_window_attention`: the window pattern computed band by band, in
  ``O(L * window)`` memory, never building an ``L x L`` tensor.

The masks are ``(L, L)`` booleans, ``True`` = may attend (the convention of
``torch.nn.functional.scaled_dot_product_attention``), for self-attention over one
sequence of length ``L``; they broadcast against ``(B, H, L, L)`` scores. Building them
costs ``L^2`` memory on purpose: they are for teaching, plotting and checking. Only
:func:`sliding_window_attention` is the efficient version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Generator, Tensor

from ._validate import check_positive_int, compute_dtype
from .attention import _check_qkv

__all__ = [  # attnlib's public names from this module
    "sliding_window_mask",
    "longformer_mask",
    "bigbird_mask",
    "sliding_window_attention",
]


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def sliding_window_mask(L: int, window: int, causal: bool = False) -> Tensor:
    """The local (sliding-window) pattern: each query sees the keys near it (chapter 10).

    ``window`` is the **reach**, the largest allowed distance ``|i - j|``:

    * non-causal: query ``i`` may attend to key ``j`` iff ``|i - j| <= window``, so up
      to ``2 * window + 1`` keys, itself included;
    * causal: iff ``0 <= i - j <= window``, so up to ``window + 1`` keys, itself
      included (fewer near the start of the sequence).

    ``window=0`` keeps only the diagonal; ``window >= L - 1`` allows everything (or the
    full causal triangle). Other conventions, translated: Longformer's window ``w`` is
    the *total* width, ``w / 2`` on each side, so ``window = w // 2``; a Mistral-style
    window of ``W`` tokens *including the current one* (causal) is ``window = W - 1``.

    Args:
        L: sequence length (queries and keys are the same sequence).
        window: reach, ``>= 0``.
        causal: also forbid keys after the query.

    Returns:
        ``(L, L)`` boolean tensor, ``True`` = may attend.
    """
    check_positive_int(L, "L", allow_zero=True)
    check_positive_int(window, "window", allow_zero=True)
    _check_bool(causal, "causal")
    return _window_mask(L, window, causal)


def _window_mask(L: int, window: int, causal: bool) -> Tensor:
    """The band of :func:`sliding_window_mask`: True where ``|i - j| <= window``."""
    pos = torch.arange(L)  # (L,)
    dist = pos[:, None] - pos[None, :]  # (L, L): i - j
    if causal:
        return (dist >= 0) & (dist <= window)  # the key is not after the query
    return dist.abs() <= window


def _check_indices(indices: object, L: int, name: str) -> Tensor:
    """Turn a sequence of ints or a 1-D integer tensor into a tensor of positions < L."""
    if isinstance(indices, Tensor):
        if indices.ndim != 1 or indices.is_floating_point() or indices.is_complex() \
                or indices.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a 1-D integer tensor or a sequence of ints, got a tensor of "
                f"dtype {indices.dtype} and shape {tuple(indices.shape)}"
            )
        idx = indices.detach().to("cpu", torch.long)
    elif isinstance(indices, Sequence) and not isinstance(indices, (str, bytes)):
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"{name} must hold ints, got {type(i).__name__} ({i!r})")
        idx = torch.tensor(list(indices), dtype=torch.long)
    else:
        raise TypeError(
            f"{name} must be a sequence of ints or a 1-D integer tensor, got "
            f"{type(indices).__name__}"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= L):
        raise ValueError(
            f"every index in {name} must be in [0, L) = [0, {L}), got {idx.tolist()}"
        )
    return idx


def longformer_mask(L: int, window: int, global_tokens: Sequence[int] | Tensor) -> Tensor:
    """Longformer's pattern: a sliding window plus global tokens (chapter 10).

    From Beltagy, Peters and Cohan, "Longformer: The Long-Document Transformer" (2020).
    Every query sees the keys within reach ``window`` (``|i - j| <= window``, see
    :func:`sliding_window_mask`). In addition each *global* token ``g`` (e.g. ``[CLS]`` or
    the question tokens in QA) attends to every position (row ``g`` all ``True``) and is
    attended to by every position (column ``g`` all ``True``): two hops connect any pair.
    The pattern is symmetric.

    Args:
        L: sequence length.
        window: reach of the local window, ``>= 0`` (Longformer's total width ``w`` is
            ``2 * window``).
        global_tokens: positions of the global tokens, a sequence of ints or a 1-D
            integer tensor, each in ``[0, L)``; duplicates are fine, may be empty.

    Returns:
        ``(L, L)`` boolean tensor, ``True`` = may attend.
    """
    mask = sliding_window_mask(L, window)  # (L, L)
    idx = _check_indices(global_tokens, L, "global_tokens")  # (G,)
    return _add_global_tokens(mask, idx)


def _add_global_tokens(mask: Tensor, idx: Tensor) -> Tensor:
    """Longformer's global tokens: rows and columns ``idx`` of ``mask`` all True."""
    mask[idx, :] = True  # global tokens see everything
    mask[:, idx] = True  # and everything sees them
    return mask


def bigbird_mask(
    L: int,
    block_size: int,
    n_window_blocks: int,
    n_global_blocks: int,
    n_random_blocks: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """BigBird's pattern of window, global and random blocks (chapter 10).

    From Zaheer et al., "Big Bird: Transformers for Longer Sequences" (NeurIPS 2020).
    The sequence is cut into blocks of ``block_size`` tokens (the last one is shorter if
    ``block_size`` does not divide ``L``), and the pattern is decided per pair of blocks:
    token ``i`` may attend to token ``j`` iff block ``i // block_size`` may attend to
    block ``j // block_size``. A query block may attend to:

    * **window**: the ``n_window_blocks`` key blocks centred on its own, i.e. blocks at
      distance ``<= (n_window_blocks - 1) // 2`` (odd, so the window is centred; clipped
      at the ends of the sequence);
    * **global**: the first ``n_global_blocks`` blocks, which also attend to every block
      (their rows and columns are all ``True``); more than exist means all of them;
    * **random**: for each non-global query block, ``n_random_blocks`` further key blocks
      drawn uniformly without replacement among those not already allowed for it (all of
      them if fewer remain). Random blocks are per query block, so this part is not
      symmetric.

    The random draw uses ``generator`` (a CPU ``torch.Generator``), one ``randperm`` per
    non-global query block in order; the generator is advanced only when
    ``n_random_blocks > 0``. The default is a fresh generator seeded with 0, so the
    default mask is deterministic: pass your own generator to vary it.

    Args:
        L: sequence length.
        block_size: tokens per block, ``>= 1``.
        n_window_blocks: odd, ``>= 1``; 3 is BigBird's choice.
        n_global_blocks: ``>= 0``.
        n_random_blocks: ``>= 0``.
        generator: source of randomness for the random blocks.

    Returns:
        ``(L, L)`` boolean tensor, ``True`` = may attend.
    """
    check_positive_int(L, "L", allow_zero=True)
    check_positive_int(block_size, "block_size")
    check_positive_int(n_window_blocks, "n_window_blocks")
    if n_window_blocks % 2 == 0:
        raise ValueError(
            f"n_window_blocks must be odd so the window is centred on the query's own block, "
            f"got {n_window_blocks}"
        )
    check_positive_int(n_global_blocks, "n_global_blocks", allow_zero=True)
    check_positive_int(n_random_blocks, "n_random_blocks", allow_zero=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if n_random_blocks > 0 and generator is None:
        generator = torch.Generator().manual_seed(0)
    allowed = _bigbird_blocks(
        math.ceil(L / block_size), n_window_blocks, n_global_blocks, n_random_blocks, generator
    )  # (nb, nb)
    block_of = torch.arange(L) // block_size  # (L,): the block of each token
    return allowed[block_of[:, None], block_of[None, :]]  # (L, L)


def _bigbird_blocks(
    nb: int, n_window: int, n_global: int, n_random: int, gen: Generator | None
) -> Tensor:
    """Which of ``nb`` query blocks (rows) may see which key blocks, (nb, nb)."""
    blocks = torch.arange(nb)  # (nb,)
    allowed = (blocks[:, None] - blocks[None, :]).abs() <= n_window // 2  # window
    n_global = min(n_global, nb)
    allowed[:n_global, :] = True  # global blocks see every block
    allowed[:, :n_global] = True  # and every block sees them
    if n_random > 0:
        for qb in range(n_global, nb):  # global rows are already full
            free = (~allowed[qb]).nonzero().flatten()  # blocks not yet allowed
            order = torch.randperm(free.numel(), generator=gen)  # in random order
            allowed[qb, free[order[:n_random]]] = True
    return allowed


BLOCK_SIZE = 64
"""Queries per block in :func:`sliding_window_attention` (fewer if ``L`` is shorter).

A block of ``b`` queries scores ``b + 2 * window`` keys, of which each query needs only
``2 * window + 1``, so small blocks waste less work; too small and the many tiny matrix
products are slow. Measured on this course's 2-core CPU (one thread, d=64, window=256,
one head): b=64 took 0.021 s at L=4096 and 0.13 s at L=16384; b=32 was up to 2x slower at
L=4096, b=128 20-80% slower and b=256 (= window) 30-80% slower. Dense attention with the
mask (``F.scaled_dot_product_attention``) took 0.15 s and 2.5 s.
"""


def sliding_window_attention(
    query: Tensor, key: Tensor, value: Tensor, window: int, causal: bool = False
) -> Tensor:
    """Sliding-window self-attention, computed band by band (chapter 10).

    Equal to dense attention with ``attn_mask=sliding_window_mask(L, window, causal)``
    and the default scale ``1 / sqrt(E)``: query ``i`` attends to the keys ``j`` with
    ``|i - j| <= window`` (or ``0 <= i - j <= window`` when ``causal``). But no ``L x L``
    score matrix or mask is ever built. The queries are cut into blocks of ``b`` rows
    (:data:`BLOCK_SIZE`, 64, or ``L`` if shorter); block ``[s, s + b)`` needs only the keys
    in ``[s - window, s + b + window)`` (``[s - window, s + b)`` when causal), so its
    scores are ``(b, b + 2 * window)`` (``(b, b + window)``). All blocks are computed at
    once: the keys are zero-padded at both ends and viewed as overlapping windows
    (``Tensor.unfold``), and keys outside the band or outside the sequence are masked.
    Memory and time are ``O(L * (b + 2 * window))`` per batch-and-head instead of
    ``O(L^2)``; a ``window`` of ``L`` or more is clipped to ``L - 1`` (everything).

    Args:
        query: ``(..., L, E)``, e.g. ``(B, H, L, head_dim)``.
        key: ``(..., L, E)``: the same length, this is self-attention.
        value: ``(..., L, Ev)``.
        window: reach, ``>= 0`` (see :func:`sliding_window_mask` for the convention).
        causal: forbid keys after the query.

    Returns:
        ``(..., L, Ev)`` in the query's dtype; fp16/bf16 are computed in fp32.
    """
    _check_qkv(query, key, value, enable_gqa=False)
    check_positive_int(window, "window", allow_zero=True)
    _check_bool(causal, "causal")
    L, S = query.size(-2), key.size(-2)
    if L != S:
        raise ValueError(
            f"sliding_window_attention is self-attention: query and key must have the same "
            f"length, got L={L} (query {tuple(query.shape)}) and S={S} (key {tuple(key.shape)})"
        )
    dtype = compute_dtype(query.dtype)
    try:
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the leading (batch, head) dimensions of query {tuple(query.shape)}, key "
            f"{tuple(key.shape)} and value {tuple(value.shape)} do not broadcast"
        ) from None
    if L == 0:
        return query.new_zeros(*batch, 0, value.size(-1))
    w = min(window, L - 1)  # a reach beyond the sequence changes nothing
    out = _banded_attention(query.to(dtype), key.to(dtype), value.to(dtype), w, causal)
    return out.to(query.dtype)


def _banded_attention(
    q: Tensor, k: Tensor, v: Tensor, w: int, causal: bool
) -> Tensor:
    """The core of :func:`sliding_window_attention`: blocks of queries, each against
    the band of keys it needs: (..., L, E) -> (..., L, Ev), with w <= L - 1."""
    L = q.size(-2)
    b = min(BLOCK_SIZE, L)  # queries per block
    nb = math.ceil(L / b)  # number of query blocks
    reach = w if causal else 2 * w  # a block's keys span b + reach positions
    width = b + reach
    pad = torch.nn.functional.pad

    # Queries: pad to a whole number of blocks and cut into blocks.
    q = pad(q, (0, 0, 0, nb * b - L)).unflatten(-2, (nb, b))  # (..., nb, b, E)
    # Keys and values: `w` zeros in front (key -w sits at padded index 0), enough
    # behind; then view block n's keys, positions [n*b - w, n*b - w + width).
    right = nb * b - L + reach - w
    k = pad(k, (0, 0, w, right)).unfold(-2, width, b)  # (..., nb, E, width), a view
    v = pad(v, (0, 0, w, right)).unfold(-2, width, b)  # (..., nb, Ev, width)
    v = v.transpose(-2, -1)  # (..., nb, width, Ev)

    # Query r of block n is position i = n*b + r, key c is j = n*b - w + c, so
    # i - j = r + w - c: the band is r <= c <= r + reach, the same in every block.
    r = torch.arange(b, device=q.device)[:, None]  # (b, 1)
    c = torch.arange(width, device=q.device)[None, :]  # (1, width)
    outside_band = (c < r) | (c > r + reach)  # (b, width)
    # A finite fill, not -inf: padded query rows past L may see no key at all and
    # must give a finite softmax (they are dropped, but NaN would poison gradients).
    fill = torch.finfo(q.dtype).min
    scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k  # (..., nb, b, width)
    scores.masked_fill_(outside_band, fill)  # one (b, width) mask for every block
    # The zero-padding keys (j < 0 or j >= L) are only in the first and last blocks.
    j = torch.arange(nb, device=q.device)[:, None] * b - w + c  # (nb, width)
    padding = (j < 0) | (j >= L)  # (nb, width)
    edge = padding.any(dim=-1).nonzero().flatten()  # (n_edge,): a few block indices
    edge_scores = scores[..., edge, :, :].masked_fill(padding[edge, None], fill)
    scores[..., edge, :, :] = edge_scores
    out = torch.softmax(scores, dim=-1) @ v  # (..., nb, b, Ev)
    return out.flatten(-3, -2)[..., :L, :]  # (..., L, Ev)
