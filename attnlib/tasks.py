"""Train the tiny GPT on a synthetic task and look inside it: attention maps and induction
heads (chapter 12, "Putting it together, and the attention of today's LLMs").

The task is *repeated random sequences*: each row draws a period ``p`` and ``p`` distinct
random tokens, then repeats them, ``a b c d e | a b c d e | a b``. The tokens up to
position ``p`` cannot be predicted (nothing tells where the period ends); after it every next
token is the one that followed the current token the time before, which a model can only
find by looking back into its context. That is what
an *induction head* does (Olsson et al., 2022, "In-context Learning and Induction Heads",
Transformer Circuits Thread): at the second ``b``, a head attends to the position right
*after* the first ``b`` (the first ``c``) and copies its token. It takes two layers: a
*previous-token head* in layer 1 writes "my previous token was ``b``" into the position of
the first ``c``, so that the layer-2 head can match the current ``b`` against it. The period
varies from row to row; with a single period the answer always sits at the same distance
back, and a model with RoPE can learn that distance instead of an induction head.

* :func:`repeated_sequences`: the seeded task generator;
* :func:`predictable_positions`: the tokens that copying from the context predicts;
* :func:`train`: AdamW on next-token cross-entropy, returning a :class:`TrainHistory` (loss
  curve, held-out loss and accuracies, wall time);
* :func:`next_token_accuracy`: greedy accuracy on chosen positions;
* :func:`attention_maps`: every layer's attention weights, recomputed exactly as the model
  computes them (RoPE, GQA, causal mask);
* :func:`induction_score` and :func:`previous_token_score`: how much of each head's
  attention goes where an induction head, or a previous-token head, would look.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import check_floating, check_positive_int, check_tensor
from .attention import attention_weights
from .multihead import MultiHeadAttention
from .positional import apply_rope
from .transformer import TinyGPT

__all__ = [  # attnlib's public names from this module
    "repeated_sequences",
    "predictable_positions",
    "next_token_accuracy",
    "TrainHistory",
    "train",
    "attention_maps",
    "induction_score",
    "previous_token_score",
]


def repeated_sequences(n: int, vocab_size: int, seq_len: int, period: int | tuple[int, int],
                       generator: torch.Generator | None = None) -> Tensor:
    """A batch of random sequences that repeat themselves (chapter 12).

    Row ``b`` draws a period ``p_b`` and ``p_b`` *distinct* tokens uniformly from
    ``0 .. vocab_size - 1``, then repeats them until it is ``seq_len`` long:
    ``x[b, t] = x[b, t % p_b]``. The tokens up to position ``p_b`` cannot be predicted
    (nothing tells where the period ends); every token after position ``p_b`` can, by
    finding the earlier occurrence of the current token and copying the token that followed
    it (an induction head). Distinct tokens make that earlier occurrence unique.

    With one fixed period, ``seq_len = 2 * period`` gives sequences whose second half equals
    the first, but then the answer always sits ``period - 1`` positions back, and a model
    with RoPE can learn that fixed offset instead of an induction head. A range of periods
    rules that shortcut out.

    Args:
        n: number of sequences.
        vocab_size: number of token ids; at least the largest period.
        seq_len: length of each sequence; larger than the largest period.
        period: an int (every row), or ``(lo, hi)``: each row's period drawn uniformly
            from ``lo .. hi`` inclusive.
        generator: a seeded ``torch.Generator`` for reproducible batches (``None``: the
            global random state).

    Returns:
        ``(n, seq_len)`` token ids, ``torch.long``.
    """
    check_positive_int(n, "n")
    check_positive_int(vocab_size, "vocab_size")
    check_positive_int(seq_len, "seq_len")
    lo, hi = _period_range(period)
    if hi > vocab_size:
        raise ValueError(f"a period of {hi} distinct tokens needs vocab_size >= {hi}, "
                         f"got vocab_size={vocab_size}")
    if hi >= seq_len:
        raise ValueError(f"seq_len ({seq_len}) must exceed the largest period ({hi}), "
                         f"or nothing repeats")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    periods = torch.randint(lo, hi + 1, (n, 1), generator=generator)  # (n, 1)
    noise = torch.rand(n, vocab_size, generator=generator)  # (n, vocab_size)
    tokens = noise.argsort(dim=-1)[:, :hi]  # (n, hi): distinct, a random permutation cut
    t = torch.arange(seq_len)  # (T,)
    return tokens.gather(1, t % periods)  # (n, T): x[b, t] = tokens[b, t % p_b]


def _period_range(period: object) -> tuple[int, int]:
    """``period`` as ``(lo, hi)`` with ``1 <= lo <= hi``, or a clear error."""
    if isinstance(period, tuple) and len(period) == 2:
        lo = check_positive_int(period[0], "period[0]")
        hi = check_positive_int(period[1], "period[1]")
        if lo > hi:
            raise ValueError(f"period (lo, hi) needs lo <= hi, got {period}")
        return lo, hi
    if isinstance(period, tuple):
        raise ValueError(f"period must be an int or a pair (lo, hi), got {period}")
    if isinstance(period, bool) or not isinstance(period, int):
        raise TypeError(f"period must be an int or a pair (lo, hi) of ints, "
                        f"got {type(period).__name__}")
    check_positive_int(period, "period")
    return period, period


def predictable_positions(idx: Tensor) -> Tensor:
    """Where a token can be predicted by copying from the context (chapter 12).

    Position ``p`` is predictable when token ``p - 1`` occurred earlier in its row: a model
    that finds that earlier occurrence and copies what followed it predicts token ``p`` (for
    :func:`repeated_sequences`, exactly; in general, if the context repeats itself). These
    are the predictions an induction head makes, and they are what
    :func:`induction_score` looks at (from position ``p - 1``).

    Args:
        idx: ``(B, T)`` integer token ids.

    Returns:
        ``(B, T)`` bool; position 0 is never predictable. For :func:`repeated_sequences`,
        row ``b`` is True from position ``p_b + 1`` on.
    """
    seen = _earlier_occurrences(_check_idx(idx)).any(dim=-1)  # (B, T): token t seen before
    return torch.cat([torch.zeros_like(seen[:, :1]), seen[:, :-1]], dim=1)  # (B, T)


def _earlier_occurrences(idx: Tensor) -> Tensor:
    """``(B, T, T)`` bool: ``[b, t, s]`` is True when ``s < t`` and ``idx[b, s] == idx[b, t]``."""
    T = idx.size(1)
    same = idx[:, :, None] == idx[:, None, :]  # (B, T, T)
    earlier = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril(-1)  # (T, T): s < t
    return same & earlier  # (B, T, T)


def _check_idx(idx: object) -> Tensor:
    """Raise unless ``idx`` is a ``(B, T)`` integer tensor."""
    check_tensor(idx, "idx", min_ndim=0)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    if idx.ndim != 2:
        raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
    return idx


@torch.no_grad()
def next_token_accuracy(model: nn.Module, idx: Tensor, where: Tensor | None = None) -> float:
    """Greedy next-token accuracy of a language model on a batch (chapter 12).

    Token ``p`` counts as right when it is the argmax of the logits at position ``p - 1``.

    Args:
        model: maps ``(B, T)`` token ids to ``(B, T, vocab)`` logits.
        idx: ``(B, T)`` token ids.
        where: optional ``(B, T)`` bool: the positions to score, e.g.
            :func:`predictable_positions` or its negation; position 0 (never predicted) is
            always left out. ``None``: positions ``1 .. T - 1``.

    Returns:
        The fraction of scored tokens predicted right (NaN if none is scored).
    """
    _check_idx(idx)
    scored = torch.ones_like(idx, dtype=torch.bool)  # (B, T)
    if where is not None:
        check_tensor(where, "where", min_ndim=0)
        if where.dtype != torch.bool or where.shape != idx.shape:
            raise ValueError(f"where must be a bool tensor of idx's shape {tuple(idx.shape)}, "
                             f"got {where.dtype} {tuple(where.shape)}")
        scored = where
    logits = model(idx)  # (B, T, vocab)
    hits = logits[:, :-1].argmax(dim=-1) == idx[:, 1:]  # (B, T - 1): token p right, p >= 1
    scored = scored[:, 1:]  # (B, T - 1)
    return (hits & scored).sum().item() / scored.sum().item() if scored.any() else float("nan")


@dataclass
class TrainHistory:
    """What :func:`train` measured (chapter 12).

    Attributes:
        losses: the training loss of every step, in order.
        eval_loss: the loss on the held-out batch after training.
        accuracy_predictable: greedy accuracy on the held-out tokens that copying from
            the context can predict (:func:`predictable_positions`); NaN if there are none.
        accuracy_other: greedy accuracy on the other held-out tokens (position 0 aside).
        seconds: wall time of the training steps (the held-out evaluation excluded).
    """

    losses: list[float]
    eval_loss: float
    accuracy_predictable: float
    accuracy_other: float
    seconds: float


def train(model: nn.Module, task: Callable[..., Tensor], steps: int, lr: float,
          batch_size: int = 32, seed: int = 0, n_eval: int = 256) -> TrainHistory:
    """Train a language model on fresh batches of a synthetic task with AdamW (chapter 12).

    Each step draws a new batch ``task(batch_size, generator=g)`` (``(B, T)`` token ids),
    computes the next-token cross-entropy of ``model(batch)`` (``(B, T, vocab)`` logits)
    and takes one AdamW step (``betas=(0.9, 0.95)``, ``weight_decay=0.01``, gradients
    clipped to norm 1) at a constant learning rate. The loss averages every prediction
    (tokens ``1 .. T - 1``), as a language model is trained. On :func:`repeated_sequences`
    the new tokens keep it above a floor (a new token at position ``t`` is one of
    ``vocab_size - t`` unseen ones: at least ``ln(vocab_size - t)`` nats on average) and
    only the predictable tokens can reach zero, so the :class:`TrainHistory` reports the
    accuracy on the two kinds of token apart.

    Everything random is seeded by ``seed`` through one generator: it first draws the
    ``n_eval`` held-out sequences, then every training batch, so the held-out rows are never
    trained on. The model's initial weights are the caller's (``torch.manual_seed`` before
    building it), and so is ``torch.set_num_threads``.

    Args:
        model: maps ``(B, T)`` token ids to ``(B, T, vocab)`` logits, e.g. a
            :class:`attnlib.TinyGPT`; trained in place.
        task: called as ``task(n, generator=g)``, returns ``(n, T)`` token ids, e.g.
            ``functools.partial(repeated_sequences, vocab_size=64, seq_len=32,
            period=(8, 15))``.
        steps: number of optimiser steps.
        lr: the AdamW learning rate.
        batch_size: sequences per step.
        seed: seeds the task's generator.
        n_eval: number of held-out sequences.

    Returns:
        A :class:`TrainHistory`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(task):
        raise TypeError(f"task must be callable as task(n, generator=g), "
                        f"got {type(task).__name__}")
    check_positive_int(steps, "steps")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(seed, "seed", allow_zero=True)
    check_positive_int(n_eval, "n_eval")

    generator = torch.Generator().manual_seed(seed)
    held_out = _draw(task, n_eval, generator)  # (n_eval, T), drawn first: never trained on
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.01)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        batch = _draw(task, batch_size, generator)  # (B, T)
        loss = _next_token_loss(model(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start

    with torch.no_grad():
        eval_loss = _next_token_loss(model(held_out), held_out).item()
    predictable = predictable_positions(held_out)  # (n_eval, T)
    return TrainHistory(losses, eval_loss, next_token_accuracy(model, held_out, predictable),
                        next_token_accuracy(model, held_out, ~predictable), seconds)


def _draw(task: Callable[..., Tensor], n: int, generator: torch.Generator) -> Tensor:
    """One batch from ``task``, checked: ``(n, T)`` integer token ids with ``T >= 2``."""
    batch = task(n, generator=generator)
    if not isinstance(batch, Tensor) or batch.dtype not in (torch.long, torch.int32):
        raise TypeError("task(n, generator=g) must return a tensor of token ids (torch.long)")
    if batch.ndim != 2 or batch.size(0) != n or batch.size(1) < 2:
        raise ValueError(f"task(n, generator=g) must return (n={n}, T) token ids with T >= 2, "
                         f"got shape {tuple(batch.shape)}")
    return batch


def _next_token_loss(logits: Tensor, idx: Tensor) -> Tensor:
    """Mean cross-entropy of tokens ``1 .. T - 1`` of ``idx`` given the logits one
    position earlier."""
    pred = logits[:, :-1]  # (B, T - 1, vocab): position p - 1 predicts token p
    return F.cross_entropy(pred.reshape(-1, pred.size(-1)), idx[:, 1:].reshape(-1))


@torch.no_grad()
def attention_maps(model: TinyGPT, idx: Tensor) -> list[Tensor]:
    """The attention weights of every head of every layer of a :class:`attnlib.TinyGPT`
    (chapter 12).

    A forward pre-hook on each block's :class:`attnlib.MultiHeadAttention` records the
    input it receives during ``model(idx)``; from that input the weights are recomputed
    exactly as the module computes them: ``q = q_proj(x)``, ``k = k_proj(x)`` split into
    heads, both rotated by :func:`attnlib.apply_rope` at positions ``0 .. T - 1``, then
    :func:`attnlib.attention_weights` with the causal mask, query head ``h`` reading key
    head ``h // (n_heads // n_kv_heads)`` (GQA). For the model's own (manual) attention
    path the result is bit for bit the weights it multiplies the values by.

    Args:
        model: a :class:`attnlib.TinyGPT`.
        idx: ``(B, T)`` token ids.

    Returns:
        One ``(B, n_heads, T, T)`` tensor per layer; row ``t`` of head ``h`` is how query
        ``t`` spreads its attention over keys ``0 .. t`` (it sums to 1; keys after ``t``
        get 0).
    """
    if not isinstance(model, TinyGPT):
        raise TypeError(f"model must be an attnlib.TinyGPT, got {type(model).__name__}")
    inputs: list[Tensor] = []
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in model.blocks]
    try:
        model(idx)  # validates idx; each hook records its block's attention input
    finally:
        for hook in hooks:
            hook.remove()
    return [_causal_weights(block.attn, x) for block, x in zip(model.blocks, inputs)]


def _causal_weights(attn: MultiHeadAttention, x: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) of causal self-attention, as ``attn`` computes it."""
    q = attn.split_heads(attn.q_proj(x), attn.n_heads)  # (B, H, T, D)
    k = attn.split_heads(attn.k_proj(x), attn.n_kv_heads)  # (B, H_kv, T, D)
    if attn.rope_base is not None:
        positions = torch.arange(x.size(1), device=x.device)  # (T,)
        q = apply_rope(q, positions, attn.rope_base)  # (B, H, T, D)
        k = apply_rope(k, positions, attn.rope_base)  # (B, H_kv, T, D)
    return attention_weights(q, k, is_causal=True,
                             enable_gqa=attn.n_kv_heads != attn.n_heads)  # (B, H, T, T)


def induction_score(weights: Tensor, idx: Tensor) -> Tensor:
    """How much each head attends where an induction head would (chapter 12).

    For a query at position ``t`` whose token occurred before, at positions ``s < t`` with
    ``idx[s] == idx[t]``, an induction head attends to ``s + 1``: the token that followed
    the earlier occurrence, which it then predicts (Olsson et al., 2022). The score of a
    head is the attention it gives to those positions (summed over them, when the token
    occurred more than once), averaged over every such query of the batch; queries whose
    token is new are left out. On :func:`repeated_sequences` the queries are the whole
    positions ``t >= p_b`` of row ``b``, and ``s + 1 = t - p_b + 1`` (also ``t - 2 p_b + 1``,
    ..., when the row repeats more than twice).

    A perfect induction head scores 1; a head that spreads its attention uniformly over
    keys ``0 .. t`` scores the mean of ``1 / (t + 1)`` over the queries (for one earlier
    occurrence).

    Args:
        weights: ``(B, H, T, T)`` attention weights, e.g. a layer of
            :func:`attention_maps`.
        idx: ``(B, T)`` the token ids the weights were computed on.

    Returns:
        ``(H,)`` one score per head, in ``weights``' dtype.
    """
    _check_weights(weights)
    B, H, T, _ = weights.shape
    _check_idx(idx)
    if tuple(idx.shape) != (B, T):
        raise ValueError(f"idx must be (B, T) = {(B, T)} to match weights "
                         f"{tuple(weights.shape)}, got {tuple(idx.shape)}")
    match = _earlier_occurrences(idx)  # (B, T, T): s < t holds the token of t
    target = torch.zeros_like(match)  # (B, T, T): the keys s + 1 after those s
    target[:, :, 1:] = match[:, :, :-1]
    n_queries = int(match.any(dim=-1).sum())  # queries whose token was seen before
    if n_queries == 0:
        raise ValueError("no token of idx occurs twice in its row: the induction score is "
                         "undefined (use repeated_sequences)")
    on_target = (weights * target[:, None].to(weights.dtype)).sum(dim=-1)  # (B, H, T)
    return on_target.sum(dim=(0, 2)) / n_queries  # (H,): rows of new tokens add 0


def previous_token_score(weights: Tensor) -> Tensor:
    """How much each head attends to the previous token (chapter 12).

    The attention from position ``t`` to position ``t - 1``, averaged over every query
    ``t = 1 .. T - 1`` of the batch. A previous-token head, the first half of the
    two-layer induction circuit (Olsson et al., 2022), scores close to 1; a head that
    spreads its attention uniformly over keys ``0 .. t`` scores the mean of ``1 / (t + 1)``.

    Args:
        weights: ``(B, H, T, T)`` attention weights with ``T >= 2``.

    Returns:
        ``(H,)`` one score per head, in ``weights``' dtype.
    """
    _check_weights(weights)
    if weights.size(-1) < 2:
        raise ValueError(f"weights must have T >= 2 positions, got shape "
                         f"{tuple(weights.shape)}")
    previous = weights.diagonal(offset=-1, dim1=-2, dim2=-1)  # (B, H, T - 1): t -> t - 1
    return previous.mean(dim=(0, 2))  # (H,)


def _check_weights(weights: object) -> None:
    """Raise unless ``weights`` is a floating-point ``(B, H, T, T)`` tensor."""
    check_tensor(weights, "weights", min_ndim=4)
    check_floating(weights, "weights")
    if weights.ndim != 4 or weights.size(-1) != weights.size(-2) or weights.size(-1) == 0:
        raise ValueError(f"weights must be (B, H, T, T) attention weights, "
                         f"got shape {tuple(weights.shape)}")
