"""The graded exercises of chapters 6 to 11, and their catalogues of common mistakes.

Importing this module registers (see :func:`attnlib.grading.core.register`):

* chapter 6: ``repeat_kv``, ``kv_cache_bytes``, ``KVCache.update``, ``MultiHeadAttention``
  (the learner's ``MultiHeadAttention.forward`` with ``n_kv_heads < n_heads`` and a KV
  cache; chapter 4 grades the same method with ``n_kv_heads=None`` under the id
  ``MultiHeadAttention.forward``, and ids are unique: like ``ElmanRNN``, the id is the class
  and the cases' ``method`` is ``"forward"``);
* chapter 7: ``sinusoidal_positional_encoding``, ``apply_rope``, ``alibi_slopes``,
  ``alibi_bias``;
* chapter 8: ``attention_score_bytes``, ``attention_flops`` (from :mod:`attnlib.cost`);
* chapter 9: ``flash_attention`` and ``flash_attention_backward`` (both with a check that no
  ``L x S`` tensor is ever built);
* chapter 10: ``sliding_window_mask``, ``longformer_mask``, ``linear_attention``;
* chapter 11: ``patchify``, ``unpatchify``.

Every case is deterministic (its own seeded ``torch.Generator``) and float64 unless it is
about a dtype. Each catalogued mistake is a small wrong implementation with the
reference's signature; the tests show that each one fails a visible case and is named in
the feedback. The helpers below compute every variant of one algorithm with flags, so a
mistake differs from the correct computation in exactly one place.

Note on ``KVCache.update``: a case calls one method once, and on a fresh cache ``update``
only hands its inputs back. So the case checks that first call, and the exercise's
``extra_check`` then drives a fresh instance of the learner's class through several
updates and judges every returned ``(key, value)`` with :func:`~attnlib.grading.core.judge`
against the reference driven the same way (mistakes named as usual). The GQA forward does
the same for decoding with a :class:`~attnlib.KVCache`, which a case cannot carry: its
cache cases check the full causal pass, then the learner's module decodes the same tokens
in chunks through one cache, every chunk's output judged against the reference's.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._validate import compute_dtype
from ..cost import attention_flops, attention_score_bytes
from ..flash import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, flash_attention, flash_attention_backward
from ..gqa import repeat_kv
from ..kv_cache import KVCache, kv_cache_bytes
from ..linear import elu_feature_map, linear_attention
from ..measure import ShapeRecorder
from ..multihead import MultiHeadAttention
from ..positional import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    apply_rope_interleaved,
    sinusoidal_positional_encoding,
)
from ..sparse import longformer_mask, sliding_window_mask
from ..vision import patchify, unpatchify
from .core import Case, Exercise, Mistake, judge, register

F64 = torch.float64


def _randn(*shape: int, seed: int, dtype: torch.dtype = F64, scale: float = 1.0) -> Tensor:
    """A standard-normal tensor (times ``scale``) from its own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def _clone_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Fresh copies of the tensors among a case's top-level arguments."""
    def fresh(x: Any) -> Any:
        return x.detach().clone() if isinstance(x, Tensor) else x
    return tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()}


CH6 = "06_mqa_gqa.html"
CH7 = "07_positional_encoding.html"
CH8 = "08_quadratic_cost.html"
CH9 = "09_flash_attention.html"
CH10 = "10_sparse_linear.html"
CH11 = "11_beyond_language.html"

# =============================================================================== chapter 6

# ----------------------------------------------------------------------------- repeat_kv


def _repeat_kv_tiled(x: Tensor, n_rep: int) -> Tensor:
    reps = [1] * x.ndim
    reps[-3] = n_rep
    return x.repeat(*reps)  # heads [0, 1, 0, 1, ...]


def _repeat_kv_axis1(x: Tensor, n_rep: int) -> Tensor:
    return x.repeat_interleave(n_rep, dim=1)  # right only for 4-D (B, H, S, D) inputs


def _repeat_kv_seq_axis(x: Tensor, n_rep: int) -> Tensor:
    return x.repeat_interleave(n_rep, dim=-2)  # the sequence axis, as if the layout were (B, S, H, D)


def _repeat_kv_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("2 KV heads, n_rep=3", (_randn(2, 2, 5, 4, seed=600), 3)),
            Case("3 KV heads, n_rep=2, no batch axis (3-D input)", (_randn(3, 4, 2, seed=601), 2)),
            Case("MQA: 1 KV head, n_rep=4", (_randn(2, 1, 3, 4, seed=602), 4)),
        ]
    return [
        Case("n_rep=1", (_randn(2, 3, 4, 5, seed=610), 1)),
        Case("5-D input (B, extra, H_kv, S, D)", (_randn(2, 3, 2, 4, 3, seed=611), 2)),
        Case("S=1, head_dim=1, n_rep=5", (_randn(3, 2, 1, 1, seed=612), 5)),
        Case("4 KV heads, n_rep=2, S != head_dim", (_randn(1, 4, 7, 3, seed=613), 2)),
    ]


register(Exercise(
    id="repeat_kv",
    chapter=6,
    reference=repeat_kv,
    section=f"{CH6}#the-head-mapping-interleave-do-not-tile",
    make_cases=_repeat_kv_cases,
    forbidden=("attnlib",),
    mistakes=(
        Mistake(
            "tiling with repeat instead of repeat_interleave",
            "`Tensor.repeat` tiles the whole block of heads ([0, 1, 0, 1, ...]), so query head 1 "
            "reads KV head 1 instead of KV head 0; each KV head must be repeated in place "
            "([0, 0, 1, 1, ...]) so that query head h reads KV head h // n_rep.",
            f"{CH6}#the-head-mapping-interleave-do-not-tile",
            _repeat_kv_tiled,
        ),
        Mistake(
            "repeating along axis 1 instead of the head axis -3",
            "The head axis is the third from the end, (..., n_kv_heads, S, head_dim); axis 1 is "
            "only that axis for 4-D inputs, and here it is the sequence axis.",
            f"{CH6}#the-code",
            _repeat_kv_axis1,
        ),
        Mistake(
            "repeating along the sequence axis",
            "The positions were repeated (axis -2), as if the layout were (B, S, H, D); attnlib "
            "keeps heads before positions, (B, n_kv_heads, S, head_dim), and GQA repeats heads.",
            f"{CH6}#the-code",
            _repeat_kv_seq_axis,
        ),
    ),
))

# ----------------------------------------------------------------------------- kv_cache_bytes


def _kv_bytes_mistake(*, kv: int = 2, itemsize: Callable[[torch.dtype], int] = lambda d: d.itemsize,
                      with_batch: bool = True) -> Callable[..., int]:
    def wrong(n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch: int = 1,
              dtype: torch.dtype = torch.float16) -> int:
        return kv * n_layers * n_kv_heads * head_dim * seq_len * (batch if with_batch else 1) * itemsize(dtype)
    return wrong


def _kv_bytes_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("Llama-2-7B at 4096 tokens (defaults: batch 1, float16)", (32, 32, 128, 4096)),
            Case("GQA, batch 3, float32", (4, 2, 64, 100, 3, torch.float32)),
            Case("batch 2, float64 (keywords)", (2, 3, 16, 10), {"batch": 2, "dtype": torch.float64}),
        ]
    return [
        Case("empty cache (seq_len=0)", (2, 4, 64, 0)),
        Case("70B GQA at 128K tokens, bfloat16", (80, 8, 128, 131072, 1, torch.bfloat16)),
        Case("int8 cache, batch 5", (12, 4, 64, 512, 5, torch.int8)),
        Case("MQA, batch 16, float32", (32, 1, 64, 2048), {"batch": 16, "dtype": torch.float32}),
    ]


register(Exercise(
    id="kv_cache_bytes",
    chapter=6,
    reference=kv_cache_bytes,
    section=f"{CH6}#the-maths",
    make_cases=_kv_bytes_cases,
    forbidden=("attnlib",),
    mistakes=(
        Mistake(
            "forgetting the factor 2 for keys and values",
            "The cache stores a key vector and a value vector for every position, head and layer: "
            "two tensors, so the count starts with 2.",
            f"{CH6}#the-maths",
            _kv_bytes_mistake(kv=1),
        ),
        Mistake(
            "counting elements instead of bytes",
            "The product of the sizes counts numbers; each takes dtype.itemsize bytes (2 for "
            "float16, 4 for float32).",
            f"{CH6}#the-maths",
            _kv_bytes_mistake(itemsize=lambda d: 1),
        ),
        Mistake(
            "counting bits instead of bytes",
            "The size per element was taken in bits (16 for float16); the function returns bytes, "
            "dtype.itemsize.",
            f"{CH6}#the-maths",
            _kv_bytes_mistake(itemsize=lambda d: 8 * d.itemsize),
        ),
        Mistake(
            "forgetting the batch",
            "Every sequence in the batch has its own cache, so the size grows with the batch.",
            f"{CH6}#kv-cache-sizes-of-published-models",
            _kv_bytes_mistake(with_batch=False),
        ),
        Mistake(
            "assuming 2 bytes per element whatever the dtype",
            "2 bytes is float16/bfloat16 only; use the dtype argument's itemsize (4 for float32, "
            "8 for float64, 1 for int8).",
            f"{CH6}#the-maths",
            _kv_bytes_mistake(itemsize=lambda d: 2),
        ),
    ),
))

# ----------------------------------------------------------------------------- KVCache.update


class _CacheOverwrites(KVCache):
    """Keeps (and returns) only the newest positions."""

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        self.key, self.value = key, value
        return self.key, self.value


class _CachePrepends(KVCache):
    """Puts the new positions before the cached ones."""

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.key is None or self.value is None:
            self.key, self.value = key, value
        else:
            self.key = torch.cat([key, self.key], dim=-2)
            self.value = torch.cat([value, self.value], dim=-2)
        return self.key, self.value


class _CacheHeadAxis(KVCache):
    """Concatenates along the head axis (-3) instead of the sequence axis (-2)."""

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.key is None or self.value is None:
            self.key, self.value = key, value
        else:
            self.key = torch.cat([self.key, key], dim=-3)
            self.value = torch.cat([self.value, value], dim=-3)
        return self.key, self.value


# For each case (by name): the numbers of positions of the updates after the case's own one.
_KV_FOLLOW_UPS: dict[str, tuple[int, ...]] = {
    "prefill of 5 positions, then decoding 1 + 1": (1, 1),
    "decoding from an empty cache, 1 position at a time": (1, 1, 1),
    "chunked prefill 3 + 4 + 1 + 2, value width != key width": (4, 1, 2),
    "batch 3, a prefill of 2 then 6 positions at once": (6,),
    "an update with 0 new positions in the middle": (0, 2),
}


def _kv_update_cases(hidden: bool) -> list[Case]:
    def case(name: str, B: int, H: int, S: int, D: int, Dv: int, seed: int) -> Case:
        assert name in _KV_FOLLOW_UPS, name
        return Case(name, (_randn(B, H, S, D, seed=seed), _randn(B, H, S, Dv, seed=seed + 1)),
                    method="update")
    if not hidden:
        return [
            case("prefill of 5 positions, then decoding 1 + 1", 2, 2, 5, 4, 4, 620),
            case("decoding from an empty cache, 1 position at a time", 1, 1, 1, 3, 3, 622),
        ]
    return [
        case("chunked prefill 3 + 4 + 1 + 2, value width != key width", 2, 3, 3, 4, 5, 630),
        case("batch 3, a prefill of 2 then 6 positions at once", 3, 1, 2, 2, 2, 632),
        case("an update with 0 new positions in the middle", 1, 2, 3, 4, 4, 634),
    ]


