"""Write the exercise notebooks of the course, and (with ``--release``) the student versions.

One source notebook per chapter, ``solutions/<assignment>/<assignment>.ipynb`` (the nbgrader
source directory; see ``nbgrader_config.py``), built from the compact specification below:
guidance text, hints, the graded exercises (ids registered in :mod:`attnlib.grading`), their
points, the solution bodies (plain torch) and ungraded "explore" cells.

The signature and docstring of every stub are copied from the attnlib reference with
:mod:`inspect`, never typed by hand: for a function exercise the ``def`` line(s) and the
docstring; for a module exercise the whole reference class, with the bodies of the graded
methods replaced by ``### BEGIN SOLUTION`` / ``### END SOLUTION`` regions.

Usage (from the repository root)::

    .venv/bin/python tools/build_exercises.py            # write solutions/
    .venv/bin/python tools/build_exercises.py --release  # ... then nbgrader -> notebooks/

``--release`` runs ``nbgrader generate_assignment "[0-9][0-9]_*" --force --no-db`` (every
assignment, in one process), so ``notebooks/`` is exactly what nbgrader produces from
``solutions/`` (no gradebook is written anywhere). ``--root DIR`` writes into another course root (used by the tests).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: import the repository's attnlib
    sys.path.insert(0, str(REPO))

from attnlib.grading import EXERCISES  # noqa: E402

SOURCE_DIR = "solutions"
RELEASE_DIR = "notebooks"

# --------------------------------------------------------------------------- the imports


def repository_install_target(root: Path = REPO) -> str:
    """``git+<repository.url>[@<repository.branch>]`` from ``_config.yml``, the one place the
    course's public repository is named (the book's Colab/Binder links come from it too)."""
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8"))
    repo = config.get("repository") or {}
    url = str(repo.get("url") or "").rstrip("/")
    if not url.startswith("https://"):
        raise ValueError(f"_config.yml: repository.url must be an https URL, got {url!r}")
    branch = str(repo.get("branch") or "")
    return f"git+{url}" + (f"@{branch}" if branch else "")


def install_source() -> str:
    """The first code cell: installs the course package where it is missing (Google Colab),
    and does nothing where it is installed (a clone, Binder, the grader, nbgrader)."""
    return f"""\
# Google Colab (or any Python without the course package): install attnlib from the course's
# repository. Where attnlib is already installed (your clone, Binder, the grader) this does nothing.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("attnlib") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    {json.dumps(repository_install_target())}], check=True)
"""


BASE_IMPORTS = """\
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnlib  # the reference: used only by the explore cells, to compare with your result
"""

# --------------------------------------------------------------------------- the exercises
#
# Per chapter: title, intro (markdown), extra imports, exercises. Per exercise: id (as in
# attnlib.grading.EXERCISES), points, guide (markdown), hints, solution (the body for a
# function; {method: body} for a module), explore (code of an ungraded cell, or "").
# Bodies are written at indentation 0; the builder indents them.

CHAPTERS: dict[str, dict] = {}

# MultiHeadAttention.forward is graded twice: in chapter 4 (MHA, self- and cross-attention,
# masks) and in chapter 6 (GQA/MQA and decoding with a KV cache). One solution serves both.
MHA_FORWARD_SOLUTION = """\
source = x if context is None else context
B, L, _ = x.shape
q = self.split_heads(self.q_proj(x), self.n_heads)  # (B, H, L, D)
k = self.split_heads(self.k_proj(source), self.n_kv_heads)  # (B, H_kv, S, D)
v = self.split_heads(self.v_proj(source), self.n_kv_heads)
offset = 0 if kv_cache is None else kv_cache.seq_len
if self.rope_base is not None:  # rotate-half RoPE at absolute positions (chapter 7)
    def rope(t: Tensor, pos: Tensor) -> Tensor:
        D = t.size(-1)
        inv_freq = 1.0 / (self.rope_base ** (torch.arange(0, D, 2, device=t.device).float() / D))
        angle = pos.float()[:, None] * inv_freq  # (L, D/2)
        angle = torch.cat((angle, angle), dim=-1)
        half1, half2 = t[..., : D // 2], t[..., D // 2:]
        return t * angle.cos().to(t.dtype) + torch.cat((-half2, half1), dim=-1) * angle.sin().to(t.dtype)
    q = rope(q, torch.arange(offset, offset + L, device=x.device))
    k_pos = torch.arange(offset, offset + L) if context is None else torch.arange(k.size(-2))
    k = rope(k, k_pos.to(x.device))
if kv_cache is not None:
    k, v = kv_cache.update(k, v)  # every cached position, old ones first
    allowed = torch.ones(L, offset + L, dtype=torch.bool, device=x.device).tril(offset)
    if attn_mask is None:
        attn_mask = allowed
    elif attn_mask.dtype == torch.bool:
        attn_mask = allowed & attn_mask
    else:
        attn_mask = attn_mask.to(q.dtype).masked_fill(~allowed, float("-inf"))
    is_causal = False
n_rep = self.n_heads // self.n_kv_heads
k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, H, S, D)
if self.fused:
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
else:
    scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, L, S)
    S = scores.size(-1)
    neg_inf = torch.full_like(scores, float("-inf"))
    if is_causal:
        scores = torch.where(torch.ones(L, S, dtype=torch.bool, device=x.device).tril(), scores, neg_inf)
    if attn_mask is not None:
        scores = torch.where(attn_mask, scores, neg_inf) if attn_mask.dtype == torch.bool \\
            else scores + attn_mask
    peak = scores.amax(dim=-1, keepdim=True)
    e = torch.exp(scores - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)))
    total = e.sum(dim=-1, keepdim=True)
    y = e / torch.where(total == 0, torch.ones_like(total), total) @ v  # (B, H, L, D)
return self.o_proj(self.merge_heads(y))  # (B, L, d_model)
"""

CHAPTERS["01_recurrence"] = dict(
    number=1,
    title="Why attention replaced recurrence",
    intro="""\
You write the vanilla (Elman) recurrent network as the loop it is. Running it makes the two
problems of recurrence concrete: every step waits for the previous one, and everything the
network has read is squeezed into one hidden vector. Then you measure the second problem: how
strongly the last hidden state still depends on each input, through a recurrence and through
one attention layer.""",
    imports="from attnlib._validate import check_positive_int  # used by the constructor\n",
    exercises=[
        dict(
            id="ElmanRNN",
            points=5,
            guide="""\
The constructor is written for you: `input_proj` holds $W_{ih}$ and $b_{ih}$, `hidden_proj`
holds $W_{hh}$ and $b_{hh}$, and `activation` is `torch.tanh` or `torch.relu`. Write
`forward`, the recurrence of Chapter 1, section *A recurrence and its gradient*:

$$h_t = f(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}), \\qquad h_0 = 0 \\text{ unless given.}$$

Return every hidden state, stacked along the time axis, and the last one.""",
            hints=[
                "Loop over `t in range(T)`; `x[:, t]` is the batch of tokens at step `t`, shape `(B, input_size)`.",
                "`outputs[:, t]` must be $h_t$, the state *after* reading token `t`, not the one before.",
                "Use `self.activation`, not `torch.tanh`: the module may have been built with `nonlinearity='relu'`.",
                "`torch.nn.RNN` is off limits: the point is to see the loop.",
            ],
            solution={"forward": """\
B, T, _ = x.shape
h = x.new_zeros(B, self.hidden_size) if h0 is None else h0
states = []
for t in range(T):
    h = self.activation(self.input_proj(x[:, t]) + self.hidden_proj(h))  # (B, hidden)
    states.append(h)
if not states:
    return x.new_zeros(B, 0, self.hidden_size), h
return torch.stack(states, dim=1), h  # (B, T, hidden), (B, hidden)
"""},
            explore="""\
# Explore (not graded): your RNN beside attnlib's, with the same weights.
torch.manual_seed(0)
ref = attnlib.ElmanRNN(3, 16)
try:
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
except NotImplementedError:
    print("ElmanRNN.forward is not written yet: fill in the cell above and run this one again.")
""",
        ),
        dict(
            id="hidden_state_gradient_norms",
            points=3,
            guide="""\
How strongly does the last output $h_T$ still depend on the input $x_t$? Chapter 1, sections
*A recurrence and its gradient* and *The code*, measure it by the Jacobian
$\\partial h_T / \\partial x_t$, a `(hidden, input_size)` block for every position `t`. Return
the Frobenius norm of each block (the square root of the sum of its squared entries): a
tensor of shape `(T,)`.

`model` maps `(1, T, input_size)` to `(1, T, hidden)`, or to a tuple whose first element is
that: your `ElmanRNN`, a `torch.nn.LSTM` with `batch_first=True`, or an attention layer
(which returns a plain tensor). $h_T$ is the model's output at the **last** position. `x` is
one sequence, `(T, input_size)` or `(1, T, input_size)`. The grader calls your function with
RNNs, an LSTM and attention layers, all in float64.""",
            hints=[
                "Start from `x.detach().requires_grad_(True)` (with a batch axis of 1 added if `x` is 2-D): autograd then differentiates with respect to it.",
                "One backward pass differentiates one number: `torch.autograd.grad(h_T[i], x, retain_graph=True)` is row `i` of the Jacobian, for every `t` at once. `torch.autograd.functional.jacobian` builds all the rows for you.",
                "A single backward pass of `h_T.sum()` is not enough: it adds the rows of the Jacobian together before you can take their norm.",
            ],
            solution="""\
