"""The pages of :mod:`attnlib.grading.class_report`: one HTML file each, self-contained.

Inline CSS, figures drawn with matplotlib's Agg renderer and embedded as PNG ``data:`` URIs
(at most 7.5 inches wide at 100 dpi, so that they are shown at their natural size in the
page's column, each with alt text that states its numbers), no script and no resource from
anywhere else; the only addresses are links (``<a href>``) to the book's sections and, on
the course page, to each assignment's page beside it. Every string that comes from a
learner or from a results file is HTML-escaped. The tables sit in wrappers that scroll
sideways, so that the page itself fits a phone's width as well as a desktop's.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Iterable
from urllib.parse import quote, urlparse

__all__ = ["assignment_page", "course_page"]

#: Figures: width in inches, dots per inch (7.5 in at 100 dpi is 750 px, shown at 750 px).
FIG_WIDTH, FIG_DPI = 7.5, 100

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: #1f2328; overflow-wrap: anywhere;
       font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 1rem 1.25rem 3rem; }
h1 { font-size: 1.7rem; line-height: 1.25; margin: .5rem 0 .25rem; }
h2 { font-size: 1.3rem; margin: 2rem 0 .5rem; padding-bottom: .2rem; border-bottom: 1px solid #d0d7de; }
p { margin: .4rem 0; max-width: 75ch; }
.summary { font-size: 1.08rem; }
.meta { color: #57606a; font-size: .9rem; }
.notice { background: #fff8c5; border-left: 4px solid #9a6700; padding: .5rem .8rem; margin: .8rem 0; }
figure { margin: 1rem 0; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { color: #57606a; font-size: .9rem; margin-top: .3rem; }
.scroll { overflow-x: auto; max-width: 100%; margin: .5rem 0 1rem; }
table { border-collapse: collapse; font-size: .93rem; overflow-wrap: normal; }
caption { text-align: left; color: #57606a; font-size: .9rem; padding: .2rem 0; }
th, td { text-align: left; vertical-align: top; padding: .35rem .65rem; border-bottom: 1px solid #d0d7de; }
thead th { border-bottom: 2px solid #8c959f; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.wide { min-width: 18rem; max-width: 36rem; }
td.text { min-width: 11rem; max-width: 18rem; }
td.who { min-width: 9rem; max-width: 20rem; overflow-wrap: anywhere; }
.read { display: inline-block; }
td.name { white-space: nowrap; }
td.learner { min-width: 10rem; max-width: 16rem; overflow-wrap: anywhere; }
code { font: .88em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
a { color: #0550ae; }
ul.plain { margin: 0; padding-left: 1.1rem; }
.bar { display: inline-block; height: .7rem; background: #0969da; vertical-align: middle; margin-right: .3rem; }
.muted { color: #57606a; }
@media (max-width: 600px) { main { padding: .75rem; } h1 { font-size: 1.35rem; } table { font-size: .86rem; } }
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _n(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    x = float(x)
    return str(int(x)) if x.is_integer() else f"{x:.{digits}f}".rstrip("0").rstrip(".")


def _pct(rate: float | None) -> str:
    return "–" if rate is None else f"{100 * rate:.0f} %"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _link(url: str | None, text: str) -> str:
    """A link to an http(s) address (escaped), else the text alone."""
    if not url or urlparse(url).scheme not in ("http", "https"):
        return _e(text)
    return f'<a href="{_e(url)}">{_e(text)}</a>'


def _section_label(url: str) -> str:
    """``.../book/03_scaling.html#the-code`` -> ``03_scaling § the code``."""
    parsed = urlparse(url)
    page = parsed.path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".html") or url
    return f"{page} § {parsed.fragment.replace('-', ' ')}" if parsed.fragment else page


def _table(caption: str, head: list[tuple[str, str]], rows: Iterable[list[str]]) -> str:
    """A table in a sideways-scrolling wrapper; ``head`` is (label, css class) per column,
    ``rows`` hold cell HTML (already escaped)."""
    ths = "".join(f'<th scope="col" class="{c}">{_e(h)}</th>' for h, c in head)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{cell}</td>' for (_, c), cell in zip(head, row)) + "</tr>"
                   for row in rows)
    # a region that may scroll: focusable, so that it scrolls from the keyboard too
    return (f'<div class="scroll" tabindex="0" role="region" aria-label="{_e(caption)}"><table><caption>{_e(caption)}</caption><thead><tr>{ths}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<link rel="icon" href="data:,">\n'  # no request for /favicon.ico
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
            f"</body>\n</html>\n")


# --------------------------------------------------------------------------- figures


