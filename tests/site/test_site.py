"""The built website in a real browser: Debian's headless Chromium, driven by Playwright.

Serves ``_build/html`` on 127.0.0.1 and visits every page of the table of contents:
no console errors, no failed or off-origin requests, MathJax rendered (no raw ``$$``),
every image loaded, search finds "rotary", and the navigation reaches every chapter.
The exercises: every released notebook is a page showing its stubs, unexecuted, and every
chapter links to its notebook's page, a download of the ``.ipynb`` that the site serves, and
Colab and Binder, with URLs built from ``_config.yml``'s repository (links only: the
off-origin request rule still holds, since no test follows them).
A full-page screenshot of every page goes to ``_build/screenshots/`` (CI keeps it), with
``heights.json``: each page's height in pixels and in screens of the 1280 x 900 window.

Readability, page by page: no rendered formula shows a TeX command or escape (MathJax's
MathML of every formula holds no backslash and no error); every figure is drawn for the
column it is shown in (natural width at most ``MAX_IMAGE_SCALE`` times the displayed width)
and has alt text; nothing a reader needs is cut (no code, output, table or equation wider
than its box or the text column); axe-core finds no serious or critical violation, in light
and in dark mode; figures and equations are numbered per chapter (Fig. 3.1, (3.2)).

Run after ``make book`` (``make test`` does both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest
import yaml
from conftest import serve

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
AXE = ROOT / "tests" / "site" / "node_modules" / "axe-core" / "axe.min.js"
VIEWPORT = {"width": 1280, "height": 900}
MAX_IMAGE_SCALE = 1.3  # natural / displayed width of a figure


def toc_pages() -> list[str]:
    """The html paths of every page in _toc.yml, in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [entry["file"] for entry in part["chapters"]]
    return [f"{page}.html" for page in pages]


PAGES = toc_pages()
CHAPTERS = sorted(p.stem for p in (ROOT / "book").glob("[0-9][0-9]_*.md"))
NOTEBOOKS = sorted(p.parent.name for p in (ROOT / "notebooks").glob("*/*.ipynb") if p.stem == p.parent.name)