if x.ndim == 2:
    x = x.unsqueeze(0)  # (1, T, input_size)
x = x.detach()

def last_output(inputs: Tensor) -> Tensor:
    out = model(inputs)
    out = out[0] if isinstance(out, tuple) else out  # (1, T, hidden)
    return out[0, -1]  # (hidden,): h_T

jac = torch.autograd.functional.jacobian(last_output, x)  # (hidden, 1, T, input_size)
return jac.pow(2).sum(dim=(0, 1, 3)).sqrt()  # (T,): one Frobenius norm per position
""",
            explore="""\
# Explore (not graded): d h_T / d x_t against the distance T - t, through a recurrence and
# through one attention layer (the comparison of the chapter's first figure).
torch.manual_seed(0)
T = 60
x = torch.randn(T, 16, dtype=torch.float64)
models = {"Elman RNN": attnlib.ElmanRNN(16, 16).double(),
          "attention (1 layer)": attnlib.MultiHeadAttention(16, 2).double()}
try:
    distance = torch.arange(T - 1, -1, -1)  # T - t for t = 1 .. T
    for name, model in models.items():
        norms = hidden_state_gradient_norms(model, x)
        gap = (norms - attnlib.hidden_state_gradient_norms(model, x)).abs().max().item()
        print(f"{name}: largest difference from attnlib {gap:.1e}")
        plt.semilogy(distance.numpy(), norms.detach().numpy(), label=name)
    plt.xlabel("distance T - t"); plt.ylabel("||d h_T / d x_t||"); plt.legend(); plt.show()
except NotImplementedError:
    print("hidden_state_gradient_norms is not written yet: fill in the cell above and run this one again.")
""",
        ),
    ],
)

CHAPTERS["02_queries_keys_values"] = dict(
    number=2,
    title="Queries, keys and values: attention as a soft lookup",
    intro="""\
You write the two functions every later chapter builds on: a softmax that cannot overflow,
and scaled dot-product attention with PyTorch's arguments and mask conventions.""",
    imports="",
    exercises=[
        dict(
            id="softmax",
            points=3,
            guide="""\
Write a numerically stable softmax along `dim` (Chapter 2, section *A softmax that cannot
overflow*). Subtract the maximum along `dim` before exponentiating: the result is unchanged,
and logits of $10^4$ no longer overflow. Two details the naive formula gets wrong:

* a row that is entirely `-inf` (every key masked) must come out as zeros, not NaN;
* float16/bfloat16 inputs are computed in float32 and cast back at the end.""",
            hints=[
                "`x.amax(dim=dim, keepdim=True)` keeps the axis, so the subtraction broadcasts.",
                "The maximum of an all `-inf` row is `-inf`, and `-inf - (-inf)` is NaN: replace a non-finite maximum by 0 (`torch.where` with `torch.isfinite`).",
                "Such a row then sums to 0: divide by 1 instead of 0 there.",
                "`torch.softmax`, `F.softmax` and `Tensor.softmax` are off limits.",
            ],
            solution="""\
work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
z = x.to(work)
peak = z.amax(dim=dim, keepdim=True)
peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # all -inf row: shift by 0
e = torch.exp(z - peak)
total = e.sum(dim=dim, keepdim=True)
total = torch.where(total == 0, torch.ones_like(total), total)  # all -inf row: zeros, not NaN
return (e / total).to(x.dtype)
""",
            explore="""\
# Explore (not graded): your softmax on huge logits, beside attnlib's.
logits = torch.tensor([[1000.0, 1001.0, 1002.0, 999.0]])
try:
    ours = softmax(logits)
    theirs = attnlib.softmax(logits)
    print("yours:  ", ours)
    print("attnlib:", theirs)
    print("naive:  ", torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True), "(overflow)")
    plt.bar(range(4), ours[0].numpy(), alpha=0.6, label="yours")
    plt.bar(range(4), theirs[0].numpy(), alpha=0.6, label="attnlib")
    plt.legend(); plt.xlabel("key"); plt.ylabel("weight"); plt.show()
except NotImplementedError:
    print("softmax is not written yet: fill in the cell above and run this one again.")
""",
        ),
        dict(
            id="scaled_dot_product_attention",
            points=5,
            guide="""\
Write $\\mathrm{softmax}(QK^\\top \\cdot \\text{scale} + \\text{mask})\\,V$ with the arguments of
`torch.nn.functional.scaled_dot_product_attention` (Chapter 2, sections *All queries at once*
and *The code*). The conventions, all tested:

* `scale=None` means $1/\\sqrt{E}$, with $E$ the last dimension of the query;
* a boolean `attn_mask` marks with `True` the keys a query **may** attend to; a floating
  mask is **added** to the scores; either one broadcasts against `(..., L, S)`;
* `is_causal=True` lets query `i` see keys `0..i`, aligned top-left even when `L != S`, and
  combines with `attn_mask` when both are given;
* a query row whose keys are all masked gets zero weights (and a zero output), not NaN;
* float16/bfloat16 are computed in float32; the output has the query's dtype.""",
            hints=[
                "Compute the scores with `query @ key.transpose(-2, -1)`: shape `(..., L, S)`.",
                "Turn every mask into `-inf` entries of the scores (`torch.where(mask, scores, -inf)` for a boolean one), then use your `softmax` from above.",
                "`torch.ones(L, S, dtype=torch.bool).tril()` is the top-left causal mask.",
                "`F.scaled_dot_product_attention` is off limits; so is attnlib.",
            ],
            solution="""\
work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
q, k, v = query.to(work), key.to(work), value.to(work)
if enable_gqa and k.size(-3) != q.size(-3):  # grouped-query attention: share each KV head
    n_rep = q.size(-3) // k.size(-3)
    k = k.repeat_interleave(n_rep, dim=-3)
    v = v.repeat_interleave(n_rep, dim=-3)
if scale is None:
    scale = 1.0 / math.sqrt(q.size(-1))
scores = (q @ k.transpose(-2, -1)) * scale  # (..., L, S)
L, S = scores.shape[-2:]
if is_causal:
    allowed = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
if attn_mask is not None:
    if attn_mask.dtype == torch.bool:
        scores = torch.where(attn_mask, scores, torch.full_like(scores, float("-inf")))
    else:
        scores = scores + attn_mask.to(work)
weights = softmax(scores, dim=-1)  # a fully masked row gives zeros
if dropout_p > 0.0:
    keep = torch.rand(weights.shape, generator=generator, device=weights.device) >= dropout_p
    weights = weights * keep / (1.0 - dropout_p)
return (weights @ v).to(query.dtype)  # (..., L, Ev)
""",
            explore="""\
# Explore (not graded): a soft lookup. Each query is close to one key; which value does it get?
torch.manual_seed(0)
keys = torch.eye(4, 8)                 # 4 keys, 8 dimensions
values = torch.arange(4.0)[:, None]    # value j is the number j
queries = 3 * keys[[2, 0, 3]] + 0.3 * torch.randn(3, 8)
try:
    out = scaled_dot_product_attention(queries, keys, values)
    ref = attnlib.scaled_dot_product_attention(queries, keys, values)
    print("yours:  ", out.squeeze(-1))
    print("attnlib:", ref.squeeze(-1), "(queries were built near keys 2, 0, 3)")
    w = attnlib.attention_weights(queries, keys)
    plt.imshow(w.numpy(), cmap="viridis"); plt.colorbar(); plt.xlabel("key"); plt.ylabel("query")
    plt.title("attention weights (attnlib)"); plt.show()
except NotImplementedError:
    print("scaled_dot_product_attention (or softmax) is not written yet: fill in the cells above.")
""",
        ),
    ],
)

