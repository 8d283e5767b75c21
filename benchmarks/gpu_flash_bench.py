"""TFLOP/s of attnlib's Triton FlashAttention-2 kernel against PyTorch's fused flash SDPA, on a GPU.

Two methods (issue 14):

* ``ours``: :func:`attnlib.triton_flash.flash_attention_triton` (FlashAttention-2 forward and
  backward in Triton, wrapped in a ``torch.autograd.Function``);
* ``torch_flash``: ``F.scaled_dot_product_attention`` inside
  ``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)``, so PyTorch may use its
  flash kernel and nothing else (a configuration that kernel refuses is an error, not a
  silent fall-back to another backend).

The grid follows the FlashAttention-2 paper's benchmark (Dao 2023, section 4.1): sequence
length L = S = 1K, 2K, 4K, 8K, 16K; batch = 16K tokens / L, so every point holds the same
number of tokens; hidden size 2048, so heads = 2048 / head_dim (32 heads of 64, 16 of 128);
head_dim 64 and 128; fp16 and bf16; causal and not. Inputs are ``(B, H, L, D)``.

FLOPs (the paper's convention, the same as flash-attn's benchmarks/benchmark_flash_attention.py):
forward = 4 * B * H * L * S * D (two matmuls, 2 FLOPs per multiply-add), halved with the causal
mask; backward = 2.5 x forward (five matmuls, the recomputation of the scores included);
forward + backward = 3.5 x forward. TFLOP/s = these counts / the median time / 1e12; the
backward's own rate uses fwd+bwd time minus fwd time.

Timing: CUDA events around every call, after ``--warmup`` untimed calls (which also compile
and autotune the Triton kernel); the median and the best of ``--repeats`` calls are kept.
The forward is timed under ``torch.no_grad()``; forward + backward is ``fn(q, k, v).backward(dO)``
with the input gradients reset (untimed) before every call. Once per configuration, before
the timing, each method's output and input gradients are compared with an fp32
``F.scaled_dot_product_attention`` of the same inputs (PyTorch's default backend): the largest
absolute errors go into the CSV. An error at a point (out of memory, a configuration a kernel
does not support, a missing kernel) is recorded in the ``error`` column and the sweep goes on.

Results: benchmarks/results/gpu_flash_<gpu>.csv (one row per method and configuration), .json
(the GPU, the software, the settings, the conventions, a summary with our forward TFLOP/s as a
fraction of PyTorch's at L=4K, head_dim 64, fp16, non-causal: issue 14's target is >= 80 % on an
H100) and .png (TFLOP/s against L). CSV and JSON are rewritten after every configuration, so
a run cut short keeps what it measured. These are measurements, not tests.

Without a CUDA GPU the script stops with a message and exit status 1 (the kernel's correctness
is tested on the CPU under the Triton interpreter by ``make test``). ``--dry-run`` runs every
CPU-side step instead, on the CPU: the same grid with tiny shapes (L / 128, batch 1, 2 heads),
the course's pure-PyTorch :func:`attnlib.flash_attention` standing in for the Triton kernel
(``--dry-run-kernel triton``: the real kernel under the Triton interpreter) and PyTorch's CPU
flash kernel, timed with ``time.perf_counter``. It writes gpu_flash_dry-run-cpu.{csv,json,png}
into a temporary directory (or ``--out-dir``, never benchmarks/results/), every file labelled
"DRY RUN ... not a benchmark".

    python benchmarks/gpu_flash_bench.py                  # the full grid, 80 points (not yet timed on a GPU)
    python benchmarks/gpu_flash_bench.py --quick          # fp16, L = 1K, 4K, 16K
    python benchmarks/gpu_flash_bench.py --time-budget 420 --out-dir /tmp/out
    python benchmarks/gpu_flash_bench.py --dry-run        # no GPU needed: checks the plumbing
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LENGTHS = [1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [1024, 4096, 16384]
HEAD_DIMS = [64, 128]
DTYPES = ["float16", "bfloat16"]
QUICK_DTYPES = ["float16"]
MASKS = ["none", "causal"]
METHODS = ["ours", "torch_flash"]
TOKENS = 16384  # batch * L
HIDDEN = 2048  # heads * head_dim
DRY_RUN_DIVISOR = 128  # dry run: L / 128, batch 1, 2 heads
DRY_RUN_HEADS = 2

HEADLINE = {"L": 4096, "head_dim": 64, "dtype": "float16", "causal": False}
TARGET_FRACTION = 0.8
BWD_FACTOR = 2.5
FWD_BWD_FACTOR = 3.5
CITATION = "Dao 2023, FlashAttention-2, section 4.1"
FLOP_CONVENTION = (
    f"{CITATION}: forward FLOPs = 4 * batch * heads * L * S * head_dim (QK^T and PV, 2 FLOPs per "
    "multiply-add), halved with the causal mask (about half the scores are computed); backward = "
    f"{BWD_FACTOR} x forward (5 matmuls against the forward's 2, the recomputation of the scores "
    f"included); forward + backward = {FWD_BWD_FACTOR} x forward. The same counts for every method, "
    "whatever it really computes (so a kernel that skips masked tiles better scores higher). "
    "The same as flash-attn's benchmarks/benchmark_flash_attention.py.")
NO_GPU = ("no CUDA GPU: this benchmark needs one; the kernel's correctness is tested on the CPU "
          "under the Triton interpreter by make test")
DRY_RUN_NOTE = ("DRY RUN on the CPU, not a benchmark: tiny shapes, CPU kernels and "
                "time.perf_counter; it only checks the grid, the FLOP counts and the files")
FIELDS = [
    "method", "dtype", "causal", "head_dim", "L", "S", "batch", "heads",
    "fwd_ms", "fwd_ms_min", "fwd_bwd_ms", "fwd_bwd_ms_min", "bwd_ms",
    "fwd_tflops", "fwd_bwd_tflops", "bwd_tflops", "fwd_flops", "fwd_bwd_flops",
    "runs", "max_abs_err", "max_abs_err_grad", "device", "error",
]
METHOD_LABELS = {"ours": "ours (Triton)", "torch_flash": "PyTorch SDPA (flash)"}


# --------------------------------------------------------------------------- CPU-side logic

def attention_flops(batch: int, heads: int, L: int, S: int, head_dim: int, causal: bool,
                    mode: str = "fwd") -> int:
    """FLOPs of one attention call under the FlashAttention-2 paper's convention (see module doc).

    ``mode``: ``"fwd"`` (4 B H L S D, halved when causal), ``"bwd"`` (2.5 x forward) or
    ``"fwd_bwd"`` (3.5 x forward).
    """
    if mode not in ("fwd", "bwd", "fwd_bwd"):
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd_bwd', not {mode!r}")
    fwd = 4 * batch * heads * L * S * head_dim
    if causal:
        fwd //= 2
    return {"fwd": fwd, "bwd": fwd * 5 // 2, "fwd_bwd": fwd * 7 // 2}[mode]


def tflops(flops: float, seconds: float | None) -> float | None:
    return None if not seconds else flops / seconds / 1e12


def shape(L: int, head_dim: int, tokens: int = TOKENS, hidden: int = HIDDEN,
          heads: int | None = None) -> tuple[int, int]:
    """(batch, heads) for one grid point: batch * L = tokens, heads * head_dim = hidden
    (or ``heads`` when given)."""
    return max(1, tokens // L), heads if heads else max(1, hidden // head_dim)


def grid(lengths=LENGTHS, head_dims=HEAD_DIMS, dtypes=DTYPES, masks=MASKS, tokens: int = TOKENS,
         hidden: int = HIDDEN, heads: int | None = None, dry_run: bool = False) -> list[dict]:
    """The configurations, in the order they run: dtype, then mask, then head_dim, then L
    (so fp16, non-causal, head_dim 64, which holds the headline point, comes first).

    Each is ``{"dtype", "causal", "head_dim", "L", "S", "batch", "heads"}``; with ``dry_run``
    the shapes are the tiny CPU ones (L / 128, batch 1, 2 heads)."""
    configs = []
    for dtype in dtypes:
        for mask in masks:
            for d in head_dims:
                for L in lengths:
                    if dry_run:
                        n, B, H = max(8, L // DRY_RUN_DIVISOR), 1, DRY_RUN_HEADS
                    else:
                        (B, H), n = shape(L, d, tokens, hidden, heads), L
                    configs.append({"dtype": dtype, "causal": mask == "causal", "head_dim": d,
                                    "L": n, "S": n, "batch": B, "heads": H})
    return configs


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def short_error(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text[:240]


def _get(rows: list[dict], method: str, key: str, **where) -> float | None:
    for r in rows:
        if r["method"] == method and all(r.get(k) == v for k, v in where.items()):
            value = r.get(key)
            return value if isinstance(value, (int, float)) and value == value else None
    return None


def summarize(rows: list[dict], headline: dict, dry_run: bool = False) -> dict:
    """The JSON summary: our forward TFLOP/s as a fraction of PyTorch's at the headline point
    (``headline`` as a row would hold it: dtype, causal, head_dim, L), the median of that
    fraction over all configurations, and our errors against PyTorch flash's."""
    where = {k: headline[k] for k in ("dtype", "causal", "head_dim", "L")}
    out: dict = {"headline_config": where}
    for mode in ("fwd", "fwd_bwd"):
        ours, theirs = (_get(rows, m, f"{mode}_tflops", **where) for m in METHODS)
        out[f"ours_{mode}_tflops"], out[f"torch_flash_{mode}_tflops"] = ours, theirs
        out[f"ours_{mode}_fraction_of_torch"] = (round(ours / theirs, 4) if ours and theirs
                                                 else None)
    frac = out["ours_fwd_fraction_of_torch"]
    out["target"] = (f"ours_fwd_fraction_of_torch >= {TARGET_FRACTION} on an H100 (issue 14)")
    out["target_status"] = ("dry run: not applicable" if dry_run else "not measured" if frac is None
                            else "met" if frac >= TARGET_FRACTION else "MISSED")
    keys = {(r["dtype"], r["causal"], r["head_dim"], r["L"]) for r in rows}
    for mode in ("fwd", "fwd_bwd"):
        ratios = []
        for dt, c, d, L in sorted(keys, key=str):
            ours = _get(rows, "ours", f"{mode}_tflops", dtype=dt, causal=c, head_dim=d, L=L)
            theirs = _get(rows, "torch_flash", f"{mode}_tflops", dtype=dt, causal=c, head_dim=d, L=L)
            if ours and theirs:
                ratios.append(ours / theirs)
        out[f"median_{mode}_fraction_over_configs"] = (round(statistics.median(ratios), 4)
                                                      if ratios else None)
        out[f"configs_compared_{mode}"] = len(ratios)
    within, compared = 0, 0
    for dt, c, d, L in keys:
        for key in ("max_abs_err", "max_abs_err_grad"):
            ours = _get(rows, "ours", key, dtype=dt, causal=c, head_dim=d, L=L)
            theirs = _get(rows, "torch_flash", key, dtype=dt, causal=c, head_dim=d, L=L)
            if ours is not None and theirs is not None:
                compared += 1
                within += ours <= 2 * theirs + 1e-5
    out["error_rule"] = ("our max abs error (output or gradients) against fp32 SDPA <= 2 x PyTorch "
                         "flash's + 1e-5, per configuration")
    out["error_within_rule"] = f"{within}/{compared}"
    out["points"] = len(rows)
    out["points_with_errors"] = sum(1 for r in rows if r.get("error"))
    out["points_measured"] = sum(1 for r in rows if r.get("fwd_tflops"))
    return out