def expected_launch_urls(name: str) -> tuple[str, str]:
    """Colab and Binder URLs of a released notebook, from _config.yml's repository (written out
    here independently of book/_ext/exercise_links.py)."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    owner, repo = urlparse(config["repository"]["url"]).path.strip("/").split("/")
    branch = config["repository"]["branch"]
    path = f"notebooks/{name}/{name}.ipynb"
    return (f"https://colab.research.google.com/github/{owner}/{repo}/blob/{branch}/{path}",
            f"https://mybinder.org/v2/gh/{owner}/{repo}/{branch}?labpath={quote(path, safe='')}")


def fetch(url: str) -> tuple[int, bytes]:
    """GET from the local test server (never another origin)."""
    assert url.startswith("http://127.0.0.1:"), url
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


def assert_graded_notebook(body: bytes, what: str) -> None:
    nb = json.loads(body)
    assert nb.get("nbformat") == 4 and isinstance(nb.get("cells"), list), f"{what}: not a notebook"
    grade = [c for c in nb["cells"] if (c.get("metadata", {}).get("nbgrader") or {}).get("grade")]
    assert grade, f"{what}: no nbgrader grade cells"
    assert any("raise NotImplementedError" in "".join(c["source"]) for c in nb["cells"]), \
        f"{what}: no stub (raise NotImplementedError): not the released notebook"


@pytest.fixture(scope="session")
def server():
    if not (SITE / "index.html").exists():
        pytest.fail(f"no built site at {SITE}: run `make book` first")
    with serve(SITE) as address:
        yield address


@pytest.fixture(scope="session", autouse=True)
def screenshots_dir():
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    return SHOTS


class PageWatch:
    """Opens a page and records every console error, page error and failed or foreign request."""

    def __init__(self, browser, origin: str, mode: str = "light"):
        self.origin = origin
        self.context = browser.new_context(viewport=VIEWPORT, color_scheme=mode)
        self.page = self.context.new_page()
        # the theme reads its mode from localStorage before it paints
        self.page.add_init_script(f"localStorage.setItem('mode', '{mode}'); localStorage.setItem('theme', '{mode}');")
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console error: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed request: {r.url} ({r.failure})"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        self.page.route("**/*", self._only_own_origin)

    def _only_own_origin(self, route):
        url = route.request.url
        parsed = urlparse(url)
        if parsed.scheme in ("data", "blob") or f"{parsed.scheme}://{parsed.netloc}" == self.origin:
            route.continue_()
        else:
            self.problems.append(f"off-origin request: {url}")
            route.abort()

    def open(self, path: str):
        self.page.goto(f"{self.origin}/{path}", wait_until="load")
        self.page.wait_for_load_state("networkidle")
        return self.page

    def close(self):
        self.context.close()


@pytest.mark.parametrize("path", PAGES)
def test_page_renders_cleanly(browser, server, path):
    watch = PageWatch(browser, server)
    try:
        page = watch.open(path)
        has_math = page.evaluate("document.querySelectorAll('.math, div.math, span.math').length") > 0
        if has_math:
            page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=30000)
            page.evaluate("MathJax.startup.promise")
            assert page.evaluate("document.querySelectorAll('mjx-container').length") > 0, \
                "page has math but MathJax rendered nothing"
        text = page.evaluate("document.body.innerText")  # the whole page, navigation included
        for raw in ("$$", "\\(", "\\)", "\\[", "\\begin{"):
            assert raw not in text, f"raw {raw} in the rendered text: math not processed"
        images = page.evaluate("""Array.from(document.images).map(i => ({src: i.currentSrc || i.src,
            width: i.naturalWidth, complete: i.complete}))""")
        broken = [i["src"] for i in images if not i["complete"] or i["width"] == 0]
        assert not broken, f"images that did not load: {broken}"
        for alt_missing in page.evaluate("Array.from(document.querySelectorAll('main img:not([alt])')).map(i => i.src)"):
            watch.problems.append(f"image without alt text: {alt_missing}")
        READABILITY[path] = page.evaluate(READABILITY_JS)
        page.screenshot(path=str(SHOTS / (path.replace("/", "__").replace(".html", ".png"))), full_page=True)
        height = page.evaluate("document.documentElement.scrollHeight")
        heights = json.loads((SHOTS / "heights.json").read_text()) if (SHOTS / "heights.json").exists() else {}
        heights[path] = {"pixels": height, "screens": round(height / VIEWPORT["height"], 1)}
        (SHOTS / "heights.json").write_text(json.dumps(heights, indent=1, sort_keys=True))
        assert not watch.problems, "\n".join(watch.problems)
    finally:
        watch.close()


# What test_page_renders_cleanly measured on each page, for the readability tests below
# (each page is opened once; a readability test of a page that did not render fails).
READABILITY: dict[str, dict] = {}

READABILITY_JS = """() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main');
  const right = article.getBoundingClientRect().right;
  const cut = [], flagged = [];
  for (const el of article.querySelectorAll('*')) {
    if (!el.offsetParent) continue;                               // not displayed (folded)
    if (flagged.some(f => f.contains(el))) continue;              // inside a block already named
    if (el.tagName === 'MJX-MATH') {                              // a formula as drawn
      if (el.getBoundingClientRect().right > right + 2) cut.push(`formula: ${el.parentElement.textContent.slice(0, 70)}`);
      continue;
    }
    // MathJax's boxes keep a clipped copy of each formula for screen readers: skip them
    if (el.tagName.startsWith('MJX-') || el.matches('span.math, div.math')) continue;
    const scrolls = ['auto', 'scroll', 'hidden', 'clip'].includes(getComputedStyle(el).overflowX);
    if ((scrolls && el.scrollWidth > el.clientWidth + 2) || el.getBoundingClientRect().right > right + 2) {
      cut.push(`${el.tagName.toLowerCase()}.${el.className}: ${(el.innerText || '').slice(0, 70)}`
               .replace(/\\s+/g, ' '));
      flagged.push(el);
    }
  }
  const images = Array.from(article.querySelectorAll('img')).map(i => ({
      src: i.getAttribute('src'), natural: i.naturalWidth,
      shown: i.getBoundingClientRect().width, alt: (i.getAttribute('alt') || '').trim()}));
  const tex = [];
  if (window.MathJax && MathJax.startup && MathJax.startup.document) {
    for (const item of MathJax.startup.document.math) {
      const mml = MathJax.startup.toMML(item.root);
      if (mml.includes('\\\\') || mml.includes('<merror')) tex.push(item.math.slice(0, 100));
    }
  }
  const containerText = Array.from(document.querySelectorAll('mjx-container'))
      .map(c => c.textContent).filter(t => t.includes('\\\\'));
  return {cut, images, tex, containerText,
          // textContent, not innerText: figures and equations inside folded dropdowns count too
          figures: Array.from(article.querySelectorAll('figure .caption-number')).map(e => e.textContent.trim()),
          equations: Array.from(article.querySelectorAll('span.eqno'))
              .map(e => e.textContent.replace(/[^()0-9.]/g, '').trim()),
          title: (article.querySelector('h1') || {innerText: ''}).innerText};
}"""


def readability(browser, server, path: str) -> dict:
    """The page's measurements, from test_page_renders_cleanly or measured now."""
    if path not in READABILITY:
        watch = PageWatch(browser, server)
        try:
            page = watch.open(path)
            if page.evaluate("document.querySelectorAll('.math').length") > 0:
                page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise",
                                       timeout=30000)
                page.evaluate("MathJax.startup.promise")
            READABILITY[path] = page.evaluate(READABILITY_JS)
        finally:
            watch.close()
    return READABILITY[path]


