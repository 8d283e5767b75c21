"""The ``attnlib`` command line.

``attnlib selfcheck`` compares attnlib against PyTorch on random inputs, so a learner can
check an installation in a few seconds. Later subcommands (grading) hang off the same parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import attnlib
from attnlib.grading.protocol import CASE_TIME_MULTIPLE, DEFAULT_STEP_TIMEOUT, DEFAULT_TIMEOUT


def _selfcheck_cases() -> list[tuple[str, Callable[[], float]]]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = rand(2, 4, 7, 16), rand(2, 4, 9, 16), rand(2, 4, 9, 16)
    mask = torch.rand(7, 9, generator=g) > 0.3

    def sdpa() -> float:
        ours = attnlib.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return (ours - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max().item()

    def causal() -> float:
        ours = attnlib.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (ours - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max().item()

    def flash() -> float:
        ours = attnlib.flash_attention(q, k, v, block_q=4, block_k=4)
        return (ours - F.scaled_dot_product_attention(q, k, v)).abs().max().item()

    def mha() -> float:
        torch.manual_seed(0)
        ref = torch.nn.MultiheadAttention(16, 4, batch_first=True).double()
        x = rand(2, 7, 16)
        ours = attnlib.MultiHeadAttention.from_torch(ref)(x)
        return (ours - ref(x, x, x, need_weights=False)[0]).abs().max().item()

    return [("scaled_dot_product_attention (mask)", sdpa), ("is_causal, L != S", causal),
            ("flash_attention", flash), ("MultiHeadAttention vs nn.MultiheadAttention", mha)]


def selfcheck(tolerance: float = 1e-10) -> int:
    """Print max |attnlib - torch| for a few functions in float64; 0 if all are within tolerance."""
    print(f"attnlib {attnlib.__version__}, torch {torch.__version__}")
    failures = 0
    for name, case in _selfcheck_cases():
        error = case()
        ok = error <= tolerance
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name:<45} max |error| = {error:.2e}")
    return 1 if failures else 0


def _part(text: str) -> tuple[int, int]:
    """``K/N`` for ``--part``: part K (from 0) of N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 0/4, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, got {text!r}")
    return k, n