CHAPTERS["03_scaling"] = dict(
    number=3,
    title="Why divide by √d_k",
    intro="""\
You write the attention weights on their own, the place where the $1/\\sqrt{d_k}$ factor
acts, and the entropy that measures what happens to them without it: rows that collapse to
one-hot as $d_k$ grows.""",
    imports="",
    exercises=[
        dict(
            id="attention_weights",
            points=4,
            guide="""\
Return the weights $\\mathrm{softmax}(QK^\\top \\cdot \\text{scale} + \\text{mask})$ of shape
`(..., L, S)` (Chapter 3, sections *The variance of a dot product* and *The code*). The
default scale is $1/\\sqrt{E}$: without it, the variance of a dot product grows with $E$ and
the softmax saturates. The mask conventions are those of PyTorch (and of Chapter 2):
boolean `True` = may attend, floating = added, `is_causal` top-left aligned and combined with
`attn_mask`, a fully masked row gives zeros. Compute float16/bfloat16 in float32 and return
the query's dtype.""",
            hints=[
                "`scale` may be given: use `1 / math.sqrt(E)` only when it is `None`.",
                "Write the stable softmax inline (shift by the row maximum, zero for an all `-inf` row): attnlib and `torch.softmax` are off limits here.",
                "With `enable_gqa`, key head `h // (H_q / H_kv)` serves query head `h`: `repeat_interleave` on axis -3.",
            ],
            solution="""\
work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
q, k = query.to(work), key.to(work)
if enable_gqa and k.size(-3) != q.size(-3):
    k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
if scale is None:
    scale = 1.0 / math.sqrt(q.size(-1))
scores = (q @ k.transpose(-2, -1)) * scale  # (..., L, S)
L, S = scores.shape[-2:]
neg_inf = torch.full_like(scores, float("-inf"))
if is_causal:
    scores = torch.where(torch.ones(L, S, dtype=torch.bool, device=scores.device).tril(), scores, neg_inf)
if attn_mask is not None:
    scores = torch.where(attn_mask, scores, neg_inf) if attn_mask.dtype == torch.bool \\
        else scores + attn_mask.to(work)
peak = scores.amax(dim=-1, keepdim=True)
peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
e = torch.exp(scores - peak)
total = e.sum(dim=-1, keepdim=True)
return (e / torch.where(total == 0, torch.ones_like(total), total)).to(query.dtype)
""",
            explore="""\
# Explore (not graded): the largest weight of each row, with and without the 1/sqrt(d_k) factor.
torch.manual_seed(0)
d_k = 512
q, k = torch.randn(64, d_k), torch.randn(64, d_k)
try:
    scaled = attention_weights(q, k)
    unscaled = attention_weights(q, k, scale=1.0)
    print("largest difference from attnlib:", (scaled - attnlib.attention_weights(q, k)).abs().max().item())
    plt.hist(scaled.amax(-1).numpy(), bins=20, alpha=0.6, label="scale = 1/sqrt(d_k)")
    plt.hist(unscaled.amax(-1).numpy(), bins=20, alpha=0.6, label="scale = 1 (saturated)")
    plt.xlabel("largest weight in the row"); plt.legend(); plt.show()
except NotImplementedError:
    print("attention_weights is not written yet: fill in the cell above and run this one again.")
""",
        ),
        dict(
            id="attention_entropy",
            points=3,
            guide="""\
The entropy $H(p) = -\\sum_j p_j \\ln p_j$ of a row of weights measures how spread it is:
$\\ln S$ for uniform weights over $S$ keys, 0 for a one-hot row (Chapter 3, sections *Why
large logits stop the gradient* and *Without the scale, the softmax saturates*). Return it
along `dim`, in nats: the result has the shape of `weights` without that axis. A weight of
exactly 0 (a masked key, or a row with all its keys masked) contributes $0 \\ln 0 = 0$, the
limit of $p \\ln p$: never NaN. Compute float16/bfloat16 in float32 and return the input's
dtype.""",
            hints=[
                "`p * torch.log(p)` is `0 * -inf = NaN` at `p = 0`: take the log of `torch.where(p > 0, p, 1)` instead, whose log is 0 there.",
                "`torch.special.entr`, `torch.xlogy` and `torch.distributions.Categorical` are off limits: they handle $0 \\ln 0$ for you.",
            ],
            solution="""\
work = torch.float32 if weights.dtype in (torch.float16, torch.bfloat16) else weights.dtype
p = weights.to(work)
log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))  # 0 where p = 0: no -inf, no NaN
return (-(p * log_p)).sum(dim=dim).to(weights.dtype)
""",
            explore="""\
# Explore (not graded): the mean entropy of the weights against d_k, with and without the
# 1/sqrt(d_k) factor (the chapter's figure, with your entropy).
torch.manual_seed(0)
d_ks = [1, 4, 16, 64, 256, 1024]
try:
    for label, scale in (("scale = 1/sqrt(d_k)", None), ("scale = 1 (unscaled)", 1.0)):
        means = []
        for d in d_ks:
            w = attnlib.attention_weights(torch.randn(256, d), torch.randn(64, d), scale=scale)  # (256, 64)
            means.append(attention_entropy(w).mean().item())
        print(f"{label:22s}", " ".join(f"{h:5.2f}" for h in means))
        plt.semilogx(d_ks, means, "o-", label=label)
    plt.axhline(math.log(64), color="gray", linestyle="--", label="ln 64 (uniform weights)")
    plt.xlabel("d_k"); plt.ylabel("mean entropy of a row (nats)"); plt.legend(); plt.show()
except NotImplementedError:
    print("attention_entropy is not written yet: fill in the cell above and run this one again.")
""",
        ),
    ],
)

CHAPTERS["04_multi_head"] = dict(
    number=4,
    title="Multi-head attention",
    intro="""\
You write the three pieces of multi-head attention that are not projections: splitting the
model width into heads, merging them back, and the forward pass that runs attention in
every head at once.""",
    imports=("from attnlib import KVCache  # only for the annotation of forward's kv_cache argument\n"
             "from attnlib._validate import check_positive_int  # used by the constructor\n"),
    exercises=[
        dict(
            id="MultiHeadAttention.split_heads",
            points=2,
            guide="""\
The class below is the course's `MultiHeadAttention`; its constructor is written for you
(the grader loads weights into `q_proj`, `k_proj`, `v_proj` and `o_proj`). Three of its
methods are yours, each graded on its own.

**`split_heads`** turns `(B, L, n_heads * head_dim)` into `(B, n_heads, L, head_dim)`
(Chapter 4, section *The maths*): the channels of head `h` are the `h`-th block of
`head_dim` consecutive channels.

**`merge_heads`** is its inverse, `(B, n_heads, L, head_dim)` to `(B, L, n_heads * head_dim)`.

**`forward`** projects, splits, attends in every head, merges and projects out. It handles
self-attention (`context=None`), cross-attention (keys and values from `context`), boolean
and float masks and `is_causal`, as in Chapters 2 and 5.""",
            hints=[
                "Reshape to `(B, L, n_heads, head_dim)` first, then move the head axis: a plain reshape to `(B, n_heads, L, head_dim)` mixes heads and positions.",
                "`merge_heads` must undo exactly that: transpose back, then reshape (`.reshape`, since the transposed tensor is not contiguous).",
                "In `forward`, keys and values come from `context` when it is given; queries always come from `x`.",
                "With fewer key/value heads (`n_kv_heads < n_heads`), repeat each KV head `n_heads // n_kv_heads` times with `repeat_interleave`.",
                "`torch.nn.MultiheadAttention` is off limits.",
            ],
            solution={
                "split_heads": """\
B, L, _ = x.shape
return x.reshape(B, L, n_heads, -1).permute(0, 2, 1, 3)  # (B, H, L, head_dim)
""",
                "merge_heads": """\
B, H, L, D = x.shape
return x.permute(0, 2, 1, 3).reshape(B, L, H * D)  # (B, L, H * head_dim)
""",
                "forward": MHA_FORWARD_SOLUTION,
            },
        ),
        dict(id="MultiHeadAttention.merge_heads", points=2),
        dict(id="MultiHeadAttention.forward", points=5,
             explore="""\
# Explore (not graded): split then merge must give back the input, and the layer must match
# attnlib's with the same weights.
torch.manual_seed(0)
ref = attnlib.MultiHeadAttention(16, 4)
try:
    mine = MultiHeadAttention(16, 4)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 16)
    print("merge(split(x)) == x:", torch.equal(mine.merge_heads(mine.split_heads(x, 4)), x))
    with torch.no_grad():
        print("largest difference from attnlib:", (mine(x, is_causal=True) - ref(x, is_causal=True)).abs().max().item())
    heads = mine.split_heads(torch.arange(16.0).expand(1, 1, 16), 4)[0, :, 0]
    plt.imshow(heads.numpy(), cmap="tab20"); plt.xlabel("channel within the head"); plt.ylabel("head")
    plt.title("which model channels each head receives"); plt.colorbar(); plt.show()
except NotImplementedError:
    print("A method of MultiHeadAttention is not written yet: fill in the cell above and run this one again.")
"""),
    ],
)

CHAPTERS["05_self_cross_masks"] = dict(
    number=5,
    title="Self-attention versus cross-attention, and masks",
    intro="""\
You build the two masks of everyday attention: the causal mask of a decoder and the padding
mask of a batch of sequences of unequal length. Both use the convention `True` = may attend.""",
    imports="",
    exercises=[
        dict(
            id="causal_mask",
            points=2,
            guide="""\
Return the `(L, S)` boolean mask in which query `i` may attend to keys `0..i` (Chapter 5,
section *`is_causal` when `L != S`: top-left or bottom-right*). It is aligned top-left, as
`is_causal=True` in PyTorch: with `S > L` the last keys are never seen, with `L > S` the
last queries see every key. `S=None` means `S = L`; build it on `device`.""",
            hints=[
                "Compare a column of query indices with a row of key indices: `j <= i` broadcasts to `(L, S)`.",
                "Or: `torch.ones(L, S, dtype=torch.bool).tril()`. Check `L = 0` too.",
            ],
            solution="""\
if S is None:
    S = L
rows = torch.arange(L, device=device)[:, None]  # (L, 1): query i
cols = torch.arange(S, device=device)[None, :]  # (1, S): key j
return cols <= rows  # (L, S) bool
""",
            explore="",
        ),
        dict(
            id="padding_mask",
            points=3,
            guide="""\
Sequence `b` of a padded batch has real tokens at positions `0 .. lengths[b] - 1` and
padding after them (Chapter 5, section *Padding masks for a batch of unequal lengths*).
Return a `(B, 1, 1, S)` boolean mask, `True` at real tokens, which broadcasts against
`(B, H, L, S)` scores. A sequence of length 0 masks every key.""",
            hints=[
                "`torch.arange(S)[None, :] < lengths[:, None]` is `(B, S)`.",
                "Two singleton axes, for heads and queries: `[:, None, None, :]`.",
                "Build the positions on `lengths.device`.",
            ],
            solution="""\
positions = torch.arange(S, device=lengths.device)  # (S,)
real = positions[None, :] < lengths[:, None]  # (B, S)
return real[:, None, None, :]  # (B, 1, 1, S)
""",
            explore="""\
# Explore (not graded): a causal mask and a padding mask, yours beside attnlib's.
try:
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    axes[0].imshow(causal_mask(5, 8).numpy()); axes[0].set_title("causal_mask(5, 8)")
    axes[1].imshow(padding_mask(torch.tensor([3, 6, 1]), 6)[:, 0, 0].numpy()); axes[1].set_title("padding, lengths 3, 6, 1")
    axes[2].imshow(attnlib.causal_mask(5, 8).numpy()); axes[2].set_title("attnlib.causal_mask(5, 8)")
    plt.show()
    print("causal masks equal:", torch.equal(causal_mask(5, 8), attnlib.causal_mask(5, 8)))
except NotImplementedError:
    print("causal_mask or padding_mask is not written yet: fill in the cells above.")
""",
        ),
    ],
)

