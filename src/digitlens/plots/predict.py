"""Figures of ``digitlens predict``: the preprocessing stages of one image side by side, and one
prediction explained (your image, the model's 28x28 input, the evidence, the probabilities)."""

from __future__ import annotations

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.pyplot import pyplot


class PreprocessingStepsDisplay:
    """The stages of :func:`digitlens.preprocess.to_mnist` for one image, left to right.

    Parameters: stages, a list of ``(title, array (H, W) in [0, 1])``; bbox, default=None, the
    ink's (top, bottom, left, right) drawn on the second stage; title.
    """

    def __init__(self, *, stages, bbox=None, title=None):
        if not stages:
            raise DigitlensError("stages: no preprocessing stage to draw")
        self.stages = [(str(t), np.asarray(a, dtype=np.float32)) for t, a in stages]
        self.bbox, self.title = bbox, title

    @classmethod
    def from_steps(cls, steps, *, title=None):
        """From a :class:`digitlens.preprocess.Steps`."""
        return cls(stages=steps.stages, bbox=steps.bbox, title=title)

    def plot(self) -> "PreprocessingStepsDisplay":
        plt = pyplot()
        from matplotlib.ticker import MaxNLocator
        n = len(self.stages)
        self.figure_, axes = plt.subplots(1, n, figsize=(2.5 * n + 0.9, 3.2), squeeze=False, layout="constrained")
        self.axes_ = axes[0]
        im = None
        for i, (ax, (name, arr)) in enumerate(zip(self.axes_, self.stages)):
            im = ax.imshow(arr, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{i + 1}. {name}", fontsize=8)
            ax.set_xlabel("x (pixels)", fontsize=7)
            ax.set_ylabel("y (pixels)", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            if i == 1 and self.bbox is not None:
                top, bottom, left, right = self.bbox
                ax.add_patch(plt.Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                           edgecolor="#e6a700", linewidth=1.2, label="ink's box"))
                ax.legend(loc="lower right", fontsize=6)
        bar = self.figure_.colorbar(im, ax=list(self.axes_), shrink=0.8)
        bar.set_label("pixel value (0 black, 1 white)", fontsize=8)
        self.figure_.suptitle(self.title or "preprocessing stages", fontsize=10)
        return self


class PredictionExplanationDisplay:
    """One prediction explained: the image as given, the model's 28x28 input, the |attribution|
    for the predicted digit over that input, and the ten probabilities.

    Parameters: original, array (H, W) in [0, 1] (greyscale); model_input, array (28, 28);
    heatmap, array (28, 28) (signed or not; drawn as |value| scaled to its maximum);
    probabilities, array (10,); method, the attribution method's name; title.
    """

    def __init__(self, *, original, model_input, heatmap, probabilities, method, title=None):
        self.original = np.asarray(original, dtype=np.float32)
        self.model_input = np.asarray(model_input, dtype=np.float32)
        self.heatmap = np.abs(np.asarray(heatmap, dtype=np.float64))
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        if self.heatmap.shape != self.model_input.shape:
            raise DigitlensError(f"heatmap: shape {self.heatmap.shape}, expected {self.model_input.shape}")
        self.method, self.title = method, title

    def plot(self, *, cmap="hot", alpha=0.9) -> "PredictionExplanationDisplay":
        plt = pyplot()
        self.figure_, axes = plt.subplots(1, 4, figsize=(11.5, 3.2), layout="constrained",
                                          gridspec_kw={"width_ratios": [1, 1, 1, 1.3]})
        self.axes_ = axes
        predicted = int(self.probabilities.argmax())
        axes[0].imshow(self.original, cmap="gray", vmin=0, vmax=1)
        axes[0].set_title(f"your image, greyscale ({self.original.shape[1]}x{self.original.shape[0]})", fontsize=8)
        axes[1].imshow(self.model_input, cmap="gray", vmin=0, vmax=1)
        axes[1].set_title("model input (MNIST form, 28x28)", fontsize=8)
        peak = self.heatmap.max()
        heat = self.heatmap / peak if peak > 0 else self.heatmap
        axes[2].imshow(self.model_input, cmap="gray", vmin=0, vmax=1)
        # transparency follows the attribution, so the digit stays visible where it is low
        im = axes[2].imshow(heat, cmap=cmap, vmin=0, vmax=1, alpha=np.clip(heat * 1.5, 0, alpha))
        axes[2].set_title(f"evidence for {predicted} ({self.method})", fontsize=8)
        for ax in axes[:3]:
            ax.set_xlabel("x (pixels)", fontsize=7)
            ax.set_ylabel("y (pixels)", fontsize=7)
            ax.tick_params(labelsize=6)
        bar = self.figure_.colorbar(im, ax=axes[2], shrink=0.8)
        bar.set_label("|attribution| (scaled to its maximum)", fontsize=7)
        digits = np.arange(len(self.probabilities))
        colours = ["#1f77b4" if d != predicted else "#d62728" for d in digits]
        axes[3].bar(digits, self.probabilities, color=colours)
        axes[3].set_xticks(digits)
        axes[3].set_ylim(0, 1)
        axes[3].set_xlabel("digit", fontsize=8)
        axes[3].set_ylabel("probability", fontsize=8)
        axes[3].set_title(f"prediction: {predicted} ({self.probabilities[predicted]:.1%})", fontsize=8)
        axes[3].tick_params(labelsize=7)
        if self.title:
            self.figure_.suptitle(self.title, fontsize=10)
        return self
