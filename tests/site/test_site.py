"""The built website in a real browser: Debian's headless Chromium, driven by Playwright.

Serves ``_build/html`` on 127.0.0.1 and visits every page of the table of contents:
no console errors, no failed or off-origin requests, MathJax rendered (no raw ``$$``),
every image loaded, search finds "rotary", and the navigation reaches every chapter.
A full-page screenshot of every page goes to ``_build/screenshots/`` (CI keeps it).

Run after ``make book`` (``make test`` does both).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import urlparse

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
