"""Chapter 13's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/13_flash_triton/`` and ``notebooks/13_flash_triton/`` from
this file (see ``tools/exercises/__init__.py``); the cases and named mistakes that grade the
notebook are in the package ``attnlib/grading/exercises/ch13_flash_triton/``.

The solutions are Triton kernels: ``@triton.jit`` functions with the parameters of the
course's kernels, whose bodies the builder copies into the notebook like a function's.
"""

from __future__ import annotations

import inspect
import time

import torch

import attnlib
from attnlib.triton_flash import INTERPRETED, flash_backward, flash_forward

import triton  # noqa: E402  (after attnlib.triton_flash, which chooses the interpreter)
import triton.language as tl  # noqa: E402

from . import Exercise

INTRO = r"""
You write the two kernels of FlashAttention-2 in Triton: the forward, which streams blocks of
keys and values past a block of queries with the online softmax in registers and saves the
log-sum-exp of each row, and the backward, which recomputes the weights block by block from
it and adds each key block's share of $dQ$ with atomics. The course's launchers
`flash_forward` and `flash_backward` set the grid, the block sizes and the buffers, and run
your kernel when you pass it as `kernel=`: the grader runs it the same way.

**Your kernels run on the CPU.** Without a GPU, `attnlib.triton_flash` switches Triton to
its *interpreter* (`TRITON_INTERPRET=1`) before any kernel is defined, which is why the
imports cell imports it before `triton`. The interpreter runs the programs of the grid one
after another, each block operation a numpy operation: the numbers are a GPU's, the speed is
not. On a two-core CPU, a launch at the sizes of the test cases (`L, S <= 130`, blocks
of 64) takes a few hundredths of a second (a GPU takes microseconds), a test cell about a
second, and a kernel with a scalar loop over single keys inside each program ten to twenty
times longer: slow, and still well within the time limits.
The interpreter computes bfloat16 wrongly (numpy has no bfloat16), so the cases are float32
and float16, and `flash_forward` refuses bfloat16 here: bf16 runs on a GPU only. It also
cannot show a race between programs or the garbage a masked load without `other=` reads on
a GPU: the grader reads your kernel's source for those (with `attnlib.lint_kernel_source`,
Chapter 13, section *What the interpreter cannot show*)."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = """\
import inspect  # to read a kernel's source (the explore cells lint it)
import time

# First: without a GPU, this module switches Triton to its interpreter before any kernel exists.
from attnlib.triton_flash import INTERPRETED, flash_backward, flash_forward  # the launchers

