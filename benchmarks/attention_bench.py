"""Time and peak memory of attention implementations against sequence length.

Methods: naive attention (attnlib's manual path, which builds the L x S score matrix),
attnlib.flash_attention (tiles + online softmax), attnlib.sliding_window_attention (banded),
attnlib.linear_attention, and PyTorch's fused scaled_dot_product_attention.

Every (method, L) point runs in a fresh Python process, so its peak memory is clean: the
child records its peak resident set size (ru_maxrss) after creating the inputs and warming
up on a small problem, runs the method once at full size, and reports the increase. Then it
times repeated runs and keeps the median. Results: CSV, JSON (with the machine's details) and
a log-log PNG in benchmarks/results/. These are measurements, not tests.

    python benchmarks/attention_bench.py                     # the full sweep (~10 min on 2 cores)
    python benchmarks/attention_bench.py --lengths 512 1024  # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["naive", "flash", "sliding_window", "linear", "torch_sdpa"]
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
RESULTS = Path(__file__).resolve().parent / "results"


def _method(name: str, window: int):
    import torch.nn.functional as F

    import attnlib

    return {
        "naive": lambda q, k, v: attnlib.scaled_dot_product_attention(q, k, v),
        "flash": lambda q, k, v: attnlib.flash_attention(q, k, v),
        "sliding_window": lambda q, k, v: attnlib.sliding_window_attention(q, k, v, window),
        "linear": lambda q, k, v: attnlib.linear_attention(q, k, v),
        "torch_sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }[name]


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(method: str, L: int, d: int, heads: int, window: int, repeats: int, budget_s: float) -> dict:
    """Run one (method, L) point in this process and return its measurements."""
    import torch

    torch.manual_seed(0)
    fn = _method(method, window)
    with torch.no_grad():
        small = [torch.randn(1, heads, 256, d) for _ in range(3)]
        fn(*small)  # load kernels, start the thread pool, fill caches
        q, k, v = (torch.randn(1, heads, L, d) for _ in range(3))  # (B, H, L, D)
        before = _peak_rss_bytes()
        fn(q, k, v)  # the cold run sets the peak
        peak = _peak_rss_bytes() - before
        times = []
        start = time.perf_counter()
        while len(times) < repeats and (len(times) < 1 or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            fn(q, k, v)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"method": method, "L": L, "d": d, "heads": heads, "time_s": times[len(times) // 2],
            "time_min_s": times[0], "runs": len(times), "peak_bytes": peak,
            "threads": torch.get_num_threads()}


def run_point(args: argparse.Namespace, method: str, L: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(L), "--d", str(args.d),
           "--heads", str(args.heads), "--window", str(args.window), "--repeats", str(args.repeats),
           "--budget", str(args.budget)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "L": L, "error": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        return {"method": method, "L": L, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def slope(rows: list[dict], key: str) -> float:
    """Least-squares slope of log(key) against log(L) over the last three points."""
    pts = [(math.log(r["L"]), math.log(r[key])) for r in rows if r.get(key, 0) > 0][-3:]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for method in METHODS:
        ok = [r for r in rows if r["method"] == method and "error" not in r]
        if not ok:
            continue
        for ax, key, scale in ((axes[0], "time_s", 1e3), (axes[1], "peak_bytes", 2.0**-20)):
            pts = [r for r in ok if r[key] > 0]
            ax.plot([r["L"] for r in pts], [r[key] * scale for r in pts], marker="o",
                    label=f"{method} (slope {slope(pts, key):.2f})")
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length L (tokens)",
                ylabel="time per call (ms, median)", title="Time")
    axes[1].set(xscale="log", yscale="log", xlabel="sequence length L (tokens)",
                ylabel="peak memory increase (MiB)", title="Peak memory (fresh process per point)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def targets(rows: list[dict]) -> list[str]:
    def get(method: str, L: int, key: str) -> float | None:
        for r in rows:
            if r["method"] == method and r["L"] == L and "error" not in r:
                return r[key]
        return None

    lines = []
    naive_mem, flash_mem = get("naive", 16384, "peak_bytes"), get("flash", 16384, "peak_bytes")
    if naive_mem and flash_mem:
        ratio = naive_mem / max(flash_mem, 1)
        lines.append(f"flash peak memory at L=16384 is 1/{ratio:.0f} of naive's "
                     f"(target: at most 1/50): {'met' if ratio >= 50 else 'MISSED'}")
    naive_t, flash_t = get("naive", 4096, "time_s"), get("flash", 4096, "time_s")
    if naive_t and flash_t:
        lines.append(f"flash time at L=4096 is {flash_t / naive_t:.2f}x naive's "
                     f"(target: within 2x): {'met' if flash_t <= 2 * naive_t else 'MISSED'}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--d", type=int, default=64, help="head_dim")
    p.add_argument("--heads", type=int, default=1, help="heads (batch 1)")
    p.add_argument("--window", type=int, default=256, help="sliding-window reach")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point (at most)")
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timed runs per point")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a point is abandoned")
    p.add_argument("--out", type=Path, default=RESULTS / "attention")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child(args.child[0], int(args.child[1]), args.d, args.heads, args.window,
                       args.repeats, args.budget)
        print(json.dumps(result))
        return 0

    rows = []
    for L in args.lengths:
        for method in args.methods:
            r = run_point(args, method, L)
            rows.append(r)
            if "error" in r:
                print(f"{method:>15} L={L:>6}: {r['error']}", flush=True)
            else:
                print(f"{method:>15} L={L:>6}: {r['time_s'] * 1e3:10.1f} ms  "
                      f"{r['peak_bytes'] / 2**20:9.1f} MiB peak", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["method", "L", "d", "heads", "time_s", "time_min_s", "runs", "peak_bytes", "threads", "error"]
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    info = machine()
    summary = targets(rows)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
         "targets": summary, "results": rows}, indent=2, default=str))
    plot(rows, args.out.with_suffix(".png"),
         f"attention, B=1, H={args.heads}, head_dim={args.d}, fp32, {info['cpu']} ({info['cores']} cores), "
         f"torch {info['torch']}")
    for line in summary:
        print(line)
    print(f"wrote {args.out.with_suffix('.csv')}, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
