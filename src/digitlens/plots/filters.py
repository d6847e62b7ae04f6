"""What the first layer learned and what each conv layer sees.

``FiltersDisplay``: the first conv layer's kernels (for the ViT: the patch-embedding filters) as an
image grid on one diverging colour scale. ``FeatureMapsDisplay``: for one chosen image, the most
active channels of every conv layer.
"""

from __future__ import annotations

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.pyplot import pyplot


class FiltersDisplay:
    """Kernels of one conv layer. Parameters: filters, ndarray of shape (out_channels, in_channels,
    k, k) (input channels are averaged for display); layer_name, default='conv'; title."""

    def __init__(self, *, filters, layer_name="conv", title=None):
        filters = np.asarray(filters, dtype=np.float64)
        if filters.ndim != 4:
            raise DigitlensError(f"filters: expected shape (out, in, k, k), got {filters.shape}")
        self.filters, self.layer_name, self.title = filters, layer_name, title

    @classmethod
    def from_model(cls, model, layer_name: str | None = None, title=None):
        """The first ``nn.Conv2d`` of ``model`` (the ViT's ``patch_embed``), or the named layer."""
        from torch import nn  # lazy: drawing plain arrays needs no torch, only reading a model does

        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        if layer_name is not None:
            convs = [(n, m) for n, m in convs if n == layer_name]
        if not convs:
            raise DigitlensError(f"filters: model has no conv layer{f' named {layer_name!r}' if layer_name else ''}")
        name, conv = convs[0]
        return cls(filters=conv.weight.detach().cpu().numpy(), layer_name=name, title=title)

    def plot(self, *, cmap="RdBu_r", max_filters: int = 128, ax=None) -> "FiltersDisplay":
        """Draw the kernels as one mosaic image (one Axes; fast even for 128 filters)."""
        plt = pyplot()
        kernels = self.filters.mean(axis=1)[:max_filters]
        n, k = len(kernels), kernels.shape[-1]
        cols = min(8 if n <= 32 else 16, n)
        rows = int(np.ceil(n / cols))
        mosaic = np.full((rows * (k + 1) - 1, cols * (k + 1) - 1), np.nan)  # NaN gaps between tiles
        for i, kernel in enumerate(kernels):
            r, c = divmod(i, cols)
            mosaic[r * (k + 1):r * (k + 1) + k, c * (k + 1):c * (k + 1) + k] = kernel
        if ax is None:
            self.figure_, ax = plt.subplots(figsize=(0.45 * cols * (k + 1) / 4 + 1.8, 0.45 * rows * (k + 1) / 4 + 0.9),
                                            layout="constrained")
        else:
            self.figure_ = ax.figure
        self.ax_ = ax
        lim = float(np.abs(kernels).max()) or 1.0
        colormap = plt.get_cmap(cmap).with_extremes(bad="white")
        self.im_ = ax.imshow(mosaic, cmap=colormap, vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xticks(np.arange(cols) * (k + 1) + (k - 1) / 2, [str(c) for c in range(cols)], fontsize=6)
        ax.set_yticks(np.arange(rows) * (k + 1) + (k - 1) / 2, [str(r * cols) for r in range(rows)], fontsize=6)
        ax.set_xlabel("filter index (column offset)", fontsize=8)
        ax.set_ylabel("filter index (row start)", fontsize=8)
        ax.tick_params(length=0)
        bar = self.figure_.colorbar(self.im_, ax=ax, shrink=0.8)
        bar.set_label("weight", fontsize=8)
        ax.set_title(self.title or f"{self.layer_name}: {n} filters of {k}x{k} (red +, blue -)", fontsize=10)
        return self


class FeatureMapsDisplay:
    """Feature maps of each conv layer for one image. Parameters: image, ndarray (H, W);
    feature_maps, list of (layer name, ndarray (C, h, w)); title."""

    def __init__(self, *, image, feature_maps, title=None):
        self.image = np.asarray(image, dtype=np.float64)
        self.feature_maps = [(name, np.asarray(fm, dtype=np.float64)) for name, fm in feature_maps]
        self.title = title

    @classmethod
    def from_model(cls, model, image, title=None):
        """Run ``model`` on ``image`` (1, C, H, W) and record every ``nn.Conv2d`` output (hooks);
        returns None when the model has no conv layer."""
        import torch  # lazy: drawing plain arrays needs no torch, only running a model does
        from torch import nn

        records = []
        hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: records.append((name, out[0].detach().numpy())))
                 for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        if not hooks:
            return None
        try:
            with torch.no_grad():
                model.eval()(image)
        finally:
            for h in hooks:
                h.remove()
        return cls(image=image[0, 0].numpy(), feature_maps=records, title=title)

    def plot(self, *, channels: int = 8, cmap="magma") -> "FeatureMapsDisplay":
        plt = pyplot()
        rows = len(self.feature_maps)
        cols = channels + 1
        self.figure_, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.3 * rows + 0.7), squeeze=False,
                                          layout="constrained")
        self.axes_ = axes
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        im = None
        for r, (name, fm) in enumerate(self.feature_maps):
            axes[r, 0].imshow(self.image, cmap="gray", vmin=0, vmax=1)
            axes[r, 0].set_ylabel(f"{name}\n{fm.shape[0]}x{fm.shape[1]}x{fm.shape[2]}", fontsize=7)
            top = np.argsort(-fm.reshape(len(fm), -1).mean(axis=1))[:channels]
            for c, ch in enumerate(top):
                m = fm[ch]
                span = m.max() - m.min()
                im = axes[r, c + 1].imshow((m - m.min()) / span if span > 0 else m * 0, cmap=cmap, vmin=0, vmax=1)
                axes[r, c + 1].set_title(f"ch {ch}", fontsize=6, pad=1)
            for c in range(len(top) + 1, cols):
                axes[r, c].set_visible(False)
        bar = self.figure_.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
        bar.set_label("activation (min-max per map)", fontsize=8)
        self.figure_.suptitle(self.title or "Conv feature maps, most active channels per layer", fontsize=10)
        return self
