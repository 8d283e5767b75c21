"""A class graded on a Dask cluster against the local pool, on this machine: throughput and the
time Dask adds per submission.

The class is benchmarks/grading_bench.py's (default 200 submissions of chapter 2: 50% solved,
30% the first answer only, 20% untouched). It is graded twice with the same parallelism: by
``attnlib grade-class`` with the local pool (``--jobs W``), then through a Dask cluster started
here with Dask's own commands (a scheduler and W single-thread workers,
:class:`attnlib.grading.cluster.LocalDaskCluster`), into another folder. Every student's scores
and items must be the same both ways (the script fails otherwise).

What Dask adds per submission: ``(wall time through Dask - wall time of the local pool) * W /
submissions``: the extra busy time of one worker per submission (sending the notebooks and the
sources, pickling the result, the scheduler's round trips, the worker's temporary course
folder), the cluster's start not included (reported apart).

Results: benchmarks/results/cluster.json, cluster.csv (a row per student: seconds of grading
each way) and cluster.png. Measurements, not tests.

    python benchmarks/cluster_bench.py                 # 200 submissions, ~10 min on 2 cores
    python benchmarks/cluster_bench.py --students 20   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _grading_bench():
    """benchmarks/grading_bench.py, for its class and machine description (one place)."""
    spec = importlib.util.spec_from_file_location("grading_bench", HERE / "grading_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scores(out: Path, assignment: str) -> dict[str, tuple]:
    found = {}
    for path in out.glob(f"*/{assignment}/result.json"):
        r = json.loads(path.read_text())
        found[r["student"]] = (r["score"], r["max_score"], json.dumps([nb["items"] for nb in r["notebooks"]]))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=200)
    parser.add_argument("--assignment", default="02_queries_keys_values")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="local jobs, and Dask workers of one thread each (default: every core)")
    parser.add_argument("--replot", action="store_true", help="only redraw cluster.png from the last results")
    args = parser.parse_args(argv)
    if args.replot:
        with open(RESULTS / "cluster.csv", newline="") as f:
            rows = [{k: float(v) if k.endswith("_s") else v for k, v in r.items()} for r in csv.DictReader(f)]
        _plot(rows, json.loads((RESULTS / "cluster.json").read_text())["summary"])
        return 0

    import torch

    import attnlib
    from attnlib.grading.classroom import grade_class
    from attnlib.grading.cluster import LocalDaskCluster

    bench = _grading_bench()
    work = Path(tempfile.mkdtemp(prefix="attnlib-cluster-bench-"))
    try:
        root = work / "course"
        students = bench.make_class(root, args.assignment, args.students)
        t0 = time.perf_counter()
        local = grade_class(args.assignment, root=root, out="graded-local", jobs=args.workers, progress=True)
        local_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        with LocalDaskCluster(work / "dask", n_workers=args.workers) as cluster:
            start_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            dask = grade_class(args.assignment, root=root, out="graded-dask", scheduler=cluster.address,
                               progress=True)
            dask_s = time.perf_counter() - t0
        same = _scores(root / "graded-local", args.assignment) == _scores(root / "graded-dask", args.assignment)
        if not same:
            raise SystemExit("the cluster's results differ from the local pool's: see " + str(root))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(students)
    rows = [{"student": s, "kind": kind, "score": lr.score, "local_s": round(lr.seconds, 3),
             "dask_s": round(dr.seconds, 3)}
            for (s, kind), lr, dr in zip(students, local, dask)]
    summary = {
        "assignment": args.assignment, "students": n, "workers": args.workers,
        "identical_results": same,
        "local": {"seconds": round(local_s, 1), "submissions_per_minute": round(n * 60 / local_s, 1),
                  "median_grading_s": round(statistics.median(r["local_s"] for r in rows), 3)},
        "dask": {"seconds": round(dask_s, 1), "submissions_per_minute": round(n * 60 / dask_s, 1),
                 "median_grading_s": round(statistics.median(r["dask_s"] for r in rows), 3),
                 "cluster_start_s": round(start_s, 1)},
        "dask_overhead_per_submission_s": round((dask_s - local_s) * args.workers / n, 3),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": bench._cpu_name(), "python": platform.python_version(),
                    "torch": torch.__version__, "attnlib": attnlib.__version__},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster.json").write_text(json.dumps({"summary": summary}, indent=2) + "\n")
    with open(RESULTS / "cluster.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, summary)
    print(json.dumps(summary, indent=2))
    return 0


def _plot(rows: list[dict], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(7.5, 3.2), layout="constrained")
    ways = ["local pool", "Dask cluster"]
    rates = [summary["local"]["submissions_per_minute"], summary["dask"]["submissions_per_minute"]]
    bars = left.bar(ways, rates, color=["#4c72b0", "#dd8452"])
    left.bar_label(bars, fmt="%.0f")
    left.set_ylim(0, 1.15 * max(rates))
    left.set_ylabel("submissions per minute")
    left.set_title(f"{summary['students']} submissions, {summary['workers']} workers", fontsize=10)
    top = max(max(r["local_s"], r["dask_s"]) for r in rows)
    bins = [top * i / 30 for i in range(31)]
    right.hist([r["local_s"] for r in rows], bins=bins, alpha=0.6, label="local pool")
    right.hist([r["dask_s"] for r in rows], bins=bins, alpha=0.6, label="on a Dask worker")
    right.set_xlabel("seconds to grade one submission")
    right.set_ylabel("submissions")
    right.legend(fontsize=8)
    fig.savefig(RESULTS / "cluster.png", dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
