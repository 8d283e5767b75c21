"""Chapter 9's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/09_flash_attention/`` and
``notebooks/09_flash_attention/`` from this file (see ``tools/exercises/__init__.py``); the
cases and named mistakes that grade the notebook are in
``attnlib/grading/exercises/ch09_flash_attention.py``.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from torch import Tensor

import attnlib
from attnlib.flash import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q  # the default tile sizes

from . import Exercise

INTRO = r"""
You write exact attention that never holds the whole $L \times S$ score matrix: a loop over
tiles of queries and keys with the online softmax. Then its backward pass, which rebuilds
each tile of weights from the saved log-sum-exp instead of storing them. The grader checks
the values and also that no tensor as large as the score matrix is ever built."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = "from attnlib.flash import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q  # the default tile sizes"


# flash_attention ----------------------------------------------------------------------

def flash_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q_all, k_all, v_all = query.to(work), key.to(work), value.to(work)
    L, S, Ev = q_all.size(-2), k_all.size(-2), v_all.size(-1)
    lead = q_all.shape[:-2]
    outs, lses = [], []
    for q0 in range(0, L, block_q):
        q = q_all[..., q0:q0 + block_q, :]  # (..., bq, E)
        bq = q.size(-2)
        m = q.new_full((*lead, bq), float("-inf"))  # running maximum
        l = q.new_zeros((*lead, bq))  # running sum of exp(score - m)
        acc = q.new_zeros((*lead, bq, Ev))  # running exp(score - m) @ V
        k_stop = min(S, q0 + bq) if is_causal else S  # later key tiles are all masked
        for k0 in range(0, k_stop, block_k):
            k = k_all[..., k0:k0 + block_k, :]
            v = v_all[..., k0:k0 + block_k, :]
            s = (q @ k.transpose(-2, -1)) * scale  # (..., bq, bk): one tile
            if is_causal:
                rows = torch.arange(q0, q0 + bq, device=s.device)[:, None]
                cols = torch.arange(k0, k0 + k.size(-2), device=s.device)[None, :]
                s = s.masked_fill(cols > rows, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            p = torch.exp(s - shift[..., None])
            rescale = torch.exp(m - shift)  # 0 while m is still -inf
            l = rescale * l + p.sum(dim=-1)
            acc = rescale[..., None] * acc + p @ v
            m = m_new
        empty = l == 0
        safe_l = torch.where(empty, torch.ones_like(l), l)
        outs.append(acc / safe_l[..., None])
        m_fin = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        lses.append(torch.where(empty, torch.full_like(l, float("-inf")), m_fin + torch.log(safe_l)))
    if outs:
        out, lse = torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)
    else:  # L == 0
        out, lse = q_all.new_zeros((*lead, 0, Ev)), q_all.new_zeros((*lead, 0))
    out = out.to(query.dtype)
    return (out, lse) if return_lse else out