@pytest.mark.parametrize("path", PAGES)
def test_formulas_show_no_tex(browser, server, path):
    """A formula MathJax could not read shows its TeX: an unknown macro, or an escape such as
    ``\\_`` inside ``\\text{}``. Its MathML then holds a backslash or an error."""
    report = readability(browser, server, path)
    assert not report["tex"], f"formulas whose rendering shows TeX: {report['tex']}"
    assert not report["containerText"], f"formula text with a backslash: {report['containerText'][:5]}"


@pytest.mark.parametrize("path", PAGES)
def test_figures_are_drawn_for_their_column(browser, server, path):
    images = readability(browser, server, path)["images"]
    shrunk = [f"{i['src']}: {i['natural']} px drawn, {i['shown']:.0f} px shown" for i in images
              if i["shown"] > 0 and i["natural"] > MAX_IMAGE_SCALE * i["shown"]]
    assert not shrunk, ("figures shrunk by more than 1/1.3 (their labels fall under 10 px): "
                        f"{shrunk}; draw them at most 7.5 inches wide")
    assert all(i["alt"] for i in images), f"figures without alt text: {[i['src'] for i in images if not i['alt']]}"


@pytest.mark.parametrize("path", [p for p in PAGES if p.startswith("book/")])
def test_nothing_is_cut(browser, server, path):
    """At a 1280 px window no code, printed output, table or display equation is wider than
    its box or the text column: a reader never loses a column or the end of a line.
    (The released notebooks' pages show the learner's file as it is, docstrings of the
    reference included: their long lines scroll.)"""
    cut = readability(browser, server, path)["cut"]
    assert not cut, "blocks wider than the text column:\n" + "\n".join(cut[:20])


NUMBERED = [p for p in PAGES if p.startswith("book/") and p.split("/")[1][:2].isdigit()]


@pytest.mark.parametrize("path", NUMBERED)
def test_figures_and_equations_are_numbered_per_chapter(browser, server, path):
    """Chapter N's title reads "N. ...", its figures Fig. N.1, N.2, ... and its equations
    (N.1), (N.2), ... in order: numbering restarts in each chapter."""
    chapter = int(path.split("/")[1][:2])
    report = readability(browser, server, path)
    assert report["title"].startswith(f"{chapter}. "), f"title {report['title']!r} is not numbered {chapter}"
    figures = [re.fullmatch(rf"Fig\. {chapter}\.(\d+)", f) for f in report["figures"]]
    assert all(figures), f"figure numbers not of chapter {chapter}: {report['figures']}"
    assert [int(m.group(1)) for m in figures] == list(range(1, len(figures) + 1)), report["figures"]
    equations = [re.fullmatch(rf"\({chapter}\.(\d+)\)", e) for e in report["equations"]]
    assert all(equations), f"equation numbers not of chapter {chapter}: {report['equations']}"
    assert [int(m.group(1)) for m in equations] == list(range(1, len(equations) + 1)), report["equations"]


def test_chapters_have_numbered_figures_and_equations(browser, server):
    reports = {p: readability(browser, server, p) for p in NUMBERED}
    counted = {p: (len(r["figures"]), len(r["equations"])) for p, r in reports.items()}
    assert len(counted) == len(CHAPTERS)
    assert sum(f for f, _ in counted.values()) >= 2 * len(CHAPTERS), counted
    assert sum(e for _, e in counted.values()) >= len(CHAPTERS), counted


