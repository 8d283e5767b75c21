"""A decoder-only transformer in the shape of today's LLMs, from the parts of the course
(chapter 12, "Putting it together, and the attention of today's LLMs").

* :class:`RMSNorm`: the normalisation of LLaMA, Mistral and Qwen: divide by the root mean
  square of the features, then scale by a learned weight (no centring, no bias).
* :class:`SwiGLU`: the gated MLP of LLaMA, ``w_down(silu(w_gate(x)) * w_up(x))``.
* :class:`TransformerBlock`: one pre-norm decoder block,
  ``x = x + attn(norm1(x))`` then ``x = x + mlp(norm2(x))``, where ``attn`` is the
  course's :class:`attnlib.MultiHeadAttention` with GQA (chapter 6), RoPE (chapter 7) and
  causal masking (chapter 5).
* :class:`TinyGPT`: token embedding, ``n_layers`` blocks, a final RMSNorm and an output
  head, with greedy generation through a :class:`attnlib.KVCache` per layer (chapter 6).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import check_floating, check_positive_int, check_tensor, compute_dtype
from .kv_cache import KVCache
from .multihead import MultiHeadAttention

__all__ = ["RMSNorm", "SwiGLU", "TransformerBlock", "TinyGPT"]  # attnlib's public names


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang and Sennrich, 2019), as in LLaMA (chapter 12).

    ``y = x / sqrt(mean(x ** 2) + eps) * weight`` over the last axis. Unlike LayerNorm it
    neither subtracts the mean nor adds a bias. Computes the same function as
    ``torch.nn.RMSNorm(d_model, eps=eps)``; fp16/bf16 inputs are normalised in fp32 and
    cast back, as the LLaMA implementation does.

    Args:
        d_model: size of the last axis.
        eps: added to the mean square, for inputs near zero.
    """

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"eps must be a number, got {type(eps).__name__}")
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        self.d_model, self.eps = d_model, float(eps)
        self.weight = nn.Parameter(torch.ones(d_model))  # (d_model,)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., d_model)`` -> ``(..., d_model)``, same dtype."""
        check_tensor(x, "x", min_ndim=1)
        check_floating(x, "x")
        if x.size(-1) != self.d_model:
            raise ValueError(f"x must be (..., d_model={self.d_model}), got {tuple(x.shape)}")
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        """:meth:`forward` without the checks."""
        h = x.to(compute_dtype(x.dtype))  # (..., d_model), fp32 for fp16/bf16
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., d)
        return (h * self.weight.to(h.dtype)).to(x.dtype)  # (..., d_model)


class SwiGLU(nn.Module):
    """The gated feed-forward network of LLaMA (Shazeer, 2020) (chapter 12).

    ``mlp(x) = w_down(silu(w_gate(x)) * w_up(x))``, three linear maps without biases: the
    gate decides, feature by feature, how much of ``w_up(x)`` passes.

    Args:
        d_model: model width (input and output).
        d_ff: hidden width. ``None``: the multiple of 8 nearest to ``8/3 * d_model``
            (at least 8). With three matrices instead of two, ``8/3 * d_model`` keeps the
            parameter count of the classic ``4 * d_model`` two-matrix MLP; LLaMA rounds
            up to a multiple of 256 instead (11008 for ``d_model = 4096``; here 10920).
    """

    def __init__(self, d_model: int, d_ff: int | None = None) -> None:
        super().__init__()
        check_positive_int(d_model, "d_model")
        d_ff = self.default_d_ff(d_model) if d_ff is None else check_positive_int(d_ff, "d_ff")
        self.d_model, self.d_ff = d_model, d_ff
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    @staticmethod
    def default_d_ff(d_model: int) -> int:
        """The multiple of 8 nearest to ``8/3 * d_model``, at least 8."""
        return max(8, 8 * round(d_model / 3))  # 8/3 * d / 8 = d / 3, never a tie

    def forward(self, x: Tensor) -> Tensor:
        """``(..., d_model)`` -> ``(..., d_model)``."""
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # (..., d_model)


