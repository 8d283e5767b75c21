"""Chapter 10, sparse and linear attention: the graded exercises and their mistakes.

=========================  ===================================
exercise id                reference
=========================  ===================================
``sliding_window_mask``    :func:`attnlib.sliding_window_mask`
``longformer_mask``        :func:`attnlib.longformer_mask`
``bigbird_mask``           :func:`attnlib.bigbird_mask`
``linear_attention``       :func:`attnlib.linear_attention`
=========================  ===================================

Each mistake is a small wrong implementation with the reference's signature; the
``_*_variant`` helpers compute every variant of one algorithm with flags, so a mistake
differs from the correct computation in exactly one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..._validate import compute_dtype
from ...linear import elu_feature_map, linear_attention
from ...sparse import bigbird_mask, longformer_mask, sliding_window_mask
from ..core import Case, Exercise, Mistake, register
from ..secret import salted
from .common import F64, NO_ATTNLIB, randn

PAGE = "10_sparse_linear.html"


# ----------------------------------------------------------------------------- masks


def _window_variant(*, total_width: bool = False, strict: bool = False, ignore_causal: bool = False,
                    look_ahead: bool = False, no_abs: bool = False) -> Callable[..., Tensor]:
    def wrong(L: int, window: int, causal: bool = False) -> Tensor:
        pos = torch.arange(L)
        dist = pos[:, None] - pos[None, :]  # i - j
        if causal and not ignore_causal:
            back = dist.neg() if look_ahead else dist
            reach = window - 1 if (total_width or strict) else window
            return (back >= 0) & (back <= reach)
        if total_width:
            return dist.abs() <= window // 2
        if strict:
            return dist.abs() < window
        if no_abs:
            return dist <= window
        return dist.abs() <= window
    return wrong


def _window_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("L = 9, window = 3", (9, 3)),
            Case("L = 9, window = 2, causal", (9, 2, True)),
            Case("L = 6, window = 1", (6, 1)),
        ]
    return [
        Case("window = 0 (diagonal only)", (5, 0)),
        Case("causal, window = 0", (5, 0), {"causal": True}),
        Case("window >= L", (4, 7)),
        Case("L = 1", (1, 2)),
        Case("L = 0", (0, 1)),
        Case("causal, L = 12, window = 5", (12, 5, True)),
    ]


register(Exercise(
    id="sliding_window_mask",
    chapter=10,
    reference=sliding_window_mask,
    section=f"{PAGE}#attention-on-a-pattern",
    make_cases=_window_cases,
    forbidden=NO_ATTNLIB,
    mistakes=(
        Mistake(
            "window taken as the total width",
            "Here window is the reach, the largest allowed distance |i - j| (causal: up to window "
            "keys back, plus the query itself); Longformer's total width w is window = w // 2.",
            f"{PAGE}#attention-on-a-pattern",
            _window_variant(total_width=True),
        ),
        Mistake(
            "off by one: distance < window",
            "Key j is allowed when |i - j| <= window, the limit included.",
            f"{PAGE}#attention-on-a-pattern",
            _window_variant(strict=True),
        ),
        Mistake(
            "ignoring causal",
            "With causal=True a query sees only keys at or before it: 0 <= i - j <= window.",
            f"{PAGE}#attention-on-a-pattern",
            _window_variant(ignore_causal=True),
        ),
        Mistake(
            "a causal window that looks ahead",
            "The causal window is the window keys *before* the query, 0 <= i - j <= window (rows "
            "are queries, columns keys); this allows the keys after it.",
            f"{PAGE}#attention-on-a-pattern",
            _window_variant(look_ahead=True),
        ),
        Mistake(
            "i - j <= window without the absolute value",
            "Without |.| every key after the query passes the test; the non-causal window is "
            "|i - j| <= window, on both sides.",
            f"{PAGE}#attention-on-a-pattern",
            _window_variant(no_abs=True),
        ),
    ),
))


def _longformer_variant(*, rows: bool = True, cols: bool = True, total_width: bool = False,
                        strict: bool = False) -> Callable[..., Tensor]:
    def wrong(L: int, window: int, global_tokens: Any) -> Tensor:
        dist = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs()
        if total_width:
            mask = dist <= window // 2
        elif strict:
            mask = dist < window
        else:
            mask = dist <= window
        idx = torch.as_tensor(list(global_tokens) if not isinstance(global_tokens, Tensor)
                              else global_tokens, dtype=torch.long)
        if rows:
            mask[idx, :] = True
        if cols:
            mask[:, idx] = True
        return mask
    return wrong


def _longformer_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("L = 12, window = 3, global [0, 7]", (12, 3, [0, 7])),
            Case("L = 9, window = 2, global tensor([4])", (9, 2, torch.tensor([4]))),
        ]
    return [
        Case("no global tokens", (5, 1, [])),
        Case("window = 0, duplicate global [2, 2]", (6, 0, [2, 2])),
        Case("window >= L", (4, 5, [1])),
        Case("L = 1", (1, 0, [0])),
        Case("every token global", (8, 1, list(range(8)))),
        Case("L = 20, window = 2, global at both ends", (20, 2, torch.tensor([0, 19]))),
    ]


register(Exercise(
    id="longformer_mask",
    chapter=10,
    reference=longformer_mask,
    section=f"{PAGE}#attention-on-a-pattern",
    make_cases=_longformer_cases,
    forbidden=NO_ATTNLIB,
    mistakes=(
        Mistake(
            "global rows but not global columns",
            "A global token attends to every position (its row) *and* every position attends to "
            "it (its column); with the rows alone, ordinary tokens cannot read the global ones.",
            f"{PAGE}#attention-on-a-pattern",
            _longformer_variant(cols=False),
        ),
        Mistake(
            "global columns but not global rows",
            "A global token must also attend to every position (its row is all True), not only "
            "be attended to.",
            f"{PAGE}#attention-on-a-pattern",
            _longformer_variant(rows=False),
        ),
        Mistake(
            "window taken as the total width",
            "window is the reach on each side, |i - j| <= window; Longformer's total width w is "
            "2 * window.",
            f"{PAGE}#attention-on-a-pattern",
            _longformer_variant(total_width=True),
        ),
        Mistake(
            "off by one: distance < window",
            "Key j is in the window when |i - j| <= window, the limit included.",
            f"{PAGE}#attention-on-a-pattern",
            _longformer_variant(strict=True),
        ),
    ),
))


def _bigbird_variant(*, reach_is_count: bool = False, global_rows: bool = True,
                     random_among_all: bool = False, block_level: bool = False) -> Callable[..., Tensor]:
    """BigBird's pattern, one thing changed (the reference's draw otherwise, draw for draw)."""
    def wrong(L: int, block_size: int, n_window_blocks: int, n_global_blocks: int, n_random_blocks: int,
              generator: torch.Generator | None = None) -> Tensor:
        nb = (L + block_size - 1) // block_size
        blocks = torch.arange(nb)
        reach = n_window_blocks if reach_is_count else n_window_blocks // 2
        allowed = (blocks[:, None] - blocks[None, :]).abs() <= reach  # (nb, nb)
        g = min(n_global_blocks, nb)
        if global_rows:
            allowed[:g, :] = True
        allowed[:, :g] = True
        if n_random_blocks > 0:
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            for qb in range(g, nb):
                if random_among_all:
                    allowed[qb, torch.randperm(nb, generator=gen)[:n_random_blocks]] = True
                else:
                    free = (~allowed[qb]).nonzero().flatten()
                    allowed[qb, free[torch.randperm(free.numel(), generator=gen)[:n_random_blocks]]] = True
        if block_level:
            return allowed
        block_of = torch.arange(L) // block_size
        return allowed[block_of[:, None], block_of[None, :]]
    return wrong


def _bigbird_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """build_args of bigbird_mask: a case names its generator by a seed (a Generator cannot
    cross the process boundary), turned here into ``generator=torch.Generator().manual_seed(seed)``."""
    if "generator_seed" in kwargs:
        kwargs = dict(kwargs)
        kwargs["generator"] = torch.Generator().manual_seed(kwargs.pop("generator_seed"))
    return args, kwargs


def _bigbird_cases(hidden: bool) -> list[Case]:
    # args: L, block_size, n_window_blocks, n_global_blocks, n_random_blocks
    if not hidden:
        return [
            Case("L = 40, blocks of 4, window 3, 1 global, 2 random", (40, 4, 3, 1, 2)),
            Case("L = 30 (last block shorter), blocks of 4, window 1, 2 global, no random",
                 (30, 4, 1, 2, 0)),
            Case("L = 24, blocks of 3, window 3, 1 global, 2 random, your generator",
                 (24, 3, 3, 1, 2), {"generator_seed": salted(7)}),
        ]
    return [
        Case("L = 0", (0, 4, 3, 1, 1)),
        Case("L = 1, no global, no random", (1, 1, 1, 0, 0)),
        Case("block_size > L: one short block", (5, 8, 3, 1, 2)),
        Case("more global blocks than exist", (12, 4, 3, 5, 1)),
        Case("no global blocks, 3 random", (36, 3, 3, 0, 3)),
        Case("more random blocks than remain", (20, 4, 3, 1, 9)),
        Case("window wider than the sequence", (20, 2, 21, 0, 2)),
        Case("blocks of 1 token, window 5, 2 global, 2 random", (15, 1, 5, 2, 2)),
        Case("L = 64, blocks of 4, window 5, 1 global, 3 random, your generator",
             (64, 4, 5, 1, 3), {"generator_seed": salted(123)}),
    ]


register(Exercise(
    id="bigbird_mask",
    chapter=10,
    reference=bigbird_mask,
    section=f"{PAGE}#attention-on-a-pattern",
    make_cases=_bigbird_cases,
    build_args=_bigbird_args,
    forbidden=NO_ATTNLIB,
    mistakes=(
        Mistake(
            "n_window_blocks taken as the reach",
            "n_window_blocks counts the window's blocks, the query's own included: the key blocks "
            "at distance <= (n_window_blocks - 1) // 2 (3 blocks: one on each side).",
            f"{PAGE}#attention-on-a-pattern",
            _bigbird_variant(reach_is_count=True),
        ),
        Mistake(
            "global columns but not global rows",
            "The global blocks attend to every block (their rows are all True) as well as being "
            "attended to by every block (their columns).",
            f"{PAGE}#attention-on-a-pattern",
            _bigbird_variant(global_rows=False),
        ),
        Mistake(
            "random blocks drawn among all blocks",
            "The random blocks of a query block are drawn among the key blocks not already allowed "
            "for it (window and global ones excluded), so it gains n_random_blocks new blocks: "
            "randperm over those free blocks, not over all of them.",
            f"{PAGE}#attention-on-a-pattern",
            _bigbird_variant(random_among_all=True),
        ),
        Mistake(
            "the block mask returned instead of the token mask",
            "The pattern is decided per pair of blocks, then every block is expanded to its "
            "tokens: token i may attend to token j iff block i // block_size may attend to block "
            "j // block_size, an (L, L) mask.",
            f"{PAGE}#the-code",
            _bigbird_variant(block_level=True),
        ),
    ),
))


# ----------------------------------------------------------------------------- linear attention


def _linear_variant(*, honour_causal: bool = True, normalise: bool = True, causal_norm: bool = True,
                    phi: Callable[[Tensor], Tensor] | None = None, phi_on_values: bool = False,
                    scale_queries: bool = False) -> Callable[..., Tensor]:
    """Linear attention written as its quadratic form, one thing changed."""
    def wrong(query: Tensor, key: Tensor, value: Tensor, causal: bool = False,
              feature_map: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        f = feature_map or phi or elu_feature_map
        dtype = compute_dtype(query.dtype)
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        if scale_queries:
            q = q / math.sqrt(q.size(-1))
        if phi_on_values:
            v = f(v)
        a = f(q) @ f(k).transpose(-2, -1)  # (..., L, S)
        a_num = a
        if causal and honour_causal:
            a_num = a * torch.ones(a.shape[-2:], dtype=torch.bool).tril()
        num = a_num @ v
        if not normalise:
            return num.to(query.dtype)
        den = (a_num if causal_norm else a).sum(dim=-1, keepdim=True)
        return (num / torch.where(den == 0, 1.0, den)).to(query.dtype)
    return wrong


def _linear_cases(hidden: bool) -> list[Case]:
    def qkv(lead: tuple[int, ...], L: int, S: int, E: int, Ev: int, seed: int,
            dtype: torch.dtype = F64, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        return (randn(*lead, L, E, seed=seed, dtype=dtype, std=scale),
                randn(*lead, S, E, seed=seed + 1, dtype=dtype, std=scale),
                randn(*lead, S, Ev, seed=seed + 2, dtype=dtype))
    if not hidden:
        return [
            Case("non-causal, L = 7, S = 9", qkv((2, 2), 7, 9, 4, 3, 720)),
            Case("causal, L = S = 10", qkv((2, 2), 10, 10, 4, 3, 723), {"causal": True}),
            Case("causal, L = S = 70 (more than one chunk of 64)", qkv((1, 2), 70, 70, 8, 5, 726),
                 {"causal": True}),
        ]
    return [
        Case("L = 1", qkv((2, 1), 1, 6, 4, 4, 730)),
        Case("causal, L = S = 1", qkv((1, 1), 1, 1, 3, 2, 733), {"causal": True}),
        Case("causal, L = 5 < S = 9 (top-left)", qkv((1, 2), 5, 9, 4, 4, 736), {"causal": True}),
        Case("causal, L = 9 > S = 5 (top-left)", qkv((1, 2), 9, 5, 4, 4, 739), {"causal": True}),
        Case("causal, L = S = 130", qkv((1, 1), 130, 130, 6, 6, 742), {"causal": True}),
        Case("large inputs (x 10)", qkv((2, 2), 8, 8, 4, 4, 745, scale=10.0)),
        Case("3-D inputs (N, L, E), causal", qkv((3,), 6, 6, 4, 2, 748), {"causal": True}),
        Case("bfloat16, causal", qkv((1, 2), 12, 12, 8, 8, 751, dtype=torch.bfloat16), {"causal": True},
             low_precision=True),
    ]


register(Exercise(
    id="linear_attention",
    chapter=10,
    reference=linear_attention,
    section=f"{PAGE}#linear-attention",
    make_cases=_linear_cases,
    forbidden=NO_ATTNLIB,
    mistakes=(
        Mistake(
            "causal attention over all keys",
            "With causal=True position i may only use keys j <= i: the sums of phi(k_j) v_j^T and "
            "phi(k_j) run over the prefix (a running state), not over the whole sequence.",
            f"{PAGE}#linear-attention",
            _linear_variant(honour_causal=False),
        ),
        Mistake(
            "missing the normaliser",
            "Each output is a weighted average: phi(q_i)^T S divided by phi(q_i)^T z, with z the "
            "sum of the phi(k_j). Without the division the weights do not sum to 1.",
            f"{PAGE}#linear-attention",
            _linear_variant(normalise=False),
        ),
        Mistake(
            "a causal numerator with a normaliser over all keys",
            "In the causal case the normaliser z_i must sum phi(k_j) over the same keys j <= i as "
            "the numerator; summed over all keys the weights of each row no longer add up to 1.",
            f"{PAGE}#linear-attention",
            _linear_variant(causal_norm=False),
        ),
        Mistake(
            "exp as the feature map",
            "The feature map is phi(x) = elu(x) + 1 (attnlib.elu_feature_map), applied to each "
            "coordinate; exp(x) is positive too but a different function.",
            f"{PAGE}#linear-attention",
            _linear_variant(phi=torch.exp),
        ),
        Mistake(
            "the feature map applied to the values",
            "phi replaces the similarity exp(q . k): it is applied to queries and keys only; the "
            "values are averaged as they are.",
            f"{PAGE}#linear-attention",
            _linear_variant(phi_on_values=True),
        ),
        Mistake(
            "queries scaled by 1/sqrt(E)",
            "Linear attention has no 1/sqrt(E): a constant scale of the similarity cancels in the "
            "ratio, but scaling q inside phi changes phi(q).",
            f"{PAGE}#linear-attention",
            _linear_variant(scale_queries=True),
        ),
    ),
))
