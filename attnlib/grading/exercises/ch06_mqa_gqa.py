"""Chapter 6, multi-query and grouped-query attention: the graded exercises and their mistakes.

======================  =====================================================================
exercise id             reference
======================  =====================================================================
``repeat_kv``           :func:`attnlib.repeat_kv`
``kv_cache_bytes``      :func:`attnlib.kv_cache_bytes`
``KVCache.update``      :class:`attnlib.KVCache` (``update``)
``MultiHeadAttention``  :class:`attnlib.MultiHeadAttention` (``forward``, GQA and a KV cache)
======================  =====================================================================

``MultiHeadAttention`` grades the learner's ``forward`` with ``n_kv_heads < n_heads`` and a
KV cache; chapter 4 grades it with ``n_kv_heads=None`` as ``MultiHeadAttention.forward``, and
ids are unique: like ``ElmanRNN``, the id is the class, the cases' ``method`` ``"forward"``.

``KVCache.update``: a case calls one method once, and on a fresh cache ``update`` only hands
its inputs back. So the case checks that first call, and the ``extra_check`` then drives a
fresh instance of the learner's class through several updates and judges every returned
``(key, value)`` with :func:`~attnlib.grading.core.judge` against the reference driven the
same way (mistakes named as usual). The GQA forward does the same for decoding with a
:class:`~attnlib.KVCache`, which a case cannot carry: its cache cases check the full causal
pass, then the learner's module decodes the same tokens in chunks through one cache, every
chunk's output judged against the reference's. Each mistake is a small wrong implementation
with the reference's signature (``_gqa_variant``: the forward with one thing changed).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...gqa import repeat_kv
from ...kv_cache import KVCache, kv_cache_bytes
from ...multihead import MultiHeadAttention
from ..._validate import compute_dtype
from ..core import Case, Exercise, Mistake, judge, register
from .ch04_multi_head import huge_score_mha
from .common import F64, NO_ATTNLIB, rand_bool, randn

PAGE = "06_mqa_gqa.html"


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
            Case("2 KV heads, n_rep=3", (randn(2, 2, 5, 4, seed=600), 3)),
            Case("3 KV heads, n_rep=2, no batch axis (3-D input)", (randn(3, 4, 2, seed=601), 2)),
            Case("MQA: 1 KV head, n_rep=4", (randn(2, 1, 3, 4, seed=602), 4)),
        ]
    return [
        Case("n_rep=1", (randn(2, 3, 4, 5, seed=610), 1)),
        Case("5-D input (B, extra, H_kv, S, D)", (randn(2, 3, 2, 4, 3, seed=611), 2)),
        Case("S=1, head_dim=1, n_rep=5", (randn(3, 2, 1, 1, seed=612), 5)),
        Case("4 KV heads, n_rep=2, S != head_dim", (randn(1, 4, 7, 3, seed=613), 2)),
    ]


register(Exercise(
    id="repeat_kv",
    chapter=6,
    reference=repeat_kv,
    section=f"{PAGE}#the-head-mapping-interleave-do-not-tile",
    make_cases=_repeat_kv_cases,
    forbidden=NO_ATTNLIB,
    mistakes=(
        Mistake(
            "tiling with repeat instead of repeat_interleave",
            "`Tensor.repeat` tiles the whole block of heads ([0, 1, 0, 1, ...]), so query head 1 "
            "reads KV head 1 instead of KV head 0; each KV head must be repeated in place "
            "([0, 0, 1, 1, ...]) so that query head h reads KV head h // n_rep.",
            f"{PAGE}#the-head-mapping-interleave-do-not-tile",
            _repeat_kv_tiled,
        ),
        Mistake(
            "repeating along axis 1 instead of the head axis -3",
            "The head axis is the third from the end, (..., n_kv_heads, S, head_dim); axis 1 is "
            "only that axis for 4-D inputs, and here it is the sequence axis.",
            f"{PAGE}#the-code",
            _repeat_kv_axis1,
        ),
        Mistake(
            "repeating along the sequence axis",
            "The positions were repeated (axis -2), as if the layout were (B, S, H, D); attnlib "
            "keeps heads before positions, (B, n_kv_heads, S, head_dim), and GQA repeats heads.",
            f"{PAGE}#the-code",
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
    section=f"{PAGE}#the-maths",
    make_cases=_kv_bytes_cases,
    forbidden=NO_ATTNLIB,
    mistakes=(
        Mistake(
            "forgetting the factor 2 for keys and values",
            "The cache stores a key vector and a value vector for every position, head and layer: "
            "two tensors, so the count starts with 2.",
            f"{PAGE}#the-maths",
            _kv_bytes_mistake(kv=1),
        ),
        Mistake(
            "counting elements instead of bytes",
            "The product of the sizes counts numbers; each takes dtype.itemsize bytes (2 for "
            "float16, 4 for float32).",
            f"{PAGE}#the-maths",
            _kv_bytes_mistake(itemsize=lambda d: 1),
        ),
        Mistake(
            "counting bits instead of bytes",
            "The size per element was taken in bits (16 for float16); the function returns bytes, "
            "dtype.itemsize.",
            f"{PAGE}#the-maths",
            _kv_bytes_mistake(itemsize=lambda d: 8 * d.itemsize),
        ),
        Mistake(
            "forgetting the batch",
            "Every sequence in the batch has its own cache, so the size grows with the batch.",
            f"{PAGE}#kv-cache-sizes-of-published-models",
            _kv_bytes_mistake(with_batch=False),
        ),
        Mistake(
            "assuming 2 bytes per element whatever the dtype",
            "2 bytes is float16/bfloat16 only; use the dtype argument's itemsize (4 for float32, "
            "8 for float64, 1 for int8).",
            f"{PAGE}#the-maths",
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
        return Case(name, (randn(B, H, S, D, seed=seed), randn(B, H, S, Dv, seed=seed + 1)),
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
        steps += [randn(B, H, n, D, seed=700 + 2 * i), randn(B, H, n, value.size(-1), seed=701 + 2 * i)]
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
        f"{PAGE}#incremental-decoding-reproduces-the-full-forward-pass",
        _CacheOverwrites,
    ),
    Mistake(
        "putting the new positions first",
        "torch.cat([new, cached]) puts the newest token at position 0; the cache is in token "
        "order, old positions first, so that position j of the keys is token j.",
        f"{PAGE}#the-code",
        _CachePrepends,
    ),
    Mistake(
        "concatenating along the head axis",
        "The cache is (B, n_kv_heads, S, head_dim) and grows along S, axis -2; appending on "
        "axis -3 (or 1) makes new heads instead of new positions.",
        f"{PAGE}#the-code",
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
        section=f"{PAGE}#incremental-decoding-reproduces-the-full-forward-pass",
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
    section=f"{PAGE}#the-code",
    make_cases=_kv_update_cases,
    forbidden=NO_ATTNLIB,
    mistakes=_KV_CACHE_MISTAKES,
    extra_check=_kv_several_updates,
))

# ----------------------------------------------------------------------------- GQA forward


def _gqa_attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, attn_mask: Tensor | None,
                max_shift: bool = True) -> Tensor:
    """softmax(q k^T / sqrt(head_dim) + masks) v with zero weights for a fully masked row;
    ``allowed`` is a boolean (L, S) mask or None (for the mistakes; attnlib is not called).
    float16/bfloat16 are computed in float32 and cast back, as the reference does;
    ``max_shift=False``: the softmax exponentiates the raw scores."""
    work = compute_dtype(q.dtype)
    scores = (q.to(work) @ k.to(work).transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, L, S)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.to(work)
    if max_shift:
        peak = scores.amax(dim=-1, keepdim=True)
        e = torch.exp(scores - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)))
        total = e.sum(dim=-1, keepdim=True)
        w = e / torch.where(total == 0, torch.ones_like(total), total)
    else:
        e = torch.exp(scores)
        w = e / e.sum(dim=-1, keepdim=True)
    return (w @ v.to(work)).to(v.dtype)  # (B, H, L, D)


def _kv_head_of(n_heads: int, n_kv_heads: int, rule: str) -> Tensor:
    """Which KV head each query head reads: ``h // n_rep`` (right), ``h % n_kv_heads`` (tiled)
    or ``h // n_kv_heads`` (group size and group count confused)."""
    h = torch.arange(n_heads)
    return {"interleave": h // (n_heads // n_kv_heads), "tile": h % n_kv_heads,
            "by-count": h // n_kv_heads}[rule]


def _gqa_variant(m: MultiHeadAttention, x: Tensor, context: Tensor | None = None,
                 attn_mask: Tensor | None = None, is_causal: bool = False, kv_cache: Any = None, *,
                 k_rule: str = "interleave", v_rule: str = "interleave", cache: str = "ok",
                 max_shift: bool = True) -> Tensor:
    """MultiHeadAttention.forward (no RoPE) with one ingredient changed. ``cache``: "ok",
    "ignored" (as if no cache were given), "top-left" (the chunk's causal mask not offset
    by the cached length) or "offset-after-update" (the offset read after appending);
    ``max_shift=False``: the softmax exponentiates the raw scores."""
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
    y = _gqa_attend(q, k, v, allowed, attn_mask, max_shift)  # (B, H, L, D)
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
        out[name] = randn(*shape, seed=seed * 100 + i, std=std * (bias_scale if name.endswith("bias") else 1.0))
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
        kwargs["context"] = randn(B, S, d_model, seed=seed + 2)
    if name in _GQA_CACHE_PLANS:
        assert sum(_GQA_CACHE_PLANS[name]) == L and kwargs == {"is_causal": True}, name
    return Case(name, (randn(B, L, d_model, seed=seed + 1),), kwargs, init_args=init_args,
                state_dict=_mha_state_dict(init_args, seed))


def _gqa_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _gqa_case("GQA: 4 query heads, 2 KV heads, self-attention", 800, 2, 5, 16, 4, 2),
            _gqa_case("MQA: 4 query heads, 1 KV head, is_causal", 801, 2, 6, 8, 4, 1, is_causal=True),
            _gqa_case("6 query heads, 3 KV heads (n_rep = 2), bool mask, biases", 802, 2, 5, 12, 6, 3, bias=True,
                      attn_mask=rand_bool(5, 5, seed=803)),
            _gqa_case("8 query heads, 2 KV heads, cross-attention L = 3, S = 7", 804, 2, 3, 16, 8, 2, S=7),
            _gqa_case("KV cache: prefill of 4 tokens, then decoding 1 + 1 (8 heads, 2 KV heads)", 805, 2, 6, 16,
                      8, 2, is_causal=True),
            _huge_gqa_case("float32, 4 heads, 2 KV heads, every score near -8192 (batch 0) or +8192 (batch 1)",
                           806, 2, 5, 64, 4, 2, torch.float32),
        ]
    return [
        _gqa_case("L = 1 (one query), 4 heads, 2 KV heads", 810, 2, 1, 8, 4, 2),
        _gqa_case("MQA with 8 heads, float mask", 811, 1, 5, 16, 8, 1, attn_mask=randn(5, 5, seed=812)),
        _gqa_case("n_kv_heads = n_heads = 4 (plain MHA)", 813, 2, 4, 8, 4, 4, is_causal=True),
        _gqa_case("MQA cross-attention, L = 4, S = 6, padding mask", 814, 3, 4, 8, 4, 1, S=6,
                  attn_mask=(torch.arange(6)[None, :] < torch.tensor([6, 3, 1])[:, None])[:, None, None, :]),
        _gqa_case("cross-attention L = 5 > S = 2, 6 heads, 2 KV heads (n_rep = 3), biases", 815, 2, 5, 12, 6, 2,
                  bias=True, S=2),
        _gqa_case("is_causal and a bool mask, 8 heads, 4 KV heads", 816, 2, 6, 16, 8, 4, is_causal=True,
                  attn_mask=rand_bool(6, 6, seed=817)),
        _gqa_case("head_dim = 1 (d_model = n_heads = 4), 2 KV heads", 818, 2, 4, 4, 4, 2),
        _gqa_case("KV cache, MQA: decoding token by token from an empty cache", 819, 1, 5, 8, 4, 1, is_causal=True),
        _gqa_case("KV cache: chunked prefill 3 + 4 + 1 + 2 (6 heads, 3 KV heads, biases)", 820, 2, 10, 12, 6, 3,
                  bias=True, is_causal=True),
        _huge_gqa_case("bfloat16 weights, MQA, every score near -8192 (batch 0) or +8192 (batch 1), is_causal",
                       821, 2, 6, 32, 2, 1, torch.bfloat16, is_causal=True),
    ]