class TransformerBlock(nn.Module):
    """A pre-norm decoder block of today's LLMs (LLaMA, Mistral, Qwen) (chapter 12).

    ::

        x = x + attn(norm1(x))   # causal self-attention, GQA + RoPE
        x = x + mlp(norm2(x))    # SwiGLU

    The normalisations sit *before* each sublayer (pre-norm), so the residual stream ``x``
    itself is never normalised: gradients reach the first layers through the additions.

    Args:
        d_model: model width; must be divisible by ``n_heads``, and ``head_dim =
            d_model // n_heads`` must be even (RoPE rotates pairs of channels).
        n_heads: number of query heads.
        n_kv_heads: number of key/value heads (``None``: ``n_heads``; fewer: GQA, 1: MQA).
        d_ff: hidden width of the MLP; ``None``: see :class:`SwiGLU`.
        fused: compute attention with PyTorch's ``scaled_dot_product_attention`` instead
            of attnlib's manual version (same results to float tolerance).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        d_ff: int | None = None,
        fused: bool = False,
    ) -> None:
        super().__init__()
        MultiHeadAttention._valid_head_counts(d_model, n_heads, n_kv_heads)
        if (d_model // n_heads) % 2:
            raise ValueError(
                f"head_dim = d_model // n_heads = {d_model // n_heads} must be even for RoPE "
                f"(d_model={d_model}, n_heads={n_heads})"
            )
        self.d_model = d_model
        self.norm1 = RMSNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, n_kv_heads, bias=False, fused=fused,
                                       rope_base=10000.0)
        self.norm2 = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, d_ff)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        """Run the block on ``x``: ``(B, T, d_model)`` -> ``(B, T, d_model)``.

        Attention is causal. With a :class:`attnlib.KVCache`, ``x`` holds only the
        new tokens: they sit at positions ``cache.seq_len ..`` and attend causally to
        the cached prefix and to each other; their keys and values are appended to the
        cache. ``attn_mask`` (boolean, ``True`` = may attend, or float, added) narrows
        attention further, e.g. to a sliding window (:func:`attnlib.sink_window_mask`);
        it is passed to ``self.attn`` together with the causal rule.
        """
        self._validate(x)
        h = self.norm1(x)  # (B, T, d_model): normalise a copy, not the stream
        x = x + self.attn(h, attn_mask=attn_mask, is_causal=True, kv_cache=kv_cache)
        x = x + self.mlp(self.norm2(x))  # (B, T, d_model)
        return x

    def _validate(self, x: object) -> None:
        """The argument checks of :meth:`forward`."""
        check_tensor(x, "x", min_ndim=3)
        check_floating(x, "x")
        if x.ndim != 3 or x.size(-1) != self.d_model:
            raise ValueError(f"x must be (B, T, d_model={self.d_model}), got {tuple(x.shape)}")


class TinyGPT(nn.Module):
    """A small decoder-only language model built from :class:`TransformerBlock` (chapter 12).

    ``idx -> tok_emb -> blocks -> norm -> lm_head -> logits``. There is no table of learned
    positions: each block's attention rotates queries and keys with RoPE, so ``max_len``
    is only the longest sequence accepted (prompt, cached tokens and new tokens together).

    Choices, as in GPT-2 / nanoGPT:

    * the output head is *tied* to the embedding (``lm_head.weight is tok_emb.weight``),
      which saves ``vocab_size * d_model`` parameters (GPT-2, Gemma and the small LLaMA 3.2
      models tie; the larger LLaMAs do not);
    * weights start from a normal with std 0.02, the output projections of each residual
      branch (``attn.o_proj``, ``mlp.w_down``) with ``0.02 / sqrt(2 * n_layers)`` so that
      the residual stream does not grow with depth; norm weights start at 1. Seeding is the
      caller's: ``torch.manual_seed(0)`` before building the model.

    Args:
        vocab_size: number of token ids.
        d_model: model width.
        n_heads: query heads per block.
        n_layers: number of blocks.
        max_len: the longest sequence the model accepts.
        n_kv_heads: key/value heads per block (``None``: ``n_heads``).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        max_len: int,
        n_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(vocab_size, "vocab_size")
        check_positive_int(d_model, "d_model")
        check_positive_int(n_layers, "n_layers")
        check_positive_int(max_len, "max_len")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, n_kv_heads) for _ in range(n_layers)
        )
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one (vocab_size, d_model) matrix
        self._init_weights(n_layers)

    @torch.no_grad()
    def _init_weights(self, n_layers: int) -> None:
        """GPT-2's initialisation (see the class docstring)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(mean=0.0, std=0.02)
        for block in self.blocks:
            for w in (block.attn.o_proj.weight, block.mlp.w_down.weight):
                w.normal_(mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    def new_cache(self) -> list[KVCache]:
        """An empty :class:`attnlib.KVCache` per block, for :meth:`forward`'s ``kv_cache``."""
        return [KVCache() for _ in self.blocks]

    def forward(self, idx: Tensor, kv_cache: list[KVCache] | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        """Next-token logits at every position.

        Args:
            idx: ``(B, T)`` token ids, an integer tensor (``torch.long``).
            kv_cache: ``None``, or one :class:`attnlib.KVCache` per block (see
                :meth:`new_cache`); then ``idx`` holds only the *new* tokens, which
                follow the cached ones, and the caches grow by ``T`` positions.
            attn_mask: ``None``, or a mask every block applies on top of the causal
                rule (see :meth:`TransformerBlock.forward`), e.g.
                ``sink_window_mask(T, w, s)``.

        Returns:
            ``(B, T, vocab_size)`` logits; position ``t`` scores the token after ``t``.
        """
        self._validate(idx, kv_cache)
        caches = kv_cache if kv_cache is not None else [None] * len(self.blocks)
        x = self.tok_emb(idx)  # (B, T, d_model)
        for block, cache in zip(self.blocks, caches):
            x = block(x, kv_cache=cache, attn_mask=attn_mask)  # (B, T, d_model)
        return self.lm_head(self.norm(x))  # (B, T, vocab_size)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int,
                 use_cache: bool = True) -> Tensor:
        """Greedy decoding: append the most likely next token, ``max_new_tokens`` times.

        With ``use_cache=True`` the prompt is run once (prefill) and each new token is
        then fed alone through the per-block KV caches; with ``use_cache=False`` the
        whole sequence is run again at every step. Both give the same tokens; the cache
        only saves work (chapter 6).

        Args:
            idx: ``(B, T)`` prompt token ids (``torch.long``).
            max_new_tokens: how many tokens to add (0 returns the prompt);
                ``T + max_new_tokens`` must not exceed ``max_len``.
            use_cache: decode through a KV cache.

        Returns:
            ``(B, T + max_new_tokens)``: the prompt followed by the new tokens.
        """
        self._validate_generate(idx, max_new_tokens)
        if max_new_tokens == 0:
            return idx
        cache = self.new_cache() if use_cache else None
        logits = self(idx, kv_cache=cache)  # (B, T, vocab_size)
        for step in range(max_new_tokens):
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)  # (B, T + step + 1)
            if step + 1 < max_new_tokens:
                logits = self(next_token, kv_cache=cache) if use_cache else self(idx)
        return idx

    def _validate_generate(self, idx: object, max_new_tokens: object) -> None:
        """The argument checks of :meth:`generate`."""
        check_positive_int(max_new_tokens, "max_new_tokens", allow_zero=True)
        self._validate(idx, None)
        if idx.size(1) + max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt length {idx.size(1)} + max_new_tokens {max_new_tokens} exceeds "
                f"max_len={self.max_len}"
            )

    def _validate(self, idx: object, kv_cache: object) -> None:
        """The argument checks of :meth:`forward`."""
        check_tensor(idx, "idx", min_ndim=0)
        if idx.dtype not in (torch.long, torch.int32):
            raise TypeError(f"idx must hold token ids as torch.long, got dtype {idx.dtype}")
        if idx.ndim != 2 or idx.size(1) == 0:
            raise ValueError(
                f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}; "
                f"add a batch axis with idx[None] for a single sequence"
            )
        if bool(((idx < 0) | (idx >= self.vocab_size)).any()):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size})")
        cached = 0
        if kv_cache is not None:
            if not isinstance(kv_cache, (list, tuple)) or not all(
                isinstance(c, KVCache) for c in kv_cache
            ):
                raise TypeError(
                    f"kv_cache must be a list of KVCache, one per block (see new_cache()), "
                    f"got {type(kv_cache).__name__}"
                )
            if len(kv_cache) != len(self.blocks):
                raise ValueError(
                    f"kv_cache must hold one KVCache per block: {len(self.blocks)}, "
                    f"got {len(kv_cache)}"
                )
            cached = kv_cache[0].seq_len
        if cached + idx.size(1) > self.max_len:
            raise ValueError(
                f"sequence of {cached + idx.size(1)} tokens ({cached} cached + {idx.size(1)} "
                f"new) exceeds max_len={self.max_len}"
            )
