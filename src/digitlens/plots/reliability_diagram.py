"""Reliability diagram: accuracy vs confidence per confidence bin, the expected calibration
error (ECE) in the title and the number of images in each bin below."""

from __future__ import annotations

import numpy as np

from digitlens.plots._common import axes_grid


class ReliabilityDiagramDisplay:
    """Top-label reliability diagram.

    Parameters
    ----------
    bin_edges : ndarray of shape (n_bins + 1,).
    confidence, accuracy : ndarray of shape (n_bins,), mean confidence and accuracy per bin
        (NaN for empty bins).
    count : ndarray of shape (n_bins,), images per bin.
    ece : float, expected calibration error.
    """

    def __init__(self, *, bin_edges, confidence, accuracy, count, ece):
        self.bin_edges = np.asarray(bin_edges, dtype=np.float64)
        self.confidence = np.asarray([np.nan if c is None else c for c in confidence], dtype=np.float64)
        self.accuracy = np.asarray([np.nan if a is None else a for a in accuracy], dtype=np.float64)
        self.count = np.asarray(count, dtype=np.int64)
        self.ece = float(ece)

    @classmethod
    def from_calibration(cls, calibration: dict) -> "ReliabilityDiagramDisplay":
        """Build from the ``calibration`` dict of ``metrics.json``."""
        return cls(bin_edges=calibration["bin_edges"], confidence=calibration["confidence"],
                   accuracy=calibration["accuracy"], count=calibration["count"], ece=calibration["ece"])

    @classmethod
    def from_predictions(cls, y_true, proba, *, n_bins: int = 15) -> "ReliabilityDiagramDisplay":
        """Bin the top-label confidences of ``proba`` (N, n_classes) against labels ``y_true`` (N,)."""
        from digitlens.evaluate import calibration_bins

        return cls.from_calibration(calibration_bins(y_true, proba, n_bins))

    def plot(self, ax=None, *, title: str | None = None) -> "ReliabilityDiagramDisplay":
        """Draw accuracy per bin against the diagonal (top) and bin counts (bottom, log scale).
        ``ax``: None or a pair of Axes."""
        if ax is None:
            from digitlens.plots._common import pyplot

            fig, axes = pyplot().subplots(2, 1, figsize=(6.4, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
        else:
            fig, axes = axes_grid(ax, 2)
        top, bottom = axes
        left = self.bin_edges[:-1]
        widths = np.diff(self.bin_edges)
        filled = self.count > 0
        accuracy = np.where(filled, self.accuracy, 0.0)
        confidence = np.where(filled, self.confidence, 0.0)
        self.bars_ = top.bar(left, accuracy, widths, align="edge", color="#1f77b4", edgecolor="white",
                             label="accuracy in bin")
        gap_bottom = np.minimum(accuracy, confidence)
        top.bar(left[filled], np.abs(confidence - accuracy)[filled], widths[filled], bottom=gap_bottom[filled],
                align="edge", color="#d62728", alpha=0.35, hatch="//", edgecolor="#d62728", lw=0,
                label="gap to mean confidence")
        top.plot([0, 1], [0, 1], "--", color="0.3", label="perfectly calibrated")
        top.plot(self.confidence[filled], self.accuracy[filled], "o", color="black", ms=4,
                 label="(mean confidence, accuracy)")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1.02)
        top.set_ylabel("accuracy")
        top.legend(loc="upper left", fontsize=9)
        top.grid(alpha=0.3)
        total = int(self.count.sum())
        top.set_title(title or f"Reliability diagram: ECE = {self.ece:.4f} ({self.ece:.2%}), "
                               f"{len(widths)} bins, {total:,} images")
        self.count_bars_ = bottom.bar(left, self.count, widths, align="edge", color="0.55", edgecolor="white")
        bottom.set_yscale("symlog", linthresh=1)
        bottom.set_ylim(0, max(10, self.count.max() * 4))
        for x, w, c in zip(left, widths, self.count):
            if c:
                bottom.text(x + w / 2, c * 1.15 + 0.2, f"{c:,}", ha="center", va="bottom", fontsize=7, rotation=90)
        bottom.set_xlabel("confidence (probability of the predicted digit)")
        bottom.set_ylabel("images in bin\n(log scale)")
        bottom.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        self.ax_, self.figure_ = axes, fig
        return self