def _tex_safe(label: str) -> str:
    return label.replace("$", r"\$")


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(png: str, alt: str, caption: str, width_px: int, height_px: int) -> str:
    return (f'<figure><img src="data:image/png;base64,{png}" alt="{_e(alt)}" width="{width_px}" '
            f'height="{height_px}"><figcaption>{_e(caption)}</figcaption></figure>')


def _new_figure(height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIG_WIDTH, height), dpi=FIG_DPI, layout="constrained")
    return fig, fig.add_subplot()


def _style(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=10)


def score_histogram(scores: list[float], max_score: float) -> tuple[str, str, int, int]:
    """A histogram of the scores: (base64 PNG, alt text, width px, height px). Bins of one
    point up to 30 points, else 20 bins."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    height = 2.6
    fig, ax = _new_figure(height)
    top = max(max_score, max(scores, default=0), 1)
    if top <= 30:
        edges = np.arange(-0.5, np.floor(top) + 1.5, 1.0)
    else:
        edges = np.linspace(0, top, 21)
    ax.hist(scores, bins=edges, color="#0969da", edgecolor="white")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel(f"score (out of {_n(max_score)})", fontsize=11)
    ax.set_ylabel("learners", fontsize=11)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    _style(ax)
    values: dict[str, int] = {}
    for s in sorted(scores):
        values[_n(s)] = values.get(_n(s), 0) + 1
    listed = "; ".join(f"{_plural(c, 'learner')} scored {v}" for v, c in values.items())
    alt = (f"Histogram of the scores of {_plural(len(scores), 'learner')} out of {_n(max_score)} points"
           + (f": {listed}." if len(values) <= 12 else f", from {_n(min(scores))} to {_n(max(scores))}."))
    return _png(fig), alt, int(FIG_WIDTH * FIG_DPI), int(height * FIG_DPI)


def pass_rate_chart(labels: list[str], rates: list[float], counts: list[str]) -> tuple[str, str, int, int]:
    """Horizontal bars of each item's pass rate, in %: (base64 PNG, alt text, width, height)."""
    height = round(1.0 + 0.42 * len(labels), 2)
    fig, ax = _new_figure(height)
    y = list(range(len(labels)))
    ax.barh(y, [100 * r for r in rates], color="#1a7f37", height=0.6)
    ax.set_yticks(y, [_tex_safe(s if len(s) <= 40 else s[:39] + "…") for s in labels])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("learners who passed (%)", fontsize=11)
    for yi, r, c in zip(y, rates, counts):
        ax.text(min(100 * r + 1.5, 88), yi, f"{100 * r:.0f} % ({c})", va="center", fontsize=9)
    _style(ax)
    alt = "Pass rate per item: " + "; ".join(f"{lab} {100 * r:.0f} % ({c})"
                                             for lab, r, c in zip(labels, rates, counts)) + "."
    return _png(fig), alt, int(FIG_WIDTH * FIG_DPI), int(height * FIG_DPI)


def course_chart(labels: list[str], fractions: list[float]) -> tuple[str, str, int, int]:
    """Horizontal bars of each assignment's mean score in % of its maximum."""
    height = round(1.0 + 0.42 * len(labels), 2)
    fig, ax = _new_figure(height)
    y = list(range(len(labels)))
    ax.barh(y, [100 * f for f in fractions], color="#0969da", height=0.6)
    ax.set_yticks(y, [_tex_safe(s) for s in labels])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("mean score (% of the maximum)", fontsize=11)
    for yi, f in zip(y, fractions):
        ax.text(min(100 * f + 1.5, 92), yi, f"{100 * f:.0f} %", va="center", fontsize=9)
    _style(ax)
    alt = "Mean score per assignment, in % of its maximum: " + "; ".join(
        f"{lab} {100 * f:.0f} %" for lab, f in zip(labels, fractions)) + "."
    return _png(fig), alt, int(FIG_WIDTH * FIG_DPI), int(height * FIG_DPI)


# --------------------------------------------------------------------------- one assignment


def _mistake_label(m: dict) -> str:
    return f"{m['exercise']}: {m['mistake']}" if m.get("exercise") else m["mistake"]


