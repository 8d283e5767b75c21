"""Graded exercises of chapters 1-5: the cases and the catalogue of common mistakes.

=====  ==================================  ==========================================
ch.    exercise id                          reference
=====  ==================================  ==========================================
1      ``ElmanRNN``                         :class:`attnlib.ElmanRNN` (``forward``)
1      ``hidden_state_gradient_norms``      :func:`attnlib.hidden_state_gradient_norms`
2      ``softmax``                          :func:`attnlib.softmax`
2      ``scaled_dot_product_attention``     :func:`attnlib.scaled_dot_product_attention`
3      ``attention_weights``                :func:`attnlib.attention_weights`
3      ``attention_entropy``                :func:`attnlib.attention_entropy`
4      ``MultiHeadAttention.split_heads``   :class:`attnlib.MultiHeadAttention`
4      ``MultiHeadAttention.merge_heads``   :class:`attnlib.MultiHeadAttention`
4      ``MultiHeadAttention.forward``       :class:`attnlib.MultiHeadAttention` (incl.
                                            the cross-attention cases of chapter 5)
5      ``causal_mask``                      :func:`attnlib.causal_mask`
5      ``padding_mask``                     :func:`attnlib.padding_mask`
=====  ==================================  ==========================================

``hidden_state_gradient_norms`` takes a model, which a case cannot carry across a process
boundary: its cases hold the model's name, constructor arguments and weights instead, and the
exercise's ``build_args`` builds the model wherever the function is called.

Module exercises load the reference's weights by name (``input_proj``/``hidden_proj``,
``q_proj``/``k_proj``/``v_proj``/``o_proj``), so the learner's class keeps the reference's
``__init__``; the graded part is the method named by the exercise id (``forward`` for
``ElmanRNN``). Every mistake below is a function with the reference's signature, or for
modules ``fn(module, *args)`` where ``module`` is built from the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

import attnlib
from attnlib.multihead import MultiHeadAttention as _MultiHeadAttention
from attnlib.rnn import ElmanRNN as _ElmanRNN

from .core import Case, Exercise, Mistake, register

F64 = torch.float64

# Sections of the book the feedback points to.
CH1_MATHS = "01_recurrence.html#a-recurrence-and-its-gradient"
CH1_CODE = "01_recurrence.html#the-code"
CH1_FADES = "01_recurrence.html#the-gradient-fades-geometrically-through-a-recurrence-not-through-attention"
CH2_SOFTMAX = "02_queries_keys_values.html#a-softmax-that-cannot-overflow"
CH2_ALL = "02_queries_keys_values.html#all-queries-at-once"
CH3_VARIANCE = "03_scaling.html#the-variance-of-a-dot-product"
CH3_CODE = "03_scaling.html#the-code"
CH3_GRADIENT = "03_scaling.html#why-large-logits-stop-the-gradient"
CH3_SATURATES = "03_scaling.html#without-the-scale-the-softmax-saturates"
CH4_MATHS = "04_multi_head.html#the-maths"
CH4_CODE = "04_multi_head.html#the-code"
CH5_MATHS = "05_self_cross_masks.html#the-maths"
CH5_SHAPES = "05_self_cross_masks.html#self-attention-and-cross-attention-the-shapes"
CH5_CONVENTIONS = "05_self_cross_masks.html#two-boolean-conventions-one-operation"
CH5_CAUSAL = "05_self_cross_masks.html#is-causal-when-l-s-top-left-or-bottom-right"
CH5_PADDING = "05_self_cross_masks.html#padding-masks-for-a-batch-of-unequal-lengths"
CH5_FULLY_MASKED = "05_self_cross_masks.html#what-a-fully-masked-row-does"

NO_ATTNLIB = ("attnlib",)
NO_SOFTMAX = ("torch.softmax", "torch.nn.functional.softmax", "torch.Tensor.softmax",
              "torch.special.softmax", "torch.nn.Softmax")
NO_FUSED = ("torch.nn.functional.scaled_dot_product_attention",)
# The heads exercises may reuse an attention function (their own, attnlib's or PyTorch's);
# only ready-made multi-head modules are off limits.
NO_MHA = ("attnlib.MultiHeadAttention", "torch.nn.MultiheadAttention",
          "torch.nn.functional.multi_head_attention_forward")


# --------------------------------------------------------------------------- helpers


def _randn(*shape: int, seed: int, std: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    """Seeded standard-normal tensor (its own generator; the global RNG is not touched)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * std).to(dtype)


def _rand_bool(*shape: int, seed: int, p: float = 0.6) -> Tensor:
    """Random boolean mask, ``True`` with probability ``p``, with the last key always True
    on every row so that no row is fully masked by accident."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(*shape, generator=g) < p
    m[..., 0] = True
    return m


def _state_dict(cls: type, init_args: tuple, seed: int, dtype: torch.dtype = F64) -> dict[str, Tensor]:
    """Random weights for ``cls(*init_args)``: each tensor N(0, 1/fan_in), seeded."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in cls(*init_args).state_dict().items()}
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        fan_in = shape[-1] if len(shape) > 1 else shape[0]
        out[name] = _randn(*shape, seed=seed * 100 + i, std=1.0 / math.sqrt(fan_in), dtype=dtype)
    return out


