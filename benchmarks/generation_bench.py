"""Tokens per second of greedy generation with and without a KV cache (chapter 12).

One small fixed-seed :class:`attnlib.TinyGPT` (vocab 256, d_model 128, 4 query heads,
2 key/value heads (GQA), 4 layers, fp32, batch 1) generates greedily from a fixed 16-token
prompt up to a total sequence length L (64, 128, 256, 512, 1024 by default), with
``generate(..., use_cache=True)`` (prefill once, then one token at a time through the
per-layer KV caches) and with ``use_cache=False`` (the whole sequence is run again for every
new token). Tokens per second = new tokens (L - 16) / wall time of the ``generate`` call,
prefill included.

After one warm-up run of each mode, each length runs the two modes alternately, so that a
noisy moment hits both alike, until a mode has ``--repeats`` runs or its runs have taken
``--budget`` seconds (at least one run, as in attention_bench.py); the median and the best
(minimum) time are kept, with the number of runs. Every run's tokens are compared with the
first cached run's: the two modes must generate the same tokens, or the script stops with
an error. The speed-up is the uncached median time over the cached median time.

Threads: ``torch.set_num_threads(--threads)``, 1 by default. Batch-1 decoding of a model this
small gives each matmul too little work to split, and on a 2-core machine shared with other
work a second thread makes the times erratic (a run waits for a descheduled sibling).

Results: benchmarks/results/generation.csv (one row per length), generation.json (machine,
settings, rows) and generation.png (tokens/s against L, log-log, and the speed-up). These are
measurements, not tests.

    python benchmarks/generation_bench.py           # 64..1024 tokens, ~2 min on 2 cores
    python benchmarks/generation_bench.py --quick   # 64..256 tokens, a few seconds
    python benchmarks/generation_bench.py --lengths 128 512 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LENGTHS = [64, 128, 256, 512, 1024]
QUICK_LENGTHS = [64, 128, 256]
MODES = ["uncached", "cached"]  # use_cache=False, use_cache=True
FIELDS = [
    "L", "prompt_len", "new_tokens",
    "uncached_runs", "uncached_median_s", "uncached_min_s", "uncached_tok_s", "uncached_tok_s_best",
    "cached_runs", "cached_median_s", "cached_min_s", "cached_tok_s", "cached_tok_s_best",
    "speedup", "speedup_best", "same_tokens",
]


def build_model(args: argparse.Namespace):
    import torch

    import attnlib

    torch.manual_seed(args.seed)
    model = attnlib.TinyGPT(args.vocab, args.d_model, args.heads, args.layers, max(args.lengths),
                            n_kv_heads=args.kv_heads).eval()
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=gen)  # (1, prompt)
    return model, prompt


def timed(model, prompt, new_tokens: int, use_cache: bool):
    """One ``generate`` call: (seconds, tokens)."""
    t0 = time.perf_counter()
    out = model.generate(prompt, new_tokens, use_cache=use_cache)
    return time.perf_counter() - t0, out


def measure_length(model, prompt, L: int, args: argparse.Namespace) -> dict:
    """Both modes at one total length L, alternating runs; stops on a token mismatch."""
    import torch

    new = L - prompt.size(1)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    reference = None
    order = ["cached", "uncached"]  # the cached run is quick: it sets the reference first
    while True:
        pending = [m for m in order if len(times[m]) < args.repeats
                   and (not times[m] or sum(times[m]) < args.budget)]
        if not pending:
            break
        for mode in pending:
            seconds, out = timed(model, prompt, new, use_cache=(mode == "cached"))
            if reference is None:
                reference = out
            elif not torch.equal(out, reference):
                diff = (out != reference).nonzero()
                pos = int(diff[0, 1]) if diff.numel() else -1
                raise SystemExit(
                    f"L={L}: {mode} run {len(times[mode]) + 1} generated different tokens from the "
                    f"first cached run (first difference at position {pos}: "
                    f"{out[0, pos].item()} vs {reference[0, pos].item()}); the cache must not "
                    f"change what is generated")
            times[mode].append(seconds)
    row: dict = {"L": L, "prompt_len": prompt.size(1), "new_tokens": new}
    for mode in MODES:
        med, best = statistics.median(times[mode]), min(times[mode])
        row.update({f"{mode}_runs": len(times[mode]), f"{mode}_median_s": round(med, 5),
                    f"{mode}_min_s": round(best, 5), f"{mode}_tok_s": round(new / med, 2),
                    f"{mode}_tok_s_best": round(new / best, 2)})
    row["speedup"] = round(row["uncached_median_s"] / row["cached_median_s"], 2)
    row["speedup_best"] = round(row["uncached_min_s"] / row["cached_min_s"], 2)
    row["same_tokens"] = True  # checked on every run above
    row["runs_compared"] = len(times["cached"]) + len(times["uncached"])
    return row


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(threads: int) -> dict:
    import torch

    import attnlib

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
            "torch_num_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "torch": torch.__version__, "attnlib": attnlib.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    Ls = [r["L"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    ax = axes[0]
    for mode, label, color in (("cached", "use_cache=True (KV cache)", "C0"),
                               ("uncached", "use_cache=False (re-run everything)", "C3")):
        ax.plot(Ls, [r[f"{mode}_tok_s"] for r in rows], marker="o", color=color,
                label=f"{label}, median")
        ax.plot(Ls, [r[f"{mode}_tok_s_best"] for r in rows], ls=":", marker=".", color=color,
                alpha=0.6, label=f"{label}, best run")
    ax.set(xscale="log", yscale="log", xlabel="total sequence length L (tokens, prompt included)",
           ylabel="new tokens per second", title="Greedy generation throughput")
    ax = axes[1]
    ax.plot(Ls, [r["speedup"] for r in rows], marker="o", color="k", label="median times")
    ax.plot(Ls, [r["speedup_best"] for r in rows], ls=":", marker=".", color="k", alpha=0.6,
            label="best runs")
    for r in rows:
        text = f"{r['speedup']:.1f}x" if r["speedup"] < 10 else f"{r['speedup']:.0f}x"
        ax.annotate(text, (r["L"], r["speedup"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="total sequence length L (tokens, prompt included)",
           ylabel="speed-up (uncached time / cached time)", title="What the KV cache saves")
    for ax in axes:
        ax.set_xticks(Ls, [str(L) for L in Ls])
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the measured lengths are labelled
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help=f"total sequence lengths (default {LENGTHS}; --quick: {QUICK_LENGTHS})")
    p.add_argument("--quick", action="store_true", help="lengths 64..256, 3 repeats: a few seconds")
    p.add_argument("--prompt", type=int, default=16, help="prompt length (tokens)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per mode and length, at most "
                   "(default 5; --quick: 3)")
    p.add_argument("--budget", type=float, default=20.0,
                   help="seconds of timed runs per mode and length before repeats stop (at least one run)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    p.add_argument("--out", type=Path, default=RESULTS / "generation",
                   help="path stem of the .csv, .json and .png")
    args = p.parse_args(argv)
    if args.lengths is None:
        args.lengths = QUICK_LENGTHS if args.quick else LENGTHS
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    args.lengths = sorted(set(args.lengths))
    if args.repeats < 1 or args.threads < 1 or args.prompt < 1:
        p.error("--repeats, --threads and --prompt must be at least 1")
    if args.lengths[0] <= args.prompt:
        p.error(f"every length must exceed the prompt ({args.prompt} tokens)")

    import torch

    torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    load_before = os.getloadavg()
    model, prompt = build_model(args)
    n_params = sum(t.numel() for t in model.parameters())
    # warm-up: kernels loaded, thread pool and allocator primed, for both modes
    warm_new = min(32, args.lengths[0] - args.prompt)
    for use_cache in (True, False):
        model.generate(prompt, warm_new, use_cache=use_cache)

    rows = []
    print(f"{'L':>6} {'uncached tok/s':>15} {'cached tok/s':>13} {'speed-up':>9}  runs (unc/cached)")
    for L in args.lengths:
        row = measure_length(model, prompt, L, args)
        rows.append(row)
        print(f"{L:>6} {row['uncached_tok_s']:>15.1f} {row['cached_tok_s']:>13.1f} "
              f"{row['speedup']:>8.1f}x  {row['uncached_runs']}/{row['cached_runs']}  same tokens",
              flush=True)
    total_s = time.perf_counter() - wall0

    info = machine(args.threads)
    info["load_average_before"] = [round(x, 2) for x in load_before]
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    model_info = {"class": "attnlib.TinyGPT", "vocab_size": args.vocab, "d_model": args.d_model,
                  "n_heads": args.heads, "n_kv_heads": args.kv_heads, "n_layers": args.layers,
                  "max_len": max(args.lengths), "parameters": n_params, "dtype": "float32",
                  "batch": 1, "seed": args.seed, "decoding": "greedy"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "model": model_info, "settings": settings,
         "tokens_per_second": "new tokens / wall time of one generate() call, prefill included",
         "speedup": "uncached median time / cached median time",
         "all_runs_same_tokens": all(r["same_tokens"] for r in rows),
         "total_seconds": round(total_s, 1), "results": rows}, indent=2, default=str) + "\n")
    plot(rows, args.out.with_suffix(".png"),
         f"TinyGPT (d_model={args.d_model}, {args.heads} heads / {args.kv_heads} KV heads, "
         f"{args.layers} layers, vocab {args.vocab}, fp32, batch 1), "
         f"greedy from a {args.prompt}-token prompt; "
         f"{info['cpu']} ({info['cores']} cores), {args.threads} thread(s), torch {info['torch']}")
    print(f"every run of both modes generated the same tokens; {total_s:.0f} s in all")
    print(f"wrote {args.out.with_suffix('.csv')}, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
