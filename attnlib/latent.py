"""Multi-head latent attention (MLA), the attention of DeepSeek-V2 and V3 (chapter 12).

Chapter 12, "Putting it together, and the attention of today's LLMs". Source:
DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts
Language Model", 2024 (arXiv:2405.04434), section 2.1.

GQA and MQA (chapter 6) shrink the KV cache by having fewer key/value heads. MLA keeps
every head but caches, per token, one small *latent* vector ``c_KV = W^DKV x`` of
``kv_rank`` numbers (the paper's ``d_c``), from which each head's key and value are
rebuilt by up-projections: ``k_h = W^UK_h c_KV``, ``v_h = W^UV_h c_KV`` (low-rank
key-value joint compression, section 2.1.2).

Since a score is ``q_h . k_h = q_h . (W^UK_h c_KV) = (W^UK_h^T q_h) . c_KV``, at inference
``W^UK`` can be *absorbed* into the query side, and likewise ``W^UV`` into the output
side: attention then runs directly over the cached latents, and per-head keys and values
are never built. Seen that way, absorbed MLA is multi-query attention (chapter 6) with a
single key/value "head" of ``kv_rank`` dimensions.

RoPE (chapter 7) would spoil this: it rotates the key by a matrix ``R_n`` that depends on
the key's position, so the score ``q_h . (R_n W^UK_h c_KV)`` puts a position-dependent
matrix between the query and ``W^UK``, and no fixed matrix can be absorbed. The paper's
answer is the *decoupled* RoPE of section 2.1.3: a few extra channels per head
(``rope_dim``, the paper's ``d_h^R``) carry the position, with one rotated key
``k^R = RoPE(W^KR x)`` shared by all heads and cached beside the latent; the compressed
latent itself is never rotated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._validate import check_floating, check_positive_int, check_tensor
from .attention import scaled_dot_product_attention
from .positional import apply_rope

__all__ = ["MultiHeadLatentAttention", "mla_absorbed_attention", "mla_kv_cache_bytes"]  # attnlib's public names from this module


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention, DeepSeek-V2 section 2.1 (chapter 12).

    Per token ``x`` (``d_model``) and head ``h``, in the paper's names:

    * query ``q_h = W^Q_h x`` (``q_proj``, ``head_dim`` per head). DeepSeek-V2 also
      compresses the queries (``d_c' = 1536``) to save activation memory in training;
      that does not change the cache, and is left out here: queries come straight from x;
    * latent ``c_KV = W^DKV x`` (``kv_down``, ``kv_rank`` numbers, the paper's ``d_c``):
      with the rope key, the only thing a KV cache keeps (see :meth:`latent_cache`);
    * key ``k_h = W^UK_h c_KV`` (``k_up``) and value ``v_h = W^UV_h c_KV`` (``v_up``);
    * with ``rope_dim > 0``, decoupled RoPE: a query slice ``q^R_h = RoPE(W^QR_h x)``
      (``q_rope``, ``rope_dim`` per head) and one key ``k^R = RoPE(W^KR x)`` (``k_rope``,
      ``rope_dim``) shared by all heads, appended to ``q_h`` and ``k_h``; the score is
      ``[q_h; q^R_h] . [k_h; k^R] / sqrt(head_dim + rope_dim)``. RoPE touches only
      these channels, never the latent: a rotation between ``W^UK`` and the query
      would block the absorption below;
    * output ``o_proj`` (``W^O``) of the concatenated heads.

    ``forward(absorb=True)`` computes the same function as the inference path of the
    paper: ``W^UK_h`` is folded into the query (``q_h W^UK_h`` is scored against ``c_KV``
    directly) and ``W^UV_h`` is applied after attending over the latents, just before
    ``o_proj``. The products are only re-associated, so both paths agree to rounding.
    Here the absorbed matrices are applied one after the other rather than multiplied
    out beforehand: same result, and cheaper when ``kv_rank > head_dim``.

    No biases, as in the paper. Left out: DeepSeek-V2's RMSNorm on the latent and its
    YaRN extension of RoPE. ``rope_base`` (10000) is an attribute.

    Args:
        d_model: model width.
        n_heads: number of heads.
        head_dim: dimension of each head's query, key and value (not derived from
            d_model: DeepSeek-V2 has d_model 5120 and 128 heads of 128).
        kv_rank: dimension of the cached latent ``c_KV`` (``d_c``).
        rope_dim: per-head dimension of the decoupled RoPE query and of the shared RoPE
            key (``d_h^R``); 0: no positional channels. Must be even.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, kv_rank: int,
                 rope_dim: int = 0) -> None:
        super().__init__()
        for value, name in ((d_model, "d_model"), (n_heads, "n_heads"),
                            (head_dim, "head_dim"), (kv_rank, "kv_rank")):
            check_positive_int(value, name)
        check_positive_int(rope_dim, "rope_dim", allow_zero=True)
        if rope_dim % 2:
            raise ValueError(f"rope_dim must be even (RoPE turns pairs of channels), got {rope_dim}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.kv_rank, self.rope_dim, self.rope_base = kv_rank, rope_dim, 10000.0
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)  # W^Q
        self.kv_down = nn.Linear(d_model, kv_rank, bias=False)  # W^DKV: the latent
        self.k_up = nn.Linear(kv_rank, n_heads * head_dim, bias=False)  # W^UK
        self.v_up = nn.Linear(kv_rank, n_heads * head_dim, bias=False)  # W^UV
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)  # W^O
        self.q_rope = nn.Linear(d_model, n_heads * rope_dim, bias=False) if rope_dim else None  # W^QR
        self.k_rope = nn.Linear(d_model, rope_dim, bias=False) if rope_dim else None  # W^KR

    def latent_cache(self, x: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """What a KV cache of this layer keeps for each token: the latent and the rope key.

        Args:
            x: ``(B, T, d_model)``.
            positions: as in :meth:`forward`.

        Returns:
            ``(c_kv, k_rope)``: the latent ``c_KV = W^DKV x``, ``(B, T, kv_rank)``, not
            rotated; and the shared RoPE key ``RoPE(W^KR x)``, ``(B, T, rope_dim)``,
            already rotated (empty when ``rope_dim == 0``). ``kv_rank + rope_dim``
            numbers per token, whatever ``n_heads`` and ``head_dim``: see
            :func:`mla_kv_cache_bytes`.
        """
        self._check_x(x, positions)
        return self._latent_cache(x, positions)

    def _latent_cache(self, x: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor]:
        c_kv = self.kv_down(x)  # (B, T, kv_rank)
        if self.k_rope is None:
            return c_kv, x.new_zeros(x.size(0), x.size(1), 0)  # (B, T, 0)
        k_rope = apply_rope(self.k_rope(x), positions, self.rope_base)  # (B, T, rope_dim)
        return c_kv, k_rope

    def forward(self, x: Tensor, is_causal: bool = True, absorb: bool = False, *,
                positions: Tensor | None = None) -> Tensor:
        """Self-attention of ``x`` through the latent.

        Args:
            x: ``(B, T, d_model)``, floating point.
            is_causal: token ``i`` attends to tokens ``0..i`` only.
            absorb: ``False``, the naive path: up-project the latent to per-head keys and
                values and attend. ``True``, the inference path of the paper: attend over
                the latents with ``W^UK`` folded into the query and ``W^UV`` applied
                after; no per-head key or value is built. Same output.
            positions: position of each token for RoPE, ``(T,)`` or ``(B, T)`` integers
                (default ``arange(T)``); used only by the decoupled channels.

        Returns:
            ``(B, T, d_model)``.
        """
        self._check_x(x, positions)
        for value, name in ((is_causal, "is_causal"), (absorb, "absorb")):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        c_kv, k_rope = self._latent_cache(x, positions)  # (B, T, kv_rank), (B, T, rope_dim)
        q = self._split_heads(self.q_proj(x), self.head_dim)  # (B, H, T, head_dim)
        if self.q_rope is None:
            q_rope = q.new_zeros(*q.shape[:-1], 0)  # (B, H, T, 0)
        else:
            q_rope = self._split_heads(self.q_rope(x), self.rope_dim)  # (B, H, T, rope_dim)
            q_rope = apply_rope(q_rope, positions, self.rope_base)  # (B, H, T, rope_dim)
        scale = 1.0 / math.sqrt(self.head_dim + self.rope_dim)  # the per-head score width
        attend = self._absorbed if absorb else self._naive
        y = attend(q, q_rope, c_kv, k_rope, is_causal, scale)  # (B, H, T, head_dim)
        B, H, T, D = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, d_model)

    def _naive(self, q: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor,
               is_causal: bool, scale: float) -> Tensor:
        """Rebuild per-head keys and values from the latent, then attend."""
        k = self._split_heads(self.k_up(c_kv), self.head_dim)  # (B, H, T, head_dim)
        v = self._split_heads(self.v_up(c_kv), self.head_dim)  # (B, H, T, head_dim)
        k_rope = k_rope[:, None].expand(-1, self.n_heads, -1, -1)  # (B, H, T, rope_dim)
        q = torch.cat([q, q_rope], dim=-1)  # (B, H, T, head_dim + rope_dim)
        k = torch.cat([k, k_rope], dim=-1)  # (B, H, T, head_dim + rope_dim)
        y = scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
        return y  # (B, H, T, head_dim)

    def _absorbed(self, q: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor,
                  is_causal: bool, scale: float) -> Tensor:
        """Attend over the latents: W^UK moved to the query, W^UV applied after."""
        return mla_absorbed_attention(q, q_rope, c_kv, k_rope, self.k_up.weight,
                                      self.v_up.weight, is_causal, scale)  # (B, H, T, D)

    @staticmethod
    def _split_heads(x: Tensor, dim: int) -> Tensor:
        """(B, T, H * dim) -> (B, H, T, dim)."""
        B, T, _ = x.shape
        return x.view(B, T, -1, dim).transpose(1, 2)  # (B, H, T, dim)

    def _check_x(self, x: Tensor, positions: Tensor | None) -> None:
        check_tensor(x, "x", min_ndim=3)
        if x.ndim != 3 or x.size(-1) != self.d_model:
            raise ValueError(f"x must be (B, T, d_model={self.d_model}), got {tuple(x.shape)}")
        check_floating(x, "x")
        if positions is None:
            return
        check_tensor(positions, "positions")
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
        B, T, _ = x.shape
        if tuple(positions.shape) not in ((T,), (B, T)):
            raise ValueError(
                f"positions must have shape (T,) = ({T},) or (B, T) = ({B}, {T}), "
                f"got {tuple(positions.shape)}"
            )


def mla_absorbed_attention(q: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor,
                           w_uk: Tensor, w_uv: Tensor, is_causal: bool = True,
                           scale: float | None = None) -> Tensor:
    """MLA's inference path: attention straight over the cached latents (chapter 12;
    DeepSeek-V2, section 2.1.2).

    Computes what :class:`MultiHeadLatentAttention` computes with ``absorb=False``: per
    head ``h``, keys ``k_h = c_kv W^UK_h^T`` and values ``v_h = c_kv W^UV_h^T`` rebuilt
    from the latent, the shared rope key appended to every head's key, then
    ``softmax([q_h; q^R_h] . [k_h; k^R] * scale) v_h``. But it never builds ``k_h`` or
    ``v_h``: the query is moved into latent space instead, ``q_h W^UK_h`` (``kv_rank``
    numbers), and scored against ``c_kv`` directly; the weights average the latents, and
    ``W^UV_h`` turns the average into the head's output. One (latent, rope key) pair per
    token serves every head, as the single key/value head of MQA does.

    Args:
        q: ``(B, H, T, head_dim)`` queries of the compressed part (not rotated).
        q_rope: ``(B, H, T, rope_dim)`` rotated RoPE queries (``rope_dim`` may be 0).
        c_kv: ``(B, S, kv_rank)`` cached latents (never rotated).
        k_rope: ``(B, S, rope_dim)`` cached, rotated RoPE keys, shared by the heads.
        w_uk: ``(H * head_dim, kv_rank)``, the up-projection to keys (``k_up.weight``):
            head ``h``'s ``W^UK_h`` is rows ``h * head_dim .. (h + 1) * head_dim - 1``.
        w_uv: ``(H * head_dim, kv_rank)``, the up-projection to values
            (``v_up.weight``).
        is_causal: query ``i`` sees keys ``0..i``, aligned top-left as in the course.
        scale: multiplies the scores; ``None``: ``1 / sqrt(head_dim + rope_dim)``, the
            width of a head's score in the naive path (not of the latent).

    Returns:
        ``(B, H, T, head_dim)``: each head's output, before ``o_proj``.
    """
    _valid_absorbed_args(q, q_rope, c_kv, k_rope, w_uk, w_uv, is_causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1) + q_rope.size(-1))  # the naive path's width
    H, D, R = q.size(1), q.size(-1), c_kv.size(-1)
    w_uk = w_uk.view(H, D, R)  # (H, head_dim, kv_rank): W^UK_h
    w_uv = w_uv.view(H, D, R)  # (H, head_dim, kv_rank): W^UV_h
    q_latent = torch.einsum("bhtd,hdr->bhtr", q, w_uk)  # (B, H, T, kv_rank)
    q = torch.cat([q_latent, q_rope], dim=-1)  # (B, H, T, kv_rank + rope_dim)
    k = torch.cat([c_kv, k_rope], dim=-1)[:, None]  # (B, 1, S, kv_rank + rope_dim)
    o_latent = scaled_dot_product_attention(
        q, k, c_kv[:, None], is_causal=is_causal, scale=scale, enable_gqa=True,
    )  # (B, H, T, kv_rank): one key/value "head" shared by all, as in MQA
    return torch.einsum("bhtr,hdr->bhtd", o_latent, w_uv)  # (B, H, T, head_dim)


def _valid_absorbed_args(q: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor,
                         w_uk: Tensor, w_uv: Tensor, is_causal: object) -> None:
    """The argument checks of :func:`mla_absorbed_attention`."""
    for x, name, nd in ((q, "q", 4), (q_rope, "q_rope", 4), (c_kv, "c_kv", 3),
                        (k_rope, "k_rope", 3), (w_uk, "w_uk", 2), (w_uv, "w_uv", 2)):
        check_tensor(x, name, min_ndim=nd)
        if x.ndim != nd:
            raise ValueError(f"{name} must have {nd} dimensions, got shape {tuple(x.shape)}")
        check_floating(x, name)
    B, H, T, D = q.shape
    R = c_kv.size(-1)
    if q_rope.shape[:3] != (B, H, T) or k_rope.shape[:2] != c_kv.shape[:2] or \
            c_kv.size(0) != B or k_rope.size(-1) != q_rope.size(-1):
        raise ValueError(
            f"shapes do not fit: q {tuple(q.shape)} = (B, H, T, head_dim), q_rope "
            f"{tuple(q_rope.shape)} = (B, H, T, rope_dim), c_kv {tuple(c_kv.shape)} = "
            f"(B, S, kv_rank), k_rope {tuple(k_rope.shape)} = (B, S, rope_dim)")
    for w, name in ((w_uk, "w_uk"), (w_uv, "w_uv")):
        if tuple(w.shape) != (H * D, R):
            raise ValueError(f"{name} must be (n_heads * head_dim, kv_rank) = ({H * D}, {R}), "
                             f"got {tuple(w.shape)}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")


def mla_kv_cache_bytes(
    n_layers: int,
    kv_rank: int,
    rope_dim: int,
    seq_len: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float16,
) -> int:
    """Bytes held by an MLA cache: layers x batch x tokens x (kv_rank + rope_dim) x bytes
    per element (chapter 12; DeepSeek-V2, section 2.1.4 and Table 1).

    Elements cached per token and layer, with ``n_h`` heads of ``d_h`` dimensions
    (:func:`attnlib.kv_cache_bytes` counts the first three):

    * MHA: ``2 n_h d_h`` (``kv_cache_bytes(n_layers, n_heads, head_dim, ...)``);
    * GQA with ``n_g`` groups: ``2 n_g d_h``; MQA: ``2 d_h``;
    * MLA: ``kv_rank + rope_dim`` (the paper's ``d_c + d_h^R``), the latent and the
      shared rope key, independent of the number of heads.

    DeepSeek-V2 (60 layers, 128 heads of 128, ``d_c = 512``, ``d_h^R = 64``) caches 576
    elements per token and layer against 32768 for MHA of the same heads: 57 times less,
    as much as GQA with 2.25 groups.

    Returns:
        An int number of bytes.
    """
    for value, name in ((n_layers, "n_layers"), (kv_rank, "kv_rank"), (batch, "batch")):
        check_positive_int(value, name)
    check_positive_int(rope_dim, "rope_dim", allow_zero=True)
    check_positive_int(seq_len, "seq_len", allow_zero=True)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
    return n_layers * batch * seq_len * (kv_rank + rope_dim) * dtype.itemsize