AXE_IMPACTS = {"serious", "critical"}


@pytest.mark.parametrize("mode", ["light", "dark"])
@pytest.mark.parametrize("path", PAGES)
def test_accessibility(browser, server, path, mode):
    """axe-core (the npm package, injected into the page) finds no serious or critical
    violation, with the theme in light and in dark mode."""
    if not AXE.exists():
        pytest.fail(f"axe-core is not installed at {AXE}: `make site-test` runs npm ci in tests/site")
    watch = PageWatch(browser, server, mode=mode)
    try:
        page = watch.open(path)
        assert page.evaluate("document.documentElement.dataset.theme") == mode
        if page.evaluate("document.querySelectorAll('.math').length") > 0:
            page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=30000)
            page.evaluate("MathJax.startup.promise")
        page.add_script_tag(content=AXE.read_text())
        violations = page.evaluate("""async () => {
            const result = await axe.run(document, {resultTypes: ['violations']});
            return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                nodes: v.nodes.slice(0, 3).map(n => n.target.join(' ') + ' ' + (n.failureSummary || '')
                    .split('\\n').slice(1, 2).join(''))}));
        }""")
        bad = [v for v in violations if v["impact"] in AXE_IMPACTS]
        assert not bad, "\n".join(f"{v['impact']} {v['id']} ({v['help']}): {v['nodes']}" for v in bad)
        assert not watch.problems, "\n".join(watch.problems)
    finally:
        watch.close()


def test_search_finds_rotary(browser, server):
    watch = PageWatch(browser, server)
    try:
        page = watch.open("search.html?q=rotary")
        page.wait_for_selector("#search-results li", timeout=30000)
        hits = page.evaluate("Array.from(document.querySelectorAll('#search-results li a')).map(a => a.href)")
        assert any("07_positional_encoding" in h for h in hits), hits
        page.screenshot(path=str(SHOTS / "search-rotary.png"))
        assert not watch.problems, "\n".join(watch.problems)
    finally:
        watch.close()


def test_navigation_reaches_every_chapter(browser, server):
    """Starting from the home page and following only links, every toc page is reachable."""
    watch = PageWatch(browser, server)
    try:
        seen: set[str] = set()
        frontier = [watch.open("index.html").url]
        while frontier:
            url = frontier.pop()
            path = urlparse(url).path.lstrip("/")
            if path in seen or not path.endswith(".html"):
                continue
            seen.add(path)
            if path in PAGES or path == "index.html":
                watch.page.goto(url, wait_until="load")
                links = watch.page.evaluate(
                    "Array.from(document.querySelectorAll('nav a[href], .bd-sidebar a[href], "
                    "a.reference.internal[href]')).map(a => a.href)")
                frontier += [link.split("#")[0] for link in links if link.startswith(server)]
        missing = [p for p in PAGES if p not in seen]
        assert not missing, f"not reachable through the navigation: {missing}"
    finally:
        watch.close()


def test_no_page_refers_to_another_origin():
    """Static check of the built HTML: no script, style, font or image from outside the site."""
    offenders = []
    for html in SITE.rglob("*.html"):
        text = html.read_text(errors="replace")
        for needle in ('src="http', "src='http", 'href="http://fonts', 'href="https://fonts',
                       "cdn.jsdelivr", "cdnjs.cloudflare", "unpkg.com", "googleapis"):
            if needle in text:
                offenders.append(f"{html.relative_to(SITE)}: {needle}")
    assert not offenders, offenders
    assert os.path.exists(SITE / "_static" / "mathjax" / "tex-chtml.js")