def _kv_steps(case: Case) -> tuple[Tensor, ...]:
    """All the (key, value) updates of a case, flattened: the case's own, then the follow-ups."""
    key, value = case.args
    B, H, _, D = key.shape
    steps: list[Tensor] = [key, value]
    for i, n in enumerate(_KV_FOLLOW_UPS[case.name]):
        steps += [_randn(B, H, n, D, seed=700 + 2 * i), _randn(B, H, n, value.size(-1), seed=701 + 2 * i)]
    return tuple(steps)


def _drive_cache(cls: Callable[[], Any], step: int, *flat: Tensor) -> tuple[Any, Any]:
    """Build ``cls()``, call ``update`` with each (key, value) pair of ``flat`` in turn, and
    return what the call number ``step`` (0-based) returned, as a tuple."""
    cache = cls()
    out: Any = None
    for i in range(step + 1):
        out = cache.update(flat[2 * i], flat[2 * i + 1])
    return tuple(out) if isinstance(out, (tuple, list)) else out


_KV_CACHE_MISTAKES = (
    Mistake(
        "keeping or returning only the new positions",
        "update must return every cached key and value, old ones first, then the new ones: "
        "the new queries attend to all of them. Replacing the cache with the new tensors, or "
        "appending but returning only the arguments, loses the prefix.",
        f"{CH6}#incremental-decoding-reproduces-the-full-forward-pass",
        _CacheOverwrites,
    ),
    Mistake(
        "putting the new positions first",
        "torch.cat([new, cached]) puts the newest token at position 0; the cache is in token "
        "order, old positions first, so that position j of the keys is token j.",
        f"{CH6}#the-code",
        _CachePrepends,
    ),
    Mistake(
        "concatenating along the head axis",
        "The cache is (B, n_kv_heads, S, head_dim) and grows along S, axis -2; appending on "
        "axis -3 (or 1) makes new heads instead of new positions.",
        f"{CH6}#the-code",
        _CacheHeadAxis,
    ),
)


@functools.lru_cache(maxsize=None)
def _kv_step_exercise(step: int) -> Exercise:
    """A throw-away function exercise (never registered) that judges the ``step``-th call
    of ``update``: its reference and mistakes drive their class through the same updates."""
    return Exercise(
        id=f"KVCache.update (call {step + 1})",
        chapter=6,
        reference=functools.partial(_drive_cache, KVCache, step),
        section=f"{CH6}#incremental-decoding-reproduces-the-full-forward-pass",
        make_cases=lambda hidden: [],
        mistakes=tuple(Mistake(m.name, m.explanation, m.section,
                               functools.partial(_drive_cache, m.fn, step))
                       for m in _KV_CACHE_MISTAKES),
    )


def _kv_several_updates(student: Callable[[], Any], case: Case) -> str | None:
    """The multi-call check of ``KVCache.update``: run a fresh instance of the learner's class
    through all the updates of the case and judge what every call returns."""
    flat = _kv_steps(case)
    sizes = [flat[2 * i].size(-2) for i in range(len(flat) // 2)]
    plan = " + ".join(str(n) for n in sizes)
    cache = student()
    for step in range(len(sizes)):
        where = (f"update call {step + 1} of {len(sizes)} on one fresh cache (adding {plan} "
                 f"positions in turn)")
        try:
            out = cache.update(flat[2 * step].clone(), flat[2 * step + 1].clone())
        except Exception as exc:  # the learner's code may raise anything
            return f"{where} raised {type(exc).__name__}: {exc}"
        if isinstance(out, list):
            out = tuple(out)
        result = judge(_kv_step_exercise(step), Case(case.name, flat), out)
        if not result.passed:
            return f"{where}: {result.message}"
    return None


register(Exercise(
    id="KVCache.update",
    chapter=6,
    reference=KVCache,
    kind="module",
    section=f"{CH6}#the-code",
    make_cases=_kv_update_cases,
    forbidden=("attnlib",),
    mistakes=_KV_CACHE_MISTAKES,
    extra_check=_kv_several_updates,
))

# ----------------------------------------------------------------------------- GQA forward


def _gqa_attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, attn_mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(head_dim) + masks) v with zero weights for a fully masked row;
    ``allowed`` is a boolean (L, S) mask or None (for the mistakes; attnlib is not called)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, L, S)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    peak = scores.amax(dim=-1, keepdim=True)
    e = torch.exp(scores - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)))
    total = e.sum(dim=-1, keepdim=True)
    return (e / torch.where(total == 0, torch.ones_like(total), total)) @ v  # (B, H, L, D)


def _kv_head_of(n_heads: int, n_kv_heads: int, rule: str) -> Tensor:
    """Which KV head each query head reads: ``h // n_rep`` (right), ``h % n_kv_heads`` (tiled)
    or ``h // n_kv_heads`` (group size and group count confused)."""
    h = torch.arange(n_heads)
    return {"interleave": h // (n_heads // n_kv_heads), "tile": h % n_kv_heads,
            "by-count": h // n_kv_heads}[rule]


def _gqa_variant(m: MultiHeadAttention, x: Tensor, context: Tensor | None = None,
                 attn_mask: Tensor | None = None, is_causal: bool = False, kv_cache: Any = None, *,
                 k_rule: str = "interleave", v_rule: str = "interleave", cache: str = "ok") -> Tensor:
    """MultiHeadAttention.forward (no RoPE) with one ingredient changed. ``cache``: "ok",
    "ignored" (as if no cache were given), "top-left" (the chunk's causal mask not offset
    by the cached length) or "offset-after-update" (the offset read after appending)."""
    B, L, _ = x.shape
    source = x if context is None else context

    def split(t: Tensor, heads: int) -> Tensor:
        return t.reshape(B, t.size(1), heads, m.head_dim).transpose(1, 2)  # (B, heads, len, head_dim)

    q = split(m.q_proj(x), m.n_heads)  # (B, H, L, D)
    k = split(m.k_proj(source), m.n_kv_heads)  # (B, H_kv, S_new, D)
    v = split(m.v_proj(source), m.n_kv_heads)  # (B, H_kv, S_new, D)
    allowed = None
    if kv_cache is not None and cache != "ignored":
        offset = kv_cache.seq_len
        k, v = kv_cache.update(k, v)  # (B, H_kv, S, D)
        shift = {"ok": offset, "top-left": 0, "offset-after-update": kv_cache.seq_len}[cache]
        allowed = torch.ones(L, k.size(-2), dtype=torch.bool).tril(shift)  # (L, S)
    elif is_causal:
        allowed = torch.ones(L, k.size(-2), dtype=torch.bool).tril()  # (L, S), top-left
    k = k[:, _kv_head_of(m.n_heads, m.n_kv_heads, k_rule)]  # (B, H, S, D)
    v = v[:, _kv_head_of(m.n_heads, m.n_kv_heads, v_rule)]  # (B, H, S, D)
    y = _gqa_attend(q, k, v, allowed, attn_mask)  # (B, H, L, D)
    return m.o_proj(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, d_model)


def _gqa_mistake(**variant: Any) -> Callable[..., Tensor]:
    def forward(m: MultiHeadAttention, x: Tensor, context: Tensor | None = None,
                attn_mask: Tensor | None = None, is_causal: bool = False, kv_cache: Any = None) -> Tensor:
        return _gqa_variant(m, x, context, attn_mask, is_causal, kv_cache, **variant)
    return forward


def _mha_state_dict(init_args: tuple, seed: int, bias_scale: float = 4.0) -> dict[str, Tensor]:
    """Seeded float64 weights for MultiHeadAttention(*init_args), N(0, 1/fan_in); biases
    away from zero so that each one matters."""
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in MultiHeadAttention(*init_args).state_dict().items()}
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        std = 1.0 / math.sqrt(shape[-1] if len(shape) > 1 else shape[0])
        out[name] = _randn(*shape, seed=seed * 100 + i, scale=std * (bias_scale if name.endswith("bias") else 1.0))
    return out


# For each cache case (by name): the chunks the tokens are decoded in, through one KV cache.
_GQA_CACHE_PLANS: dict[str, tuple[int, ...]] = {
    "KV cache: prefill of 4 tokens, then decoding 1 + 1 (8 heads, 2 KV heads)": (4, 1, 1),
    "KV cache, MQA: decoding token by token from an empty cache": (1, 1, 1, 1, 1),
    "KV cache: chunked prefill 3 + 4 + 1 + 2 (6 heads, 3 KV heads, biases)": (3, 4, 1, 2),
}


def _gqa_case(name: str, seed: int, B: int, L: int, d_model: int, H: int, H_kv: int, *, bias: bool = False,
              S: int | None = None, **kwargs: Any) -> Case:
    init_args = (d_model, H, H_kv, bias)
    if S is not None:
        kwargs["context"] = _randn(B, S, d_model, seed=seed + 2)
    if name in _GQA_CACHE_PLANS:
        assert sum(_GQA_CACHE_PLANS[name]) == L and kwargs == {"is_causal": True}, name
    return Case(name, (_randn(B, L, d_model, seed=seed + 1),), kwargs, init_args=init_args,
                state_dict=_mha_state_dict(init_args, seed))


def _bool_mask(L: int, S: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(L, S, generator=g) < 0.6
    mask[:, 0] = True  # no row fully masked by accident
    return mask


def _gqa_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _gqa_case("GQA: 4 query heads, 2 KV heads, self-attention", 800, 2, 5, 16, 4, 2),
            _gqa_case("MQA: 4 query heads, 1 KV head, is_causal", 801, 2, 6, 8, 4, 1, is_causal=True),
            _gqa_case("6 query heads, 3 KV heads (n_rep = 2), bool mask, biases", 802, 2, 5, 12, 6, 3, bias=True,
                      attn_mask=_bool_mask(5, 5, 803)),
            _gqa_case("8 query heads, 2 KV heads, cross-attention L = 3, S = 7", 804, 2, 3, 16, 8, 2, S=7),
            _gqa_case("KV cache: prefill of 4 tokens, then decoding 1 + 1 (8 heads, 2 KV heads)", 805, 2, 6, 16,
                      8, 2, is_causal=True),
        ]
    return [
        _gqa_case("L = 1 (one query), 4 heads, 2 KV heads", 810, 2, 1, 8, 4, 2),
        _gqa_case("MQA with 8 heads, float mask", 811, 1, 5, 16, 8, 1, attn_mask=_randn(5, 5, seed=812)),
        _gqa_case("n_kv_heads = n_heads = 4 (plain MHA)", 813, 2, 4, 8, 4, 4, is_causal=True),
        _gqa_case("MQA cross-attention, L = 4, S = 6, padding mask", 814, 3, 4, 8, 4, 1, S=6,
                  attn_mask=(torch.arange(6)[None, :] < torch.tensor([6, 3, 1])[:, None])[:, None, None, :]),
        _gqa_case("cross-attention L = 5 > S = 2, 6 heads, 2 KV heads (n_rep = 3), biases", 815, 2, 5, 12, 6, 2,
                  bias=True, S=2),
        _gqa_case("is_causal and a bool mask, 8 heads, 4 KV heads", 816, 2, 6, 16, 8, 4, is_causal=True,
                  attn_mask=_bool_mask(6, 6, 817)),
        _gqa_case("head_dim = 1 (d_model = n_heads = 4), 2 KV heads", 818, 2, 4, 4, 4, 2),
        _gqa_case("KV cache, MQA: decoding token by token from an empty cache", 819, 1, 5, 8, 4, 1, is_causal=True),
        _gqa_case("KV cache: chunked prefill 3 + 4 + 1 + 2 (6 heads, 3 KV heads, biases)", 820, 2, 10, 12, 6, 3,
                  bias=True, is_causal=True),
    ]


