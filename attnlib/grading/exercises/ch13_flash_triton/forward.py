"""The forward kernel's exercise: its cases, its mistakes (the course's kernel with switches,
and a kernel whose masked loads lack ``other=``) and its registration."""

from __future__ import annotations

from typing import Any

import torch

from ....triton_flash import flash_fwd_kernel
from ...core import Case, Mistake
from .launching import (F16, F32, FORWARD, MODEL, TOP_LEFT, UNSEEN, _qkv, _register_kernel, _Variant,
                        launch_forward)

import triton  # after attnlib.triton_flash, which chooses the interpreter
import triton.language as tl


# ============================================================================ cases


def _fwd_case(name: str, B: int, H: int, L: int, S: int, D: int, seed: int, dtype: torch.dtype = F32,
              std: float = 1.0, **kwargs: Any) -> Case:
    return Case(name, _qkv(B, H, L, S, D, seed, dtype, std), kwargs, low_precision=True)


def _fwd_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _fwd_case("float32, L = S = 100 (a ragged second block), head_dim 32", 1, 1, 100, 100, 32, 1300),
            _fwd_case("float32, batch 2, causal, L = S = 100, head_dim 16", 2, 1, 100, 100, 16, 1305,
                      is_causal=True),
            _fwd_case("float16, L = 50, S = 130, head_dim 64", 1, 1, 50, 130, 64, 1310, F16),
            _fwd_case("float32, causal, L = 100 > S = 70, head_dim 32, scale = 0.3", 1, 2, 100, 70, 32, 1315,
                      is_causal=True, scale=0.3),
        ]
    return [
        _fwd_case("L = S = 1", 1, 1, 1, 1, 16, 1320),
        _fwd_case("L = 1, S = 129 (a last key block of one key), scale = 0.05", 1, 1, 1, 129, 32, 1325,
                  scale=0.05),
        _fwd_case("causal, L = 30 < S = 130 (top-left: the last keys are never seen)", 1, 2, 30, 130, 16, 1330,
                  is_causal=True),
        _fwd_case("float16, causal, L = S = 128 (whole blocks), head_dim 64", 1, 1, 128, 128, 64, 1335, F16,
                  is_causal=True),
        _fwd_case("large scores (in the hundreds): the running maximum matters", 1, 1, 70, 90, 16, 1340, std=3.0,
                  scale=1.0),
        _fwd_case("float16, batch 2 x 2 heads, causal, L = 40, S = 70", 2, 2, 40, 70, 16, 1345, F16,
                  is_causal=True),
    ]


# ============================================================================ forward mistakes


@triton.jit
def _fwd_variant(
    Q, K, V, O, LSE, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    RESCALE_ACC: tl.constexpr = True,  # the accumulator rescaled by alpha = exp(m_old - m_new)
    RESCALE_SUM: tl.constexpr = True,  # the running sum too
    MASK: tl.constexpr = 1,  # causal: 0 no mask inside a block, 1 top-left (j <= i), 2 bottom-right
    SKIP: tl.constexpr = True,  # causal: the key blocks right of the diagonal skipped
    LSE_MODE: tl.constexpr = 0,  # 0 m + log(l), 1 log(l) (without the maximum), 2 in base 2
    RAGGED: tl.constexpr = 0,  # 0 right, 1 loop bound floor(S / BLOCK_N), 2 padding keys not masked
):
    """The course's forward kernel with switches: the default switches compute attention."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=offs_m[:, None] < L, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = S
    if RAGGED == 1:
        hi = (S // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        if SKIP:
            if MASK == 2:
                hi = tl.minimum(hi, tl.maximum((pid_m + 1) * BLOCK_M + S - L, 0))
            else:
                hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                    mask=cols[:, None] < S, other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        if RAGGED == 2:
            valid = cols[None, :] >= 0
        else:
            valid = cols[None, :] < S
        if IS_CAUSAL:
            if MASK == 1:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            if MASK == 2:
                valid = valid & (cols[None, :] <= offs_m[:, None] + (S - L))
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        if RESCALE_SUM:
            l_i = l_i * alpha + tl.sum(p, 1)
        else:
            l_i = l_i + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=cols[:, None] < S, other=0.0)
        if RESCALE_ACC:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=offs_m[:, None] < L)
    if LSE_MODE == 1:
        lse = tl.log(l_safe)
    elif LSE_MODE == 2:
        lse = m_i * 1.4426950408889634 + tl.log2(l_safe)  # log2(e) * (m + log(l))
    else:
        lse = m_i + tl.log(l_safe)
    lse = tl.where(l_i == 0.0, float("inf"), lse)
    tl.store(LSE + pid_bh * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _fwd_without_other(
    Q, K, V, O, LSE, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """The forward kernel with the key and value blocks loaded without ``other=``: right
    under the interpreter (masked-off lanes read 0), undefined on a GPU."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=offs_m[:, None] < L, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                    mask=cols[:, None] < S)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        valid = cols[None, :] < S
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=cols[:, None] < S)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=offs_m[:, None] < L)
    tl.store(LSE + pid_bh * L + offs_m, tl.where(l_i == 0.0, float("inf"), m_i + tl.log(l_safe)),
             mask=offs_m < L)


