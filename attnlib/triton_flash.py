"""FlashAttention-2 as a Triton kernel, forward and backward (chapter 13).

Chapter 9 derives the online softmax and tiles attention in PyTorch; this module writes the
same algorithm as a GPU kernel in Triton (Tillet et al., 2019), in the form of
FlashAttention-2 (Dao, 2023): one *program* per (query block, batch x head), which loads its
block of queries once, streams the key/value blocks past it, and keeps the running maximum,
the running sum and the output accumulator in registers. Nothing of size ``L x S`` is ever
written to memory; the forward saves only the output and the log-sum-exp of each row, from
which the backward recomputes the attention weights block by block.

On a machine without a CUDA GPU the kernels run under Triton's *interpreter*
(``TRITON_INTERPRET=1``, set by this module before it defines them when no GPU is visible):
every program runs one after another on the CPU, with numpy. That is slow, but exact enough
to test and grade the kernels at small shapes. Two things it cannot show: races between
programs (they never run at the same time), and TF32 rounding (the interpreter's fp32
``tl.dot`` is exact, where GPUs may use TF32). bfloat16 is refused under the interpreter:
Triton 3.9's interpreter computes it wrongly (numpy has no bfloat16).

Importing :mod:`attnlib` does not import this module, nor Triton: ``import
attnlib.triton_flash`` does, and needs the ``triton`` package.

* :func:`flash_attention_triton`: the autograd-aware entry point, same conventions as
  :func:`attnlib.scaled_dot_product_attention` (causal aligned top-left);
* :func:`flash_forward` and :func:`flash_backward`: the launchers (grid, block sizes,
  buffers), each taking an optional ``kernel`` to launch instead of the course's own (how
  a learner's kernel is run and graded);
* ``flash_fwd_kernel``, ``flash_bwd_preprocess``, ``flash_bwd_kernel``: the kernels;
* :func:`interpreter_traffic`: the bytes kernels load and store, counted by the
  interpreter (what would cross between HBM and the chip, caches aside).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# Triton decides at import whether its own library functions (tl.zeros, tl.maximum, ...)
# are built for the interpreter: imported earlier without TRITON_INTERPRET=1, they cannot
# run under it. Remember whether that happened, to say so below instead of failing later.
_IMPORTED_COMPILED = "triton.language" in sys.modules and \
    os.environ.get("TRITON_INTERPRET", "0") != "1"
if not torch.cuda.is_available():  # no GPU: run the kernels under Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after choosing the interpreter)
import triton.language as tl  # noqa: E402

if _IMPORTED_COMPILED and os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise ImportError(
        "triton was imported before attnlib.triton_flash without TRITON_INTERPRET=1, so its "
        "library cannot run under the interpreter that this machine (no CUDA GPU) needs: set "
        "TRITON_INTERPRET=1 before anything imports triton (first line of the notebook or "
        "script, or in the environment), or import attnlib.triton_flash first")

__all__ = ["flash_attention_triton", "flash_forward", "flash_backward", "flash_fwd_kernel",
           "flash_bwd_preprocess", "flash_bwd_kernel", "interpreter_traffic", "INTERPRETED"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether the kernels run under Triton's interpreter (on the CPU)."""