def summary_lines(summary: dict, gpu: str) -> list[str]:
    h = summary["headline_config"]
    where = (f"L={h['L']}, head_dim={h['head_dim']}, {h['dtype']}, "
             f"{'causal' if h['causal'] else 'non-causal'}")
    frac = summary["ours_fwd_fraction_of_torch"]
    lines = []
    if frac is None:
        lines.append(f"ours / PyTorch flash forward TFLOP/s at {where}: not measured")
    else:
        lines.append(f"ours / PyTorch flash forward TFLOP/s at {where}: {frac:.0%} "
                     f"({summary['ours_fwd_tflops']:.4g} vs {summary['torch_flash_fwd_tflops']:.4g}; "
                     f"target >= {TARGET_FRACTION:.0%} on an H100, this is {gpu}): "
                     f"{summary['target_status']}")
    med = summary["median_fwd_fraction_over_configs"]
    if med is not None:
        lines.append(f"median over {summary['configs_compared_fwd']} configurations: forward "
                     f"{med:.0%}, forward+backward "
                     f"{(summary['median_fwd_bwd_fraction_over_configs'] or float('nan')):.0%}")
    lines.append(f"errors within 2x PyTorch flash's: {summary['error_within_rule']}; "
                 f"{summary['points_with_errors']} of {summary['points']} points report an error")
    return lines