import triton
import triton.language as tl"""

RULES = """\
Write
Triton: inside a kernel, only `tl.*`, other `@triton.jit` functions and a few builtins
(`range`, `min`, `max`, `float`, `int`); the interpreter would run any Python, a GPU would
not compile it, and the grader fails it. Use the launchers `flash_forward` and
`flash_backward` as you like, with your kernel as `kernel=`; when the notebook is graded,
calling or launching the course's kernels (`flash_forward` or `flash_attention_triton`
without `kernel=`, `attnlib.triton_flash.flash_fwd_kernel`, ...), attnlib's or PyTorch's
attention anywhere outside the test and explore cells (even in a cell of your own) fails
that exercise."""

LOOPS = """\
Loops are fine: both kernels have also been written with a scalar loop over single keys (or
queries) inside each program, and the course's tests check that those kernels get full
marks."""


# flash_fwd_kernel ---------------------------------------------------------------------

@triton.jit
def flash_fwd_kernel(
    Q, K, V, O, LSE,  # pointers: (B, H, L, D), (B, H, S, D) x 2, (B, H, L, D), (B, H, L)
    sm_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M  # this program's first query
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) its queries
    keys = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key offsets within a block
    dims = tl.arange(0, HEAD_DIM)
    row_in = rows < L  # the last query block may be ragged
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                mask=row_in[:, None], other=0.0)  # (BLOCK_M, D), loaded once
    k_head = K + b * stride_kb + h * stride_kh
    v_head = V + b * stride_vb + h * stride_vh
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running maximum
    l = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(s - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running sum of exp(s - m) @ v
    end = S
    if IS_CAUSAL:  # the key blocks right of the diagonal are skipped
        end = tl.minimum(S, start_m + BLOCK_M)
    for start_n in range(0, end, BLOCK_N):  # the last block may be ragged: masked below
        cols = start_n + keys
        col_in = cols < S
        k = tl.load(k_head + cols[:, None] * stride_kn + dims[None, :], mask=col_in[:, None], other=0.0)
        v = tl.load(v_head + cols[:, None] * stride_vn + dims[None, :], mask=col_in[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale  # (BLOCK_M, BLOCK_N) in float32
        keep = col_in[None, :]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])  # top-left: key j <= query i
        s = tl.where(keep, s, float("-inf"))
        # Every row sees key 0 in the first block (top-left causal too), so m_new is finite
        # from then on: no -inf - -inf. alpha = exp(-inf) = 0 at the first block.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)  # rescales what was summed under the old maximum
        p = tl.exp(s - m_new[:, None])  # 0 where masked
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / l[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :],
             out.to(O.dtype.element_ty), mask=row_in[:, None])
    tl.store(LSE + bh * L + rows, m + tl.log(l), mask=row_in)  # natural log, float32


def explore_flash_fwd_kernel() -> None:
    """Your kernel against exact attention, its time under the interpreter, and its source
    through the static check (what the interpreter cannot show)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g) for n in (100, 130, 130))
    began = time.perf_counter()
    out, lse = flash_forward(q, k, v, is_causal=True, kernel=flash_fwd_kernel)
    took = time.perf_counter() - began
    exact = attnlib.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    print(f"interpreted: {INTERPRETED}; one launch took {took:.2f} s")
    print(f"largest error of the output against float64 attention: {(out - exact).abs().max().item():.1e}")
    scores = (q.double() @ k.double().transpose(-2, -1)) / 32 ** 0.5
    scores = scores.masked_fill(torch.ones(100, 130, dtype=torch.bool).triu(1), float("-inf"))
    print(f"largest error of the lse: {(lse - torch.logsumexp(scores, -1)).abs().max().item():.1e}")
    problems = attnlib.lint_kernel_source(inspect.getsource(flash_fwd_kernel.fn))
    print("static check:", "no problem found" if not problems else "")
    for problem in problems:
        print(" ", problem)


# Slow: a scalar loop over single keys inside each program (no key blocks, no tl.dot): each key
# is loaded as one row, its score with the program's queries is a row-wise sum of products, and
# the online softmax is updated key by key, in float32 throughout.
@triton.jit
def slow_flash_fwd_kernel(
    Q, K, V, O, LSE,  # pointers: (B, H, L, D), (B, H, S, D) x 2, (B, H, L, D), (B, H, L)
    sm_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                mask=rows[:, None] < L, other=0.0).to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    last = S
    if IS_CAUSAL:
        last = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for j in range(0, last):  # one key at a time
        k = tl.load(K + b * stride_kb + h * stride_kh + j * stride_kn + dims).to(tl.float32)  # (D,)
        v = tl.load(V + b * stride_vb + h * stride_vh + j * stride_vn + dims).to(tl.float32)
        s = tl.sum(q * k[None, :], axis=1) * sm_scale  # (BLOCK_M,) key j's score with each query
        if IS_CAUSAL:
            s = tl.where(j <= rows, s, float("-inf"))
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        l = l * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v[None, :]
        m = m_new
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :],
             (acc / l[:, None]).to(O.dtype.element_ty), mask=rows[:, None] < L)
    tl.store(LSE + bh * L + rows, m + tl.log(l), mask=rows < L)


# flash_bwd_kernel ---------------------------------------------------------------------

