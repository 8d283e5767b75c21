"""``TransformerBlock.forward``: its cases and mistakes, and the decoding of the cache cases
chunk by chunk through a KV cache (its extra check)."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ....kv_cache import KVCache
from ....masks import sink_window_mask
from ....transformer import TransformerBlock
from ...core import Case, Exercise, Mistake, judge, register
from ..ch06_mqa_gqa import _build_module
from ..common import F64, randn, state_dict
from .sections import BLOCK, GENERATION, PAGE


def _block_variant(m: TransformerBlock, x: Tensor, kv_cache: Any = None, attn_mask: Tensor | None = None, *,
                   post_norm: bool = False, attn_residual: bool = True, mlp_residual: bool = True,
                   second_norm: str = "norm2", causal: bool = True, mask: bool = True,
                   cache: bool = True) -> Tensor:
    """The pre-norm block with one thing changed (the reference's submodules throughout)."""
    def attend(h: Tensor) -> Tensor:
        return m.attn(h, attn_mask=attn_mask if mask else None, is_causal=causal,
                      kv_cache=kv_cache if cache else None)

    norm2 = getattr(m, second_norm)
    if post_norm:  # the original transformer: normalise after adding the residual
        x = m.norm1(x + attend(x))
        return norm2(x + m.mlp(x))
    h = attend(m.norm1(x))
    x = x + h if attn_residual else h
    h = m.mlp(norm2(x))
    return x + h if mlp_residual else h


def _block_mistake(**variant: Any) -> Callable[..., Tensor]:
    def forward(m: TransformerBlock, x: Tensor, kv_cache: Any = None, attn_mask: Tensor | None = None) -> Tensor:
        return _block_variant(m, x, kv_cache, attn_mask, **variant)
    return forward


_BLOCK_MISTAKES = (
    Mistake(
        "post-norm instead of pre-norm",
        "The normalisation was applied after the residual addition, x = norm1(x + attn(x)), as "
        "in the original transformer. Today's LLMs normalise the input of each sublayer and add "
        "its output to the untouched stream: x = x + attn(norm1(x)), then x = x + mlp(norm2(x)).",
        BLOCK,
        _block_mistake(post_norm=True),
    ),
    Mistake(
        "no residual connection around the attention",
        "x = attn(norm1(x)) replaces the stream by the attention's output; the sublayer's output "
        "is added to it: x = x + attn(norm1(x)).",
        BLOCK,
        _block_mistake(attn_residual=False),
    ),
    Mistake(
        "no residual connection around the MLP",
        "The block returned mlp(norm2(x)) alone; the MLP's output is added to the stream: "
        "x = x + mlp(norm2(x)).",
        BLOCK,
        _block_mistake(mlp_residual=False),
    ),
    Mistake(
        "norm1 used before both sublayers",
        "Each sublayer has its own normalisation with its own learned weight: norm1 before the "
        "attention, norm2 before the MLP.",
        BLOCK,
        _block_mistake(second_norm="norm1"),
    ),
    Mistake(
        "attention not causal",
        "A decoder block attends causally: pass is_causal=True to self.attn, so that token i "
        "sees tokens 0..i only.",
        BLOCK,
        _block_mistake(causal=False),
    ),
    Mistake(
        "attn_mask not passed to the attention",
        "attn_mask (a sliding window, say) narrows attention on top of the causal rule: hand it "
        "to self.attn together with is_causal=True.",
        f"{PAGE}#sliding-windows-and-attention-sinks",
        _block_mistake(mask=False),
    ),
    Mistake(
        "KV cache not passed to the attention",
        "With a cache, x holds only the new tokens; self.attn appends their keys and values to "
        "kv_cache and attends over every cached position. Without it the new tokens see only "
        "each other.",
        GENERATION,
        _block_mistake(cache=False),
    ),
)


def _block_state_dict(init_args: tuple, seed: int) -> dict[str, Tensor]:
    """Seeded float64 weights, N(0, 1/fan_in); the two norm weights 1 + N(0, 0.25), each its
    own, so that swapping or sharing them shows."""
    sd = state_dict(TransformerBlock, init_args, seed)
    for i, name in enumerate(("norm1.weight", "norm2.weight")):
        sd[name] = 1.0 + randn(init_args[0], seed=seed * 100 + 90 + i, std=0.5)
    return sd


# For each cache case (by name): the chunks its tokens are decoded in, through one KVCache.
_BLOCK_PLANS: dict[str, tuple[int, ...]] = {
    "KV cache: a prefill of 4 tokens, then decoding 1 + 1 (4 heads, 2 KV heads)": (4, 1, 1),
    "KV cache, MQA: decoding token by token from an empty cache": (1, 1, 1, 1, 1),
    "KV cache: chunks 3 + 4 + 1 + 2 (MHA, d_ff = 24)": (3, 4, 1, 2),
    "KV cache and a window: chunks 3 + 1 + 2 with the rows of sink_window_mask(6, 2, 1)": (3, 1, 2),
}


def _block_case(name: str, seed: int, B: int, T: int, d_model: int, H: int, H_kv: int,
                d_ff: int | None = None, **kwargs: Any) -> Case:
    init_args = (d_model, H, H_kv, d_ff)
    if name in _BLOCK_PLANS:
        assert sum(_BLOCK_PLANS[name]) == T and set(kwargs) <= {"attn_mask"}, name
    return Case(name, (randn(B, T, d_model, seed=seed + 1),), kwargs, init_args=init_args,
                state_dict=_block_state_dict(init_args, seed))


def _float_mask(mask: Tensor) -> Tensor:
    """The additive form of a boolean mask: 0 where allowed, -inf elsewhere (float64)."""
    return torch.zeros(mask.shape, dtype=F64).masked_fill(~mask, -math.inf)


def _block_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _block_case("4 heads, 2 KV heads (GQA), B = 2, T = 5", 1200, 2, 5, 16, 4, 2),
            _block_case("a window of 3 and 1 sink: attn_mask = sink_window_mask(7, 3, 1)", 1201, 2, 7, 16, 4, 2,
                        attn_mask=sink_window_mask(7, 3, 1)),
            _block_case("KV cache: a prefill of 4 tokens, then decoding 1 + 1 (4 heads, 2 KV heads)", 1202,
                        2, 6, 16, 4, 2),
        ]
    return [
        _block_case("T = 1 (a single token)", 1210, 2, 1, 16, 4, 2),
        _block_case("MQA (1 KV head), d_ff = 24, B = 3", 1211, 3, 6, 12, 2, 1, d_ff=24),
        _block_case("float attn_mask: 0 where sink_window_mask(6, 2, 2) allows, -inf elsewhere", 1212, 2, 6,
                    16, 4, 2, attn_mask=_float_mask(sink_window_mask(6, 2, 2))),
        _block_case("window 1, no sinks: each token sees itself only", 1213, 1, 5, 8, 2, 2,
                    attn_mask=sink_window_mask(5, 1, 0)),
        _block_case("KV cache, MQA: decoding token by token from an empty cache", 1214, 1, 5, 12, 2, 1),
        _block_case("KV cache: chunks 3 + 4 + 1 + 2 (MHA, d_ff = 24)", 1215, 2, 10, 8, 2, 2, d_ff=24),
        _block_case("KV cache and a window: chunks 3 + 1 + 2 with the rows of sink_window_mask(6, 2, 1)", 1216,
                    2, 6, 16, 4, 2, attn_mask=sink_window_mask(6, 2, 1)),
    ]


