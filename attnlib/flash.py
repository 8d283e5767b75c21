"""FlashAttention in pure PyTorch: tiles and the online softmax (chapter 9). STUB."""

from __future__ import annotations

from torch import Tensor


def flash_attention(query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
                    scale: float | None = None, block_q: int = 256, block_k: int = 256,
                    return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    raise NotImplementedError
