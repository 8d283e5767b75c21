"""Multi-head attention with optional grouped/multi-query sharing of keys and values.

Chapter 4 (heads), chapter 5 (self- vs cross-attention, masks), chapter 6 (GQA, MQA and
the KV cache). The manual path calls :func:`attnlib.scaled_dot_product_attention`; the
fused path (``fused=True``) calls PyTorch's kernel. ``tests/test_multihead.py`` checks that
both agree, and that the module matches ``torch.nn.MultiheadAttention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import check_positive_int, check_tensor
from .attention import scaled_dot_product_attention
from .gqa import repeat_kv
from .kv_cache import KVCache
from .masks import causal_mask
from .positional import apply_rope

__all__ = ["MultiHeadAttention"]  # attnlib's public names from this module


class MultiHeadAttention(nn.Module):
    """Multi-head attention: MHA, GQA or MQA by the choice of ``n_kv_heads`` (chapters 4-6).

    ``n_heads`` query heads of ``head_dim = d_model // n_heads`` dimensions each, and
    ``n_kv_heads`` key/value heads (``None``: as many as query heads, plain MHA; ``1``:
    multi-query attention; in between: grouped-query attention, where query head ``h``
    reads KV head ``h // (n_heads // n_kv_heads)``).

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of query heads.
        n_kv_heads: number of key/value heads; must divide ``n_heads``.
        bias: add biases to the four projections (as ``nn.MultiheadAttention`` does).
        fused: compute attention with ``torch.nn.functional.scaled_dot_product_attention``
            instead of attnlib's manual version. Results agree to float tolerance.
        rope_base: if given, rotate queries and keys with RoPE (:func:`attnlib.apply_rope`)
            at their absolute positions (offset by the cache length when decoding).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
        fused: bool = False,
        rope_base: float | None = None,
    ) -> None:
        super().__init__()
        n_kv_heads = self._valid_head_counts(d_model, n_heads, n_kv_heads)
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.fused, self.rope_base = fused, rope_base
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)

    @staticmethod
    def _valid_head_counts(d_model: int, n_heads: int, n_kv_heads: int | None) -> int:
        """Check the constructor's sizes; return ``n_kv_heads`` (``None``: n_heads)."""
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        if n_kv_heads is None:
            n_kv_heads = n_heads
        check_positive_int(n_kv_heads, "n_kv_heads")
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by n_heads ({n_heads})"
            )
        if n_heads % n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})"
            )
        return n_kv_heads

    def split_heads(self, x: Tensor, n_heads: int) -> Tensor:
        """(B, L, n_heads * head_dim) -> (B, n_heads, L, head_dim)."""
        B, L, _ = x.shape
        return x.view(B, L, n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)

    @staticmethod
    def merge_heads(x: Tensor) -> Tensor:
        """(B, n_heads, L, head_dim) -> (B, L, n_heads * head_dim)."""
        B, H, L, D = x.shape
        return x.transpose(1, 2).reshape(B, L, H * D)  # (B, L, H * D)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Attend from ``x`` to itself, or to ``context`` (cross-attention).

        Args:
            x: ``(B, L, d_model)``: the sequence that asks (queries).
            context: ``(B, S, d_model)``: the sequence attended to (keys and values);
                ``None`` means self-attention (``context = x``).
            attn_mask: boolean (``True`` = may attend) or float (added), broadcastable
                to ``(B, n_heads, L, S)``, where ``S`` counts cached positions too.
            is_causal: causal self-attention, top-left aligned as in PyTorch.
            kv_cache: a :class:`attnlib.KVCache`; the new keys and values are appended
                to it and attention runs over all cached positions. Positions are
                absolute: new token ``i`` of the chunk sits at position
                ``cache.seq_len + i`` and sees every cached position and the chunk's
                tokens ``0..i`` (a cache implies causal decoding, so ``is_causal`` is
                then redundant). Token-by-token decoding and a chunked prefill both
                reproduce the full causal forward.

        Returns:
            ``(B, L, d_model)``.
        """
        _validate_inputs(self.d_model, x, context, kv_cache)
        source = x if context is None else context
        L = x.size(1)
        q = self.split_heads(self.q_proj(x), self.n_heads)  # (B, H, L, D)
        k = self.split_heads(self.k_proj(source), self.n_kv_heads)  # (B, H_kv, S, D)
        v = self.split_heads(self.v_proj(source), self.n_kv_heads)  # (B, H_kv, S, D)

        offset = 0 if kv_cache is None else kv_cache.seq_len
        if self.rope_base is not None:
            positions = torch.arange(offset, offset + L, device=x.device)  # (L,)
            q = apply_rope(q, positions, self.rope_base)
            if context is None:
                k = apply_rope(k, positions, self.rope_base)
            else:
                key_positions = torch.arange(k.size(-2), device=x.device)  # (S,)
                k = apply_rope(k, key_positions, self.rope_base)

        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, H_kv, S, D): S = offset + L for KVCache
            S = k.size(-2)  # the new tokens are the last L of the S returned
            allowed = torch.ones(L, S, dtype=torch.bool, device=x.device)
            allowed = allowed.tril(S - L)  # (L, S), bottom-right aligned
            attn_mask = _combine(allowed, attn_mask, q.dtype)  # i sees 0..S-L+i
            is_causal = False
        elif is_causal and attn_mask is not None:  # F.sdpa takes one or the other
            causal = causal_mask(L, k.size(-2), device=x.device)  # (L, S), top-left
            attn_mask = _combine(causal, attn_mask, q.dtype)
            is_causal = False

        if self.fused:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, H, L, D)
        else:
            n_rep = self.n_heads // self.n_kv_heads
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, D)
            y = scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal
            )  # (B, H, L, D)
        return self.o_proj(self.merge_heads(y))  # (B, L, d_model)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, fused: bool = False) -> "MultiHeadAttention":
        """Copy the weights of a ``torch.nn.MultiheadAttention`` into a new module.

        The result computes the same function (``nn.MultiheadAttention`` packs q, k and v
        projections into one ``in_proj_weight``; here they are three ``nn.Linear``). Note the
        mask conventions differ: there ``True`` in a boolean mask means *blocked*.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected torch.nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only MultiheadAttention with kdim = vdim = embed_dim, no add_bias_kv "
                             "and no add_zero_attn can be converted")
        has_bias = mha.in_proj_bias is not None
        module = cls(mha.embed_dim, mha.num_heads, bias=has_bias, fused=fused)
        module = module.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            for i, proj in enumerate((module.q_proj, module.k_proj, module.v_proj)):
                rows = slice(i * mha.embed_dim, (i + 1) * mha.embed_dim)
                proj.weight.copy_(mha.in_proj_weight[rows])
                if has_bias:
                    proj.bias.copy_(mha.in_proj_bias[rows])
            module.o_proj.weight.copy_(mha.out_proj.weight)
            if has_bias:
                module.o_proj.bias.copy_(mha.out_proj.bias)
        return module


def _validate_inputs(
    d_model: int, x: Tensor, context: Tensor | None, kv_cache: KVCache | None
) -> None:
    """The argument checks of :meth:`MultiHeadAttention.forward`."""
    check_tensor(x, "x", min_ndim=3)
    if x.ndim != 3 or x.size(-1) != d_model:
        raise ValueError(f"x must be (B, L, d_model={d_model}), got {tuple(x.shape)}")
    if context is None:
        return
    check_tensor(context, "context", min_ndim=3)
    if context.ndim != 3 or context.size(0) != x.size(0) or context.size(-1) != d_model:
        raise ValueError(
            f"context must be (B={x.size(0)}, S, d_model={d_model}), "
            f"got {tuple(context.shape)}"
        )
    if kv_cache is not None:
        raise ValueError(
            "kv_cache is for self-attention decoding; for cross-attention the context's "
            "keys and values do not grow, so compute them once instead"
        )


def _combine(allowed: Tensor, attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """AND a boolean ``allowed`` mask with a user mask (boolean, or float: added)."""
    if attn_mask is None:
        return allowed
    if attn_mask.dtype == torch.bool:
        return allowed & attn_mask
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return blocked.masked_fill(~allowed, float("-inf")) + attn_mask.to(dtype)
