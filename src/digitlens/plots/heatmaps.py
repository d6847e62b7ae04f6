"""Per-digit attribution maps on a patch grid (the seed figure), single or compared side by side.

Ten maps (digits 0-9) in 5 rows x 2 columns, one shared colour bar black -> red -> yellow ->
white ('hot', readable in greyscale too), grid ticks 0..grid-1, each map summing to 1. A map
with no mass (all-NaN: no images, or an attribution that is zero on every image) is drawn hatched
with a note, never as a black panel that reads like "nothing anywhere". The comparison puts two
sets of maps on the same colour scale plus their difference (diverging map).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.explain.maps import GroupedMaps, load_maps
from digitlens.pyplot import pyplot

SEQUENTIAL_CMAP = "hot"  # black -> red -> yellow -> white
DIVERGING_CMAP = "RdBu_r"


def _check_maps(maps, name="maps") -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[-1] != maps.shape[-2]:
        raise DigitlensError(f"{name}: expected shape (n_groups, grid, grid), got {maps.shape}")
    return maps


def _empty_notes(maps, counts=None) -> list:
    """Per map: None for a distribution, else why it has none ('no images' / 'zero attribution')."""
    notes = []
    for i, m in enumerate(maps):
        if np.isfinite(m).all() and m.sum() > 0:
            notes.append(None)
        elif counts is not None and int(counts[i]) == 0:
            notes.append("no images")
        else:
            notes.append("attribution zero\non every image")
    return notes


def _nanmax(*arrays) -> float:
    finite = [a[np.isfinite(a)] for a in arrays]
    return float(max((f.max() for f in finite if f.size), default=0.0))


def _draw_maps(fig, maps, names, *, cmap, vmin, vmax, title, colorbar_label, ncols=2, notes=None):
    """One block of maps (ceil(G/ncols) rows x ncols) with a shared colour bar: (axes, image).
    ``notes``: per map None or the text shown on a hatched panel instead of the map."""
    n = len(maps)
    nrows = int(np.ceil(n / ncols))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    grid = maps.shape[-1]
    ticks = np.arange(grid)
    im = None
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.set_visible(False)
            continue
        note = notes[i] if notes is not None else None
        shown = ax.imshow(np.where(np.isfinite(maps[i]), maps[i], 0.0) if note is None else np.zeros_like(maps[i]),
                          cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", alpha=1.0 if note is None else 0.0)
        if note is None:
            im = shown
        else:
            ax.add_patch(pyplot().Rectangle((-0.5, -0.5), grid, grid, facecolor="white", edgecolor="0.45",
                                            hatch="///", lw=0))
            ax.text((grid - 1) / 2, (grid - 1) / 2, f"no map:\n{note}", ha="center", va="center", fontsize=7,
                    bbox=dict(facecolor="white", edgecolor="0.6", boxstyle="round,pad=0.25"))
        ax.set_title(names[i], fontsize=9, pad=2)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=6, length=2)
        if i // ncols == nrows - 1 or i + ncols >= n:
            ax.set_xlabel("patch column", fontsize=7)
        if i % ncols == 0:
            ax.set_ylabel("patch row", fontsize=7)
    if im is None:  # every map is empty: a colour bar still says what the colours would mean
        im = axes.ravel()[0].imshow(np.zeros((grid, grid)), cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.0)
    bar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, pad=0.04)
    bar.set_label(colorbar_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return axes, im


def _labels(names, counts, n):
    names = [str(x) for x in (names if names is not None else range(n))]
    if len(names) != n:
        raise DigitlensError(f"group_names: {len(names)} names for {n} maps")
    if counts is None:
        return [f"digit {x}" if x.isdigit() else x for x in names]
    return [f"{'digit ' if x.isdigit() else ''}{x} (n={int(c):,})" for x, c in zip(names, counts)]


class PerDigitMapsDisplay:
    """Per-digit maps, each of shape (grid, grid) and summing to 1, on one shared colour scale.

    Parameters: maps, ndarray of shape (n_groups, grid, grid); group_names, default=None ('0'..);
    counts, default=None (images per group, shown in titles); title, default=None.
    """

    def __init__(self, *, maps, group_names=None, counts=None, title=None):
        self.maps = _check_maps(maps)
        self.group_names, self.counts, self.title = group_names, counts, title

    @classmethod
    def from_attributions(cls, attributions, labels, *, grid: int = 7, n_groups: int = 10, title=None):
        """Build from per-image attributions (N, H, W) or (N, C, H, W) and group labels (N,):
        mean |attribution| per group, pooled onto the grid, normalised to sum 1 (the explain
        stage's own :class:`digitlens.explain.maps.GroupedMaps`)."""
        a = np.abs(np.asarray(attributions, dtype=np.float64))
        if a.ndim == 4:
            a = a.sum(axis=1)
        grouped = GroupedMaps(n_groups, grid).add(a, np.asarray(labels, dtype=np.int64))
        return cls(maps=grouped.maps(), counts=grouped.counts_, title=title)

    @classmethod
    def from_run(cls, run_dir, method: str = "saliency", title=None):
        """Read ``run_dir/explain/maps_<method>.npz``."""
        data = load_maps(run_dir, method)
        return cls(maps=data["maps"], group_names=list(data["group_names"]), counts=data["counts"],
                   title=title or f"{Path(run_dir).name}: {method}")

    def plot(self, *, figure=None, cmap=SEQUENTIAL_CMAP, vmax=None) -> "PerDigitMapsDisplay":
        plt = pyplot()
        nrows = int(np.ceil(len(self.maps) / 2))
        self.figure_ = figure or plt.figure(figsize=(4.6, 1.85 * nrows + 0.6), layout="constrained")
        vmax = _nanmax(self.maps) if vmax is None else vmax
        self.notes_ = _empty_notes(self.maps, self.counts)
        self.axes_, self.im_ = _draw_maps(self.figure_, self.maps, _labels(self.group_names, self.counts, len(self.maps)),
                                          cmap=cmap, vmin=0.0, vmax=vmax or 1.0, title=self.title,
                                          colorbar_label="share of attribution (each map sums to 1)",
                                          notes=self.notes_)
        return self


class PerDigitMapsComparisonDisplay:
    """Two sets of per-digit maps side by side on the same colour scale, plus A - B.

    Parameters: maps_a, maps_b, ndarrays of shape (n_groups, grid, grid); name_a, name_b, str;
    group_names, default=None.
    """

    def __init__(self, *, maps_a, maps_b, name_a="A", name_b="B", group_names=None, title=None):
        self.maps_a, self.maps_b = _check_maps(maps_a, "maps_a"), _check_maps(maps_b, "maps_b")
        if self.maps_a.shape != self.maps_b.shape:
            raise DigitlensError(f"maps_b: shape {self.maps_b.shape} differs from maps_a {self.maps_a.shape}")
        self.name_a, self.name_b, self.group_names, self.title = name_a, name_b, group_names, title

    @classmethod
    def from_runs(cls, run_a, run_b, method_a: str = "saliency", method_b: str | None = None):
        """Compare saved maps of two runs (or of two methods when run_b is run_a)."""
        method_b = method_b or method_a
        a, b = load_maps(run_a, method_a), load_maps(run_b, method_b)
        return cls(maps_a=a["maps"], maps_b=b["maps"], name_a=f"{Path(run_a).name}: {method_a}",
                   name_b=f"{Path(run_b).name}: {method_b}", group_names=list(a["group_names"]))

    def plot(self) -> "PerDigitMapsComparisonDisplay":
        plt = pyplot()
        nrows = int(np.ceil(len(self.maps_a) / 2))
        self.figure_ = plt.figure(figsize=(13.5, 1.85 * nrows + 0.9), layout="constrained")
        sub_a, sub_b, sub_d = self.figure_.subfigures(1, 3, wspace=0.02)
        names = _labels(self.group_names, None, len(self.maps_a))
        vmax = _nanmax(self.maps_a, self.maps_b) or 1.0
        diff = self.maps_a - self.maps_b
        dmax = _nanmax(np.abs(diff)) or 1.0
        label = "share of attribution (same scale in A and B)"
        notes_a, notes_b = _empty_notes(self.maps_a), _empty_notes(self.maps_b)
        notes_d = [None if a is None and b is None else f"{'A' if a else 'B'} has no map" for a, b in zip(notes_a, notes_b)]
        self.axes_a_, _ = _draw_maps(sub_a, self.maps_a, names, cmap=SEQUENTIAL_CMAP, vmin=0, vmax=vmax,
                                     title=f"A = {self.name_a}", colorbar_label=label, notes=notes_a)
        self.axes_b_, _ = _draw_maps(sub_b, self.maps_b, names, cmap=SEQUENTIAL_CMAP, vmin=0, vmax=vmax,
                                     title=f"B = {self.name_b}", colorbar_label=label, notes=notes_b)
        self.axes_diff_, _ = _draw_maps(sub_d, diff, names, cmap=DIVERGING_CMAP, vmin=-dmax, vmax=dmax,
                                        title="A - B (red: more in A, blue: more in B)",
                                        colorbar_label="difference of shares", notes=notes_d)
        if self.title:
            self.figure_.suptitle(self.title)
        return self