def _chunk_kwargs(case: Case, a: int, b: int) -> dict[str, Tensor]:
    """The chunk's mask: rows a..b-1 of the case's (T, T) mask, over the keys 0..b-1."""
    mask = case.kwargs.get("attn_mask")
    return {} if mask is None else {"attn_mask": mask[a:b, :b].clone()}


def _chunks(case: Case) -> list[tuple[int, int]]:
    bounds = [0, *itertools.accumulate(_BLOCK_PLANS[case.name])]
    return list(zip(bounds, bounds[1:]))


def _block_decode(cls: Callable[..., Any], case: Case, step: int, x: Tensor) -> Tensor:
    """Build ``cls`` with the case's weights, decode ``x`` chunk by chunk through one fresh
    KVCache, and return chunk ``step``'s output."""
    module = _build_module(cls, case)
    cache = KVCache()
    out: Any = None
    for a, b in _chunks(case)[: step + 1]:
        out = module(x[:, a:b], kv_cache=cache, **_chunk_kwargs(case, a, b))
    return out


def _as_block_class(fn: Callable[..., Tensor]) -> type:
    """A method-style mistake ``fn(module, *args)`` as a subclass of the reference."""
    return type("MistakenTransformerBlock", (TransformerBlock,),
                {"forward": lambda self, *a, _fn=fn, **k: _fn(self, *a, **k)})


def _block_step_exercise(case: Case, step: int) -> Exercise:
    """A throw-away function exercise (never registered) judging chunk ``step`` of the decoding
    of ``case``; the reference and every mistake decode the same way."""
    return Exercise(
        id=f"TransformerBlock.forward with a KV cache (chunk {step + 1})",
        chapter=12,
        reference=functools.partial(_block_decode, TransformerBlock, case, step),
        section=GENERATION,
        make_cases=lambda hidden: [],
        mistakes=tuple(Mistake(m.name, m.explanation, m.section,
                               functools.partial(_block_decode, _as_block_class(m.fn), case, step))
                       for m in _BLOCK_MISTAKES),
    )


def _block_decoding(student: Callable[..., Any], case: Case) -> str | None:
    """For the cache cases: decode the case's tokens chunk by chunk through one KVCache with
    the learner's block and judge every chunk's output."""
    plan = _BLOCK_PLANS.get(case.name)
    if plan is None:
        return None
    x = case.args[0]
    module = _build_module(student, case)
    cache = KVCache()
    masked = ", attn_mask=its rows of the mask" if "attn_mask" in case.kwargs else ""
    for step, (a, b) in enumerate(_chunks(case)):
        where = (f"decoding with a KV cache, chunk {step + 1} of {len(plan)} (chunks of "
                 f"{' + '.join(map(str, plan))} tokens, forward(x_chunk, kv_cache=cache{masked}))")
        try:
            out = module(x[:, a:b].clone(), kv_cache=cache, **_chunk_kwargs(case, a, b))
        except Exception as exc:  # the learner's code may raise anything
            return f"{where} raised {type(exc).__name__}: {exc}"
        result = judge(_block_step_exercise(case, step), Case(case.name, (x,)), out)
        if not result.passed:
            return f"{where}: {result.message}"
    return None


register(Exercise(
    id="TransformerBlock.forward",
    chapter=12,
    reference=TransformerBlock,
    kind="module",
    section=BLOCK,
    make_cases=_block_cases,
    # The block's own submodules (attnlib's attention, norms and MLP) are the learner's tools;
    # only the ready-made block is off limits.
    forbidden=("attnlib.TransformerBlock", "attnlib.transformer.TransformerBlock"),
    mistakes=_BLOCK_MISTAKES,
    extra_check=_block_decoding,
))