def _build_module(cls: Callable[..., Any], case: Case) -> Any:
    """``cls(*case.init_args)`` with the case's float64 weights (the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        module = cls(*case.init_args)
    module = module.to(F64)
    module.load_state_dict({k: t.clone() for k, t in case.state_dict.items()}, strict=True)
    return module


def _decode(cls: Callable[..., Any], case: Case, step: int, x: Tensor) -> Tensor:
    """Build ``cls`` with the case's weights, decode ``x`` chunk by chunk (the case's plan)
    through one fresh KV cache with ``is_causal=True``, and return chunk ``step``'s output."""
    module = _build_module(cls, case)
    cache = KVCache()
    bounds = [0, *itertools.accumulate(_GQA_CACHE_PLANS[case.name])]
    out: Any = None
    for a, b in list(zip(bounds, bounds[1:]))[: step + 1]:
        out = module(x[:, a:b], is_causal=True, kv_cache=cache)
    return out


def _as_class(fn: Callable[..., Tensor]) -> type:
    """A method-style mistake ``fn(module, *args)`` as a subclass of the reference."""
    return type("MistakenMultiHeadAttention", (MultiHeadAttention,),
                {"forward": lambda self, *a, _fn=fn, **k: _fn(self, *a, **k)})


def _decode_step_exercise(case: Case, step: int) -> Exercise:
    """A throw-away function exercise (never registered) judging chunk ``step`` of the
    decoding of ``case``; the reference and every mistake decode the same way."""
    return Exercise(
        id=f"MultiHeadAttention.forward with a KV cache (chunk {step + 1})",
        chapter=6,
        reference=functools.partial(_decode, MultiHeadAttention, case, step),
        section=f"{CH6}#incremental-decoding-reproduces-the-full-forward-pass",
        make_cases=lambda hidden: [],
        mistakes=tuple(Mistake(m.name, m.explanation, m.section,
                               functools.partial(_decode, _as_class(m.fn), case, step))
                       for m in _GQA_MISTAKES),
    )


def _gqa_decoding(student: Callable[..., Any], case: Case) -> str | None:
    """For the cache cases: decode the case's tokens chunk by chunk through one KV cache with
    the learner's module; judge every chunk's output, then the size of what was cached."""
    plan = _GQA_CACHE_PLANS.get(case.name)
    if plan is None:
        return None
    x = case.args[0]
    module = _build_module(student, case)
    cache = KVCache()
    bounds = [0, *itertools.accumulate(plan)]
    for step, (a, b) in enumerate(zip(bounds, bounds[1:])):
        where = (f"decoding with a KV cache, chunk {step + 1} of {len(plan)} (chunks of "
                 f"{' + '.join(map(str, plan))} tokens, forward(x_chunk, is_causal=True, kv_cache=cache))")
        try:
            out = module(x[:, a:b].clone(), is_causal=True, kv_cache=cache)
        except Exception as exc:  # the learner's code may raise anything
            return f"{where} raised {type(exc).__name__}: {exc}"
        result = judge(_decode_step_exercise(case, step), Case(case.name, (x,)), out)
        if not result.passed:
            return f"{where}: {result.message}"
    n_kv = case.init_args[2]
    if cache.key is None or cache.key.size(-3) != n_kv or cache.value.size(-3) != n_kv:
        got = None if cache.key is None else tuple(cache.key.shape)
        return (f"after decoding, the KV cache holds keys of shape {got}; it must keep "
                f"n_kv_heads = {n_kv} heads, (B, n_kv_heads, S, head_dim): append k and v to the cache "
                f"before repeating them for the query heads, or GQA saves no memory. See {CH6}#the-maths.")
    return None


_GQA_MISTAKES = (
    Mistake(
        "KV heads tiled with repeat instead of repeat_interleave",
        "Tiling ([0, 1, 0, 1, ...]) makes query head h read KV head h % n_kv_heads; in GQA "
        "consecutive query heads share a KV head ([0, 0, 1, 1, ...]): query head h reads KV "
        "head h // (n_heads // n_kv_heads).",
        f"{CH6}#the-head-mapping-interleave-do-not-tile",
        _gqa_mistake(k_rule="tile", v_rule="tile"),
    ),
    Mistake(
        "query head h paired with KV head h // n_kv_heads",
        "The divisor is the group size n_rep = n_heads // n_kv_heads (query heads per KV "
        "head), not the number of groups n_kv_heads; the two agree only when n_heads = "
        "n_kv_heads ** 2.",
        f"{CH6}#the-maths",
        _gqa_mistake(k_rule="by-count", v_rule="by-count"),
    ),
    Mistake(
        "values tiled while the keys are interleaved",
        "Keys and values must be repeated the same way: query head h attends with KV head "
        "g(h)'s keys and averages the same head's values. Here the values were tiled "
        "(repeat) and the keys interleaved (repeat_interleave).",
        f"{CH6}#the-head-mapping-interleave-do-not-tile",
        _gqa_mistake(v_rule="tile"),
    ),
    Mistake(
        "KV cache ignored",
        "With a cache, the new keys and values are appended to it (kv_cache.update) and the "
        "new queries attend to every cached position; attending to the new tokens alone "
        "forgets the prefix.",
        f"{CH6}#incremental-decoding-reproduces-the-full-forward-pass",
        _gqa_mistake(cache="ignored"),
    ),
    Mistake(
        "causal mask not offset by the cached length",
        "With offset = cache.seq_len positions already cached, new token i sits at position "
        "offset + i and sees keys 0 .. offset + i: a bottom-right aligned mask, "
        "torch.ones(L, offset + L).tril(offset). The top-left mask of is_causal hides the "
        "cache from the new tokens.",
        f"{CH6}#incremental-decoding-reproduces-the-full-forward-pass",
        _gqa_mistake(cache="top-left"),
    ),
    Mistake(
        "cache offset read after the update",
        "The offset is the number of positions cached before this chunk: read kv_cache.seq_len "
        "before kv_cache.update. Read after it, the mask lets every new token see the whole "
        "chunk, later tokens included.",
        f"{CH6}#incremental-decoding-reproduces-the-full-forward-pass",
        _gqa_mistake(cache="offset-after-update"),
    ),
)


register(Exercise(
    id="MultiHeadAttention",
    chapter=6,
    reference=MultiHeadAttention,
    kind="module",
    section=f"{CH6}#the-maths",
    make_cases=_gqa_cases,
    # What does the head mapping for the learner, by name: the learner's forward calls
    # attnlib's KVCache (the grader's cache) and its constructor attnlib's input checks.
    forbidden=("attnlib.MultiHeadAttention", "attnlib.multihead.MultiHeadAttention", "attnlib.repeat_kv",
               "attnlib.gqa.repeat_kv", "attnlib.scaled_dot_product_attention",
               "attnlib.attention.scaled_dot_product_attention", "attnlib.attention_weights",
               "attnlib.attention.attention_weights", "torch.nn.MultiheadAttention",
               "torch.nn.functional.multi_head_attention_forward",
               "torch.nn.functional.scaled_dot_product_attention"),
    mistakes=_GQA_MISTAKES,
    extra_check=_gqa_decoding,
))

# =============================================================================== chapter 7

# ----------------------------------------------------------------------------- sinusoidal


def _sinusoidal_variant(*, swap: bool = False, halves: bool = False, own_freq: bool = False,
                        exponent_i: bool = False, times: bool = False,
                        start: int = 0) -> Callable[..., Tensor]:
    def wrong(seq_len: int, d_model: int, base: float = 10000.0) -> Tensor:
        pos = torch.arange(start, start + seq_len, dtype=F64)[:, None]  # (L, 1)
        n_cos = d_model // 2
        if own_freq:  # channel c uses exponent c / d_model, the cos channels too
            ang_sin = pos / base ** (torch.arange(0, d_model, 2, dtype=F64) / d_model)
            ang_cos = pos / base ** (torch.arange(1, d_model, 2, dtype=F64) / d_model)
        else:
            two_i = torch.arange(0, d_model, 2, dtype=F64)
            exps = (two_i / 2) / d_model if exponent_i else two_i / d_model
            ang_sin = pos * base ** exps if times else pos / base ** exps
            ang_cos = ang_sin[:, :n_cos]
        first, second = torch.sin(ang_sin), torch.cos(ang_cos)
        if swap:
            first, second = torch.cos(ang_sin), torch.sin(ang_cos)
        if halves:
            pe = torch.cat([first, second], dim=1)
        else:
            pe = torch.empty(seq_len, d_model, dtype=F64)
            pe[:, 0::2], pe[:, 1::2] = first, second
        return pe.float()
    return wrong


def _sinusoidal_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("seq_len=10, d_model=8", (10, 8)),
            Case("seq_len=12, d_model=6, base=100", (12, 6), {"base": 100.0}),
        ]
    return [
        Case("one position", (1, 4)),
        Case("no positions (seq_len=0)", (0, 4)),
        Case("odd d_model=5", (7, 5)),
        Case("d_model=1", (3, 1)),
        Case("seq_len=200, d_model=16", (200, 16)),
        Case("seq_len=50, d_model=32, base=10", (50, 32, 10.0)),
    ]


register(Exercise(
    id="sinusoidal_positional_encoding",
    chapter=7,
    reference=sinusoidal_positional_encoding,
    section=f"{CH7}#the-maths",
    make_cases=_sinusoidal_cases,
    forbidden=("attnlib",),
    # float32 output: computing in float32 throughout (instead of float64, rounded once)
    # differs by ~5e-6 at 200 positions, which is not the point of the exercise.
    atol=1e-5,
    rtol=1e-5,
    mistakes=(
        Mistake(
            "sin and cos swapped",
            "Even channels hold the sine and odd channels the cosine: PE[pos, 2i] = sin(pos w_i), "
            "PE[pos, 2i+1] = cos(pos w_i).",
            f"{CH7}#the-maths",
            _sinusoidal_variant(swap=True),
        ),
        Mistake(
            "all sines first, then all cosines",
            "The sine and the cosine of a pair sit side by side, in channels 2i and 2i + 1 "
            "(interleaved), not in two halves.",
            f"{CH7}#the-maths",
            _sinusoidal_variant(halves=True),
        ),
        Mistake(
            "giving each channel its own frequency",
            "The exponent is 2i / d_model for both channels of pair i; using the channel index c "
            "for the cosine channel gives it a different frequency, so the pair is no longer a "
            "point on a circle.",
            f"{CH7}#sinusoidal-encodings-many-clocks-at-different-speeds",
            _sinusoidal_variant(own_freq=True),
        ),
        Mistake(
            "exponent i / d_model instead of 2i / d_model",
            "With the pair index i the frequencies only go down to base^(-1/2); the exponent is "
            "2i / d_model, so the slowest pair turns once every ~2 pi base positions.",
            f"{CH7}#the-maths",
            _sinusoidal_variant(exponent_i=True),
        ),
        Mistake(
            "multiplying by base^(2i/d) instead of dividing",
            "The angle is pos / base^(2i/d_model): frequencies fall from 1 towards 1/base. "
            "Multiplying makes them grow instead.",
            f"{CH7}#the-maths",
            _sinusoidal_variant(times=True),
        ),
        Mistake(
            "positions starting at 1",
            "Positions are counted from 0, so row 0 is sin(0) = 0 and cos(0) = 1.",
            f"{CH7}#the-maths",
            _sinusoidal_variant(start=1),
        ),
    ),
))