@triton.jit
def flash_fwd_kernel(
    Q, K, V, O, LSE,  # pointers: (B, H, L, D), (B, H, S, D) x 2, (B, H, L, D), (B,H,L)
    sm_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    """FlashAttention-2's forward kernel: one program, BLOCK_M queries of one
    (batch, head) against every key block (chapter 13).

    Launched by :func:`flash_forward` on the grid ``(cdiv(L, BLOCK_M), B * H)``:
    ``tl.program_id(0)`` is the block of queries, ``tl.program_id(1)`` is
    ``b * H + h``. ``Q``, ``K``, ``V``, ``O`` point to ``(B, H, L or S, HEAD_DIM)``
    tensors whose last axis is contiguous: element ``[b, h, i, d]`` of ``Q`` is at
    ``Q + b * stride_qb + h * stride_qh + i * stride_qm + d``, and ``K``, ``V``, ``O``
    alike with their strides. ``LSE`` points to a contiguous float32 ``(B, H, L)``
    buffer. ``HEAD_DIM``, ``BLOCK_M`` and ``BLOCK_N`` are powers of two (at least 16);
    ``L`` and ``S`` need not be multiples of the blocks.

    For each of its query rows ``i < L``, the program writes ``O[b, h, i] =
    softmax(s) @ V`` in ``O``'s dtype and ``LSE[b, h, i] = log(sum_j exp(s_j))``
    (natural log, float32), where ``s_j = sm_scale * q_i . k_j`` and, with
    ``IS_CAUSAL``, only the keys ``j <= i`` count (aligned top-left, whatever ``L``
    and ``S``). It streams the key and value blocks with the online softmax (running
    maximum, running sum, accumulator), never holding more than a ``BLOCK_M x
    BLOCK_N`` tile of scores; causally, it skips the key blocks wholly right of the
    diagonal. Masked loads give ``other=``: masked-off lanes are undefined on a GPU.
    """
    pid_m = tl.program_id(0)  # which block of queries
    pid_bh = tl.program_id(1)  # which (batch, head)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key columns within a block
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm \
        + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < L, other=0.0)  # (BLOCK_M, D), read once
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row maximum
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running sum of p @ v
    hi = S
    if IS_CAUSAL:  # key blocks wholly right of the diagonal are skipped, not masked
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,)
        kv_off = cols[:, None] * stride_kn + offs_d[None, :]
        k = tl.load(K + b * stride_kb + h * stride_kh + kv_off,
                    mask=cols[:, None] < S, other=0.0)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k)) * sm_scale  # (BLOCK_M, BLOCK_N) fp32 scores
        valid = cols[None, :] < S  # the ragged last block
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])  # top-left: j <= i
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.exp(s - m_use[:, None])  # (BLOCK_M, BLOCK_N), 0 where masked
        alpha = tl.exp(m_i - m_use)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn
                    + offs_d[None, :], mask=cols[:, None] < S, other=0.0)  # (BN, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key: output 0
    o = acc / l_safe[:, None]  # (BLOCK_M, D)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om \
        + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=offs_m[:, None] < L)
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log(l_safe))  # (BLOCK_M,)
    tl.store(LSE + pid_bh * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def flash_bwd_preprocess(
    O, DO, DELTA,  # (B, H, L, D) x 2 contiguous, (B, H, L)
    N_ROWS, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id, the row term of the softmax gradient."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) over B*H*L
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = rows[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + ptrs, mask=rows[:, None] < N_ROWS, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=rows[:, None] < N_ROWS, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < N_ROWS)


@triton.jit
def flash_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA,  # all contiguous; DQ fp32, added atomically
    sm_scale,
    H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    """FlashAttention-2's backward kernel: one program, one block of BLOCK_N keys of
    one (batch, head), against every query block (chapter 13).

    Launched by :func:`flash_backward` on the grid ``(cdiv(S, BLOCK_N), B * H)``:
    ``tl.program_id(0)`` is the block of keys, ``tl.program_id(1)`` is ``b * H + h``,
    after ``flash_bwd_preprocess`` has written ``DELTA``. Every tensor is contiguous:
    ``Q``, ``DO`` and ``DQ`` are ``(B, H, L, HEAD_DIM)``, ``K``, ``V``, ``DK`` and
    ``DV`` are ``(B, H, S, HEAD_DIM)`` (element ``[b, h, i, d]`` of ``Q`` is at
    ``Q + (b * H + h) * L * HEAD_DIM + i * HEAD_DIM + d``), ``LSE`` and ``DELTA``
    float32 ``(B, H, L)``: the forward's log-sum-exp and ``delta_i = sum_d dO_id
    O_id``. ``DQ`` is a float32 buffer of zeros.

    With ``s_ij = sm_scale * q_i . k_j``, the weights ``P_ij = exp(s_ij - lse_i)``
    (0 for ``j > i`` with ``IS_CAUSAL``, aligned top-left), ``dS = P * (dO V^T -
    delta)``, ``dQ = sm_scale * dS K``, ``dK = sm_scale * dS^T Q`` and ``dV = P^T
    dO``: the program recomputes ``P`` tile by tile from ``LSE``, writes ``dK`` and
    ``dV`` of its keys (in their dtypes) once, at the end, and adds its share of
    ``dQ`` for every query block with ``tl.atomic_add``: the programs of the other
    key blocks add theirs to the same rows at the same time. Causally, the query
    blocks wholly above the diagonal are skipped.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) this program's keys
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base, kv_base = pid_bh * L * HEAD_DIM, pid_bh * S * HEAD_DIM
    kv_ptrs = kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)  # (BLOCK_N, D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:  # query blocks wholly above the diagonal never see these keys
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, L, BLOCK_M):
        rows = start_m + offs_m  # (BLOCK_M,)
        q_ptrs = q_base + rows[:, None] * HEAD_DIM + offs_d[None, :]
        row_ok = rows[:, None] < L
        q = tl.load(Q + q_ptrs, mask=row_ok, other=0.0)  # (BLOCK_M, D)
        do = tl.load(DO + q_ptrs, mask=row_ok, other=0.0)  # (BLOCK_M, D)
        lse = tl.load(LSE + pid_bh * L + rows, mask=rows < L, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * L + rows, mask=rows < L, other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale  # (BLOCK_M, BLOCK_N), recomputed
        valid = (offs_n[None, :] < S) & (rows[:, None] < L)
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)  # the weights, exactly
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)  # (BLOCK_N, D)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None]) * sm_scale  # gradient of the scores, scaled
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)  # (BLOCK_N, D)
        dq = tl.dot(ds.to(k.dtype), k)  # (BLOCK_M, D): this key block's share of dQ
        tl.atomic_add(DQ + q_ptrs, dq, mask=row_ok)
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < S)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < S)


def _block_sizes(head_dim: int) -> tuple[int, int]:
    """Query and key block sizes: 64 x 64 tiles (32 for head_dim 256)."""
    return (32, 32) if head_dim > 128 else (64, 64)


def flash_forward(query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
                  scale: float | None = None, *, kernel=None) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel: ``(output, lse)`` (chapter 13).

    One program per block of ``BLOCK_M`` queries and per (batch, head): the grid is
    ``(cdiv(L, BLOCK_M), B * H)``. The kernel writes the output ``(B, H, L, D)`` in the
    query's dtype and the log-sum-exp of every row, ``(B, H, L)`` in float32, which the
    backward needs.

    Args:
        query, key, value, is_causal, scale: as in :func:`flash_attention_triton`.
        kernel: the ``@triton.jit`` kernel to launch, with the signature of
            ``flash_fwd_kernel``; ``None``: ``flash_fwd_kernel``.

    Returns:
        ``(output, lse)``.
    """
    _check(query, key, value, is_causal, scale)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else float(scale)
    q, k, v = (t.contiguous() for t in (query, key, value))
    kernel = flash_fwd_kernel if kernel is None else kernel
    return _launch_forward(q, k, v, scale, is_causal, kernel)


def flash_backward(query: Tensor, key: Tensor, value: Tensor, output: Tensor, lse: Tensor,
                   grad_output: Tensor, is_causal: bool = False,
                   scale: float | None = None, *, kernel=None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernels: ``(dq, dk, dv)`` (chapter 13).

    First ``flash_bwd_preprocess`` computes ``delta_i = sum_d dO_id O_id`` per row, then
    one program per block of ``BLOCK_N`` keys and per (batch, head) (grid
    ``(cdiv(S, BLOCK_N), B * H)``) recomputes the weights from ``lse``, writes its keys'
    dK and dV, and adds its share of every query block's dQ into a float32 buffer with
    ``tl.atomic_add``.

    Args:
        query, key, value, is_causal, scale: as in :func:`flash_forward`.
        output, lse: what :func:`flash_forward` returned.
        grad_output: ``(B, H, L, D)``, the gradient of the loss with respect to the output.
        kernel: the kernel to launch instead of ``flash_bwd_kernel``, same signature.

    Returns:
        ``(dq, dk, dv)`` in the inputs' dtype.
    """
    _check(query, key, value, is_causal, scale)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else float(scale)
    q, k, v = (t.contiguous() for t in (query, key, value))
    B, H, L, D = q.shape
    for t, name, shape, dtype in ((output, "output", (B, H, L, D), q.dtype),
                                  (lse, "lse", (B, H, L), torch.float32),
                                  (grad_output, "grad_output", (B, H, L, D), q.dtype)):
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name} must be a {dtype} tensor of shape {shape}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))}")
    return _launch_backward(q, k, v, output.contiguous(), lse.contiguous(), grad_output,
                            scale, is_causal, flash_bwd_kernel if kernel is None else kernel)


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool,
                    kernel=None) -> tuple[Tensor, Tensor]:
    """Run the forward kernel on contiguous (B, H, L, D) tensors: (output, lse)."""
    kernel = flash_fwd_kernel if kernel is None else kernel
    B, H, L, D = q.shape
    S = k.size(2)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    BLOCK_M, BLOCK_N = _block_sizes(D)
    grid = (triton.cdiv(L, BLOCK_M), B * H)
    with _kernel_errors():
        kernel[grid](
            q, k, v, out, lse, scale,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            H, L, S,
            HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IS_CAUSAL=is_causal,
        )
    return out, lse


def _launch_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     grad_out: Tensor, scale: float, is_causal: bool,
                     kernel=None) -> tuple[Tensor, Tensor, Tensor]:
    """Run the backward kernels: (dq, dk, dv) in the inputs' dtype."""
    kernel = flash_bwd_kernel if kernel is None else kernel
    B, H, L, D = q.shape
    S = k.size(2)
    grad_out = grad_out.contiguous()
    delta = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    flash_bwd_preprocess[(triton.cdiv(B * H * L, 64),)](out, grad_out, delta, B * H * L,
                                                  HEAD_DIM=D, BLOCK_M=64)
    dq = torch.zeros(B, H, L, D, device=q.device, dtype=torch.float32)  # atomics add here
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    BLOCK_M, BLOCK_N = _block_sizes(D)
    with _kernel_errors():
        kernel[(triton.cdiv(S, BLOCK_N), B * H)](
            q, k, v, grad_out, dq, dk, dv, lse, delta, scale, H, L, S,
            HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IS_CAUSAL=is_causal,
        )
    return dq.to(q.dtype), dk, dv


@contextlib.contextmanager
def _kernel_errors() -> Iterator[None]:
    """Under the interpreter, Triton wraps an exception raised inside a kernel in an
    ``InterpreterError``: raise the kernel's own instead (``NotImplementedError`` from
    an exercise notebook's stub, a learner's ``IndexError``), with its traceback."""
    try:
        yield
    except Exception as exc:
        cause = exc.__cause__
        wrapped = type(exc).__name__ == "InterpreterError"
        if INTERPRETED and wrapped and isinstance(cause, Exception):
            raise cause from None
        raise


class _FlashAttention(torch.autograd.Function):
    """Forward saves (q, k, v, output, lse); backward recomputes the weights."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float,
                is_causal: bool) -> Tensor:
        out, lse = _launch_forward(q, k, v, scale, is_causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.is_causal = scale, is_causal
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _launch_backward(q, k, v, out, lse, grad_out, ctx.scale,
                                      ctx.is_causal)
        return dq, dk, dv, None, None


def flash_attention_triton(query: Tensor, key: Tensor, value: Tensor,
                           is_causal: bool = False, scale: float | None = None) -> Tensor:
    """FlashAttention-2 in Triton: ``softmax(q k^T * scale) v`` without the ``L x S``
    matrix, forward and backward (chapter 13).

    Same results as :func:`attnlib.scaled_dot_product_attention` (to fp32 or fp16
    rounding), with the course's conventions: ``is_causal`` aligned top-left (query ``i``
    sees keys ``0..i``), ``scale`` defaulting to ``1 / sqrt(head_dim)``. Differentiable:
    the backward recomputes the weights from the saved log-sum-exp, accumulating dK and
    dV per key block and dQ with atomic adds.

    Args:
        query: ``(B, H, L, D)``, float32 or float16 (bfloat16 only on a GPU).
        key: ``(B, H, S, D)``, same dtype and device.
        value: ``(B, H, S, D)`` (the value dimension equals the key dimension here).
        is_causal: causal masking, top-left aligned.
        scale: multiplies the scores; ``None``: ``1 / sqrt(D)``.

    Returns:
        ``(B, H, L, D)`` in the query's dtype.
    """
    _check(query, key, value, is_causal, scale)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else float(scale)
    q, k, v = (t.contiguous() for t in (query, key, value))
    return _FlashAttention.apply(q, k, v, scale, is_causal)


def _check(query: object, key: object, value: object, is_causal: object,
           scale: object) -> None:
    """The argument checks of :func:`flash_attention_triton`."""
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D (B, H, len, head_dim), got shape "
                             f"{tuple(t.shape)}")
    allowed = (torch.float32, torch.float16) if INTERPRETED else \
        (torch.float32, torch.float16, torch.bfloat16)
    if query.dtype not in allowed or key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            f"query, key and value must share one dtype among {allowed}, got "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
            + ("; bfloat16 runs only on a GPU (Triton's interpreter computes it wrongly)"
               if torch.bfloat16 in (query.dtype, key.dtype, value.dtype) else ""))
    B, H, L, D = query.shape
    if key.shape[:2] != (B, H) or key.shape != value.shape or key.size(-1) != D:
        raise ValueError(f"key and value must be (B, H, S, D) = ({B}, {H}, S, {D}), got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be one of 16, 32, 64, 128, 256 (tl.dot needs a "
                         f"power of two of at least 16), got {D}")
    if L == 0 or key.size(2) == 0:
        raise ValueError(f"L and S must be >= 1, got L={L}, S={key.size(2)}")
    if not (query.device == key.device == value.device):
        raise ValueError("query, key and value must be on one device")
    if INTERPRETED != (query.device.type == "cpu"):
        where = "CPU tensors (Triton's interpreter)" if INTERPRETED else "CUDA tensors"
        raise ValueError(f"this process runs the kernels on {where}; got {query.device}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def interpreter_traffic(fn: Callable[[], Any]) -> dict[str, int]:
    """Count the global-memory traffic of the kernels ``fn()`` launches (chapter 13).

    Under Triton's interpreter every ``tl.load``, ``tl.store`` and atomic goes through
    one Python method; this wraps them while ``fn()`` runs and adds up the bytes of the
    lanes the mask lets through. On a GPU those bytes cross between HBM and the chip,
    unless a cache (L2) catches a repeated read: the counts are the traffic without
    caches, the quantity FlashAttention's analysis bounds.

    Returns:
        ``{"loaded": bytes, "stored": bytes, "atomic": bytes, "loads": n, "stores": n,
        "atomics": n}`` (``n``: number of calls, i.e. of blocks moved).

    Raises:
        RuntimeError: when the kernels do not run under the interpreter.
    """
    if not INTERPRETED:
        raise RuntimeError("interpreter_traffic needs Triton's interpreter (TRITON_INTERPRET=1)")
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    counts = dict.fromkeys(("loaded", "stored", "atomic", "loads", "stores", "atomics"), 0)
    originals = {name: getattr(builder, name)
                 for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw")}

    def nbytes(ptrs: Any, mask: Any) -> int:
        lanes = int(mask.data.sum()) if mask is not None else ptrs.data.size
        return lanes * (ptrs.get_element_ty().primitive_bitwidth // 8)

    def load(self, ptrs, mask, *args, **kwargs):
        counts["loaded"] += nbytes(ptrs, mask)
        counts["loads"] += 1
        return originals["create_masked_load"](self, ptrs, mask, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        counts["stored"] += nbytes(ptrs, mask)
        counts["stores"] += 1
        return originals["create_masked_store"](self, ptrs, value, mask, *args, **kwargs)

    def atomic(self, op, ptrs, value, mask, *args, **kwargs):
        counts["atomic"] += nbytes(ptrs, mask)
        counts["atomics"] += 1
        return originals["create_atomic_rmw"](self, op, ptrs, value, mask, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = load, store
    builder.create_atomic_rmw = atomic
    try:
        fn()
    finally:
        for name, original in originals.items():
            setattr(builder, name, original)
    return counts