CHAPTERS["06_mqa_gqa"] = dict(
    number=6,
    title="MQA and GQA: sharing keys and values",
    intro="""\
You write the pieces of decoding with shared keys and values: the head mapping of
grouped-query attention, the memory a KV cache takes, the cache itself, and the attention
layer that puts them together, with fewer key/value heads than query heads.""",
    imports="from attnlib._validate import check_positive_int  # used by MultiHeadAttention's constructor\n",
    exercises=[
        dict(
            id="repeat_kv",
            points=3,
            guide="""\
Repeat each key/value head `n_rep` times along the head axis (axis -3) so that query head
`h` reads KV head `h // n_rep` (Chapter 6, section *The head mapping: interleave, do not
tile*). With 2 KV heads and `n_rep = 3` the heads come out as `[0, 0, 0, 1, 1, 1]`, not
`[0, 1, 0, 1, 0, 1]`. Any number of leading axes may come before the head axis.""",
            hints=[
                "`torch.repeat_interleave(x, n_rep, dim=-3)` interleaves; `x.repeat(...)` tiles (wrong).",
                "Or without copying first: `x.unsqueeze(-3).expand(...)`, then `reshape`.",
            ],
            solution="""\
if n_rep == 1:
    return x
return torch.repeat_interleave(x, n_rep, dim=-3)  # (..., n_kv_heads * n_rep, S, head_dim)
""",
            explore="",
        ),
        dict(
            id="kv_cache_bytes",
            points=2,
            guide="""\
Count the bytes of a KV cache (Chapter 6, section *KV-cache sizes of published models*):
keys **and** values, for every layer, every **KV** head (not every query head: that is the
saving of GQA and MQA), every channel of a head, every token and every sequence of the batch,
at `dtype`'s bytes per element. Return a Python `int`.""",
            hints=[
                "`torch.float16.itemsize` is 2.",
                "Do not forget the factor 2 for K and V.",
            ],
            solution="""\
bytes_per_element = dtype.itemsize
return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch * bytes_per_element
""",
            explore="""\
# Explore (not graded): the cache of a Llama-2-7B-sized model at 4096 tokens, MHA against GQA and MQA.
try:
    for name, kv_heads in (("MHA", 32), ("GQA-8", 8), ("MQA", 1)):
        gib = kv_cache_bytes(32, kv_heads, 128, 4096) / 2**30
        print(f"{name:6s} {gib:6.3f} GiB   (attnlib: {attnlib.kv_cache_bytes(32, kv_heads, 128, 4096) / 2**30:.3f})")
except NotImplementedError:
    print("kv_cache_bytes is not written yet: fill in the cell above.")
""",
        ),
        dict(
            id="KVCache.update",
            points=3,
            guide="""\
A `KVCache` holds the keys and values of the tokens decoded so far (Chapter 6, section
*Incremental decoding reproduces the full forward pass*). Write `update`: append the new
positions along the sequence axis (-2), after the old ones, and return **all** cached keys
and values. The first call fills an empty cache; later calls may add one token (decoding),
several (a chunked prefill) or none.""",
            hints=[
                "`self.key is None` means the cache is empty.",
                "`torch.cat([old, new], dim=-2)`; store the result on `self` before returning it.",
            ],
            solution={"update": """\
if self.key is None or self.value is None:
    self.key, self.value = key, value
else:
    self.key = torch.cat([self.key, key], dim=-2)  # (B, H_kv, S + S_new, D)
    self.value = torch.cat([self.value, value], dim=-2)
return self.key, self.value
"""},
            explore="""\
# Explore (not graded): decoding token by token fills the cache one position at a time.
try:
    cache = KVCache()
    sizes = []
    for step in range(5):
        k, v = cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
        sizes.append(k.size(-2))
    print("cached positions after each step:", sizes, "(expected [1, 2, 3, 4, 5])")
except NotImplementedError:
    print("KVCache.update is not written yet: fill in the cell above.")
""",
        ),
        dict(
            id="MultiHeadAttention",
            points=5,
            guide="""\
Chapter 4's `MultiHeadAttention` again, now with `n_kv_heads` key/value heads for `n_heads`
query heads (Chapter 6, sections *The maths* and *The head mapping: interleave, do not
tile*). `split_heads` and `merge_heads` are written for you; write `forward`. `k_proj` and
`v_proj` produce `n_kv_heads * head_dim` features, so keys and values split into
`n_kv_heads` heads, and query head `h` reads KV head `h // (n_heads // n_kv_heads)`:
`n_kv_heads = 1` is MQA, `n_kv_heads = n_heads` plain MHA.

Everything of Chapter 4 still holds: self- and cross-attention, boolean and float masks,
`is_causal`. New is decoding with a `kv_cache` (Chapter 6, section *Incremental decoding
reproduces the full forward pass*): append the new keys and values with `kv_cache.update`
and attend to every cached position. New token `i` of the chunk sits at position
`kv_cache.seq_len + i` (the length before the update) and sees keys `0 .. seq_len + i`. The
grader decodes sequences chunk by chunk through a fresh `attnlib.KVCache`, compares every
chunk's output with the reference, and checks that the cache keeps `n_kv_heads` heads.
`rope_base` belongs to Chapter 7 and is not graded here.""",
            hints=[
                "Split queries with `self.n_heads` and keys and values with `self.n_kv_heads`.",
                "Repeat each KV head `n_heads // n_kv_heads` times with `repeat_interleave` on the head axis (or your `repeat_kv`), never with `repeat`, and only after `kv_cache.update`: the cache keeps the `n_kv_heads` heads, which is the memory GQA saves.",
                "With a cache the causal mask is aligned bottom-right: `torch.ones(L, offset + L, dtype=torch.bool).tril(offset)`, with `offset` read before the update; it replaces `is_causal`.",
                "attnlib, `F.scaled_dot_product_attention` (its `enable_gqa=True` would do the head mapping for you) and `torch.nn.MultiheadAttention` are off limits: write the attention itself as in Chapters 2 and 3.",
            ],
            solution={"forward": MHA_FORWARD_SOLUTION},
            explore="""\
# Explore (not graded): your GQA layer beside attnlib's with the same weights, and decoding
# token by token through a cache, which must reproduce the full causal pass.
torch.manual_seed(0)
ref = attnlib.MultiHeadAttention(32, 8, n_kv_heads=2).double()
try:
    mine = MultiHeadAttention(32, 8, n_kv_heads=2).double()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        full = mine(x, is_causal=True)
        print("largest difference from attnlib:", (full - ref(x, is_causal=True)).abs().max().item())
        cache = attnlib.KVCache()
        steps = torch.cat([mine(x[:, t:t + 1], is_causal=True, kv_cache=cache) for t in range(10)], dim=1)
    print("token by token == one causal pass:", torch.allclose(steps, full, atol=1e-12))
    print("cached keys:", tuple(cache.key.shape), "= (B, n_kv_heads, S, head_dim)")
except NotImplementedError:
    print("MultiHeadAttention.forward is not written yet: fill in the cell above.")
""",
        ),
    ],
)

