"""The one figure style of the book: colour-blind-safe colours (Okabe & Ito), one colour per method everywhere.

"With BN" is always the same blue, "plain" always the same orange, in every chapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import matplotlib.ticker
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["COLORS", "LABELS", "color", "label", "apply_style", "subplots", "band", "log_ticks", "finish"]

# Okabe & Ito (2008) palette.
_BLUE, _ORANGE, _GREEN, _VERMILLION = "#0072B2", "#E69F00", "#009E73", "#D55E00"
_PURPLE, _SKY, _YELLOW, _BLACK = "#CC79A7", "#56B4E9", "#F0E442", "#000000"

COLORS: dict[str, str] = {
    "bn": _BLUE,
    "plain": _ORANGE,
    "none": _ORANGE,
    "brn": _GREEN,
    "ln": _PURPLE,
    "gn": _SKY,
    "noisy_bn": _VERMILLION,
    "plain_noise": _BLACK,
    "l1": _GREEN,
    "l2": _SKY,
    "linf": _PURPLE,
    "sync": _GREEN,
    "ghost": _PURPLE,
    "bn_moving": _VERMILLION,
    "bn_frozen": _BLACK,
    "bn_detached": _VERMILLION,
    "autograd_composed": _BLACK,
    "reference": _BLACK,
    "other": _YELLOW,
}

LABELS: dict[str, str] = {
    "bn": "with BN",
    "plain": "without BN",
    "none": "without BN",
    "brn": "Batch Renorm",
    "ln": "LayerNorm",
    "gn": "GroupNorm",
    "noisy_bn": "noisy BN",
    "plain_noise": "noise without BN",
    "l1": "ℓ1 batch norm",
    "l2": "ℓ2 batch norm",
    "linf": "ℓ∞ batch norm",
    "sync": "SyncBN",
    "ghost": "Ghost BN",
    "bn_moving": "BN with moving averages in training",
    "bn_frozen": "BN statistics frozen",
    "bn_detached": "BN, statistics detached in backward",
    "autograd_composed": "autograd over composed ops",
    "reference": "reference",
}


def color(key: str) -> str:
    """The book-wide colour of a method (`COLORS`); unknown keys get black, so a typo is visible, not random."""
    return COLORS.get(key, _BLACK)


def label(key: str) -> str:
    """The book-wide legend label of a method (`LABELS`), or the key itself."""
    return LABELS.get(key, key)


def apply_style() -> None:
    """Set the book's matplotlib defaults: small, legible figures with light grids and no top/right spines."""
    matplotlib.rcParams.update(
        {
            "figure.figsize": (6.4, 3.6),
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "legend.frameon": False,
            "lines.linewidth": 1.8,
            "font.size": 10,
        }
    )


def subplots(ncols: int = 1, nrows: int = 1, width: float = 3.4, height: float = 3.0, **kwargs):
    """``plt.subplots`` in the book's style, sized per panel; returns (fig, axes) with axes always an array."""
    apply_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs)
    return fig, axes.ravel() if nrows == 1 or ncols == 1 else axes


def band(ax, x: Sequence[float], values: np.ndarray, key: str, lo: float = 0.0, hi: float = 100.0, **kwargs) -> None:
    """Plot the median of `values` (shape (runs, len(x))) as a line and the [lo, hi] percentile range as a band."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(x):
        raise ValueError(f"values must have shape (runs, {len(x)}), got {values.shape}")
    c = color(key)
    ax.plot(x, np.median(values, axis=0), color=c, label=kwargs.pop("label", label(key)), **kwargs)
    ax.fill_between(x, np.percentile(values, lo, axis=0), np.percentile(values, hi, axis=0), color=c, alpha=0.25, lw=0)


def log_ticks(ax, which: str, ticks: Sequence[float]) -> None:
    """Label a logarithmic axis at `ticks` only, in plain numbers, and leave its minor ticks unlabelled.

    On a log axis that spans less than a decade or two, matplotlib labels minor ticks too ("2x10^0", "3x10^0", ...),
    and the labels run into each other. which: ``"x"`` or ``"y"``.

    >>> fig, (ax,) = subplots()
    >>> ax.set_xscale("log"); log_ticks(ax, "x", [0.3, 1, 3])
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['0.3', '1', '3']
    """
    if which not in ("x", "y"):
        raise ValueError(f"which must be 'x' or 'y', got {which!r}")
    ticks = [float(t) for t in ticks]
    if not ticks or min(ticks) <= 0:
        raise ValueError(f"ticks must be a non-empty sequence of positive numbers for a log axis, got {ticks!r}")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    axis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{t:g}" for t in ticks]))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def finish(fig, axes=None) -> None:
    """Tighten the layout and check that every axis carries labels: a figure without them is a defect."""
    for ax in np.ravel(axes if axes is not None else fig.axes):
        if not ax.get_xlabel() or not ax.get_ylabel():
            raise ValueError(f"every axis needs an x and y label; axis {ax.get_title()!r} is missing one")
    fig.tight_layout()