def explore_flash_attention() -> None:
    """The tiled result against the reference, for several tile sizes."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 16, dtype=torch.float64) for _ in range(3))
    exact = attnlib.scaled_dot_product_attention(q, k, v, is_causal=True)
    blocks = [1, 7, 16, 33, 100]
    errors = [(flash_attention(q, k, v, is_causal=True, block_q=b, block_k=b) - exact).abs().max().item()
              for b in blocks]
    for b, e in zip(blocks, errors):
        print(f"blocks {b:3d} x {b:3d}: largest error {e:.2e}")
    plt.semilogy(blocks, [max(e, 1e-18) for e in errors], "o-"); plt.xlabel("block size")
    plt.ylabel("largest error against exact attention"); plt.show()


# Slow: Python loops over the flattened batch * heads, then the query rows one at a time, then
# their keys one at a time: a scalar online softmax per row (Python floats m and l), with a torch
# op per (query, key) pair for the score (a dot product of two rows) and the accumulator (a row);
# no tiles (block_q and block_k change nothing). This is the submission of issue 12 that a
# per-case time limit of 30 s once failed.
def slow_flash_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    lead = query.shape[:-2]
    L, S, E, Ev = query.size(-2), key.size(-2), query.size(-1), value.size(-1)
    n = math.prod(lead)  # batch * heads
    q = query.to(work).reshape(n, L, E)
    k = key.to(work).reshape(n, S, E)
    v = value.to(work).reshape(n, S, Ev)
    out = torch.zeros(n, L, Ev, dtype=work, device=query.device)
    lse = torch.full((n, L), -math.inf, dtype=work, device=query.device)  # stays -inf for a row without keys
    for b in range(n):
        for i in range(L):
            m, l = -math.inf, 0.0  # running max, running sum of exp(s - m)
            acc = torch.zeros(Ev, dtype=work, device=query.device)  # running exp(s - m) @ V
            last = min(S, i + 1) if is_causal else S  # top-left causal: keys 0..i
            for j in range(last):
                s = scale * float(q[b, i] @ k[b, j])  # one score
                m_new = max(m, s)
                rescale = math.exp(m - m_new)  # 0 while m is still -inf
                p = math.exp(s - m_new)
                l = rescale * l + p
                acc = rescale * acc + p * v[b, j]
                m = m_new
            if l > 0:
                out[b, i] = acc / l
                lse[b, i] = m + math.log(l)
    out = out.reshape(*lead, L, Ev).to(query.dtype)
    lse = lse.reshape(*lead, L)
    return (out, lse) if return_lse else out


# flash_attention_backward -------------------------------------------------------------

def flash_attention_backward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    grad_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q, k, v = query.to(work), key.to(work), value.to(work)
    o, d_out, row_lse = out.to(work), grad_out.to(work), lse.to(work)
    L, S = q.size(-2), k.size(-2)
    d = (d_out * o).sum(dim=-1)  # (..., L): D_i = dO_i . O_i
    if grad_lse is not None:
        d = d - grad_lse.to(work)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0 in range(0, L, block_q):
        q1 = min(q0 + block_q, L)
        k_stop = min(S, q1) if is_causal else S  # later key tiles are all masked
        for k0 in range(0, k_stop, block_k):
            k1 = min(k0 + block_k, S)
            s = (q[..., q0:q1, :] @ k[..., k0:k1, :].transpose(-2, -1)) * scale  # (..., bq, bk)
            if is_causal:
                rows = torch.arange(q0, q1, device=s.device)[:, None]
                cols = torch.arange(k0, k1, device=s.device)[None, :]
                s = s.masked_fill(cols > rows, float("-inf"))
            p = torch.exp(s - row_lse[..., q0:q1, None])  # (..., bq, bk): this tile of weights
            do_tile = d_out[..., q0:q1, :]  # (..., bq, Ev)
            dv[..., k0:k1, :] += p.transpose(-2, -1) @ do_tile
            ds = p * (do_tile @ v[..., k0:k1, :].transpose(-2, -1) - d[..., q0:q1, None])  # (..., bq, bk)
            dq[..., q0:q1, :] += scale * (ds @ k[..., k0:k1, :])
            dk[..., k0:k1, :] += scale * (ds.transpose(-2, -1) @ q[..., q0:q1, :])
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


def explore_flash_attention_backward() -> None:
    """Your backward pass against autograd through attnlib's flash attention."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = attnlib.flash_attention(q, k, v, is_causal=True, return_lse=True)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    grads = flash_attention_backward(q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), d_out,
                                     is_causal=True, block_q=16, block_k=16)
    for name, mine, auto in zip("qkv", grads, (q.grad, k.grad, v.grad)):
        print(f"d{name}: largest difference from autograd {(mine - auto).abs().max().item():.1e}")


# Slow: Python loops over the flattened batch * heads, then the query rows one at a time, then
# their keys one at a time: each weight p = exp(s - lse) is one Python float, added to the rows
# of dQ, dK and dV (lists of Python floats); no tiles (block_q and block_k change nothing).
def slow_flash_attention_backward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    grad_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    lead = query.shape[:-2]
    L, S, E, Ev = query.size(-2), key.size(-2), query.size(-1), value.size(-1)
    n = math.prod(lead)  # batch * heads
    qs = query.reshape(n, L, E).tolist()  # nested lists of Python floats
    ks = key.reshape(n, S, E).tolist()
    vs = value.reshape(n, S, Ev).tolist()
    os_ = out.reshape(n, L, Ev).tolist()
    dos = grad_out.reshape(n, L, Ev).tolist()
    lses = lse.reshape(n, L).tolist()
    glses = grad_lse.reshape(n, L).tolist() if grad_lse is not None else None
    dqs, dks, dvs = [], [], []
    for b in range(n):
        dq = [[0.0] * E for _ in range(L)]
        dk = [[0.0] * E for _ in range(S)]
        dv = [[0.0] * Ev for _ in range(S)]
        for i in range(L):
            q_i, do_i = qs[b][i], dos[b][i]
            d_i = sum(x * y for x, y in zip(do_i, os_[b][i]))  # D_i = dO_i . O_i
            if glses is not None:
                d_i -= glses[b][i]
            last = min(S, i + 1) if is_causal else S  # top-left causal: keys 0..i
            for j in range(last):
                k_j, v_j = ks[b][j], vs[b][j]
                s = scale * sum(x * y for x, y in zip(q_i, k_j))
                p = math.exp(s - lses[b][i])  # the weight of key j for query i
                dv[j] = [a + p * x for a, x in zip(dv[j], do_i)]
                ds = p * (sum(x * y for x, y in zip(do_i, v_j)) - d_i)
                dq[i] = [a + scale * ds * x for a, x in zip(dq[i], k_j)]
                dk[j] = [a + scale * ds * x for a, x in zip(dk[j], q_i)]
        dqs.append(dq)
        dks.append(dk)
        dvs.append(dv)
    dq_t = torch.tensor(dqs, dtype=work, device=query.device).reshape(query.shape).to(query.dtype)
    dk_t = torch.tensor(dks, dtype=work, device=key.device).reshape(key.shape).to(key.dtype)
    dv_t = torch.tensor(dvs, dtype=work, device=value.device).reshape(value.shape).to(value.dtype)
    return dq_t, dk_t, dv_t


