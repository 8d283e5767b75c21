"""The chapter 1 RNN and the gradient-norm measurement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnlib
from conftest import randn


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_h0", [False, True])
def test_elman_rnn_matches_torch_rnn(nonlinearity, bias, with_h0):
    torch.manual_seed(0)
    ref = nn.RNN(5, 7, nonlinearity=nonlinearity, bias=bias, batch_first=True).double()
    ours = attnlib.ElmanRNN(5, 7, nonlinearity=nonlinearity, bias=bias).double()
    with torch.no_grad():
        ours.input_proj.weight.copy_(ref.weight_ih_l0)
        ours.hidden_proj.weight.copy_(ref.weight_hh_l0)
        if bias:
            ours.input_proj.bias.copy_(ref.bias_ih_l0)
            ours.hidden_proj.bias.copy_(ref.bias_hh_l0)
    x = randn(3, 11, 5)
    h0 = randn(3, 7, seed=1) if with_h0 else None
    out, h_last = ours(x, h0)
    ref_out, ref_h = ref(x, None if h0 is None else h0[None])
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_last, ref_h[0], rtol=1e-12, atol=1e-12)


def test_gradient_norms_equal_the_full_jacobian():
    torch.manual_seed(1)
    rnn = attnlib.ElmanRNN(3, 6).double()
    x = randn(9, 3)
    norms = attnlib.hidden_state_gradient_norms(rnn, x)
    jac = torch.autograd.functional.jacobian(lambda inp: rnn(inp[None])[0][0, -1], x)  # (6, 9, 3)
    torch.testing.assert_close(norms, jac.pow(2).sum((0, 2)).sqrt(), rtol=1e-12, atol=1e-14)
    assert norms.shape == (9,)


def test_rnn_gradient_decays_with_distance_but_attention_does_not():
    torch.manual_seed(2)
    rnn = attnlib.ElmanRNN(8, 32).double()
    with torch.no_grad():  # a contracting recurrence: spectral radius 0.5
        w = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0]
        rnn.hidden_proj.weight.copy_(0.5 * w)
    x = randn(40, 8, seed=3)
    rnn_norms = attnlib.hidden_state_gradient_norms(rnn, x)
    assert rnn_norms[0] < 1e-8 * rnn_norms[-1]  # 39 steps at most 0.5 each: below 2e-12
    assert (rnn_norms[1:] >= rnn_norms[:-1]).float().mean() > 0.9  # grows towards the end
    mha = attnlib.MultiHeadAttention(8, 2).double()
    attn_norms = attnlib.hidden_state_gradient_norms(mha, x)
    assert attn_norms[:-1].min() > 1e-3 * attn_norms[:-1].max()  # every position one step away
    lstm = nn.LSTM(8, 16, batch_first=True).double()
    assert attnlib.hidden_state_gradient_norms(lstm, x[None]).shape == (40,)


def test_bad_input():
    rnn = attnlib.ElmanRNN(3, 4)
    with pytest.raises(ValueError, match="nonlinearity"):
        attnlib.ElmanRNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match=r"\(T, input_size\)"):
        attnlib.hidden_state_gradient_norms(rnn, torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        attnlib.hidden_state_gradient_norms(rnn, [[1.0, 2.0, 3.0]])
