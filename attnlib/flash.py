"""FlashAttention in pure PyTorch: tiles and the online softmax (chapter 9).

Naive attention builds the ``(L, S)`` score matrix, so its memory grows as ``L * S``.
FlashAttention (Dao et al., 2022) computes the *same* result tile by tile: for a block
of ``block_q`` queries it walks over blocks of ``block_k`` keys, keeping for every
query row

* ``m``: the largest score seen so far (the running max),
* ``l``: the sum of ``exp(score - m)`` so far (the running sum),
* ``acc``: the sum of ``exp(score - m) * value`` so far (the un-normalised output).

When a new tile raises the max from ``m_old`` to ``m_new``, everything accumulated so
far was exponentiated against the wrong shift, so ``l`` and ``acc`` are multiplied by
``exp(m_old - m_new)`` before the tile's own terms are added. After the last tile,
``acc / l`` is exactly ``softmax(scores) @ value``, and ``m + log(l)`` is the row's
log-sum-exp. The largest score-shaped tensor is one ``(block_q, block_k)`` tile per
head: nothing of size ``L x S`` is ever made. The loops follow FlashAttention-2's
order: the outer loop runs over query blocks, the inner one over key blocks.

The backward pass (:class:`_FlashAttentionFunction`) saves only ``q, k, v``, the output
and the log-sum-exp, and recomputes each tile of probabilities from them
(``P = exp(S - lse)``), so training is linear in memory too.
:func:`flash_attention_backward` is the same backward pass as a function of those saved
tensors.

Everything runs on whole batches at once: the leading dims ``(...)`` (e.g. ``(B, H)``)
are flattened into one batch axis ``N`` and every tile is a batched matmul.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._validate import check_positive_int, check_tensor, compute_dtype
from .attention import _check_qkv

__all__ = ["flash_attention", "flash_attention_backward"]  # attnlib's public names from this module

# Measured on the 2-core CPU, fp32 (1, H, 4096, 64), best of 4-6:
#   H=8: naive 1.04 s, flash 512x256 0.41 s (512x512 0.44, 256x256 0.42-0.49,
#        128x128 0.48-0.55, key-block-outer loop no better);
#   H=1: naive 0.12-0.18 s, 512x256 0.06 s, 128x128 0.15 s (per-tile Python overhead).
# 512x256 is fastest or tied with a small tile.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 256


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_inputs(query: Tensor, key: Tensor, value: Tensor, is_causal: object,
                  scale: object, block_q: object, block_k: object,
                  return_lse: object) -> float:
    """Validate everything; return the scale to use."""
    _check_qkv(query, key, value, enable_gqa=False)
    for name, t in (("key", key), ("value", value)):
        if t.shape[:-2] != query.shape[:-2]:
            raise ValueError(
                f"query and {name} must have the same leading (batch/head) dims, got "
                f"{tuple(query.shape)} and {tuple(t.shape)}; "
                "flash_attention does not broadcast"
            )
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if query.size(-1) == 0:
        raise ValueError(
            f"the head dim E must be >= 1, got query of shape {tuple(query.shape)}")
    _check_flag(is_causal, "is_causal")
    _check_flag(return_lse, "return_lse")
    check_positive_int(block_q, "block_q")
    check_positive_int(block_k, "block_k")
    if scale is None:
        return 1.0 / math.sqrt(query.size(-1))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _causal_tile_mask(i0: int, i1: int, j0: int, j1: int,
                      device: torch.device) -> Tensor:
    """``True`` where key ``j`` lies after query ``i`` (top-left aligned)."""
    rows = torch.arange(i0, i1, device=device)  # (bq,)
    cols = torch.arange(j0, j1, device=device)  # (bk,)
    return cols[None, :] > rows[:, None]  # (bq, bk)


def _forward(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float,
             block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
    """Tiled forward on flattened inputs q (N, L, E), k (N, S, E), v (N, S, Ev), all in
    the compute dtype. Returns out (N, L, Ev) and lse (N, L), in that dtype too."""
    N, L, _ = q.shape
    S, Ev = v.shape[-2:]
    qs = q * scale  # (N, L, E): scaling q once is cheaper than scaling every tile
    kt = k.transpose(-2, -1)  # (N, E, S), a view
    out = q.new_empty(N, L, Ev)  # (N, L, Ev)
    lse = q.new_empty(N, L)  # (N, L)
    for i0 in range(0, L, block_q):  # outer loop: a block of queries
        i1 = min(i0 + block_q, L)
        q_blk = qs[:, i0:i1]  # (N, bq, E)
        m = q.new_full((N, i1 - i0), float("-inf"))  # (N, bq) running max
        l = q.new_zeros(N, i1 - i0)  # (N, bq) running sum
        acc = q.new_zeros(N, i1 - i0, Ev)  # (N, bq, Ev) un-normalised output
        # Causal: query i sees keys 0..i, so key tiles from i1 on are skipped. Every
        # row sees key 0 in the first tile, so m is finite from then on (no NaN).
        k_end = min(S, i1) if is_causal else S
        for j0 in range(0, k_end, block_k):  # inner loop: a block of keys and values
            j1 = min(j0 + block_k, S)
            s = torch.bmm(q_blk, kt[:, :, j0:j1])  # (N, bq, bk) scaled scores
            if is_causal and j1 - 1 > i0:  # the tile crosses the diagonal
                mask = _causal_tile_mask(i0, i1, j0, j1, q.device)
                s.masked_fill_(mask, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))  # (N, bq)
            alpha = torch.exp(m - m_new)  # (N, bq); exp(-inf) = 0 at the first tile
            p = s.sub_(m_new.unsqueeze(-1)).exp_()  # (N, bq, bk), in place on s
            l.mul_(alpha).add_(p.sum(dim=-1))  # (N, bq)
            acc.mul_(alpha.unsqueeze(-1)).baddbmm_(p, v[:, j0:j1])  # (N, bq, Ev)
            m = m_new
        # A row with no keys at all (S == 0) keeps l = 0, acc = 0: output 0, lse -inf.
        out[:, i0:i1] = acc / torch.where(l == 0, 1.0, l).unsqueeze(-1)  # (N, bq, Ev)
        lse[:, i0:i1] = m + torch.log(l)  # (N, bq); -inf + log(0) = -inf if no keys
    return out, lse


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              d_out: Tensor, d_lse: Tensor, is_causal: bool, scale: float,
              block_q: int, block_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tiled backward by recomputation, on flattened compute-dtype tensors:
    q (N, L, E), k (N, S, E), v (N, S, Ev), out and d_out (N, L, Ev), lse and d_lse
    (N, L).

    Per tile, with P = exp(S - lse): dV += P^T dO; dP = dO V^T; dS = P * (dP - D)
    with D = rowsum(dO * O) - d_lse (d lse / d S = P adds the d_lse term);
    dQ += dS K * scale; dK += dS^T Q * scale. Returns dq (N, L, E), dk (N, S, E),
    dv (N, S, Ev)."""
    N, L, E = q.shape
    S, Ev = v.shape[-2:]
    qs = q * scale  # (N, L, E)
    delta = (d_out * out).sum(dim=-1) - d_lse  # (N, L)
    dq = torch.zeros_like(q)  # (N, L, E), accumulated across key blocks
    dk = q.new_empty(N, S, E)  # (N, S, E)
    dv = q.new_empty(N, S, Ev)  # (N, S, Ev)
    for j0 in range(0, S, block_k):  # outer loop: a block of keys and values
        j1 = min(j0 + block_k, S)
        k_blk, v_blk = k[:, j0:j1], v[:, j0:j1]  # (N, bk, E), (N, bk, Ev)
        dk_blk = q.new_zeros(N, j1 - j0, E)  # (N, bk, E)
        dv_blk = q.new_zeros(N, j1 - j0, Ev)  # (N, bk, Ev)
        # Causal: only queries i >= j0 see this key block; start at the block of j0.
        i_start = (j0 // block_q) * block_q if is_causal else 0
        for i0 in range(i_start, L, block_q):  # inner loop: a block of queries
            i1 = min(i0 + block_q, L)
            s = torch.bmm(qs[:, i0:i1], k_blk.transpose(-2, -1))  # (N, bq, bk)
            if is_causal and j1 - 1 > i0:
                mask = _causal_tile_mask(i0, i1, j0, j1, q.device)
                s.masked_fill_(mask, float("-inf"))
            p = s.sub_(lse[:, i0:i1].unsqueeze(-1)).exp_()  # (N, bq, bk) weights
            do_blk = d_out[:, i0:i1]  # (N, bq, Ev)
            dv_blk.baddbmm_(p.transpose(-2, -1), do_blk)  # (N, bk, Ev)
            dp = torch.bmm(do_blk, v_blk.transpose(-2, -1))  # (N, bq, bk)
            ds = dp.sub_(delta[:, i0:i1].unsqueeze(-1)).mul_(p)  # (N, bq, bk)
            dq[:, i0:i1].baddbmm_(ds, k_blk)  # (N, bq, E), times scale at the end
            dk_blk.baddbmm_(ds.transpose(-2, -1), qs[:, i0:i1])  # (N, bk, E)
        dk[:, j0:j1] = dk_blk
        dv[:, j0:j1] = dv_blk
    return dq.mul_(scale), dk, dv


def _flatten(query: Tensor, key: Tensor,
             value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the leading dims into one batch axis N and move to the compute dtype."""
    dtype = compute_dtype(query.dtype)
    *lead, L, E = query.shape
    S, Ev = value.shape[-2:]
    N = math.prod(lead)
    q = query.reshape(N, L, E).to(dtype)  # (N, L, E)
    k = key.reshape(N, S, E).to(dtype)  # (N, S, E)
    v = value.reshape(N, S, Ev).to(dtype)  # (N, S, Ev)
    return q, k, v


def _flash_forward(query: Tensor, key: Tensor, value: Tensor, is_causal: bool,
                   scale: float, block_q: int,
                   block_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward on the caller's shapes: out (..., L, Ev) in the query's dtype, lse
    (..., L) in the compute dtype, and the same two flattened in the compute dtype,
    (N, L, Ev) and (N, L), which the backward pass keeps."""
    out_flat, lse_flat = _forward(*_flatten(query, key, value), is_causal, scale,
                                  block_q, block_k)
    *lead, L, _ = query.shape
    out = out_flat.reshape(*lead, L, value.size(-1)).to(query.dtype)  # (..., L, Ev)
    return out, lse_flat.reshape(*lead, L), out_flat, lse_flat


def _unflatten_grads(dq: Tensor, dk: Tensor, dv: Tensor, query: Tensor, key: Tensor,
                     value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients back in the callers' shapes and dtypes."""
    return (dq.reshape(query.shape).to(query.dtype),
            dk.reshape(key.shape).to(key.dtype),
            dv.reshape(value.shape).to(value.dtype))


class _FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, the output and lse (never the (L, S) matrix)."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, is_causal: bool,
                scale: float, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
        out, lse, out_flat, lse_flat = _flash_forward(query, key, value, is_causal,
                                                      scale, block_q, block_k)
        ctx.save_for_backward(query, key, value, out_flat, lse_flat)
        ctx.config = (is_causal, scale, block_q, block_k)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, grad_lse: Tensor):
        query, key, value, out, lse = ctx.saved_tensors
        q, k, v = _flatten(query, key, value)  # (N, L, E), (N, S, E), (N, S, Ev)
        d_out = grad_out.reshape(out.shape).to(out.dtype)  # (N, L, Ev)
        d_lse = grad_lse.reshape(lse.shape).to(lse.dtype)  # (N, L)
        dq, dk, dv = _backward(q, k, v, out, lse, d_out, d_lse, *ctx.config)
        return (*_unflatten_grads(dq, dk, dv, query, key, value),
                None, None, None, None)


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
    """Exact attention softmax(q k^T * scale) v, computed tile by tile (chapter 9).

    The result equals :func:`attnlib.scaled_dot_product_attention` (up to rounding), but
    the largest intermediate is one ``(..., block_q, block_k)`` tile of scores instead of
    the ``(..., L, S)`` matrix, in the forward and in the backward pass. With
    ``is_causal`` the key tiles entirely above the diagonal are skipped, not computed and
    masked, which roughly halves the work.

    Args:
        query: ``(..., L, E)``, e.g. ``(B, H, L, head_dim)``; E >= 1.
        key: ``(..., S, E)``, same leading dims as ``query`` (no broadcasting, no GQA).
        value: ``(..., S, Ev)``, same leading dims.
        is_causal: top-left aligned causal mask as in PyTorch: query ``i`` sees keys
            ``0..i`` whatever ``S`` is.
        scale: multiplies the scores; default ``1 / sqrt(E)``.
        block_q: queries per tile (any positive int; ``L`` need not be a multiple).
        block_k: keys per tile (any positive int; ``S`` need not be a multiple).
        return_lse: also return the per-row log-sum-exp of the scaled, masked scores.

    Returns:
        ``out`` of shape ``(..., L, Ev)`` in the query's dtype, or ``(out, lse)`` with
        ``lse`` of shape ``(..., L)``. fp16/bf16 inputs are computed in fp32 and ``out``
        is cast back, but ``lse`` stays **fp32** (as in FlashAttention: it is the
        statistic the backward pass needs, and fp16 would lose it). A row with no keys
        (``S == 0``) gets a zero output and ``lse = -inf``, never NaN. Gradients flow to
        query, key and value (and through ``lse`` when it is used) via a recomputing
        backward pass whenever an input requires grad.
    """
    scale = _check_inputs(query, key, value, is_causal, scale, block_q, block_k,
                          return_lse)
    needs_grad = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    )
    if needs_grad:
        out, lse = _FlashAttentionFunction.apply(query, key, value, is_causal, scale,
                                                 block_q, block_k)
    else:
        out, lse, _, _ = _flash_forward(query, key, value, is_causal, scale, block_q,
                                        block_k)
    return (out, lse) if return_lse else out


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
    """The backward pass of :func:`flash_attention`, tile by tile, by recomputation (chapter 9).

    Given what the forward pass keeps (``query``, ``key``, ``value``, the output ``out`` and
    the log-sum-exp ``lse``) and the gradient ``grad_out`` arriving at the output, returns
    the gradients with respect to query, key and value. Each tile of weights is rebuilt from
    its scores, ``P = exp(scores - lse)``, and used at once: with ``D = rowsum(grad_out * out)``
    (minus ``grad_lse``), ``dV += P^T dO``, ``dS = P * (dO V^T - D)``, ``dQ += scale * dS K``
    and ``dK += scale * dS^T Q``. As in the forward pass, nothing of size ``L x S`` is
    built: the largest intermediate is one ``(..., block_q, block_k)`` tile.

    Args:
        query, key, value: as in :func:`flash_attention`: ``(..., L, E)``, ``(..., S, E)``,
            ``(..., S, Ev)``.
        out: ``(..., L, Ev)``, the forward output.
        lse: ``(..., L)``, the forward log-sum-exp (``return_lse=True``).
        grad_out: ``(..., L, Ev)``, the gradient of the loss with respect to ``out``.
        is_causal, scale, block_q, block_k: those of the forward pass.
        grad_lse: optional ``(..., L)``, the gradient with respect to ``lse`` when the loss
            uses it too; ``None`` means zero.

    Returns:
        ``(grad_query, grad_key, grad_value)``, shaped and typed like ``query``, ``key`` and
        ``value``; fp16/bf16 are computed in fp32. The same as autograd through
        :func:`flash_attention` (or through naive attention), up to rounding.
    """
    scale = _check_inputs(query, key, value, is_causal, scale, block_q, block_k, False)
    *lead, L, _ = query.shape
    Ev = value.size(-1)
    expected = {"out": (*lead, L, Ev), "lse": (*lead, L), "grad_out": (*lead, L, Ev),
                "grad_lse": (*lead, L)}
    given = {"out": out, "lse": lse, "grad_out": grad_out, "grad_lse": grad_lse}
    for name, t in given.items():
        if t is None and name == "grad_lse":
            continue
        check_tensor(t, name, min_ndim=0)
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} for query "
                             f"{tuple(query.shape)} and value {tuple(value.shape)}, "
                             f"got {tuple(t.shape)}")
    q, k, v = _flatten(query, key, value)  # (N, L, E), (N, S, E), (N, S, Ev)
    N = q.size(0)
    o = out.reshape(N, L, Ev).to(q.dtype)  # (N, L, Ev)
    lse_flat = lse.reshape(N, L).to(q.dtype)  # (N, L)
    d_out = grad_out.reshape(N, L, Ev).to(q.dtype)  # (N, L, Ev)
    d_lse = (q.new_zeros(N, L) if grad_lse is None
             else grad_lse.reshape(N, L).to(q.dtype))  # (N, L)
    dq, dk, dv = _backward(q, k, v, o, lse_flat, d_out, d_lse, is_causal, scale,
                           block_q, block_k)
    return _unflatten_grads(dq, dk, dv, query, key, value)