EXERCISES = [
    Exercise(
        "flash_attention",
        points=8,
        solution=flash_attention,
        guide=r"""
For each tile of `block_q` queries keep three running statistics per query row (Chapter 9,
sections *The online softmax* and *A worked example: one row, three blocks*): the maximum
score `m` seen so far, the sum `l` of `exp(score - m)`, and the accumulator `acc` of
`exp(score - m) @ V`. For each tile of `block_k` keys, compute the tile's scores, update
`m`, **rescale** `l` and `acc` by `exp(m_old - m_new)`, and add the tile's contribution. At
the end, `out = acc / l`, and `lse = m + log(l)`.

Also required: ragged tiles (`L`, `S` need not be multiples of the block sizes), top-left
`is_causal` (skip the key tiles entirely above the diagonal), `scale=None` meaning
$1/\sqrt{E}$, float16/bfloat16 computed in float32 (`out` cast back, `lse` float32), a
row without keys giving a zero output and `lse = -inf`, rows whose scores are all near
$-10^4$ or all near $+10^4$, and inputs left as they were (`query.to(dtype)` is `query`
itself when the dtype is already right: no `*=` on it). Gradients may come from autograd
through your loop.""",
        hints=(
            "Start every row with `m = -inf`, `l = 0`, `acc = 0`; `exp(-inf - m_new)` is 0, so the first tile needs no special case, as long as you never compute `-inf - (-inf)`.",
            "In the causal case, key tiles starting at or after `q_start + block_q` are all masked: stop the loop there; inside the diagonal tile, mask with `-inf`.",
            "`F.scaled_dot_product_attention` is off limits, and so is building `query @ key.transpose(-2, -1)` in one go.",
        ),
        explore=explore_flash_attention,
        slow=slow_flash_attention,
    ),
    Exercise(
        "flash_attention_backward",
        points=6,
        solution=flash_attention_backward,
        guide=r"""
The backward pass of flash attention, by recomputation (Chapter 9, section *The backward
pass: recompute, don't store*). You get what the forward pass kept, `query`, `key`, `value`,
the output `out` and the log-sum-exp `lse`, and `grad_out`, the gradient of the loss with
respect to the output; return the gradients with respect to `query`, `key` and `value`.
With $P$ the weights and $D_i = dO_i \cdot O_i$ (minus `grad_lse` when it is given):

$$dV = P^\top dO, \qquad dS = P \odot (dO\,V^\top - D), \qquad
dQ = \text{scale} \cdot dS\,K, \qquad dK = \text{scale} \cdot dS^\top Q .$$

Never hold $P$ whole: loop over tiles of `block_q` queries and `block_k` keys, rebuild each
tile of weights as $P = \exp(\text{scores} - \text{lse})$ (masked as in the forward pass when
`is_causal`), and add its share to the three gradients. As for the forward pass, the grader
fails any tensor as large as the `L x S` matrix, and `scale=None` means $1/\sqrt{E}$.""",
        hints=(
            "$D$ is one number per query row, `(grad_out * out).sum(-1)`: compute it once, before the loops.",
            "In a tile, `p = torch.exp(s - lse[..., q0:q1, None])`; masked scores are `-inf` and give weight 0.",
            "Accumulate into zero tensors: `dq[..., q0:q1, :] += ...`, `dk[..., k0:k1, :] += ...`, `dv[..., k0:k1, :] += ...`.",
            "Autograd (`torch.autograd.grad`, `.backward()`), attnlib and `F.scaled_dot_product_attention` are off limits: the exercise is the formulas.",
        ),
        explore=explore_flash_attention_backward,
        slow=slow_flash_attention_backward,
    ),
]
