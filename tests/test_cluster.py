"""``attnlib grade-class --scheduler``: a class graded on a real Dask cluster (a scheduler and two
worker processes started here with Dask's own commands) gets the results of the local pool,
survives a worker killed mid-task, resumes, and refuses what it cannot use; ``--part`` splits a
class into batch jobs that a plain run merges."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

import attnlib
from attnlib.grading.classroom import ClassGradingError, grade_class
from attnlib.grading.cluster import LocalDaskCluster

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
A = "02_queries_keys_values"
#: seconds the slow student's extra cell sleeps: long enough to kill its worker mid-task
NAP = 12


def _nbg(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _class(root: Path) -> dict[str, str]:
    """A course folder with chapter 2's source and five students: all correct, the first answer
    only, untouched, a named mistake (softmax without the max subtracted), and all correct
    with a cell that sleeps NAP seconds."""
    shutil.copytree(REPO / "solutions" / A, root / "solutions" / A)
    shutil.copy(REPO / "nbgrader_config.py", root / "nbgrader_config.py")
    source = nbformat.read(str(REPO / "solutions" / A / f"{A}.ipynb"), as_version=4)
    released = nbformat.read(str(REPO / "notebooks" / A / f"{A}.ipynb"), as_version=4)
    answers = {_nbg(c)["grade_id"]: c.source for c in source.cells if _nbg(c).get("solution")}

    def filled(solved) -> nbformat.NotebookNode:
        nb = nbformat.from_dict(json.loads(json.dumps(released)))
        for cell in nb.cells:
            gid = _nbg(cell).get("grade_id")
            if _nbg(cell).get("solution") and gid in solved:
                cell.source = answers[gid]
        return nb

    first = list(answers)[:1]
    mistaken = filled(answers)
    cell = next(c for c in mistaken.cells if _nbg(c).get("grade_id") == "softmax-solution")
    assert cell.source.count("e = torch.exp(z - peak)") == 1
    cell.source = cell.source.replace("e = torch.exp(z - peak)", "e = torch.exp(z)")
    slow = filled(answers)
    slow.cells.insert(1, nbformat.v4.new_code_cell(f"import time\ntime.sleep({NAP})"))
    kinds = {"alice": filled(answers), "bob": filled(first), "carol": released, "dan": mistaken, "erin": slow}
    for student, nb in kinds.items():
        folder = root / "submitted" / student / A
        folder.mkdir(parents=True)
        nbformat.write(nb, str(folder / f"{A}.ipynb"))
    return {s: "" for s in kinds}


def _results(out: Path) -> dict[str, dict]:
    """Each student's scores and items (what grading decided; not the times or paths)."""
    found = {}
    for path in sorted(out.glob(f"*/{A}/result.json")):
        r = json.loads(path.read_text())
        found[r["student"]] = {"score": r["score"], "max_score": r["max_score"],
                               "items": [nb["items"] for nb in r["notebooks"]],
                               "status": [nb["status"] for nb in r["notebooks"]]}
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``dask scheduler`` and two ``dask worker`` processes (one thread each, with a nanny that
    restarts a killed worker), as an instructor starts them; stopped at the end."""
    with LocalDaskCluster(tmp_path_factory.mktemp("dask"), n_workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    _class(root)
    grade_class(A, root=root, out="graded-local", jobs=2, progress=False)
    return root


def test_the_cluster_grades_as_the_local_pool(course, cluster):
    proc = subprocess.run([sys.executable, "-m", "attnlib.cli", "grade-class", A, "--scheduler", cluster.address,
                           "--out", "graded-dask", "--no-progress"], cwd=course, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    local, dask = _results(course / "graded-local"), _results(course / "graded-dask")
    assert set(local) == {"alice", "bob", "carol", "dan", "erin"}
    assert dask == local
    assert local["alice"]["score"] == local["alice"]["max_score"] == local["erin"]["score"] > 0
    assert 0 < local["bob"]["score"] < local["alice"]["score"] and local["carol"]["score"] == 0
    assert local["dan"]["items"][0][0]["feedback"].startswith("Looks like no max subtraction")  # named
    assert "alice" in proc.stdout and "mean" in proc.stdout  # the summary table is printed
    logs = {s: (course / "graded-dask" / s / A / "grade.log").read_text() for s in local}
    assert all("graded on the Dask worker tcp://127.0.0.1:" in text for text in logs.values())
    summary = json.loads((course / "graded-dask" / f"{A}.json").read_text())
    assert [s["student"] for s in summary["students"]] == sorted(local)

    # a second run through the cluster keeps every student: nothing is sent to the workers
    again = grade_class(A, root=course, out="graded-dask", scheduler=cluster.address, progress=False)
    assert all(r.skipped for r in again) and len(again) == 5


def test_a_worker_killed_mid_task_costs_a_retry_not_a_student(course, cluster):
    done: dict = {}

    def run():
        try:
            done["results"] = grade_class(A, root=course, out="graded-kill", students=["erin"],
                                          scheduler=cluster.address, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            done["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline, busy = time.monotonic() + 120, None
    while busy is None and time.monotonic() < deadline:
        busy = next((w for w, tasks in cluster.client.processing().items() if tasks), None)
        time.sleep(0.2)
    assert busy is not None, "erin's task never started"
    time.sleep(NAP / 3)  # inside erin's sleeping cell: her sandboxed child is running
    pid = cluster.client.run(os.getpid, workers=[busy])[busy]
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in done, done
    assert _results(course / "graded-kill")["erin"] == _results(course / "graded-local")["erin"]
    log = (course / "graded-kill" / "erin" / A / "grade.log").read_text()
    assert "graded on the Dask worker" in log
    # the nanny restarted the killed worker: the cluster has two workers again
    cluster.client.wait_for_workers(2, timeout=90)
    assert pid not in cluster.client.run(os.getpid).values()


def test_a_worker_with_another_attnlib_is_refused(course, cluster, monkeypatch):
    monkeypatch.setattr(attnlib, "__version__", "0.0.0-other")  # this machine's version differs now
    with pytest.raises(ClassGradingError, match="workers with another attnlib"):
        grade_class(A, root=course, out="graded-refused", scheduler=cluster.address, progress=False)
    assert not (course / "graded-refused").exists()


def test_an_unreachable_scheduler_is_a_clear_error(course):
    proc = subprocess.run([sys.executable, "-m", "attnlib.cli", "grade-class", A, "--scheduler",
                           "tcp://127.0.0.1:9", "--no-progress"], cwd=course, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="3s"))
    assert proc.returncode == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in proc.stderr


def test_parts_are_batch_jobs_that_a_plain_run_merges(tmp_path):
    """``--part K/N`` grades every N-th student from K; a run without it keeps them all."""
    root = tmp_path
    shutil.copytree(REPO / "solutions" / A, root / "solutions" / A)
    students = [f"s{i:02d}" for i in range(7)]
    for s in students:
        folder = root / "submitted" / s / A
        folder.mkdir(parents=True)
        shutil.copy(REPO / "notebooks" / A / f"{A}.ipynb", folder)
    seen: list[str] = []

    def fake(path, source, **kwargs):  # records who is graded; any report will do
        from attnlib.grading.report import Report

        seen.append(Path(path).parts[-3])
        return Report(notebook=str(path), items=[])

    for k in range(3):
        grade_class(A, root=root, part=(k, 3), progress=False, grade_fn=fake)
    assert sorted(seen) == students and len(seen) == len(set(seen))
    assert sorted(seen[:3]) == ["s00", "s03", "s06"]  # part 0 first (two threads: either order within it)

    def refuse(path, **kwargs):
        raise AssertionError(f"{path} was graded again")

    merged = grade_class(A, root=root, progress=False, grade_fn=refuse)
    assert [r.student for r in merged] == students and all(r.skipped for r in merged)
    with pytest.raises(ClassGradingError, match="0 <= K < N"):
        grade_class(A, root=root, part=(3, 3), progress=False, grade_fn=refuse)
    with pytest.raises(ClassGradingError, match="--gradebook needs the whole class"):
        grade_class(A, root=root, part=(0, 3), gradebook=True, progress=False, grade_fn=refuse)


def test_the_readme_kubernetes_job_runs_every_part_once():
    """The Indexed Job of the README: one pod per part, each with a valid ``--part`` (checked
    with the command's own parser), the parts covering the class once."""
    import re

    import yaml

    from attnlib.cli import _part

    readme = (REPO / "README.md").read_text()
    block = re.search(r"Kubernetes Indexed Job.*?```yaml\n(.*?)```", readme, re.S).group(1)
    job = yaml.safe_load(block)
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    n = spec["completions"]
    [container] = spec["template"]["spec"]["containers"]
    args = container["args"]
    assert container["command"] == ["attnlib"] and args[:2] == ["grade-class", A]
    part = args[args.index("--part") + 1]
    assert part == f"$(JOB_COMPLETION_INDEX)/{n}"
    parts = [_part(part.replace("$(JOB_COMPLETION_INDEX)", str(k))) for k in range(n)]
    students = list(range(50))
    assert sorted(s for k, m in parts for s in students[k::m]) == students
    usage = subprocess.run([sys.executable, "-m", "attnlib.cli", "grade-class", "--help"], capture_output=True,
                           text=True, check=True).stdout
    assert all(a in usage for a in args if a.startswith("--"))
    assert "--gradebook" not in args  # the parts write no gradebook: the merging run does