def _names(names: list[str], limit: int = 30) -> str:
    shown = ", ".join(_e(n) for n in names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


def _notices(r: dict) -> str:
    out = []
    if r["not_graded"]:
        why = f"the run was stopped by {r['stopped_by']}" if r["stopped_by"] else "the run did not finish"
        out.append(f"{_plural(len(r['not_graded']), 'learner')} not graded yet ({_e(why)}; run "
                   f"<code>attnlib grade-class {_e(r['assignment'])}</code> again): {_names(r['not_graded'])}.")
    if r["malformed"]:
        n = len(r["malformed"])
        out.append(f"{n} {'entry' if n == 1 else 'entries'} of the results file cannot be read and "
                   f"{'is' if n == 1 else 'are'} left out of the figures and tables: see the end of this page.")
    return "".join(f'<p class="notice">{x}</p>' for x in out)


def _summary_line(r: dict) -> str:
    s = r["scores"]
    parts = [f"{_plural(r['students'], 'learner')}, {r['graded']} graded"]
    if r["graded"]:
        parts.append(f"mean score {_n(s['mean'])} of {_n(s['max_score'])}, median {_n(s['median'])}, "
                     f"middle half {_n(s['q1'])} to {_n(s['q3'])}")
    if r["mistakes"]:
        m = r["mistakes"][0]
        parts.append(f"the most common named mistake: {_mistake_label(m)} "
                     f"({_plural(m['learners'], 'learner')})")
    elif r["graded"]:
        parts.append("no named mistake")
    return "; ".join(parts) + "."


def assignment_page(r: dict) -> str:
    """The page of :func:`attnlib.grading.class_report.assignment_report`'s ``r``."""
    a = r["assignment"]
    s = r["scores"]
    out = [f"<h1>What the class gets wrong: {_e(a)}</h1>",
           f'<p class="summary">{_e(_summary_line(r))}</p>',
           f'<p class="meta">Made {_e(r["generated_at"])} from <code>{_e(r["source"])}</code> '
           "(written by <code>attnlib grade-class</code>).</p>", _notices(r)]

    out.append("<h2>Scores</h2>")
    if r["graded"]:
        png, alt, w, h = score_histogram([float(x["score"]) for x in s["students"]], float(s["max_score"]))
        out.append(_figure(png, alt, f"Scores of the {_plural(r['graded'], 'learner')} graded.", w, h))
        stats = (("out of", "max_score"), ("mean", "mean"), ("lowest", "min"), ("first quartile", "q1"),
                 ("median", "median"), ("third quartile", "q3"), ("highest", "max"))
        out.append(_table("The distribution of scores (quartiles interpolated linearly)",
                          [(label, "num") for label, _ in stats], [[_n(s[key]) for _, key in stats]]))
    else:
        out.append("<p>No learner has been graded yet.</p>")

    out.append("<h2>Items</h2>")
    items = r["items"]
    rated = [i for i in items if i["pass_rate"] is not None]
    if rated:
        png, alt, w, h = pass_rate_chart([i["item"] for i in rated], [i["pass_rate"] for i in rated],
                                         [f"{i['passed']} of {i['learners']}" for i in rated])
        out.append(_figure(png, alt, "Share of the learners who passed each graded item.", w, h))
        out.append(_table(
            "Each graded item: attempted means the learner's code ran and was more than the stub",
            [("item", "name"), ("points", "num"), ("learners", "num"), ("attempted", "num"), ("passed", "num"),
             ("pass rate", "num"), ("of those who attempted", "num")],
            [[f"<code>{_e(i['item'])}</code>", _n(i["max_points"]), str(i["learners"]), str(i["attempted"]),
              str(i["passed"]), _pct(i["pass_rate"]), _pct(i["pass_rate_of_attempted"])] for i in items]))
    else:
        out.append("<p>No item was graded.</p>")

    out.append("<h2>Named mistakes, most common first</h2>")
    if r["mistakes"]:
        out.append("<p>Each is a catalogued wrong implementation that the grader recognised in a "
                   "learner's output; the link opens the section of the book that teaches it.</p>")
        rows = []
        for n, m in enumerate(r["mistakes"], 1):
            explanation = _e(_capital(m["explanation"])) if m["explanation"] else \
                '<span class="muted">not in the grader\'s catalogue (results of another version?)</span>'
            if m["section_url"]:
                explanation += f' <span class="read">Read: {_link(m["section_url"], _section_label(m["section_url"]))}</span>'
            rows.append([str(n), f"<code>{_e(m['exercise'] or '?')}</code>", _e(m["mistake"]),
                         str(m["learners"]), _names(m["who"]), explanation])
        out.append(_table("Named mistakes, ranked by the number of learners who made them",
                          [("#", "num"), ("exercise", "name"), ("mistake", "text"), ("learners", "num"),
                           ("who", "who"), ("explanation, and where the book teaches it", "wide")],
                          rows))
    else:
        out.append("<p>The grader recognised no catalogued mistake in this class's work.</p>")

    out.append("<h2>Kinds of failure</h2>")
    if r["failure_kinds"]:
        out.append(_table("Failed items by kind of failure (each learner's items counted)",
                          [("kind", "name"), ("failed items", "num"), ("learners", "num"), ("who", "who")],
                          [[_e(k["kind"]), str(k["items"]), str(len(k["learners"])), _names(k["learners"])]
                           for k in r["failure_kinds"]]))
    else:
        out.append("<p>No item failed.</p>")
    if r["notebooks_not_graded"]:
        out.append(_table("Notebooks that could not be graded",
                          [("notebooks", "name"), ("count", "num"), ("learners", "who")],
                          [[_e(x["status"]), str(x["notebooks"]), _names(x["learners"])]
                           for x in r["notebooks_not_graded"]]))

    out.append("<h2>Learners</h2>")
    if r["learners"]:
        rows = []
        for p in r["learners"]:
            mistakes = "".join(f"<li>{_e(_mistake_label(m))} <span class=\"muted\">({_e(m['item'])})</span></li>"
                               for m in p["mistakes"])
            other = [f"{_e(f['item'])}: {_e(f['kind'])}" for f in p["failures"]] + [_e(x) for x in p["problems"]]
            rows.append([_e(p["student"]), f"{_n(p['score'])} / {_n(p['max_score'])}",
                         f"{p['items_passed']} of {p['items']}",
                         f'<ul class="plain">{mistakes}</ul>' if mistakes else "–",
                         "<br>".join(other) or "–"])
        out.append(_table("Each learner's score, items passed, named mistakes and other failures",
                          [("learner", "learner"), ("score", "num"), ("items passed", "num"),
                           ("named mistakes", "wide"), ("other failures and notes", "wide")], rows))
    else:
        out.append("<p>No learner's result could be read.</p>")

    if r["malformed"]:
        out.append("<h2>Entries that cannot be read</h2>")
        out.append(_table(f"Entries of {r['source']} left out of this page",
                          [("entry", "num"), ("learner", "learner"), ("problem", "wide")],
                          [[str(x["entry"]), _e(x["student"] or "?"), _e(x["problem"])] for x in r["malformed"]]))
    return _page(f"What the class gets wrong: {a}", "\n".join(x for x in out if x))


# --------------------------------------------------------------------------- the course


def course_page(c: dict) -> str:
    """The page of :func:`attnlib.grading.class_report.course_report`'s ``c``."""
    chapters = c["assignments"]
    out = ["<h1>What the class gets wrong: the course</h1>",
           f'<p class="summary">{_e(_plural(len(chapters), "assignment"))} graded so far, '
           f'{_e(_plural(len(c["learners"]), "learner"))}.</p>',
           f'<p class="meta">Made {_e(c["generated_at"])} from the class summaries in '
           f'<code>{_e(c["out_dir"])}</code>.</p>']
    if c["skipped"]:
        out.append('<p class="notice">Left out: ' + "; ".join(f"<code>{_e(s['file'])}</code> ({_e(s['why'])})"
                                                             for s in c["skipped"]) + ".</p>")
    out.append("<h2>Chapters</h2>")
    shown = [ch for ch in chapters if ch["mean_fraction"] is not None]
    if shown:
        png, alt, w, h = course_chart([ch["assignment"] for ch in shown], [ch["mean_fraction"] for ch in shown])
        out.append(_figure(png, alt, "Mean score of each assignment, in % of its maximum.", w, h))
    rows = []
    for ch in chapters:
        top = "".join(f"<li>{_link(m['section_url'], _mistake_label(m)) if m['section_url'] else _e(_mistake_label(m))}"
                      f" <span class=\"muted\">({_e(_plural(m['learners'], 'learner'))})</span></li>"
                      for m in ch["top_mistakes"])
        rows.append([f'<a href="{_e(quote(ch["report"]))}">{_e(ch["assignment"])}</a>',
                     f"{ch['graded']} of {ch['students']}",
                     f"{_n(ch['mean'])} / {_n(ch['max_score'])}" if ch["mean"] is not None else "–",
                     _pct(ch["pass_rate"]), f'<ul class="plain">{top}</ul>' if top else "–"])
    out.append(_table("Each assignment: learners graded, mean score, items passed, and its most common mistakes",
                      [("assignment (its page)", "name"), ("graded", "num"), ("mean score", "num"),
                       ("pass rate", "num"), ("top mistakes", "wide")], rows))

    out.append("<h2>Learners</h2>")
    head = [("learner", "learner")] + [(ch["assignment"], "num") for ch in chapters] + \
        [("total", "num"), ("named mistakes", "wide")]
    rows = []
    for p in c["learners"]:
        mistakes = "".join(f"<li>{_e(m['assignment'])}: {_e(_mistake_label(m))}</li>" for m in p["mistakes"])
        rows.append([_e(p["student"])] + [_n(p["scores"][ch["assignment"]]) for ch in chapters]
                    + [f"{_n(p['total'])} / {_n(p['max_total'])}",
                       f'<ul class="plain">{mistakes}</ul>' if mistakes else "–"])
    out.append(_table("Each learner's score per assignment (– where they have none), total and named mistakes",
                      head, rows))
    return _page("What the class gets wrong: the course", "\n".join(out))