# ----------------------------------------------------------------------------- apply_rope


def _rope_variant(*, sign: float = 1.0, swap: bool = False, exponent_i: bool = False,
                  own_freq: bool = False, ignore_positions: bool = False,
                  positions_on_heads: bool = False,
                  angle_dtype: torch.dtype | None = torch.float32) -> Callable[..., Tensor]:
    """Rotate-half RoPE with one thing changed; ``angle_dtype=None`` means x.dtype."""
    def wrong(x: Tensor, positions: Tensor | None = None, base: float = 10000.0) -> Tensor:
        L, D = x.size(-2), x.size(-1)
        adt = x.dtype if angle_dtype is None else angle_dtype
        if positions is None or ignore_positions:
            positions = torch.arange(L)
        if own_freq:  # D frequencies, one per channel: no pairs sharing an angle
            inv_freq = 1.0 / base ** (torch.arange(D, dtype=adt) / D)
            emb = positions.to(adt)[..., None] * inv_freq
        else:
            two_i = torch.arange(0, D, 2, dtype=adt)
            inv_freq = 1.0 / base ** ((two_i / 2 if exponent_i else two_i) / D)
            angles = positions.to(adt)[..., None] * inv_freq  # (L, D/2) or (B, L, D/2)
            emb = torch.cat((angles, angles), dim=-1)
        if emb.ndim == 3 and not positions_on_heads:  # (B, L, D) -> (B, 1, .., 1, L, D)
            emb = emb.view(emb.size(0), *([1] * (x.ndim - 3)), L, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        if swap:
            cos, sin = sin, cos
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1) * sign
        return x * cos + rotated * sin
    return wrong


def _rope_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("(B, H, L, D) = (2, 3, 6, 8), default positions", (_randn(2, 3, 6, 8, seed=640),)),
            Case("positions (L,) with gaps", (_randn(2, 2, 5, 8, seed=641), torch.tensor([0, 3, 4, 17, 60]))),
            Case("positions (B, L), one row per batch element (B = H = 2)",
                 (_randn(2, 2, 4, 8, seed=642), torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]]))),
            Case("bfloat16, positions up to 4000",
                 (_randn(1, 2, 6, 16, seed=643, dtype=torch.bfloat16),
                  torch.tensor([0, 1, 999, 2048, 3500, 4000])), low_precision=True),
        ]
    return [
        Case("L=1 at position 7", (_randn(2, 2, 1, 8, seed=650), torch.tensor([7]))),
        Case("2-D x (L, D)", (_randn(5, 4, seed=651),)),
        Case("3-D x (B, L, D) with positions (B, L)",
             (_randn(2, 3, 6, seed=652), torch.tensor([[5, 6, 7], [0, 40, 41]]))),
        Case("head_dim=32, base=500000, positions up to 4000",
             (_randn(1, 2, 4, 32, seed=653), torch.tensor([0, 1000, 3999, 4000])), {"base": 500000.0}),
        Case("head_dim=2", (_randn(1, 1, 5, 2, seed=654),)),
        Case("bfloat16, positions (B, L) up to 4000",
             (_randn(2, 3, 5, 8, seed=655, dtype=torch.bfloat16),
              torch.tensor([[0, 1, 2, 3, 4], [3996, 3997, 3998, 3999, 4000]])), low_precision=True),
        Case("float16, positions up to 3000",
             (_randn(1, 2, 4, 16, seed=656, dtype=torch.float16), torch.tensor([5, 700, 1500, 3000])),
             low_precision=True),
    ]


register(Exercise(
    id="apply_rope",
    chapter=7,
    reference=apply_rope,
    section=f"{CH7}#rope-the-score-depends-only-on-the-offset",
    make_cases=_rope_cases,
    forbidden=("attnlib",),
    # The reference computes the angles in float32 (as LLaMA does). Angles computed in
    # float64 are not a mistake: they differ by < 1e-4 at position 4000.
    atol=1e-3,
    rtol=1e-6,
    mistakes=(
        Mistake(
            "interleaved pairs (2i, 2i+1) instead of rotate-half pairs (i, i + D/2)",
            "That is the RoFormer/GPT-J layout; this function uses the rotate-half layout of "
            "GPT-NeoX and LLaMA, where channel i is paired with channel i + D/2. Both are "
            "rotations, but of different pairs of channels.",
            f"{CH7}#two-layouts-of-the-same-rotation",
            apply_rope_interleaved,
        ),
        Mistake(
            "rotate_half with the sign flipped",
            "rotate_half maps (x1, x2) to (-x2, x1), a quarter turn forward; (x2, -x1) turns the "
            "other way, so every pair is rotated by minus the angle.",
            f"{CH7}#the-maths",
            _rope_variant(sign=-1.0),
        ),
        Mistake(
            "sin and cos swapped",
            "The rotation is x * cos + rotate_half(x) * sin; with the two swapped it is no longer "
            "a rotation (position 0 should leave x unchanged).",
            f"{CH7}#the-maths",
            _rope_variant(swap=True),
        ),
        Mistake(
            "exponent i / D instead of 2i / D in the frequencies",
            "Pair i turns by base^(-2i/D) per position, computed from arange(0, D, 2) / D; with "
            "arange(D // 2) / D the frequencies decay half as fast.",
            f"{CH7}#the-maths",
            _rope_variant(exponent_i=True),
        ),
        Mistake(
            "one frequency per channel instead of per pair",
            "Frequencies from arange(D) / D give channel i and channel i + D/2 different angles, "
            "so they no longer form a rotating pair; the D/2 angles are computed once and "
            "repeated, torch.cat((angles, angles)).",
            f"{CH7}#the-maths",
            _rope_variant(own_freq=True),
        ),
        Mistake(
            "ignoring the positions argument",
            "The angles were computed for positions 0..L-1 whatever was passed; with a KV cache "
            "the new tokens sit at positions t..t+L-1.",
            f"{CH7}#the-code",
            _rope_variant(ignore_positions=True),
        ),
        Mistake(
            "(B, L) positions applied per head instead of per batch element",
            "Angles of shape (B, L, D) broadcast against (B, H, L, D) line up with the head axis; "
            "insert a head axis, (B, 1, L, D), so row b of positions applies to batch element b.",
            f"{CH7}#the-maths",
            _rope_variant(positions_on_heads=True),
        ),
        Mistake(
            "computing the angles in the input's low-precision dtype",
            "A bfloat16 angle at position 4000 is off by whole radians; compute the angles, cos "
            "and sin in float32 and only then cast cos and sin to x.dtype.",
            f"{CH7}#rope-the-score-depends-only-on-the-offset",
            _rope_variant(angle_dtype=None),
        ),
    ),
))

# ----------------------------------------------------------------------------- ALiBi


def _slopes_variant(*, from_zero: bool = False, naive: bool = False, reverse: bool = False,
                    no_eight: bool = False) -> Callable[[int], Tensor]:
    def wrong(n_heads: int) -> Tensor:
        if from_zero:
            slopes = torch.tensor([2.0 ** (-8.0 * h / n_heads) for h in range(n_heads)])
        elif naive:
            slopes = torch.tensor([2.0 ** (-8.0 * h / n_heads) for h in range(1, n_heads + 1)])
        elif no_eight:
            slopes = torch.tensor([2.0 ** (-1.0 * h / n_heads) for h in range(1, n_heads + 1)])
        else:
            slopes = alibi_slopes(n_heads)
        slopes = slopes.float()
        return slopes.flip(0) if reverse else slopes
    return wrong


def _alibi_variant(*, slopes: Callable[[int], Tensor] = alibi_slopes, sign: float = -1.0,
                   absolute: bool = True, offset: str = "given") -> Callable[..., Tensor]:
    """``offset``: "given" (correct), "ignored" (always top-left) or "bottom-right"."""
    def wrong(n_heads: int, L: int, S: int, *, query_offset: int = 0,
              device: torch.device | str | None = None) -> Tensor:
        shift = {"given": query_offset, "ignored": 0, "bottom-right": S - L}[offset]
        dist = (torch.arange(L)[:, None] + shift - torch.arange(S)[None, :]).float()
        if absolute:
            dist = dist.abs()
        return (sign * slopes(n_heads)[:, None, None] * dist).to(device)
    return wrong


_SLOPE_MISTAKES = (
    ("slopes starting at h = 0", "The slopes are 2^(-8h/H) for h = 1..H: the first head gets "
     "2^(-8/H), not 2^0 = 1.", _slopes_variant(from_zero=True)),
    ("the power-of-two formula for any head count", "For a head count that is not a power of two, "
     "ALiBi takes the slopes of the power of two just below and adds every other slope of the next "
     "power of two; 2^(-8h/H) with H = 6 gives other values.", _slopes_variant(naive=True)),
    ("slopes in reverse order", "Head 0 gets the largest slope (the most local head), 2^(-8/H); the "
     "slopes then shrink head by head.", _slopes_variant(reverse=True)),
    ("ratio 2^(-1/H) instead of 2^(-8/H)", "The geometric sequence starts at 2^(-8/H) and has that "
     "ratio: for 8 heads 1/2, 1/4, ..., 1/256.", _slopes_variant(no_eight=True)),
)


def _alibi_slopes_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [Case("8 heads", (8,)), Case("6 heads (not a power of two)", (6,))]
    return [Case(f"{n} heads", (n,)) for n in (1, 2, 3, 5, 12, 16, 64)]


register(Exercise(
    id="alibi_slopes",
    chapter=7,
    reference=alibi_slopes,
    section=f"{CH7}#alibi-a-distance-penalty-per-head",
    make_cases=_alibi_slopes_cases,
    forbidden=("attnlib",),
    atol=1e-7,
    rtol=1e-6,
    mistakes=tuple(Mistake(name, expl, f"{CH7}#alibi-a-distance-penalty-per-head", fn)
                   for name, expl, fn in _SLOPE_MISTAKES),
))


