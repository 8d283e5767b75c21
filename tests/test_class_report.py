"""``attnlib.grading.class_report``: what the class gets wrong, from ``attnlib grade-class``'s
class summaries.

* named mistakes are read from the grader's real messages (those of ``judge``), including
  names with a colon, names shared by several exercises and names the catalogue lacks;
* on a hand-written summary of six learners (and one not graded, two entries that cannot
  be read): the counts, pass rates, quartiles, ranking of mistakes and kinds of failure are
  the ones worked out by hand; a missing or malformed summary is a :class:`ReportError`;
* the page is self-contained (every image a PNG data URI at most 7.5 in wide, no script,
  no resource from elsewhere), escapes a hostile learner's name and feedback, and links
  each known mistake to its section of the book;
* the course page gathers every assignment's summary and ignores other JSON files;
* end to end: a class of three graded by :func:`grade_class` for chapter 2 (all correct, a
  scale of 1/d_k instead of 1/sqrt(d_k), untouched) gives the expected report.
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from attnlib.grading import EXERCISES, judge
from attnlib.grading.class_report import (
    ReportError,
    assignment_report,
    course_report,
    named_mistake,
    write_assignment_report,
    write_course_report,
)
from attnlib.grading.core import InputModifiedError, call, mistake_as_student
from attnlib.grading.site import SITE_URL, section_url

A = "02_queries_keys_values"
HOSTILE = "<script>alert(1)</script>"


def mistake_message(exercise: str, name: str, case: str = "a case") -> str:
    """Feedback naming a catalogued mistake, as ``judge`` and the runner write it."""
    m = next(m for m in EXERCISES[exercise].mistakes if m.name == name)
    explanation = m.explanation if m.explanation.endswith((".", "?", "!")) else m.explanation + "."
    return (f"Looks like {m.name}: {explanation} See {section_url(m.section)}.\n"
            f"(the values differ: largest error 0.5 at index (0, 1))\n[{exercise}, case '{case}']")


def url_of(exercise: str, name: str) -> str:
    return section_url(next(m for m in EXERCISES[exercise].mistakes if m.name == name).section)


# --------------------------------------------------------------------------- named mistakes


def test_named_mistake_reads_the_real_messages_of_judge():
    ex = EXERCISES["softmax"]
    named = 0
    for mistake in ex.mistakes:
        if mistake.changes_input:
            continue
        student = mistake_as_student(ex, mistake)
        for case in ex.make_cases(False):
            result = judge(ex, case, call(ex, student, case))
            if not result.passed and result.message.startswith("Looks like"):
                found = named_mistake(f"{result.message}\n[softmax, case '{case.name}']")
                expected = next(m for m in ex.mistakes if result.message.startswith(f"Looks like {m.name}:"))
                assert found == {"exercise": "softmax", "mistake": expected.name,
                                 "explanation": expected.explanation, "section_url": section_url(expected.section),
                                 "known": True}
                named += 1
                break
    assert named >= 3, "fewer than three of softmax's mistakes were named by judge"


def test_named_mistake_reads_the_message_of_a_call_that_changed_its_input():
    ex = EXERCISES["softmax"]
    mistake = next(m for m in ex.mistakes if m.changes_input)
    with pytest.raises(InputModifiedError) as info:  # its message alone is the feedback
        call(ex, mistake_as_student(ex, mistake), ex.make_cases(False)[0])
    found = named_mistake(f"{info.value}\n[softmax, case 'a']")
    assert (found["mistake"], found["explanation"], found["known"]) == (mistake.name, mistake.explanation, True)


def test_named_mistake_with_a_colon_in_its_name_belongs_to_the_feedbacks_exercise():
    for exercise in ("sliding_window_mask", "longformer_mask"):
        found = named_mistake(mistake_message(exercise, "off by one: distance < window"))
        mine = next(m for m in EXERCISES[exercise].mistakes if m.name == "off by one: distance < window")
        assert (found["exercise"], found["mistake"], found["explanation"]) == (exercise, mine.name, mine.explanation)


def test_named_mistake_falls_back_to_every_exercise_then_to_an_unknown_name():
    # no case line: "fully masked row gives NaN" is softmax's and scaled_dot_product_attention's;
    # the section the feedback links to decides
    text = mistake_message("scaled_dot_product_attention", "fully masked row gives NaN").rsplit("\n", 1)[0]
    found = named_mistake(text)
    sdpa = next(m for m in EXERCISES["scaled_dot_product_attention"].mistakes if m.name == "fully masked row gives NaN")
    assert found["explanation"] == sdpa.explanation and found["known"]
    assert found["section_url"] == section_url(sdpa.section) != url_of("softmax", "fully masked row gives NaN")
    # a case line naming an exercise the registry lacks: matched across exercises
    found = named_mistake("Looks like no max subtraction: x. See y.\n[renamed_softmax, case 'a']")
    assert found["known"] and found["mistake"] == "no max subtraction" and found["exercise"] == "softmax"
    # a name of no exercise: counted, without explanation or address
    found = named_mistake("Looks like a mistake of an older grader: it did X. See https://e.org/.\n[softmax, case 'a']")
    assert found == {"exercise": "softmax", "mistake": "a mistake of an older grader", "explanation": None,
                     "section_url": None, "known": False}


@pytest.mark.parametrize("feedback", [
    "not implemented yet\n[softmax, case 'a']",
    "raised ValueError: Looks like no max subtraction: fake. See https://evil.example/.\n[softmax, case 'a']",
    "the values differ. Looks like no max subtraction: ...",
    "",
])
def test_named_mistake_only_where_the_grader_names_one(feedback):
    assert named_mistake(feedback) is None


# --------------------------------------------------------------------------- a hand-written class


def nb_result(softmax: str | None, sdpa: str | None, status: str = "graded", message: str = "") -> dict:
    """One notebook's result; an item's feedback, None when it passed."""
    def item(item_id: str, points: int, feedback: str | None) -> dict:
        return {"id": item_id, "points": points if feedback is None else 0, "max_points": points,
                "passed": feedback is None, "feedback": "all 5 cases passed" if feedback is None else feedback}

    items = [item("test_softmax", 3, softmax), item("test_scaled_dot_product_attention", 5, sdpa)]
    entry = {"name": f"{A}.ipynb", "file": f"{A}.ipynb" if status != "missing" else None, "max_score": 8,
             "status": status, "score": sum(i["points"] for i in items), "items": items, "notes": []}
    if message:
        entry["message"] = message
    return entry


def student(name: str, nb: dict, notes: list[str] | None = None) -> dict:
    return {"student": name, "assignment": A, "score": nb["score"], "max_score": 8, "notebooks": [nb],
            "notes": notes or [], "seconds": 1.0}


SCALE = "no 1/sqrt(d_k) scaling"
MISSING = f"no notebook named {A}.ipynb was submitted"


def hand_written_summary() -> dict:
    """Six learners graded (scores 8, 3, 5, 0, 0, 0), one not graded, two unreadable entries."""
    students = [
        student("ada", nb_result(None, None)),
        student("bob", nb_result(None, mistake_message("scaled_dot_product_attention", SCALE))),
        student("cy", nb_result(mistake_message("softmax", "no max subtraction", "large logits"), None)),
        student(HOSTILE, nb_result("not implemented yet\n[softmax, case 'a']",
                                   "Looks like a mistake of an older grader: it printed <img src=x onerror=alert(1)>. "
                                   "See https://evil.example/.\n[scaled_dot_product_attention, case 'a']"),
                notes=["extra notebook <img src=x onerror=alert(2)>.ipynb is not part of the assignment"]),
        student("dee", nb_result(MISSING, MISSING, status="missing", message=MISSING)),
        student("fred", nb_result("did not finish within 10 s (an infinite loop?)\n[softmax, case 'a']",
                                  mistake_message("scaled_dot_product_attention", SCALE))),
        "oops",
        {"student": "gil", "assignment": A, "score": "eight", "max_score": 8, "notebooks": []},
    ]
    return {"assignment": A, "students": students, "failures_by_kind": {}, "not_graded": ["hal"],
            "stopped_by": "SIGINT"}


@pytest.fixture
def out_dir(tmp_path) -> Path:
    out = tmp_path / "graded"
    out.mkdir()
    (out / f"{A}.json").write_text(json.dumps(hand_written_summary(), indent=2))
    return out


def test_counts_pass_rates_and_quartiles(out_dir):
    r = assignment_report(out_dir, A)
    assert (r["students"], r["graded"], r["not_graded"], r["stopped_by"]) == (9, 6, ["hal"], "SIGINT")
    scores = r["scores"]
    assert sorted(s["score"] for s in scores["students"]) == [0, 0, 0, 3, 5, 8]
    # numpy's linear quartiles of 0 0 0 3 5 8: positions 1.25, 2.5 and 3.75
    assert (scores["max_score"], scores["mean"], scores["q1"], scores["median"], scores["q3"]) == \
        (8, pytest.approx(16 / 6, abs=1e-4), 0, 1.5, 4.5)
    items = {i["id"]: i for i in r["items"]}
    assert {k: (i["learners"], i["attempted"], i["passed"], i["pass_rate"], i["pass_rate_of_attempted"])
            for k, i in items.items()} == {
        "test_softmax": (6, 4, 2, pytest.approx(1 / 3, abs=1e-4), 0.5),
        "test_scaled_dot_product_attention": (6, 5, 2, pytest.approx(1 / 3, abs=1e-4), 0.4)}
    assert items["test_softmax"]["max_points"] == 3
    kinds = [(k["kind"], k["items"], sorted(k["learners"])) for k in r["failure_kinds"]]
    assert kinds == [("named mistake", 4, sorted(["bob", "cy", HOSTILE, "fred"])),
                     ("missing notebook", 2, ["dee"]), ("not implemented", 1, [HOSTILE]),
                     ("time limit", 1, ["fred"])]
    assert r["notebooks_not_graded"] == [{"status": "missing", "notebooks": 1, "learners": ["dee"]}]
    people = {p["student"]: p for p in r["learners"]}
    assert (people["bob"]["items_passed"], people["bob"]["items"]) == (1, 2)
    assert [m["mistake"] for m in people["fred"]["mistakes"]] == [SCALE]
    assert people["fred"]["failures"] == [{"item": "test_softmax", "kind": "time limit"}]
    assert MISSING in people["dee"]["problems"]


def test_mistakes_are_ranked_by_learners(out_dir):
    r = assignment_report(out_dir, A)
    ranked = [(m["exercise"], m["mistake"], m["learners"], m["who"], m["known"]) for m in r["mistakes"]]
    assert ranked == [("scaled_dot_product_attention", SCALE, 2, ["bob", "fred"], True),
                      ("softmax", "no max subtraction", 1, ["cy"], True),
                      ("scaled_dot_product_attention", "a mistake of an older grader", 1, [HOSTILE], False)]
    first = r["mistakes"][0]
    assert first["section_url"] == url_of("scaled_dot_product_attention", SCALE)
    assert first["section_url"].startswith(SITE_URL) and first["explanation"]
    assert r["mistakes"][2]["section_url"] is None and r["mistakes"][2]["explanation"] is None


def test_unreadable_entries_are_reported_not_fatal(out_dir):
    r = assignment_report(out_dir, A)
    assert [(m["entry"], m["student"]) for m in r["malformed"]] == [(6, None), (7, "gil")]
    assert "not an object" in r["malformed"][0]["problem"] and "'score'" in r["malformed"][1]["problem"]
    html = write_assignment_report(out_dir, A).read_text()
    assert "Entries that cannot be read" in html and "students[7]: &#x27;score&#x27; is not a number" in html
    assert "2 entries of the results file cannot be read" in html


@pytest.mark.parametrize("content, what", [
    (None, "there is no such file"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "no list \"students\""),
    ('{"assignment": "02_queries_keys_values", "students": {}}', "no list \"students\""),
    ('{"assignment": "05_self_cross_masks", "students": []}', "summary of '05_self_cross_masks'"),
])
def test_a_missing_or_malformed_summary_is_a_report_error(tmp_path, content, what):
    if content is not None:
        (tmp_path / f"{A}.json").write_text(content)
    with pytest.raises(ReportError) as info:
        write_assignment_report(tmp_path, A)
    assert isinstance(info.value, ValueError)
    assert "expected the class summary" in str(info.value) and what in str(info.value)
    assert not (tmp_path / A).exists()


def test_an_assignment_name_that_is_a_path_is_refused(out_dir):
    for bad in ("../x", "..", "", "a/b"):
        with pytest.raises(ReportError, match="expected an assignment"):
            assignment_report(out_dir, bad)


# --------------------------------------------------------------------------- the page


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_self_contained(html: str, images: int) -> Tags:
    """No script, no resource from anywhere, every image an inline PNG at most 750 px wide
    with alt text; every link http(s) or relative."""
    assert "<script" not in html.lower() and 'src="http' not in html and "src='http" not in html
    page = Tags(html)
    names = [t for t, _ in page.tags]
    for tag in ("script", "iframe", "object", "embed", "base", "form", "svg"):
        assert tag not in names, tag
    assert names.count("style") == 1
    for tag, attrs in page.tags:
        assert not [a for a in attrs if a.lower().startswith("on")], (tag, attrs)
        assert "style" not in attrs, (tag, attrs)
        if tag == "link":
            assert attrs == {"rel": "icon", "href": "data:,"}
        if tag == "a":
            href = attrs["href"]
            assert href.startswith(("https://", "http://")) or ":" not in href, href
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) == images
    for img in imgs:
        assert img["src"].startswith("data:image/png;base64,"), img["src"][:40]
        width, height = png_size(base64.b64decode(img["src"].split(",", 1)[1]))
        assert 0 < width <= 750 and (width, height) == (int(img["width"]), int(img["height"]))
        assert len(img.get("alt", "")) > 40
    assert "url(" not in html and "@import" not in html
    return page


def test_the_page_is_self_contained_escaped_and_links_the_book(out_dir):
    path = write_assignment_report(out_dir, A)
    assert path == out_dir / A / "report.html"
    html = path.read_text()
    page = assert_self_contained(html, images=2)
    assert HOSTILE not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" not in html  # the unknown mistake shows its name only
    assert "extra notebook &lt;img src=x onerror=alert(2)&gt;.ipynb" in html
    text = "".join(page.text)
    assert HOSTILE in text  # shown as text, as written
    links = [a["href"] for t, a in page.tags if t == "a"]
    r = json.loads((out_dir / A / "report.json").read_text())
    for m in r["mistakes"]:
        if m["known"]:
            assert m["section_url"] in links
    assert "https://evil.example/" not in links
    assert links and all(href.startswith(SITE_URL) for href in links)
    # ranked in the table as in the JSON, the first with its explanation
    assert text.index(SCALE) < text.index("no max subtraction") < text.index("a mistake of an older grader")
    assert r["mistakes"][0]["explanation"][1:] in text
    alts = [a["alt"] for t, a in page.tags if t == "img"]
    assert any("test_softmax 33 % (2 of 6)" in alt for alt in alts), alts
    assert any("3 learners scored 0" in alt for alt in alts), alts
    assert sorted(p.name for p in (out_dir / A).iterdir()) == ["report.html", "report.json"]  # no temporary files


def test_report_json_is_the_report(out_dir):
    write_assignment_report(out_dir, A)
    written = json.loads((out_dir / A / "report.json").read_text())
    fresh = assignment_report(out_dir, A)
    written.pop("generated_at"), fresh.pop("generated_at")
    assert written == json.loads(json.dumps(fresh))


def test_a_class_with_nobody_graded_yet(tmp_path):
    (tmp_path / f"{A}.json").write_text(json.dumps({"assignment": A, "students": [], "not_graded": ["a", "b"],
                                                    "stopped_by": "SIGTERM"}))
    r = assignment_report(tmp_path, A)
    assert (r["students"], r["graded"], r["scores"]["mean"], r["items"], r["mistakes"]) == (2, 0, None, [], [])
    html = write_assignment_report(tmp_path, A).read_text()
    assert_self_contained(html, images=0)
    assert "2 learners not graded yet (the run was stopped by SIGTERM" in html


# --------------------------------------------------------------------------- the course


def test_the_course_page_gathers_every_assignment(out_dir):
    other = "05_self_cross_masks"
    summary = {"assignment": other, "not_graded": [], "stopped_by": None, "students": [
        {"student": "ada", "assignment": other, "score": 2, "max_score": 4, "notes": [], "notebooks": [
            {"name": f"{other}.ipynb", "file": f"{other}.ipynb", "status": "graded", "score": 2, "max_score": 4,
             "items": [{"id": "test_causal_mask", "points": 0, "max_points": 2, "passed": False,
                        "feedback": mistake_message("causal_mask", "strict triangle (no diagonal)")},
                       {"id": "test_padding_mask", "points": 2, "max_points": 2, "passed": True, "feedback": ""}]}]},
        {"student": "zoe", "assignment": other, "score": 4, "max_score": 4, "notes": [], "notebooks": []}]}
    (out_dir / f"{other}.json").write_text(json.dumps(summary))
    (out_dir / "settings.json").write_text('{"theme": "dark"}')  # not a class summary
    (out_dir / "broken.json").write_text("{")
    (out_dir / "report.json").write_text("{}")  # an earlier course report: not a summary
    path = write_course_report(out_dir)
    assert path == out_dir / "report.html"
    c = json.loads((out_dir / "report.json").read_text())
    assert [ch["assignment"] for ch in c["assignments"]] == [A, other]
    assert sorted(s["file"] for s in c["skipped"]) == ["broken.json", "settings.json"]
    first, second = c["assignments"]
    assert (first["graded"], first["students"], first["mean"], first["max_score"]) == (6, 9, pytest.approx(2.6667), 8)
    assert first["pass_rate"] == pytest.approx(4 / 12, abs=1e-4)
    assert [m["mistake"] for m in first["top_mistakes"]] == [SCALE, "no max subtraction",
                                                            "a mistake of an older grader"]
    assert (second["mean"], second["pass_rate"], second["mean_fraction"]) == (3, 0.5, 0.75)
    assert second["top_mistakes"][0]["mistake"] == "strict triangle (no diagonal)"
    people = {p["student"]: p for p in c["learners"]}
    assert people["ada"]["scores"] == {A: 8, other: 2} and people["ada"]["total"] == 10
    assert people["zoe"]["scores"] == {A: None, other: 4} and people["zoe"]["max_total"] == 12
    assert [m["mistake"] for m in people["ada"]["mistakes"]] == ["strict triangle (no diagonal)"]
    html = path.read_text()
    page = assert_self_contained(html, images=1)
    links = [a["href"] for t, a in page.tags if t == "a"]
    for ch in c["assignments"]:
        assert ch["report"] in links and (out_dir / ch["report"]).is_file()
    assert url_of("causal_mask", "strict triangle (no diagonal)") in links
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and HOSTILE not in html
    # again, with its own report.json beside the summaries: the same page
    write_course_report(out_dir)
    again = json.loads((out_dir / "report.json").read_text())
    assert [ch["assignment"] for ch in again["assignments"]] == [A, other]


def test_the_course_page_needs_a_summary(tmp_path):
    (tmp_path / "notes.json").write_text("[]")
    with pytest.raises(ReportError, match="expected class summaries"):
        course_report(tmp_path)
    with pytest.raises(ReportError):
        write_course_report(tmp_path / "nowhere")


# --------------------------------------------------------------------------- end to end


def test_a_class_of_three_graded_for_real(tmp_path):
    """all correct, 1/d_k instead of 1/sqrt(d_k) in scaled_dot_product_attention (a name that
    needs escaping), and the released notebook untouched."""
    from test_course import new_course, student_notebook, submit

    root = new_course(tmp_path / "course", [A])
    submit(root, "ada", A, student_notebook(root, A, None))
    nb = student_notebook(root, A, None)
    cell = next(c for c in nb.cells
                if c.metadata.get("nbgrader", {}).get("grade_id") == "scaled_dot_product_attention-solution")
    right = "scale = 1.0 / math.sqrt(q.size(-1))"
    assert cell.source.count(right) == 1, "the solution no longer computes the scale this way"
    cell.source = cell.source.replace(right, "scale = 1.0 / q.size(-1)")
    mistaken = "<script>alert(1)"  # a folder name cannot hold "/"
    submit(root, mistaken, A, nb)
    submit(root, "untouched", A, nbformat.read(str(root / "notebooks" / A / f"{A}.ipynb"), as_version=4))
    # the command writes the assignment's page after grading, and the course's with --report
    proc = subprocess.run([sys.executable, "-m", "attnlib.cli", "grade-class", A, "--no-progress", "--jobs", "2",
                           "--report"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = {p: (root / "graded" / p).read_text() for p in (f"{A}/report.html", "report.html")}
    assert f"graded/{A}/report.html" in proc.stdout and "graded/report.html" in proc.stdout
    assert A in written["report.html"] and f'href="{A}/report.html"' in written["report.html"]

    t0 = time.perf_counter()
    path = write_assignment_report(root / "graded", A)
    assert time.perf_counter() - t0 < 30
    r = json.loads((root / "graded" / A / "report.json").read_text())
    assert (r["students"], r["graded"], r["malformed"], r["not_graded"]) == (3, 3, [], [])
    assert {s["student"]: s["score"] for s in r["scores"]["students"]} == {"ada": 8, mistaken: 3, "untouched": 0}
    assert (r["scores"]["mean"], r["scores"]["median"], r["scores"]["q1"], r["scores"]["q3"]) == \
        (pytest.approx(11 / 3, abs=1e-4), 3, 1.5, 5.5)
    rates = {i["id"]: (i["passed"], i["attempted"], i["learners"]) for i in r["items"]}
    assert rates == {"test_softmax": (2, 2, 3), "test_scaled_dot_product_attention": (1, 2, 3)}
    first = r["mistakes"][0]
    name = "scaled by 1/d_k instead of 1/sqrt(d_k)"
    assert (first["exercise"], first["mistake"], first["learners"], first["who"]) == \
        ("scaled_dot_product_attention", name, 1, [mistaken])
    assert first["section_url"] == url_of("scaled_dot_product_attention", name)
    summary = json.loads((root / "graded" / f"{A}.json").read_text())
    assert {k["kind"]: k["items"] for k in r["failure_kinds"]} == summary["failures_by_kind"]
    assert {k["kind"] for k in r["failure_kinds"]} == {"named mistake", "not implemented"}
    html = path.read_text()
    page = assert_self_contained(html, images=2)
    assert first["section_url"] in [a["href"] for t, a in page.tags if t == "a"]
    assert "&lt;script&gt;alert(1)" in html and mistaken not in html
    assert html.split("Made ")[1:] and written[f"{A}/report.html"].split("Made ")[0] == html.split("Made ")[0]
