"""The paged KV cache: keys and values in fixed-size blocks, as PagedAttention stores them
(chapter 12).

The contiguous cache of chapter 6 (:class:`attnlib.KVCache`) keeps one sequence's keys in
one tensor. A server that preallocates that tensor to the longest length it allows wastes
every slot a sequence never reaches. PagedAttention (Kwon et al., 2023, "Efficient Memory
Management for Large Language Model Serving with PagedAttention", SOSP 2023) borrows the
operating system's answer: cut memory into fixed-size *blocks* (pages) of ``block_size``
tokens, give each sequence a *block table* listing its blocks in order, and take a block
from a free list only when the sequence fills its last one. At most ``block_size - 1``
slots per sequence are wasted, in its last block.

* :class:`PagedKVCache`: one layer's pool of blocks, the free list and the block tables;
* :func:`kv_memory_waste`: the slots wasted by contiguous preallocation versus paging.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from ._validate import check_positive_int, check_tensor

__all__ = ["PagedKVCache", "kv_memory_waste"]  # attnlib's public names from this module


class PagedKVCache:
    """One layer's KV cache as a pool of fixed-size blocks with a block table per sequence
    (chapter 12; PagedAttention, Kwon et al., 2023, SOSP 2023).

    The pool is two preallocated tensors, :attr:`k_blocks` and :attr:`v_blocks`, each
    ``(n_blocks, n_kv_heads, block_size, head_dim)``. Token ``t`` of a sequence lives in
    block ``block_table(seq_id)[t // block_size]``, at slot ``t % block_size``. Blocks come
    from a free list only when a sequence needs them, and go back to it on :meth:`free`;
    the last freed block is the first reused (a stack).

    Sequences are named by any hashable ``seq_id``; appending to a new one starts it.
    Several sequences may be appended to in any order. The cache stores values, not the
    autograd graph: appended tensors are detached. The pool lives on the CPU.

    Args:
        n_blocks: number of blocks in the pool (``>= 1``).
        block_size: tokens per block (``>= 1``).
        n_kv_heads: key/value heads of the layer (``>= 1``).
        head_dim: size of each key and value vector (``>= 1``).
        dtype: floating-point dtype of the pool; appended ``k`` and ``v`` must have it.
    """

    def __init__(self, n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        for value, name in ((n_blocks, "n_blocks"), (block_size, "block_size"),
                            (n_kv_heads, "n_kv_heads"), (head_dim, "head_dim")):
            check_positive_int(value, name)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.float32, "
                            f"got {dtype!r}")
        self.n_blocks, self.block_size = n_blocks, block_size
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        shape = (n_blocks, n_kv_heads, block_size, head_dim)
        self.k_blocks = torch.zeros(shape, dtype=dtype)  # (n_blocks, H_kv, block_size, head_dim)
        self.v_blocks = torch.zeros(shape, dtype=dtype)  # (n_blocks, H_kv, block_size, head_dim)
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: pop() gives block 0 first
        self._tables: dict[Hashable, list[int]] = {}  # seq_id -> its block indices, in order
        self._lengths: dict[Hashable, int] = {}  # seq_id -> tokens stored

    @property
    def n_free_blocks(self) -> int:
        """Number of blocks on the free list."""
        return len(self._free)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The blocks of ``seq_id``, in token order (a copy)."""
        return list(self._tables[self._known(seq_id)])

    def seq_len(self, seq_id: Hashable) -> int:
        """Number of tokens stored for ``seq_id``."""
        return self._lengths[self._known(seq_id)]

    def append(self, seq_id: Hashable, k: Tensor, v: Tensor) -> None:
        """Store ``T`` new tokens at the end of sequence ``seq_id``, starting it if new.

        Takes ``ceil((length + T) / block_size) - len(block_table)`` blocks from the
        free list. If fewer are free, raises ``RuntimeError`` and leaves the cache
        exactly as it was: nothing of ``k`` and ``v`` is written and a new ``seq_id`` is
        not started.

        Args:
            seq_id: any hashable name of the sequence.
            k: ``(n_kv_heads, T, head_dim)`` keys of the new tokens, ``T >= 0``, of the
                cache's dtype.
            v: ``(n_kv_heads, T, head_dim)`` values of the same tokens.
        """
        self._validate_append(seq_id, k, v)
        T = k.size(1)
        table = self._tables.get(seq_id, [])
        start = self._lengths.get(seq_id, 0)
        needed = -(-(start + T) // self.block_size) - len(table)  # ceil division
        self._ensure_free(needed, seq_id, T)  # or RuntimeError, before any change
        table = table + [self._free.pop() for _ in range(needed)]  # top of the stack
        self._tables[seq_id], self._lengths[seq_id] = table, start + T
        pos = torch.arange(start, start + T)  # (T,): positions of the new tokens
        block = torch.tensor(table, dtype=torch.long)[pos // self.block_size]  # (T,)
        slot = pos % self.block_size  # (T,): place inside the block
        # Indices in dims 0 and 2 around a slice: the indexed view is (T, H_kv, D).
        self.k_blocks[block, :, slot] = k.detach().transpose(0, 1)  # (T, H_kv, D)
        self.v_blocks[block, :, slot] = v.detach().transpose(0, 1)  # (T, H_kv, D)

    def _validate_append(self, seq_id: object, k: object, v: object) -> None:
        """The argument checks of :meth:`append`."""
        _check_hashable(seq_id)
        self._check_new(k, "k")
        self._check_new(v, "v")
        if k.size(1) != v.size(1):
            raise ValueError(f"k and v must add the same number of tokens, got shapes "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")

    def _ensure_free(self, needed: int, seq_id: Hashable, T: int) -> None:
        """Raise ``RuntimeError`` if fewer than ``needed`` blocks are free."""
        if needed > len(self._free):
            raise RuntimeError(
                f"PagedKVCache is out of blocks: appending {T} tokens to sequence "
                f"{seq_id!r} (length {self._lengths.get(seq_id, 0)}) needs {needed} new "
                f"blocks of {self.block_size} tokens, but only {len(self._free)} of "
                f"{self.n_blocks} are free; free a finished sequence first"
            )

    def gather(self, seq_id: Hashable) -> tuple[Tensor, Tensor]:
        """All keys and values of ``seq_id``, each as one tensor (a new copy, not a
        view of the pool).

        Reads the blocks of the block table in order and trims the unused end of the
        last one: the result equals concatenating along dim 1 everything appended to
        ``seq_id``.

        Returns:
            ``(k, v)``, each ``(n_kv_heads, seq_len(seq_id), head_dim)``.
        """
        table = self._tables[self._known(seq_id)]
        length = self._lengths[seq_id]
        idx = torch.tensor(table, dtype=torch.long)  # (n_used,)
        out = []
        for blocks in (self.k_blocks, self.v_blocks):
            x = blocks.index_select(0, idx)  # (n_used, H_kv, block_size, head_dim)
            x = x.transpose(0, 1)  # (n_kv_heads, n_used, block_size, head_dim)
            x = x.reshape(self.n_kv_heads, -1, self.head_dim)  # (H_kv, n_used * b, D)
            out.append(x[:, :length])  # (n_kv_heads, length, head_dim)
        return out[0], out[1]

    def free(self, seq_id: Hashable) -> None:
        """Forget ``seq_id`` and return its blocks to the free list, for later appends."""
        table = self._tables.pop(self._known(seq_id))
        del self._lengths[seq_id]
        self._free.extend(reversed(table))  # its first block is the next one handed out

    def _known(self, seq_id: object) -> Hashable:
        _check_hashable(seq_id)
        if seq_id not in self._tables:
            raise KeyError(f"unknown seq_id {seq_id!r}: no such sequence in the cache "
                           f"({len(self._tables)} cached; append to a new seq_id to start one)")
        return seq_id

    def _check_new(self, x: object, name: str) -> None:
        """``x`` must be ``(n_kv_heads, T, head_dim)`` of the pool's dtype and device."""
        x = check_tensor(x, name, min_ndim=3)
        if x.ndim != 3 or x.size(0) != self.n_kv_heads or x.size(2) != self.head_dim:
            raise ValueError(f"{name} must have shape (n_kv_heads, T, head_dim) = "
                             f"({self.n_kv_heads}, T, {self.head_dim}), got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"{name} must have the cache's dtype {self.dtype}, got {x.dtype}")
        if x.device != self.k_blocks.device:
            raise ValueError(f"{name} must be on the cache's device {self.k_blocks.device}, "
                             f"got {x.device}")


def _check_hashable(seq_id: object) -> None:
    try:
        hash(seq_id)
    except TypeError:
        raise TypeError(f"seq_id must be hashable (an int, str, tuple...), got "
                        f"{type(seq_id).__name__}") from None


def kv_memory_waste(lengths: Sequence[int] | Tensor, block_size: int,
                    max_len: int) -> tuple[int, int]:
    """Token slots wasted by contiguous preallocation and by paging, for a batch of
    sequences (chapter 12; PagedAttention, Kwon et al., 2023, SOSP 2023).

    A contiguous cache reserves ``max_len`` slots per sequence, wasting
    ``max_len - length``; a paged cache holds ``ceil(length / block_size)`` blocks,
    wasting only the unused end of the last one. Multiply by
    ``2 * n_kv_heads * head_dim * bytes per element`` (and layers) for bytes.

    Args:
        lengths: tokens of each sequence, a sequence of ints or a 1-D integer tensor, each
            between 0 and ``max_len``.
        block_size: tokens per block (``>= 1``).
        max_len: slots a contiguous cache reserves per sequence (``>= 1``).

    Returns:
        ``(contiguous, paged)``: total wasted slots over the batch, two ints.
    """
    check_positive_int(block_size, "block_size")
    check_positive_int(max_len, "max_len")
    lens = _check_lengths(lengths)
    if any(n > max_len for n in lens):
        raise ValueError(f"every length must be between 0 and max_len={max_len}, got {lens}")
    return _kv_memory_waste(lens, block_size, max_len)


def _kv_memory_waste(lens: list[int], block_size: int, max_len: int) -> tuple[int, int]:
    """:func:`kv_memory_waste` without the checks."""
    contiguous = sum(max_len - n for n in lens)  # every slot a sequence never reaches
    paged = sum(-(-n // block_size) * block_size - n for n in lens)  # last-block slack
    return contiguous, paged


def _check_lengths(lengths: object) -> list[int]:
    """Turn a sequence of ints or a 1-D integer tensor into a list of ints ``>= 0``."""
    if isinstance(lengths, Tensor):
        if lengths.ndim != 1 or lengths.is_floating_point() or lengths.is_complex() \
                or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be a 1-D integer tensor or a sequence of ints, got a "
                            f"tensor of dtype {lengths.dtype} and shape {tuple(lengths.shape)}")
        lens = [int(n) for n in lengths.tolist()]
    elif isinstance(lengths, Sequence) and not isinstance(lengths, (str, bytes)):
        for n in lengths:
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"lengths must hold ints, got {type(n).__name__} ({n!r})")
        lens = list(lengths)
    else:
        raise TypeError(f"lengths must be a sequence of ints or a 1-D integer tensor, got "
                        f"{type(lengths).__name__}")
    if any(n < 0 for n in lens):
        raise ValueError(f"every length must be >= 0, got {lens}")
    return lens
