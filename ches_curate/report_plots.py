"""The report's plots: matplotlib figures rendered to PNG `data:` URIs, so the HTML needs no other file.

Figures are built with `matplotlib.figure.Figure` directly (the Agg canvas, no pyplot
state), so plotting works headless and from several threads. Every function takes
plain arrays and returns one URI; callers decide whether there is enough data to plot.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import SymmetricalLogLocator

KEPT_COLOR = "#4c72b0"
REMOVED_COLOR = "#dd8452"
CUT_COLOR = "#c44e52"
ARM_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
BINS = 40
DPI = 100
SYMLOG_SPREAD = 100.0
"""A scatter axis turns symmetric-log when its largest |value| exceeds this many times the 90th percentile."""
OUTLIER_IQR = 3.0
"""Histograms draw values within this many interquartile ranges of the quartiles (Tukey's far-out fences)."""


def png_data_uri(fig: Figure) -> str:
    """`fig` as a base64 PNG `data:` URI (no timestamp in the PNG, so equal figures give equal bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(*arrays: Sequence[float]) -> np.ndarray:
    """A mask of the positions where every array is finite."""
    mask = np.ones(len(arrays[0]), dtype=bool)
    for values in arrays:
        mask &= np.isfinite(np.asarray(values, dtype=np.float64))
    return mask


@dataclass(frozen=True)
class PlotRange:
    """The range a histogram draws and how many values lie outside it (counted, not drawn)."""

    low: float
    high: float
    n_below: int
    n_above: int


def plot_range(values: np.ndarray, cut: float | None = None) -> PlotRange:
    """The values within Tukey's far-out fences (quartiles -/+ OUTLIER_IQR x IQR), widened to show `cut`.

    One CHES of -4.3e7 among values of order 1e2 would otherwise squash every other pair
    into one bar; beyond the fences values are only counted.
    """
    q1, q3 = np.percentile(values, [25, 75])
    fenced = values[(values >= q1 - OUTLIER_IQR * (q3 - q1)) & (values <= q3 + OUTLIER_IQR * (q3 - q1))]
    low, high = fenced.min(), fenced.max()
    if cut is not None and np.isfinite(cut):
        low, high = min(low, cut), max(high, cut)
    return PlotRange(float(low), float(high), int((values < low).sum()), int((values > high).sum()))


def score_histogram(values: Sequence[float], label: str, kept: Sequence[bool] | None = None,
                    cut: float | None = None, cut_label: str = "cut", note: str | None = None) -> str:
    """Histogram of one score; with `kept`, kept and removed pairs are stacked in two colours.

    `cut` draws the selection's threshold as a vertical line labelled `cut_label`; `note`
    (why there is no cut: the selection ranked by another score) is printed under the axis.
    Values beyond `plot_range`'s fences are not drawn but counted in the axis label; the
    legend sits outside the axes, so it never covers a bar.
    """
    values = np.asarray(values, dtype=np.float64)
    mask = _finite(values)
    shown = plot_range(values[mask], cut)
    inside = mask & (values >= shown.low) & (values <= shown.high)
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.subplots()
    bins = np.histogram_bin_edges(values[inside], bins=BINS, range=(shown.low, shown.high))
    if kept is None:
        ax.hist(values[inside], bins=bins, histtype="stepfilled", color=KEPT_COLOR, label="scored pairs")
    else:
        kept = np.asarray(kept, dtype=bool)
        ax.hist([values[inside & kept], values[inside & ~kept]], bins=bins, stacked=True, histtype="stepfilled",
                color=[KEPT_COLOR, REMOVED_COLOR], label=["kept", "removed"])
    if cut is not None:
        ax.axvline(cut, color=CUT_COLOR, linestyle="--", linewidth=1.5, label=cut_label)
    outside = []
    if shown.n_below:
        outside.append(f"{shown.n_below:,} below {shown.low:.3g} (min {values[mask].min():.3g})")
    if shown.n_above:
        outside.append(f"{shown.n_above:,} above {shown.high:.3g} (max {values[mask].max():.3g})")
    ax.set_xlabel(label + (f"\nnot drawn: {'; '.join(outside)}" if outside else "") + (f"\n{note}" if note else ""))
    ax.set_ylabel("pairs")
    _legend_above(ax)
    return png_data_uri(fig)


def ches_vs_response_length(response_tokens: Sequence[float], ches: Sequence[float],
                            kept: Sequence[bool] | None = None) -> str:
    """Scatter of CHES against the response length (|y+| + |y-| tokens).

    CHES sums hidden states over both responses, so it grows with their length. The y axis
    is linear unless `symlog_threshold` finds a few pairs far beyond the rest; then it is
    symmetric-log, which keeps both signs and those pairs readable next to the rest.
    """
    x = np.asarray(response_tokens, dtype=np.float64)
    y = np.asarray(ches, dtype=np.float64)
    mask = _finite(x, y)
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    groups = [(np.ones(len(x), dtype=bool), KEPT_COLOR, "scored pairs")] if kept is None else [
        (np.asarray(kept, dtype=bool), KEPT_COLOR, "kept"), (~np.asarray(kept, dtype=bool), REMOVED_COLOR, "removed")]
    for group, color, name in groups:
        ax.scatter(x[mask & group], y[mask & group], s=8, alpha=0.6, color=color, label=name)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("response tokens (chosen + rejected)")
    ax.set_ylabel("CHES" + _symlog_if_spread(ax, "y", y[mask]))
    _legend_above(ax)
    return png_data_uri(fig)


def symlog_threshold(values: np.ndarray) -> float | None:
    """The linear half-width of a symmetric log axis for `values`, or None when a linear axis shows them well.

    The half-width is the 90th percentile of |value|, so most points keep a linear scale and
    only the extremes (beyond SYMLOG_SPREAD times it) are compressed.
    """
    magnitude = np.abs(values[np.isfinite(values)])
    linear = float(np.percentile(magnitude, 90)) if len(magnitude) else 0.0
    return None if linear <= 0 or magnitude.max() <= SYMLOG_SPREAD * linear else linear


def _symlog_if_spread(ax, which: str, values: np.ndarray) -> str:
    """Put `ax`'s `which` ("x" or "y") axis on a symmetric log scale when `symlog_threshold` asks; returns the label suffix."""
    linear = symlog_threshold(values)
    if linear is None:
        return ""
    getattr(ax, f"set_{which}scale")("symlog", linthresh=linear, linscale=3)  # room for the linear bulk
    locator = SymmetricalLogLocator(base=10, linthresh=linear, subs=[1.0])
    locator.numticks = 6  # a tick per decade crowds the labels together near zero
    getattr(ax, f"{which}axis").set_major_locator(locator)
    return " (symmetric log)"


def _legend_above(ax, ncol: int = 3) -> None:
    """The legend in rows of `ncol` above the axes, where it cannot cover a bar or a point."""
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=ncol, fontsize="small", frameon=False)


