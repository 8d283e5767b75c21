"""Chapter 3's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/03_scaling/`` and ``notebooks/03_scaling/`` from this
file (see ``tools/exercises/__init__.py``); the cases and named mistakes that grade the
notebook are in ``attnlib/grading/exercises/ch03_scaling.py``.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from torch import Tensor

import attnlib

from . import Exercise

INTRO = r"""
You write the attention weights on their own, the place where the $1/\sqrt{d_k}$ factor
acts, and the entropy that measures what happens to them without it: rows that collapse to
one-hot as $d_k$ grows."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = ""


# attention_weights --------------------------------------------------------------------

def attention_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q, k = query.to(work), key.to(work)
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., L, S)
    L, S = scores.shape[-2:]
    neg_inf = torch.full_like(scores, float("-inf"))
    if is_causal:
        scores = torch.where(torch.ones(L, S, dtype=torch.bool, device=scores.device).tril(), scores, neg_inf)
    if attn_mask is not None:
        scores = torch.where(attn_mask, scores, neg_inf) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.to(work)
    peak = scores.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    e = torch.exp(scores - peak)
    total = e.sum(dim=-1, keepdim=True)
    return (e / torch.where(total == 0, torch.ones_like(total), total)).to(query.dtype)


def explore_attention_weights() -> None:
    """The largest weight of each row, with and without the 1/sqrt(d_k) factor."""
    torch.manual_seed(0)
    d_k = 512
    q, k = torch.randn(64, d_k), torch.randn(64, d_k)
    scaled = attention_weights(q, k)
    unscaled = attention_weights(q, k, scale=1.0)
    print("largest difference from attnlib:", (scaled - attnlib.attention_weights(q, k)).abs().max().item())
    plt.hist(scaled.amax(-1).numpy(), bins=20, alpha=0.6, label="scale = 1/sqrt(d_k)")
    plt.hist(unscaled.amax(-1).numpy(), bins=20, alpha=0.6, label="scale = 1 (saturated)")
    plt.xlabel("largest weight in the row"); plt.legend(); plt.show()


# Slow: Python loops over the batch (every index of the leading axes), the query rows and
# the keys, one dot product and one mask entry at a time; the stable softmax then runs on
# one row of scores.
def slow_attention_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q, k = query.to(work), key.to(work)
    if enable_gqa and k.size(-3) != q.size(-3):  # query head h reads key head h // n_rep
        n_rep = q.size(-3) // k.size(-3)
        k = torch.stack([k[..., h // n_rep, :, :] for h in range(q.size(-3))], dim=-3)
    L, E = q.shape[-2:]
    S = k.size(-2)
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2],
                                  *([] if attn_mask is None else [attn_mask.shape[:-2]]))
    N = math.prod(lead)
    q = q.expand(*lead, L, E).reshape(N, L, E)
    k = k.expand(*lead, S, E).reshape(N, S, E)
    mask = None if attn_mask is None else attn_mask.expand(*lead, L, S).reshape(N, L, S)
    out = torch.zeros(N, L, S, dtype=work, device=q.device)
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
            peak = scores.max()
            if not torch.isfinite(peak):  # every key masked: shift by 0
                peak = torch.zeros_like(peak)
            e = torch.exp(scores - peak)
            total = e.sum()
            if total == 0:  # every key masked: zero weights, not NaN
                total = torch.ones_like(total)
            out[n, i] = e / total
    return out.reshape(*lead, L, S).to(query.dtype)  # (..., L, S)


# attention_entropy --------------------------------------------------------------------

def attention_entropy(weights: Tensor, dim: int = -1) -> Tensor:
    work = torch.float32 if weights.dtype in (torch.float16, torch.bfloat16) else weights.dtype
    p = weights.to(work)
    log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))  # 0 where p = 0: no -inf, no NaN
    return (-(p * log_p)).sum(dim=dim).to(weights.dtype)


