"""Helpers shared by the Display classes: matplotlib import (Agg), axes creation, colours."""

from __future__ import annotations

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.pyplot import pyplot

#: One colour per metric, the same in every figure.
METRIC_COLOURS = {
    "precision": "#d62728",
    "recall": "#2ca02c",
    "f1": "#1f77b4",
    "accuracy": "#e6a700",
}
METRIC_LABELS = {"precision": "precision", "recall": "recall", "f1": "F1", "accuracy": "accuracy (one-vs-rest)"}
METRIC_SHORT = {"precision": "p", "recall": "r", "f1": "f1", "accuracy": "acc"}
CORRECT_COLOUR = "#1a7f37"
WRONG_COLOUR = "#cf222e"


def axes_grid(ax, n: int, *, ncols: int | None = None, figsize=None, **subplot_kw):
    """Return (figure, flat array of ``n`` axes): new ones when ``ax`` is None, else ``ax``
    (a single Axes when n == 1, or a sequence of n Axes) checked for length."""
    if ax is None:
        plt = pyplot()
        ncols = ncols or n
        nrows = int(np.ceil(n / ncols))
        fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, **subplot_kw)
        axes = axes.ravel()
        for extra in axes[n:]:
            extra.set_visible(False)
        return fig, axes[:n]
    axes = np.atleast_1d(np.asarray(ax, dtype=object)).ravel()
    if len(axes) != n:
        raise DigitlensError(f"ax: expected {n} Axes, got {len(axes)}")
    return axes[0].figure, axes


def as_image_stack(images) -> np.ndarray:
    """Images as a float array of shape (N, H, W) from (N, H, W), (N, 1, H, W), (N, H, W, 1) or
    flattened square images (N, H*W); accepts numpy arrays and torch tensors."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 2:
        side = int(round(np.sqrt(arr.shape[1])))
        if side * side != arr.shape[1]:
            raise DigitlensError(f"images: cannot reshape {arr.shape[1]} features into a square image")
        arr = arr.reshape(len(arr), side, side)
    if arr.ndim != 3:
        raise DigitlensError(f"images: expected shape (N, H, W), (N, 1, H, W), (N, H, W, 1) or (N, H*W), got {arr.shape}")
    return arr