def ln_ches_vs_edit_distance(edit_distance: Sequence[float], ln_ches: Sequence[float],
                             kept: Sequence[bool] | None = None) -> str:
    """Scatter of ln-CHES against the normalized edit distance of chosen vs rejected."""
    x = np.asarray(edit_distance, dtype=np.float64)
    y = np.asarray(ln_ches, dtype=np.float64)
    mask = _finite(x, y)
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    if kept is None:
        ax.scatter(x[mask], y[mask], s=8, alpha=0.6, color=KEPT_COLOR, label="scored pairs")
    else:
        kept = np.asarray(kept, dtype=bool)
        for group, color, name in ((kept, KEPT_COLOR, "kept"), (~kept, REMOVED_COLOR, "removed")):
            ax.scatter(x[mask & group], y[mask & group], s=8, alpha=0.6, color=color, label=name)
    ax.set_xlabel("edit distance (chosen vs rejected)")
    ax.set_ylabel("ln-CHES")
    ax.legend(loc="best", fontsize="small")
    return png_data_uri(fig)


@dataclass(frozen=True)
class SeedSpread:
    """A quantity at each of several x (arms, percentiles) over training seeds: its mean, min and max at each x
    (NaN where no seed has a value) and, per x, each seed's value."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    values: Sequence[Sequence[float]]

    def has_spread(self) -> bool:
        """Whether some x has more than one seed's value (else there is no spread to draw)."""
        return any(len(v) > 1 for v in self.values)


def _seed_points(ax, x: np.ndarray, spread: SeedSpread, color: str) -> None:
    """Each seed's value as a small dot at its x, where an x has several seeds."""
    xs = [xi for xi, values in zip(x, spread.values) if len(values) > 1 for _ in values]
    ys = [v for values in spread.values if len(values) > 1 for v in values]
    ax.scatter(xs, ys, s=12, color=color, edgecolors="black", linewidths=0.4, zorder=3)


