"""Chapter 1's exercise notebook as its author writes it: text, points, solutions, explores.

``make release`` builds ``solutions/01_recurrence/`` and ``notebooks/01_recurrence/`` from
this file (see ``tools/exercises/__init__.py``); the cases and named mistakes that grade the
notebook are in ``attnlib/grading/exercises/ch01_recurrence.py``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn

import attnlib

from . import Exercise

INTRO = """\
You write the vanilla (Elman) recurrent network as the loop it is. Running it makes the two
problems of recurrence concrete: every step waits for the previous one, and everything the
network has read is squeezed into one hidden vector. Then you measure the second problem: how
strongly the last hidden state still depends on each input, through a recurrence and through
one attention layer."""

# Imports of this notebook after the common ones (tools/build_exercises.py, BASE_IMPORTS).
IMPORTS = "from attnlib._validate import check_positive_int  # used by the constructor"


# ElmanRNN -----------------------------------------------------------------------------

class ElmanRNN(attnlib.ElmanRNN):
    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, T, _ = x.shape
        h = x.new_zeros(B, self.hidden_size) if h0 is None else h0
        states = []
        for t in range(T):
            h = self.activation(self.input_proj(x[:, t]) + self.hidden_proj(h))  # (B, hidden)
            states.append(h)
        if not states:
            return x.new_zeros(B, 0, self.hidden_size), h
        return torch.stack(states, dim=1), h  # (B, T, hidden), (B, hidden)


def explore_elmanrnn() -> None:
    """Your RNN beside attnlib's, with the same weights."""
    torch.manual_seed(0)
    ref = attnlib.ElmanRNN(3, 16)
    mine = ElmanRNN(3, 16)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(1, 40, 3)
    with torch.no_grad():
        ours, _ = mine(x)
        theirs, _ = ref(x)
    print("largest difference from the reference:", (ours - theirs).abs().max().item())
    plt.plot(ours[0].norm(dim=-1).numpy(), label="yours")
    plt.plot(theirs[0].norm(dim=-1).numpy(), "--", label="attnlib")
    plt.xlabel("step t"); plt.ylabel("||h_t||"); plt.legend(); plt.show()


# Slow: loops over the batch items as well as the time steps: one sequence, and one token
# vector of it, at a time.
class SlowElmanRNN(attnlib.ElmanRNN):
    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, T, _ = x.shape
        outputs = x.new_zeros(B, T, self.hidden_size)
        last = x.new_zeros(B, self.hidden_size)
        for b in range(B):
            h = x.new_zeros(self.hidden_size) if h0 is None else h0[b]  # (hidden,)
            for t in range(T):
                h = self.activation(self.input_proj(x[b, t]) + self.hidden_proj(h))
                outputs[b, t] = h
            last[b] = h
        return outputs, last  # (B, T, hidden), (B, hidden)


# hidden_state_gradient_norms ----------------------------------------------------------

def hidden_state_gradient_norms(model: nn.Module, x: Tensor) -> Tensor:
    if x.ndim == 2:
        x = x.unsqueeze(0)  # (1, T, input_size)
    x = x.detach()

    def last_output(inputs: Tensor) -> Tensor:
        out = model(inputs)
        out = out[0] if isinstance(out, tuple) else out  # (1, T, hidden)
        return out[0, -1]  # (hidden,): h_T

    jac = torch.autograd.functional.jacobian(last_output, x)  # (hidden, 1, T, input_size)
    return jac.pow(2).sum(dim=(0, 1, 3)).sqrt()  # (T,): one Frobenius norm per position


def explore_hidden_state_gradient_norms() -> None:
    """The size of d h_T / d x_t against the distance T - t, through a recurrence
    and through one attention layer (the comparison of the chapter's first figure).
    """
    torch.manual_seed(0)
    T = 60
    x = torch.randn(T, 16, dtype=torch.float64)
    models = {"Elman RNN": attnlib.ElmanRNN(16, 16).double(),
              "attention (1 layer)": attnlib.MultiHeadAttention(16, 2).double()}
    distance = torch.arange(T - 1, -1, -1)  # T - t for t = 1 .. T
    for name, model in models.items():
        norms = hidden_state_gradient_norms(model, x)
        gap = (norms - attnlib.hidden_state_gradient_norms(model, x)).abs().max().item()
        print(f"{name}: largest difference from attnlib {gap:.1e}")
        plt.semilogy(distance.numpy(), norms.detach().numpy(), label=name)
    plt.xlabel("distance T - t"); plt.ylabel("||d h_T / d x_t||"); plt.legend(); plt.show()


