"""A minimal recurrent network, to measure what attention replaced (chapter 1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._validate import check_positive_int, check_tensor

__all__ = ["ElmanRNN", "hidden_state_gradient_norms"]  # attnlib's public names from this module


class ElmanRNN(nn.Module):
    """The vanilla (Elman) RNN, written as the loop it is (chapter 1).

    ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``: one step per token, each
    waiting for the previous one, and everything seen so far squeezed into ``h_t``.
    Same function as ``torch.nn.RNN(batch_first=True)`` with one layer (the test copies
    its weights and compares).

    Args:
        input_size: features per token.
        hidden_size: size of the hidden state.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        bias: use the two bias vectors.
    """

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh",
                 bias: bool = True) -> None:
        super().__init__()
        check_positive_int(input_size, "input_size")
        check_positive_int(hidden_size, "hidden_size")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.hidden_size = hidden_size
        self.activation = torch.tanh if nonlinearity == "tanh" else torch.relu
        self.input_proj = nn.Linear(input_size, hidden_size, bias=bias)  # W_ih, b_ih
        self.hidden_proj = nn.Linear(hidden_size, hidden_size, bias=bias)  # W_hh, b_hh

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the recurrence over the sequence.

        Args:
            x: ``(B, T, input_size)``.
            h0: ``(B, hidden_size)`` initial state; zeros if ``None``.

        Returns:
            ``(outputs, h_T)``: every hidden state ``(B, T, hidden_size)`` and the last one
            ``(B, hidden_size)``.
        """
        check_tensor(x, "x", min_ndim=3)
        return _elman_loop(self, x, h0)


def _elman_loop(rnn: ElmanRNN, x: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """``ElmanRNN.forward`` without the checks: eq. (rnn-step) as the loop it is."""
    B, T, _ = x.shape
    h = x.new_zeros(B, rnn.hidden_size) if h0 is None else h0  # (B, hidden)
    inputs = rnn.input_proj(x)  # (B, T, hidden): W_ih x_t + b_ih for all t at once
    outputs = []
    for t in range(T):  # the sequential part: step t needs step t - 1
        h = rnn.activation(inputs[:, t] + rnn.hidden_proj(h))  # (B, hidden)
        outputs.append(h)
    if not outputs:
        return x.new_zeros(B, 0, rnn.hidden_size), h
    return torch.stack(outputs, dim=1), h  # (B, T, hidden), (B, hidden)


def hidden_state_gradient_norms(model: nn.Module, x: Tensor) -> Tensor:
    """Norm of the Jacobian d h_T / d x_t for every input position t (chapter 1).

    ``h_T`` is the model's output at the last position. For an RNN this norm shrinks (or
    explodes) geometrically with the distance ``T - t``; through one attention layer every
    position is one step away.

    Args:
        model: maps ``(1, T, input_size)`` to ``(1, T, hidden)`` or to a tuple whose first
            element is that (``ElmanRNN``, ``nn.RNN``/``nn.LSTM``/``nn.GRU`` with
            ``batch_first=True``, or an attention block).
        x: one sequence, ``(T, input_size)`` or ``(1, T, input_size)``.

    Returns:
        ``(T,)`` Frobenius norms, entry ``t`` for ``|| d h_T / d x_t ||``.
    """
    check_tensor(x, "x", min_ndim=2)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3 or x.size(0) != 1:
        raise ValueError(
            f"x must be (T, input_size) or (1, T, input_size), got {tuple(x.shape)}"
        )
    check_positive_int(x.size(1), "sequence length T")
    return _jacobian_norms(model, x)


def _jacobian_norms(model: nn.Module, x: Tensor) -> Tensor:
    """hidden_state_gradient_norms without the checks; x is (1, T, input_size)."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out  # RNNs return (outputs, state)
    h_last = out[0, -1]  # (hidden,): the last state h_T
    rows = []
    for i in range(h_last.numel()):  # one backward pass per component of h_T
        (grad,) = torch.autograd.grad(h_last[i], x, retain_graph=True)
        rows.append(grad[0])  # (T, input_size): row i of the Jacobian, for every t
    jacobian = torch.stack(rows)  # (hidden, T, input_size)
    return jacobian.pow(2).sum(dim=(0, 2)).sqrt()  # (T,): one norm per position t