def _alibi_bias_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("8 heads, L = S = 6", (8, 6, 6)),
            Case("6 heads, L = 4, S = 7 (top-left)", (6, 4, 7)),
            Case("4 heads, L = 3, S = 8, query_offset = 5 (decoding)", (4, 3, 8), {"query_offset": 5}),
        ]
    return [
        Case("1 head, L = S = 1", (1, 1, 1)),
        Case("3 heads, L = 5 > S = 2", (3, 5, 2)),
        Case("12 heads, L = S = 4", (12, 4, 4)),
        Case("no queries (L = 0)", (16, 0, 5)),
        Case("negative query_offset", (2, 4, 6), {"query_offset": -2}),
        Case("query_offset = 2, L = S = 5", (5, 5, 5), {"query_offset": 2}),
    ]


register(Exercise(
    id="alibi_bias",
    chapter=7,
    reference=alibi_bias,
    section=f"{CH7}#alibi-a-distance-penalty-per-head",
    make_cases=_alibi_bias_cases,
    forbidden=("attnlib",),
    atol=1e-5,
    rtol=1e-5,
    mistakes=(
        Mistake(
            "a positive bias (sign flipped)",
            "ALiBi subtracts slope * |i - j| from the score: the farther the key, the lower its "
            "score. A positive bias favours distant keys.",
            f"{CH7}#the-maths",
            _alibi_variant(sign=1.0),
        ),
        Mistake(
            "i - j without the absolute value",
            "The penalty is proportional to the distance |i - j|; -(i - j) becomes a bonus for "
            "keys after the query.",
            f"{CH7}#the-maths",
            _alibi_variant(absolute=False),
        ),
        *(Mistake(name, expl, f"{CH7}#alibi-a-distance-penalty-per-head", _alibi_variant(slopes=fn))
          for name, expl, fn in _SLOPE_MISTAKES),
        Mistake(
            "aligning the queries bottom-right",
            "Query i sits at position i + query_offset and the default offset is 0 (top-left, as "
            "is_causal); the last L of S positions are selected with query_offset = S - L.",
            "05_self_cross_masks.html#is-causal-when-l-s-top-left-or-bottom-right",
            _alibi_variant(offset="bottom-right"),
        ),
        Mistake(
            "ignoring query_offset",
            "With a KV cache the L new queries are the last L positions: query i is at position "
            "i + query_offset, not at i.",
            f"{CH7}#alibi-a-distance-penalty-per-head",
            _alibi_variant(offset="ignored"),
        ),
    ),
))

# =============================================================================== chapter 8


def _score_bytes_mistake(*, itemsize: Callable[[torch.dtype], int] = lambda d: d.itemsize,
                         square: bool = False, heads: bool = True, with_batch: bool = True,
                         matrices: int = 1) -> Callable[..., int]:
    def wrong(L: int, S: int, n_heads: int = 1, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        return (matrices * itemsize(dtype) * (batch if with_batch else 1) * (n_heads if heads else 1)
                * L * (L if square else S))
    return wrong


def _score_bytes_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("L = S = 1024, defaults (float32)", (1024, 1024)),
            Case("cross-attention L = 512, S = 77, 8 heads, batch 3, float16", (512, 77, 8, 3, torch.float16)),
            Case("L = 64, S = 200, 5 heads, batch 7, float64 (keywords)", (64, 200),
                 {"n_heads": 5, "batch": 7, "dtype": torch.float64}),
        ]
    return [
        Case("128K tokens, 32 heads, bfloat16", (131072, 131072, 32, 1, torch.bfloat16)),
        Case("decoding: L = 1, S = 4096", (1, 4096, 8, 4)),
        Case("no keys (S = 0)", (10, 0, 2, 2)),
        Case("int8 scores", (33, 17, 3, 2, torch.int8)),
    ]


register(Exercise(
    id="attention_score_bytes",
    chapter=8,
    reference=attention_score_bytes,
    section=f"{CH8}#the-maths",
    make_cases=_score_bytes_cases,
    forbidden=("attnlib",),
    mistakes=(
        Mistake(
            "counting elements instead of bytes",
            "B * H * L * S counts scores; each takes dtype.itemsize bytes (4 in float32, 2 in "
            "float16).",
            f"{CH8}#the-maths",
            _score_bytes_mistake(itemsize=lambda d: 1),
        ),
        Mistake(
            "counting bits instead of bytes",
            "The size per element was taken in bits (32 for float32); the function returns bytes.",
            f"{CH8}#the-maths",
            _score_bytes_mistake(itemsize=lambda d: 8 * d.itemsize),
        ),
        Mistake(
            "counting Z and P together",
            "The function counts one (L, S) matrix per batch element and head, the scores Z or the "
            "weights P, which have the same size.",
            f"{CH8}#the-maths",
            _score_bytes_mistake(matrices=2),
        ),
        Mistake(
            "L * L instead of L * S",
            "The score matrix is (L, S): L queries by S keys. They are equal only in "
            "self-attention; in cross-attention or decoding they differ.",
            f"{CH8}#the-maths",
            _score_bytes_mistake(square=True),
        ),
        Mistake(
            "forgetting the heads",
            "Every head has its own score matrix: the count is multiplied by n_heads.",
            f"{CH8}#the-maths",
            _score_bytes_mistake(heads=False),
        ),
        Mistake(
            "forgetting the batch",
            "Every sequence in the batch has its own score matrices: the count is multiplied by "
            "batch.",
            f"{CH8}#the-maths",
            _score_bytes_mistake(with_batch=False),
        ),
        Mistake(
            "assuming 4 bytes per element whatever the dtype",
            "4 bytes is float32 only; use the dtype's itemsize (2 for float16, 8 for float64).",
            f"{CH8}#the-maths",
            _score_bytes_mistake(itemsize=lambda d: 4),
        ),
    ),
))


def _flops_mistake(*, per_mac: int = 2, with_pv: bool = True, square: bool = False,
                   heads: bool = True, with_batch: bool = True,
                   pv_width_is_head_dim: bool = False) -> Callable[..., int]:
    def wrong(L: int, S: int, head_dim: int, n_heads: int = 1, batch: int = 1,
              head_dim_v: int | None = None) -> int:
        dv = head_dim if head_dim_v is None or pv_width_is_head_dim else head_dim_v
        pairs = L * (L if square else S)
        macs = pairs * (head_dim + (dv if with_pv else 0))
        return per_mac * macs * (n_heads if heads else 1) * (batch if with_batch else 1)
    return wrong


def _flops_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("L = S = 1024, head_dim = 64", (1024, 1024, 64)),
            Case("L = 10, S = 50, head_dim = 16, 4 heads, batch 3, head_dim_v = 8",
                 (10, 50, 16, 4, 3, 8)),
        ]
    return [
        Case("decoding: L = 1, S = 4096, 32 heads", (1, 4096, 128, 32)),
        Case("no queries (L = 0)", (0, 10, 8, 2, 2)),
        Case("L = 7, S = 3, head_dim = 5, head_dim_v = 9 (keywords)", (7, 3, 5),
             {"n_heads": 6, "batch": 2, "head_dim_v": 9}),
        Case("128K tokens, head_dim = 128", (131072, 131072, 128, 64, 1)),
    ]


register(Exercise(
    id="attention_flops",
    chapter=8,
    reference=attention_flops,
    section=f"{CH8}#the-maths",
    make_cases=_flops_cases,
    forbidden=("attnlib",),
    mistakes=(
        Mistake(
            "counting one FLOP per multiply-add",
            "A multiply-add is two floating-point operations, a multiplication and an addition; "
            "that is how FlopCounterMode and hardware peak figures count.",
            f"{CH8}#the-maths",
            _flops_mistake(per_mac=1),
        ),
        Mistake(
            "forgetting the P V product",
            "Attention does two matrix products: the scores Q K^T and the weighted sum P V, which "
            "costs 2 * L * S * head_dim_v FLOPs more.",
            f"{CH8}#the-maths",
            _flops_mistake(with_pv=False),
        ),
        Mistake(
            "L * L instead of L * S",
            "There are L * S scores, L queries by S keys; L = S only in self-attention.",
            f"{CH8}#the-maths",
            _flops_mistake(square=True),
        ),
        Mistake(
            "forgetting the heads",
            "Every head does its own two products: the count is multiplied by n_heads.",
            f"{CH8}#the-maths",
            _flops_mistake(heads=False),
        ),
        Mistake(
            "forgetting the batch",
            "Every sequence of the batch does its own products: the count is multiplied by batch.",
            f"{CH8}#the-maths",
            _flops_mistake(with_batch=False),
        ),
        Mistake(
            "counting P V with head_dim instead of head_dim_v",
            "P V is (L, S) times (S, head_dim_v): its cost depends on the width of the values, "
            "which may differ from that of the keys.",
            f"{CH8}#the-maths",
            _flops_mistake(pv_width_is_head_dim=True),
        ),
    ),
))

# =============================================================================== chapter 9


def _flash_variant(*, rescale_acc: bool = True, rescale_sum: bool = True, store_max: bool = True,
                   per_tile: bool = False, bottom_right: bool = False, lse_with_max: bool = True,
                   use_scale_arg: bool = True, default_scale: bool = True) -> Callable[..., Any]:
    """Tiled attention with the online softmax, one thing changed."""
    def wrong(query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
              scale: float | None = None, block_q: int = DEFAULT_BLOCK_Q,
              block_k: int = DEFAULT_BLOCK_K, return_lse: bool = False) -> Any:
        dtype = compute_dtype(query.dtype)
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        L, S, E = q.size(-2), k.size(-2), q.size(-1)
        if scale is None or not use_scale_arg:
            scale = 1.0 / math.sqrt(E) if default_scale else 1.0
        shift = S - L if bottom_right else 0  # query i sees keys j <= i + shift
        out = q.new_zeros(*q.shape[:-1], v.size(-1))
        lse = q.new_zeros(q.shape[:-1])
        for i0 in range(0, L, block_q):
            i1 = min(i0 + block_q, L)
            qb = q[..., i0:i1, :] * scale
            m = q.new_full(qb.shape[:-1], -math.inf)
            l = q.new_zeros(qb.shape[:-1])
            acc = q.new_zeros(*qb.shape[:-1], v.size(-1))
            true_m, true_l = m.clone(), l.clone()  # the right statistics, for per_tile's lse
            for j0 in range(0, S, block_k):
                j1 = min(j0 + block_k, S)
                if is_causal and j0 > i1 - 1 + shift:
                    break  # every later tile lies above the diagonal
                s = qb @ k[..., j0:j1, :].transpose(-2, -1)
                if is_causal:
                    rows = torch.arange(i0, i1)[:, None] + shift
                    s = s.masked_fill(torch.arange(j0, j1)[None, :] > rows, -math.inf)
                tile_max = s.amax(dim=-1)
                if per_tile:  # a softmax of the tile alone, added up
                    safe = torch.where(torch.isfinite(tile_max), tile_max, 0.0)
                    p = torch.exp(s - safe[..., None])
                    den = p.sum(dim=-1, keepdim=True)
                    acc = acc + (p / torch.where(den == 0, 1.0, den)) @ v[..., j0:j1, :]
                    new = torch.maximum(true_m, tile_max)
                    new_safe = torch.where(torch.isfinite(new), new, 0.0)
                    true_l = true_l * torch.exp(true_m - new_safe) + torch.exp(s - new_safe[..., None]).sum(-1)
                    true_m = new
                    continue
                m_new = torch.maximum(m, tile_max)
                m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
                alpha = torch.exp(m - m_safe)
                p = torch.exp(s - m_safe[..., None])
                l = (alpha * l if rescale_sum else l) + p.sum(dim=-1)
                acc = (alpha[..., None] * acc if rescale_acc else acc) + p @ v[..., j0:j1, :]
                if store_max:
                    m = m_new
            if per_tile:
                out[..., i0:i1, :], m, l = acc, true_m, true_l
            else:
                out[..., i0:i1, :] = acc / torch.where(l == 0, 1.0, l)[..., None]
            lse[..., i0:i1] = m + torch.log(l) if lse_with_max else torch.log(l)
        out = out.to(query.dtype)
        return (out, lse) if return_lse else out
    return wrong