CHAPTERS["07_positional_encoding"] = dict(
    number=7,
    title="Positional encoding",
    intro="""\
Attention alone does not know the order of its inputs. You write the three classic ways of
telling it: sinusoidal encodings added to the embeddings, rotary embeddings (RoPE) applied to
queries and keys, and ALiBi's distance penalty added to the scores.""",
    imports="",
    exercises=[
        dict(
            id="sinusoidal_positional_encoding",
            points=3,
            guide="""\
Return the `(seq_len, d_model)` float32 table of "Attention Is All You Need" (Chapter 7,
section *Sinusoidal encodings: many clocks at different speeds*):
$PE[p, 2i] = \\sin(p / \\text{base}^{2i/d})$ and $PE[p, 2i+1] = \\cos(p / \\text{base}^{2i/d})$.
An odd `d_model` ends with a lone sine channel. Compute in float64 and round once to float32.""",
            hints=[
                "`torch.arange(0, d_model, 2)` gives the even channels $2i$.",
                "Fill `pe[:, 0::2]` with the sines and `pe[:, 1::2]` with the cosines; with an odd `d_model` there is one cosine fewer.",
            ],
            solution="""\
pos = torch.arange(seq_len, dtype=torch.float64)[:, None]  # (seq_len, 1)
even = torch.arange(0, d_model, 2, dtype=torch.float64)  # (ceil(d/2),): the channels 2i
angle = pos / base ** (even / d_model)  # (seq_len, ceil(d/2))
pe = torch.zeros(seq_len, d_model, dtype=torch.float64)
pe[:, 0::2] = torch.sin(angle)
pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
return pe.to(torch.float32)
""",
            explore="""\
# Explore (not graded): the encoding table, channel against position.
try:
    pe = sinusoidal_positional_encoding(100, 64)
    print("largest difference from attnlib:", (pe - attnlib.sinusoidal_positional_encoding(100, 64)).abs().max().item())
    plt.imshow(pe.T.numpy(), aspect="auto", cmap="RdBu"); plt.xlabel("position"); plt.ylabel("channel")
    plt.colorbar(); plt.show()
except NotImplementedError:
    print("sinusoidal_positional_encoding is not written yet: fill in the cell above.")
""",
        ),
        dict(
            id="apply_rope",
            points=4,
            guide="""\
Rotate queries or keys by their positions, in the rotate-half layout of LLaMA (Chapter 7,
section *RoPE: the score depends only on the offset*): channel `i` and channel `i + D/2`
form a pair, turned by the angle `position * base ** (-2i / D)`. The arithmetic the tests
expect is that of Hugging Face's implementation: the angles, their cosine and sine in
float32; cosine and sine then cast to `x.dtype`; and `x * cos + rotate_half(x) * sin` in
`x.dtype`, where `rotate_half` maps the halves `(x1, x2)` to `(-x2, x1)`.

`positions` is `(L,)` for the whole batch or `(B, L)`, one row per batch element (then
broadcast over the head axis of a 4-D `x`); it defaults to `0 .. L-1`.""",
            hints=[
                "`inv_freq = 1.0 / (base ** (torch.arange(0, D, 2).float() / D))`, then `positions.float()[..., None] * inv_freq`.",
                "Repeat the angles for both halves: `torch.cat((angles, angles), dim=-1)`.",
                "For `(B, L)` positions and a 4-D `x`, insert a head axis: `angles[:, None]`.",
            ],
            solution="""\
L, D = x.shape[-2], x.shape[-1]
if positions is None:
    positions = torch.arange(L, device=x.device)
inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, device=x.device).float() / D))  # (D/2,) fp32
angles = positions.to(x.device).float()[..., None] * inv_freq  # (L, D/2) or (B, L, D/2)
if angles.ndim == 3:  # one row of positions per batch element: broadcast over the other axes
    angles = angles.reshape(angles.size(0), *([1] * (x.ndim - 3)), L, D // 2)
emb = torch.cat((angles, angles), dim=-1)  # (..., L, D): pair (i, i + D/2) shares angle i
cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
x1, x2 = x[..., : D // 2], x[..., D // 2:]
return x * cos + torch.cat((-x2, x1), dim=-1) * sin
""",
            explore="""\
# Explore (not graded): with RoPE, the score of q at position m and k at position n depends on m - n only.
torch.manual_seed(0)
q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
try:
    def score(m, n):
        return (apply_rope(q, torch.tensor([m])) * apply_rope(k, torch.tensor([n]))).sum().item()
    print("score(5, 2) =", round(score(5, 2), 6), " score(105, 102) =", round(score(105, 102), 6))
    offsets = range(-20, 21)
    plt.plot(offsets, [score(50 + d, 50) for d in offsets], label="yours")
    plt.plot(offsets, [(attnlib.apply_rope(q, torch.tensor([50 + d])) * attnlib.apply_rope(k, torch.tensor([50]))).sum().item()
                       for d in offsets], "--", label="attnlib")
    plt.xlabel("offset m - n"); plt.ylabel("score"); plt.legend(); plt.show()
except NotImplementedError:
    print("apply_rope is not written yet: fill in the cell above.")
""",
        ),
        dict(
            id="alibi_slopes",
            points=2,
            guide="""\
ALiBi (Chapter 7, section *ALiBi: a distance penalty per head*) gives head `h` a slope. For
`n_heads` a power of two they are $2^{-8i/n}$ for $i = 1..n$. Otherwise take the slopes of
the power of two $m$ just below `n_heads`, then the first `n_heads - m` of the slopes at
positions 0, 2, 4, ... of the sequence for $2m$. Return a float32 tensor.""",
            hints=[
                "The largest power of two `<= n`: `1 << (n.bit_length() - 1)`.",
                "For 6 heads: the 4 slopes of $m = 4$, then 2 of the 8-head sequence's slopes 1, 3 (counting from 1).",
            ],
            solution="""\
m = 2 ** int(math.floor(math.log2(n_heads)))  # largest power of two <= n_heads
slopes = [2.0 ** (-8.0 * i / m) for i in range(1, m + 1)]
if n_heads > m:
    between = [2.0 ** (-8.0 * i / (2 * m)) for i in range(1, 2 * m + 1, 2)]
    slopes += between[: n_heads - m]
return torch.tensor(slopes, dtype=torch.float32)
""",
            explore="",
        ),
        dict(
            id="alibi_bias",
            points=3,
            guide="""\
Return the `(n_heads, L, S)` float32 bias $-\\text{slope}_h \\cdot |i' - j|$ with query `i` at
position `i' = i + query_offset` and key `j` at position `j` (Chapter 7, section *ALiBi: a
distance penalty per head*). The slopes are those of your `alibi_slopes`. Add the result to
the scores as a float mask; when decoding with a cache, `query_offset = S - L` puts the new
queries at the end.""",
            hints=[
                "Distances: `(q_pos[:, None] - k_pos[None, :]).abs()`, then to float32.",
                "Broadcast the slopes over the last two axes: `slopes[:, None, None]`.",
            ],
            solution="""\
q_pos = torch.arange(L, device=device) + query_offset  # (L,)
k_pos = torch.arange(S, device=device)  # (S,)
distance = (q_pos[:, None] - k_pos[None, :]).abs().to(torch.float32)  # (L, S)
slopes = alibi_slopes(n_heads).to(device)  # (H,)
return -slopes[:, None, None] * distance  # (H, L, S)
""",
            explore="""\
# Explore (not graded): the ALiBi bias of a few heads; steep heads look locally.
try:
    bias = alibi_bias(4, 12, 12)
    print("slopes:", alibi_slopes(4), " attnlib:", attnlib.alibi_slopes(4))
    fig, axes = plt.subplots(1, 4, figsize=(12, 3))
    for h in range(4):
        axes[h].imshow(bias[h].numpy(), cmap="magma"); axes[h].set_title(f"head {h}")
    plt.show()
except NotImplementedError:
    print("alibi_slopes or alibi_bias is not written yet: fill in the cells above.")
""",
        ),
    ],
)

CHAPTERS["08_quadratic_cost"] = dict(
    number=8,
    title="The quadratic cost",
    intro="""\
You count what attention costs: the bytes of one score matrix and the FLOPs of its two
matrix products. Both grow as $L \\times S$.""",
    imports="",
    exercises=[
        dict(
            id="attention_score_bytes",
            points=2,
            guide="""\
Return the bytes of **one** score matrix of shape `(batch, n_heads, L, S)` at `dtype`'s
bytes per element (Chapter 8, section *How many scores: from 1K to 128K tokens*): no
queries, keys, values or outputs, and not the scores and the weights together. A Python
`int`.""",
            hints=["`dtype.itemsize` is the number of bytes per element."],
            solution="""\
return dtype.itemsize * batch * n_heads * L * S
""",
            explore="",
        ),
        dict(
            id="attention_flops",
            points=3,
            guide="""\
Count the FLOPs of the two matrix products of attention, $QK^\\top$ and $PV$ (Chapter 8,
section *The maths*), at 2 FLOPs per multiply-add: $QK^\\top$ has $L \\cdot S$ entries of
`head_dim` multiply-adds, $PV$ has $L \\cdot$ `head_dim_v` entries of $S$ multiply-adds, per
batch element and head. Nothing else is counted (no softmax, no projections). `head_dim_v`
defaults to `head_dim`. A Python `int`.""",
            hints=["With `head_dim_v == head_dim` the total is `4 * L * S * head_dim * n_heads * batch`."],
            solution="""\
dv = head_dim if head_dim_v is None else head_dim_v
per_head = 2 * L * S * head_dim + 2 * L * S * dv  # Q K^T, then P V
return batch * n_heads * per_head
""",
            explore="""\
# Explore (not graded): memory of one fp16 score matrix and FLOPs against the sequence length.
try:
    lengths = [2 ** p for p in range(10, 18)]
    gib = [attention_score_bytes(n, n, 32, 1, torch.float16) / 2**30 for n in lengths]
    tflop = [attention_flops(n, n, 128, 32) / 1e12 for n in lengths]
    for n, g, t in zip(lengths, gib, tflop):
        print(f"L = S = {n:6d}: {g:9.2f} GiB of scores, {t:9.2f} TFLOP")
    plt.loglog(lengths, gib, "o-", label="score bytes (GiB)")
    plt.loglog(lengths, tflop, "s-", label="FLOPs (T)")
    plt.xlabel("sequence length"); plt.legend(); plt.show()
except NotImplementedError:
    print("attention_score_bytes or attention_flops is not written yet: fill in the cells above.")
""",
        ),
    ],
)

