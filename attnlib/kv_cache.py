"""The key/value cache of autoregressive decoding, and what it costs (chapter 6)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_positive_int, check_tensor

__all__ = ["KVCache", "kv_cache_bytes"]  # attnlib's public names from this module


class KVCache:
    """Keys and values of the tokens decoded so far, for one attention layer (chapter 6).

    Each decoding step computes keys and values only for the new tokens and appends
    them here, instead of recomputing them for the whole prefix. Build it empty,
    ``KVCache()``, and hand it to :class:`attnlib.MultiHeadAttention` on every call; one
    cache per layer. Tensors are ``(B, n_kv_heads, S, head_dim)``; ``S`` grows.
    """

    def __init__(self) -> None:
        self.key: Tensor | None = None  # (B, n_kv_heads, S, head_dim)
        self.value: Tensor | None = None  # (B, n_kv_heads, S, head_dim)

    @property
    def seq_len(self) -> int:
        """Number of cached positions (0 when empty)."""
        return 0 if self.key is None else self.key.size(-2)

    def __len__(self) -> int:
        return self.seq_len

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new positions and return all cached keys and values.

        Args:
            key: ``(B, n_kv_heads, S_new, head_dim)`` for the new tokens.
            value: ``(B, n_kv_heads, S_new, head_dim_v)``.

        Returns:
            ``(key, value)`` with ``S = seq_len`` positions, old ones first.
        """
        check_tensor(key, "key", min_ndim=3)
        check_tensor(value, "value", min_ndim=3)
        if key.size(-2) != value.size(-2):
            raise ValueError(
                f"key and value must add the same number of positions, got {tuple(key.shape)} "
                f"and {tuple(value.shape)}"
            )
        if self.key is None or self.value is None:
            self.key, self.value = key, value
        else:
            for name, old, new in (("key", self.key, key), ("value", self.value, value)):
                if old.shape[:-2] != new.shape[:-2] or old.shape[-1] != new.shape[-1]:
                    raise ValueError(
                        f"new {name} of shape {tuple(new.shape)} does not fit the cached "
                        f"{tuple(old.shape)}: only the sequence axis (-2) may differ"
                    )
            self.key = torch.cat([self.key, key], dim=-2)  # (B, H_kv, S + S_new, D)
            self.value = torch.cat([self.value, value], dim=-2)  # (B, H_kv, S + S_new, D)
        return self.key, self.value

    def reset(self) -> None:
        """Forget every cached position."""
        self.key = self.value = None


def kv_cache_bytes(
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    seq_len: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float16,
) -> int:
    """Bytes held by a KV cache: 2 (K and V) x layers x KV heads x head_dim x tokens x batch
    x bytes per element (chapter 6).

    It is ``n_kv_heads``, not ``n_heads``, that counts: that is the saving of GQA and
    MQA. Returns an int number of bytes.
    """
    for value, name in ((n_layers, "n_layers"), (n_kv_heads, "n_kv_heads"), (head_dim, "head_dim"),
                        (batch, "batch")):
        check_positive_int(value, name)
    check_positive_int(seq_len, "seq_len", allow_zero=True)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
    return _kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch, dtype)


def _kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int,
                    batch: int, dtype: torch.dtype) -> int:
    """The count of :func:`kv_cache_bytes`, once its arguments are checked."""
    per_token = 2 * n_layers * n_kv_heads * head_dim  # K and V, per KV head and layer
    return per_token * seq_len * batch * dtype.itemsize