def length_label(L: int) -> str:
    return f"{L // 1024}K" if L >= 1024 and L % 1024 == 0 else str(L)


def plot(rows: list[dict], path: Path, title: str, labels: dict | None = None) -> None:
    """TFLOP/s against L: rows of panels = (forward, fwd+bwd) x head_dim, columns = mask;
    colour = method, line style = dtype. 7.5 inches wide, no text under 9 pt. ``labels``:
    {method: legend label} (default METHOD_LABELS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    from attnlib.plotting import COLORS, use_course_style

    use_course_style()
    labels = {**METHOD_LABELS, **(labels or {})}
    head_dims = sorted({r["head_dim"] for r in rows})
    masks = sorted({r["causal"] for r in rows})
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    lengths = sorted({r["L"] for r in rows})
    panels = [(mode, d) for mode in ("fwd", "fwd_bwd") for d in head_dims]
    fig, axes = plt.subplots(len(panels), len(masks), figsize=(7.5, 1.3 + 2.0 * len(panels)),
                             sharex=True, sharey=True, squeeze=False)
    colors = {"ours": COLORS[0], "torch_flash": COLORS[1]}
    styles = {"float16": ("-", "o"), "bfloat16": ("--", "s")}
    for i, (mode, d) in enumerate(panels):
        for j, causal in enumerate(masks):
            ax = axes[i][j]
            for method in METHODS:
                for dtype in dtypes:
                    pts = sorted((r["L"], r[f"{mode}_tflops"]) for r in rows
                                 if r["method"] == method and r["dtype"] == dtype
                                 and r["head_dim"] == d and r["causal"] == causal
                                 and r.get(f"{mode}_tflops"))
                    if pts:
                        ls, marker = styles.get(dtype, (":", "^"))
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker=marker,
                                color=colors[method])
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [length_label(L) for L in lengths])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'}, head_dim {d}, "
                         f"{'causal' if causal else 'non-causal'}", fontsize=10)
            if j == 0:
                ax.set_ylabel("TFLOP/s", fontsize=10)
            if i == len(panels) - 1:
                ax.set_xlabel("sequence length L = S", fontsize=10)
    top = max([r[f"{mode}_tflops"] for r in rows for mode in ("fwd", "fwd_bwd")
               if r.get(f"{mode}_tflops")], default=1.0)
    axes[0][0].set_ylim(0, 1.08 * top)  # shared by every panel
    handles = [Line2D([], [], color=colors[m], ls=styles.get(dt, (":", "^"))[0],
                      marker=styles.get(dt, (":", "^"))[1], label=f"{labels[m]}, {dt}")
               for m in METHODS for dt in dtypes]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(title, 95)), fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def write_tables(stem: Path, rows: list[dict], meta: dict) -> None:
    """CSV (one row per method and configuration) and JSON (meta + summary + rows); written
    through a temporary file, so a run killed mid-write leaves the previous complete file."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(stem.with_suffix(".csv"))
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**meta, "results": rows}, indent=2, default=str) + "\n")
    tmp.replace(stem.with_suffix(".json"))


