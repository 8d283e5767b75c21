"""Chapter 12, the attention of today's LLMs: the graded exercises and their mistakes.

============================  ===========================================================
exercise id                   reference
============================  ===========================================================
``TransformerBlock.forward``  :class:`attnlib.TransformerBlock` (``forward``, with a KV cache)
``PagedKVCache.append``       :class:`attnlib.PagedKVCache` (``append``)
``PagedKVCache``              :class:`attnlib.PagedKVCache` (``gather``; see below)
``mla_absorbed_attention``    :func:`attnlib.mla_absorbed_attention`
``sink_window_mask``          :func:`attnlib.sink_window_mask`
``TinyGPT.generate``          :class:`attnlib.TinyGPT` (``generate``)
============================  ===========================================================

What a case cannot carry is checked by each exercise's ``extra_check``, chapter 6's way:

* ``TransformerBlock.forward``: the cache cases decode their tokens chunk by chunk through a
  fresh :class:`~attnlib.KVCache`, every chunk's output judged against the reference decoding
  the same way (:func:`_block_decoding`).
* ``PagedKVCache``: a case calls one method once on a fresh cache, so each case names an
  *append schedule* (:data:`_SCHEDULES`: appends to several sequences, chunks crossing block
  boundaries, ``T = 0``, ``free`` and the reuse of the freed blocks, running out of blocks).
  ``append``'s check drives the learner's cache through it and compares, after every step,
  the block tables, the lengths, the free blocks and the pool at the used slots with the
  reference's (:func:`_append_schedule`); ``gather``'s check fills the cache through the
  reference's state after every step and judges the learner's ``gather`` of every sequence
  (:func:`_gather_schedule`), so that the two are graded independently. A case's own call
  is the schedule's first ``append``: ``gather`` cannot run on the fresh cache a case builds
  (the reference has no way to load a cache's state), and an id ``Class.method`` must name
  the method its cases call, so ``gather``'s id is the class, as chapter 6's
  ``MultiHeadAttention`` grades ``forward``.
* ``mla_absorbed_attention``: on the cases whose sizes tell the axes apart, the call runs
  under a tensor recorder and fails if it builds per-head keys or values, a tensor with an
  axis of the ``S`` cached tokens and one of ``head_dim`` or ``n_heads * head_dim``
  (:func:`_mla_no_per_head_kv`).
* ``TinyGPT.generate``: the model's forward calls are counted through its token embedding:
  with ``use_cache=True`` the prompt once, then one token per step through the caches; with
  ``use_cache=False`` the whole sequence every step, without caches (:func:`_generate_calls`).

A mistake recognised by an extra check is named there, as ``judge`` names the others.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ...kv_cache import KVCache
from ...latent import mla_absorbed_attention
from ...masks import sink_window_mask
from ...paged import PagedKVCache
from ...transformer import TinyGPT, TransformerBlock
from ..core import Case, Exercise, Mistake, judge, mistake_message, register, section_url
from .ch06_mqa_gqa import _build_module
from .ch09_flash_attention import _TensorRecorder
from .common import F64, clone_args, generator, randn, state_dict

PAGE = "12_todays_llms.html"
BLOCK = f"{PAGE}#a-pre-norm-decoder-block"
GENERATION = f"{PAGE}#generation-with-a-kv-cache"
PAGED = f"{PAGE}#paged-kv-cache-blocks-and-a-block-table"
LATENT = f"{PAGE}#latent-attention-and-weight-absorption"
SINKS = f"{PAGE}#sliding-windows-and-attention-sinks"


def _step_message(where: str, result_message: str, description: str, section: str) -> str:
    """``where: ...`` with the mistake ``judge`` named, if it named one, else the description."""
    if result_message.startswith("Looks like "):
        named = result_message.split("\n(", 1)[0]
        return f"{where}: {named}\n({description})"
    return f"{where}: {description}. See {section_url(section)}."


# ============================================================================ TransformerBlock.forward


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

# ============================================================================ PagedKVCache


# The append schedules, by case name: PagedKVCache(*init_args), then the steps in order,
# ("append", seq_id, T) or ("free", seq_id). A step the reference refuses (out of blocks:
# RuntimeError, the cache unchanged) is part of a schedule.
_SCHEDULES: dict[str, tuple[tuple, tuple[tuple, ...]]] = {
    "two sequences interleaved, a free and the reuse of its blocks, then out of blocks": (
        (6, 4, 2, 3, F64),
        (("append", 0, 3), ("append", 1, 6), ("append", 0, 2), ("append", 1, 0), ("free", 1),
         ("append", 0, 7), ("append", 2, 5), ("append", 2, 4), ("append", 2, 5), ("append", 2, 3),
         ("append", 0, 0))),
    "a chunk of 7 tokens over 4 blocks of 2, then out of blocks, a free and a retry": (
        (5, 2, 1, 4, F64),
        (("append", 0, 7), ("append", 1, 1), ("append", 0, 1), ("append", 0, 2), ("free", 1),
         ("append", 0, 2), ("append", 3, 1))),
    # hidden
    "named sequences, float32, an empty first append, and blocks of 3": (
        (4, 3, 2, 2, torch.float32),
        (("append", "a", 0), ("append", "b", 4), ("append", "a", 2), ("append", "a", 2),
         ("append", "c", 1), ("free", "b"), ("append", "c", 5), ("append", "a", 3), ("free", "a"),
         ("append", "c", 1), ("append", "b", 2))),
    "one block of 5 tokens: the second sequence waits for the first to be freed": (
        (1, 5, 3, 2, F64),
        (("append", 7, 2), ("append", 8, 1), ("append", 7, 3), ("append", 7, 1), ("free", 7),
         ("append", 8, 5), ("append", 8, 0))),
    "blocks of 16 tokens, three sequences, all freed and their blocks reused": (
        (4, 16, 2, 2, F64),
        (("append", 0, 5), ("append", 1, 16), ("append", 2, 1), ("append", 0, 11), ("append", 0, 1),
         ("free", 1), ("free", 0), ("free", 2), ("append", 3, 20), ("append", 4, 12))),
    "block_size 1: one block per token": (
        (7, 1, 2, 3, F64),
        (("append", 0, 2), ("append", 1, 3), ("append", 0, 1), ("free", 1), ("append", 0, 4),
         ("append", 2, 1))),
}
_VISIBLE_SCHEDULES = list(_SCHEDULES)[:2]
_HIDDEN_SCHEDULES = list(_SCHEDULES)[2:]


def _schedule_values(name: str, seed: int) -> list[tuple[Tensor, Tensor] | None]:
    """The keys and values of every append of schedule ``name`` (None for a free), seeded."""
    (_, _, H, D, dtype), steps = _SCHEDULES[name]
    values: list[tuple[Tensor, Tensor] | None] = []
    for i, step in enumerate(steps):
        if step[0] == "append":
            values.append((randn(H, step[2], D, seed=seed + 2 * i, dtype=dtype),
                           randn(H, step[2], D, seed=seed + 2 * i + 1, dtype=dtype)))
        else:
            values.append(None)
    return values


def _paged_seed(name: str) -> int:
    return 1300 + 40 * list(_SCHEDULES).index(name)


def _paged_case(name: str, method: str) -> Case:
    """A case of schedule ``name``: its own call is the schedule's first append (``method``
    is ``"append"``); the extra checks drive the whole schedule (:func:`_schedule_of`)."""
    init_args, steps = _SCHEDULES[name]
    assert steps[0][0] == "append" and method == "append", name
    k, v = _schedule_values(name, _paged_seed(name))[0]  # type: ignore[misc]
    return Case(name, (steps[0][1], k, v), init_args=init_args, method=method)


def _schedule_of(case: Case) -> tuple[tuple[tuple, ...], list[tuple[Tensor, Tensor] | None]]:
    """The steps of a case's schedule and the keys and values of its appends: the first
    append's are the case's own (drawn with the course's secret for a hidden case), the
    others drawn here from the schedule's public seeds, as chapter 6's follow-up updates."""
    values = _schedule_values(case.name, _paged_seed(case.name))
    values[0] = (case.args[1], case.args[2])
    return _SCHEDULES[case.name][1], values


def _seq_ids(steps: tuple[tuple, ...]) -> list[Hashable]:
    """The sequences a schedule names, in order of first appearance."""
    seen: list[Hashable] = []
    for step in steps:
        if step[1] not in seen:
            seen.append(step[1])
    return seen


def _describe_step(step: tuple) -> str:
    return f"append({step[1]!r}, T={step[2]})" if step[0] == "append" else f"free({step[1]!r})"


def _apply(cache: Any, step: tuple, value: tuple[Tensor, Tensor] | None) -> tuple[str, str]:
    """One step of a schedule: ``("ok", "")``, or ``("RuntimeError", message)`` when an
    append raises RuntimeError (out of blocks). Other exceptions propagate."""
    if step[0] == "free":
        cache.free(step[1])
        return "ok", ""
    assert value is not None
    try:
        cache.append(step[1], value[0].clone(), value[1].clone())
    except RuntimeError as exc:
        return "RuntimeError", str(exc)
    return "ok", ""


def _used_slots(cache: Any, seq_ids: list[Hashable]) -> Tensor:
    """``(n_blocks, block_size)``: True at the slots that hold a token of a sequence, read from
    the cache's own block tables and lengths (out-of-range entries are left out)."""
    n_blocks, block_size = cache.k_blocks.size(0), cache.k_blocks.size(2)
    used = torch.zeros(n_blocks, block_size, dtype=torch.bool)
    for sid in seq_ids:
        if sid not in cache:
            continue
        table = cache.block_table(sid)
        for t in range(cache.seq_len(sid)):
            if t // block_size < len(table) and 0 <= table[t // block_size] < n_blocks:
                used[table[t // block_size], t % block_size] = True
    return used


def _paged_state(cache: Any, seq_ids: list[Hashable], outcome: str) -> tuple:
    """What the append check compares after a step: the step's outcome (``"ok"`` or
    ``"RuntimeError"``), which sequences exist, their block tables and lengths, the number of
    free blocks, and the keys and values at the used slots of the pool (0 elsewhere: what an
    unused slot holds does not matter)."""
    present = tuple(sid in cache for sid in seq_ids)
    tables = tuple(torch.tensor(cache.block_table(sid) if p else [], dtype=torch.long)
                   for sid, p in zip(seq_ids, present))
    lengths = tuple(int(cache.seq_len(sid)) if p else 0 for sid, p in zip(seq_ids, present))
    used = _used_slots(cache, seq_ids)[:, None, :, None]  # (n_blocks, 1, block_size, 1)
    return (outcome, present, tables, lengths, int(cache.n_free_blocks),
            torch.where(used, cache.k_blocks, torch.zeros_like(cache.k_blocks)),
            torch.where(used, cache.v_blocks, torch.zeros_like(cache.v_blocks)))


def _describe_state(mine: tuple, ref: tuple, seq_ids: list[Hashable], message: str) -> str:
    """The first difference between two :func:`_paged_state` tuples, in words."""
    if mine[0] != ref[0]:
        if ref[0] == "RuntimeError":
            return ("append should have raised RuntimeError, as the sequence needs more new blocks than "
                    "are free, and left the cache as it was; it returned")
        return f"append raised RuntimeError ({message}), but there are enough free blocks"
    for sid, p, q in zip(seq_ids, mine[1], ref[1]):
        if p != q:
            return (f"sequence {sid!r} is {'in' if p else 'not in'} the cache; expected it "
                    f"{'in' if q else 'not in'} it")
    for sid, a, b in zip(seq_ids, mine[2], ref[2]):
        if not torch.equal(a, b):
            return f"block_table({sid!r}) is {a.tolist()}, expected {b.tolist()}"
    for sid, a, b in zip(seq_ids, mine[3], ref[3]):
        if a != b:
            return f"seq_len({sid!r}) is {a}, expected {b}"
    if mine[4] != ref[4]:
        return f"n_free_blocks is {mine[4]}, expected {ref[4]}"
    for what, a, b in (("keys", mine[5], ref[5]), ("values", mine[6], ref[6])):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"the pool's {what} are {tuple(a.shape)} {a.dtype}, expected {tuple(b.shape)} {b.dtype}"
        diff = (a != b).any(dim=-1).any(dim=1)  # (n_blocks, block_size)
        if bool(diff.any()):
            block, slot = (int(i) for i in diff.nonzero()[0])
            return (f"the {what} in the pool differ at {int(diff.sum())} used slots, first at block {block}, "
                    f"slot {slot} ({what[0]}_blocks[{block}, :, {slot}])")
    return "the cache differs from the reference's"


def _drive_paged(cls: Callable[..., Any], case: Case, step: int) -> tuple:
    """Build ``cls(*case.init_args)``, apply the case's schedule up to ``step`` (0-based) and
    return its state (:func:`_paged_state`)."""
    steps, values = _schedule_of(case)
    cache = cls(*case.init_args)
    outcome = "ok"
    for i in range(step + 1):
        outcome, _ = _apply(cache, steps[i], values[i])
    return _paged_state(cache, _seq_ids(steps), outcome)


def _append_variant(cache: PagedKVCache, seq_id: Hashable, k: Tensor, v: Tensor, *, last_block: bool = False,
                    chunk_positions: bool = False, take: str = "top", reuse: bool = True,
                    atomic: bool = True) -> None:
    """``append`` with one thing changed: ``last_block`` (a new block only when the last one
    is full before the append, and every token written into the last block), ``chunk_positions``
    (token t written at position t of the sequence, not length + t), ``take="bottom"`` (blocks
    from the front of the free list), ``reuse=False`` (new block ids only, never a freed
    block), ``atomic=False`` (token by token, raising when a block is needed and none is left,
    after writing the tokens before)."""
    bs = cache.block_size
    T = k.size(1)
    if not atomic:
        cache._tables.setdefault(seq_id, [])
        cache._lengths.setdefault(seq_id, 0)
        for t in range(T):
            pos = cache._lengths[seq_id]
            if pos // bs == len(cache._tables[seq_id]):
                if not cache._free:
                    raise RuntimeError("PagedKVCache is out of blocks")
                cache._tables[seq_id].append(cache._free.pop())
            block = cache._tables[seq_id][pos // bs]
            cache.k_blocks[block, :, pos % bs] = k[:, t]
            cache.v_blocks[block, :, pos % bs] = v[:, t]
            cache._lengths[seq_id] = pos + 1
        return
    table = list(cache._tables.get(seq_id, []))
    start = cache._lengths.get(seq_id, 0)
    needed = (1 if T > 0 and start % bs == 0 else 0) if last_block else -(-(start + T) // bs) - len(table)
    if reuse:
        if needed > len(cache._free):
            raise RuntimeError("PagedKVCache is out of blocks")
        new = [cache._free.pop() if take == "top" else cache._free.pop(0) for _ in range(needed)]
    else:
        handed = getattr(cache, "_handed", 0)  # ids 0 .. handed - 1 were handed out once
        if handed + needed > cache.n_blocks:
            raise RuntimeError("PagedKVCache is out of blocks")
        new = list(range(handed, handed + needed))
        cache._handed = handed + needed  # type: ignore[attr-defined]
        cache._free = [b for b in cache._free if b not in new]
    table += new
    cache._tables[seq_id], cache._lengths[seq_id] = table, start + T
    for t in range(T):
        pos = t if chunk_positions else start + t
        block = table[-1] if last_block else table[pos // bs]
        cache.k_blocks[block, :, pos % bs] = k[:, t]
        cache.v_blocks[block, :, pos % bs] = v[:, t]


def _append_class(**variant: Any) -> type:
    def append(self: PagedKVCache, seq_id: Hashable, k: Tensor, v: Tensor) -> None:
        _append_variant(self, seq_id, k, v, **variant)
    return type("MistakenPagedKVCache", (PagedKVCache,), {"append": append})


_APPEND_MISTAKES = (
    Mistake(
        "a new block only when the last one is full before the append",
        "A chunk of T tokens can cross one block boundary or several: the sequence needs "
        "ceil((length + T) / block_size) blocks in all, so take that many minus the ones it has, "
        "and write token t of the sequence into block block_table[t // block_size], slot "
        "t % block_size. Taking one block only when length % block_size == 0 writes the rest of "
        "the chunk past the end of the last block.",
        PAGED,
        _append_class(last_block=True),
    ),
    Mistake(
        "positions counted from the start of the chunk",
        "The new tokens continue the sequence: token i of the chunk sits at position "
        "seq_len + i (the length before the append), so it goes to block "
        "table[(seq_len + i) // block_size], slot (seq_len + i) % block_size. Counting from 0 "
        "overwrites the sequence's first tokens.",
        PAGED,
        _append_class(chunk_positions=True),
    ),
    Mistake(
        "blocks taken from the bottom of the free list",
        "The free list is a stack: take blocks with self._free.pop(), from its end, which hands "
        "out block 0 first and a freed block before the others; pop(0) takes them from the wrong "
        "end, so the block ids differ.",
        PAGED,
        _append_class(take="bottom"),
    ),
    Mistake(
        "freed blocks never reused",
        "New blocks come from the free list, to which free() returns a finished sequence's "
        "blocks; numbering new blocks after the last one handed out never reuses them and runs "
        "out of blocks while some are free.",
        PAGED,
        _append_class(reuse=False),
    ),
    Mistake(
        "out of blocks found after part of the chunk was written",
        "When the free list cannot cover the whole chunk, append must raise RuntimeError before "
        "changing anything: count the blocks needed first, compare with len(self._free), then "
        "take the blocks and write. Here the first tokens were stored (and blocks taken) before "
        "the error.",
        PAGED,
        _append_class(atomic=False),
    ),
)


def _append_step_exercise(case: Case, step: int) -> Exercise:
    """A throw-away function exercise (never registered) judging the state after ``step``;
    the reference and every mistake are driven through the same schedule."""
    return Exercise(
        id=f"PagedKVCache.append (step {step + 1})",
        chapter=12,
        reference=functools.partial(_drive_paged, PagedKVCache, case, step),
        section=PAGED,
        make_cases=lambda hidden: [],
        mistakes=tuple(Mistake(m.name, m.explanation, m.section, functools.partial(_drive_paged, m.fn, case, step))
                       for m in _APPEND_MISTAKES),
    )


def _where(case: Case, i: int) -> str:
    steps = _SCHEDULES[case.name][1]
    n_blocks, block_size, H, D, dtype = case.init_args
    return (f"step {i + 1} of {len(steps)}, {_describe_step(steps[i])}, of the schedule "
            f"[{', '.join(_describe_step(s) for s in steps)}] on a fresh PagedKVCache(n_blocks={n_blocks}, "
            f"block_size={block_size}, n_kv_heads={H}, head_dim={D}, dtype={dtype})")


def _append_schedule(student: Callable[..., Any], case: Case) -> str | None:
    """Drive one fresh instance of the learner's class through the case's schedule; after every
    step compare its state with the reference's (:func:`_paged_state`)."""
    steps, values = _schedule_of(case)
    seq_ids = _seq_ids(steps)
    ref = PagedKVCache(*case.init_args)
    mine = student(*case.init_args)
    for i, step in enumerate(steps):
        where = _where(case, i)
        ref_outcome, _ = _apply(ref, step, values[i])
        try:
            outcome, message = _apply(mine, step, values[i])
            state = _paged_state(mine, seq_ids, outcome)
        except Exception as exc:  # the learner's code may raise anything
            return f"{where}: raised {type(exc).__name__}: {exc}"
        expected = _paged_state(ref, seq_ids, ref_outcome)
        result = judge(_append_step_exercise(case, i), Case(case.name), state)
        if not result.passed:
            return _step_message(where, result.message, _describe_state(state, expected, seq_ids, message), PAGED)
    return None


register(Exercise(
    id="PagedKVCache.append",
    chapter=12,
    reference=PagedKVCache,
    kind="module",
    section=PAGED,
    make_cases=lambda hidden: [_paged_case(name, "append")
                               for name in (_HIDDEN_SCHEDULES if hidden else _VISIBLE_SCHEDULES)],
    forbidden=("attnlib.PagedKVCache", "attnlib.paged.PagedKVCache"),
    mistakes=_APPEND_MISTAKES,
    extra_check=_append_schedule,
))

# ----------------------------------------------------------------------------- gather


def _gather_variant(cache: PagedKVCache, seq_id: Hashable, *, trim: bool = True, order: str = "table",
                    values: str = "v", heads_first: bool = True) -> tuple[Tensor, Tensor]:
    """``gather`` with one thing changed: ``trim=False`` (the whole last block returned),
    ``order="pool"`` (the blocks in increasing id order), ``values="k"`` (the keys twice),
    ``heads_first=False`` (the blocks reshaped to (H, tokens, D) without moving the head axis
    before the block axis)."""
    table = cache._tables[seq_id]
    length = cache._lengths[seq_id]
    idx = torch.tensor(sorted(table) if order == "pool" else table, dtype=torch.long)
    out = []
    for blocks in (cache.k_blocks, cache.k_blocks if values == "k" else cache.v_blocks):
        x = blocks.index_select(0, idx)  # (n_used, H, block_size, D)
        if heads_first:
            x = x.transpose(0, 1)  # (H, n_used, block_size, D)
        x = x.reshape(cache.n_kv_heads, -1, cache.head_dim)
        out.append(x[:, :length] if trim else x)
    return out[0], out[1]


def _gather_class(**variant: Any) -> type:
    def gather(self: PagedKVCache, seq_id: Hashable) -> tuple[Tensor, Tensor]:
        return _gather_variant(self, seq_id, **variant)
    return type("MistakenPagedKVCache", (PagedKVCache,), {"gather": gather})


_GATHER_MISTAKES = (
    Mistake(
        "the unused end of the last block not trimmed",
        "The last block of a sequence is full only when its length is a multiple of block_size; "
        "return the first seq_len(seq_id) tokens of the concatenated blocks, not every slot.",
        PAGED,
        _gather_class(trim=False),
    ),
    Mistake(
        "blocks read in pool order instead of block-table order",
        "Token t lives in block block_table(seq_id)[t // block_size]: read the blocks in the "
        "order of the block table, which after frees and reuses is not increasing.",
        PAGED,
        _gather_class(order="pool"),
    ),
    Mistake(
        "the keys returned as the values",
        "gather returns (keys, values): the values come from v_blocks.",
        PAGED,
        _gather_class(values="k"),
    ),
    Mistake(
        "blocks reshaped without moving the head axis first",
        "The pool is (n_blocks, n_kv_heads, block_size, head_dim): after picking the blocks, "
        "move the head axis in front (transpose(0, 1)) before merging the block and slot axes "
        "into one token axis; reshaping (n_used, H, block_size, D) straight to (H, -1, D) mixes "
        "heads and tokens.",
        PAGED,
        _gather_class(heads_first=False),
    ),
)


def _gather_after(cls: Callable[..., Any], case: Case, step: int, seq_id: Hashable) -> Any:
    """``gather(seq_id)`` of ``cls(*case.init_args)`` after the schedule's steps up to ``step``,
    appended by the reference's ``append``."""
    steps, values = _schedule_of(case)
    cache = cls(*case.init_args)
    for i in range(step + 1):
        _apply(cache, steps[i], values[i])
    return cache.gather(seq_id)


def _gather_step_exercise(case: Case, step: int, seq_id: Hashable) -> Exercise:
    return Exercise(
        id=f"PagedKVCache.gather (step {step + 1}, {seq_id!r})",
        chapter=12,
        reference=functools.partial(_gather_after, PagedKVCache, case, step, seq_id),
        section=PAGED,
        make_cases=lambda hidden: [],
        mistakes=tuple(Mistake(m.name, m.explanation, m.section,
                               functools.partial(_gather_after, m.fn, case, step, seq_id))
                       for m in _GATHER_MISTAKES),
    )


def _fill_like(cache: Any, ref: PagedKVCache) -> None:
    """Give ``cache`` (the learner's class, the reference's ``__init__``) the state of ``ref``:
    its pool, block tables, lengths and free list, as copies."""
    cache.k_blocks, cache.v_blocks = ref.k_blocks.clone(), ref.v_blocks.clone()
    cache._tables = {sid: list(table) for sid, table in ref._tables.items()}
    cache._lengths = dict(ref._lengths)
    cache._free = list(ref._free)


def _gather_schedule(student: Callable[..., Any], case: Case) -> str | None:
    """After every step of the case's schedule (appended by the reference), give a fresh
    instance of the learner's class the reference's state and judge its ``gather`` of every
    sequence in the cache; the result must be a copy, not a view of the pool."""
    steps, values = _schedule_of(case)
    ref = PagedKVCache(*case.init_args)
    for i, step in enumerate(steps):
        _apply(ref, step, values[i])
        for sid in _seq_ids(steps):
            if sid not in ref:
                continue
            where = (f"gather({sid!r}) after {_where(case, i)} (the cache filled by the reference's append; "
                     f"seq_len {ref.seq_len(sid)}, block_table {ref.block_table(sid)})")
            mine = student(*case.init_args)
            _fill_like(mine, ref)
            try:
                out = mine.gather(sid)
            except Exception as exc:  # the learner's code may raise anything
                return f"{where} raised {type(exc).__name__}: {exc}"
            if isinstance(out, list):
                out = tuple(out)
            result = judge(_gather_step_exercise(case, i, sid), Case(case.name), out)
            if not result.passed:
                return f"{where}: {result.message}"
            pool = {mine.k_blocks.untyped_storage().data_ptr(), mine.v_blocks.untyped_storage().data_ptr()}
            if any(t.numel() and t.untyped_storage().data_ptr() in pool for t in out):
                return (f"{where}: returned a view of the pool (k_blocks or v_blocks), not a copy: a later "
                        f"append would change it. index_select, indexing with a tensor of block ids, or "
                        f".clone() make a copy. See {section_url(PAGED)}.")
    return None


register(Exercise(
    id="PagedKVCache",  # grades gather (see the module's docstring)
    chapter=12,
    reference=PagedKVCache,
    kind="module",
    section=PAGED,
    # The case's own call is the schedule's first append (see the module's docstring): the
    # extra check judges gather on caches filled through the reference's state.
    make_cases=lambda hidden: [_paged_case(name, "append")
                               for name in (_HIDDEN_SCHEDULES if hidden else _VISIBLE_SCHEDULES)],
    forbidden=("attnlib.PagedKVCache", "attnlib.paged.PagedKVCache"),
    mistakes=_GATHER_MISTAKES,
    extra_check=_gather_schedule,
))

# ============================================================================ mla_absorbed_attention


def _mla_variant(*, latent_scale: bool = False, rope: bool = True, view: str = "hdr", causal: bool = True,
                 values_with: str = "w_uv", naive: bool = False) -> Callable[..., Tensor]:
    """Absorbed MLA with one thing changed: ``latent_scale`` (default scale from the latent's
    width), ``rope=False`` (the rope channels dropped), ``view="hrd"`` (the up-projections
    viewed as (H, kv_rank, head_dim)), ``causal=False`` (no mask), ``values_with="w_uk"`` (the
    values' up-projection done with W^UK), ``naive=True`` (right values, through per-head keys
    and values rebuilt from the latent)."""
    def wrong(q: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, w_uk: Tensor, w_uv: Tensor,
              is_causal: bool = True, scale: float | None = None) -> Tensor:
        B, H, T, D = q.shape
        R, r = c_kv.size(-1), q_rope.size(-1)
        if scale is None:
            scale = 1.0 / math.sqrt(R + r if latent_scale else D + r)

        def per_head(w: Tensor) -> Tensor:  # (H, head_dim, kv_rank): W_h
            return w.view(H, D, R) if view == "hdr" else w.view(H, R, D).transpose(1, 2)

        uk, uv = per_head(w_uk), per_head(w_uk if values_with == "w_uk" else w_uv)
        if naive:
            k = torch.einsum("bsr,hdr->bhsd", c_kv, uk)  # (B, H, S, head_dim): per-head keys
            scores = q @ k.transpose(-2, -1)  # (B, H, T, S)
        else:
            scores = torch.einsum("bhtd,hdr->bhtr", q, uk) @ c_kv[:, None].transpose(-2, -1)  # (B, H, T, S)
        if rope:
            scores = scores + q_rope @ k_rope[:, None].transpose(-2, -1)
        scores = scores * scale
        if causal and is_causal:
            S = c_kv.size(1)
            scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(), -math.inf)
        weights = torch.softmax(scores, dim=-1)  # (B, H, T, S)
        if naive:
            v = torch.einsum("bsr,hdr->bhsd", c_kv, uv)  # (B, H, S, head_dim): per-head values
            return weights @ v
        return torch.einsum("bhtr,hdr->bhtd", weights @ c_kv[:, None], uv)  # (B, H, T, head_dim)
    return wrong


_MLA_NAIVE = Mistake(
    "per-head keys and values rebuilt from the latent",
    "The values are right, but the function built each head's keys or values, c_kv W^UK_h^T or "
    "c_kv W^UV_h^T, for every cached token: the memory and work the latent cache exists to "
    "save. Absorb W^UK into the query instead, q_h W^UK_h (kv_rank numbers), and score it "
    "against c_kv itself; average the latents with the weights and apply W^UV_h to that "
    "average, once per query.",
    LATENT,
    _mla_variant(naive=True),
)

_MLA_MISTAKES = (
    Mistake(
        "default scale from the latent's width",
        "Absorption only re-associates the products: each score is still a head's "
        "[q_h; q^R_h] . [k_h; k^R], so scale=None means 1 / sqrt(head_dim + rope_dim), not "
        "1 / sqrt(kv_rank + rope_dim), the width of the vectors actually multiplied.",
        LATENT,
        _mla_variant(latent_scale=True),
    ),
    Mistake(
        "the rope channels left out of the scores",
        "The decoupled RoPE channels carry the positions: add q_rope . k_rope (the key shared by "
        "all heads) to each head's latent score before scaling.",
        LATENT,
        _mla_variant(rope=False),
    ),
    Mistake(
        "W^UK and W^UV viewed as (n_heads, kv_rank, head_dim)",
        "w_uk is (n_heads * head_dim, kv_rank) with head h's W^UK_h in rows h * head_dim .. "
        "(h + 1) * head_dim - 1: view it as (n_heads, head_dim, kv_rank). A view as "
        "(n_heads, kv_rank, head_dim) cuts the rows at the wrong places.",
        LATENT,
        _mla_variant(view="hrd"),
    ),
    Mistake(
        "no causal mask",
        "With is_causal=True query i sees keys 0..i only (top-left, as in the course): mask the "
        "scores above the diagonal before the softmax.",
        LATENT,
        _mla_variant(causal=False),
    ),
    Mistake(
        "W^UK used for the values",
        "The weights average the latents; each head then turns the average into its output with "
        "its value up-projection W^UV_h (w_uv), not with W^UK_h.",
        LATENT,
        _mla_variant(values_with="w_uk"),
    ),
    _MLA_NAIVE,
)


def _mla_case(name: str, seed: int, B: int, H: int, T: int, S: int, D: int, R: int, r: int,
              **kwargs: Any) -> Case:
    args = (randn(B, H, T, D, seed=seed), randn(B, H, T, r, seed=seed + 1), randn(B, S, R, seed=seed + 2),
            randn(B, S, r, seed=seed + 3), randn(H * D, R, seed=seed + 4, std=1 / math.sqrt(R)),
            randn(H * D, R, seed=seed + 5, std=1 / math.sqrt(R)))
    return Case(name, args, kwargs)


def _mla_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _mla_case("T = S = 6, causal, kv_rank 8 > head_dim 4, rope_dim 2", 1400, 2, 3, 6, 6, 4, 8, 2),
            _mla_case("decoding: 1 query against S = 9 cached latents, is_causal=False (no per-head keys "
                      "or values allowed)", 1410, 2, 4, 1, 9, 3, 5, 2, is_causal=False),
            _mla_case("kv_rank 3 < head_dim 6, no rope channels, scale = 0.3, T = 4, S = 7, is_causal=False "
                      "(no per-head keys or values allowed)", 1420, 1, 2, 4, 7, 6, 3, 0, is_causal=False,
                      scale=0.3),
        ]
    return [
        _mla_case("one head, rope_dim 4, T = S = 5, causal", 1430, 2, 1, 5, 5, 4, 6, 4),
        _mla_case("decoding against a single cached latent (S = 1)", 1440, 2, 3, 1, 1, 4, 5, 2, is_causal=False),
        _mla_case("kv_rank = head_dim = 4, T = 2 new queries, S = 10, causal (top-left)", 1450, 3, 2, 2, 10, 4, 4, 2),
        _mla_case("T = 7 queries > S = 3 keys, causal (top-left) (no per-head keys or values allowed)", 1460,
                  1, 2, 7, 3, 5, 4, 2),
        _mla_case("kv_rank 16 >> head_dim 2, T = 3, S = 13, is_causal=False, scale = 0.5 (no per-head keys or "
                  "values allowed)", 1470, 1, 5, 3, 13, 2, 16, 4, is_causal=False, scale=0.5),
        _mla_case("rope_dim 6 wider than head_dim 2, scale = 0.25, causal, T = S = 4", 1480, 2, 2, 4, 4, 2, 3, 6,
                  scale=0.25),
    ]


def _mla_sizes(case: Case) -> tuple[int, int, int] | None:
    """``(S, head_dim, n_heads * head_dim)`` when these sizes tell the axes apart: no other
    size of the case (B, n_heads, T, kv_rank, rope_dim, kv_rank + rope_dim) equals one of
    them, and S differs from head_dim and n_heads * head_dim; else None (no check)."""
    q, q_rope, c_kv = case.args[:3]
    B, H, T, D = q.shape
    S, R = c_kv.shape[1:]
    r = q_rope.size(-1)
    others = {B, H, T, R, r, R + r}
    if S in others | {D, H * D} or D in others or H * D in others:
        return None
    return S, D, H * D


def _mla_no_per_head_kv(student: Callable[..., Any], case: Case) -> str | None:
    """Run the learner's function under chapter 9's tensor recorder and fail it if it built a
    floating tensor with an axis of the S cached tokens and one of head_dim or
    n_heads * head_dim: per-head keys or values, (B, S, n_heads * head_dim) from a linear map
    of c_kv, (B, n_heads, S, head_dim) from an einsum, or one head's (B, S, head_dim) in a
    loop. Checked on the cases whose sizes tell these axes apart (:func:`_mla_sizes`)."""
    sizes = _mla_sizes(case)
    if sizes is None:
        return None
    S, D, HD = sizes
    args, kwargs = clone_args(case.args, case.kwargs)
    with torch.no_grad(), _TensorRecorder() as rec:
        student(*args, **kwargs)
    for shape, dtype in rec.tensors:
        if (dtype.is_floating_point or dtype.is_complex) and S in shape and (D in shape or HD in shape):
            return mistake_message(_MLA_NAIVE, f"built a tensor of shape {shape}, with an axis of the S = {S} "
                                               f"cached tokens and one of head_dim = {D} or n_heads * head_dim = {HD}")
    return None


register(Exercise(
    id="mla_absorbed_attention",
    chapter=12,
    reference=mla_absorbed_attention,
    section=LATENT,
    make_cases=_mla_cases,
    # The attention over the latents may use attnlib's scaled_dot_product_attention (chapter 2),
    # softmax or torch.softmax: every TransformerBlock calls them, and the absorption is the
    # point here. Off limits: attnlib's MLA (the module file as a whole) and PyTorch's fused kernel.
    forbidden=("attnlib.latent", "attnlib.mla_absorbed_attention", "attnlib.MultiHeadLatentAttention",
               "attnlib.mla_kv_cache_bytes", "torch.nn.functional.scaled_dot_product_attention"),
    mistakes=_MLA_MISTAKES,
    extra_check=_mla_no_per_head_kv,
))

# ============================================================================ sink_window_mask


def _sink_variant(*, reach: bool = False, sinks_see_future: bool = False, bottom_right: bool = False,
                  no_diagonal: bool = False, sinks: bool = True) -> Callable[..., Tensor]:
    """The mask with one thing changed: ``reach`` (``i - j <= window``), ``sinks_see_future``
    (``j < n_sink`` without ``j <= i``), ``bottom_right`` (query i at position i + S - L),
    ``no_diagonal`` (the window is the ``window`` keys before the query, not itself),
    ``sinks=False`` (no sinks)."""
    def wrong(L: int, window: int, n_sink: int, S: int | None = None) -> Tensor:
        S = L if S is None else S
        i = torch.arange(L)[:, None] + (S - L if bottom_right else 0)  # (L, 1)
        j = torch.arange(S)[None, :]  # (1, S)
        back = i - j
        if no_diagonal:
            near = (back >= 1) & (back <= window)
        else:
            near = (back >= 0) & ((back <= window) if reach else (back < window))
        sink = (j < n_sink) & (j <= i) if not sinks_see_future else (j < n_sink)
        return near | sink if sinks else near
    return wrong


def _sink_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            Case("L = 8, window 3, 2 sinks", (8, 3, 2)),
            Case("S = 10 > L = 6 (top-left), window 2, 1 sink", (6, 2, 1, 10)),
            Case("S = 4 < L = 7, window 2, 1 sink", (7, 2, 1, 4)),
            Case("window 1 (itself only), no sinks, L = 5", (5, 1, 0)),
        ]
    return [
        Case("window >= S: the causal mask", (6, 9, 1)),
        Case("window = S exactly, 2 sinks", (5, 5, 2)),
        Case("more sinks than queries (n_sink 7, L = 4)", (4, 2, 7)),
        Case("L = 0 (no queries)", (0, 3, 1)),
        Case("S = 0 (no keys), S as a keyword", (3, 2, 1), {"S": 0}),
        Case("L = S = 12, window 4, no sinks", (12, 4, 0)),
        Case("S = 16 > L = 9, window 3, 4 sinks, S as a keyword", (9, 3, 4), {"S": 16}),
        Case("L = 1 (one query), window 2, 1 sink, S = 5", (1, 2, 1, 5)),
    ]


register(Exercise(
    id="sink_window_mask",
    chapter=12,
    reference=sink_window_mask,
    section=SINKS,
    make_cases=_sink_cases,
    # The other masks are the learner's building blocks (causal_mask is also what every
    # TransformerBlock of this notebook calls); the ready-made window masks are off limits.
    forbidden=("attnlib.sink_window_mask", "attnlib.masks.sink_window_mask", "attnlib.sliding_window_mask",
               "attnlib.sparse.sliding_window_mask"),
    mistakes=(
        Mistake(
            "window off by one (i - j <= window)",
            "window counts the keys a query sees, itself included: keys i - window + 1 .. i, so "
            "i - j < window. With <= each query sees window + 1 recent keys.",
            SINKS,
            _sink_variant(reach=True),
        ),
        Mistake(
            "sinks in the future allowed (j < n_sink without j <= i)",
            "A sink is one of the first n_sink keys, seen by every query that comes after it; a "
            "query before it must not see it: the causal rule j <= i holds for the sinks too.",
            SINKS,
            _sink_variant(sinks_see_future=True),
        ),
        Mistake(
            "aligned bottom-right",
            "The mask is aligned top-left, as causal_mask and is_causal=True: query i is at "
            "position i whatever S is. Shifting the queries by S - L is the alignment of decoding "
            "with a cache.",
            "05_self_cross_masks.html#is-causal-when-l-s-top-left-or-bottom-right",
            _sink_variant(bottom_right=True),
        ),
        Mistake(
            "the query itself left out of the window",
            "The window is the window most recent keys including the query's own position: keys "
            "i - window + 1 .. i. Taking the window keys before it (i - window .. i - 1) drops the "
            "diagonal.",
            SINKS,
            _sink_variant(no_diagonal=True),
        ),
        Mistake(
            "sinks left out",
            "Besides the window, every query sees the first n_sink keys of the sequence (if they "
            "are not in its future): (j < n_sink) & (j <= i), joined to the window with |.",
            SINKS,
            _sink_variant(sinks=False),
        ),
    ),
))

# ============================================================================ TinyGPT.generate


@torch.no_grad()
def _generate_variant(m: TinyGPT, idx: Tensor, max_new_tokens: int, use_cache: bool = True, *,
                      extra: int = 0, first_position: bool = False, positions_axis: bool = False,
                      cache: str = "ok") -> Tensor:
    """Greedy decoding with one thing changed: ``extra`` tokens more (or fewer), the logits of
    the first position, the argmax over the positions axis of the logits, or the cache
    ``"ignored"`` or fed the ``"whole"`` sequence at every step."""
    n = max_new_tokens + extra
    if n <= 0:
        return idx
    caches = m.new_cache() if use_cache and cache != "ignored" else None
    logits = m(idx, kv_cache=caches)  # (B, T, vocab_size)
    for step in range(n):
        if positions_axis:
            next_token = logits.argmax(dim=1)[:, -1:]  # over the positions: (B, vocab_size) -> (B, 1)
        else:
            next_token = logits[:, 0 if first_position else -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat([idx, next_token], dim=1)
        if step + 1 < n:
            if caches is None:
                logits = m(idx)
            else:
                logits = m(idx if cache == "whole" else next_token, kv_cache=caches)
    return idx


def _generate_mistake(**variant: Any) -> Callable[..., Tensor]:
    def generate(m: TinyGPT, idx: Tensor, max_new_tokens: int, use_cache: bool = True) -> Tensor:
        return _generate_variant(m, idx, max_new_tokens, use_cache, **variant)
    return generate


_WHOLE_THROUGH_CACHE = Mistake(
    "the whole sequence fed through the cache at every step",
    "After the prefill the caches already hold every earlier token: feed only the new token, "
    "self(next_token, kv_cache=caches). Feeding the whole sequence again appends its keys and "
    "values a second time, at later positions.",
    GENERATION,
    _generate_mistake(cache="whole"),
)
_CACHE_IGNORED = Mistake(
    "use_cache ignored",
    "The tokens are right, but the model ran over the whole sequence at every step, without "
    "caches: with use_cache=True make one KVCache per block (self.new_cache()), run the prompt "
    "through them once, then each new token alone.",
    GENERATION,
    _generate_mistake(cache="ignored"),
)

_GENERATE_MISTAKES = (
    _WHOLE_THROUGH_CACHE,
    Mistake(
        "the logits of the first position",
        "logits[:, t] scores the token after position t: the next token comes from the last "
        "position, logits[:, -1].",
        GENERATION,
        _generate_mistake(first_position=True),
    ),
    Mistake(
        "one token too many",
        "The loop adds max_new_tokens tokens, no more: the result is (B, T + max_new_tokens).",
        GENERATION,
        _generate_mistake(extra=1),
    ),
    Mistake(
        "one token too few",
        "The loop adds max_new_tokens tokens: the prefill's logits give the first new token, "
        "and each forward after it one more; the result is (B, T + max_new_tokens).",
        GENERATION,
        _generate_mistake(extra=-1),
    ),
    Mistake(
        "argmax over the positions axis",
        "The logits are (B, T, vocab_size): the argmax is over the vocabulary, the last axis, of "
        "the last position's logits, logits[:, -1].argmax(dim=-1). logits.argmax(dim=1) takes it "
        "over the positions.",
        GENERATION,
        _generate_mistake(positions_axis=True),
    ),
    _CACHE_IGNORED,
)


def _gpt_state_dict(init_args: tuple, seed: int) -> dict[str, Tensor]:
    """Seeded float64 weights, N(0, 1/fan_in), the output head tied to the embedding (one
    tensor), every norm weight 1 + N(0, 0.25)."""
    sd = state_dict(TinyGPT, init_args, seed)
    sd["lm_head.weight"] = sd["tok_emb.weight"]
    d_model = init_args[1]
    for i, name in enumerate(sorted(n for n in sd if n.endswith(("norm1.weight", "norm2.weight", "norm.weight")))):
        sd[name] = 1.0 + randn(d_model, seed=seed * 100 + 90 + i, std=0.5)
    return sd


def _gpt_case(name: str, seed: int, B: int, T: int, max_new_tokens: int, vocab_size: int, d_model: int,
              n_heads: int, n_layers: int, max_len: int, n_kv_heads: int | None = None, **kwargs: Any) -> Case:
    init_args = (vocab_size, d_model, n_heads, n_layers, max_len, n_kv_heads)
    idx = torch.randint(0, vocab_size, (B, T), generator=generator(seed))
    return Case(name, (idx, max_new_tokens), kwargs, init_args=init_args,
                state_dict=_gpt_state_dict(init_args, seed), method="generate")


def _gpt_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _gpt_case("B = 2, a prompt of 5 tokens, 6 new tokens, use_cache=True", 1500, 2, 5, 6,
                      32, 16, 4, 2, 64, 2),
            _gpt_case("use_cache=False: B = 2, a prompt of 4 tokens, 5 new tokens", 1501, 2, 4, 5,
                      32, 16, 4, 2, 24, 2, use_cache=False),
            _gpt_case("reaching max_len exactly: a prompt of 3 + 9 new tokens = max_len = 12, MQA", 1502, 1, 3, 9,
                      40, 12, 2, 2, 12, 1),
        ]
    return [
        _gpt_case("a prompt of 1 token, 7 new tokens", 1510, 2, 1, 7, 32, 16, 4, 2, 16, 2),
        _gpt_case("max_new_tokens = 0: the prompt itself", 1511, 2, 4, 0, 32, 16, 4, 2, 16, 2),
        _gpt_case("use_cache=False, B = 3, reaching max_len exactly (5 + 3 = 8)", 1512, 3, 5, 3,
                  24, 8, 2, 1, 8, None, use_cache=False),
        _gpt_case("one new token (the prefill's logits only), 3 layers", 1513, 2, 6, 1, 32, 16, 4, 3, 16, 4),
        _gpt_case("B = 1, one layer, MHA, 10 new tokens, use_cache=True given", 1514, 1, 2, 10,
                  20, 8, 2, 1, 16, None, use_cache=True),
        _gpt_case("B = 4, a prompt of 1 token reaching max_len = 6, MQA", 1515, 4, 1, 5, 16, 12, 2, 2, 6, 1),
    ]


class _ForwardCounter(TorchFunctionMode):
    """The forward passes of a TinyGPT, seen through its token embedding: one entry per call of
    ``F.embedding`` with the model's embedding table, ``[T, cached]`` with ``T`` the tokens
    fed and ``cached`` whether the pass appended to a KV cache that held positions already
    (``KVCache.update`` concatenates 4-D keys along the sequence axis, -2). A torch function
    mode, as chapter 9's recorder: it sees the learner's calls however they are made."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = table
        self.calls: list[list] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.embedding:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is self.table:
                idx = args[0] if args else kwargs.get("input")
                self.calls.append([int(idx.shape[-1]) if idx.dim() else 1, False])
        elif func in (torch.cat, torch.concat, torch.concatenate) and self.calls:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            parts = [t for t in tree_flatten(tensors)[0] if isinstance(t, Tensor)]
            if parts and all(t.dim() == 4 for t in parts) and dim in (-2, 2) and parts[0].size(-2) > 0:
                self.calls[-1][1] = True
        return func(*args, **kwargs)


def _generate_calls(student: Callable[..., Any], case: Case) -> str | None:
    """Run the learner's generate again under :class:`_ForwardCounter` and check the forward
    passes: with ``use_cache=True`` the prompt once, then each new token alone through the
    caches (``max_new_tokens - 1`` of them: the last token needs no forward); with
    ``use_cache=False`` the whole sequence every step, without caches."""
    idx, max_new = case.args
    if max_new == 0:
        return None
    use_cache = case.kwargs.get("use_cache", True)
    model = _build_module(student, case)
    args, kwargs = clone_args(case.args, case.kwargs)
    with _ForwardCounter(model.tok_emb.weight) as rec:
        model.generate(*args, **kwargs)
    P = idx.size(1)
    sizes = [t for t, _ in rec.calls]
    cached = [c for _, c in rec.calls]
    growing = [P + i for i in range(max_new)]
    seen = (f"with use_cache={use_cache}, generate(prompt of {P} tokens, max_new_tokens={max_new}) ran the model "
            f"{len(sizes)} times, on {sizes} tokens, {sum(cached)} of them adding to a KV cache that held tokens "
            f"already (counted through the token embedding)")
    if use_cache:
        if sizes == [P] + [1] * (max_new - 1) and all(cached[1:]):
            return None
        if sizes == growing and not any(cached):
            return mistake_message(_CACHE_IGNORED, seen)
        if sizes == growing and all(cached[1:]):
            return mistake_message(_WHOLE_THROUGH_CACHE, seen)
        return (f"{seen}; expected the prompt once, then each new token alone through the caches: "
                f"{[P] + [1] * (max_new - 1)} tokens (the last new token needs no forward pass). "
                f"See {section_url(GENERATION)}.")
    if sizes == growing and not any(cached):
        return None
    return (f"{seen}; with use_cache=False expected the whole sequence at every step, without caches: "
            f"{growing} tokens (the last new token needs no forward pass). See {section_url(GENERATION)}.")


register(Exercise(
    id="TinyGPT.generate",
    chapter=12,
    reference=TinyGPT,
    kind="module",
    section=GENERATION,
    make_cases=_gpt_cases,
    # The reference's generate itself, by its undecorated function: a name that reaches the
    # class or its @torch.no_grad() methods would also forbid torch's decorator wrapper, whose
    # code every no_grad-decorated function shares (the notebook's TinyGPT too).
    forbidden=("attnlib.TinyGPT.generate.__wrapped__",),
    mistakes=_GENERATE_MISTAKES,
    extra_check=_generate_calls,
))
