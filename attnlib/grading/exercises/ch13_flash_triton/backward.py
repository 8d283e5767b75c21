"""The backward kernel's exercise: its cases, its mistakes (the course's kernel with switches,
kernels that write dQ without atomics or load without ``other=``) and its registration."""

from __future__ import annotations

from typing import Any

import torch

from ....triton_flash import flash_bwd_kernel
from ...core import Case, Mistake
from ..common import generator
from .launching import BACKWARD, F16, F32, UNSEEN, _qkv, _register_kernel, _scores, _Variant, launch_backward

import triton  # after attnlib.triton_flash, which chooses the interpreter
import triton.language as tl


# ============================================================================ cases


def _bwd_case(name: str, B: int, H: int, L: int, S: int, D: int, seed: int, dtype: torch.dtype = F32,
              std: float = 1.0, **kwargs: Any) -> Case:
    """Inputs, and ``output`` and ``lse`` as the forward pass would give them: exact, rounded to
    ``dtype`` (``lse`` to float32)."""
    q, k, v = _qkv(B, H, L, S, D, seed, dtype, std)
    s = _scores(q.double(), k.double(), kwargs.get("is_causal", False), kwargs.get("scale"))
    out = (torch.softmax(s, dim=-1) @ v.double()).to(dtype)
    lse = torch.logsumexp(s, dim=-1).float()
    g = generator(seed + 7)
    grad = torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype)
    return Case(name, (q, k, v, out, lse, grad), kwargs, low_precision=True)


def _bwd_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _bwd_case("float32, L = S = 100 (two key blocks, the second ragged), head_dim 32", 1, 1, 100, 100, 32,
                      1350),
            _bwd_case("float32, causal, L = S = 130 (three blocks), head_dim 16", 1, 1, 130, 130, 16, 1355,
                      is_causal=True),
            _bwd_case("float16, L = 40, S = 130, head_dim 64", 1, 1, 40, 130, 64, 1360, F16),
            _bwd_case("float32, batch 2, causal, L = 100 > S = 70, head_dim 32, scale = 0.3", 2, 1, 100, 70, 32, 1365,
                      is_causal=True, scale=0.3),
        ]
    return [
        _bwd_case("L = S = 1", 1, 1, 1, 1, 16, 1370),
        _bwd_case("L = 1, S = 129 (a last key block of one key)", 1, 1, 1, 129, 32, 1375),
        _bwd_case("causal, L = 30 < S = 130 (keys no query sees get zero gradients)", 1, 2, 30, 130, 16, 1380,
                  is_causal=True),
        _bwd_case("float16, causal, L = S = 128 (whole blocks), head_dim 64", 1, 1, 128, 128, 64, 1385, F16,
                  is_causal=True),
        _bwd_case("large scores (in the hundreds), scale = 1", 1, 1, 70, 90, 16, 1390, std=3.0, scale=1.0),
        _bwd_case("batch 2 x 2 heads, causal, L = 70 > S = 65", 2, 2, 70, 65, 16, 1395, is_causal=True),
    ]


# ============================================================================ backward mistakes


@triton.jit
def _bwd_variant(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, sm_scale, H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    USE_DELTA: tl.constexpr = True,  # dS = P * (dP - delta), or P * dP
    DS_SCALE: tl.constexpr = True,  # dS multiplied by the softmax scale
    BOUND: tl.constexpr = 0,  # causal query loop: 0 from the diagonal on, 1 up to it, 2 after it
    MASK: tl.constexpr = True,  # causal: keys after the query masked in the recomputed weights
):
    """The course's backward kernel with switches: the default switches compute the gradients."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = pid_bh * L * HEAD_DIM
    kv_base = pid_bh * S * HEAD_DIM
    kv_ptrs = kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    hi = L
    if IS_CAUSAL:
        if BOUND == 0:
            lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
        if BOUND == 1:
            hi = tl.minimum(L, (pid_n + 1) * BLOCK_N)
        if BOUND == 2:
            lo = (pid_n + 1) * BLOCK_N
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = q_base + rows[:, None] * HEAD_DIM + offs_d[None, :]
        row_ok = rows[:, None] < L
        q = tl.load(Q + q_ptrs, mask=row_ok, other=0.0)
        do = tl.load(DO + q_ptrs, mask=row_ok, other=0.0)
        lse = tl.load(LSE + pid_bh * L + rows, mask=rows < L, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * L + rows, mask=rows < L, other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        valid = (offs_n[None, :] < S) & (rows[:, None] < L)
        if IS_CAUSAL:
            if MASK:
                valid = valid & (offs_n[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        if USE_DELTA:
            ds = p * (dp - delta[:, None])
        else:
            ds = p * dp
        if DS_SCALE:
            ds = ds * sm_scale
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dq = tl.dot(ds.to(k.dtype), k)
        tl.atomic_add(DQ + q_ptrs, dq, mask=row_ok)
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < S)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < S)


@triton.jit
def _bwd_without_atomics(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, sm_scale, H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    READ_ADD: tl.constexpr = False,  # dQ: load, add, store (a race on a GPU), or a plain store
):
    """The backward kernel with dQ written by ``tl.store`` instead of ``tl.atomic_add``
    (kept apart from ``_bwd_variant``, whose source must show no race to the extra check)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ptrs = pid_bh * S * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, L, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = pid_bh * L * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
        row_ok = rows[:, None] < L
        q = tl.load(Q + q_ptrs, mask=row_ok, other=0.0)
        do = tl.load(DO + q_ptrs, mask=row_ok, other=0.0)
        lse = tl.load(LSE + pid_bh * L + rows, mask=rows < L, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * L + rows, mask=rows < L, other=0.0)
        valid = (offs_n[None, :] < S) & (rows[:, None] < L)
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp(tl.dot(q, tl.trans(k)) * sm_scale - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None]) * sm_scale
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dq = tl.dot(ds.to(k.dtype), k)
        if READ_ADD:
            dq += tl.load(DQ + q_ptrs, mask=row_ok, other=0.0)
        tl.store(DQ + q_ptrs, dq, mask=row_ok)
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < S)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < S)


