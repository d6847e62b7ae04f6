"""A grid of test images, each titled with its true and predicted digit and the confidence:
green when right, red when wrong."""

from __future__ import annotations

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.metrics import as_labels
from digitlens.plots._common import CORRECT_COLOUR, WRONG_COLOUR, as_image_stack, axes_grid


def format_confidence(confidence: float) -> str:
    """A probability as a percentage: whole percent below 99%, two decimals above (99.97%), and
    ">99.99%" rather than a rounded "100%" that no softmax reaches."""
    if confidence >= 0.99995:
        return ">99.99%"
    return f"{confidence:.2%}" if confidence >= 0.99 else f"{confidence:.0%}"


def _predictions_from(y_true, y_pred, proba, confidence):
    """(y_true, y_pred, confidence) arrays of shape (N,) from labels and probabilities or scores."""
    y_true = as_labels(y_true, "y_true")
    if proba is not None:
        proba = np.asarray(proba, dtype=np.float64)
        if proba.ndim != 2 or len(proba) != len(y_true):
            raise DigitlensError(f"proba: expected shape ({len(y_true)}, n_classes), got {proba.shape}")
        y_pred = proba.argmax(axis=1) if y_pred is None else as_labels(y_pred, "y_pred")
        confidence = proba[np.arange(len(proba)), y_pred]
    elif y_pred is None:
        raise DigitlensError("y_pred or proba: one of them is needed")
    else:
        y_pred = as_labels(y_pred, "y_pred")
        confidence = None if confidence is None else np.asarray(confidence, dtype=np.float64)
    if len(y_pred) != len(y_true):
        raise DigitlensError(f"y_pred: {len(y_pred)} predictions for {len(y_true)} labels")
    return y_true, y_pred, confidence


class PredictionGalleryDisplay:
    """Images with "true / predicted (confidence)" titles, green when right and red when wrong.

    Parameters
    ----------
    images : ndarray of shape (n_images, H, W).
    y_true, y_pred : ndarray of shape (n_images,).
    confidence : ndarray of shape (n_images,) or None, probability of the predicted digit.
    indices : ndarray of shape (n_images,) or None, positions in the evaluated set (shown as #i).
    title : str, default="Predictions on test images".
    """

    default_title = "Predictions on test images (green: right, red: wrong)"

    def __init__(self, *, images, y_true, y_pred, confidence=None, indices=None, title=None):
        self.images = as_image_stack(images)
        self.y_true, self.y_pred = np.asarray(y_true), np.asarray(y_pred)
        self.confidence = None if confidence is None else np.asarray(confidence)
        self.indices = None if indices is None else np.asarray(indices)
        self.title = title or self.default_title

    @classmethod
    def from_predictions(cls, images, y_true, y_pred=None, *, proba=None, confidence=None, n_images: int = 20,
                         indices=None, seed: int | None = 0, title=None) -> "PredictionGalleryDisplay":
        """Show ``n_images`` images: ``indices`` when given, else a random sample (by ``seed``;
        ``seed=None`` takes the first ones). ``proba`` (N, n_classes) gives predictions and
        confidences; or pass ``y_pred`` and optionally ``confidence``."""
        images = as_image_stack(images)
        y_true, y_pred, confidence = _predictions_from(y_true, y_pred, proba, confidence)
        if len(images) != len(y_true):
            raise DigitlensError(f"images: {len(images)} images for {len(y_true)} labels")
        if indices is None:
            n = min(n_images, len(images))
            indices = np.arange(n) if seed is None else np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
        indices = np.asarray(indices, dtype=np.int64)
        return cls(images=images[indices], y_true=y_true[indices], y_pred=y_pred[indices],
                   confidence=None if confidence is None else confidence[indices], indices=indices, title=title)

    def plot(self, ax=None, *, ncols: int = 10, cmap: str = "gray_r") -> "PredictionGalleryDisplay":
        """Draw the grid. ``ax``: None or one Axes per image."""
        n = len(self.images)
        if n == 0:
            plt_fig, axes = axes_grid(ax, 1, figsize=(4, 1.5))
            axes[0].axis("off")
            axes[0].text(0.5, 0.5, "no images to show", ha="center", va="center")
            plt_fig.suptitle(self.title)
            self.ax_, self.figure_ = axes, plt_fig
            return self
        ncols = min(ncols, n)
        nrows = int(np.ceil(n / ncols))
        fig, axes = axes_grid(ax, n, ncols=ncols, figsize=(1.3 * ncols, 1.62 * nrows + 0.5))
        for i, axis in enumerate(axes):
            axis.imshow(self.images[i], cmap=cmap, vmin=0, vmax=max(1.0, float(self.images[i].max())))
            axis.set_xticks([])
            axis.set_yticks([])
            right = self.y_true[i] == self.y_pred[i]
            colour = CORRECT_COLOUR if right else WRONG_COLOUR
            text = f"true {self.y_true[i]}\npred {self.y_pred[i]}"
            if self.confidence is not None:
                text += f" ({format_confidence(self.confidence[i])})"
            axis.set_title(text, color=colour, fontsize=8.5, fontweight="normal" if right else "bold")
            for spine in axis.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(1.5 if right else 2.5)
        fig.suptitle(self.title)
        fig.tight_layout()
        self.ax_, self.figure_ = axes, fig
        return self
