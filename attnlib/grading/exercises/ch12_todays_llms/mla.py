"""``mla_absorbed_attention``: its cases and mistakes, and the check that no per-head keys or
values are built from the latent (its extra check)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ....latent import mla_absorbed_attention
from ...core import Case, Exercise, Mistake, mistake_message, register
from ..ch09_flash_attention import _TensorRecorder
from ..common import clone_args, randn
from .sections import LATENT


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