def _flash_cases(hidden: bool) -> list[Case]:
    def qkv(shape_q: tuple[int, ...], S: int, Ev: int, seed: int, dtype: torch.dtype = F64,
            scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        *lead, _, E = shape_q
        return (_randn(*shape_q, seed=seed, dtype=dtype, scale=scale),
                _randn(*lead, S, E, seed=seed + 1, dtype=dtype, scale=scale),
                _randn(*lead, S, Ev, seed=seed + 2, dtype=dtype))
    if not hidden:
        return [
            Case("L = S = 8, blocks 4 x 4", qkv((2, 2, 8, 4), 8, 3, 660), {"block_q": 4, "block_k": 4}),
            Case("causal, L = S = 10, blocks 4 x 3 (ragged)", qkv((2, 2, 10, 4), 10, 4, 663),
                 {"is_causal": True, "block_q": 4, "block_k": 3}),
            Case("causal, L = 6 < S = 11, blocks 4 x 4", qkv((1, 2, 6, 4), 11, 4, 666),
                 {"is_causal": True, "block_q": 4, "block_k": 4}),
            Case("return_lse, L = 5, S = 9, blocks 2 x 4, scale = 0.3", qkv((2, 1, 5, 4), 9, 2, 669),
                 {"scale": 0.3, "block_q": 2, "block_k": 4, "return_lse": True}),
            Case("L = S = 256, blocks 32 x 32 (no L x S tensor allowed)", qkv((1, 2, 256, 8), 256, 8, 672),
                 {"block_q": 32, "block_k": 32}),
        ]
    return [
        Case("blocks larger than L and S", qkv((2, 2, 5, 4), 7, 3, 680), {"block_q": 64, "block_k": 64}),
        Case("L = 1, S = 13, blocks 1 x 5", qkv((1, 3, 1, 6), 13, 6, 683), {"block_q": 1, "block_k": 5}),
        Case("causal, L = 9 > S = 5, blocks 4 x 2", qkv((1, 2, 9, 4), 5, 4, 686),
             {"is_causal": True, "block_q": 4, "block_k": 2}),
        Case("large logits (scores in the hundreds), blocks 3 x 3", qkv((1, 2, 7, 4), 8, 4, 689, scale=12.0),
             {"scale": 1.0, "block_q": 3, "block_k": 3}),
        Case("causal + return_lse, L = S = 11, blocks 3 x 4", qkv((2, 2, 11, 4), 11, 5, 692),
             {"is_causal": True, "block_q": 3, "block_k": 4, "return_lse": True}),
        Case("3-D inputs (N, L, E), default blocks", qkv((3, 6, 4), 6, 4, 695)),
        Case("bfloat16, causal, blocks 4 x 4", qkv((1, 2, 12, 8), 12, 8, 698, dtype=torch.bfloat16),
             {"is_causal": True, "block_q": 4, "block_k": 4}, low_precision=True),
        Case("causal, L = S = 200, blocks 48 x 40 (no L x S tensor allowed)", qkv((1, 1, 200, 4), 200, 4, 701),
             {"is_causal": True, "block_q": 48, "block_k": 40}),
    ]


_ONLINE_SOFTMAX_ADVICE = ("Keep one (block_q, block_k) tile of scores at a time, with the running max, sum "
                          f"and accumulator of the online softmax. See {CH9}#the-online-softmax.")
_RECOMPUTE_ADVICE = ("Recompute one (block_q, block_k) tile of weights at a time from its scores and lse, "
                     "P = exp(scores - lse), and add its share to dQ, dK and dV. See "
                     f"{CH9}#the-backward-pass-recompute-don-t-store.")


def _flash_no_score_matrix(student: Callable[..., Any], case: Case,
                           advice: str = _ONLINE_SOFTMAX_ADVICE) -> str | None:
    """Run the learner's flash attention (or its backward pass) under
    :class:`attnlib.measure.ShapeRecorder` and fail if any tensor could hold the whole
    ``L x S`` score matrix.

    Checked only on the cases built for it: at least 128 queries and keys and tiles at most a
    quarter of that, so that no honest tensor (a tile, the ``(N, L)`` statistics of the
    online softmax, the inputs) has two trailing dimensions of ``min(L, S)`` or more.
    """
    query, key = case.args[0], case.args[1]
    L, S = query.size(-2), key.size(-2)
    block_q = case.kwargs.get("block_q", DEFAULT_BLOCK_Q)
    block_k = case.kwargs.get("block_k", DEFAULT_BLOCK_K)
    if min(L, S) < 128 or 4 * max(block_q, block_k) > min(L, S):
        return None
    args, kwargs = _clone_args(case.args, case.kwargs)
    with torch.no_grad(), ShapeRecorder() as rec:
        student(*args, **kwargs)
    big = rec.quadratic(L, S)
    if big:
        return (f"built a tensor of shape {big[0]} (L = {L}, S = {S}, blocks {block_q} x {block_k}): "
                f"flash attention must never materialise the L x S score matrix. {advice}")
    return None


register(Exercise(
    id="flash_attention",
    chapter=9,
    reference=flash_attention,
    section=f"{CH9}#the-online-softmax",
    make_cases=_flash_cases,
    forbidden=("attnlib", "torch.nn.functional.scaled_dot_product_attention"),
    extra_check=_flash_no_score_matrix,
    mistakes=(
        Mistake(
            "online softmax without rescaling the accumulator",
            "When a tile raises the running max from m_old to m_new, the accumulated sum of "
            "exp(s - m_old) * v must be multiplied by alpha = exp(m_old - m_new) before the tile's "
            "terms are added; otherwise old and new terms are on different scales.",
            f"{CH9}#the-online-softmax",
            _flash_variant(rescale_acc=False),
        ),
        Mistake(
            "online softmax without rescaling the running sum",
            "The running sum l of exp(s - m) must be multiplied by alpha = exp(m_old - m_new) "
            "whenever the max changes, like the accumulator; otherwise the final division uses a "
            "normaliser on the wrong scale.",
            f"{CH9}#the-online-softmax",
            _flash_variant(rescale_sum=False),
        ),
        Mistake(
            "never storing the new running max (m = m_new forgotten)",
            "With m stuck at -inf, alpha = exp(m - m_new) is 0 at every tile and wipes what was "
            "accumulated: the output is the attention over the last key tile only.",
            f"{CH9}#the-online-softmax",
            _flash_variant(store_max=False),
        ),
        Mistake(
            "normalising each tile separately",
            "A softmax over one tile makes that tile's weights sum to 1 on their own; the weights "
            "must be normalised over all keys, through the running max and sum, and divided once "
            "at the end.",
            f"{CH9}#a-worked-example-one-row-three-blocks",
            _flash_variant(per_tile=True),
        ),
        Mistake(
            "causal mask aligned bottom-right",
            "is_causal is aligned top-left, as in PyTorch: query i sees keys 0..i whatever S is. "
            "Shifting the diagonal by S - L is the decoding alignment.",
            "05_self_cross_masks.html#is-causal-when-l-s-top-left-or-bottom-right",
            _flash_variant(bottom_right=True),
        ),
        Mistake(
            "log-sum-exp without the max added back",
            "l is the sum of exp(s - m), so log(l) is the log-sum-exp minus m: return m + log(l).",
            f"{CH9}#the-online-softmax",
            _flash_variant(lse_with_max=False),
        ),
        Mistake(
            "ignoring the scale argument",
            "1/sqrt(E) is only the default; when scale is given, the scores are multiplied by it.",
            f"{CH9}#the-code",
            _flash_variant(use_scale_arg=False),
        ),
        Mistake(
            "no 1/sqrt(E) scaling",
            "With scale=None the scores are q . k / sqrt(E), as in standard attention.",
            "03_scaling.html#the-variance-of-a-dot-product",
            _flash_variant(default_scale=False),
        ),
    ),
))

# ----------------------------------------------------------------------------- backward


def _flash_bwd_variant(*, delta: bool = True, with_lse: bool = True, scale_grads: bool = True,
                       causal: bool = True) -> Callable[..., Any]:
    """The tiled backward pass with one thing changed: ``delta`` (the D = rowsum(dO * O)
    term), ``with_lse`` (P from lse, or a softmax of each tile alone), ``scale_grads`` (the
    scale in dQ and dK), ``causal`` (the mask applied to the recomputed scores)."""
    def wrong(query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
              is_causal: bool = False, scale: float | None = None, block_q: int = DEFAULT_BLOCK_Q,
              block_k: int = DEFAULT_BLOCK_K, grad_lse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        dtype = compute_dtype(query.dtype)
        q, k, v, o, d_o = (t.to(dtype) for t in (query, key, value, out, grad_out))
        row_lse = lse.to(dtype)  # (..., L)
        L, S = q.size(-2), k.size(-2)
        if scale is None:
            scale = 1.0 / math.sqrt(q.size(-1))
        d = (d_o * o).sum(dim=-1) if delta else torch.zeros_like(row_lse)  # (..., L)
        if grad_lse is not None:
            d = d - grad_lse.to(dtype)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        g = scale if scale_grads else 1.0
        for i0 in range(0, L, block_q):
            i1 = min(i0 + block_q, L)
            for j0 in range(0, S, block_k):
                j1 = min(j0 + block_k, S)
                s = (q[..., i0:i1, :] @ k[..., j0:j1, :].transpose(-2, -1)) * scale  # (..., bq, bk)
                if is_causal and causal:
                    future = torch.arange(j0, j1)[None, :] > torch.arange(i0, i1)[:, None]
                    s = s.masked_fill(future, -math.inf)
                if with_lse:
                    p = torch.exp(s - row_lse[..., i0:i1, None])
                else:  # a softmax of the tile alone
                    peak = s.amax(dim=-1, keepdim=True)
                    e = torch.exp(s - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)))
                    total = e.sum(dim=-1, keepdim=True)
                    p = e / torch.where(total == 0, torch.ones_like(total), total)
                dv[..., j0:j1, :] += p.transpose(-2, -1) @ d_o[..., i0:i1, :]
                ds = p * (d_o[..., i0:i1, :] @ v[..., j0:j1, :].transpose(-2, -1) - d[..., i0:i1, None])
                dq[..., i0:i1, :] += g * (ds @ k[..., j0:j1, :])
                dk[..., j0:j1, :] += g * (ds.transpose(-2, -1) @ q[..., i0:i1, :])
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)
    return wrong


