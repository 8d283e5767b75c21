"""The class report's pages (``attnlib.grading.class_report``) in a real browser: Debian's
headless Chromium driven by Playwright, as ``test_site.py`` does (nothing is downloaded).

The pages are written from a hand-written class summary (no grading): eight learners, one
with a hostile name, one with a name of 120 letters and no space, four items. Each page,
served from 127.0.0.1 at a desktop (1280 px) and a phone (390 px) width: no console or
page error, no request but the page itself (figures are data URIs; everything else is
refused and counted), every image loaded and drawn for its column, with alt text, no
script, nothing wider than the window except inside the tables' scrolling wrappers, and
no serious or critical axe-core violation.

Run with ``.venv/bin/python -m pytest tests/site/test_class_report_page.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import serve

from attnlib.grading.class_report import write_course_report

ROOT = Path(__file__).resolve().parents[2]
AXE = ROOT / "tests" / "site" / "node_modules" / "axe-core" / "axe.min.js"
A = "02_queries_keys_values"
PAGES = [f"{A}/report.html", "report.html"]
VIEWPORTS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
MAX_IMAGE_SCALE = 1.3  # natural / displayed width of a figure at the desktop width
HOSTILE = "<script>alert(1)</script>"
LONG_NAME = "x" * 120
ITEMS = [("test_softmax", 3), ("test_scaled_dot_product_attention", 5), ("test_attention_weights", 2),
         ("test_attention_entropy", 2)]


def _mistake(exercise: str, index: int) -> str:
    from attnlib.grading import EXERCISES
    from attnlib.grading.site import section_url

    m = EXERCISES[exercise].mistakes[index]
    return (f"Looks like {m.name}: {m.explanation} See {section_url(m.section)}.\n"
            f"(largest error 0.5 at index (0, 1, 2, 3))\n[{exercise}, case 'float32, B=2, H=3, L=S=4, E=8']")


def _summary() -> dict:
    failures = {
        "ada": {},
        "bob": {"test_scaled_dot_product_attention": _mistake("scaled_dot_product_attention", 0)},
        "cy": {"test_scaled_dot_product_attention": _mistake("scaled_dot_product_attention", 0),
               "test_softmax": _mistake("softmax", 1)},
        HOSTILE: {item: "not implemented yet\n[softmax, case 'a']" for item, _ in ITEMS},
        LONG_NAME: {"test_attention_entropy": "the output has shape (2, 3) where (2, 4) was expected" + "!" * 200},
        "dee": {"test_attention_weights": "did not finish within 10 s (an infinite loop?)"},
        "eve": {"test_softmax": _mistake("softmax", 2)},
        "fay": {"test_attention_entropy": "raised ValueError: <b>bold</b> " + "y" * 300},
    }
    students = []
    for name, failed in failures.items():
        items = [{"id": i, "points": 0 if i in failed else p, "max_points": p, "passed": i not in failed,
                  "feedback": failed.get(i, "all 8 cases passed")} for i, p in ITEMS]
        score = sum(i["points"] for i in items)
        students.append({"student": name, "assignment": A, "score": score, "max_score": 12, "notes": [],
                         "notebooks": [{"name": f"{A}.ipynb", "file": f"{A}.ipynb", "status": "graded",
                                        "score": score, "max_score": 12, "items": items, "notes": []}]})
    students.append({"student": "gil", "score": "n/a"})  # an entry that cannot be read
    return {"assignment": A, "students": students, "failures_by_kind": {}, "not_graded": ["hal"],
            "stopped_by": "SIGINT"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graded")
    (out / f"{A}.json").write_text(json.dumps(_summary()))
    write_course_report(out)
    assert all((out / p).is_file() for p in PAGES)
    return out


@pytest.fixture(scope="module")
def server(reports):
    with serve(reports) as address:
        yield address


class Watch:
    """A page at one window size, recording console and page errors, failed responses and
    every request (anything but the page's own address is refused)."""

    def __init__(self, browser, origin: str, viewport: dict):
        self.origin = origin
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console error: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed request: {r.url} ({r.failure})"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        self.page.route("**/*", self._route)

    def _route(self, route):
        url = route.request.url
        parsed = urlparse(url)
        if parsed.scheme != "data":
            self.requests.append(url)
        if f"{parsed.scheme}://{parsed.netloc}" == self.origin or parsed.scheme == "data":
            route.continue_()
        else:
            route.abort()

    def open(self, path: str):
        self.page.goto(f"{self.origin}/{path}", wait_until="load")
        self.page.wait_for_load_state("networkidle")
        return self.page

    def close(self):
        self.context.close()


@pytest.fixture
def watch(browser, server, request):
    viewport = VIEWPORTS[request.param]
    w = Watch(browser, server, viewport)
    yield w
    w.close()


OVERFLOW_JS = """() => {
  const width = document.documentElement.clientWidth, out = [];
  for (const el of document.body.querySelectorAll('*')) {
    if (el.closest('.scroll')) continue;                      // inside a table's scrolling wrapper
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    if (r.left < -1 || r.right > width + 1) out.push(`${el.tagName.toLowerCase()}.${el.className}: ${Math.round(r.left)}..${Math.round(r.right)} of ${width}`);
  }
  return {out, scrollWidth: document.documentElement.scrollWidth, width};
}"""


@pytest.mark.parametrize("watch", list(VIEWPORTS), indirect=True)
@pytest.mark.parametrize("path", PAGES)
def test_the_report_renders_cleanly_and_loads_nothing(watch, path):
    page = watch.open(path)
    assert watch.requests == [f"{watch.origin}/{path}"], f"requests other than the page: {watch.requests}"
    assert page.evaluate("document.scripts.length") == 0
    images = page.evaluate("""Array.from(document.images).map(i => ({src: i.getAttribute('src').slice(0, 30),
        natural: i.naturalWidth, complete: i.complete, shown: i.getBoundingClientRect().width,
        alt: (i.getAttribute('alt') || '').trim()}))""")
    assert len(images) == (2 if path != "report.html" else 1), images
    for image in images:
        assert image["src"].startswith("data:image/png;base64,"), image
        assert image["complete"] and image["natural"] > 0, f"an image did not load: {image}"
        assert image["alt"], f"an image without alt text: {image}"
        assert image["shown"] > 0
        if page.viewport_size["width"] >= 1280:
            assert image["natural"] <= MAX_IMAGE_SCALE * image["shown"], f"a figure shrunk: {image}"
    text = page.inner_text("main")
    assert HOSTILE in text, "the hostile learner's name is not shown as text"
    assert page.evaluate("document.querySelectorAll('main b').length") == 0, "learner HTML was rendered"
    assert not watch.problems, "\n".join(watch.problems)


@pytest.mark.parametrize("watch", list(VIEWPORTS), indirect=True)
@pytest.mark.parametrize("path", PAGES)
def test_nothing_is_wider_than_the_window_but_the_tables_that_scroll(watch, path):
    page = watch.open(path)
    found = page.evaluate(OVERFLOW_JS)
    assert found["scrollWidth"] <= found["width"], f"the page scrolls sideways: {found}"
    assert not found["out"], "wider than the window:\n" + "\n".join(found["out"][:20])
    # the long name does widen its table, which scrolls in its wrapper
    wrappers = page.evaluate("""Array.from(document.querySelectorAll('.scroll')).map(w => ({
        overflow: getComputedStyle(w).overflowX, scrolls: w.scrollWidth > w.clientWidth + 1}))""")
    assert wrappers and all(w["overflow"] == "auto" for w in wrappers)
    if page.viewport_size["width"] < 600:
        assert any(w["scrolls"] for w in wrappers), "on a phone no table scrolls: the test checks nothing"


@pytest.mark.parametrize("watch", ["desktop"], indirect=True)
def test_the_course_page_links_the_assignment_page(watch):
    page = watch.open("report.html")
    page.click(f"a[href='{A}/report.html']")
    page.wait_for_load_state("load")
    assert page.url == f"{watch.origin}/{A}/report.html"
    assert page.inner_text("h1") == f"What the class gets wrong: {A}"
    assert not watch.problems, "\n".join(watch.problems)


@pytest.mark.parametrize("watch", list(VIEWPORTS), indirect=True)
@pytest.mark.parametrize("path", PAGES)
def test_accessibility(watch, path):
    """axe-core (the npm package of tests/site, injected into the page) finds no serious or
    critical violation."""
    if not AXE.exists():
        pytest.fail(f"axe-core is not installed at {AXE}: `make site-test` runs npm ci in tests/site")
    page = watch.open(path)
    page.add_script_tag(content=AXE.read_text())
    violations = page.evaluate("""async () => {
        const result = await axe.run(document, {resultTypes: ['violations']});
        return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}));
    }""")
    bad = [v for v in violations if v["impact"] in ("serious", "critical")]
    assert not bad, "\n".join(f"{v['impact']} {v['id']} ({v['help']}): {v['nodes']}" for v in bad)