@triton.jit
def flash_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA,  # all contiguous; DQ fp32, accumulated atomically
    sm_scale,
    H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N  # this program's first key
    bh = tl.program_id(1)
    cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) its keys
    dims = tl.arange(0, HEAD_DIM)
    col_in = cols < S
    kv = bh * S * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(K + kv, mask=col_in[:, None], other=0.0)  # (BLOCK_N, D), kept for every query block
    v = tl.load(V + kv, mask=col_in[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    first = 0
    if IS_CAUSAL:  # the queries i >= start_n see these keys: start at the block holding start_n
        first = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(first, L, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_in = rows < L
        qo = bh * L * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
        q = tl.load(Q + qo, mask=row_in[:, None], other=0.0)
        do = tl.load(DO + qo, mask=row_in[:, None], other=0.0)
        lse = tl.load(LSE + bh * L + rows, mask=row_in, other=float("inf"))  # weight 0 for missing rows
        delta = tl.load(DELTA + bh * L + rows, mask=row_in, other=0.0)
        keep = row_in[:, None] & col_in[None, :]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        p = tl.exp(tl.dot(q, tl.trans(k)) * sm_scale - lse[:, None])  # (BLOCK_M, BLOCK_N) weights
        p = tl.where(keep, p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)  # dV = P^T dO
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None]) * sm_scale  # scale * dS
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)  # dK = scale * dS^T Q
        tl.atomic_add(DQ + qo, tl.dot(ds.to(k.dtype), k), mask=row_in[:, None])  # this block's share of dQ
    tl.store(DK + kv, dk.to(DK.dtype.element_ty), mask=col_in[:, None])
    tl.store(DV + kv, dv.to(DV.dtype.element_ty), mask=col_in[:, None])


def explore_flash_bwd_kernel() -> None:
    """Your backward kernel against autograd through float64 attention."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g) for n in (90, 130, 130))
    out, lse = flash_forward(q, k, v, is_causal=True, kernel=flash_fwd_kernel)
    grad_out = torch.randn(1, 2, 90, 32, generator=g)
    grads = flash_backward(q, k, v, out, lse, grad_out, is_causal=True, kernel=flash_bwd_kernel)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    attnlib.scaled_dot_product_attention(q64, k64, v64, is_causal=True).backward(grad_out.double())
    for name, mine, exact in zip(("dq", "dk", "dv"), grads, (q64.grad, k64.grad, v64.grad)):
        print(f"{name}: largest error against autograd {(mine - exact).abs().max().item():.1e}")
    problems = attnlib.lint_kernel_source(inspect.getsource(flash_bwd_kernel.fn))
    print("static check:", "no problem found" if not problems else "")
    for problem in problems:
        print(" ", problem)


# Slow: a scalar loop over single queries inside each program (no query blocks, no tl.dot): the
# weights of one query with the program's keys are a row, and each query's share of dQ is added
# atomically, in float32 throughout.
@triton.jit
def slow_flash_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA,  # all contiguous; DQ fp32, accumulated atomically
    sm_scale,
    H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    kv = bh * S * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(K + kv, mask=cols[:, None] < S, other=0.0).to(tl.float32)
    v = tl.load(V + kv, mask=cols[:, None] < S, other=0.0).to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    first = 0
    if IS_CAUSAL:
        first = pid_n * BLOCK_N  # query i sees key j only when j <= i
    for i in range(first, L):  # one query at a time
        q = tl.load(Q + bh * L * HEAD_DIM + i * HEAD_DIM + dims).to(tl.float32)  # (D,)
        do = tl.load(DO + bh * L * HEAD_DIM + i * HEAD_DIM + dims).to(tl.float32)
        lse = tl.load(LSE + bh * L + i)
        delta = tl.load(DELTA + bh * L + i)
        s = tl.sum(k * q[None, :], axis=1) * sm_scale  # (BLOCK_N,) query i's scores
        keep = cols < S
        if IS_CAUSAL:
            keep = keep & (cols <= i)
        p = tl.where(keep, tl.exp(s - lse), 0.0)
        dv += p[:, None] * do[None, :]
        ds = p * (tl.sum(v * do[None, :], axis=1) - delta) * sm_scale
        dk += ds[:, None] * q[None, :]
        tl.atomic_add(DQ + bh * L * HEAD_DIM + i * HEAD_DIM + dims, tl.sum(ds[:, None] * k, axis=0))
    tl.store(DK + kv, dk.to(DK.dtype.element_ty), mask=cols[:, None] < S)
    tl.store(DV + kv, dv.to(DV.dtype.element_ty), mask=cols[:, None] < S)


EXERCISES = [
    Exercise(
        "flash_fwd_kernel",
        points=8,
        solution=flash_fwd_kernel,
        guide=r"""