CHAPTERS["09_flash_attention"] = dict(
    number=9,
    title="FlashAttention: exact attention in tiles",
    intro="""\
You write exact attention that never holds the whole $L \\times S$ score matrix: a loop over
tiles of queries and keys with the online softmax. Then its backward pass, which rebuilds
each tile of weights from the saved log-sum-exp instead of storing them. The grader checks
the values and also that no tensor as large as the score matrix is ever built.""",
    imports="from attnlib.flash import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q  # the default tile sizes\n",
    exercises=[
        dict(
            id="flash_attention",
            points=8,
            guide="""\
For each tile of `block_q` queries keep three running statistics per query row (Chapter 9,
sections *The online softmax* and *A worked example: one row, three blocks*): the maximum
score `m` seen so far, the sum `l` of `exp(score - m)`, and the accumulator `acc` of
`exp(score - m) @ V`. For each tile of `block_k` keys, compute the tile's scores, update
`m`, **rescale** `l` and `acc` by `exp(m_old - m_new)`, and add the tile's contribution. At
the end, `out = acc / l`, and `lse = m + log(l)`.

Also required: ragged tiles (`L`, `S` need not be multiples of the block sizes), top-left
`is_causal` (skip the key tiles entirely above the diagonal), `scale=None` meaning
$1/\\sqrt{E}$, float16/bfloat16 computed in float32 (`out` cast back, `lse` float32), and a
row without keys giving a zero output and `lse = -inf`. Gradients may come from autograd
through your loop.""",
            hints=[
                "Start every row with `m = -inf`, `l = 0`, `acc = 0`; `exp(-inf - m_new)` is 0, so the first tile needs no special case, as long as you never compute `-inf - (-inf)`.",
                "In the causal case, key tiles starting at or after `q_start + block_q` are all masked: stop the loop there; inside the diagonal tile, mask with `-inf`.",
                "`F.scaled_dot_product_attention` is off limits, and so is building `query @ key.transpose(-2, -1)` in one go.",
            ],
            solution="""\
if scale is None:
    scale = 1.0 / math.sqrt(query.size(-1))
work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
q_all, k_all, v_all = query.to(work), key.to(work), value.to(work)
L, S, Ev = q_all.size(-2), k_all.size(-2), v_all.size(-1)
lead = q_all.shape[:-2]
outs, lses = [], []
for q0 in range(0, L, block_q):
    q = q_all[..., q0:q0 + block_q, :]  # (..., bq, E)
    bq = q.size(-2)
    m = q.new_full((*lead, bq), float("-inf"))  # running maximum
    l = q.new_zeros((*lead, bq))  # running sum of exp(score - m)
    acc = q.new_zeros((*lead, bq, Ev))  # running exp(score - m) @ V
    k_stop = min(S, q0 + bq) if is_causal else S  # later key tiles are all masked
    for k0 in range(0, k_stop, block_k):
        k = k_all[..., k0:k0 + block_k, :]
        v = v_all[..., k0:k0 + block_k, :]
        s = (q @ k.transpose(-2, -1)) * scale  # (..., bq, bk): one tile
        if is_causal:
            rows = torch.arange(q0, q0 + bq, device=s.device)[:, None]
            cols = torch.arange(k0, k0 + k.size(-2), device=s.device)[None, :]
            s = s.masked_fill(cols > rows, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1))
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(s - shift[..., None])
        rescale = torch.exp(m - shift)  # 0 while m is still -inf
        l = rescale * l + p.sum(dim=-1)
        acc = rescale[..., None] * acc + p @ v
        m = m_new
    empty = l == 0
    safe_l = torch.where(empty, torch.ones_like(l), l)
    outs.append(acc / safe_l[..., None])
    m_fin = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lses.append(torch.where(empty, torch.full_like(l, float("-inf")), m_fin + torch.log(safe_l)))
if outs:
    out, lse = torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)
else:  # L == 0
    out, lse = q_all.new_zeros((*lead, 0, Ev)), q_all.new_zeros((*lead, 0))
out = out.to(query.dtype)
return (out, lse) if return_lse else out
""",
            explore="""\
# Explore (not graded): the tiled result against the reference, for several tile sizes.
torch.manual_seed(0)
q, k, v = (torch.randn(1, 2, 100, 16, dtype=torch.float64) for _ in range(3))
exact = attnlib.scaled_dot_product_attention(q, k, v, is_causal=True)
try:
    blocks = [1, 7, 16, 33, 100]
    errors = [(flash_attention(q, k, v, is_causal=True, block_q=b, block_k=b) - exact).abs().max().item()
              for b in blocks]
    for b, e in zip(blocks, errors):
        print(f"blocks {b:3d} x {b:3d}: largest error {e:.2e}")
    plt.semilogy(blocks, [max(e, 1e-18) for e in errors], "o-"); plt.xlabel("block size")
    plt.ylabel("largest error against exact attention"); plt.show()
except NotImplementedError:
    print("flash_attention is not written yet: fill in the cell above.")
""",
        ),
        dict(
            id="flash_attention_backward",
            points=6,
            guide="""\
The backward pass of flash attention, by recomputation (Chapter 9, section *The backward
pass: recompute, don't store*). You get what the forward pass kept, `query`, `key`, `value`,
the output `out` and the log-sum-exp `lse`, and `grad_out`, the gradient of the loss with
respect to the output; return the gradients with respect to `query`, `key` and `value`.
With $P$ the weights and $D_i = dO_i \\cdot O_i$ (minus `grad_lse` when it is given):

$$dV = P^\\top dO, \\qquad dS = P \\odot (dO\\,V^\\top - D), \\qquad
dQ = \\text{scale} \\cdot dS\\,K, \\qquad dK = \\text{scale} \\cdot dS^\\top Q .$$

Never hold $P$ whole: loop over tiles of `block_q` queries and `block_k` keys, rebuild each
tile of weights as $P = \\exp(\\text{scores} - \\text{lse})$ (masked as in the forward pass when
`is_causal`), and add its share to the three gradients. As for the forward pass, the grader
fails any tensor as large as the `L x S` matrix, and `scale=None` means $1/\\sqrt{E}$.""",
            hints=[
                "$D$ is one number per query row, `(grad_out * out).sum(-1)`: compute it once, before the loops.",
                "In a tile, `p = torch.exp(s - lse[..., q0:q1, None])`; masked scores are `-inf` and give weight 0.",
                "Accumulate into zero tensors: `dq[..., q0:q1, :] += ...`, `dk[..., k0:k1, :] += ...`, `dv[..., k0:k1, :] += ...`.",
                "Autograd (`torch.autograd.grad`, `.backward()`), attnlib and `F.scaled_dot_product_attention` are off limits: the exercise is the formulas.",
            ],
            solution="""\
if scale is None:
    scale = 1.0 / math.sqrt(query.size(-1))
work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
q, k, v = query.to(work), key.to(work), value.to(work)
o, d_out, row_lse = out.to(work), grad_out.to(work), lse.to(work)
L, S = q.size(-2), k.size(-2)
d = (d_out * o).sum(dim=-1)  # (..., L): D_i = dO_i . O_i
if grad_lse is not None:
    d = d - grad_lse.to(work)
dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
for q0 in range(0, L, block_q):
    q1 = min(q0 + block_q, L)
    k_stop = min(S, q1) if is_causal else S  # later key tiles are all masked
    for k0 in range(0, k_stop, block_k):
        k1 = min(k0 + block_k, S)
        s = (q[..., q0:q1, :] @ k[..., k0:k1, :].transpose(-2, -1)) * scale  # (..., bq, bk)
        if is_causal:
            rows = torch.arange(q0, q1, device=s.device)[:, None]
            cols = torch.arange(k0, k1, device=s.device)[None, :]
            s = s.masked_fill(cols > rows, float("-inf"))
        p = torch.exp(s - row_lse[..., q0:q1, None])  # (..., bq, bk): this tile of weights
        do_tile = d_out[..., q0:q1, :]  # (..., bq, Ev)
        dv[..., k0:k1, :] += p.transpose(-2, -1) @ do_tile
        ds = p * (do_tile @ v[..., k0:k1, :].transpose(-2, -1) - d[..., q0:q1, None])  # (..., bq, bk)
        dq[..., q0:q1, :] += scale * (ds @ k[..., k0:k1, :])
        dk[..., k0:k1, :] += scale * (ds.transpose(-2, -1) @ q[..., q0:q1, :])
return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)
""",
            explore="""\
# Explore (not graded): your backward pass against autograd through attnlib's flash attention.
torch.manual_seed(0)
q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
out, lse = attnlib.flash_attention(q, k, v, is_causal=True, return_lse=True)
d_out = torch.randn_like(out)
out.backward(d_out)
try:
    grads = flash_attention_backward(q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), d_out,
                                     is_causal=True, block_q=16, block_k=16)
    for name, mine, auto in zip("qkv", grads, (q.grad, k.grad, v.grad)):
        print(f"d{name}: largest difference from autograd {(mine - auto).abs().max().item():.1e}")
except NotImplementedError:
    print("flash_attention_backward is not written yet: fill in the cell above.")
""",
        ),
    ],
)

