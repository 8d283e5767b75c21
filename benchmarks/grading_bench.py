"""How fast the hardened grader grades a class, and what its safety costs per notebook.

A synthetic class of N submissions (default 200) of one assignment (default chapter 2) is
written into a throw-away nbgrader course directory: 50% fully solved, 30% with the first
answer only, 20% untouched, all from the course's own source and released notebooks. Then:

1. **class throughput**: ``attnlib grade-class`` (the real command's code path,
   :func:`attnlib.grading.classroom.grade_class`) grades the whole class with ``--jobs``
   workers (default: every core); submissions per minute.
2. **per-notebook overhead**, on a sample graded one at a time: the wall time of
   :func:`attnlib.grading.runner.grade_notebook` (sandboxed child process, cases saved and
   loaded, judging in the parent, result files) minus the wall time of the least any
   grader must do: a fresh interpreter that runs the same notebook's code cells and calls
   the learner's functions on the same cases, unsandboxed, with nothing saved or judged.

Results: benchmarks/results/grading.json and grading.csv (one row per sampled notebook) and
grading.png. These are measurements, not tests; the target of issue 5 is at most 3 s of
overhead per notebook.

    python benchmarks/grading_bench.py                 # 200 submissions, ~5 min on 2 cores
    python benchmarks/grading_bench.py --students 20   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import nbformat  # noqa: E402

KINDS = [("solved", 0.5), ("first answer only", 0.3), ("untouched", 0.2)]

BASELINE = textwrap.dedent("""
    import json, sys
    from attnlib.grading import EXERCISES
    from attnlib.grading.core import call
    with open(sys.argv[1]) as f:
        nb = json.load(f)
    ns = {"__name__": "__main__"}
    for cell in nb["cells"]:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell["cell_type"] != "code" or (meta.get("grade") and not meta.get("solution")):
            continue
        try:
            exec(compile("".join(cell["source"]), "<cell>", "exec"), ns)
        except BaseException:
            pass
    for ex_id, name in json.loads(sys.argv[2]):
        ex = EXERCISES[ex_id]
        for hidden in (False, True):
            for case in ex.make_cases(hidden):
                try:
                    call(ex, ns[name], case)
                except BaseException:
                    pass