_FWD_NO_OTHER = Mistake(
    "a masked tl.load without other=",
    "Masked-off lanes of a tl.load without other= hold undefined values: zeros under the "
    "interpreter, so the values here are right, but whatever memory held on a GPU, which then "
    "flows into tl.dot and tl.max. Give every masked load other=0.0 (or -inf where a maximum "
    "is taken).",
    UNSEEN,
    _fwd_without_other,
)

FWD_MISTAKES = (
    Mistake(
        "no rescaling of the accumulator",
        "When a key block raises a row's running maximum from m_old to m_new, the accumulator of "
        "exp(s - m_old) @ V must be multiplied by alpha = exp(m_old - m_new) before the block's "
        "p @ v is added; otherwise old and new terms are on different scales.",
        FORWARD,
        _Variant(_fwd_variant, RESCALE_ACC=False),
    ),
    Mistake(
        "no rescaling of the running sum",
        "The running sum l of exp(s - m) must be multiplied by alpha = exp(m_old - m_new) when "
        "the maximum changes, like the accumulator; otherwise the final acc / l divides by a sum "
        "on the wrong scale.",
        FORWARD,
        _Variant(_fwd_variant, RESCALE_SUM=False),
    ),
    Mistake(
        "the causal mask forgotten",
        "With IS_CAUSAL, query i sees only keys j <= i: stop the key loop at the diagonal block "
        "and set the scores of the later keys inside it to -inf. This output is attention over "
        "every key.",
        FORWARD,
        _Variant(_fwd_variant, MASK=0, SKIP=False),
    ),
    Mistake(
        "the diagonal block left unmasked",
        "Skipping the key blocks right of the diagonal is not enough: inside the block that "
        "straddles the diagonal, the keys j > i must still get the score -inf.",
        FORWARD,
        _Variant(_fwd_variant, MASK=0),
    ),
    Mistake(
        "the causal mask aligned bottom-right",
        "is_causal is aligned top-left in this course, as in PyTorch: query i sees keys 0..i "
        "whatever S is. Shifting the diagonal by S - L (keys j <= i + S - L) is the alignment "
        "of decoding with a cache.",
        TOP_LEFT,
        _Variant(_fwd_variant, MASK=2),
    ),
    Mistake(
        "the log-sum-exp without the maximum",
        "l is the sum of exp(s - m), so log(l) is the log-sum-exp minus the row's maximum: store "
        "lse = m + log(l).",
        FORWARD,
        _Variant(_fwd_variant, LSE_MODE=1),
    ),
    Mistake(
        "the log-sum-exp in base 2",
        "With tl.exp2 and scores scaled by log2(e), m + log2(l) is the log-sum-exp in base 2: the "
        "backward expects the natural one, so divide it by log2(e) (multiply by ln 2).",
        FORWARD,
        _Variant(_fwd_variant, LSE_MODE=2),
    ),
    Mistake(
        "the ragged last key block dropped",
        "The key loop must run to S, not to a multiple of BLOCK_N: range(0, S, BLOCK_N) visits "
        "the last, partly filled block too (its loads masked), where a bound of (S // BLOCK_N) * "
        "BLOCK_N leaves its keys out.",
        MODEL,
        _Variant(_fwd_variant, RAGGED=1),
    ),
    Mistake(
        "the padding keys of the last block not masked",
        "The last key block reaches past S: its missing keys are loaded as zeros, so their scores "
        "are 0, not -inf, and they take weight from the real keys. Mask the scores with cols < S.",
        MODEL,
        _Variant(_fwd_variant, RAGGED=2),
    ),
    _FWD_NO_OTHER,
)

_register_kernel("flash_fwd_kernel", flash_fwd_kernel, FORWARD, _fwd_cases, FWD_MISTAKES, launch_forward,
                 race=None, no_other=_FWD_NO_OTHER)
