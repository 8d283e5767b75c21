"""Tests for attnlib.triton_flash (chapter 13): the FlashAttention-2 Triton kernels, run on
the CPU under Triton's interpreter, against attnlib's and PyTorch's attention."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlib
from attnlib.triton_flash import INTERPRETED, flash_attention_triton


def _qkv(B, H, L, S, D, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, H, n, D, generator=g).to(dtype) for n in (L, S, S)]
    return [t.requires_grad_(requires_grad) for t in out]


def _reference(q, k, v, is_causal, scale=None):
    """attnlib's attention in float64 on the same (rounded) inputs."""
    return attnlib.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=is_causal, scale=scale)


def test_runs_under_the_interpreter_on_this_machine():
    assert INTERPRETED == (not torch.cuda.is_available())


@pytest.mark.parametrize("B, H, L, S, D, causal", [
    (1, 1, 64, 64, 16, False),  # one tile
    (2, 3, 100, 70, 32, True),  # ragged blocks, L > S, causal top-left
    (1, 2, 37, 129, 64, False),  # L < S, three key blocks, the last of one key
    (1, 1, 70, 150, 64, True),  # causal with S > L: the last keys are never seen
    (1, 1, 20, 20, 128, True),
])
def test_forward_equals_attention_in_float32(B, H, L, S, D, causal):
    q, k, v = _qkv(B, H, L, S, D, seed=L + S)
    out = flash_attention_triton(q, k, v, is_causal=causal)
    assert out.dtype == torch.float32 and out.shape == (B, H, L, D)
    torch.testing.assert_close(out.double(), _reference(q, k, v, causal), rtol=0, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_forward_equals_torch_sdpa_in_float16(causal):
    q, k, v = _qkv(2, 2, 130, 130, 64, torch.float16, seed=3)
    out = flash_attention_triton(q, k, v, is_causal=causal)
    assert out.dtype == torch.float16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    # fp16 output and fp16 weights into the second matmul: errors of a few 1e-4
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-3)


def test_custom_scale_and_non_contiguous_inputs():
    q, k, v = _qkv(1, 2, 48, 40, 32, seed=5)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not qt.is_contiguous()
    out = flash_attention_triton(qt, k, v, scale=0.05)
    torch.testing.assert_close(out.double(), _reference(q, k, v, False, scale=0.05), rtol=0, atol=2e-6)


@pytest.mark.parametrize("B, H, L, S, D, causal", [
    (1, 1, 64, 64, 16, False),
    (2, 2, 100, 70, 32, True),
    (1, 1, 37, 129, 64, False),
    (1, 2, 90, 130, 32, True),
])
def test_backward_equals_autograd_in_float32(B, H, L, S, D, causal):
    q, k, v = _qkv(B, H, L, S, D, seed=7 + L, requires_grad=True)
    grad = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(9))
    flash_attention_triton(q, k, v, is_causal=causal).backward(grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attnlib.scaled_dot_product_attention(q64, k64, v64, is_causal=causal).backward(grad.double())
    for got, want, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5, msg=name)


def test_backward_in_float16_close_to_float32_gradients():
    q, k, v = _qkv(1, 2, 96, 96, 64, torch.float16, seed=11, requires_grad=True)
    grad = torch.randn(1, 2, 96, 64, generator=torch.Generator().manual_seed(12)).half()
    flash_attention_triton(q, k, v, is_causal=True).backward(grad)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q32, k32, v32, is_causal=True).backward(grad.float())
    for got, want in ((q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-2)


@settings(max_examples=6, deadline=None)
@given(L=st.integers(1, 80), S=st.integers(1, 80), D=st.sampled_from([16, 32]),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_any_lengths_forward_and_backward(L, S, D, causal, seed):
    q, k, v = _qkv(1, 1, L, S, D, seed=seed, requires_grad=True)
    out = flash_attention_triton(q, k, v, is_causal=causal)
    out.sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attnlib.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=2e-6)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


def test_the_weights_rows_sum_to_one_through_the_lse():
    # With v = ones, every output entry is the row's weight sum: exactly 1.
    q, k, _ = _qkv(1, 2, 70, 90, 32, seed=13)
    out = flash_attention_triton(q * 30, k, torch.ones(1, 2, 90, 32), is_causal=True)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize("args, kwargs, error, match", [
    (_qkv(1, 1, 8, 8, 16, torch.bfloat16), {}, TypeError, "bfloat16 runs only on a GPU"),
    (_qkv(1, 1, 8, 8, 48), {}, ValueError, "head_dim must be one of"),
    (_qkv(1, 1, 8, 8, 16)[:2] + [torch.zeros(1, 1, 9, 16)], {}, ValueError, "key and value must be"),
    ([torch.zeros(8, 16)] * 3, {}, ValueError, "must be 4-D"),
    (_qkv(1, 1, 8, 8, 16), {"is_causal": 1}, TypeError, "is_causal must be a bool"),
    (_qkv(1, 1, 8, 8, 16), {"scale": -1.0}, ValueError, "scale must be a positive"),
    (_qkv(1, 1, 0, 8, 16), {}, ValueError, "L and S must be >= 1"),
])
def test_bad_inputs_give_clear_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        flash_attention_triton(*args, **kwargs)


def test_importing_attnlib_does_not_import_triton():
    code = "import sys, attnlib; assert 'triton' not in sys.modules, 'attnlib imported triton'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_scale_is_one_over_sqrt_head_dim():
    q, k, v = _qkv(1, 1, 16, 16, 64, seed=17)
    torch.testing.assert_close(flash_attention_triton(q, k, v),
                               flash_attention_triton(q, k, v, scale=1 / math.sqrt(64)))


def test_the_launchers_run_a_given_kernel_and_return_what_the_backward_needs():
    from attnlib.triton_flash import flash_backward, flash_bwd_kernel, flash_forward, flash_fwd_kernel

    q, k, v = _qkv(1, 2, 50, 70, 32, seed=21)
    out, lse = flash_forward(q, k, v, is_causal=True, kernel=flash_fwd_kernel)
    assert lse.shape == (1, 2, 50) and lse.dtype == torch.float32
    scores = (q.double() @ k.double().mT) / math.sqrt(32)
    scores = scores.masked_fill(~torch.ones(50, 70, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=0, atol=1e-5)
    grad = torch.ones_like(out)
    dq, dk, dv = flash_backward(q, k, v, out, lse, grad, is_causal=True, kernel=flash_bwd_kernel)
    q2, k2, v2 = (t.double().requires_grad_() for t in (q, k, v))
    attnlib.scaled_dot_product_attention(q2, k2, v2, is_causal=True).sum().backward()
    for got, want in ((dq, q2.grad), (dk, k2.grad), (dv, v2.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="lse must be a torch.float32 tensor of shape"):
        flash_backward(q, k, v, out, lse[..., :-1], grad)


def test_triton_imported_first_without_the_interpreter_is_a_clear_error():
    code = ("import os, sys; os.environ.pop('TRITON_INTERPRET', None); import triton.language\n"
            "try:\n    import attnlib.triton_flash\nexcept ImportError as e:\n    print(e)\n")
    if torch.cuda.is_available():
        pytest.skip("with a GPU, triton imported first is the normal, compiled mode")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "set TRITON_INTERPRET=1 before anything imports triton" in run.stdout, run.stderr