def out_stem(args: argparse.Namespace, gpu: str) -> Path:
    if args.dry_run:
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="gpu_flash_dry_run_"))
        resolved = Path(out_dir).resolve()
        if resolved == RESULTS or RESULTS in resolved.parents:
            raise SystemExit("--dry-run writes no results into benchmarks/results/: its timings "
                             "are not a benchmark; pick another --out-dir")
        return Path(out_dir) / "gpu_flash_dry-run-cpu"
    return Path(args.out_dir or RESULTS) / f"gpu_flash_{slug(gpu)}"


# --------------------------------------------------------------------------- measuring

def kernels(args: argparse.Namespace) -> tuple[dict, dict]:
    """{method: fn(q, k, v, causal)} and {method: what it is}. The Triton kernel is imported
    here, lazily: if it is missing or fails to import, its points record the error."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def torch_flash(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    fns = {"torch_flash": torch_flash}
    about = {"torch_flash": "torch.nn.functional.scaled_dot_product_attention under "
             "torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)"}
    if args.dry_run and args.dry_run_kernel == "standin":
        import attnlib

        fns["ours"] = lambda q, k, v, causal: attnlib.flash_attention(q, k, v, is_causal=causal)
        about["ours"] = ("STAND-IN for the Triton kernel: attnlib.flash_attention (pure PyTorch, "
                         "chapter 9), so that the dry run needs no attnlib.triton_flash")
        return fns, about
    try:
        from attnlib.triton_flash import flash_attention_triton
    except Exception as exc:  # noqa: BLE001 - any import failure is recorded per point
        failure = short_error(exc)

        def flash_attention_triton(q, k, v, is_causal=False, scale=None):
            raise ImportError(f"attnlib.triton_flash could not be imported ({failure})")

    fns["ours"] = lambda q, k, v, causal: flash_attention_triton(q, k, v, is_causal=causal)
    about["ours"] = ("attnlib.triton_flash.flash_attention_triton"
                     + (" under the Triton interpreter (TRITON_INTERPRET=1)" if args.dry_run else ""))
    return fns, about


def time_calls(fn, warmup: int, repeats: int, device: str, before=None) -> list[float]:
    """Seconds per call of ``fn()``, ``repeats`` timed calls after ``warmup`` untimed ones;
    ``before()`` runs, untimed, before every call. CUDA events on a GPU, perf_counter on a CPU."""
    import torch

    for _ in range(warmup):
        if before:
            before()
        fn()
    if device != "cuda":
        times = []
        for _ in range(repeats):
            if before:
                before()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        if before:
            before()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def _max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_config(cfg: dict, fns: dict, args: argparse.Namespace, device: str) -> list[dict]:
    """Both methods at one configuration: errors against fp32 SDPA, then the timings.
    Any exception (OOM, an unsupported configuration) ends that method's point, not the sweep."""
    import torch
    import torch.nn.functional as F

    B, H, L, S, D, causal = (cfg[k] for k in ("batch", "heads", "L", "S", "head_dim", "causal"))
    dtype = getattr(torch, cfg["dtype"])
    fwd_flops = attention_flops(B, H, L, S, D, causal, "fwd")
    fb_flops = attention_flops(B, H, L, S, D, causal, "fwd_bwd")
    base = {**cfg, "fwd_flops": fwd_flops, "fwd_bwd_flops": fb_flops,
            "device": "cpu (dry run, not a benchmark)" if args.dry_run else args.device_label}
    rows = []
    notes = []
    try:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        q, k, v = (torch.randn(B, H, n, D, device=device, dtype=dtype, generator=gen)
                   .requires_grad_(True) for n in (L, S, S))
        dout = torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen)
    except Exception as exc:  # noqa: BLE001
        return [{**base, "method": m, "error": f"inputs: {short_error(exc)}"} for m in args.methods]
    ref = None
    if args.check:
        try:
            q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
            out32 = F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal)
            out32.backward(dout.float())
            ref = (out32.detach(), q32.grad, k32.grad, v32.grad)
            del q32, k32, v32, out32
        except Exception as exc:  # noqa: BLE001
            notes.append(f"fp32 reference: {short_error(exc)}")
            _free(device)

    def reset_grads():
        q.grad = k.grad = v.grad = None

    for method in args.methods:
        fn = fns[method]
        row = {**base, "method": method}
        errors = list(notes)
        try:  # forward: check, then time
            if ref is not None:
                with torch.no_grad():
                    row["max_abs_err"] = _max_err(fn(q, k, v, causal), ref[0])
            with torch.no_grad():
                times = time_calls(lambda: fn(q, k, v, causal), args.warmup, args.repeats, device)
            row.update(fwd_ms=statistics.median(times) * 1e3, fwd_ms_min=min(times) * 1e3,
                       runs=len(times))
            row["fwd_tflops"] = tflops(fwd_flops, statistics.median(times))
        except Exception as exc:  # noqa: BLE001
            errors.append(f"forward: {short_error(exc)}")
            _free(device)
        if "fwd_ms" in row:
            try:  # forward + backward: check the gradients, then time
                if ref is not None:
                    reset_grads()
                    fn(q, k, v, causal).backward(dout)
                    row["max_abs_err_grad"] = max(_max_err(g, r) for g, r in
                                                  zip((q.grad, k.grad, v.grad), ref[1:]))
                times = time_calls(lambda: fn(q, k, v, causal).backward(dout), args.warmup,
                                   args.repeats, device, before=reset_grads)
                med = statistics.median(times)
                row.update(fwd_bwd_ms=med * 1e3, fwd_bwd_ms_min=min(times) * 1e3,
                           fwd_bwd_tflops=tflops(fb_flops, med))
                bwd = med - row["fwd_ms"] / 1e3
                if bwd > 0:
                    row["bwd_ms"] = bwd * 1e3
                    row["bwd_tflops"] = tflops(attention_flops(B, H, L, S, D, causal, "bwd"), bwd)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"forward+backward: {short_error(exc)}")
                _free(device)
            reset_grads()
        for key in ("fwd_ms", "fwd_ms_min", "fwd_bwd_ms", "fwd_bwd_ms_min", "bwd_ms"):
            if key in row:
                row[key] = float(f"{row[key]:.5g}")
        for key in ("fwd_tflops", "fwd_bwd_tflops", "bwd_tflops", "max_abs_err", "max_abs_err_grad"):
            if row.get(key) is not None:
                row[key] = float(f"{row[key]:.4g}")
        if errors:
            row["error"] = "; ".join(errors)
        rows.append(row)
    return rows


