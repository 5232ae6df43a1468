"""One figure style for every plot: readable at a paper's single-column width (3.3 in)."""

from __future__ import annotations

import matplotlib as mpl

COLUMN_WIDTH = 3.3  # inches, single column of a two-column paper
FULL_WIDTH = 6.9  # inches, both columns
ASPECT = 0.72  # height / width of one panel

RC: dict[str, object] = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"],
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "figure.titlesize": 8,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.0,
    "lines.markersize": 3.5,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "xtick.direction": "out",
    "ytick.direction": "out",
    "errorbar.capsize": 1.5,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,  # TrueType in PDFs, so journals' checks accept the fonts
    "ps.fonttype": 42,
}

# Colour roles, so every figure means the same thing by the same colour.
DATA = "#222222"
FIT = "#c0392b"
BAND = "#e6a39a"
OPTIMUM = "#1f5fa8"
CMAP = "viridis"


def use() -> None:
    """Applies the house rc settings to matplotlib globally."""
    mpl.rcParams.update(RC)


def context():
    """A context manager applying the style only inside a ``with`` block."""
    return mpl.rc_context(RC)