CHAPTERS["10_sparse_linear"] = dict(
    number=10,
    title="Sparse and linear attention",
    intro="""\
You write two sparse attention patterns (a sliding window and Longformer's window plus
global tokens) and linear attention, which reassociates the products so that the
$L \\times S$ matrix is never formed.""",
    imports="from collections.abc import Callable, Sequence  # for the annotations\n",
    exercises=[
        dict(
            id="sliding_window_mask",
            points=2,
            guide="""\
Return the `(L, L)` boolean mask of a local pattern (Chapter 10, section *Attention on a
pattern*). `window` is the **reach**: non-causal, query `i` sees key `j` iff
$|i - j| \\le$ `window`; causal, iff $0 \\le i - j \\le$ `window`.""",
            hints=["`d = i - j` for every pair: `torch.arange(L)[:, None] - torch.arange(L)[None, :]`."],
            solution="""\
pos = torch.arange(L)
d = pos[:, None] - pos[None, :]  # (L, L): i - j
if causal:
    return (d >= 0) & (d <= window)
return d.abs() <= window
""",
            explore="",
        ),
        dict(
            id="longformer_mask",
            points=3,
            guide="""\
Longformer (Chapter 10, section *The three patterns*) adds **global** tokens to the sliding
window: a global token attends to every position (its row is all `True`) and every position
attends to it (its column is all `True`). `global_tokens` is a list of ints or a 1-D integer
tensor; it may be empty and may hold duplicates. Start from your `sliding_window_mask`.""",
            hints=[
                "`torch.as_tensor(global_tokens, dtype=torch.long)` handles a list, an empty list and a tensor.",
                "Then `mask[idx, :] = True` and `mask[:, idx] = True`.",
            ],
            solution="""\
mask = sliding_window_mask(L, window).clone()  # (L, L)
idx = torch.as_tensor(global_tokens, dtype=torch.long).reshape(-1)
mask[idx, :] = True  # global tokens see everything
mask[:, idx] = True  # and are seen by everything
return mask
""",
            explore="""\
# Explore (not graded): the patterns, yours beside attnlib's.
try:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    axes[0].imshow(sliding_window_mask(24, 3).numpy()); axes[0].set_title("sliding window, reach 3")
    axes[1].imshow(longformer_mask(24, 3, [0, 12]).numpy()); axes[1].set_title("yours: + global 0, 12")
    axes[2].imshow(attnlib.longformer_mask(24, 3, [0, 12]).numpy()); axes[2].set_title("attnlib")
    plt.show()
    print("fraction of pairs kept:", longformer_mask(24, 3, [0, 12]).float().mean().item())
except NotImplementedError:
    print("sliding_window_mask or longformer_mask is not written yet: fill in the cells above.")
""",
        ),
        dict(
            id="linear_attention",
            points=5,
            guide="""\
Linear attention (Chapter 10, section *Linear attention*) replaces
$\\exp(q \\cdot k)$ by $\\phi(q)\\cdot\\phi(k)$:

$$\\text{out}_i = \\frac{\\phi(q_i)^\\top \\sum_j \\phi(k_j) v_j^\\top}{\\phi(q_i)^\\top \\sum_j \\phi(k_j)},$$

the sums over every key, or over $j \\le i$ with `causal` (top-left aligned when `L != S`).
The default $\\phi$ is $\\mathrm{elu}(x) + 1$, computed as `x + 1` for `x > 0` and `exp(x)`
otherwise. No softmax, no scale. Do not build the `L x S` matrix: non-causal, compute
$\\phi(K)^\\top V$ first; causal, carry the two sums as a running state. A zero denominator
gives a zero output. Compute float16/bfloat16 in float32.""",
            hints=[
                "Non-causal: `state = phi_k.transpose(-2, -1) @ v` is `(..., E', Ev)`; `norm = phi_k.sum(-2)`.",
                "Causal: loop over positions `i`, adding `phi(k_i) v_i^T` to the state before using it for query `i`; keys past the last query are never used, and queries past the last key see all of them.",
            ],
            solution="""\
work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
if feature_map is None:
    def feature_map(t: Tensor) -> Tensor:  # elu(t) + 1, without the cancellation of exp(t) - 1 + 1
        return torch.where(t > 0, t + 1, torch.exp(t.clamp(max=0)))
q = feature_map(query.to(work))  # (..., L, E')
k = feature_map(key.to(work))  # (..., S, E')
v = value.to(work)  # (..., S, Ev)
L, S = q.size(-2), k.size(-2)
if not causal:
    state = k.transpose(-2, -1) @ v  # (..., E', Ev)
    num = q @ state  # (..., L, Ev)
    den = q @ k.sum(dim=-2).unsqueeze(-1)  # (..., L, 1)
else:
    state = q.new_zeros((*k.shape[:-2], k.size(-1), v.size(-1)))  # sum of phi(k_j) v_j^T, j <= i
    norm = q.new_zeros((*k.shape[:-2], k.size(-1)))  # sum of phi(k_j), j <= i
    nums, dens = [], []
    for i in range(L):
        if i < S:
            state = state + k[..., i, :, None] * v[..., i, None, :]
            norm = norm + k[..., i, :]
        nums.append((q[..., i, None, :] @ state).squeeze(-2))  # (..., Ev)
        dens.append((q[..., i, :] * norm).sum(dim=-1, keepdim=True))  # (..., 1)
    if L == 0:
        num, den = q.new_zeros((*q.shape[:-1], v.size(-1))), q.new_zeros((*q.shape[:-1], 1))
    else:
        num, den = torch.stack(nums, dim=-2), torch.stack(dens, dim=-2)
out = num / torch.where(den == 0, torch.ones_like(den), den)
return out.to(query.dtype)
""",
            explore="""\
# Explore (not graded): linear attention is a different function from softmax attention.
torch.manual_seed(0)
q, k, v = torch.randn(1, 32, 8), torch.randn(1, 32, 8), torch.randn(1, 32, 4)
try:
    ours = linear_attention(q, k, v, causal=True)
    print("largest difference from attnlib:", (ours - attnlib.linear_attention(q, k, v, causal=True)).abs().max().item())
    soft = attnlib.scaled_dot_product_attention(q, k, v, is_causal=True)
    plt.plot(ours[0, :, 0].numpy(), label="linear attention (yours)")
    plt.plot(soft[0, :, 0].numpy(), "--", label="softmax attention")
    plt.xlabel("position"); plt.ylabel("output channel 0"); plt.legend(); plt.show()
except NotImplementedError:
    print("linear_attention is not written yet: fill in the cell above.")
""",
        ),
    ],
)

CHAPTERS["11_beyond_language"] = dict(
    number=11,
    title="Attention beyond language",
    intro="""\
A Vision Transformer reads an image as a sequence of patches. You write the cut, in the order
that makes it equal to ViT's convolutional patch embedding, and its inverse, which puts
patches back together into an image.""",
    imports="",
    exercises=[
        dict(
            id="patchify",
            points=4,
            guide="""\
Cut `(B, C, H, W)` images into non-overlapping `p x p` patches and flatten each (Chapter 11,
section *An image is a sequence of patches*). Patches are numbered row-major (left to right,
then top to bottom); the `C * p * p` numbers of a patch are laid out channel first, then row,
then column, the order of a convolution weight `(D, C, p, p)`. Keep the dtype (images may be
`uint8`).""",
            hints=[
                "`images.unfold(2, p, p).unfold(3, p, p)` is `(B, C, H/p, W/p, p, p)`.",
                "Move the patch grid in front of the channels, then reshape to `(B, N, C * p * p)`.",
            ],
            solution="""\
B, C, H, W = images.shape
p = patch_size
tiles = images.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
tiles = tiles.permute(0, 2, 3, 1, 4, 5)  # (B, H/p, W/p, C, p, p)
return tiles.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C * p * p)
""",
            explore="""\
# Explore (not graded): an image and its patches; the patch embedding equals a strided convolution.
torch.manual_seed(0)
image = torch.linspace(0, 1, 32 * 32).reshape(1, 1, 32, 32) * torch.tensor([1.0, 0.5, 0.2])[None, :, None, None]
try:
    patches = patchify(image, 8)  # (1, 16, 192)
    print("shape:", tuple(patches.shape), " equal to attnlib:", torch.equal(patches, attnlib.patchify(image, 8)))
    weight = torch.randn(5, 3, 8, 8)
    conv = F.conv2d(image, weight, stride=8).flatten(2).transpose(1, 2)
    print("patchify @ W == conv2d:", torch.allclose(patches @ weight.reshape(5, -1).T, conv, atol=1e-5))
    fig, axes = plt.subplots(4, 4, figsize=(4, 4))
    for n, ax in enumerate(axes.flat):
        ax.imshow(patches[0, n].reshape(3, 8, 8).permute(1, 2, 0).numpy()); ax.axis("off")
    plt.show()
except NotImplementedError:
    print("patchify is not written yet: fill in the cell above.")
""",
        ),
        dict(
            id="unpatchify",
            points=3,
            guide="""\
The inverse of `patchify` (Chapter 11, section *The code*): put `(B, N, C * p * p)` patches
back into `(B, C, H, W)` images, so that `unpatchify(patchify(x, p), p, H, W)` equals `x`
exactly. The patches are in `patchify`'s order: row-major over the grid of patches, each
vector laid out `(C, p, p)`. `C` follows from the last axis. Keep the dtype.""",
            hints=[
                "Reshape to `(B, H/p, W/p, C, p, p)`, then permute so that each grid axis sits next to its pixel axis: `(B, C, H/p, p, W/p, p)`; a reshape then merges them.",
                "The permutation is the inverse of patchify's, not the same one. `F.fold` is off limits.",
            ],
            solution="""\
B = patches.size(0)
p = patch_size
C = patches.size(-1) // (p * p)
grid = patches.reshape(B, height // p, width // p, C, p, p)  # (B, H/p, W/p, C, p, p)
grid = grid.permute(0, 3, 1, 4, 2, 5)  # (B, C, H/p, p, W/p, p)
return grid.reshape(B, C, height, width)  # (B, C, H, W)
""",
            explore="""\
# Explore (not graded): a round trip, and an image whose patches were shuffled before being
# put back (a transformer without positions sees no difference between the two).
torch.manual_seed(0)
image = torch.linspace(0, 1, 32 * 48).reshape(1, 1, 32, 48) * torch.tensor([1.0, 0.6, 0.3])[None, :, None, None]
try:
    patches = patchify(image, 8)  # (1, 24, 192)
    print("unpatchify(patchify(x)) == x:", torch.equal(unpatchify(patches, 8, 32, 48), image))
    shuffled = unpatchify(patches[:, torch.randperm(patches.size(1))], 8, 32, 48)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].imshow(image[0].permute(1, 2, 0).numpy()); axes[0].set_title("image")
    axes[1].imshow(shuffled[0].permute(1, 2, 0).numpy()); axes[1].set_title("patches shuffled")
    for ax in axes:
        ax.axis("off")
    plt.show()
except NotImplementedError:
    print("patchify or unpatchify is not written yet: fill in the cells above.")
""",
        ),
    ],
)