def _flash_bwd_cases(hidden: bool) -> list[Case]:
    def case(name: str, lead: tuple[int, ...], L: int, S: int, E: int, Ev: int, seed: int, *,
             with_grad_lse: bool = False, logit_scale: float = 1.0, **kwargs: Any) -> Case:
        q = _randn(*lead, L, E, seed=seed, scale=logit_scale)
        k = _randn(*lead, S, E, seed=seed + 1, scale=logit_scale)
        v = _randn(*lead, S, Ev, seed=seed + 2)
        forward = {n: kwargs[n] for n in ("is_causal", "scale", "block_q", "block_k") if n in kwargs}
        out, lse = flash_attention(q, k, v, **forward, return_lse=True)
        if with_grad_lse:
            kwargs["grad_lse"] = _randn(*lead, L, seed=seed + 4)
        return Case(name, (q, k, v, out, lse, _randn(*lead, L, Ev, seed=seed + 3)), kwargs)
    if not hidden:
        return [
            case("L = S = 8, blocks 4 x 4", (2, 2), 8, 8, 4, 3, 900, block_q=4, block_k=4),
            case("causal, L = S = 10, blocks 4 x 3 (ragged)", (2, 2), 10, 10, 4, 4, 905, is_causal=True,
                 block_q=4, block_k=3),
            case("L = 5, S = 9, scale = 0.3, grad_lse given, blocks 2 x 4", (2, 1), 5, 9, 4, 2, 910,
                 with_grad_lse=True, scale=0.3, block_q=2, block_k=4),
            case("L = S = 256, blocks 32 x 32 (no L x S tensor allowed)", (1, 2), 256, 256, 8, 8, 915,
                 block_q=32, block_k=32),
        ]
    return [
        case("blocks larger than L and S", (2, 2), 5, 7, 4, 3, 920, block_q=64, block_k=64),
        case("L = 1, S = 13, blocks 1 x 5", (1, 3), 1, 13, 6, 6, 925, block_q=1, block_k=5),
        case("causal, L = 9 > S = 5, blocks 4 x 2", (1, 2), 9, 5, 4, 4, 930, is_causal=True,
             block_q=4, block_k=2),
        case("causal, L = 6 < S = 11, blocks 4 x 4", (1, 2), 6, 11, 4, 4, 935, is_causal=True,
             block_q=4, block_k=4),
        case("large logits (scores in the hundreds), blocks 3 x 3", (1, 2), 7, 8, 4, 4, 940, logit_scale=12.0,
             scale=1.0, block_q=3, block_k=3),
        case("causal + grad_lse, L = S = 11, blocks 3 x 4", (2, 2), 11, 11, 4, 5, 945, with_grad_lse=True,
             is_causal=True, block_q=3, block_k=4),
        case("3-D inputs (N, L, E), default blocks", (3,), 6, 6, 4, 4, 950),
        case("causal, L = S = 200, blocks 48 x 40 (no L x S tensor allowed)", (1, 1), 200, 200, 4, 4, 955,
             is_causal=True, block_q=48, block_k=40),
    ]


register(Exercise(
    id="flash_attention_backward",
    chapter=9,
    reference=flash_attention_backward,
    section=f"{CH9}#the-backward-pass-recompute-don-t-store",
    make_cases=_flash_bwd_cases,
    forbidden=("attnlib", "torch.nn.functional.scaled_dot_product_attention", "torch.autograd.grad",
               "torch.autograd.backward", "torch.Tensor.backward"),
    extra_check=functools.partial(_flash_no_score_matrix, advice=_RECOMPUTE_ADVICE),
    mistakes=(
        Mistake(
            "the D = rowsum(dO * O) term forgotten",
            "The softmax's Jacobian gives dS = P * (dP - D) with D_i = dO_i . O_i (minus grad_lse "
            "when it is given); dS = P * dP leaves out the term that keeps each row of dS summing "
            "to zero.",
            f"{CH9}#the-backward-pass-recompute-don-t-store",
            _flash_bwd_variant(delta=False),
        ),
        Mistake(
            "each tile's weights normalised on their own",
            "The weights of a tile are a slice of the whole row's softmax: P = exp(scores - lse), "
            "with the lse of the forward pass; a softmax over the tile alone makes each tile sum "
            "to 1.",
            f"{CH9}#the-backward-pass-recompute-don-t-store",
            _flash_bwd_variant(with_lse=False),
        ),
        Mistake(
            "dQ and dK without the scale",
            "The scores are scale * q . k, so the chain rule multiplies dQ = dS K and dK = dS^T Q "
            "by the scale.",
            f"{CH9}#the-backward-pass-recompute-don-t-store",
            _flash_bwd_variant(scale_grads=False),
        ),
        Mistake(
            "causal mask left out of the recomputed scores",
            "The recomputed tile must be masked like the forward one: a key after the query "
            "has weight 0, exp(-inf - lse), and must not receive a gradient.",
            f"{CH9}#the-backward-pass-recompute-don-t-store",
            _flash_bwd_variant(causal=False),
        ),
    ),
))

# =============================================================================== chapter 10

# ----------------------------------------------------------------------------- masks


def _window_variant(*, total_width: bool = False, strict: bool = False, ignore_causal: bool = False,
                    look_ahead: bool = False, no_abs: bool = False) -> Callable[..., Tensor]:
    def wrong(L: int, window: int, causal: bool = False) -> Tensor:
        pos = torch.arange(L)
        dist = pos[:, None] - pos[None, :]  # i - j
        if causal and not ignore_causal:
            back = dist.neg() if look_ahead else dist
            reach = window - 1 if (total_width or strict) else window
            return (back >= 0) & (back <= reach)
        if total_width:
            return dist.abs() <= window // 2
        if strict:
            return dist.abs() < window
        if no_abs:
            return dist <= window
        return dist.abs() <= window
    return wrong


def _window_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("L = 9, window = 3", (9, 3)),
            Case("L = 9, window = 2, causal", (9, 2, True)),
            Case("L = 6, window = 1", (6, 1)),
        ]
    return [
        Case("window = 0 (diagonal only)", (5, 0)),
        Case("causal, window = 0", (5, 0), {"causal": True}),
        Case("window >= L", (4, 7)),
        Case("L = 1", (1, 2)),
        Case("L = 0", (0, 1)),
        Case("causal, L = 12, window = 5", (12, 5, True)),
    ]


register(Exercise(
    id="sliding_window_mask",
    chapter=10,
    reference=sliding_window_mask,
    section=f"{CH10}#attention-on-a-pattern",
    make_cases=_window_cases,
    forbidden=("attnlib",),
    mistakes=(
        Mistake(
            "window taken as the total width",
            "Here window is the reach, the largest allowed distance |i - j| (causal: up to window "
            "keys back, plus the query itself); Longformer's total width w is window = w // 2.",
            f"{CH10}#attention-on-a-pattern",
            _window_variant(total_width=True),
        ),
        Mistake(
            "off by one: distance < window",
            "Key j is allowed when |i - j| <= window, the limit included.",
            f"{CH10}#attention-on-a-pattern",
            _window_variant(strict=True),
        ),
        Mistake(
            "ignoring causal",
            "With causal=True a query sees only keys at or before it: 0 <= i - j <= window.",
            f"{CH10}#attention-on-a-pattern",
            _window_variant(ignore_causal=True),
        ),
        Mistake(
            "a causal window that looks ahead",
            "The causal window is the window keys *before* the query, 0 <= i - j <= window (rows "
            "are queries, columns keys); this allows the keys after it.",
            f"{CH10}#attention-on-a-pattern",
            _window_variant(look_ahead=True),
        ),
        Mistake(
            "i - j <= window without the absolute value",
            "Without |.| every key after the query passes the test; the non-causal window is "
            "|i - j| <= window, on both sides.",
            f"{CH10}#attention-on-a-pattern",
            _window_variant(no_abs=True),
        ),
    ),
))


def _longformer_variant(*, rows: bool = True, cols: bool = True, total_width: bool = False,
                        strict: bool = False) -> Callable[..., Tensor]:
    def wrong(L: int, window: int, global_tokens: Any) -> Tensor:
        dist = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs()
        if total_width:
            mask = dist <= window // 2
        elif strict:
            mask = dist < window
        else:
            mask = dist <= window
        idx = torch.as_tensor(list(global_tokens) if not isinstance(global_tokens, Tensor)
                              else global_tokens, dtype=torch.long)
        if rows:
            mask[idx, :] = True
        if cols:
            mask[:, idx] = True
        return mask
    return wrong


def _longformer_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("L = 12, window = 3, global [0, 7]", (12, 3, [0, 7])),
            Case("L = 9, window = 2, global tensor([4])", (9, 2, torch.tensor([4]))),
        ]
    return [
        Case("no global tokens", (5, 1, [])),
        Case("window = 0, duplicate global [2, 2]", (6, 0, [2, 2])),
        Case("window >= L", (4, 5, [1])),
        Case("L = 1", (1, 0, [0])),
        Case("every token global", (8, 1, list(range(8)))),
        Case("L = 20, window = 2, global at both ends", (20, 2, torch.tensor([0, 19]))),
    ]


register(Exercise(
    id="longformer_mask",
    chapter=10,
    reference=longformer_mask,
    section=f"{CH10}#attention-on-a-pattern",
    make_cases=_longformer_cases,
    forbidden=("attnlib",),
    mistakes=(
        Mistake(
            "global rows but not global columns",
            "A global token attends to every position (its row) *and* every position attends to "
            "it (its column); with the rows alone, ordinary tokens cannot read the global ones.",
            f"{CH10}#attention-on-a-pattern",
            _longformer_variant(cols=False),
        ),
        Mistake(
            "global columns but not global rows",
            "A global token must also attend to every position (its row is all True), not only "
            "be attended to.",
            f"{CH10}#attention-on-a-pattern",
            _longformer_variant(rows=False),
        ),
        Mistake(
            "window taken as the total width",
            "window is the reach on each side, |i - j| <= window; Longformer's total width w is "
            "2 * window.",
            f"{CH10}#attention-on-a-pattern",
            _longformer_variant(total_width=True),
        ),
        Mistake(
            "off by one: distance < window",
            "Key j is in the window when |i - j| <= window, the limit included.",
            f"{CH10}#attention-on-a-pattern",
            _longformer_variant(strict=True),
        ),
    ),
))

# ----------------------------------------------------------------------------- linear attention