def grouped_bars(arms: Sequence[str], series: dict[str, SeedSpread], ylabel: str) -> str:
    """One group of bars per arm, one bar per named series at its mean over training seeds (NaN bars are left out),
    with a zero line; where an arm has several seeds, a min-max whisker and a dot per seed."""
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.subplots()
    positions = np.arange(len(arms))
    width = 0.8 / max(len(series), 1)
    for i, (name, spread) in enumerate(series.items()):
        color = ARM_COLORS[i % len(ARM_COLORS)]
        finite = np.isfinite(spread.mean)
        offsets = positions - 0.4 + width * (i + 0.5)
        ax.bar(offsets[finite], spread.mean[finite], width, label=name, color=color)
        several = finite & np.array([len(v) > 1 for v in spread.values], dtype=bool)
        if several.any():
            whiskers = np.array([spread.mean - spread.low, spread.high - spread.mean])[:, several]
            ax.errorbar(offsets[several], spread.mean[several], yerr=whiskers, fmt="none", ecolor="black",
                        elinewidth=1, capsize=3)
            _seed_points(ax, offsets, spread, color)
    ax.axhline(0, color="black", linewidth=0.8)
    labels = [str(a) for a in arms]
    if len(arms) > 4 or max(map(len, labels), default=0) > 16:  # long arm labels overlap unless tilted
        ax.set_xticks(positions, labels, rotation=20, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(positions, labels)
    ax.set_ylabel(ylabel)
    _legend_above(ax)
    return png_data_uri(fig)


def quantile_slice_curves(lines: dict[str, tuple[Sequence[float], SeedSpread]], ylabel: str) -> str:
    """Razin et al.'s Figure 2: per score (one line each), a quantity of the slice centred on each percentile (x).

    Each line joins the means over training seeds; a band spans their min to max and a dot marks
    each seed. A score that identifies displacing pairs orders the slices: the high-percentile
    slices lose the most preferred log-probability.
    """
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    ticks: set[float] = set()
    for i, (label, (percentiles, spread)) in enumerate(lines.items()):
        color = ARM_COLORS[i % len(ARM_COLORS)]
        x = np.asarray(percentiles, dtype=np.float64)
        order = np.argsort(x)
        x, mean, low, high = x[order], spread.mean[order], spread.low[order], spread.high[order]
        finite = np.isfinite(mean)
        ax.plot(x[finite], mean[finite], marker="o", color=color, label=label)
        if spread.has_spread():
            ax.fill_between(x[finite], low[finite], high[finite], color=color, alpha=0.15, linewidth=0)
            _seed_points(ax, np.asarray(percentiles, dtype=np.float64), spread, color)
        ticks.update(x[np.isfinite(x)].tolist())
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(sorted(ticks))
    ax.set_xlabel("percentile of the score the slice is centred on")
    ax.set_ylabel(ylabel)
    _legend_above(ax, ncol=2)
    return png_data_uri(fig)


def score_vs_logp_change(arms: Sequence[str], ches: Sequence[float], ln_ches: Sequence[float],
                         preferred_logp_change: Sequence[float]) -> str:
    """Per-pair CHES and ln-CHES (x, two panels) against the preferred response's log-prob change (y), by arm.

    Razin et al. find the preferred log-probability falls most for the pairs with the highest CHES.
    """
    arms = np.asarray(arms, dtype=object)
    change = np.asarray(preferred_logp_change, dtype=np.float64)
    fig = Figure(figsize=(9.6, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, values, label in ((axes[0], ches, "CHES"), (axes[1], ln_ches, "ln-CHES")):
        values = np.asarray(values, dtype=np.float64)
        mask = _finite(values, change)
        for i, arm in enumerate(dict.fromkeys(arms)):
            group = mask & (arms == arm)
            ax.scatter(values[group], change[group], s=10, alpha=0.7, color=ARM_COLORS[i % len(ARM_COLORS)],
                       label=str(arm))
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel(label + _symlog_if_spread(ax, "x", values[mask]))
    axes[0].set_ylabel("preferred log-prob change")
    axes[1].legend(loc="best", fontsize="small")
    return png_data_uri(fig)