# --------------------------------------------------------------------------- building cells


def _source_lines(obj) -> list[str]:
    return textwrap.dedent(inspect.getsource(obj)).splitlines()


def _find_def(tree: ast.AST, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise LookupError(name)


def _header_end(fn: ast.FunctionDef) -> int:
    """The last line (1-based) of the def line(s) and docstring of ``fn``."""
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno
    raise ValueError(f"{fn.name} has no docstring to copy")


def _region(body: str, indent: str) -> list[str]:
    lines = [indent + "### BEGIN SOLUTION"]
    lines += [(indent + line) if line.strip() else "" for line in body.rstrip("\n").splitlines()]
    lines.append(indent + "### END SOLUTION")
    return lines


def function_stub(ref, body: str) -> str:
    """The reference's def line(s) and docstring (copied), then the solution region."""
    lines = _source_lines(ref)
    fn = _find_def(ast.parse("\n".join(lines)), ref.__name__)
    return "\n".join(lines[: _header_end(fn)] + _region(body, " " * 4))


def class_stub(ref, bodies: dict[str, str]) -> str:
    """The reference class, the graded methods' bodies (after the docstring) replaced by regions."""
    lines = _source_lines(ref)
    tree = ast.parse("\n".join(lines))
    cls = tree.body[0]
    assert isinstance(cls, ast.ClassDef) and cls.name == ref.__name__
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    replacements = []  # (first line to drop, last line to drop, new lines), 1-based
    for name, body in bodies.items():
        fn = methods[name]
        indent = " " * (fn.col_offset + 4)
        replacements.append((_header_end(fn) + 1, fn.end_lineno, _region(body, indent)))
    for start, end, new in sorted(replacements, reverse=True):
        lines[start - 1:end] = new
    return "\n".join(lines)


def _nbgrader(**fields) -> dict:
    return {"nbgrader": {**fields, "schema_version": 3}}


def grade_id(name: str) -> str:
    return name.replace(".", "_")


def test_source(ex_id: str, obj_name: str) -> str:
    return (f"from attnlib.grading import check\n"
            f"check({ex_id!r}, {obj_name})\n"
            f"### BEGIN HIDDEN TESTS\n"
            f"check({ex_id!r}, {obj_name}, hidden=True)\n"
            f"### END HIDDEN TESTS").replace("'", '"')


def _object_name(ex_id: str) -> str:
    return ex_id.split(".")[0]


def chapter_exercise_ids(number: int) -> list[str]:
    return [k for k, e in EXERCISES.items() if e.chapter == number]


def _cell(kind: str, source: str, cell_id: str, metadata: dict | None = None):
    cell = (new_code_cell if kind == "code" else new_markdown_cell)(source, metadata=metadata or {})
    cell["id"] = cell_id
    return cell


def build_notebook(assignment: str) -> nbformat.NotebookNode:
    spec = CHAPTERS[assignment]
    number = spec["number"]
    exercises = spec["exercises"]
    ids = [e["id"] for e in exercises]
    registered = chapter_exercise_ids(number)
    if sorted(ids) != sorted(registered):
        raise ValueError(f"{assignment}: the notebook has {ids}, attnlib.grading registers {registered}")
    total = sum(e["points"] for e in exercises)
    listing = "\n".join(f"| `{e['id']}` | {e['points']} |" for e in exercises)
    intro = f"""\
# Chapter {number} exercises: {spec['title']}

{spec['intro']}

These exercises go with Chapter {number} of the book, *{spec['title']}*; the sections to read
are named next to each exercise.

| exercise | points |
|---|---|
{listing}
| **total** | **{total}** |

**How this notebook works.** Run the first two code cells first: the install cell, which
on Google Colab installs the course package `attnlib` from the course's repository (anywhere
it is already installed it does nothing), and the imports. Replace each
`raise NotImplementedError` by your code, then run the test cell below it: it checks your
result against the course's reference on the visible cases and names the mistake when it
recognises one. Hidden cases, with more edge cases, are run when the notebook is graded;
each test cell is worth its points only if every case passes. The *explore* cells are not
graded: they put your result next to the reference. Write plain torch: while your code
runs, the grader blocks attnlib's version and PyTorch's built-in version of what you are
asked to write."""

    cells = [
        _cell("markdown", intro, "intro"),
        _cell("code", install_source().rstrip("\n"), "install"),
        _cell("code", BASE_IMPORTS + spec["imports"], "imports"),
    ]
    done_objects: set[str] = set()
    for ex in exercises:
        ex_id = ex["id"]
        exercise = EXERCISES[ex_id]
        obj = _object_name(ex_id)
        gid = grade_id(ex_id)
        if "guide" in ex:
            text = f"## `{obj}`\n\n" + ex["guide"]
            if ex.get("hints"):
                text += "\n\n**Hints**\n\n" + "\n".join(f"- {h}" for h in ex["hints"])
            cells.append(_cell("markdown", text, f"{gid}-guide"))
        if obj not in done_objects:
            done_objects.add(obj)
            if exercise.kind == "module":
                bodies = {}
                for other in exercises:  # every graded method of this class, in one cell
                    if _object_name(other["id"]) == obj:
                        bodies.update(other.get("solution", {}))
                source = class_stub(exercise.reference, bodies)
            else:
                source = function_stub(exercise.reference, ex["solution"])
            cells.append(_cell("code", source, f"{grade_id(obj)}-solution",
                               _nbgrader(grade=False, grade_id=f"{grade_id(obj)}-solution",
                                         locked=False, solution=True)))
        cells.append(_cell("code", test_source(ex_id, obj), f"test_{gid}",
                           _nbgrader(grade=True, grade_id=f"test_{gid}", locked=True,
                                     points=ex["points"], solution=False)))
        if ex.get("explore"):
            cells.append(_cell("code", ex["explore"].rstrip("\n"), f"{gid}-explore"))
    cells.append(_cell("markdown", f"""\
## When you are done

Run every cell from the top (*Kernel → Restart & Run All*): the test cells must pass in a
fresh kernel, not only after your experiments. This notebook is worth {total} points.""",
                       "done"))
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nb.nbformat, nb.nbformat_minor = 4, 5
    nbformat.validate(nb)
    return nb


def write_sources(root: Path) -> list[Path]:
    paths = []
    for assignment in CHAPTERS:
        path = root / SOURCE_DIR / assignment / f"{assignment}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(build_notebook(assignment), str(path))
        paths.append(path)
    return paths


def release(root: Path) -> None:
    """``nbgrader generate_assignment`` for every assignment, without a database.

    One nbgrader process for all of them (the assignment id is a glob, which nbgrader
    expands over ``solutions/``): the same notebooks as one call per assignment, in a
    fraction of the time. ``--no-db`` keeps nbgrader from writing a gradebook.
    """
    nbgrader = Path(sys.executable).with_name("nbgrader")
    cmd = [str(nbgrader)] if nbgrader.exists() else [sys.executable, "-m", "nbgrader"]
    cmd += ["generate_assignment", "[0-9][0-9]_*", "--force", "--no-db", "--quiet",
            f"--CourseDirectory.root={root}"]
    release_dir = root / RELEASE_DIR
    if release_dir.exists():  # nothing stale: notebooks/ holds exactly this release
        shutil.rmtree(release_dir)
    subprocess.run(cmd, cwd=root, check=True)
    released = sorted(p.name for p in release_dir.iterdir())
    if released != sorted(CHAPTERS):
        raise RuntimeError(f"nbgrader released {released}, expected {sorted(CHAPTERS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", action="store_true", help="also run nbgrader into notebooks/")
    parser.add_argument("--root", type=Path, default=REPO, help="course root (default: the repository)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if root != REPO and not (root / "nbgrader_config.py").exists():
        shutil.copy(REPO / "nbgrader_config.py", root / "nbgrader_config.py")
    for path in write_sources(root):
        print("wrote", path.relative_to(root))
    if args.release:
        release(root)
        print("released into", root / RELEASE_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
