"""Reliability diagram: accuracy vs confidence per confidence bin, the expected calibration
error (ECE) in the title and the number of images in each bin below; with temperature-scaled
probabilities, the raw and the calibrated bins side by side."""

from __future__ import annotations

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.plots._common import axes_grid

RAW_COLOUR = "#1f77b4"
CALIBRATED_COLOUR = "#ff7f0e"


def _nan_for_none(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


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
        from digitlens.evaluate import calibration_bins

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
        """Draw accuracy per bin against the diagonal (top) and bin counts (bottom, log scale);
        with a calibrated series, raw bars fill the left half of each bin and calibrated bars the
        right half. ``ax``: None or a pair of Axes."""
        if ax is None:
            from digitlens.plots._common import pyplot

            fig, axes = pyplot().subplots(2, 1, figsize=(7.2, 7.6), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1.2]})
        else:
            fig, axes = axes_grid(ax, 2)
        top, bottom = axes
        edges_left = self.bin_edges[:-1]
        widths = np.diff(self.bin_edges)
        series = [("raw", self.confidence, self.accuracy, self.count, self.ece, RAW_COLOUR, "o")]
        if self.has_calibrated:
            t = f", T = {self.temperature:.3g}" if self.temperature is not None else ""
            series.append((f"scaled{t}", self.confidence_calibrated, self.accuracy_calibrated,
                           self.count_calibrated, self.ece_calibrated, CALIBRATED_COLOUR, "s"))
        n_series = len(series)
        bar_widths = widths / n_series
        bars, count_bars = [], []
        for i, (name, conf, acc, count, ece, colour, marker) in enumerate(series):
            left = edges_left + i * bar_widths
            filled = count > 0
            accuracy = np.where(filled, acc, 0.0)
            confidence = np.where(filled, conf, 0.0)
            label = "accuracy in bin" if n_series == 1 else f"{name}: accuracy in bin, ECE {ece:.4f}"
            bars.append(top.bar(left, accuracy, bar_widths, align="edge", color=colour, edgecolor="white",
                                label=label))
            gap_bottom = np.minimum(accuracy, confidence)
            top.bar(left[filled], np.abs(confidence - accuracy)[filled], bar_widths[filled],
                    bottom=gap_bottom[filled], align="edge", color="#d62728", alpha=0.35, hatch="//",
                    edgecolor="#d62728", lw=0, label="gap to mean confidence" if i == 0 else None)
            top.plot(conf[filled], acc[filled], marker, color="black" if n_series == 1 else colour,
                     mec="black", ms=4.5, ls="none",
                     label="(mean confidence, accuracy)" if n_series == 1 else f"{name.split(',')[0]}: (mean confidence, accuracy)")
            count_bars.append(bottom.bar(left, count, bar_widths, align="edge",
                                         color="0.55" if n_series == 1 else colour, edgecolor="white"))
            for x, w, c in zip(left, bar_widths, count):
                if c:
                    bottom.text(x + w / 2, c * 1.15 + 0.2, f"{c:,}", ha="center", va="bottom",
                                fontsize=7 if n_series == 1 else 6, rotation=90)
        self.bars_, self.count_bars_ = bars[0], count_bars[0]
        self.bars_calibrated_ = bars[1] if n_series > 1 else None
        self.count_bars_calibrated_ = count_bars[1] if n_series > 1 else None
        top.plot([0, 1], [0, 1], "--", color="0.3", label="perfectly calibrated")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1.25 if n_series == 1 else 1.4)  # headroom above accuracy 1 keeps the legend off the bars
        top.set_yticks(np.linspace(0, 1, 6))
        top.set_ylabel("accuracy")
        handles, labels = top.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda k: ("accuracy in bin" not in labels[k], "gap" in labels[k]))
        top.legend([handles[k] for k in order], [labels[k] for k in order], loc="upper left", fontsize=8,
                   ncol=2, framealpha=0.9)
        top.grid(alpha=0.3)
        top.set_title(title or self._default_title(), fontsize=10)
        max_count = max(int(self.count.max()) if self.count.size else 0,
                        int(self.count_calibrated.max()) if self.has_calibrated and self.count_calibrated.size else 0)
        bottom.set_yscale("symlog", linthresh=1)
        bottom.set_ylim(0, max(10, max_count * 12))  # room for the rotated count labels
        bottom.set_xlabel("confidence (probability of the predicted digit)")
        bottom.set_ylabel("images in bin\n(log scale)")
        bottom.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        self.ax_, self.figure_ = axes, fig
        return self