def _naive_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax with the max subtracted but no guard for all -inf rows (0/0 = NaN there)."""
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def _scores(query: Tensor, key: Tensor, scale: float | None) -> Tensor:
    s = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    return (query @ key.transpose(-2, -1)) * s


def _softmax(x: Tensor, dim: int = -1) -> Tensor:
    """A correct stable softmax (all -inf rows give zeros), for building the mistakes.

    The mistakes never call ``attnlib``'s public functions: the tests grade each mistake as
    if a learner had written it, and a learner's call to ``attnlib`` is blocked.
    """
    m = x.amax(dim=dim, keepdim=True)
    e = torch.exp(x - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    total = e.sum(dim=dim, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def _weights_variant(query: Tensor, key: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                     scale: float | None = None, *, scale_rule: str = "sqrt", softmax_dim: int = -1,
                     polarity: str = "allow", causal: str = "top-left", after_softmax: bool = False,
                     guard: bool = True, scale_after_softmax: bool = False) -> Tensor:
    """Attention weights with one ingredient swapped for a wrong one (for the mistakes).

    With the defaults this computes the correct weights (in the input's dtype, float64).
    """
    E = query.size(-1)
    if scale is None or scale_rule == "ignore-arg":
        s = {"sqrt": 1.0 / math.sqrt(E), "ignore-arg": 1.0 / math.sqrt(E), "none": 1.0,
             "linear": 1.0 / E, "times-sqrt": math.sqrt(E)}[scale_rule]
    else:
        s = scale
    scores = query @ key.transpose(-2, -1)
    if not scale_after_softmax:
        scores = scores * s
    L, S = scores.shape[-2:]
    allowed = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        diag = {"top-left": 0, "bottom-right": S - L, "strict": -1}[causal]
        allowed = allowed.tril(diag)
    additive = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & (attn_mask if polarity == "allow" else ~attn_mask)
        else:
            additive = attn_mask
    if after_softmax:
        w = _softmax(scores, dim=softmax_dim)
        w = w.masked_fill(~allowed, 0.0)
        return w if additive is None else w + additive
    scores = scores.masked_fill(~allowed, float("-inf"))
    if additive is not None:
        scores = scores + additive
    w = _softmax(scores, dim=softmax_dim) if guard else _naive_softmax(scores, dim=softmax_dim)
    return w * s if scale_after_softmax else w


def _attention_mistake(**variant: object):
    """A wrong ``scaled_dot_product_attention``: weights from :func:`_weights_variant` times V."""
    def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False, *, generator: torch.Generator | None = None) -> Tensor:
        return _weights_variant(query, key, attn_mask, is_causal, scale, **variant) @ value
    return sdpa


def _weights_mistake(**variant: object):
    """A wrong ``attention_weights``."""
    def attention_weights(query: Tensor, key: Tensor, attn_mask: Tensor | None = None,
                          is_causal: bool = False, scale: float | None = None,
                          enable_gqa: bool = False) -> Tensor:
        return _weights_variant(query, key, attn_mask, is_causal, scale, **variant)
    return attention_weights


# --------------------------------------------------------------------------- chapter 1: ElmanRNN


def _rnn_case(name: str, seed: int, B: int, T: int, n_in: int, n_hid: int, *, h0: bool = False,
              nonlinearity: str = "tanh", bias: bool = True, w_std: float = 1.0) -> Case:
    init_args = (n_in, n_hid, nonlinearity, bias)
    sd = _state_dict(attnlib.ElmanRNN, init_args, seed)
    sd = {k: v * w_std for k, v in sd.items()}
    x = _randn(B, T, n_in, seed=seed + 1)
    args = (x, _randn(B, n_hid, seed=seed + 2, std=0.5)) if h0 else (x,)
    return Case(name, args=args, init_args=init_args, state_dict=sd)


def _rnn_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _rnn_case("B=2, T=5, h0 = zeros", 10, 2, 5, 3, 4),
            _rnn_case("B=3, T=4, given h0", 20, 3, 4, 3, 5, h0=True),
            _rnn_case("nonlinearity='relu'", 30, 2, 6, 4, 4, nonlinearity="relu"),
        ]
    return [
        _rnn_case("T=1", 110, 2, 1, 3, 4, h0=True),
        _rnn_case("B=1, T=12, large weights", 120, 1, 12, 2, 6, w_std=2.0),
        _rnn_case("bias=False, given h0", 130, 2, 5, 5, 3, h0=True, bias=False),
        _rnn_case("relu with given h0", 140, 3, 7, 3, 4, h0=True, nonlinearity="relu"),
        _rnn_case("hidden_size=1", 150, 2, 4, 3, 1),
    ]


def _rnn_variant(m: attnlib.ElmanRNN, x: Tensor, h0: Tensor | None, *, carry: bool = True,
                 use_h0: bool = True, shifted: bool = False, act: str = "module") -> tuple[Tensor, Tensor]:
    B, T, _ = x.shape
    start = x.new_zeros(B, m.hidden_size) if (h0 is None or not use_h0) else h0
    f = {"module": m.activation, "none": lambda z: z, "tanh": torch.tanh}[act]
    h, outputs = start, []
    for t in range(T):
        prev = h if carry else start
        new = f(m.input_proj(x[:, t]) + m.hidden_proj(prev))
        outputs.append(h if shifted else new)
        h = new
    return torch.stack(outputs, dim=1), h


def _rnn_mistake(**variant: object):
    def forward(m: attnlib.ElmanRNN, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return _rnn_variant(m, x, h0, **variant)
    return forward


register(Exercise(
    id="ElmanRNN",
    chapter=1,
    reference=attnlib.ElmanRNN,
    kind="module",
    section=CH1_MATHS,
    make_cases=_rnn_cases,
    mistakes=(
        Mistake("hidden state not carried between steps",
                "every step started again from h0 instead of the previous hidden state h_{t-1}, so "
                "the network forgets everything but the current token.", CH1_MATHS,
                _rnn_mistake(carry=False)),
        Mistake("h0 ignored",
                "the recurrence started from zeros even though an initial state h0 was given.",
                CH1_CODE, _rnn_mistake(use_h0=False)),
        Mistake("outputs shifted by one step",
                "the state was stored before it was updated, so outputs[:, t] holds h_{t-1} "
                "instead of h_t (and the first output is h0).", CH1_MATHS,
                _rnn_mistake(shifted=True)),
        Mistake("no nonlinearity",
                "h_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh without tanh (or relu): the network "
                "is then linear.", CH1_MATHS, _rnn_mistake(act="none")),
        Mistake("tanh whatever the nonlinearity",
                "tanh was applied even though the module was built with nonlinearity='relu'.",
                CH1_CODE, _rnn_mistake(act="tanh")),
    ),
    # attnlib's ElmanRNN by name, not attnlib as a whole: the stub's constructor (the
    # reference's) calls attnlib's input checks, which a call watcher would count.
    forbidden=("attnlib.ElmanRNN", "attnlib.rnn.ElmanRNN", "torch.nn.RNN", "torch.nn.RNNCell", "torch.rnn_tanh",
               "torch.rnn_relu", "torch.rnn_tanh_cell", "torch.rnn_relu_cell"),
))


# --------------------------------------------------------------------------- chapter 1: gradient norms

# The models a case may name, bound here: while a learner's code runs, attnlib's public names
# are blocked, and build_args runs then too.
_GRAD_MODELS: dict[str, object] = {
    "ElmanRNN": _ElmanRNN,
    "MultiHeadAttention": _MultiHeadAttention,
    "LSTM": lambda input_size, hidden_size: nn.LSTM(input_size, hidden_size, batch_first=True),
}


def _build_model(spec: dict) -> nn.Module:
    """The float64 model a case describes by name, constructor arguments and weights."""
    with torch.random.fork_rng(devices=[]):  # weight init must not move the global RNG
        model = _GRAD_MODELS[spec["model"]](*spec["init_args"])
    model = model.to(F64)
    model.load_state_dict(spec["state_dict"], strict=True)
    return model


def _model_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """build_args of hidden_state_gradient_norms: the first argument becomes the model."""
    spec, *rest = args
    return (_build_model(spec), *rest), kwargs


def _grad_case(name: str, seed: int, model: str, init_args: tuple, x_shape: tuple[int, ...], *,
               w_std: float = 1.0) -> Case:
    sd = _state_dict(_GRAD_MODELS[model], init_args, seed)
    sd = {k: v * w_std for k, v in sd.items()}
    spec = {"model": model, "init_args": init_args, "state_dict": sd}
    return Case(name, (spec, _randn(*x_shape, seed=seed + 1)))


def _grad_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _grad_case("Elman RNN (tanh), T=8, x of shape (T, input_size)", 40, "ElmanRNN", (3, 5), (8, 3),
                       w_std=1.5),
            _grad_case("Elman RNN (relu), x of shape (1, T, input_size)", 41, "ElmanRNN", (4, 4, "relu"),
                       (1, 6, 4)),
            _grad_case("one attention layer (MultiHeadAttention, 2 heads): returns a tensor, not a tuple",
                       42, "MultiHeadAttention", (4, 2, None, False), (1, 6, 4)),
        ]
    return [
        _grad_case("T=1", 140, "ElmanRNN", (3, 4), (1, 3)),
        _grad_case("hidden_size=1", 141, "ElmanRNN", (3, 1), (7, 3)),
        _grad_case("input_size=1", 142, "ElmanRNN", (1, 5), (9, 1)),
        _grad_case("torch.nn.LSTM (batch_first=True), T=7", 143, "LSTM", (3, 4), (1, 7, 3)),
        _grad_case("large recurrent weights (exploding), T=12", 144, "ElmanRNN", (2, 6), (12, 2), w_std=3.0),
        _grad_case("attention with biases, 1 head, T=10", 145, "MultiHeadAttention", (6, 1, None, True),
                   (10, 6)),
    ]


def _grad_variant(*, target: str = "last", rows: bool = True, norm: str = "fro"):
    """hidden_state_gradient_norms with one thing changed: the output differentiated
    (``target``), the full Jacobian or one backward pass of the sum (``rows``), the norm."""
    def hidden_state_gradient_norms(model: nn.Module, x: Tensor) -> Tensor:
        x = (x.unsqueeze(0) if x.ndim == 2 else x).detach().requires_grad_(True)  # (1, T, input_size)
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out  # (1, T, hidden)
        h = out[0, -1] if target == "last" else out[0, 0]  # (hidden,)
        if rows:
            blocks = torch.stack([torch.autograd.grad(h[i], x, retain_graph=True)[0][0]
                                  for i in range(h.numel())])  # (hidden, T, input_size)
        else:
            blocks = torch.autograd.grad(h.sum(), x)[0]  # (1, T, input_size): the rows summed
        if norm == "spectral":
            return torch.linalg.matrix_norm(blocks.transpose(0, 1), ord=2)  # (T,)
        squares = blocks.pow(2).sum(dim=(0, 2))  # (T,)
        return squares if norm == "squared" else squares.sqrt()
    return hidden_state_gradient_norms


register(Exercise(
    id="hidden_state_gradient_norms",
    chapter=1,
    reference=attnlib.hidden_state_gradient_norms,
    section=CH1_MATHS,
    make_cases=_grad_cases,
    build_args=_model_args,
    mistakes=(
        Mistake("gradient of sum(h_T) instead of the Jacobian",
                "one backward pass of h_T.sum() gives the sum of the Jacobian's rows, not the "
                "Jacobian d h_T / d x_t: the components of h_T cancel each other. Take one "
                "backward pass per component of h_T (or torch.autograd.functional.jacobian).",
                CH1_MATHS, _grad_variant(rows=False)),
        Mistake("the first position's output instead of h_T",
                "out[0, 0] is h_1; the question is how h_T, the output at the last position, "
                "depends on every input: out[0, -1].", CH1_CODE, _grad_variant(target="first")),
        Mistake("squared norms",
                "the Frobenius norm is the square root of the sum of the squared entries; the "
                "square root was missing.", CH1_CODE, _grad_variant(norm="squared")),
        Mistake("spectral norm instead of the Frobenius norm",
                "each (hidden, input_size) block was measured by its largest singular value; the "
                "course measures it by the Frobenius norm, the root of the sum of its squared "
                "entries.", CH1_FADES, _grad_variant(norm="spectral")),
    ),
    # the function by name, not attnlib as a whole: the models the learner calls are attnlib's
    forbidden=("attnlib.hidden_state_gradient_norms", "attnlib.rnn.hidden_state_gradient_norms"),
))


# --------------------------------------------------------------------------- chapter 2: softmax


def _softmax_cases(hidden: bool) -> list[Case]:
    if not hidden:
        big = _randn(3, 6, seed=3, std=5.0)
        big[0] += 1e4  # every logit of row 0 near 1e4: exp overflows without the shift
        big[1] -= 1e4  # row 1 near -1e4: exp underflows to 0 without the shift
        masked = _randn(4, 5, seed=4)
        masked[1] = float("-inf")  # a fully masked row
        masked[2, ::2] = float("-inf")  # a partly masked row
        masked[3] += 1e4
        return [
            Case("random logits (3, 5), dim=-1", (_randn(3, 5, seed=1),)),
            Case("(2, 3, 4), dim=1", (_randn(2, 3, 4, seed=2),), {"dim": 1}),
            Case("large logits (+-1e4)", (big,)),
            Case("-inf entries and a fully masked row", (masked,)),
            Case("bfloat16 (2, 4, 64)", (_randn(2, 4, 64, seed=5, std=3.0, dtype=torch.bfloat16),),
                 low_precision=True),
        ]
    huge = _randn(2, 3, 8, seed=13, std=2.0) * 1e3
    mixed = _randn(3, 7, seed=14)
    mixed[0] = float("-inf")
    mixed[2, 1:] = float("-inf")  # only one finite entry: weight exactly 1
    return [
        Case("dim=0 (5, 3)", (_randn(5, 3, seed=11),), {"dim": 0}),
        Case("a single element along dim", (_randn(4, 1, seed=12),)),
        Case("logits of order 1e3, dim=-2", (huge,), {"dim": -2}),
        Case("-inf rows and a single finite entry", (mixed,)),
        Case("float16 (3, 33)", (_randn(3, 33, seed=15, std=4.0, dtype=torch.float16),), low_precision=True),
        Case("4-D (2, 2, 3, 9), dim=3", (_randn(2, 2, 3, 9, seed=16),), {"dim": 3}),
    ]


def _softmax_no_shift(x: Tensor, dim: int = -1) -> Tensor:
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def _softmax_ignores_dim(x: Tensor, dim: int = -1) -> Tensor:
    return _softmax(x.float(), dim=-1).to(x.dtype) if x.dtype in (torch.float16, torch.bfloat16) \
        else _softmax(x, dim=-1)


def _softmax_nan_rows(x: Tensor, dim: int = -1) -> Tensor:
    return _naive_softmax(x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x,
                          dim).to(x.dtype)


def _softmax_global_max(x: Tensor, dim: int = -1) -> Tensor:
    z = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    finite = z[torch.isfinite(z)]
    shift = finite.max() if finite.numel() else z.new_zeros(())
    e = torch.exp(z - shift)
    total = e.sum(dim=dim, keepdim=True)
    return (e / torch.where(total == 0, torch.ones_like(total), total)).to(x.dtype)


def _softmax_fp32_out(x: Tensor, dim: int = -1) -> Tensor:
    return _softmax(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim)


register(Exercise(
    id="softmax",
    chapter=2,
    reference=attnlib.softmax,
    section=CH2_SOFTMAX,
    make_cases=_softmax_cases,
    mistakes=(
        Mistake("fully masked row gives NaN",
                "a row that is entirely -inf becomes exp(-inf - -inf) = exp(NaN); such a row must "
                "return zeros instead.", CH2_SOFTMAX, _softmax_nan_rows),
        Mistake("no max subtraction",
                "exp(x) overflows to inf for large logits (and underflows to 0 for very negative "
                "ones), giving inf/inf = NaN; subtract each row's maximum first.", CH2_SOFTMAX,
                _softmax_no_shift),
        Mistake("max taken over the whole tensor",
                "one maximum for the whole tensor instead of one per row: a row far below it "
                "underflows to all zeros.", CH2_SOFTMAX, _softmax_global_max),
        Mistake("dim argument ignored",
                "the softmax was taken over the last axis whatever dim was.", CH2_ALL,
                _softmax_ignores_dim),
        Mistake("result not cast back to the input dtype",
                "the computation was upcast to float32 (good) but the float32 result was "
                "returned; return it in the input's dtype.", CH2_SOFTMAX, _softmax_fp32_out),
    ),
    forbidden=NO_ATTNLIB + NO_SOFTMAX + ("torch.nn.functional.log_softmax", "torch.log_softmax"),
))


# --------------------------------------------------------------------------- chapter 2: SDPA


def _qkv(seed: int, lead: tuple[int, ...], L: int, S: int, E: int, Ev: int | None = None,
         std: float = 1.0, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor, Tensor]:
    Ev = E if Ev is None else Ev
    return (_randn(*lead, L, E, seed=seed, std=std, dtype=dtype),
            _randn(*lead, S, E, seed=seed + 1, std=std, dtype=dtype),
            _randn(*lead, S, Ev, seed=seed + 2, dtype=dtype))


def _attention_cases(hidden: bool, with_value: bool) -> list[Case]:
    """Cases shared by scaled_dot_product_attention and attention_weights."""
    def case(name: str, q: Tensor, k: Tensor, v: Tensor, low: bool = False, **kwargs: object) -> Case:
        args = (q, k, v) if with_value else (q, k)
        return Case(name, args, kwargs, low_precision=low)

    float_mask = _randn(4, 6, seed=41)
    float_mask[_rand_bool(4, 6, seed=42, p=0.7).logical_not()] = float("-inf")
    dead = _rand_bool(5, 5, seed=43)
    dead[2] = False  # query 2 sees no key
    if not hidden:
        return [
            case("B=2, H=3, L=S=4, E=8", *_qkv(1, (2, 3), 4, 4, 8)),
            case("L=3 != S=6, Ev=5", *_qkv(2, (2, 2), 3, 6, 8, Ev=5)),
            case("bool mask (L, S) broadcast over B, H", *_qkv(3, (2, 2), 4, 6, 4),
                 attn_mask=_rand_bool(4, 6, seed=30)),
            case("float mask with -inf entries", *_qkv(4, (1, 2), 4, 6, 4), attn_mask=float_mask),
            case("is_causal, L=S=5", *_qkv(5, (2, 2), 5, 5, 8), is_causal=True),
            case("is_causal, L=3 < S=6 (top-left)", *_qkv(6, (1, 2), 3, 6, 4), is_causal=True),
            case("scale=0.3", *_qkv(7, (2, 1), 4, 5, 16), scale=0.3),
            case("a fully masked query row", *_qkv(8, (1, 2), 5, 5, 4), attn_mask=dead),
        ]
    pad = torch.tensor([5, 2, 0])  # batch item 2 has no real key at all
    return [
        case("L=1 (one query)", *_qkv(101, (2, 2), 1, 7, 8)),
        case("is_causal, L=6 > S=3", *_qkv(102, (1, 3), 6, 3, 4), is_causal=True),
        case("padding mask (B, 1, 1, S), one empty sequence", *_qkv(103, (3, 2), 4, 5, 6),
             attn_mask=attnlib.padding_mask(pad, 5)),
        case("is_causal combined with a bool mask", *_qkv(104, (2, 2), 5, 5, 4), is_causal=True,
             attn_mask=_rand_bool(5, 5, seed=105)),
        case("large logits (|q.k| ~ 1e3)", *_qkv(106, (2, 2), 4, 4, 16, std=8.0)),
        case("3-D inputs (B, L, E), L=5 != S=2", *_qkv(107, (3,), 5, 2, 4)),
        case("head_dim=64", *_qkv(108, (1, 2), 6, 6, 64)),
        case("float mask with a fully masked row, scale=1.0", *_qkv(109, (2, 1), 4, 6, 4),
             attn_mask=float_mask.clone().index_fill_(0, torch.tensor([1]), float("-inf")), scale=1.0),
        case("bfloat16, is_causal", *_qkv(110, (2, 2), 16, 16, 32, dtype=torch.bfloat16), low=True,
             is_causal=True),
    ]


_ATTENTION_MISTAKES: tuple[tuple[str, str, str, dict], ...] = (
    ("no 1/sqrt(d_k) scaling",
     "the scores q.k were not divided by sqrt(d_k), so with large head dimensions the softmax "
     "saturates.", CH3_VARIANCE, {"scale_rule": "none"}),
    ("scaled by 1/d_k instead of 1/sqrt(d_k)",
     "the scores were divided by d_k; the dot product's standard deviation grows like sqrt(d_k), "
     "so that is what brings it back to 1.", CH3_VARIANCE, {"scale_rule": "linear"}),
    ("scale argument ignored",
     "the default 1/sqrt(d_k) was used even though a scale was given.", CH3_CODE,
     {"scale_rule": "ignore-arg"}),
    ("softmax over the wrong axis (dim=-2)",
     "the softmax normalised over the queries (dim=-2) instead of over the keys (dim=-1): each "
     "query's weights must sum to 1 across the keys.", CH2_ALL, {"softmax_dim": -2}),
    ("mask applied after the softmax",
     "the masked weights were zeroed after the softmax, so the remaining weights no longer sum "
     "to 1; mask the scores with -inf before the softmax so that they are renormalised.",
     CH5_MATHS, {"after_softmax": True}),
    ("inverted mask polarity",
     "the boolean mask was read as True = blocked; here (as in "
     "torch.nn.functional.scaled_dot_product_attention) True means the query may attend.",
     CH5_CONVENTIONS, {"polarity": "block"}),
    ("is_causal aligned bottom-right",
     "with L != S the causal triangle was shifted by S - L; is_causal is aligned top-left: "
     "query i sees keys 0..i.", CH5_CAUSAL, {"causal": "bottom-right"}),
    ("causal mask without the diagonal",
     "query i was not allowed to see key i itself (a strict triangle); the causal mask allows "
     "keys 0..i inclusive.", CH5_MATHS, {"causal": "strict"}),
    ("fully masked row gives NaN",
     "a query whose keys are all masked got a softmax of all -inf, which is 0/0 = NaN; such a "
     "row must get zero weights.", CH5_FULLY_MASKED, {"guard": False}),
)

_WEIGHTS_ONLY_MISTAKES: tuple[tuple[str, str, str, dict], ...] = (
    ("multiplied by sqrt(d_k) instead of dividing",
     "the scores were multiplied by sqrt(d_k), which makes their spread d_k instead of 1.",
     CH3_VARIANCE, {"scale_rule": "times-sqrt"}),
    ("scale applied after the softmax",
     "the weights were multiplied by the scale after the softmax, so rows no longer sum to 1 "
     "and the softmax saw unscaled scores.", CH3_VARIANCE, {"scale_after_softmax": True}),
)


register(Exercise(
    id="scaled_dot_product_attention",
    chapter=2,
    reference=attnlib.scaled_dot_product_attention,
    section=CH2_ALL,
    make_cases=lambda hidden: _attention_cases(hidden, with_value=True),
    mistakes=tuple(Mistake(n, e, s, _attention_mistake(**v)) for n, e, s, v in _ATTENTION_MISTAKES),
    forbidden=NO_ATTNLIB + NO_FUSED,
))


# --------------------------------------------------------------------------- chapter 3: weights


register(Exercise(
    id="attention_weights",
    chapter=3,
    reference=attnlib.attention_weights,
    section=CH3_VARIANCE,
    make_cases=lambda hidden: _attention_cases(hidden, with_value=False),
    mistakes=tuple(Mistake(n, e, s, _weights_mistake(**v))
                   for n, e, s, v in _ATTENTION_MISTAKES + _WEIGHTS_ONLY_MISTAKES),
    forbidden=NO_ATTNLIB + NO_FUSED,
))


# --------------------------------------------------------------------------- chapter 3: entropy


def _weights_rows(seed: int, *shape: int, std: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    """Random attention weights: a softmax of random scores along the last axis."""
    return _softmax(_randn(*shape, seed=seed, std=std)).to(dtype)


def _entropy_cases(hidden: bool) -> list[Case]:
    masked = _weights_rows(51, 2, 2, 4, 6)
    keep = _rand_bool(2, 2, 4, 6, seed=52)
    masked = masked * keep / (masked * keep).sum(-1, keepdim=True)  # masked keys: exact zeros
    masked[1, 0, 2] = 0.0  # a fully masked row: every weight 0
    one_hot = torch.eye(5, dtype=F64)[torch.tensor([3, 0, 4])]  # (3, 5)
    mixed = torch.cat([one_hot, _weights_rows(53, 2, 5), torch.zeros(1, 5, dtype=F64)])  # (6, 5)
    if not hidden:
        return [
            Case("weights (B, H, L, S) = (2, 3, 4, 6)", (_weights_rows(50, 2, 3, 4, 6),)),
            Case("one-hot rows and a fully masked (all-zero) row", (mixed,)),
            Case("masked keys (zero weights), 4-D", (masked,)),
            Case("dim=-2 (keys on the second-to-last axis)",
                 (_weights_rows(54, 2, 3, 7).transpose(-2, -1),), {"dim": -2}),
            Case("bfloat16 weights (2, 8, 64)", (_weights_rows(55, 2, 8, 64, std=2.0, dtype=torch.bfloat16),),
                 low_precision=True),
        ]
    tiny = _weights_rows(152, 3, 6, std=30.0)  # saturated rows: weights down to ~1e-100
    return [
        Case("one key (S=1): entropy 0", (torch.ones(2, 3, 1, dtype=F64),)),
        Case("uniform rows over S=16 keys: entropy ln 16", (torch.full((4, 16), 1 / 16, dtype=F64),)),
        Case("a single row (1-D)", (_weights_rows(150, 9),)),
        Case("dim=0", (_weights_rows(151, 5, 3).T.contiguous(),), {"dim": 0}),
        Case("saturated rows with tiny weights", (tiny,)),
        Case("masked keys, dim=3 of a 4-D tensor", (masked,), {"dim": 3}),
        Case("float16 weights (3, 40)", (_weights_rows(153, 3, 40, std=3.0, dtype=torch.float16),),
             low_precision=True),
    ]


def _entropy_variant(*, guard: bool = True, log: Callable[[Tensor], Tensor] = torch.log, sign: float = -1.0,
                     last_axis: bool = False):
    """attention_entropy with one thing changed (for the mistakes)."""
    def attention_entropy(weights: Tensor, dim: int = -1) -> Tensor:
        p = weights.float() if weights.dtype in (torch.float16, torch.bfloat16) else weights
        if guard:
            terms = torch.where(p > 0, p * log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
        else:
            terms = p * log(p)  # 0 * log(0) = 0 * -inf = NaN
        return (sign * terms.sum(dim=-1 if last_axis else dim)).to(weights.dtype)
    return attention_entropy


register(Exercise(
    id="attention_entropy",
    chapter=3,
    reference=attnlib.attention_entropy,
    section=CH3_GRADIENT,
    make_cases=_entropy_cases,
    mistakes=(
        Mistake("0 ln 0 computed as NaN",
                "a zero weight (a masked key, a one-hot row) gives 0 * log(0) = 0 * -inf = NaN; "
                "its term is 0, the limit of p ln p as p -> 0.", CH3_GRADIENT,
                _entropy_variant(guard=False)),
        Mistake("log base 2 instead of the natural log",
                "the entropy was computed in bits (log2); the course measures it in nats (ln), so "
                "that uniform weights over S keys give ln S.", CH3_GRADIENT,
                _entropy_variant(log=torch.log2)),
        Mistake("the minus sign forgotten",
                "sum p ln p is negative (each ln p <= 0); the entropy is -sum p ln p >= 0.",
                CH3_GRADIENT, _entropy_variant(sign=1.0)),
        Mistake("dim argument ignored",
                "the sum ran over the last axis whatever dim was; the keys may sit on another axis.",
                CH3_SATURATES, _entropy_variant(last_axis=True)),
    ),
    forbidden=NO_ATTNLIB + ("torch.special.entr", "torch.xlogy", "torch.special.xlogy", "torch.Tensor.xlogy",
                            "torch.distributions.Categorical"),
))


# --------------------------------------------------------------------------- chapter 4: heads


def _split_cases(hidden: bool) -> list[Case]:
    def case(name: str, seed: int, B: int, L: int, d_model: int, H: int) -> Case:
        return Case(name, (_randn(B, L, d_model, seed=seed), H), init_args=(d_model, H), method="split_heads")
    if not hidden:
        return [case("B=2, L=5, d_model=12, H=3", 1, 2, 5, 12, 3),
                case("B=1, L=3, d_model=8, H=4", 2, 1, 3, 8, 4)]
    return [case("L=1", 11, 2, 1, 8, 2), case("H=1", 12, 2, 4, 6, 1),
            case("head_dim=1 (H = d_model = 6)", 13, 3, 5, 6, 6), case("B=4, L=7, d_model=16, H=2", 14, 4, 7, 16, 2)]


def _merge_cases(hidden: bool) -> list[Case]:
    def case(name: str, seed: int, B: int, H: int, L: int, D: int) -> Case:
        return Case(name, (_randn(B, H, L, D, seed=seed),), init_args=(H * D, H), method="merge_heads")
    if not hidden:
        return [case("B=2, H=3, L=5, head_dim=4", 3, 2, 3, 5, 4),
                case("B=1, H=4, L=3, head_dim=2", 4, 1, 4, 3, 2)]
    return [case("L=1", 21, 2, 2, 1, 4), case("H=1", 22, 2, 1, 4, 6),
            case("head_dim=1", 23, 3, 6, 5, 1), case("B=4, H=2, L=7, head_dim=8", 24, 4, 2, 7, 8)]


def _split_no_transpose(m: nn.Module, x: Tensor, n_heads: int) -> Tensor:
    B, L, _ = x.shape
    return x.reshape(B, n_heads, L, -1)


def _split_interleaved(m: nn.Module, x: Tensor, n_heads: int) -> Tensor:
    B, L, _ = x.shape
    return x.reshape(B, L, -1, n_heads).permute(0, 3, 1, 2)


def _split_no_head_axis_move(m: nn.Module, x: Tensor, n_heads: int) -> Tensor:
    B, L, _ = x.shape
    return x.reshape(B, L, n_heads, -1)


def _split_flat(m: nn.Module, x: Tensor, n_heads: int) -> Tensor:
    B, L, _ = x.shape
    return x.reshape(B, L, n_heads, -1).transpose(1, 2).reshape(B * n_heads, L, -1)


def _merge_no_transpose(m: nn.Module, x: Tensor) -> Tensor:
    B, H, L, D = x.shape
    return x.reshape(B, L, H * D)


def _merge_interleaved(m: nn.Module, x: Tensor) -> Tensor:
    B, H, L, D = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, L, D * H)


def _merge_mean(m: nn.Module, x: Tensor) -> Tensor:
    return x.mean(dim=1)


def _merge_keeps_axis(m: nn.Module, x: Tensor) -> Tensor:
    return x.transpose(1, 2)


register(Exercise(
    id="MultiHeadAttention.split_heads",
    chapter=4,
    reference=attnlib.MultiHeadAttention,
    kind="module",
    section=CH4_MATHS,
    make_cases=_split_cases,
    mistakes=(
        Mistake("reshape without transpose",
                "(B, L, H * head_dim) was reshaped straight to (B, H, L, head_dim); that reads the "
                "numbers in memory order and mixes positions across heads. Reshape to "
                "(B, L, H, head_dim), then transpose axes 1 and 2.", CH4_MATHS, _split_no_transpose),
        Mistake("features interleaved across heads",
                "head h got every H-th feature instead of the contiguous block h * head_dim .. "
                "(h + 1) * head_dim - 1.", CH4_MATHS, _split_interleaved),
        Mistake("head axis not moved",
                "the result is (B, L, H, head_dim); the heads must come before the positions, "
                "(B, H, L, head_dim), so that attention runs per head.", CH4_MATHS,
                _split_no_head_axis_move),
        Mistake("batch and head axes flattened",
                "the result is (B * H, L, head_dim); keep the two axes apart: (B, H, L, head_dim).",
                CH4_MATHS, _split_flat),
    ),
    forbidden=NO_MHA,
))

register(Exercise(
    id="MultiHeadAttention.merge_heads",
    chapter=4,
    reference=attnlib.MultiHeadAttention,
    kind="module",
    section=CH4_MATHS,
    make_cases=_merge_cases,
    mistakes=(
        Mistake("reshape without transpose",
                "(B, H, L, head_dim) was reshaped straight to (B, L, H * head_dim), which mixes "
                "positions; transpose to (B, L, H, head_dim) first.", CH4_MATHS, _merge_no_transpose),
        Mistake("heads interleaved instead of concatenated",
                "the features came out as (head_dim, H) instead of (H, head_dim): the heads must be "
                "concatenated, head 0's block first, in the order o_proj expects.", CH4_MATHS,
                _merge_interleaved),
        Mistake("heads averaged instead of concatenated",
                "the heads were averaged into one (B, L, head_dim) tensor; they are concatenated "
                "along the features into (B, L, H * head_dim).", CH4_MATHS, _merge_mean),
        Mistake("head axis not merged",
                "the result is still (B, L, H, head_dim); flatten the last two axes.", CH4_MATHS,
                _merge_keeps_axis),
    ),
    forbidden=NO_MHA,
))


# --------------------------------------------------------------------------- chapters 4-5: forward


def _mha_case(name: str, seed: int, B: int, L: int, d_model: int, H: int, *, bias: bool = False,
              S: int | None = None, **kwargs: object) -> Case:
    init_args = (d_model, H, None, bias)
    sd = _state_dict(attnlib.MultiHeadAttention, init_args, seed)
    if bias:  # biases away from zero so that each one matters
        sd = {k: (v * 4 if k.endswith("bias") else v) for k, v in sd.items()}
    if S is not None:
        kwargs["context"] = _randn(B, S, d_model, seed=seed + 2)
    return Case(name, (_randn(B, L, d_model, seed=seed + 1),), kwargs, init_args=init_args, state_dict=sd)


def _mha_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [
            _mha_case("self-attention, B=2, L=5, d_model=8, H=2", 1, 2, 5, 8, 2),
            _mha_case("with biases, H=4", 2, 2, 4, 8, 4, bias=True),
            _mha_case("is_causal", 3, 2, 6, 12, 3, is_causal=True),
            _mha_case("bool attn_mask", 4, 1, 5, 8, 2, attn_mask=_rand_bool(5, 5, seed=44)),
            _mha_case("cross-attention, L=3, S=7", 5, 2, 3, 8, 2, S=7),
        ]
    return [
        _mha_case("L=1", 101, 2, 1, 8, 2),
        _mha_case("one head (H=1)", 102, 2, 4, 6, 1),
        _mha_case("cross-attention with a padding mask", 103, 3, 4, 8, 4, S=6,
                  attn_mask=attnlib.padding_mask(torch.tensor([6, 3, 1]), 6)),
        _mha_case("cross-attention, L=5 > S=2, biases", 104, 2, 5, 12, 3, bias=True, S=2),
        _mha_case("is_causal and a bool mask", 105, 2, 5, 8, 2, is_causal=True,
                  attn_mask=_rand_bool(5, 5, seed=106)),
        _mha_case("head_dim=1 (H = d_model = 4)", 107, 2, 4, 4, 4),
        _mha_case("float attn_mask, d_model=16", 108, 2, 4, 16, 2, attn_mask=_randn(4, 4, seed=109)),
    ]


def _mha_variant(m: attnlib.MultiHeadAttention, x: Tensor, context: Tensor | None = None,
                 attn_mask: Tensor | None = None, is_causal: bool = False, kv_cache: object = None, *,
                 split: str = "ok", merge: str = "ok", o_proj: bool = True, one_head: bool = False,
                 scale: str = "head_dim", kv_source: str = "context", q_source: str = "x") -> Tensor:
    """MultiHeadAttention.forward with one ingredient swapped for a wrong one."""
    source = x if context is None or kv_source == "x" else context
    q_in = x if q_source == "x" or context is None else context
    H = 1 if one_head else m.n_heads
    B = x.size(0)

    def split_(t: Tensor) -> Tensor:
        if split == "no-transpose":
            return t.reshape(t.size(0), H, t.size(1), -1)
        return t.reshape(t.size(0), t.size(1), H, -1).transpose(1, 2)

    q, k, v = split_(m.q_proj(q_in)), split_(m.k_proj(source)), split_(m.v_proj(source))
    D = q.size(-1)
    s = {"head_dim": 1 / math.sqrt(D), "none": 1.0, "d_model": 1 / math.sqrt(m.d_model)}[scale]
    y = _weights_variant(q, k, attn_mask, is_causal, s) @ v  # (B, H, L, D)
    if merge == "no-transpose":
        y = y.reshape(B, y.size(2), -1)
    else:
        y = y.transpose(1, 2).reshape(B, y.size(2), -1)
    return m.o_proj(y) if o_proj else y


def _mha_mistake(**variant: object):
    def forward(m: attnlib.MultiHeadAttention, x: Tensor, context: Tensor | None = None,
                attn_mask: Tensor | None = None, is_causal: bool = False, kv_cache: object = None) -> Tensor:
        return _mha_variant(m, x, context, attn_mask, is_causal, kv_cache, **variant)
    return forward


register(Exercise(
    id="MultiHeadAttention.forward",
    chapter=4,
    reference=attnlib.MultiHeadAttention,
    kind="module",
    section=CH4_MATHS,
    make_cases=_mha_cases,
    mistakes=(
        Mistake("heads split without transpose",
                "q, k and v were reshaped straight to (B, H, L, head_dim), which mixes positions "
                "across heads; reshape to (B, L, H, head_dim) and transpose.", CH4_MATHS,
                _mha_mistake(split="no-transpose")),
        Mistake("heads merged without transpose",
                "the per-head outputs (B, H, L, head_dim) were reshaped straight to "
                "(B, L, d_model), which mixes positions; transpose to (B, L, H, head_dim) first.",
                CH4_MATHS, _mha_mistake(merge="no-transpose")),
        Mistake("missing output projection",
                "the merged heads were returned without o_proj; W_O is where the heads' results "
                "are combined.", CH4_MATHS, _mha_mistake(o_proj=False)),
        Mistake("one big head",
                "attention ran once over all d_model features (head_dim = d_model) instead of "
                "n_heads heads of d_model / n_heads features each.", CH4_MATHS,
                _mha_mistake(one_head=True)),
        Mistake("no 1/sqrt(head_dim) scaling",
                "the scores of each head were not divided by sqrt(head_dim).", CH3_VARIANCE,
                _mha_mistake(scale="none")),
        Mistake("scaled by 1/sqrt(d_model) instead of 1/sqrt(head_dim)",
                "each head's dot products have head_dim terms, so the scale is "
                "1/sqrt(head_dim), not 1/sqrt(d_model).", CH4_MATHS, _mha_mistake(scale="d_model")),
        Mistake("keys and values taken from x instead of context",
                "in cross-attention the keys and values come from the context (the sequence "
                "attended to) and only the queries from x.", CH5_SHAPES,
                _mha_mistake(kv_source="x")),
        Mistake("queries taken from context instead of x",
                "in cross-attention the queries come from x (the sequence that asks); the "
                "context supplies keys and values.", CH5_SHAPES, _mha_mistake(q_source="context")),
    ),
    forbidden=NO_MHA,
))


# --------------------------------------------------------------------------- chapter 5: masks


def _causal_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [Case("L=4", (4,)), Case("L=3, S=6", (3, 6)), Case("L=5, S=2", (5, 2))]
    return [Case("L=1", (1,)), Case("L=1, S=6 (one new query)", (1, 6)), Case("L=7, S=7 given", (7, 7)),
            Case("L=0 (empty)", (0,)), Case("L=6, S=1", (6, 1)), Case("S as keyword", (2,), {"S": 5})]


def _causal_bottom_right(L: int, S: int | None = None, device: object = None) -> Tensor:
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool).tril(S - L)


def _causal_strict(L: int, S: int | None = None, device: object = None) -> Tensor:
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool).tril(-1)


def _causal_inverted(L: int, S: int | None = None, device: object = None) -> Tensor:
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool).triu(1)


def _causal_float(L: int, S: int | None = None, device: object = None) -> Tensor:
    S = L if S is None else S
    return torch.zeros(L, S).masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))


def _causal_square(L: int, S: int | None = None, device: object = None) -> Tensor:
    return torch.ones(L, L, dtype=torch.bool).tril()


register(Exercise(
    id="causal_mask",
    chapter=5,
    reference=attnlib.causal_mask,
    section=CH5_MATHS,
    make_cases=_causal_cases,
    mistakes=(
        Mistake("aligned bottom-right",
                "with L != S the triangle was shifted by S - L; this mask is aligned top-left "
                "(query i sees keys 0..i), like is_causal=True.", CH5_CAUSAL, _causal_bottom_right),
        Mistake("strict triangle (no diagonal)",
                "query i may also attend to key i itself: keep the diagonal (tril, not tril(-1)).",
                CH5_MATHS, _causal_strict),
        Mistake("inverted polarity (True = blocked)",
                "True marks the future keys here; in this course (and in "
                "torch.nn.functional.scaled_dot_product_attention) True means may attend.",
                CH5_CONVENTIONS, _causal_inverted),
        Mistake("float mask instead of bool",
                "an additive 0/-inf float mask was returned; this function returns a boolean "
                "mask, True where attention is allowed.", CH5_CONVENTIONS, _causal_float),
        Mistake("S ignored",
                "the mask is L x L whatever S is; it must be (L, S).", CH5_CAUSAL, _causal_square),
    ),
    forbidden=NO_ATTNLIB,
))


def _padding_cases(hidden: bool) -> list[Case]:
    if not hidden:
        return [Case("lengths [3, 5, 1], S=5", (torch.tensor([3, 5, 1]), 5)),
                Case("lengths [2, 4], S=6", (torch.tensor([2, 4]), 6))]
    return [Case("a sequence of length 0", (torch.tensor([0, 3]), 4)),
            Case("no padding at all", (torch.tensor([4, 4, 4]), 4)),
            Case("B=1, S=1", (torch.tensor([1]), 1)),
            Case("int32 lengths", (torch.tensor([5, 1, 6, 2], dtype=torch.int32), 7)),
            Case("S as keyword", (torch.tensor([2, 1]),), {"S": 3})]


def _positions(lengths: Tensor, S: int) -> tuple[Tensor, Tensor]:
    return torch.arange(S)[None, :], lengths[:, None]


def _pad_2d(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return pos < n


def _pad_le(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return (pos <= n)[:, None, None, :]


def _pad_inverted(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return (pos >= n)[:, None, None, :]


def _pad_float(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return torch.zeros(len(lengths), S).masked_fill(pos >= n, float("-inf"))[:, None, None, :]


def _pad_queries(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return (pos < n)[:, None, :, None]


def _pad_left(lengths: Tensor, S: int) -> Tensor:
    pos, n = _positions(lengths, S)
    return (pos >= S - n)[:, None, None, :]


register(Exercise(
    id="padding_mask",
    chapter=5,
    reference=attnlib.padding_mask,
    section=CH5_PADDING,
    make_cases=_padding_cases,
    mistakes=(
        Mistake("shape (B, S), not broadcastable",
                "a (B, S) mask does not broadcast against (B, H, L, S) scores (it would line B up "
                "with L); return (B, 1, 1, S).", CH5_PADDING, _pad_2d),
        Mistake("<= instead of <",
                "position j is real when j < length; with <= the first padding key stays visible.",
                CH5_MATHS, _pad_le),
        Mistake("inverted polarity (True = padding)",
                "True marks the padding here; in this course True means the key may be attended.",
                CH5_CONVENTIONS, _pad_inverted),
        Mistake("float mask instead of bool",
                "an additive 0/-inf float mask was returned; this function returns a boolean mask.",
                CH5_CONVENTIONS, _pad_float),
        Mistake("queries masked instead of keys",
                "the mask has shape (B, 1, S, 1), so it blocks query rows; padding is masked on the "
                "key axis, (B, 1, 1, S).", CH5_PADDING, _pad_queries),
        Mistake("padding assumed on the left",
                "the real tokens were taken to be the last `length` positions; here they are "
                "positions 0 .. length - 1 and the padding follows them.", CH5_PADDING, _pad_left),
    ),
    forbidden=NO_ATTNLIB,
))