@triton.jit
def _bwd_without_other(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, sm_scale, H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """The backward kernel with the query and dO blocks loaded without ``other=``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ptrs = pid_bh * S * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, L, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = pid_bh * L * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + q_ptrs, mask=rows[:, None] < L)
        do = tl.load(DO + q_ptrs, mask=rows[:, None] < L)
        lse = tl.load(LSE + pid_bh * L + rows, mask=rows < L, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * L + rows, mask=rows < L, other=0.0)
        valid = (offs_n[None, :] < S) & (rows[:, None] < L)
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp(tl.dot(q, tl.trans(k)) * sm_scale - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None]) * sm_scale
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        tl.atomic_add(DQ + q_ptrs, tl.dot(ds.to(k.dtype), k), mask=rows[:, None] < L)
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < S)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < S)


_BWD_NO_OTHER = Mistake(
    "a masked tl.load without other=",
    "Masked-off lanes of a tl.load without other= hold undefined values: zeros under the "
    "interpreter, so the values here are right, but whatever memory held on a GPU, which then "
    "flows into tl.dot. Give every masked load other=0.0 (other=inf for the lse of missing "
    "rows, so that their weights are 0).",
    UNSEEN,
    _bwd_without_other,
)
_BWD_RACE = Mistake(
    "dQ accumulated without atomics (a race on a GPU)",
    "Every program (one per key block) adds its share to the same rows of dQ. Under the "
    "interpreter the programs run one after another, so a load, an add and a tl.store give the "
    "right sum; on a GPU they run at the same time and overwrite each other's shares. Add with "
    "tl.atomic_add(DQ + ptrs, dq, mask=...).",
    UNSEEN,
    _Variant(_bwd_without_atomics, READ_ADD=True),
)

BWD_MISTAKES = (
    Mistake(
        "dQ stored without atomics (the last key block wins)",
        "Each program handles one block of keys and computes only that block's share of dQ: "
        "tl.store overwrites the shares of the other blocks, so dQ holds the last program's "
        "share. Add the shares with tl.atomic_add into the float32 buffer DQ.",
        BACKWARD,
        _bwd_without_atomics,
    ),
    _BWD_RACE,
    Mistake(
        "delta missing from dS",
        "The softmax's gradient is dS = P * (dP - delta) with delta_i = sum_d dO_id O_id (the "
        "DELTA buffer, one number per query row); dS = P * dP leaves out the term that makes "
        "each row of dS sum to zero.",
        BACKWARD,
        _Variant(_bwd_variant, USE_DELTA=False),
    ),
    Mistake(
        "dS without the softmax scale",
        "The scores are scale * q . k, so the chain rule multiplies dS (hence dQ = dS K and "
        "dK = dS^T Q) by sm_scale.",
        BACKWARD,
        _Variant(_bwd_variant, DS_SCALE=False),
    ),
    Mistake(
        "the causal loop over query blocks stopped at the diagonal",
        "In the backward a program owns a block of keys, and the queries that see key j are "
        "i >= j: causally, the loop over query blocks starts at the diagonal block and runs to "
        "L. Stopping at the diagonal (the forward's bound) visits the query blocks that see none "
        "of these keys.",
        BACKWARD,
        _Variant(_bwd_variant, BOUND=1),
    ),
    Mistake(
        "the diagonal query block skipped",
        "The query block that straddles the diagonal sees some of this program's keys: the "
        "causal loop must start at (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M, the block holding "
        "query pid_n * BLOCK_N, not after it.",
        BACKWARD,
        _Variant(_bwd_variant, BOUND=2),
    ),
    Mistake(
        "the causal mask left out of the recomputed weights",
        "P = exp(s - lse) recomputed must be masked like the forward's: a key after the query "
        "has weight 0, and inside the diagonal block that takes the mask j <= i.",
        BACKWARD,
        _Variant(_bwd_variant, MASK=False),
    ),
    _BWD_NO_OTHER,
)

_register_kernel("flash_bwd_kernel", flash_bwd_kernel, BACKWARD, _bwd_cases, BWD_MISTAKES, launch_backward,
                 race=_BWD_RACE, no_other=_BWD_NO_OTHER)
