"""Chapter 10's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/10_sparse_linear/`` and ``notebooks/10_sparse_linear/``
from this file (see ``tools/exercises/__init__.py``); the cases and named mistakes that
grade the notebook are in ``attnlib/grading/exercises/ch10_sparse_linear.py``.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from torch import Tensor

import attnlib

from collections.abc import Callable, Sequence  # for the annotations

from . import Exercise

INTRO = r"""
You write three sparse attention patterns (a sliding window, Longformer's window plus
global tokens, and BigBird's window, global and random blocks) and linear attention, which
reassociates the products so that the $L \times S$ matrix is never formed."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = "from collections.abc import Callable, Sequence  # for the annotations"


# sliding_window_mask ------------------------------------------------------------------

def sliding_window_mask(L: int, window: int, causal: bool = False) -> Tensor:
    pos = torch.arange(L)
    d = pos[:, None] - pos[None, :]  # (L, L): i - j
    if causal:
        return (d >= 0) & (d <= window)
    return d.abs() <= window


# Slow: Python loops over the query positions i and the key positions j, one entry at a time.
def slow_sliding_window_mask(L: int, window: int, causal: bool = False) -> Tensor:
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            if causal:
                mask[i, j] = 0 <= i - j <= window
            else:
                mask[i, j] = abs(i - j) <= window
    return mask



# longformer_mask ----------------------------------------------------------------------

def longformer_mask(L: int, window: int, global_tokens: Sequence[int] | Tensor) -> Tensor:
    mask = sliding_window_mask(L, window).clone()  # (L, L)
    idx = torch.as_tensor(global_tokens, dtype=torch.long).reshape(-1)
    mask[idx, :] = True  # global tokens see everything
    mask[:, idx] = True  # and are seen by everything
    return mask


# Slow: Python loops over the query positions i and the key positions j, one entry at a time,
# with the global tokens as a Python set.
def slow_longformer_mask(L: int, window: int, global_tokens: Sequence[int] | Tensor) -> Tensor:
    globals_ = set()
    for t in torch.as_tensor(global_tokens, dtype=torch.long).reshape(-1).tolist():
        globals_.add(t if t >= 0 else t + L)  # a negative index counts from the end
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            mask[i, j] = abs(i - j) <= window or i in globals_ or j in globals_
    return mask


def explore_longformer_mask() -> None:
    """The patterns, yours beside attnlib's."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    axes[0].imshow(sliding_window_mask(24, 3).numpy()); axes[0].set_title("sliding window, reach 3")
    axes[1].imshow(longformer_mask(24, 3, [0, 12]).numpy()); axes[1].set_title("yours: + global 0, 12")
    axes[2].imshow(attnlib.longformer_mask(24, 3, [0, 12]).numpy()); axes[2].set_title("attnlib")
    plt.show()
    print("fraction of pairs kept:", longformer_mask(24, 3, [0, 12]).float().mean().item())


# Slow: Python loops over the pairs of blocks (window and global), over the key blocks of each
# query block (the free ones, and the random picks one at a time), then over every pair of
# tokens (i, j) to expand the block pattern one entry at a time.
def slow_bigbird_mask(
    L: int,
    block_size: int,
    n_window_blocks: int,
    n_global_blocks: int,
    n_random_blocks: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    nb = (L + block_size - 1) // block_size  # blocks; the last one may be shorter
    reach = (n_window_blocks - 1) // 2
    g = min(n_global_blocks, nb)
    allowed = torch.zeros(nb, nb, dtype=torch.bool)
    for qb in range(nb):
        for kb in range(nb):
            if abs(qb - kb) <= reach or qb < g or kb < g:
                allowed[qb, kb] = True
    if n_random_blocks > 0:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        for qb in range(g, nb):  # each non-global query block, in order
            free = [kb for kb in range(nb) if not allowed[qb, kb]]  # increasing
            pick = torch.randperm(len(free), generator=generator)[:n_random_blocks]
            for t in pick.tolist():
                allowed[qb, free[t]] = True
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            mask[i, j] = allowed[i // block_size, j // block_size]
    return mask


# bigbird_mask -------------------------------------------------------------------------

def bigbird_mask(
    L: int,
    block_size: int,
    n_window_blocks: int,
    n_global_blocks: int,
    n_random_blocks: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    nb = (L + block_size - 1) // block_size  # blocks; the last one may be shorter
    blocks = torch.arange(nb)
    allowed = (blocks[:, None] - blocks[None, :]).abs() <= (n_window_blocks - 1) // 2  # (nb, nb) window
    g = min(n_global_blocks, nb)
    allowed[:g, :] = True  # global blocks see every block
    allowed[:, :g] = True  # and every block sees them
    if n_random_blocks > 0:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        for qb in range(g, nb):  # each non-global query block, in order
            free = (~allowed[qb]).nonzero().flatten()  # key blocks not yet allowed, increasing
            pick = torch.randperm(free.numel(), generator=generator)[:n_random_blocks]
            allowed[qb, free[pick]] = True
    block_of = torch.arange(L) // block_size  # (L,): the block of each token
    return allowed[block_of[:, None], block_of[None, :]]  # (L, L)


def explore_bigbird_mask() -> None:
    """BigBird's pattern, yours beside attnlib's, and the keys per query as L grows."""
    args = dict(block_size=4, n_window_blocks=3, n_global_blocks=1, n_random_blocks=2)
    yours = bigbird_mask(64, **args, generator=torch.Generator().manual_seed(1))
    ref = attnlib.bigbird_mask(64, **args, generator=torch.Generator().manual_seed(1))
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.5))
    axes[0].imshow(yours.numpy()); axes[0].set_title("yours: L = 64, blocks of 4")
    axes[1].imshow(ref.numpy()); axes[1].set_title("attnlib")
    plt.show()
    print("same as attnlib's:", torch.equal(yours, ref))
    for L in (64, 256, 1024):
        print(f"L = {L:5d}: {bigbird_mask(L, **args).sum().item() / L:.1f} keys per query")


# linear_attention ---------------------------------------------------------------------

def linear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    causal: bool = False,
    feature_map: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    if feature_map is None:
        def feature_map(t: Tensor) -> Tensor:  # elu(t) + 1, without the cancellation of exp(t) - 1 + 1
            return torch.where(t > 0, t + 1, torch.exp(t.clamp(max=0)))
    q = feature_map(query.to(work))  # (..., L, E')
    k = feature_map(key.to(work))  # (..., S, E')
    v = value.to(work)  # (..., S, Ev)
    L, S = q.size(-2), k.size(-2)
    if not causal:
        state = k.transpose(-2, -1) @ v  # (..., E', Ev)
        num = q @ state  # (..., L, Ev)
        den = q @ k.sum(dim=-2).unsqueeze(-1)  # (..., L, 1)
    else:
        state = q.new_zeros((*k.shape[:-2], k.size(-1), v.size(-1)))  # sum of phi(k_j) v_j^T, j <= i
        norm = q.new_zeros((*k.shape[:-2], k.size(-1)))  # sum of phi(k_j), j <= i
        nums, dens = [], []
        for i in range(L):
            if i < S:
                state = state + k[..., i, :, None] * v[..., i, None, :]
                norm = norm + k[..., i, :]
            nums.append((q[..., i, None, :] @ state).squeeze(-2))  # (..., Ev)
            dens.append((q[..., i, :] * norm).sum(dim=-1, keepdim=True))  # (..., 1)
        if L == 0:
            num, den = q.new_zeros((*q.shape[:-1], v.size(-1))), q.new_zeros((*q.shape[:-1], 1))
        else:
            num, den = torch.stack(nums, dim=-2), torch.stack(dens, dim=-2)
    out = num / torch.where(den == 0, torch.ones_like(den), den)
    return out.to(query.dtype)


def explore_linear_attention() -> None:
    """Linear attention is a different function from softmax attention."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 32, 8), torch.randn(1, 32, 8), torch.randn(1, 32, 4)
    ours = linear_attention(q, k, v, causal=True)
    print("largest difference from attnlib:", (ours - attnlib.linear_attention(q, k, v, causal=True)).abs().max().item())
    soft = attnlib.scaled_dot_product_attention(q, k, v, is_causal=True)
    plt.plot(ours[0, :, 0].numpy(), label="linear attention (yours)")
    plt.plot(soft[0, :, 0].numpy(), "--", label="softmax attention")
    plt.xlabel("position"); plt.ylabel("output channel 0"); plt.legend(); plt.show()


# Slow: Python loops over the flattened batch (* heads), then the key positions one at a time
# (adding phi(k_j) v_j^T to the running state) and the query positions one at a time (reading
# it), with torch ops on single rows; causal, the two walks are one loop over the positions.
def slow_linear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    causal: bool = False,
    feature_map: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    if feature_map is None:
        def feature_map(t: Tensor) -> Tensor:  # elu(t) + 1, without the cancellation of exp(t) - 1 + 1
            return torch.where(t > 0, t + 1, torch.exp(t.clamp(max=0)))
    lead = query.shape[:-2]
    L, S, Ev = query.size(-2), key.size(-2), value.size(-1)
    n = math.prod(lead)  # batch * heads
    q, k = feature_map(query.to(work)), feature_map(key.to(work))
    q, k = q.reshape(n, L, q.size(-1)), k.reshape(n, S, k.size(-1))  # (n, L, E'), (n, S, E')
    v = value.to(work).reshape(n, S, Ev)
    out = torch.zeros(n, L, Ev, dtype=work, device=query.device)
    for b in range(n):
        state = torch.zeros(k.size(-1), Ev, dtype=work, device=query.device)  # sum of phi(k_j) v_j^T
        norm = torch.zeros(k.size(-1), dtype=work, device=query.device)  # sum of phi(k_j)
        if not causal:
            for j in range(S):
                state = state + torch.outer(k[b, j], v[b, j])
                norm = norm + k[b, j]
        for i in range(L):
            if causal and i < S:  # key i joins before query i reads the sums
                state = state + torch.outer(k[b, i], v[b, i])
                norm = norm + k[b, i]
            num, den = q[b, i] @ state, q[b, i] @ norm
            if den == 0:  # no keys: the numerator is zero too, and so is the output
                den = torch.ones_like(den)
            out[b, i] = num / den
    return out.reshape(*lead, L, Ev).to(query.dtype)


EXERCISES = [
    Exercise(
        "sliding_window_mask",
        points=2,
        solution=sliding_window_mask,
        guide=r"""
Return the `(L, L)` boolean mask of a local pattern (Chapter 10, section *Attention on a
pattern*). `window` is the **reach**: non-causal, query `i` sees key `j` iff
$|i - j| \le$ `window`; causal, iff $0 \le i - j \le$ `window`.""",
        hints=(
            "`d = i - j` for every pair: `torch.arange(L)[:, None] - torch.arange(L)[None, :]`.",
        ),
        slow=slow_sliding_window_mask,
    ),
    Exercise(
        "longformer_mask",
        points=3,
        solution=longformer_mask,
        guide="""\
Longformer (Chapter 10, section *The three patterns*) adds **global** tokens to the sliding
window: a global token attends to every position (its row is all `True`) and every position
attends to it (its column is all `True`). `global_tokens` is a list of ints or a 1-D integer
tensor; it may be empty and may hold duplicates. Start from your `sliding_window_mask`.""",
        hints=(
            "`torch.as_tensor(global_tokens, dtype=torch.long)` handles a list, an empty list and a tensor.",
            "Then `mask[idx, :] = True` and `mask[:, idx] = True`.",
        ),
        explore=explore_longformer_mask,
        slow=slow_longformer_mask,
    ),
    Exercise(
        "bigbird_mask",
        points=3,
        solution=bigbird_mask,
        guide=r"""
BigBird (Chapter 10, sections *Attention on a pattern* and *The three patterns*) decides
the pattern per pair of **blocks** of `block_size` tokens (the last block may be shorter),
then expands it to tokens: token `i` may attend to token `j` iff block `i // block_size`
may attend to block `j // block_size`. A query block sees

* the `n_window_blocks` blocks centred on its own (distance $\le$ `(n_window_blocks - 1) // 2`);
* the first `n_global_blocks` blocks, which also see every block (rows and columns all `True`);
* `n_random_blocks` more key blocks, drawn among those not yet allowed for it.

The grader compares masks exactly, so draw the random blocks as the reference does: for each
non-global query block in order, list its key blocks not yet allowed in increasing order
(`free`) and allow `free[torch.randperm(len(free), generator=generator)[:n_random_blocks]]`.
With `generator=None` and `n_random_blocks > 0`, use `torch.Generator().manual_seed(0)`.""",
        hints=(
            "Build an `(nb, nb)` boolean `allowed` first, `nb = (L + block_size - 1) // block_size`; "
            "then `block_of = torch.arange(L) // block_size` and `allowed[block_of[:, None], block_of[None, :]]`.",
            "`(~allowed[qb]).nonzero().flatten()` lists the free key blocks of query block `qb`; call "
            "`randperm` for every non-global query block, even when few blocks are free.",
        ),
        explore=explore_bigbird_mask,
        slow=slow_bigbird_mask,
    ),
    Exercise(
        "linear_attention",
        points=5,
        solution=linear_attention,
        guide=r"""
Linear attention (Chapter 10, section *Linear attention*) replaces
$\exp(q \cdot k)$ by $\phi(q)\cdot\phi(k)$:

$$\text{out}_i = \frac{\phi(q_i)^\top \sum_j \phi(k_j) v_j^\top}{\phi(q_i)^\top \sum_j \phi(k_j)},$$

the sums over every key, or over $j \le i$ with `causal` (top-left aligned when `L != S`).
The default $\phi$ is $\mathrm{elu}(x) + 1$, computed as `x + 1` for `x > 0` and `exp(x)`
otherwise. No softmax, no scale. Do not build the `L x S` matrix: non-causal, compute
$\phi(K)^\top V$ first; causal, carry the two sums as a running state. A zero denominator
gives a zero output. Compute float16/bfloat16 in float32.""",
        hints=(
            "Non-causal: `state = phi_k.transpose(-2, -1) @ v` is `(..., E', Ev)`; `norm = phi_k.sum(-2)`.",
            "Causal: loop over positions `i`, adding `phi(k_i) v_i^T` to the state before using it for query `i`; keys past the last query are never used, and queries past the last key see all of them.",
        ),
        explore=explore_linear_attention,
        slow=slow_linear_attention,
    ),
]