def _linear_variant(*, honour_causal: bool = True, normalise: bool = True, causal_norm: bool = True,
                    phi: Callable[[Tensor], Tensor] | None = None, phi_on_values: bool = False,
                    scale_queries: bool = False) -> Callable[..., Tensor]:
    """Linear attention written as its quadratic form, one thing changed."""
    def wrong(query: Tensor, key: Tensor, value: Tensor, causal: bool = False,
              feature_map: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        f = feature_map or phi or elu_feature_map
        dtype = compute_dtype(query.dtype)
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        if scale_queries:
            q = q / math.sqrt(q.size(-1))
        if phi_on_values:
            v = f(v)
        a = f(q) @ f(k).transpose(-2, -1)  # (..., L, S)
        a_num = a
        if causal and honour_causal:
            a_num = a * torch.ones(a.shape[-2:], dtype=torch.bool).tril()
        num = a_num @ v
        if not normalise:
            return num.to(query.dtype)
        den = (a_num if causal_norm else a).sum(dim=-1, keepdim=True)
        return (num / torch.where(den == 0, 1.0, den)).to(query.dtype)
    return wrong


def _linear_cases(hidden: bool) -> list[Case]:
    def qkv(lead: tuple[int, ...], L: int, S: int, E: int, Ev: int, seed: int,
            dtype: torch.dtype = F64, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        return (_randn(*lead, L, E, seed=seed, dtype=dtype, scale=scale),
                _randn(*lead, S, E, seed=seed + 1, dtype=dtype, scale=scale),
                _randn(*lead, S, Ev, seed=seed + 2, dtype=dtype))
    if not hidden:
        return [
            Case("non-causal, L = 7, S = 9", qkv((2, 2), 7, 9, 4, 3, 720)),
            Case("causal, L = S = 10", qkv((2, 2), 10, 10, 4, 3, 723), {"causal": True}),
            Case("causal, L = S = 70 (more than one chunk of 64)", qkv((1, 2), 70, 70, 8, 5, 726),
                 {"causal": True}),
        ]
    return [
        Case("L = 1", qkv((2, 1), 1, 6, 4, 4, 730)),
        Case("causal, L = S = 1", qkv((1, 1), 1, 1, 3, 2, 733), {"causal": True}),
        Case("causal, L = 5 < S = 9 (top-left)", qkv((1, 2), 5, 9, 4, 4, 736), {"causal": True}),
        Case("causal, L = 9 > S = 5 (top-left)", qkv((1, 2), 9, 5, 4, 4, 739), {"causal": True}),
        Case("causal, L = S = 130", qkv((1, 1), 130, 130, 6, 6, 742), {"causal": True}),
        Case("large inputs (x 10)", qkv((2, 2), 8, 8, 4, 4, 745, scale=10.0)),
        Case("3-D inputs (N, L, E), causal", qkv((3,), 6, 6, 4, 2, 748), {"causal": True}),
        Case("bfloat16, causal", qkv((1, 2), 12, 12, 8, 8, 751, dtype=torch.bfloat16), {"causal": True},
             low_precision=True),
    ]


register(Exercise(
    id="linear_attention",
    chapter=10,
    reference=linear_attention,
    section=f"{CH10}#linear-attention",
    make_cases=_linear_cases,
    forbidden=("attnlib",),
    mistakes=(
        Mistake(
            "causal attention over all keys",
            "With causal=True position i may only use keys j <= i: the sums of phi(k_j) v_j^T and "
            "phi(k_j) run over the prefix (a running state), not over the whole sequence.",
            f"{CH10}#linear-attention",
            _linear_variant(honour_causal=False),
        ),
        Mistake(
            "missing the normaliser",
            "Each output is a weighted average: phi(q_i)^T S divided by phi(q_i)^T z, with z the "
            "sum of the phi(k_j). Without the division the weights do not sum to 1.",
            f"{CH10}#linear-attention",
            _linear_variant(normalise=False),
        ),
        Mistake(
            "a causal numerator with a normaliser over all keys",
            "In the causal case the normaliser z_i must sum phi(k_j) over the same keys j <= i as "
            "the numerator; summed over all keys the weights of each row no longer add up to 1.",
            f"{CH10}#linear-attention",
            _linear_variant(causal_norm=False),
        ),
        Mistake(
            "exp as the feature map",
            "The feature map is phi(x) = elu(x) + 1 (attnlib.elu_feature_map), applied to each "
            "coordinate; exp(x) is positive too but a different function.",
            f"{CH10}#linear-attention",
            _linear_variant(phi=torch.exp),
        ),
        Mistake(
            "the feature map applied to the values",
            "phi replaces the similarity exp(q . k): it is applied to queries and keys only; the "
            "values are averaged as they are.",
            f"{CH10}#linear-attention",
            _linear_variant(phi_on_values=True),
        ),
        Mistake(
            "queries scaled by 1/sqrt(E)",
            "Linear attention has no 1/sqrt(E): a constant scale of the similarity cancels in the "
            "ratio, but scaling q inside phi changes phi(q).",
            f"{CH10}#linear-attention",
            _linear_variant(scale_queries=True),
        ),
    ),
))

# =============================================================================== chapter 11


def _patchify_variant(order: tuple[int, ...], *, no_permute: bool = False) -> Callable[..., Tensor]:
    """Cut into (B, C, H/p, p, W/p, p) and permute by ``order`` before flattening."""
    def wrong(images: Tensor, patch_size: int) -> Tensor:
        B, C, H, W = images.shape
        p = patch_size
        if no_permute:
            return images.reshape(B, (H // p) * (W // p), C * p * p)
        x = images.reshape(B, C, H // p, p, W // p, p).permute(*order)
        return x.reshape(B, (H // p) * (W // p), C * p * p)
    return wrong


def _patchify_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("B = 2, C = 3, 8 x 12 image, p = 4", (_randn(2, 3, 8, 12, seed=760), 4)),
            Case("B = 1, C = 2, 6 x 6 image, p = 3", (_randn(1, 2, 6, 6, seed=761), 3)),
        ]
    g = torch.Generator().manual_seed(762)
    return [
        Case("p = 1", (_randn(1, 2, 3, 4, seed=763), 1)),
        Case("one patch (p = H = W)", (_randn(2, 3, 5, 5, seed=764), 5)),
        Case("grey-scale (C = 1), 4 x 10, p = 2", (_randn(2, 1, 4, 10, seed=765), 2)),
        Case("tall image 12 x 4, p = 4", (_randn(1, 3, 12, 4, seed=766), 4)),
        Case("uint8 image", (torch.randint(0, 256, (1, 3, 6, 9), generator=g, dtype=torch.uint8), 3)),
    ]


register(Exercise(
    id="patchify",
    chapter=11,
    reference=patchify,
    section=f"{CH11}#the-maths",
    make_cases=_patchify_cases,
    forbidden=("attnlib",),
    mistakes=(
        Mistake(
            "patches flattened in (p, p, C) order",
            "Each patch is laid out channel first, then row, then column, (C, p, p), the order of "
            "a conv weight (D, C, p, p); (p, p, C) puts the channels last.",
            f"{CH11}#the-code",
            _patchify_variant((0, 2, 4, 3, 5, 1)),
        ),
        Mistake(
            "patches in column-major order",
            "Patch n = r * (W / p) + c: left to right along a row of patches, then top to bottom; "
            "this went down each column first.",
            f"{CH11}#an-image-is-a-sequence-of-patches",
            _patchify_variant((0, 4, 2, 1, 3, 5)),
        ),
        Mistake(
            "each patch transposed (columns before rows)",
            "Inside a patch the numbers go row by row, (C, p_row, p_col); flattening column by "
            "column transposes every patch.",
            f"{CH11}#the-code",
            _patchify_variant((0, 2, 4, 1, 5, 3)),
        ),
        Mistake(
            "a reshape without a permute",
            "images.reshape(B, N, C * p * p) cuts the flat memory of the image into runs of "
            "C * p * p numbers, mostly pieces of pixel rows, not p x p squares: the patch axes "
            "must be moved together with a permute first.",
            f"{CH11}#the-maths",
            _patchify_variant((), no_permute=True),
        ),
    ),
))


def _unpatchify_variant(grid: tuple[str, ...], order: tuple[int, ...]) -> Callable[..., Tensor]:
    """Reshape the patches to the 6 axes named by ``grid`` (from "h", "w", "C", "p1", "p2"
    after the batch axis), permute by ``order`` and reshape to (B, C, H, W); ``order = ()``
    reshapes straight to the image."""
    def wrong(patches: Tensor, patch_size: int, height: int, width: int) -> Tensor:
        B, N, P = patches.shape
        p = patch_size
        C = P // (p * p)
        if not order:
            return patches.reshape(B, C, height, width)
        sizes = {"h": height // p, "w": width // p, "C": C, "p1": p, "p2": p}
        x = patches.reshape(B, *(sizes[a] for a in grid)).permute(*order)
        return x.reshape(B, C, height, width)
    return wrong


def _unpatchify_cases(hidden: bool) -> list[Case]:
    def case(name: str, B: int, C: int, H: int, W: int, p: int, seed: int, **kw: Any) -> Case:
        patches = patchify(_randn(B, C, H, W, seed=seed), p)  # (B, N, C * p * p)
        return Case(name, (patches, p, H, W), kw)
    if not hidden:
        return [
            case("B = 2, C = 3, 8 x 12 image, p = 4", 2, 3, 8, 12, 4, 770),
            case("B = 1, C = 2, 6 x 6 image, p = 3", 1, 2, 6, 6, 3, 771),
        ]
    g = torch.Generator().manual_seed(772)
    return [
        case("p = 1", 1, 2, 3, 4, 1, 773),
        case("one patch (p = H = W)", 2, 3, 5, 5, 5, 774),
        case("grey-scale (C = 1), 4 x 10, p = 2", 2, 1, 4, 10, 2, 775),
        case("tall image 12 x 4, p = 4, keywords", 1, 3, 12, 4, 4, 776),
        Case("uint8 patches", (torch.randint(0, 256, (1, 6, 27), generator=g, dtype=torch.uint8), 3, 6, 9)),
        Case("height and width as keywords, 6 x 4, p = 2", (_randn(2, 6, 12, seed=777), 2),
             {"height": 6, "width": 4}),
    ]


register(Exercise(
    id="unpatchify",
    chapter=11,
    reference=unpatchify,
    section=f"{CH11}#the-code",
    make_cases=_unpatchify_cases,
    forbidden=("attnlib", "torch.nn.functional.fold", "torch.nn.Fold"),
    mistakes=(
        Mistake(
            "patchify's permutation reused",
            "patchify moves the axes (B, C, H/p, p, W/p, p) by permute(0, 2, 4, 1, 3, 5); the "
            "inverse takes (B, H/p, W/p, C, p, p) back by the inverse permutation, (0, 3, 1, 4, 2, 5), "
            "not by the same one.",
            f"{CH11}#the-code",
            _unpatchify_variant(("h", "w", "C", "p1", "p2"), (0, 2, 4, 1, 3, 5)),
        ),
        Mistake(
            "patch vectors read in (p, p, C) order",
            "Each patch vector is laid out channel first, (C, p, p), as patchify writes it; "
            "reading it as (p, p, C) scatters the channels over the pixels.",
            f"{CH11}#the-code",
            _unpatchify_variant(("h", "w", "p1", "p2", "C"), (0, 5, 1, 3, 2, 4)),
        ),
        Mistake(
            "patches placed in column-major order",
            "Patch n sits at row n // (W / p) and column n % (W / p) of the patch grid (left to "
            "right, then top to bottom); this filled the grid column by column.",
            f"{CH11}#an-image-is-a-sequence-of-patches",
            _unpatchify_variant(("w", "h", "C", "p1", "p2"), (0, 3, 2, 4, 1, 5)),
        ),
        Mistake(
            "a reshape without a permute",
            "patches.reshape(B, C, H, W) pours the numbers back in memory order, which is not "
            "the order of the image: the patch axes must be moved next to the pixel axes with a "
            "permute first.",
            f"{CH11}#the-maths",
            _unpatchify_variant((), ()),
        ),
    ),
))
