"""Chapter 2's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/02_queries_keys_values/`` and
``notebooks/02_queries_keys_values/`` from this file (see ``tools/exercises/__init__.py``);
the cases and named mistakes that grade the notebook are in
``attnlib/grading/exercises/ch02_queries_keys_values.py``.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from torch import Tensor

import attnlib

from . import Exercise

INTRO = """\
You write the two functions every later chapter builds on: a softmax that cannot overflow,
and scaled dot-product attention with PyTorch's arguments and mask conventions."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = ""


# softmax ------------------------------------------------------------------------------

def softmax(x: Tensor, dim: int = -1) -> Tensor:
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    z = x.to(work)
    peak = z.amax(dim=dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # all -inf row: shift by 0
    e = torch.exp(z - peak)
    total = e.sum(dim=dim, keepdim=True)
    total = torch.where(total == 0, torch.ones_like(total), total)  # all -inf row: zeros, not NaN
    return (e / total).to(x.dtype)


def explore_softmax() -> None:
    """Your softmax on huge logits, beside attnlib's."""
    logits = torch.tensor([[1000.0, 1001.0, 1002.0, 999.0]])
    ours = softmax(logits)
    theirs = attnlib.softmax(logits)
    print("yours:  ", ours)
    print("attnlib:", theirs)
    print("naive:  ", torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True), "(overflow)")
    plt.bar(range(4), ours[0].numpy(), alpha=0.6, label="yours")
    plt.bar(range(4), theirs[0].numpy(), alpha=0.6, label="attnlib")
    plt.legend(); plt.xlabel("key"); plt.ylabel("weight"); plt.show()


# Slow: a Python loop over the rows (every position of the other axes), each row shifted
# by its own maximum, exponentiated and normalised on its own.
def slow_softmax(x: Tensor, dim: int = -1) -> Tensor:
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    z = x.to(work).movedim(dim, -1)  # the axis of the softmax last
    n = z.size(-1)
    rows = z.reshape(math.prod(z.shape[:-1]), n)  # (number of rows, n)
    out = torch.zeros_like(rows)
    for r in range(rows.size(0)):
        row = rows[r]
        peak = row.max()
        if not torch.isfinite(peak):  # an all -inf row: shift by 0
            peak = torch.zeros_like(peak)
        e = torch.exp(row - peak)
        total = e.sum()
        if total == 0:  # an all -inf row: zeros, not NaN
            total = torch.ones_like(total)
        out[r] = e / total
    return out.reshape(z.shape).movedim(-1, dim).to(x.dtype)


# scaled_dot_product_attention ---------------------------------------------------------

def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q, k, v = query.to(work), key.to(work), value.to(work)
    if enable_gqa and k.size(-3) != q.size(-3):  # grouped-query attention: share each KV head
        n_rep = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(n_rep, dim=-3)
        v = v.repeat_interleave(n_rep, dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., L, S)
    L, S = scores.shape[-2:]
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = torch.where(attn_mask, scores, torch.full_like(scores, float("-inf")))
        else:
            scores = scores + attn_mask.to(work)
    weights = softmax(scores, dim=-1)  # a fully masked row gives zeros
    if dropout_p > 0.0:
        keep = torch.rand(weights.shape, generator=generator, device=weights.device) >= dropout_p
        weights = weights * keep / (1.0 - dropout_p)
    return (weights @ v).to(query.dtype)  # (..., L, Ev)


def explore_scaled_dot_product_attention() -> None:
    """A soft lookup. Each query is close to one key; which value does it get?"""
    torch.manual_seed(0)
    keys = torch.eye(4, 8)                 # 4 keys, 8 dimensions
    values = torch.arange(4.0)[:, None]    # value j is the number j
    queries = 3 * keys[[2, 0, 3]] + 0.3 * torch.randn(3, 8)
    out = scaled_dot_product_attention(queries, keys, values)
    ref = attnlib.scaled_dot_product_attention(queries, keys, values)
    print("yours:  ", out.squeeze(-1))
    print("attnlib:", ref.squeeze(-1), "(queries were built near keys 2, 0, 3)")
    w = attnlib.attention_weights(queries, keys)
    plt.imshow(w.numpy(), cmap="viridis"); plt.colorbar(); plt.xlabel("key"); plt.ylabel("query")
    plt.title("attention weights (attnlib)"); plt.show()


