"""Per-image overlays: the digit in grey with its attribution on top ('why was this 9 read as a 4').

Each example gets the image alone, the evidence for the predicted class and, when given (e.g. for
mistakes), the evidence for the true class.
"""

from __future__ import annotations

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.plots._common import CORRECT_COLOUR, WRONG_COLOUR, as_image_stack
from digitlens.pyplot import pyplot


def _unit(heatmaps: np.ndarray) -> np.ndarray:
    """Each heatmap scaled to [0, 1] by its own maximum."""
    peak = heatmaps.reshape(len(heatmaps), -1).max(axis=1)[:, None, None]
    return np.divide(heatmaps, peak, out=np.zeros_like(heatmaps), where=peak > 0)


class AttributionOverlayDisplay:
    """A gallery of attribution overlays.

    Parameters: images, ndarray of shape (N, H, W) in [0, 1]; heatmaps, ndarray (N, H, W), the
    |attribution| for the predicted class; second_heatmaps, default=None, (N, H, W) for the true
    class; y_true, y_pred, (N,); proba, default=None, (N,) confidence of the prediction; title.
    """

    def __init__(self, *, images, heatmaps, y_true, y_pred, second_heatmaps=None, proba=None, title=None):
        self.images = as_image_stack(images)
        self.heatmaps = np.abs(as_image_stack(heatmaps)).astype(np.float64)
        self.second_heatmaps = None if second_heatmaps is None else np.abs(as_image_stack(second_heatmaps)).astype(np.float64)
        self.y_true, self.y_pred = np.asarray(y_true), np.asarray(y_pred)
        self.proba = None if proba is None else np.asarray(proba, dtype=np.float64)
        n = len(self.images)
        for name, arr in (("heatmaps", self.heatmaps), ("y_true", self.y_true), ("y_pred", self.y_pred)):
            if len(arr) != n:
                raise DigitlensError(f"{name}: {len(arr)} entries for {n} images")
        self.title = title

    @classmethod
    def from_predictions(cls, images, heatmaps, y_true, y_pred, *, second_heatmaps=None, proba=None, title=None):
        """Entry point on plain arrays (same parameters as the constructor)."""
        return cls(images=images, heatmaps=heatmaps, y_true=y_true, y_pred=y_pred, second_heatmaps=second_heatmaps,
                   proba=proba, title=title)

    def plot(self, *, cmap="hot", alpha=0.9, examples_per_row: int = 2) -> "AttributionOverlayDisplay":
        plt = pyplot()
        n = len(self.images)
        panels = 3 if self.second_heatmaps is not None else 2
        rows = int(np.ceil(n / examples_per_row))
        cols = panels * examples_per_row
        self.figure_, axes = plt.subplots(rows, cols, figsize=(1.55 * cols + 0.8, 1.75 * rows + 0.6), squeeze=False,
                                          layout="constrained")
        self.axes_ = axes
        first = _unit(self.heatmaps)
        second = None if self.second_heatmaps is None else _unit(self.second_heatmaps)
        im = None
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_visible(False)
        for i in range(n):
            r, c0 = divmod(i, examples_per_row)
            row_axes = axes[r, c0 * panels:(c0 + 1) * panels]
            for ax in row_axes:
                ax.set_visible(True)
            ok = self.y_true[i] == self.y_pred[i]
            conf = "" if self.proba is None else f" ({self.proba[i]:.0%})"
            row_axes[0].imshow(self.images[i], cmap="gray", vmin=0, vmax=1)
            row_axes[0].set_title(f"true {self.y_true[i]}, pred {self.y_pred[i]}{conf}", fontsize=7,
                                  color=CORRECT_COLOUR if ok else WRONG_COLOUR)
            maps = [(first[i], f"evidence for {self.y_pred[i]}")]
            if second is not None:
                maps.append((second[i], f"evidence for {self.y_true[i]}"))
            for ax, (heat, label) in zip(row_axes[1:], maps):
                ax.imshow(self.images[i], cmap="gray", vmin=0, vmax=1)
                # transparency follows the attribution, so the digit stays visible where it is low
                im = ax.imshow(heat, cmap=cmap, vmin=0, vmax=1, alpha=np.clip(heat * 1.5, 0, alpha))
                ax.set_title(label, fontsize=7)
        if im is not None:
            bar = self.figure_.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
            bar.set_label("|attribution| (scaled per image)", fontsize=8)
        if self.title:
            self.figure_.suptitle(self.title, fontsize=10)
        return self
