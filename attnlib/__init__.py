"""attnlib: the reference implementation behind "Attention, from first principles".

Every chapter of the book calls these functions, and every exercise is graded against them.
Shapes follow PyTorch: ``(B, H, L, D)`` for queries and ``(B, H, S, D)`` for keys/values.
Boolean masks hold ``True`` where attention is allowed.
"""

from . import cost, measure, plotting
from .attention import attention_entropy, attention_weights, scaled_dot_product_attention, softmax
from .cost import attention_flops, attention_score_bytes
from .flash import flash_attention, flash_attention_backward
from .gqa import repeat_kv
from .kv_cache import KVCache, kv_cache_bytes
from .linear import elu_feature_map, linear_attention
from .masks import causal_mask, padding_mask
from .multihead import MultiHeadAttention
from .positional import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    apply_rope_interleaved,
    rope_permutation,
    sinusoidal_positional_encoding,
)
from .rnn import ElmanRNN, hidden_state_gradient_norms
from .sparse import bigbird_mask, longformer_mask, sliding_window_attention, sliding_window_mask
from .vision import patchify, unpatchify

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "ElmanRNN",
    "MultiHeadAttention",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "apply_rope_interleaved",
    "attention_entropy",
    "attention_flops",
    "attention_score_bytes",
    "attention_weights",
    "bigbird_mask",
    "causal_mask",
    "elu_feature_map",
    "flash_attention",
    "flash_attention_backward",
    "hidden_state_gradient_norms",
    "kv_cache_bytes",
    "linear_attention",
    "longformer_mask",
    "padding_mask",
    "patchify",
    "repeat_kv",
    "rope_permutation",
    "scaled_dot_product_attention",
    "sinusoidal_positional_encoding",
    "sliding_window_attention",
    "sliding_window_mask",
    "softmax",
    "unpatchify",
]
