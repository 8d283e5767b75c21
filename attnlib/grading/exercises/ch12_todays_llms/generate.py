"""``TinyGPT.generate``: its cases and mistakes, and the count of the model's forward passes
(its extra check)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ....transformer import TinyGPT
from ...core import Case, Exercise, Mistake, mistake_message, register, section_url
from ..ch06_mqa_gqa import _build_module
from ..common import clone_args, generator, randn, state_dict
from .sections import GENERATION


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
