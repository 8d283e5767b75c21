"""Measuring cost: wall time, CPU time, FLOPs and peak tensor memory of a call, and the
growth rate of a cost (chapters 1, 6, 8, 9, 10). Chapters import these rather than define
their own, so that every chapter measures the same way.

``peak_memory_bytes`` counts the bytes of every tensor storage that PyTorch operations create
while the call runs, minus those freed again, and reports the highest level reached. It is
deterministic (the same number every run, whatever else the machine does), which makes it
fit for asserting growth rates in the book. It sees tensors, not the scratch buffers a
kernel may use internally, nor memory held by Python objects; the benchmark script in
``benchmarks/`` measures whole-process peak memory instead.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _StorageTracker(TorchDispatchMode):
    """Adds up the bytes of storages created under it, and subtracts them when freed."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.live: dict[int, int] = {}  # data_ptr -> nbytes of storages created here

    def _freed(self, ptr: int, nbytes: int) -> None:
        if self.live.pop(ptr, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self.live:
                continue  # a view of an existing tensor, or already counted
            self.live[ptr] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, ptr, nbytes)
        return out


def peak_memory_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensor storage allocated while ``fn()`` runs, above the level at its start.

    The result of ``fn`` counts while it is alive inside the call (it is dropped at the end).
    Example: naive attention at ``L = S = 1024`` in fp32 allocates the ``(L, S)`` score matrix
    (4 MiB) and a few copies of it; flash attention only tiles.
    """
    tracker = _StorageTracker()
    with torch.no_grad(), tracker:
        result = fn()
    del result
    return tracker.peak


def _median_time(fn: Callable[[], Any], clock: Callable[[], float], repeats: int,
                 warmup: int) -> float:
    """Median of ``repeats`` timings of ``fn()`` by ``clock``, after ``warmup`` runs."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = clock()
            fn()
            times.append(clock() - start)
    return statistics.median(times)


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs, after ``warmup`` runs.

    Timings depend on the machine and on what else runs on it: compare methods measured in
    the same process, and trust ratios and growth rates more than absolute numbers.
    """
    return _median_time(fn, time.perf_counter, repeats, warmup)


def cpu_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median CPU time of ``fn()`` in seconds, for this process, after ``warmup`` runs.

    Unlike :func:`time_call` it does not count the time the process waits while other
    programs use the cores, so growth rates fitted to it are steadier on a shared machine.
    On one thread (``torch.set_num_threads(1)``) it approximates the work done.
    """
    return _median_time(fn, time.process_time, repeats, warmup)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log(y)`` against ``log(x)``: the exponent p in y ~ x^p.

    A cost that grows linearly has slope 1, a quadratic one slope 2.
    """
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need two or more (x, y) pairs of equal count, got {len(xs)} and {len(ys)}")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("loglog_slope needs positive xs and ys")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    spread = sum((a - mx) ** 2 for a in lx)
    if spread == 0:
        raise ValueError("loglog_slope needs at least two different xs")
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / spread


def _bmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """In-place batched matmul (``baddbmm_``, used by some kernels): 2 * B * M * K * N."""
    b, m, k = a_shape
    return 2 * b * m * k * b_shape[-1]


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """PyTorch's fused CPU attention kernel: the two matmuls Q K^T and P V."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)


def matmul_flops(fn: Callable[[], Any]) -> int:
    """Matrix-multiplication FLOPs of ``fn()`` (a multiply-add counts 2), as counted by
    ``torch.utils.flop_counter.FlopCounterMode``, with formulas added for the two operations
    it does not know: in-place ``baddbmm_`` and the fused CPU attention kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    extra = {aten.baddbmm_: _bmm_inplace_flops,
             aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return counter.get_total_flops()


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor PyTorch operations produce while it is active
    (chapter 9: the check that a tiled algorithm never builds an ``L x S`` matrix).

    Use as ``with ShapeRecorder() as rec: fn()``; then ``rec.shapes`` lists every output
    shape in order, ``rec.calls`` counts the operations by name (``"bmm"``, ``"exp"``...),
    and ``rec.quadratic(L, S)`` returns the shapes that hide an ``L x S`` matrix.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out

    def quadratic(self, L: int, S: int | None = None) -> list[tuple[int, ...]]:
        """Shapes whose two trailing dims are both at least ``min(L, S)``: a score matrix,
        whole or in disguise. Tiles smaller than that pass."""
        return quadratic_shapes(self.shapes, L, S)


def quadratic_shapes(shapes: list[tuple[int, ...]], L: int, S: int | None = None) -> list[tuple[int, ...]]:
    """The ``shapes`` whose two trailing dims are both at least ``min(L, S)`` (see
    :meth:`ShapeRecorder.quadratic`)."""
    n = min(L, L if S is None else S)
    return [s for s in shapes if len(s) >= 2 and s[-1] >= n and s[-2] >= n]