def test_every_notebook_and_chapter_is_in_the_toc():
    assert CHAPTERS and NOTEBOOKS == CHAPTERS, (NOTEBOOKS, CHAPTERS)
    missing = [n for n in NOTEBOOKS if f"notebooks/{n}/{n}.html" not in PAGES]
    assert not missing, f"released notebooks that are not pages of the book: {missing}"
    assert "book/exercises.html" in PAGES


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_exercise_page_shows_the_unexecuted_notebook(browser, server, name):
    """The notebook's page: its title, guide text, stubs and test cells, no output, and the
    theme's download and launch menus."""
    nb = json.loads((ROOT / "notebooks" / name / f"{name}.ipynb").read_text())
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    watch = PageWatch(browser, server)
    try:
        page = watch.open(f"notebooks/{name}/{name}.html")
        titles = page.locator("main h1:has(a.headerlink)")  # not the theme's print-only header
        assert titles.count() == 1, "a notebook page has one title"
        assert titles.inner_text().strip("# \n")
        code = page.evaluate("Array.from(document.querySelectorAll('main div.cell div.cell_input pre'))"
                             ".map(p => p.innerText)")
        assert len(code) == len(code_cells), f"{len(code)} code cells shown, {len(code_cells)} in the notebook"
        assert any("raise NotImplementedError" in c for c in code), "no stub shown"
        assert any("check(" in c for c in code), "no test cell shown"
        assert page.evaluate("document.querySelectorAll('main .cell_output').length") == 0, \
            "the released notebook was executed"
        text = page.inner_text("main")
        assert "raise NotImplementedError" in text and len(text) > 1000, "little guide text"
        colab, binder = expected_launch_urls(name)
        launch = page.evaluate("Array.from(document.querySelectorAll('.dropdown-launch-buttons a[href]'))"
                               ".map(a => a.getAttribute('href'))")
        assert colab in launch, f"no Colab launch button {colab}: {launch}"
        binder_lab = binder.split("?")[0] + f"?urlpath=lab/tree/notebooks/{name}/{name}.ipynb"
        assert binder_lab in launch, f"no Binder launch button {binder_lab}: {launch}"
        source = page.evaluate(f"Array.from(document.querySelectorAll('a[href$=\"_sources/notebooks/{name}/{name}.ipynb\"]'))"
                               ".map(a => a.href)")
        assert source, "no download button for the .ipynb"
        status, body = fetch(source[0])
        assert status == 200
        assert_graded_notebook(body, source[0])
        assert not watch.problems, "\n".join(watch.problems)
    finally:
        watch.close()


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_links_to_its_exercise(browser, server, name):
    """A chapter's Exercise section: the notebook's page, a served download, Colab and Binder."""
    watch = PageWatch(browser, server)
    try:
        page = watch.open(f"book/{name}.html")
        box = page.locator("section#exercise div.exercise-notebook")
        assert box.count() == 1, "no exercise box in the chapter's Exercise section"
        links = box.evaluate("b => Array.from(b.querySelectorAll('a[href]')).map(a => "
                             "({href: a.href, raw: a.getAttribute('href'), cls: a.className, text: a.innerText}))")
        page_link = f"{server}/notebooks/{name}/{name}.html"
        assert any(link["href"] == page_link for link in links), f"no link to {page_link}: {links}"

        downloads = [link for link in links if "download" in link["cls"].split()]
        assert len(downloads) == 1 and downloads[0]["href"].endswith(f"/{name}.ipynb"), downloads
        status, body = fetch(downloads[0]["href"])
        assert status == 200
        assert_graded_notebook(body, downloads[0]["href"])

        colab, binder = expected_launch_urls(name)
        raw = [link["raw"] for link in links]
        assert colab in raw, f"no Colab link {colab}: {raw}"
        assert binder in raw, f"no Binder link {binder}: {raw}"
        assert {"Open in Colab", "Launch on Binder"} <= {link["text"].strip() for link in links}
        # the theme's launch menu is for the notebooks' pages only (here it would open the .md)
        assert page.locator(".dropdown-launch-buttons").count() == 0

        box.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / f"exercise-section-{name}.png"))
        assert not watch.problems, "\n".join(watch.problems)
    finally:
        watch.close()


def test_exercises_page_lists_every_notebook(browser, server):
    watch = PageWatch(browser, server)
    try:
        page = watch.open("book/exercises.html")
        links = page.evaluate("Array.from(document.querySelectorAll('main .exercise-summary a[href]'))"
                              ".map(a => ({href: a.href, cls: a.className}))")
        for name in NOTEBOOKS:
            assert f"{server}/notebooks/{name}/{name}.html" in [a["href"] for a in links], name
            served = [a["href"] for a in links if "download" in a["cls"].split() and a["href"].endswith(f"/{name}.ipynb")]
            assert served, f"no download of {name}.ipynb"
            status, body = fetch(served[0])
            assert status == 200
            assert_graded_notebook(body, served[0])
        repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
        assert page.evaluate("u => document.querySelectorAll(`main a[href='${u}']`).length", repo) >= 1, \
            "the page does not link the repository of _config.yml"
        assert not watch.problems, "\n".join(watch.problems)
    finally:
        watch.close()