def explore_attention_entropy() -> None:
    """The mean entropy of the weights against d_k, with and without the
    1/sqrt(d_k) factor (the chapter's figure, with your entropy).
    """
    torch.manual_seed(0)
    d_ks = [1, 4, 16, 64, 256, 1024]
    for label, scale in (("scale = 1/sqrt(d_k)", None), ("scale = 1 (unscaled)", 1.0)):
        means = []
        for d in d_ks:
            w = attnlib.attention_weights(torch.randn(256, d), torch.randn(64, d), scale=scale)  # (256, 64)
            means.append(attention_entropy(w).mean().item())
        print(f"{label:22s}", " ".join(f"{h:5.2f}" for h in means))
        plt.semilogx(d_ks, means, "o-", label=label)
    plt.axhline(math.log(64), color="gray", linestyle="--", label="ln 64 (uniform weights)")
    plt.xlabel("d_k"); plt.ylabel("mean entropy of a row (nats)"); plt.legend(); plt.show()


# Slow: a Python loop over the rows (every position of the other axes) and, inside, over
# the weights of the row, adding up -p ln p one weight at a time.
def slow_attention_entropy(weights: Tensor, dim: int = -1) -> Tensor:
    work = torch.float32 if weights.dtype in (torch.float16, torch.bfloat16) else weights.dtype
    p = weights.to(work).movedim(dim, -1)  # the axis summed over last
    n = p.size(-1)
    rows = p.reshape(math.prod(p.shape[:-1]), n)  # (number of rows, n)
    out = torch.zeros(rows.size(0), dtype=work, device=p.device)
    for r in range(rows.size(0)):
        h = torch.zeros((), dtype=work, device=p.device)
        for j in range(n):
            w = rows[r, j]
            log_w = torch.log(w) if w > 0 else torch.zeros_like(w)  # 0 ln 0 = 0
            h = h - w * log_w
        out[r] = h
    return out.reshape(p.shape[:-1]).to(weights.dtype)


EXERCISES = [
    Exercise(
        "attention_weights",
        points=4,
        solution=attention_weights,
        guide=r"""
Return the weights $\mathrm{softmax}(QK^\top \cdot \text{scale} + \text{mask})$ of shape
`(..., L, S)` (Chapter 3, sections *The variance of a dot product* and *The code*). The
default scale is $1/\sqrt{E}$: without it, the variance of a dot product grows with $E$ and
the softmax saturates. The mask conventions are those of PyTorch (and of Chapter 2):
boolean `True` = may attend, floating = added, `is_causal` top-left aligned and combined with
`attn_mask`, a fully masked row gives zeros. Compute float16/bfloat16 in float32 and return
the query's dtype.""",
        hints=(
            "`scale` may be given: use `1 / math.sqrt(E)` only when it is `None`.",
            "Write the stable softmax inline (shift by the row maximum, zero for an all `-inf` row): attnlib and `torch.softmax` are off limits here.",
            "With `enable_gqa`, key head `h // (H_q / H_kv)` serves query head `h`: `repeat_interleave` on axis -3.",
        ),
        explore=explore_attention_weights,
        slow=slow_attention_weights,
    ),
    Exercise(
        "attention_entropy",
        points=3,
        solution=attention_entropy,
        guide=r"""
The entropy $H(p) = -\sum_j p_j \ln p_j$ of a row of weights measures how spread it is:
$\ln S$ for uniform weights over $S$ keys, 0 for a one-hot row (Chapter 3, sections *Why
large logits stop the gradient* and *Without the scale, the softmax saturates*). Return it
along `dim`, in nats: the result has the shape of `weights` without that axis. A weight of
exactly 0 (a masked key, or a row with all its keys masked) contributes $0 \ln 0 = 0$, the
limit of $p \ln p$: never NaN. Compute float16/bfloat16 in float32 and return the input's
dtype.""",
        hints=(
            "`p * torch.log(p)` is `0 * -inf = NaN` at `p = 0`: take the log of `torch.where(p > 0, p, 1)` instead, whose log is 0 there.",
            "`torch.special.entr`, `torch.xlogy` and `torch.distributions.Categorical` are off limits: they handle $0 \\ln 0$ for you.",
        ),
        explore=explore_attention_entropy,
        slow=slow_attention_entropy,
    ),
]