# Slow: Python loops over the batch (every index of the leading axes), the query rows and
# the keys, one dot product and one mask entry at a time; the softmax then runs on one row
# of scores, and the output row is a loop adding up weight times value.
def slow_scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q, k, v = query.to(work), key.to(work), value.to(work)
    if enable_gqa and k.size(-3) != q.size(-3):  # query head h reads key/value head h // n_rep
        n_rep = q.size(-3) // k.size(-3)
        k = torch.stack([k[..., h // n_rep, :, :] for h in range(q.size(-3))], dim=-3)
        v = torch.stack([v[..., h // n_rep, :, :] for h in range(q.size(-3))], dim=-3)
    L, E = q.shape[-2:]
    S, Ev = v.shape[-2:]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    score_lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2],
                                        *([] if attn_mask is None else [attn_mask.shape[:-2]]))
    lead = torch.broadcast_shapes(score_lead, v.shape[:-2])  # the output's leading axes
    N = math.prod(lead)
    q = q.expand(*lead, L, E).reshape(N, L, E)
    k = k.expand(*lead, S, E).reshape(N, S, E)
    v = v.expand(*lead, S, Ev).reshape(N, S, Ev)
    mask = None if attn_mask is None else attn_mask.expand(*lead, L, S).reshape(N, L, S)
    keep = None
    if dropout_p > 0.0:  # drawn at once, as for the whole (..., L, S) tensor of weights
        keep = torch.rand((*score_lead, L, S), generator=generator, device=q.device) >= dropout_p
        keep = keep.expand(*lead, L, S).reshape(N, L, S)
    out = torch.zeros(N, L, Ev, dtype=work, device=q.device)
    for n in range(N):
        for i in range(L):
            scores = torch.zeros(S, dtype=work, device=q.device)
            for j in range(S):
                s = (q[n, i] * k[n, j]).sum() * scale
                if is_causal and j > i:  # query i sees keys 0..i
                    s = torch.full_like(s, float("-inf"))
                if mask is not None:
                    if mask.dtype == torch.bool:
                        if not mask[n, i, j]:
                            s = torch.full_like(s, float("-inf"))
                    else:
                        s = s + mask[n, i, j].to(work)
                scores[j] = s
            weights = softmax(scores, dim=-1)  # a fully masked row gives zeros
            if keep is not None:
                weights = weights * keep[n, i] / (1.0 - dropout_p)
            row = torch.zeros(Ev, dtype=work, device=q.device)
            for j in range(S):
                row = row + weights[j] * v[n, j]
            out[n, i] = row
    return out.reshape(*lead, L, Ev).to(query.dtype)  # (..., L, Ev)


EXERCISES = [
    Exercise(
        "softmax",
        points=3,
        solution=softmax,
        guide="""\
Write a numerically stable softmax along `dim` (Chapter 2, section *A softmax that cannot
overflow*). Subtract the maximum along `dim` before exponentiating: the result is unchanged,
and logits of $10^4$ no longer overflow. Two details the naive formula gets wrong:

* a row that is entirely `-inf` (every key masked) must come out as zeros, not NaN;
* float16/bfloat16 inputs are computed in float32 and cast back at the end;
* `x` itself stays as it was: `x - m` makes a new tensor, `x -= m` would overwrite the
  caller's logits (the grader checks every input after the call).""",
        hints=(
            "`x.amax(dim=dim, keepdim=True)` keeps the axis, so the subtraction broadcasts.",
            "The maximum of an all `-inf` row is `-inf`, and `-inf - (-inf)` is NaN: replace a non-finite maximum by 0 (`torch.where` with `torch.isfinite`).",
            "Such a row then sums to 0: divide by 1 instead of 0 there.",
            "`torch.softmax`, `F.softmax` and `Tensor.softmax` are off limits.",
        ),
        explore=explore_softmax,
        slow=slow_softmax,
    ),
    Exercise(
        "scaled_dot_product_attention",
        points=5,
        solution=scaled_dot_product_attention,
        guide=r"""
Write $\mathrm{softmax}(QK^\top \cdot \text{scale} + \text{mask})\,V$ with the arguments of
`torch.nn.functional.scaled_dot_product_attention` (Chapter 2, sections *All queries at once*
and *The code*). The conventions, all tested:

* `scale=None` means $1/\sqrt{E}$, with $E$ the last dimension of the query;
* a boolean `attn_mask` marks with `True` the keys a query **may** attend to; a floating
  mask is **added** to the scores; either one broadcasts against `(..., L, S)`;
* `is_causal=True` lets query `i` see keys `0..i`, aligned top-left even when `L != S`, and
  combines with `attn_mask` when both are given;
* a query row whose keys are all masked gets zero weights (and a zero output), not NaN;
* float16/bfloat16 are computed in float32; the output has the query's dtype;
* the inputs stay as they were: scale into a new tensor, not with `query *= scale`.""",
        hints=(
            "Compute the scores with `query @ key.transpose(-2, -1)`: shape `(..., L, S)`.",
            "Turn every mask into `-inf` entries of the scores (`torch.where(mask, scores, -inf)` for a boolean one), then use your `softmax` from above.",
            "`torch.ones(L, S, dtype=torch.bool).tril()` is the top-left causal mask.",
            "`F.scaled_dot_product_attention` is off limits; so is attnlib.",
        ),
        explore=explore_scaled_dot_product_attention,
        slow=slow_scaled_dot_product_attention,
    ),
]