""")


def _nbg(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def make_class(root: Path, assignment: str, n: int) -> list[tuple[str, str]]:
    root.mkdir(parents=True)
    shutil.copy(REPO / "nbgrader_config.py", root / "nbgrader_config.py")
    shutil.copytree(REPO / "solutions" / assignment, root / "solutions" / assignment)
    source = nbformat.read(str(REPO / "solutions" / assignment / f"{assignment}.ipynb"), as_version=4)
    released = nbformat.read(str(REPO / "notebooks" / assignment / f"{assignment}.ipynb"), as_version=4)
    answers = {_nbg(c)["grade_id"]: c.source for c in source.cells if _nbg(c).get("solution")}
    first = next(iter(answers))
    students = []
    counts = [round(n * share) for _, share in KINDS]
    counts[0] += n - sum(counts)
    k = 0
    for (kind, _), count in zip(KINDS, counts):
        for _ in range(count):
            nb = nbformat.from_dict(released)
            for cell in nb.cells:
                gid = _nbg(cell).get("grade_id")
                if _nbg(cell).get("solution") and (kind == "solved" or (kind != "untouched" and gid == first)):
                    cell.source = answers[gid]
            student = f"student{k:03d}"
            folder = root / "submitted" / student / assignment
            folder.mkdir(parents=True)
            nbformat.write(nb, str(folder / f"{assignment}.ipynb"))
            students.append((student, kind))
            k += 1
    return students


def exercises_of(assignment: str) -> list[tuple[str, str]]:
    from attnlib.grading.notebook import parse_items, read_notebook

    nb = read_notebook(REPO / "solutions" / assignment / f"{assignment}.ipynb")
    return list(dict.fromkeys((c.exercise_id, c.name) for item in parse_items(nb) for c in item.calls))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=200)
    parser.add_argument("--assignment", default="02_queries_keys_values")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sample", type=int, default=12, help="notebooks timed one at a time for the overhead")
    parser.add_argument("--repeats", type=int, default=3, help="runs per sampled notebook (the fastest counts)")
    args = parser.parse_args(argv)

    from attnlib.grading.classroom import grade_class
    from attnlib.grading.runner import grade_notebook

    import attnlib
    import torch

    work = Path(tempfile.mkdtemp(prefix="attnlib-grading-bench-"))
    try:
        root = work / "course"
        students = make_class(root, args.assignment, args.students)
        t0 = time.perf_counter()
        results = grade_class(args.assignment, root=root, jobs=args.jobs, progress=True)
        class_s = time.perf_counter() - t0
        per_minute = len(results) * 60.0 / class_s
        by_kind: dict[str, list[float]] = {}
        for (student, kind), r in zip(students, results):
            assert r.student == student
            by_kind.setdefault(kind, []).append(r.score)

        # overhead, one notebook at a time (nothing else of ours running)
        pairs = json.dumps(exercises_of(args.assignment))
        step = max(1, len(students) // args.sample)
        rows = []
        for student, kind in students[::step][: args.sample]:
            path = root / "submitted" / student / args.assignment / f"{args.assignment}.ipynb"
            # best of --repeats runs each, alternating, so that a noisy moment hits both alike
            baseline = graded = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", BASELINE, str(path), pairs], check=True,
                               stdout=subprocess.DEVNULL,
                               env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg"))
                baseline = min(baseline, time.perf_counter() - t0)
                t0 = time.perf_counter()
                report = grade_notebook(path, source=root / "solutions" / args.assignment / path.name)
                graded = min(graded, time.perf_counter() - t0)
            rows.append({"student": student, "kind": kind, "score": report.score,
                         "baseline_s": round(baseline, 3), "graded_s": round(graded, 3),
                         "overhead_s": round(graded - baseline, 3)})
            print(f"{student} ({kind}): plain run {baseline:.2f} s, graded {graded:.2f} s, "
                  f"overhead {graded - baseline:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    overhead = [r["overhead_s"] for r in rows]
    summary = {
        "assignment": args.assignment, "students": args.students, "jobs": args.jobs,
        "overhead_sample": len(rows), "repeats": args.repeats,
        "mix": {k: share for k, share in KINDS},
        "class_seconds": round(class_s, 1), "submissions_per_minute": round(per_minute, 1),
        "mean_score_by_kind": {k: statistics.mean(v) for k, v in by_kind.items()},
        "overhead_seconds": {"median": round(statistics.median(overhead), 3), "max": round(max(overhead), 3),
                             "mean": round(statistics.mean(overhead), 3)},
        "plain_run_seconds_median": round(statistics.median(r["baseline_s"] for r in rows), 3),
        "graded_seconds_median": round(statistics.median(r["graded_s"] for r in rows), 3),
        "target_overhead_seconds": 3.0,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": _cpu_name(), "python": platform.python_version(),
                    "torch": torch.__version__, "attnlib": attnlib.__version__},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grading.json").write_text(json.dumps({"summary": summary, "sample": rows}, indent=2) + "\n")
    with open(RESULTS / "grading.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, summary)
    print(json.dumps(summary, indent=2))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _plot(rows: list[dict], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    x = list(range(len(rows)))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [r["baseline_s"] for r in rows], w,
           label="plain interpreter: the learner's code on the same cases")
    ax.bar([i + w / 2 for i in x], [r["graded_s"] for r in rows], w,
           label="attnlib grade: sandboxed child, files, judging")
    ax.axhline(summary["plain_run_seconds_median"] + summary["target_overhead_seconds"], color="k", ls="--",
               lw=1, label="median plain run + 3 s (the target)")
    ax.set_xticks(x, [f"{r['student'][-3:]}\n{r['kind'].split()[0]}" for r in rows], fontsize=7)
    ax.set_ylabel("seconds per notebook (best of %d)" % summary["repeats"])
    ax.set_title(f"{summary['students']} submissions, {summary['jobs']} jobs: "
                 f"{summary['submissions_per_minute']:.0f} per minute; median overhead "
                 f"{summary['overhead_seconds']['median']:.2f} s", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(RESULTS / "grading.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
