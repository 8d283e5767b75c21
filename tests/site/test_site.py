"""The built website in a real browser: Debian's headless Chromium, driven by Playwright.

Serves ``_build/html`` on 127.0.0.1 and visits every page of the table of contents:
no console errors, no failed or off-origin requests, MathJax rendered (no raw ``$$``),
every image loaded, search finds "rotary", and the navigation reaches every chapter.
The exercises: every released notebook is a page showing its stubs, unexecuted, and every
chapter links to its notebook's page, a download of the ``.ipynb`` that the site serves, and
Colab and Binder, with URLs built from ``_config.yml``'s repository (links only: the
off-origin request rule still holds, since no test follows them).
A full-page screenshot of every page goes to ``_build/screenshots/`` (CI keeps it).

Run after ``make book`` (``make test`` does both).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path
from urllib.parse import quote, urljoin, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


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
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output readable
        pass


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session", autouse=True)
def screenshots_dir():
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    return SHOTS


class PageWatch:
    """Opens a page and records every console error, page error and failed or foreign request."""

    def __init__(self, browser, origin: str):
        self.origin = origin
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
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
        page.screenshot(path=str(SHOTS / (path.replace("/", "__").replace(".html", ".png"))), full_page=True)
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
    assert len(NOTEBOOKS) == len(CHAPTERS) == 11, (NOTEBOOKS, CHAPTERS)
    assert NOTEBOOKS == CHAPTERS
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
