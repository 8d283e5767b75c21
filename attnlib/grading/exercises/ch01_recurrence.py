"""Graded exercises of chapter 1 (recurrence): the cases and the catalogue of common mistakes.

==================================  ==========================================
exercise id                          reference
==================================  ==========================================
``ElmanRNN``                         :class:`attnlib.ElmanRNN` (``forward``)
``hidden_state_gradient_norms``      :func:`attnlib.hidden_state_gradient_norms`
==================================  ==========================================

``ElmanRNN`` is a module exercise: its cases load the reference's weights by name
(``input_proj``/``hidden_proj``), so the learner's class keeps the reference's ``__init__``;
the graded part is ``forward``. Its mistakes are functions ``fn(module, x, h0)`` where
``module`` is built from the reference.

``hidden_state_gradient_norms`` takes a model, which a case cannot carry across a process
boundary: its cases hold the model's name, constructor arguments and weights instead, and the
exercise's ``build_args`` builds the model wherever the function is called. Its mistakes are
functions with the reference's signature.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...multihead import MultiHeadAttention
from ...rnn import ElmanRNN, hidden_state_gradient_norms
from ..core import Case, Exercise, Mistake, register
from .common import F64, randn, state_dict

PAGE = "01_recurrence.html"


# --------------------------------------------------------------------------- ElmanRNN


def _rnn_case(name: str, seed: int, B: int, T: int, n_in: int, n_hid: int, *, h0: bool = False,
              nonlinearity: str = "tanh", bias: bool = True, w_std: float = 1.0) -> Case:
    init_args = (n_in, n_hid, nonlinearity, bias)
    sd = state_dict(ElmanRNN, init_args, seed)
    sd = {k: v * w_std for k, v in sd.items()}
    x = randn(B, T, n_in, seed=seed + 1)
    args = (x, randn(B, n_hid, seed=seed + 2, std=0.5)) if h0 else (x,)
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


def _rnn_variant(m: ElmanRNN, x: Tensor, h0: Tensor | None, *, carry: bool = True,
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
    def forward(m: ElmanRNN, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return _rnn_variant(m, x, h0, **variant)
    return forward


register(Exercise(
    id="ElmanRNN",
    chapter=1,
    reference=ElmanRNN,
    kind="module",
    section=f"{PAGE}#a-recurrence-and-its-gradient",
    make_cases=_rnn_cases,
    mistakes=(
        Mistake("hidden state not carried between steps",
                "every step started again from h0 instead of the previous hidden state h_{t-1}, so "
                "the network forgets everything but the current token.",
                f"{PAGE}#a-recurrence-and-its-gradient",
                _rnn_mistake(carry=False)),
        Mistake("h0 ignored",
                "the recurrence started from zeros even though an initial state h0 was given.",
                f"{PAGE}#the-code", _rnn_mistake(use_h0=False)),
        Mistake("outputs shifted by one step",
                "the state was stored before it was updated, so outputs[:, t] holds h_{t-1} "
                "instead of h_t (and the first output is h0).", f"{PAGE}#a-recurrence-and-its-gradient",
                _rnn_mistake(shifted=True)),
        Mistake("no nonlinearity",
                "h_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh without tanh (or relu): the network "
                "is then linear.", f"{PAGE}#a-recurrence-and-its-gradient", _rnn_mistake(act="none")),
        Mistake("tanh whatever the nonlinearity",
                "tanh was applied even though the module was built with nonlinearity='relu'.",
                f"{PAGE}#the-code", _rnn_mistake(act="tanh")),
    ),
    # attnlib's ElmanRNN by name, not attnlib as a whole: the stub's constructor (the
    # reference's) calls attnlib's input checks, which a call watcher would count.
    forbidden=("attnlib.ElmanRNN", "attnlib.rnn.ElmanRNN", "torch.nn.RNN", "torch.nn.RNNCell", "torch.rnn_tanh",
               "torch.rnn_relu", "torch.rnn_tanh_cell", "torch.rnn_relu_cell"),
))


# --------------------------------------------------------------------------- gradient norms

# The models a case may name, bound here: while a learner's code runs, attnlib's public names
# are blocked, and build_args runs then too.
_GRAD_MODELS: dict[str, object] = {
    "ElmanRNN": ElmanRNN,
    "MultiHeadAttention": MultiHeadAttention,
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
    sd = state_dict(_GRAD_MODELS[model], init_args, seed)
    sd = {k: v * w_std for k, v in sd.items()}
    spec = {"model": model, "init_args": init_args, "state_dict": sd}
    return Case(name, (spec, randn(*x_shape, seed=seed + 1)))


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
    reference=hidden_state_gradient_norms,
    section=f"{PAGE}#a-recurrence-and-its-gradient",
    make_cases=_grad_cases,
    build_args=_model_args,
    mistakes=(
        Mistake("gradient of sum(h_T) instead of the Jacobian",
                "one backward pass of h_T.sum() gives the sum of the Jacobian's rows, not the "
                "Jacobian d h_T / d x_t: the components of h_T cancel each other. Take one "
                "backward pass per component of h_T (or torch.autograd.functional.jacobian).",
                f"{PAGE}#a-recurrence-and-its-gradient", _grad_variant(rows=False)),
        Mistake("the first position's output instead of h_T",
                "out[0, 0] is h_1; the question is how h_T, the output at the last position, "
                "depends on every input: out[0, -1].", f"{PAGE}#the-code", _grad_variant(target="first")),
        Mistake("squared norms",
                "the Frobenius norm is the square root of the sum of the squared entries; the "
                "square root was missing.", f"{PAGE}#the-code", _grad_variant(norm="squared")),
        Mistake("spectral norm instead of the Frobenius norm",
                "each (hidden, input_size) block was measured by its largest singular value; the "
                "course measures it by the Frobenius norm, the root of the sum of its squared "
                "entries.",
                f"{PAGE}#the-gradient-fades-geometrically-through-a-recurrence-not-through-attention",
                _grad_variant(norm="spectral")),
    ),
    # the function by name, not attnlib as a whole: the models the learner calls are attnlib's
    forbidden=("attnlib.hidden_state_gradient_norms", "attnlib.rnn.hidden_state_gradient_norms"),
))