def gpu_warmup(seconds: float = 1.0) -> None:
    """Big fp16 matmuls for about ``seconds``, so the first point does not run on idle clocks."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    del a
    torch.cuda.empty_cache()


def _free(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES"))
    else:
        info["gpu"] = None
    return info


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"fp16 only, L = {QUICK_LENGTHS}, 3 warm-up and 10 timed calls")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help=f"L = S (default {LENGTHS}; --quick: {QUICK_LENGTHS})")
    p.add_argument("--head-dims", type=int, nargs="+", default=HEAD_DIMS)
    p.add_argument("--dtypes", nargs="+", default=None, choices=DTYPES,
                   help=f"default {DTYPES}; --quick: {QUICK_DTYPES}")
    p.add_argument("--masks", nargs="+", default=MASKS, choices=MASKS)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--tokens", type=int, default=TOKENS, help="batch * L at every point")
    p.add_argument("--hidden", type=int, default=HIDDEN, help="heads = hidden / head_dim")
    p.add_argument("--heads", type=int, default=None, help="a fixed number of heads instead")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; "
                   "--quick 3; --dry-run 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls, median kept (default 20; "
                   "--quick 10; --dry-run 2)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the comparison with fp32 SDPA")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; once spent, the remaining configurations are recorded as skipped "
                   "(0: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where gpu_flash_<gpu>.{csv,json,png} go (default benchmarks/results; "
                   "--dry-run: a new temporary directory)")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: run the CPU-side logic on tiny shapes on the CPU (not a benchmark)")
    p.add_argument("--dry-run-kernel", choices=["standin", "triton"], default="standin",
                   help="dry run's 'ours': attnlib.flash_attention (standin) or the Triton kernel "
                   "under the Triton interpreter")
    args = p.parse_args(argv)
    args.lengths = sorted(set(args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)))
    args.dtypes = args.dtypes or (QUICK_DTYPES if args.quick else DTYPES)
    defaults = (1, 2) if args.dry_run else (3, 10) if args.quick else (5, 20)
    args.warmup = defaults[0] if args.warmup is None else args.warmup
    args.repeats = defaults[1] if args.repeats is None else args.repeats
    if args.repeats < 1 or args.warmup < 0 or min(args.lengths + args.head_dims) < 1:
        p.error("--repeats, --lengths and --head-dims must be at least 1, --warmup at least 0")
    if args.dry_run and args.dry_run_kernel == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # before torch or anything else imports triton

    import torch

    if args.dry_run:
        device = "cpu"
        torch.set_num_threads(1)  # tiny shapes: a second thread only waits (2-core machines)
    elif not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 1
    else:
        device = "cuda"
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("TRITON_INTERPRET is set: the Triton kernel would run in the interpreter, not on "
                  "the GPU; unset it to benchmark", file=sys.stderr)
            return 1
    info = machine(device)
    gpu = info["gpu"] or "cpu"
    args.device_label = gpu
    stem = out_stem(args, gpu)
    configs = grid(args.lengths, args.head_dims, args.dtypes, args.masks, args.tokens, args.hidden,
                   args.heads, dry_run=args.dry_run)
    headline = grid([HEADLINE["L"]], [HEADLINE["head_dim"]], [HEADLINE["dtype"]],
                    ["causal" if HEADLINE["causal"] else "none"], args.tokens, args.hidden,
                    args.heads, dry_run=args.dry_run)[0]
    fns, about = kernels(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "device_label")}
    meta = {
        "benchmark": "FlashAttention-2 forward and forward+backward TFLOP/s: attnlib's Triton "
                     "kernel vs PyTorch's flash SDPA (issue 14)",
        "dry_run": args.dry_run,
        **({"note": DRY_RUN_NOTE} if args.dry_run else {}),
        "machine": info,
        "methods": {m: about[m] for m in args.methods},
        "settings": settings,
        "shapes": ("DRY RUN: L = grid L / 128 (at least 8), batch 1, 2 heads" if args.dry_run else
                   f"batch = {args.tokens} // L tokens, heads = "
                   + (f"{args.heads}" if args.heads else f"{args.hidden} // head_dim (hidden size "
                                                         f"{args.hidden})")
                   + f", inputs (B, H, L, D), L = S, as in {CITATION} (16k tokens, hidden 2048)"),
        "flops": FLOP_CONVENTION,
        "timing": ("CUDA events around each call" if device == "cuda" else "time.perf_counter")
                  + f"; {args.warmup} untimed warm-up calls (Triton compiles and autotunes there), "
                  f"median (and min) of {args.repeats} timed calls; forward under torch.no_grad(); "
                  "forward+backward = fn(q, k, v).backward(dO) with the input grads reset (untimed) "
                  "before each call; bwd = median fwd+bwd time - median fwd time; no L2 flush",
        "correctness": ("once per configuration, before timing: max |out - ref| and max over dq, dk, "
                        "dv of |grad - ref grad|, ref = F.scaled_dot_product_attention on the same "
                        "inputs cast to fp32 (PyTorch's default backend)" if args.check
                        else "skipped (--no-check)"),
        "units": "time in ms, rates in TFLOP/s (1e12 FLOP/s)",
    }

    print(f"{'DRY RUN (not a benchmark) on the CPU' if args.dry_run else gpu}: "
          f"{len(configs)} configurations x {len(args.methods)} methods -> {stem}.csv")
    rows: list[dict] = []
    t0 = time.perf_counter()
    if device == "cuda":
        gpu_warmup()
    for cfg in configs:
        if args.time_budget and time.perf_counter() - t0 > args.time_budget:
            rows += [{**cfg, "method": m, "error": f"skipped: --time-budget {args.time_budget:g} s "
                      "spent"} for m in args.methods]
            continue
        done = run_config(cfg, fns, args, device)
        _free(device)  # the configuration's tensors are gone with run_config's frame
        for r in done:
            rows.append(r)
            rate = "  ".join(f"{mode} {r[f'{mode}_tflops']:8.4g}" if r.get(f"{mode}_tflops")
                             else f"{mode} {'-':>8}" for mode in ("fwd", "fwd_bwd"))
            print(f"{r['method']:>11} {r['dtype']:>8} {'causal' if r['causal'] else 'full':>6} "
                  f"d={r['head_dim']:<3} L={r['L']:>5} B={r['batch']:<3} H={r['heads']:<3} "
                  f"TFLOP/s {rate}  err {r.get('max_abs_err', float('nan')):.2g}"
                  + (f"  [{r['error']}]" if r.get("error") else ""), flush=True)
        meta["summary"] = summarize(rows, headline, args.dry_run)
        meta["total_seconds"] = round(time.perf_counter() - t0, 1)
        write_tables(stem, rows, meta)  # after every configuration: a cut-short run keeps its rows
    meta["summary"] = summarize(rows, headline, args.dry_run)
    meta["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_tables(stem, rows, meta)
    if args.dry_run:
        title = ("DRY RUN, NOT A BENCHMARK: the CPU, tiny shapes (L = grid L / 128, batch 1, "
                 f"{DRY_RUN_HEADS} heads); 'ours' = " + ("attnlib.flash_attention standing in for the "
                 "Triton kernel" if args.dry_run_kernel == "standin" else "the Triton kernel under "
                 "the Triton interpreter"))
    else:
        title = (f"Attention TFLOP/s on {gpu}: {meta['shapes'].split(', inputs')[0]}; "
                 f"torch {info['torch']}, triton {info['triton']}")
    labels = ({"ours": "ours (stand-in)" if args.dry_run_kernel == "standin"
               else "ours (Triton, interpreter)"} if args.dry_run else None)
    plot(rows, stem.with_suffix(".png"), title, labels)
    for line in summary_lines(meta["summary"], gpu):
        print(line)
    print(f"wrote {stem.with_suffix('.csv')}, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