# Slow: one backward pass per component of h_T (a loop over the hidden units), and the
# squared entries added up position by position (a loop over t).
def slow_hidden_state_gradient_norms(model: nn.Module, x: Tensor) -> Tensor:
    if x.ndim == 2:
        x = x.unsqueeze(0)  # (1, T, input_size)
    T = x.size(1)
    inputs = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(inputs)
        out = out[0] if isinstance(out, tuple) else out  # (1, T, hidden)
        h_T = out[0, -1]  # (hidden,)
        squares = torch.zeros(T, dtype=inputs.dtype, device=inputs.device)
        for i in range(h_T.numel()):
            grad = torch.autograd.grad(h_T[i], inputs, retain_graph=True, allow_unused=True)[0]
            if grad is None:  # h_T[i] does not depend on the inputs at all
                continue
            for t in range(T):
                squares[t] += grad[0, t].pow(2).sum()  # row i of the block d h_T / d x_t
    return squares.sqrt()  # (T,)


EXERCISES = [
    Exercise(
        "ElmanRNN",
        points=5,
        solution=ElmanRNN,
        guide=r"""
The constructor is written for you: `input_proj` holds $W_{ih}$ and $b_{ih}$, `hidden_proj`
holds $W_{hh}$ and $b_{hh}$, and `activation` is `torch.tanh` or `torch.relu`. Write
`forward`, the recurrence of Chapter 1, section *A recurrence and its gradient*:

$$h_t = f(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}), \qquad h_0 = 0 \text{ unless given.}$$

Return every hidden state, stacked along the time axis, and the last one.""",
        hints=(
            "Loop over `t in range(T)`; `x[:, t]` is the batch of tokens at step `t`, shape `(B, input_size)`.",
            "`outputs[:, t]` must be $h_t$, the state *after* reading token `t`, not the one before.",
            "Use `self.activation`, not `torch.tanh`: the module may have been built with `nonlinearity='relu'`.",
            "`torch.nn.RNN` is off limits: the point is to see the loop.",
        ),
        explore=explore_elmanrnn,
        slow=SlowElmanRNN,
    ),
    Exercise(
        "hidden_state_gradient_norms",
        points=3,
        solution=hidden_state_gradient_norms,
        guide=r"""
How strongly does the last output $h_T$ still depend on the input $x_t$? Chapter 1, sections
*A recurrence and its gradient* and *The code*, measure it by the Jacobian
$\partial h_T / \partial x_t$, a `(hidden, input_size)` block for every position `t`. Return
the Frobenius norm of each block (the square root of the sum of its squared entries): a
tensor of shape `(T,)`.

`model` maps `(1, T, input_size)` to `(1, T, hidden)`, or to a tuple whose first element is
that: your `ElmanRNN`, a `torch.nn.LSTM` with `batch_first=True`, or an attention layer
(which returns a plain tensor). $h_T$ is the model's output at the **last** position. `x` is
one sequence, `(T, input_size)` or `(1, T, input_size)`. The grader calls your function with
RNNs, an LSTM and attention layers, all in float64.""",
        hints=(
            "Start from `x.detach().requires_grad_(True)` (with a batch axis of 1 added if `x` is 2-D): autograd then differentiates with respect to it.",
            "One backward pass differentiates one number: `torch.autograd.grad(h_T[i], x, retain_graph=True)` is row `i` of the Jacobian, for every `t` at once. `torch.autograd.functional.jacobian` builds all the rows for you.",
            "A single backward pass of `h_T.sum()` is not enough: it adds the rows of the Jacobian together before you can take their norm.",
        ),
        explore=explore_hidden_state_gradient_norms,
        slow=slow_hidden_state_gradient_norms,
    ),
]
