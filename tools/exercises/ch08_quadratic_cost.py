"""Chapter 8's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/08_quadratic_cost/`` and
``notebooks/08_quadratic_cost/`` from this file (see ``tools/exercises/__init__.py``); the
cases and named mistakes that grade the notebook are in
``attnlib/grading/exercises/ch08_quadratic_cost.py``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from . import Exercise

INTRO = r"""
You count what attention costs: the bytes of one score matrix and the FLOPs of its two
matrix products. Both grow as $L \times S$."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = ""


# attention_score_bytes ----------------------------------------------------------------

def attention_score_bytes(
    L: int,
    S: int,
    n_heads: int = 1,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
) -> int:
    return dtype.itemsize * batch * n_heads * L * S


# Slow: a formula with nothing to vectorise; written as a learner might, a Python loop over the
# batch and the heads adding the bytes of each (L, S) matrix.
def slow_attention_score_bytes(
    L: int,
    S: int,
    n_heads: int = 1,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
) -> int:
    total = 0
    for b in range(batch):
        for h in range(n_heads):
            total += L * S * dtype.itemsize  # one (L, S) score matrix
    return total



# attention_flops ----------------------------------------------------------------------

def attention_flops(
    L: int,
    S: int,
    head_dim: int,
    n_heads: int = 1,
    batch: int = 1,
    head_dim_v: int | None = None,
) -> int:
    dv = head_dim if head_dim_v is None else head_dim_v
    per_head = 2 * L * S * head_dim + 2 * L * S * dv  # Q K^T, then P V
    return batch * n_heads * per_head


def explore_attention_flops() -> None:
    """Memory of one fp16 score matrix and FLOPs against the sequence length."""
    lengths = [2 ** p for p in range(10, 18)]
    gib = [attention_score_bytes(n, n, 32, 1, torch.float16) / 2**30 for n in lengths]
    tflop = [attention_flops(n, n, 128, 32) / 1e12 for n in lengths]
    for n, g, t in zip(lengths, gib, tflop):
        print(f"L = S = {n:6d}: {g:9.2f} GiB of scores, {t:9.2f} TFLOP")
    plt.loglog(lengths, gib, "o-", label="score bytes (GiB)")
    plt.loglog(lengths, tflop, "s-", label="FLOPs (T)")
    plt.xlabel("sequence length"); plt.legend(); plt.show()


# Slow: a formula with nothing to vectorise; written as a learner might, a Python loop over the
# batch and the heads adding the FLOPs of each of the two products, term by term.
def slow_attention_flops(
    L: int,
    S: int,
    head_dim: int,
    n_heads: int = 1,
    batch: int = 1,
    head_dim_v: int | None = None,
) -> int:
    dv = head_dim if head_dim_v is None else head_dim_v
    total = 0
    for b in range(batch):
        for h in range(n_heads):
            total += 2 * L * S * head_dim  # Q K^T: L * S dot products of head_dim multiply-adds
            total += 2 * L * dv * S  # P V: L * dv dot products of S multiply-adds
    return total


EXERCISES = [
    Exercise(
        "attention_score_bytes",
        points=2,
        solution=attention_score_bytes,
        guide="""\
Return the bytes of **one** score matrix of shape `(batch, n_heads, L, S)` at `dtype`'s
bytes per element (Chapter 8, section *How many scores: from 1K to 128K tokens*): no
queries, keys, values or outputs, and not the scores and the weights together. A Python
`int`.""",
        hints=(
            "`dtype.itemsize` is the number of bytes per element.",
        ),
        slow=slow_attention_score_bytes,
    ),
    Exercise(
        "attention_flops",
        points=3,
        solution=attention_flops,
        guide=r"""
Count the FLOPs of the two matrix products of attention, $QK^\top$ and $PV$ (Chapter 8,
section *The maths*), at 2 FLOPs per multiply-add: $QK^\top$ has $L \cdot S$ entries of
`head_dim` multiply-adds, $PV$ has $L \cdot$ `head_dim_v` entries of $S$ multiply-adds, per
batch element and head. Nothing else is counted (no softmax, no projections). `head_dim_v`
defaults to `head_dim`. A Python `int`.""",
        hints=(
            "With `head_dim_v == head_dim` the total is `4 * L * S * head_dim * n_heads * batch`.",
        ),
        explore=explore_attention_flops,
        slow=slow_attention_flops,
    ),
]
