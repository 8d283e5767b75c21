"""``PagedKVCache.append`` and ``PagedKVCache`` (``gather``): the append schedules their cases
name, the mistakes of each method, and the extra checks that drive a cache through a schedule."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from ....paged import PagedKVCache
from ...core import Case, Exercise, Mistake, judge, register, section_url
from ..common import F64, randn
from .sections import PAGED


def _step_message(where: str, result_message: str, description: str, section: str) -> str:
    """``where: ...`` with the mistake ``judge`` named, if it named one, else the description."""
    if result_message.startswith("Looks like "):
        named = result_message.split("\n(", 1)[0]
        return f"{where}: {named}\n({description})"
    return f"{where}: {description}. See {section_url(section)}."


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
    id="PagedKVCache",  # grades gather (see the package's docstring)
    chapter=12,
    reference=PagedKVCache,
    kind="module",
    section=PAGED,
    # The case's own call is the schedule's first append (see the package's docstring): the
    # extra check judges gather on caches filled through the reference's state.
    make_cases=lambda hidden: [_paged_case(name, "append")
                               for name in (_HIDDEN_SCHEDULES if hidden else _VISIBLE_SCHEDULES)],
    forbidden=("attnlib.PagedKVCache", "attnlib.paged.PagedKVCache"),
    mistakes=_GATHER_MISTAKES,
    extra_check=_gather_schedule,
))
