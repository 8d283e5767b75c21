"""The key/value cache of autoregressive decoding, and what it costs (chapter 6); a
fixed-size rolling cache for sliding-window attention with attention sinks (chapter 12)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_positive_int, check_tensor

__all__ = ["KVCache", "RollingKVCache", "kv_cache_bytes"]  # attnlib's public names from this module


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


class RollingKVCache(KVCache):
    """A fixed-size cache for sliding-window attention, with attention sinks (chapter 12).

    Mistral 7B (Jiang et al., 2023) attends over a window of the last ``window`` tokens
    and keeps its cache in a *rolling buffer* of ``window`` slots: token ``t`` is written
    to slot ``t mod window``, overwriting the token that just left the window.
    StreamingLLM (Xiao et al., 2023) also keeps the first ``n_sink`` tokens for ever (the
    *attention sinks*). Here the buffer has ``n_sink + window`` slots: tokens
    ``0 .. n_sink - 1`` stay in the first ``n_sink`` slots, and token ``t >= n_sink``
    goes to slot ``n_sink + (t - n_sink) mod window``.

    The slots are not in token order once the buffer wraps, and need not be: keys are
    stored already rotated by RoPE at their absolute positions, and attention over a set
    of keys does not depend on their order. Memory stays at ``n_sink + window`` positions
    however long the sequence. Decoding through it equals a full forward pass with
    ``sink_window_mask(T, window, n_sink)`` (tested).

    Feed one token per :meth:`update` (a prompt too, token by token): a chunk of several
    new tokens would need a window mask inside the chunk, which the layer does not build.
    :attr:`seq_len` counts every token seen (the absolute position of the next one,
    which RoPE needs), not the slots filled.

    Args:
        window: tokens each query sees, itself included (``>= 1``).
        n_sink: first tokens kept as sinks (``>= 0``).
    """

    def __init__(self, window: int, n_sink: int = 0) -> None:
        super().__init__()
        self.window = check_positive_int(window, "window")
        self.n_sink = check_positive_int(n_sink, "n_sink", allow_zero=True)
        self.seen = 0  # tokens appended so far

    @property
    def seq_len(self) -> int:
        """Number of tokens seen so far (the absolute position of the next token)."""
        return self.seen

    def slot(self, t: int) -> int:
        """The buffer slot of token ``t``."""
        return t if t < self.n_sink else self.n_sink + (t - self.n_sink) % self.window

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Write one new token into its slot; return the filled slots' keys and values.

        Args:
            key: ``(B, n_kv_heads, 1, head_dim)``.
            value: ``(B, n_kv_heads, 1, head_dim_v)``.

        Returns:
            ``(key, value)``, each with ``min(seq_len, n_sink + window)`` positions: the
            sinks and the last ``window`` tokens, in slot order.
        """
        check_tensor(key, "key", min_ndim=3)
        check_tensor(value, "value", min_ndim=3)
        if key.size(-2) != 1 or value.size(-2) != 1:
            raise ValueError(
                f"RollingKVCache takes one token per update, got {key.size(-2)} in key "
                f"{tuple(key.shape)} and {value.size(-2)} in value; feed a prompt token by token"
            )
        if self.key is not None and self.value is not None and (
                key.shape[:-2] != self.key.shape[:-2] or key.size(-1) != self.key.size(-1)
                or value.shape[:-2] != self.value.shape[:-2]
                or value.size(-1) != self.value.size(-1)):
            raise ValueError(f"new key {tuple(key.shape)} / value {tuple(value.shape)} do not "
                             f"fit the cached {tuple(self.key.shape)} / {tuple(self.value.shape)}")
        return self._write(key, value)

    def _write(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`update` without the checks."""
        size = self.n_sink + self.window  # slots: (B, H_kv, size, D) buffers
        if self.key is None or self.value is None:
            self.key = key.new_zeros(*key.shape[:-2], size, key.size(-1))
            self.value = value.new_zeros(*value.shape[:-2], size, value.size(-1))
        s = self.slot(self.seen)  # sinks stay put; the window's slots are reused
        self.key[..., s, :] = key[..., 0, :]
        self.value[..., s, :] = value[..., 0, :]
        self.seen += 1
        filled = min(self.seen, size)
        return self.key[..., :filled, :], self.value[..., :filled, :]  # (.., filled, D)

    def reset(self) -> None:
        """Forget every cached token."""
        super().reset()
        self.seen = 0


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
