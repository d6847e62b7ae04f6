"""Reliability diagram: accuracy vs confidence per confidence bin, the expected calibration
error (ECE) in the title and the number of images in each bin below; with temperature-scaled
probabilities, the raw and the calibrated bins side by side."""

from __future__ import annotations

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.intervals import wilson_interval
from digitlens.metrics import calibration_bins
from digitlens.plots._common import axes_grid
from digitlens.pyplot import pyplot

RAW_COLOUR = "#1f77b4"
CALIBRATED_COLOUR = "#ff7f0e"


def _nan_for_none(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def bin_accuracy_intervals(accuracy, count, confidence: float = 0.95) -> np.ndarray:
    """95% Wilson interval of the accuracy in each bin from its ``accuracy`` and ``count`` (each
    (n_bins,)): array (n_bins, 2), NaN for empty bins."""
    accuracy = np.nan_to_num(_nan_for_none(accuracy))
    count = np.asarray(count, dtype=np.int64)
    ci = wilson_interval(np.clip(np.rint(accuracy * count), 0, count), count, confidence)
    ci[count == 0] = np.nan
    return ci


class ReliabilityDiagramDisplay:
    """Top-label reliability diagram, optionally with a temperature-scaled second series.

    Parameters
    ----------
    bin_edges : ndarray of shape (n_bins + 1,).
    confidence, accuracy : ndarray of shape (n_bins,), mean confidence and accuracy per bin
        (NaN for empty bins).
    count : ndarray of shape (n_bins,), images per bin.
    ece : float, expected calibration error.
    confidence_calibrated, accuracy_calibrated, count_calibrated : ndarray of shape (n_bins,) or
        None, the same over the temperature-scaled probabilities (same bins).
    ece_calibrated : float or None, ECE after temperature scaling.
    temperature : float or None, the fitted temperature T.
    """

    def __init__(self, *, bin_edges, confidence, accuracy, count, ece, confidence_calibrated=None,
                 accuracy_calibrated=None, count_calibrated=None, ece_calibrated=None, temperature=None):
        self.bin_edges = np.asarray(bin_edges, dtype=np.float64)
        self.confidence = _nan_for_none(confidence)
        self.accuracy = _nan_for_none(accuracy)
        self.count = np.asarray(count, dtype=np.int64)
        self.ece = float(ece)
        calibrated = (confidence_calibrated, accuracy_calibrated, count_calibrated, ece_calibrated)
        if any(v is not None for v in calibrated) and any(v is None for v in calibrated):
            raise DigitlensError("confidence_calibrated, accuracy_calibrated, count_calibrated, ece_calibrated: "
                                 "give all four or none")
        self.has_calibrated = ece_calibrated is not None
        if self.has_calibrated:
            self.confidence_calibrated = _nan_for_none(confidence_calibrated)
            self.accuracy_calibrated = _nan_for_none(accuracy_calibrated)
            self.count_calibrated = np.asarray(count_calibrated, dtype=np.int64)
            if self.count_calibrated.shape != self.count.shape:
                raise DigitlensError(f"count_calibrated: expected {self.count.shape[0]} bins like count, "
                                     f"got {self.count_calibrated.shape[0]}")
            self.ece_calibrated = float(ece_calibrated)
        else:
            self.confidence_calibrated = self.accuracy_calibrated = self.count_calibrated = None
            self.ece_calibrated = None
        self.temperature = None if temperature is None else float(temperature)

    @classmethod
    def from_calibration(cls, calibration: dict, calibration_calibrated: dict | None = None,
                         temperature: float | None = None) -> "ReliabilityDiagramDisplay":
        """Build from the ``calibration`` (and ``calibration_calibrated``, ``temperature``) entries of ``metrics.json``."""
        kwargs = {}
        if calibration_calibrated is not None:
            if list(calibration_calibrated["bin_edges"]) != list(calibration["bin_edges"]):
                raise DigitlensError("calibration_calibrated: bin edges differ from those of calibration")
            kwargs = {"confidence_calibrated": calibration_calibrated["confidence"],
                      "accuracy_calibrated": calibration_calibrated["accuracy"],
                      "count_calibrated": calibration_calibrated["count"],
                      "ece_calibrated": calibration_calibrated["ece"]}
        return cls(bin_edges=calibration["bin_edges"], confidence=calibration["confidence"],
                   accuracy=calibration["accuracy"], count=calibration["count"], ece=calibration["ece"],
                   temperature=temperature, **kwargs)

    @classmethod
    def from_predictions(cls, y_true, proba, proba_calibrated=None, temperature=None, *,
                         n_bins: int = 15) -> "ReliabilityDiagramDisplay":
        """Bin the top-label confidences of ``proba`` (N, n_classes) against labels ``y_true`` (N,);
        with ``proba_calibrated`` (N, n_classes, e.g. after temperature scaling by ``temperature``)
        bin those too, over the same bins."""
        raw = calibration_bins(y_true, proba, n_bins)
        if proba_calibrated is None:
            return cls.from_calibration(raw, temperature=temperature)
        if np.shape(proba_calibrated) != np.shape(proba):
            raise DigitlensError(f"proba_calibrated: expected shape {np.shape(proba)} like proba, "
                                 f"got {np.shape(proba_calibrated)}")
        return cls.from_calibration(raw, calibration_bins(y_true, proba_calibrated, n_bins), temperature)

    def _default_title(self) -> str:
        total = int(self.count.sum())
        if not self.has_calibrated:
            return f"Reliability diagram: ECE = {self.ece:.4f} ({self.ece:.2%}), {len(self.count)} bins, {total:,} images"
        t = f" (T = {self.temperature:.3g})" if self.temperature is not None else ""
        return (f"Reliability diagram: ECE = {self.ece:.4f} raw, {self.ece_calibrated:.4f} after "
                f"temperature scaling{t}\n{len(self.count)} bins, {total:,} images")

    def plot(self, ax=None, *, title: str | None = None) -> "ReliabilityDiagramDisplay":
        """Draw accuracy per bin against the diagonal (top) and bin counts (bottom, log scale),
        one column per series: the raw probabilities, and beside them (same axes) the
        temperature-scaled ones when given. ``ax``: None, or 2 Axes per series (top, bottom, ...).
        ``ax_`` holds the Axes in that order; the title is the figure's."""
        series = [("raw", self.confidence, self.accuracy, self.count, self.ece, RAW_COLOUR, "o")]
        if self.has_calibrated:
            t = f", T = {self.temperature:.3g}" if self.temperature is not None else ""
            series.append((f"scaled{t}", self.confidence_calibrated, self.accuracy_calibrated,
                           self.count_calibrated, self.ece_calibrated, CALIBRATED_COLOUR, "s"))
        n_series = len(series)
        if ax is None:
            fig, grid = pyplot().subplots(2, n_series, figsize=(6.4 * n_series, 7.2), sharex=True, sharey="row",
                                          gridspec_kw={"height_ratios": [3, 1.2]}, squeeze=False)
            axes = [a for col in range(n_series) for a in (grid[0, col], grid[1, col])]
        else:
            fig, axes = axes_grid(ax, 2 * n_series)
        edges_left = self.bin_edges[:-1]
        widths = np.diff(self.bin_edges)
        max_count = max(int(count.max()) if count.size else 0 for _, _, _, count, _, _, _ in series)
        bars, count_bars = [], []
        for i, (name, conf, acc, count, ece, colour, marker) in enumerate(series):
            top, bottom = axes[2 * i], axes[2 * i + 1]
            filled = count > 0
            accuracy = np.where(filled, acc, 0.0)
            confidence = np.where(filled, conf, 0.0)
            bars.append(top.bar(edges_left, accuracy, widths, align="edge", color=colour, edgecolor="white",
                                label="accuracy in bin"))
            gap_bottom = np.minimum(accuracy, confidence)
            top.bar(edges_left[filled], np.abs(confidence - accuracy)[filled], widths[filled],
                    bottom=gap_bottom[filled], align="edge", facecolor="none", hatch="///",
                    edgecolor="#d62728", lw=0.8, label="gap to mean confidence")
            ci = bin_accuracy_intervals(acc, count)
            yerr = np.clip(np.stack([acc - ci[:, 0], ci[:, 1] - acc]), 0, None)[:, filled]
            top.errorbar(conf[filled], acc[filled], yerr=yerr, fmt=marker, color="black", ms=4.5,
                         elinewidth=1.0, capsize=2.5, label="(mean confidence, accuracy)\nwith its 95% Wilson interval")
            top.plot([0, 1], [0, 1], "--", color="0.3", label="perfectly calibrated")
            top.set_xlim(0, 1)
            top.set_ylim(0, 1.42)  # the legend sits above accuracy 1, clear of the bars and error bars
            top.set_yticks(np.linspace(0, 1, 6))
            top.set_ylabel("accuracy")
            top.legend(loc="upper left", fontsize=7.5, framealpha=0.9, ncols=2, title=f"{name}: ECE {ece:.4f}",
                       title_fontsize=9)
            top.grid(alpha=0.3)
            top.set_title("raw probabilities" if i == 0 else f"after temperature scaling ({name.split(', ')[-1]})",
                          fontsize=10)
            count_bars.append(bottom.bar(edges_left, count, widths, align="edge",
                                         color="0.55" if n_series == 1 else colour, edgecolor="white"))
            for x, w, c in zip(edges_left, widths, count):
                if c:
                    bottom.text(x + w / 2, c * 1.15 + 0.2, f"{c:,}", ha="center", va="bottom", fontsize=7, rotation=90)
            bottom.set_yscale("symlog", linthresh=1)
            bottom.set_ylim(0, max(10, max_count * 12))  # room for the rotated count labels
            bottom.set_xlabel("confidence (probability of the predicted digit)")
            bottom.set_ylabel("images in bin\n(log scale)")
            bottom.grid(alpha=0.3, axis="y")
        self.bars_, self.count_bars_ = bars[0], count_bars[0]
        self.bars_calibrated_ = bars[1] if n_series > 1 else None
        self.count_bars_calibrated_ = count_bars[1] if n_series > 1 else None
        fig.suptitle(title or self._default_title(), fontsize=11)
        fig.tight_layout()
        self.ax_, self.figure_ = axes, fig
        return self
