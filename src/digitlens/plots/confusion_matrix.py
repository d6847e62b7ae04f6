"""Confusion matrix as counts and row-normalised (share of each true digit), side by side."""

from __future__ import annotations

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.intervals import wilson_interval
from digitlens.metrics import as_labels
from digitlens.plots._common import axes_grid


def _power_ticks(vmax: float, gamma: float, n: int = 6) -> list[float]:
    """Colour-bar ticks evenly spaced in colour (not value) under a power scale, rounded to two
    significant digits, so they do not crowd at the top."""
    ticks = []
    for fraction in np.linspace(0, 1, n):
        value = float(vmax * fraction ** (1 / gamma))
        if value > 0:
            digits = 1 - int(np.floor(np.log10(value)))
            value = round(value, digits)
        if value <= vmax and value not in ticks:
            ticks.append(value)
    return ticks


def _general_format(value, _position=None) -> str:
    """Colour-bar tick label; a module-level function so the figure can be pickled."""
    return f"{value:g}"


class ConfusionMatrixDisplay:
    """Counts and row-normalised confusion matrices side by side.

    Parameters
    ----------
    confusion_matrix : ndarray of shape (n_classes, n_classes); rows are true digits.
    display_labels : sequence of str of length n_classes, default=None (0..n_classes-1).
    """

    def __init__(self, *, confusion_matrix, display_labels=None):
        self.confusion_matrix = np.asarray(confusion_matrix)
        if self.confusion_matrix.ndim != 2 or self.confusion_matrix.shape[0] != self.confusion_matrix.shape[1]:
            raise DigitlensError(f"confusion_matrix: expected a square matrix, got shape {self.confusion_matrix.shape}")
        n = self.confusion_matrix.shape[0]
        self.display_labels = [str(d) for d in (display_labels if display_labels is not None else range(n))]

    @property
    def normalized(self) -> np.ndarray:
        """Row-normalised matrix of shape (n_classes, n_classes); rows with no samples are 0."""
        rows = self.confusion_matrix.sum(axis=1, keepdims=True)
        return np.divide(self.confusion_matrix, rows, out=np.zeros(self.confusion_matrix.shape), where=rows > 0)

    @classmethod
    def from_predictions(cls, y_true, y_pred, *, labels=None, display_labels=None) -> "ConfusionMatrixDisplay":
        """Compute the matrix with ``sklearn.metrics.confusion_matrix`` (labels default 0..9)."""
        from sklearn.metrics import confusion_matrix  # lazy: scikit-learn's metrics take ~1 s to import

        y_true, y_pred = as_labels(y_true, "y_true"), as_labels(y_pred, "y_pred")
        if labels is None:
            labels = np.arange(max(10, int(max(y_true.max(), y_pred.max())) + 1))
        cm = confusion_matrix(y_true, y_pred, labels=labels)
        return cls(confusion_matrix=cm, display_labels=display_labels if display_labels is not None else labels)

    def plot(self, ax=None, *, cmap: str = "Blues", gamma: float = 0.4, title: str | None = None) -> "ConfusionMatrixDisplay":
        """Draw counts (left) and row-normalised percentages (right). ``ax``: None or a pair of
        Axes; ``gamma``: exponent of the colour scale (1 = linear; smaller shows rare mistakes)."""
        from matplotlib.colors import PowerNorm
        from matplotlib.ticker import FuncFormatter

        fig, axes = axes_grid(ax, 2, figsize=(13, 5.6))
        n = len(self.display_labels)
        panels = (
            (self.confusion_matrix, "Counts", lambda v: f"{int(v)}", "number of images"),
            (self.normalized * 100, "Row-normalised (% of each true digit)", lambda v: f"{v:.1f}" if v < 99.95 else "100", "% of true digit"),
        )
        self.im_ = []
        fontsize = 9 if n <= 10 else 6
        for axis, (matrix, name, fmt, bar_label) in zip(axes, panels):
            vmax = 100.0 if name.startswith("Row") else (matrix.max() if matrix.max() > 0 else 1)
            # A power colour scale (gamma < 1) keeps the few mistakes visible next to a full diagonal.
            im = axis.imshow(matrix, cmap=cmap, norm=PowerNorm(gamma, vmin=0, vmax=vmax))
            self.im_.append(im)
            for i in range(n):
                for j in range(n):
                    value = matrix[i, j]
                    if value == 0 and i != j:
                        continue
                    colour = "white" if (value / vmax) ** gamma > 0.6 else "black"
                    axis.text(j, i, fmt(value), ha="center", va="center", color=colour, fontsize=fontsize)
            axis.set_xticks(range(n), self.display_labels)
            axis.set_yticks(range(n), self.display_labels)
            axis.set_xlabel("predicted digit")
            axis.set_ylabel("true digit")
            axis.set_title(name)
            bar = fig.colorbar(im, ax=axis, fraction=0.046, pad=0.04,
                               label=bar_label + (f" (colour: power {gamma:g} scale)" if gamma != 1 else ""))
            if gamma != 1:
                bar.set_ticks(_power_ticks(vmax, gamma))
                bar.ax.yaxis.set_major_formatter(FuncFormatter(_general_format))
        total = int(self.confusion_matrix.sum())
        correct = int(np.trace(self.confusion_matrix))
        low, high = wilson_interval(correct, total) * 100
        fig.suptitle(title or f"Confusion matrix: {correct:,} of {total:,} correct, {correct / max(total, 1):.2%} "
                              f"({low:.2f}-{high:.2f}); off-diagonal cells are mistakes")
        fig.tight_layout()
        self.ax_, self.figure_ = axes, fig
        return self