One program of the grid `(cdiv(L, BLOCK_M), B * H)` handles `BLOCK_M` queries of one
(batch, head) (Chapter 13, sections *Triton's programming model* and *The forward kernel*).
Load its query block once, then loop over the key blocks with Chapter 9's online softmax
held in registers: per query row a running maximum `m` (from `-inf`), a running sum `l` of
`exp(s - m)` and an accumulator `acc` of `exp(s - m) @ v`, all float32. For each block of
`BLOCK_N` keys: the scores `s = tl.dot(q, tl.trans(k)) * sm_scale`, the new maximum, the
factor `alpha = exp(m_old - m_new)` that **rescales** `l` and `acc`, then the block's terms.
At the end store `O = acc / l` (in `O`'s dtype) and `LSE = m + log(l)` (natural log).

Also required: the ragged last blocks (`L`, `S` need not be multiples of the blocks: mask
the loads, with `other=`, and give the missing keys the score `-inf`); with `IS_CAUSAL`,
the top-left mask (query `i` sees keys `j <= i`, whatever `L` and `S`), the key blocks right
of the diagonal skipped, not just masked; float16 inputs (`tl.dot` accumulates in float32;
cast `p` to the values' dtype before `tl.dot(p, v)`, as the reference does).""",
        hints=(
            "`rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)` are the program's queries; "
            "`Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + tl.arange(0, HEAD_DIM)[None, :]` "
            "is a `(BLOCK_M, HEAD_DIM)` block of pointers, with `b, h = pid // H, pid % H` from `tl.program_id(1)`.",
            "`exp(-inf - m_new)` is 0: starting from `m = -inf`, the first key block needs no special case, "
            "as long as `m_new` is finite (every row sees key 0 in the first block).",
            "`range(0, S, BLOCK_N)` visits the last, partly filled key block; `cols < S` masks it. "
            "Causally the loop stops at `min(S, (pid + 1) * BLOCK_M)`.",
            "Calling or launching the course's kernels, and attnlib's or PyTorch's attention, is off "
            "limits; `flash_forward(..., kernel=flash_fwd_kernel)` runs yours.",
        ),
        explore=explore_flash_fwd_kernel,
        slow=slow_flash_fwd_kernel,
    ),
    Exercise(
        "flash_bwd_kernel",
        points=6,
        solution=flash_bwd_kernel,
        guide=r"""
The backward of FlashAttention-2 (Chapter 13, section *The backward kernel and dQ*). One
program of the grid `(cdiv(S, BLOCK_N), B * H)` owns `BLOCK_N` keys of one (batch, head):
load its keys and values once and loop over the query blocks, recomputing each tile of
weights from the forward's log-sum-exp instead of storing them. With
$\delta_i = \sum_d dO_{id} O_{id}$ (already in `DELTA`):

$$P = e^{S \cdot \text{scale} - \text{lse}}, \qquad dV = P^\top dO, \qquad
dS = P \odot (dO\,V^\top - \delta), \qquad dK = \text{scale} \cdot dS^\top Q, \qquad
dQ = \text{scale} \cdot dS\,K .$$

`dK` and `dV` of the program's keys are sums over the query blocks: accumulate them in
registers and store them once, at the end. `dQ` of a query block gets a share from every key
block, that is from every program, running at the same time on a GPU: **add** your share with
`tl.atomic_add` into `DQ`, a float32 buffer of zeros (section *What the interpreter cannot
show*: the interpreter runs the programs one by one, so a load, an add and a `tl.store`
would pass the values there; the grader reads your source for it). With `IS_CAUSAL`, mask
`P` (key `j <= ` query `i`, top-left) and skip the query blocks wholly above the diagonal:
start at the block that holds query `pid * BLOCK_N`.""",
        hints=(
            "Here every tensor is contiguous: element `[b, h, i, d]` of `Q` is at "
            "`Q + (b * H + h) * L * HEAD_DIM + i * HEAD_DIM + d`, and `tl.program_id(1)` is `b * H + h`.",
            "Load the lse of the missing (ragged) query rows with `other=float(\"inf\")`: their weights "
            "`exp(s - inf)` are then 0.",
            "The causal start is `(pid * BLOCK_N // BLOCK_M) * BLOCK_M`; the loop runs to `L`.",
            "`tl.atomic_add(DQ + offsets, dq, mask=...)` adds a `(BLOCK_M, HEAD_DIM)` block; store `DK` "
            "and `DV` with `.to(DK.dtype.element_ty)`.",
        ),
        explore=explore_flash_bwd_kernel,
        slow=slow_flash_bwd_kernel,
    ),
]