def _huge_gqa_case(name: str, seed: int, B: int, L: int, d_model: int, H: int, H_kv: int, dtype: torch.dtype,
                   **kwargs: Any) -> Case:
    """A low-precision case whose scores all lie far from 0 (:func:`.ch04_multi_head.huge_score_mha`)."""
    init_args = (d_model, H, H_kv, True)
    x, sd = huge_score_mha(init_args, B, L, seed, dtype)
    return Case(name, (x,), kwargs, init_args=init_args, state_dict=sd, low_precision=True)


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
        section=f"{PAGE}#incremental-decoding-reproduces-the-full-forward-pass",
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
                f"before repeating them for the query heads, or GQA saves no memory. See {PAGE}#the-maths.")
    return None


_GQA_MISTAKES = (
    Mistake(
        "KV heads tiled with repeat instead of repeat_interleave",
        "Tiling ([0, 1, 0, 1, ...]) makes query head h read KV head h % n_kv_heads; in GQA "
        "consecutive query heads share a KV head ([0, 0, 1, 1, ...]): query head h reads KV "
        "head h // (n_heads // n_kv_heads).",
        f"{PAGE}#the-head-mapping-interleave-do-not-tile",
        _gqa_mistake(k_rule="tile", v_rule="tile"),
    ),
    Mistake(
        "query head h paired with KV head h // n_kv_heads",
        "The divisor is the group size n_rep = n_heads // n_kv_heads (query heads per KV "
        "head), not the number of groups n_kv_heads; the two agree only when n_heads = "
        "n_kv_heads ** 2.",
        f"{PAGE}#the-maths",
        _gqa_mistake(k_rule="by-count", v_rule="by-count"),
    ),
    Mistake(
        "values tiled while the keys are interleaved",
        "Keys and values must be repeated the same way: query head h attends with KV head "
        "g(h)'s keys and averages the same head's values. Here the values were tiled "
        "(repeat) and the keys interleaved (repeat_interleave).",
        f"{PAGE}#the-head-mapping-interleave-do-not-tile",
        _gqa_mistake(v_rule="tile"),
    ),
    Mistake(
        "KV cache ignored",
        "With a cache, the new keys and values are appended to it (kv_cache.update) and the "
        "new queries attend to every cached position; attending to the new tokens alone "
        "forgets the prefix.",
        f"{PAGE}#incremental-decoding-reproduces-the-full-forward-pass",
        _gqa_mistake(cache="ignored"),
    ),
    Mistake(
        "causal mask not offset by the cached length",
        "With offset = cache.seq_len positions already cached, new token i sits at position "
        "offset + i and sees keys 0 .. offset + i: a bottom-right aligned mask, "
        "torch.ones(L, offset + L).tril(offset). The top-left mask of is_causal hides the "
        "cache from the new tokens.",
        f"{PAGE}#incremental-decoding-reproduces-the-full-forward-pass",
        _gqa_mistake(cache="top-left"),
    ),
    Mistake(
        "cache offset read after the update",
        "The offset is the number of positions cached before this chunk: read kv_cache.seq_len "
        "before kv_cache.update. Read after it, the mask lets every new token see the whole "
        "chunk, later tokens included.",
        f"{PAGE}#incremental-decoding-reproduces-the-full-forward-pass",
        _gqa_mistake(cache="offset-after-update"),
    ),
    Mistake(
        "no max subtraction",
        "The softmax exponentiated the raw scores: when every score of a row is large, exp "
        "overflows to inf (inf / inf = NaN), and when every score is very negative it underflows "
        "to 0 (0 / 0 = NaN). Subtract each row's maximum before exp.",
        "02_queries_keys_values.html#a-softmax-that-cannot-overflow",
        _gqa_mistake(max_shift=False),
    ),
)


register(Exercise(
    id="MultiHeadAttention",
    chapter=6,
    reference=MultiHeadAttention,
    kind="module",
    section=f"{PAGE}#the-maths",
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
