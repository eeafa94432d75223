"""Figures for run directories (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

from mgr.errors import UserError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def figure(n_panels: int = 1):
    """A row of ``n_panels`` axes in the house style (size, dpi, light grid); returns (fig, axes list)."""
    fig, axes = plt.subplots(1, n_panels, figsize=(6.4 * n_panels, 4.0 if n_panels == 1 else 4.8), dpi=110,
                             squeeze=False)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    return fig, list(axes[0])


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:  # a full disk (ENOSPC) or a removed directory: the run's summary is still written
        raise UserError(f"cannot write plot {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return Path(path)


def plot_curves(path: Path, curves: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
                ylabel: str, title: str = "", logx: bool = False, logy: bool = False,
                markers: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> Path:
    """One line per curve; ``bands`` shades (low, high) around the curve of the same name (e.g. min-max over
    seeds); ``markers`` adds point series (e.g. eval losses) on the same axes."""
    fig, (ax,) = figure()
    for name, (x, y) in curves.items():
        line, = ax.plot(x, y, label=name, linewidth=1.2)
        if bands and name in bands:
            ax.fill_between(x, *bands[name], alpha=0.2, color=line.get_color())
    for name, (x, y) in (markers or {}).items():
        ax.plot(x, y, "o", label=name, markersize=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if curves or markers:
        ax.legend()
    return save(fig, path)


def plot_points(path: Path, groups: dict[str, list[tuple[str, float, float, tuple, tuple]]], *, xlabel: str,
                ylabel: str, title: str = "") -> Path:
    """Labelled points with 95% CI error bars, one colour per group: (label, x, y, (x_lo, x_hi), (y_lo, y_hi))."""
    fig, (ax,) = figure()
    for group, points in groups.items():
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        xerr = [[p[1] - p[3][0] for p in points], [p[3][1] - p[1] for p in points]]
        yerr = [[p[2] - p[4][0] for p in points], [p[4][1] - p[2] for p in points]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=group, markersize=4)
        for label, x, y, *_ in points:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if groups:
        ax.legend()
    return save(fig, path)
