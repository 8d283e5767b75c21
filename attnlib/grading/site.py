"""The course site's address: where the book lives, read from ``_config.yml`` (or
:data:`DEFAULT_SITE_URL`), and the absolute address of one of its sections (:func:`section_url`)
for the grader's "See ..." messages. Standard library only."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse


#: The course site when ``_config.yml`` cannot be read: attnlib installed from a wheel, or the
#: grader's sandboxed child, which sees the attnlib package but not the course folder. The
#: one place this address is typed; ``tests/test_grading_core.py`` checks that it is what
#: ``_config.yml`` gives, so that the child's messages and the parent's agree.
DEFAULT_SITE_URL = "https://attention-from-first-principles.github.io/course/"
#: Where the chapters' pages sit on the site (``_toc.yml`` lists them as ``book/NN_topic``).
BOOK_DIR = "book/"


def _config_value(text: str, block: str, key: str) -> str | None:
    """``block.key`` of a YAML file's text, for the simple ``block:`` / indented ``key: value``
    layout of ``_config.yml`` (standard library only: PyYAML is not a dependency of attnlib)."""
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            current = line.split(":", 1)[0].strip()
            continue
        if current != block:
            continue
        name, sep, value = line.strip().partition(":")
        if sep and name == key:
            value = value.split(" #", 1)[0].strip().strip("\"'")
            return value or None
    return None


def _pages_url(repository: str | None) -> str | None:
    """The GitHub Pages address of ``https://github.com/<owner>/<name>``, else ``None``."""
    parsed = urlparse((repository or "").strip())
    parts = [p for p in parsed.path.split("/") if p]
    if parsed.scheme != "https" or parsed.netloc != "github.com" or len(parts) != 2:
        return None
    owner, name = parts[0].lower(), parts[1].removesuffix(".git")
    host = f"https://{owner}.github.io/"
    return host if name.lower() == f"{owner}.github.io" else f"{host}{name}/"


def site_url(config: Path | None = None) -> str:
    """The course site's address, ending with ``/``: ``html.baseurl`` of ``_config.yml`` if it
    is set, else the GitHub Pages site of ``repository.url``; :data:`DEFAULT_SITE_URL` when
    the file is absent or unreadable (``config``: the file; default the course's own, next to
    the ``attnlib`` package in a checkout)."""
    if config is None:
        root = Path(__file__).resolve().parents[2]
        if not (root / "book").is_dir():  # attnlib installed, not a checkout of the course
            return DEFAULT_SITE_URL
        config = root / "_config.yml"
    try:
        text = config.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return DEFAULT_SITE_URL
    base = _config_value(text, "html", "baseurl")
    if base and urlparse(base).scheme in ("http", "https"):
        return base.rstrip("/") + "/"
    return _pages_url(_config_value(text, "repository", "url")) or DEFAULT_SITE_URL


#: The course site, read once when attnlib.grading is imported (before any learner code).
SITE_URL = site_url()


def section_url(section: str) -> str:
    """The absolute address of a section of the book, ``"03_scaling.html#the-code"`` ->
    ``SITE_URL + "book/03_scaling.html#the-code"``; an address that is already absolute is
    returned as it is. :attr:`Exercise.section` and :attr:`Mistake.section` stay relative
    (the tests check them against the book's headings); messages use this."""
    if not section or "://" in section:
        return section
    return f"{SITE_URL}{BOOK_DIR}{section.lstrip('/')}"