def _course_report(out: Path) -> int:
    """``attnlib grade-class --report``: the course's page from every class summary in ``out``."""
    from attnlib.grading.class_report import ReportError, write_course_report

    try:
        page = write_course_report(out.resolve())
    except ReportError as exc:
        print(f"attnlib grade-class: no course report: {exc}", file=sys.stderr)
        return 2
    print(f"the course's page: {page} (each assignment's: {out.resolve()}/<assignment>/report.html)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnlib", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"attnlib {attnlib.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("selfcheck", help="compare attnlib with PyTorch on random inputs")
    grade = commands.add_parser("grade", help="grade an exercise notebook, or every notebook of a folder "
                                              "(their code runs in a child process)")
    grade.add_argument("notebook", metavar="PATH", help="the notebook to grade (PATH.ipynb), or a folder: every "
                                                       "notebook under it (e.g. notebooks/) graded one after "
                                                       "another, in one table (exit status 1 if some could not be)")
    grade.add_argument("--json", action="store_true", help="print the result as JSON")
    grade.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help=f"wall-clock limit for running the notebook's code (default: {DEFAULT_TIMEOUT:g}; "
                            f"each cell also gets at most {DEFAULT_STEP_TIMEOUT:g} s, each graded case "
                            f"{CASE_TIME_MULTIPLE} times the reference's time on it, and at least "
                            f"{DEFAULT_STEP_TIMEOUT:g} s)")
    grade.add_argument("--source", metavar="PATH",
                       help="the source notebook with the grade cells and hidden tests (default: "
                            "solutions/<assignment>/<same name> in the course repository, if any)")
    klass = commands.add_parser(
        "grade-class", help="grade every submission of an assignment in submitted/ (nbgrader layout)",
        description="Grade submitted/<student>/ASSIGNMENT/*.ipynb of an nbgrader course with the hardened "
                    "grader, in parallel; results go to graded/<student>/ASSIGNMENT/ (result.json, grade.log). "
                    "Ctrl-C or SIGTERM stop it, keeping the students finished so far (exit status 128 + the "
                    "signal); run it again to resume after an interruption.")
    klass.add_argument("assignment", metavar="ASSIGNMENT", nargs="?",
                       help="the assignment, e.g. 02_queries_keys_values (optional with --report)")
    klass.add_argument("--root", default=".", help="the course root (default: the current directory)")
    klass.add_argument("--source", default="solutions", help="the source directory (default: solutions)")
    klass.add_argument("--out", default="graded", help="where results go, under the root (default: graded)")
    klass.add_argument("--jobs", "-j", type=int, default=None,
                       help="submissions graded at once here (default: every core; with --scheduler, the "
                            "workers' threads decide)")
    klass.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help=f"wall-clock limit per notebook (default: {DEFAULT_TIMEOUT:g}; cells and cases have "
                            "their own limits, as for attnlib grade)")
    klass.add_argument("--student", action="append", dest="students", metavar="ID",
                       help="grade only this student (repeatable)")
    klass.add_argument("--gradebook", action="store_true",
                       help="write the scores into nbgrader's gradebook.db and the autograded/ notebooks")
    klass.add_argument("--force", action="store_true", help="regrade students already graded")
    klass.add_argument("--scheduler", metavar="ADDRESS",
                       help="grade on a Dask cluster: its scheduler's address (tcp://host:8786) or scheduler "
                            "file (.json); the workers need the same attnlib (pip install 'attnlib[cluster]')")
    klass.add_argument("--part", metavar="K/N", type=_part,
                       help="grade only part K of N of the class (K = 0..N-1; one batch job each), then run "
                            "once without --part to merge the parts")
    klass.add_argument("--no-progress", action="store_true", help="no progress bar")
    klass.add_argument("--report", action="store_true",
                       help="also write the course's page: every assignment graded so far, per chapter and per "
                            "learner (OUT/report.html; each assignment's own page, OUT/ASSIGNMENT/report.html, "
                            "is written after every run); without ASSIGNMENT, only that, grading nothing")
    args = parser.parse_args(argv)
    if args.command == "selfcheck":
        return selfcheck()
    if args.command == "grade":
        if Path(args.notebook).is_dir():
            from attnlib.grading.folder import grade_folder

            if args.source is not None:
                print("attnlib grade: --source is for one notebook, not a folder (each notebook's source "
                      "is found under solutions/)", file=sys.stderr)
                return 2
            return grade_folder(args.notebook, timeout=args.timeout, as_json=args.json)
        from attnlib.grading.runner import main as grade_main

        return grade_main(args.notebook, as_json=args.json, timeout=args.timeout, source=args.source)
    if args.command == "grade-class":
        from attnlib.grading.classroom import main as class_main

        if args.assignment is None:
            if not args.report:
                print("attnlib grade-class: expected an ASSIGNMENT to grade, or --report for the course's page",
                      file=sys.stderr)
                return 2
            return _course_report(Path(args.root) / args.out)

        if args.jobs is not None and args.jobs < 1:
            print("attnlib grade-class: --jobs must be at least 1", file=sys.stderr)
            return 2
        if args.timeout <= 0:
            print("attnlib grade-class: --timeout must be positive", file=sys.stderr)
            return 2
        status = class_main(args.assignment, root=args.root, source=args.source, out=args.out, jobs=args.jobs,
                            timeout=args.timeout, students=args.students, gradebook=args.gradebook,
                            force=args.force, progress=not args.no_progress, scheduler=args.scheduler,
                            part=args.part)
        if args.report and status == 0:
            status = _course_report(Path(args.root) / args.out)
        return status
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
