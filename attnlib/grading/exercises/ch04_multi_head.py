"""Graded exercises of chapter 4 (multi-head attention): the cases and the catalogue of
common mistakes.

==================================  ==========================================
exercise id                          reference
==================================  ==========================================
``MultiHeadAttention.split_heads``   :class:`attnlib.MultiHeadAttention`
``MultiHeadAttention.merge_heads``   :class:`attnlib.MultiHeadAttention`
``MultiHeadAttention.forward``       :class:`attnlib.MultiHeadAttention` (incl.
                                     the cross-attention cases of chapter 5)
==================================  ==========================================

These are module exercises: their cases load the reference's weights by name
(``q_proj``/``k_proj``/``v_proj``/``o_proj``), so the learner's class keeps the reference's
``__init__``; the graded part is the method named by the exercise id. Every mistake below is
a function ``fn(module, *args)`` where ``module`` is built from the reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...masks import padding_mask
from ...multihead import MultiHeadAttention
from ..core import Case, Exercise, Mistake, register
from .ch02_queries_keys_values import _weights_variant
from .common import F64, HUGE_SCORE, NO_MHA, grid, rand_bool, randn, state_dict

PAGE = "04_multi_head.html"


# --------------------------------------------------------------------------- split_heads, merge_heads


def _split_cases(hidden: bool) -> list[Case]:
    def case(name: str, seed: int, B: int, L: int, d_model: int, H: int) -> Case:
        return Case(name, (randn(B, L, d_model, seed=seed), H), init_args=(d_model, H), method="split_heads")
    if not hidden:
        return [case("B=2, L=5, d_model=12, H=3", 1, 2, 5, 12, 3),
                case("B=1, L=3, d_model=8, H=4", 2, 1, 3, 8, 4)]
    return [case("L=1", 11, 2, 1, 8, 2), case("H=1", 12, 2, 4, 6, 1),
            case("head_dim=1 (H = d_model = 6)", 13, 3, 5, 6, 6), case("B=4, L=7, d_model=16, H=2", 14, 4, 7, 16, 2)]


def _merge_cases(hidden: bool) -> list[Case]:
    def case(name: str, seed: int, B: int, H: int, L: int, D: int) -> Case:
        return Case(name, (randn(B, H, L, D, seed=seed),), init_args=(H * D, H), method="merge_heads")
    if not hidden:
        return [case("B=2, H=3, L=5, head_dim=4", 3, 2, 3, 5, 4),
                case("B=1, H=4, L=3, head_dim=2", 4, 1, 4, 3, 2)]
    return [case("L=1", 21, 2, 2, 1, 4), case("H=1", 22, 2, 1, 4, 6),
            case("head_dim=1", 23, 3, 6, 5, 1), case("B=4, H=2, L=7, head_dim=8", 24, 4, 2, 7, 8)]


def _split_no_transpose(m: nn.Module, x: Tensor, n_heads: int) -> Tensor:
    B, L, _ = x.shape
    return x.reshape(B, n_heads, L, -1)


def _split_interleaved(m: nn.Module, x: Tensor, n_heads: int) -> Tensor:
    B, L, _ = x.shape
    return x.reshape(B, L, -1, n_heads).permute(0, 3, 1, 2)


def _split_no_head_axis_move(m: nn.Module, x: Tensor, n_heads: int) -> Tensor:
    B, L, _ = x.shape
    return x.reshape(B, L, n_heads, -1)


def _split_flat(m: nn.Module, x: Tensor, n_heads: int) -> Tensor:
    B, L, _ = x.shape
    return x.reshape(B, L, n_heads, -1).transpose(1, 2).reshape(B * n_heads, L, -1)


def _merge_no_transpose(m: nn.Module, x: Tensor) -> Tensor:
    B, H, L, D = x.shape
    return x.reshape(B, L, H * D)


def _merge_interleaved(m: nn.Module, x: Tensor) -> Tensor:
    B, H, L, D = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, L, D * H)


def _merge_mean(m: nn.Module, x: Tensor) -> Tensor:
    return x.mean(dim=1)


def _merge_keeps_axis(m: nn.Module, x: Tensor) -> Tensor:
    return x.transpose(1, 2)


register(Exercise(
    id="MultiHeadAttention.split_heads",
    chapter=4,
    reference=MultiHeadAttention,
    kind="module",
    section=f"{PAGE}#the-maths",
    make_cases=_split_cases,
    mistakes=(
        Mistake("reshape without transpose",
                "(B, L, H * head_dim) was reshaped straight to (B, H, L, head_dim); that reads the "
                "numbers in memory order and mixes positions across heads. Reshape to "
                "(B, L, H, head_dim), then transpose axes 1 and 2.", f"{PAGE}#the-maths", _split_no_transpose),
        Mistake("features interleaved across heads",
                "head h got every H-th feature instead of the contiguous block h * head_dim .. "
                "(h + 1) * head_dim - 1.", f"{PAGE}#the-maths", _split_interleaved),
        Mistake("head axis not moved",
                "the result is (B, L, H, head_dim); the heads must come before the positions, "
                "(B, H, L, head_dim), so that attention runs per head.", f"{PAGE}#the-maths",
                _split_no_head_axis_move),
        Mistake("batch and head axes flattened",
                "the result is (B * H, L, head_dim); keep the two axes apart: (B, H, L, head_dim).",
                f"{PAGE}#the-maths", _split_flat),
    ),
    forbidden=NO_MHA,
))

register(Exercise(
    id="MultiHeadAttention.merge_heads",
    chapter=4,
    reference=MultiHeadAttention,
    kind="module",
    section=f"{PAGE}#the-maths",
    make_cases=_merge_cases,
    mistakes=(
        Mistake("reshape without transpose",
                "(B, H, L, head_dim) was reshaped straight to (B, L, H * head_dim), which mixes "
                "positions; transpose to (B, L, H, head_dim) first.", f"{PAGE}#the-maths", _merge_no_transpose),
        Mistake("heads interleaved instead of concatenated",
                "the features came out as (head_dim, H) instead of (H, head_dim): the heads must be "
                "concatenated, head 0's block first, in the order o_proj expects.", f"{PAGE}#the-maths",
                _merge_interleaved),
        Mistake("heads averaged instead of concatenated",
                "the heads were averaged into one (B, L, head_dim) tensor; they are concatenated "
                "along the features into (B, L, H * head_dim).", f"{PAGE}#the-maths", _merge_mean),
        Mistake("head axis not merged",
                "the result is still (B, L, H, head_dim); flatten the last two axes.", f"{PAGE}#the-maths",
                _merge_keeps_axis),
    ),
    forbidden=NO_MHA,
))


# --------------------------------------------------------------------------- forward


def _mha_case(name: str, seed: int, B: int, L: int, d_model: int, H: int, *, bias: bool = False,
              S: int | None = None, **kwargs: object) -> Case:
    init_args = (d_model, H, None, bias)
    sd = state_dict(MultiHeadAttention, init_args, seed)
    if bias:  # biases away from zero so that each one matters
        sd = {k: (v * 4 if k.endswith("bias") else v) for k, v in sd.items()}
    if S is not None:
        kwargs["context"] = randn(B, S, d_model, seed=seed + 2)
    return Case(name, (randn(B, L, d_model, seed=seed + 1),), kwargs, init_args=init_args, state_dict=sd)


def huge_score_mha(init_args: tuple, B: int, L: int, seed: int,
                   dtype: torch.dtype = F64) -> tuple[Tensor, dict[str, Tensor]]:
    """An input ``x`` of shape ``(B, L, d_model)`` and weights for
    ``MultiHeadAttention(*init_args)`` (``bias=True``; GQA too) whose self-attention scores
    all lie near ``-HUGE_SCORE`` on even batch items and ``+HUGE_SCORE`` on odd ones, with a
    spread of a few units: coordinate 0 of every query head is its bias,
    ``HUGE_SCORE * sqrt(head_dim) / 16``, coordinate 0 of every KV head reads feature 0 of
    ``x``, which is ``+-16`` (and nothing else reads it). Every input and weight is a multiple
    of 1/4 (:func:`~.common.grid`), so that the projections and the scores are exact in
    float32, and the projections in bfloat16 too; ``head_dim`` must be a power of 4."""
    d_model, n_heads, n_kv_heads, bias = init_args
    assert bias, "the queries' offset is their bias"
    D = d_model // n_heads
    n_kv = n_heads if n_kv_heads is None else n_kv_heads
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MultiHeadAttention(*init_args).state_dict().items()}
    sd = {name: grid(*shape, seed=seed * 100 + i, step=0.25, bound=2.0,
                     std=1.0 / math.sqrt(shape[-1] if len(shape) > 1 else shape[0]))
          for i, (name, shape) in enumerate(sorted(shapes.items()))}
    for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
        sd[name][:, 0] = 0.0  # feature 0 of x (the key offset) reaches k's coordinate 0 only
    heads, kv_heads = torch.arange(n_heads) * D, torch.arange(n_kv) * D
    sd["q_proj.weight"][heads] = 0.0
    sd["q_proj.bias"][heads] = HUGE_SCORE * math.isqrt(D) / 16
    sd["k_proj.weight"][kv_heads] = 0.0
    sd["k_proj.weight"][kv_heads, 0] = 1.0
    sd["k_proj.bias"][kv_heads] = 0.0
    x = grid(B, L, d_model, seed=seed + 1, step=0.25)
    x[:, :, 0] = 16.0 * torch.tensor([-1.0, 1.0], dtype=F64).repeat(B)[:B, None]
    return x.to(dtype), {k: v.to(dtype) for k, v in sd.items()}


def _huge_mha_case(name: str, seed: int, B: int, L: int, d_model: int, H: int, dtype: torch.dtype,
                   **kwargs: object) -> Case:
    init_args = (d_model, H, None, True)
    x, sd = huge_score_mha(init_args, B, L, seed, dtype)
    return Case(name, (x,), kwargs, init_args=init_args, state_dict=sd, low_precision=True)


def _mha_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _mha_case("self-attention, B=2, L=5, d_model=8, H=2", 1, 2, 5, 8, 2),
            _mha_case("with biases, H=4", 2, 2, 4, 8, 4, bias=True),
            _mha_case("is_causal", 3, 2, 6, 12, 3, is_causal=True),
            _mha_case("bool attn_mask", 4, 1, 5, 8, 2, attn_mask=rand_bool(5, 5, seed=44)),
            _mha_case("cross-attention, L=3, S=7", 5, 2, 3, 8, 2, S=7),
            _huge_mha_case("float32, every score near -8192 (batch 0) or +8192 (batch 1)", 6, 2, 5, 32, 2,
                           torch.float32),
        ]
    return [
        _mha_case("L=1", 101, 2, 1, 8, 2),
        _mha_case("one head (H=1)", 102, 2, 4, 6, 1),
        _mha_case("cross-attention with a padding mask", 103, 3, 4, 8, 4, S=6,
                  attn_mask=padding_mask(torch.tensor([6, 3, 1]), 6)),
        _mha_case("cross-attention, L=5 > S=2, biases", 104, 2, 5, 12, 3, bias=True, S=2),
        _mha_case("is_causal and a bool mask", 105, 2, 5, 8, 2, is_causal=True,
                  attn_mask=rand_bool(5, 5, seed=106)),
        _mha_case("head_dim=1 (H = d_model = 4)", 107, 2, 4, 4, 4),
        _mha_case("float attn_mask, d_model=16", 108, 2, 4, 16, 2, attn_mask=randn(4, 4, seed=109)),
        _huge_mha_case("bfloat16 weights, every score near -8192 (batch 0) or +8192 (batch 1), is_causal", 110,
                       2, 6, 32, 2, torch.bfloat16, is_causal=True),
    ]


def _mha_variant(m: MultiHeadAttention, x: Tensor, context: Tensor | None = None,
                 attn_mask: Tensor | None = None, is_causal: bool = False, kv_cache: object = None, *,
                 split: str = "ok", merge: str = "ok", o_proj: bool = True, one_head: bool = False,
                 scale: str = "head_dim", kv_source: str = "context", q_source: str = "x",
                 max_shift: bool = True) -> Tensor:
    """MultiHeadAttention.forward with one ingredient swapped for a wrong one."""
    source = x if context is None or kv_source == "x" else context
    q_in = x if q_source == "x" or context is None else context
    H = 1 if one_head else m.n_heads
    B = x.size(0)

    def split_(t: Tensor) -> Tensor:
        if split == "no-transpose":
            return t.reshape(t.size(0), H, t.size(1), -1)
        return t.reshape(t.size(0), t.size(1), H, -1).transpose(1, 2)

    q, k, v = split_(m.q_proj(q_in)), split_(m.k_proj(source)), split_(m.v_proj(source))
    D = q.size(-1)
    s = {"head_dim": 1 / math.sqrt(D), "none": 1.0, "d_model": 1 / math.sqrt(m.d_model)}[scale]
    w = _weights_variant(q, k, attn_mask, is_causal, s, cast=False, max_shift=max_shift)  # (B, H, L, S)
    y = (w @ v.to(w.dtype)).to(v.dtype)  # (B, H, L, D)
    if merge == "no-transpose":
        y = y.reshape(B, y.size(2), -1)
    else:
        y = y.transpose(1, 2).reshape(B, y.size(2), -1)
    return m.o_proj(y) if o_proj else y


def _mha_mistake(**variant: object):
    def forward(m: MultiHeadAttention, x: Tensor, context: Tensor | None = None,
                attn_mask: Tensor | None = None, is_causal: bool = False, kv_cache: object = None) -> Tensor:
        return _mha_variant(m, x, context, attn_mask, is_causal, kv_cache, **variant)
    return forward


register(Exercise(
    id="MultiHeadAttention.forward",
    chapter=4,
    reference=MultiHeadAttention,
    kind="module",
    section=f"{PAGE}#the-maths",
    make_cases=_mha_cases,
    mistakes=(
        Mistake("heads split without transpose",
                "q, k and v were reshaped straight to (B, H, L, head_dim), which mixes positions "
                "across heads; reshape to (B, L, H, head_dim) and transpose.", f"{PAGE}#the-maths",
                _mha_mistake(split="no-transpose")),
        Mistake("heads merged without transpose",
                "the per-head outputs (B, H, L, head_dim) were reshaped straight to "
                "(B, L, d_model), which mixes positions; transpose to (B, L, H, head_dim) first.",
                f"{PAGE}#the-maths", _mha_mistake(merge="no-transpose")),
        Mistake("missing output projection",
                "the merged heads were returned without o_proj; W_O is where the heads' results "
                "are combined.", f"{PAGE}#the-maths", _mha_mistake(o_proj=False)),
        Mistake("one big head",
                "attention ran once over all d_model features (head_dim = d_model) instead of "
                "n_heads heads of d_model / n_heads features each.", f"{PAGE}#the-maths",
                _mha_mistake(one_head=True)),
        Mistake("no 1/sqrt(head_dim) scaling",
                "the scores of each head were not divided by sqrt(head_dim).",
                "03_scaling.html#the-variance-of-a-dot-product",
                _mha_mistake(scale="none")),
        Mistake("scaled by 1/sqrt(d_model) instead of 1/sqrt(head_dim)",
                "each head's dot products have head_dim terms, so the scale is "
                "1/sqrt(head_dim), not 1/sqrt(d_model).", f"{PAGE}#the-maths", _mha_mistake(scale="d_model")),
        Mistake("keys and values taken from x instead of context",
                "in cross-attention the keys and values come from the context (the sequence "
                "attended to) and only the queries from x.",
                "05_self_cross_masks.html#self-attention-and-cross-attention-the-shapes",
                _mha_mistake(kv_source="x")),
        Mistake("queries taken from context instead of x",
                "in cross-attention the queries come from x (the sequence that asks); the "
                "context supplies keys and values.",
                "05_self_cross_masks.html#self-attention-and-cross-attention-the-shapes",
                _mha_mistake(q_source="context")),
        Mistake("no max subtraction",
                "the softmax exponentiated the raw scores: when every score of a row is large, exp "
                "overflows to inf (inf / inf = NaN), and when every score is very negative it "
                "underflows to 0 (0 / 0 = NaN). Subtract each row's maximum before exp.",
                "02_queries_keys_values.html#a-softmax-that-cannot-overflow", _mha_mistake(max_shift=False)),
    ),
    forbidden=NO_MHA,
))
