"""Linear attention with a feature map (chapter 10). STUB."""

from __future__ import annotations

from typing import Callable

from torch import Tensor


def elu_feature_map(x: Tensor) -> Tensor:
    raise NotImplementedError


def linear_attention(query: Tensor, key: Tensor, value: Tensor, causal: bool = False,
                     feature_map: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    raise NotImplementedError
