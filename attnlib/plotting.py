"""One figure style for the whole course, and the attention heat map every chapter draws.

Not part of the graded API: chapters and the exercises' explore cells import it as
``from attnlib import plotting``. Needs matplotlib (installed with the book's requirements).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def use_course_style() -> None:
    """Set matplotlib defaults: readable on a laptop screen, same look on every page.

    The book's text column shows a figure at 672 px; at 110 dpi the default 6.4-inch
    figure is about that wide, so a 10-point label is about 15 px on screen. Keep figures
    at most 7.5 inches wide (the site test fails an image shown at under 1/1.3 of its
    size) and no text under 9 points.
    """
    import matplotlib as mpl
    from cycler import cycler

    mpl.rcParams.update({
        "figure.figsize": (6.4, 4.0),
        "figure.dpi": 110,
        "savefig.dpi": 110,
        "figure.constrained_layout.use": True,
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.fontsize": 10,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.prop_cycle": cycler(color=COLORS),
        "image.cmap": "viridis",
        "lines.linewidth": 1.8,
        "lines.markersize": 5,
    })


def attention_heatmap(
    weights: torch.Tensor,
    ax: Any = None,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    title: str | None = None,
    annotate: bool = False,
    colorbar: bool = True,
    vmax: float | None = None,
) -> Any:
    """Draw an (L, S) matrix of attention weights: rows are queries, columns keys.

    Args:
        weights: ``(L, S)`` tensor (detached and moved to the CPU here).
        ax: a matplotlib Axes; a new figure if ``None``.
        query_labels, key_labels: tick labels (e.g. tokens); positions if ``None``.
        title: axes title.
        annotate: print each weight in its cell (for small matrices).
        colorbar: add a colour bar labelled "attention weight".
        vmax: top of the colour scale; defaults to the largest weight.

    Returns:
        The Axes.
    """
    import matplotlib.pyplot as plt

    w = weights.detach().to("cpu", torch.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must be (L, S), got shape {tuple(w.shape)}")
    if ax is None:
        size = (min(7.2, 1.2 + 0.45 * w.shape[1]), min(6.0, 1.0 + 0.4 * w.shape[0]))
        _, ax = plt.subplots(figsize=size)  # never wider than the text column
    image = ax.imshow(w.numpy(), vmin=0.0, vmax=vmax if vmax is not None else max(w.max().item(), 1e-12),
                      cmap="viridis", aspect="auto", interpolation="nearest")
    ax.grid(False)
    ax.set_xlabel("key position" if key_labels is None else "key")
    ax.set_ylabel("query position" if query_labels is None else "query")
    if key_labels is not None:
        ax.set_xticks(range(len(key_labels)), key_labels, rotation=45, ha="right")
    if query_labels is not None:
        ax.set_yticks(range(len(query_labels)), query_labels)
    if annotate:
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                value = w[i, j].item()
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9,
                        color="black" if value > 0.6 * w.max().item() else "white")
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="attention weight", fraction=0.046, pad=0.04)
    return ax
