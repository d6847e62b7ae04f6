"""Per-group attribution maps as data: grouping, pooling onto the patch grid, normalising, and the
``maps_<method>.npz`` files of ``RUN/explain/`` (floor layer: imports only errors, runio, numpy, torch).

A map here is the mean |attribution| of a group of images: ``pixel_maps`` (n_groups, H, W) at full
resolution, and ``maps`` (n_groups, grid, grid) sum-pooled onto a patch grid and normalised to sum 1
(all-NaN for a group without mass). :class:`GroupedMaps` is the one implementation that turns
per-image maps into these; the explain stage (:class:`digitlens.explain.aggregate.PerDigitMaps`)
and the figures (:class:`digitlens.plots.heatmaps.PerDigitMapsDisplay`) both use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digitlens.errors import DigitlensError
from digitlens.runio import read_json, read_npz, write_json, write_npz

#: How images are grouped: by true label, by predicted label, or correct vs incorrect.
GROUP_BY = ("true", "predicted", "correct")

#: What each array of a ``maps_<method>.npz`` holds (written into ``manifest.json``).
MAP_ARRAYS = {"maps": "(n_groups, grid, grid), each map sums to 1; all-NaN for a group without mass "
                      "(no images, or attribution zero on every image)",
              "has_mass": "(n_groups,) bool, False where maps is all-NaN",
              "pixel_maps": "(n_groups, H, W), mean |attribution| per group",
              "counts": "(n_groups,) images per group", "group_names": "(n_groups,)"}


def group_names(group_by: str, n_classes: int = 10) -> list[str]:
    """Names of the groups: digits '0'..'9' or ['incorrect', 'correct']."""
    if group_by not in GROUP_BY:
        raise DigitlensError(f"--group-by {group_by!r}: choose from {', '.join(GROUP_BY)}")
    return ["incorrect", "correct"] if group_by == "correct" else [str(i) for i in range(n_classes)]


def image_groups(group_by: str, labels, predictions) -> np.ndarray:
    """The group index of each image (N,) int64: its label ('true'), its prediction ('predicted'),
    or 1 when the prediction is right and 0 when it is wrong ('correct')."""
    labels = np.asarray(labels, dtype=np.int64)
    if group_by == "true":
        return labels
    predictions = np.asarray(predictions, dtype=np.int64)
    return predictions if group_by == "predicted" else (predictions == labels).astype(np.int64)


def pool_to_grid(maps, grid: int) -> np.ndarray:
    """Sum-pool maps of shape (..., H, W) onto a ``grid`` x ``grid`` patch grid: (..., grid, grid).

    For 28x28 and grid 7 each cell is one 4x4 patch; other sizes use adaptive pooling.
    """
    t = torch.as_tensor(np.asarray(maps, dtype=np.float64))
    lead, (h, w) = t.shape[:-2], t.shape[-2:]
    if grid < 1 or grid > min(h, w):
        raise DigitlensError(f"--grid {grid}: must be between 1 and {min(h, w)}")
    pooled = F.adaptive_avg_pool2d(t.reshape(-1, 1, h, w), grid) * (h * w / grid / grid)
    return pooled.reshape(*lead, grid, grid).numpy()


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Each map (last two axes) divided by its sum, so it sums to 1. A map with no mass (zero
    everywhere: no images in the group, or an attribution that is zero on every image) is not a
    distribution and becomes all-NaN, never silently zeros; :func:`has_mass` tells which."""
    maps = np.asarray(maps, dtype=np.float64)
    total = maps.sum(axis=(-2, -1), keepdims=True)
    return np.divide(maps, total, out=np.full_like(maps, np.nan), where=total > 0)


def has_mass(maps: np.ndarray) -> np.ndarray:
    """Which maps (..., H, W) are distributions: bool of shape (...), False for all-NaN or zero maps."""
    maps = np.asarray(maps, dtype=np.float64)
    finite = np.isfinite(maps).all(axis=(-2, -1))
    return finite & (np.nan_to_num(maps).sum(axis=(-2, -1)) > 0)


class GroupedMaps:
    """Running per-group sums of per-image maps; memory bounded by one (n_groups, H, W) array.

    ``add(per_image, groups)`` adds a batch of maps (N, H, W) whose images belong to ``groups`` (N,);
    ``pixel_maps()`` is the mean map of each group (n_groups, H, W), ``maps()`` the same pooled onto
    the ``grid`` and normalised to sum 1 (n_groups, grid, grid), all-NaN for a group without mass.
    """

    def __init__(self, n_groups: int, grid: int = 7):
        self.n_groups, self.grid = n_groups, grid
        self.reset()

    def reset(self) -> "GroupedMaps":
        self.sums_ = None
        self.counts_ = np.zeros(self.n_groups, dtype=np.int64)
        return self

    def add(self, per_image, groups) -> "GroupedMaps":
        """Add per-image maps (N, H, W) (summed over channels, e.g. |attribution|) of images in ``groups`` (N,)."""
        per_image = torch.as_tensor(per_image).double()
        groups = torch.as_tensor(groups, dtype=torch.long)
        if per_image.ndim != 3 or groups.shape != per_image.shape[:1]:
            raise DigitlensError(f"maps of shape {tuple(per_image.shape)} and groups of shape {tuple(groups.shape)}: "
                                 "expected (N, H, W) and (N,)")
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= self.n_groups):
            raise DigitlensError(f"groups: expected values in 0..{self.n_groups - 1}")
        if self.sums_ is None:
            self.sums_ = torch.zeros(self.n_groups, *per_image.shape[1:], dtype=torch.float64)
        self.sums_.index_add_(0, groups, per_image)
        self.counts_ += np.bincount(groups.numpy(), minlength=self.n_groups)
        return self

    def pixel_maps(self) -> np.ndarray:
        """Mean map per group at full resolution, (n_groups, H, W), not normalised (zeros for an empty group)."""
        if self.sums_ is None:
            raise DigitlensError(f"{type(self).__name__}: no images seen yet")
        counts = np.maximum(self.counts_, 1)[:, None, None]
        return self.sums_.numpy() / counts

    def maps(self) -> np.ndarray:
        """The per-group maps pooled onto the grid and normalised to sum 1: (n_groups, grid, grid);
        all-NaN for a group without mass."""
        return normalise_maps(pool_to_grid(self.pixel_maps(), self.grid))


def outer_ring_shares(result: dict, images: torch.Tensor, labels: np.ndarray, y_pred: np.ndarray) -> dict:
    """Share of each group's map on the outer ring of grid cells, per method of ``result["maps"]``,
    and the same share of the group's ink (``"ink"``): {name: [share per group, None where the map
    has no mass]}. On MNIST the ring (pixels 0-3 and 24-27 of a 7x7 grid) holds a few percent of
    the ink, so a map with much more mass there points at background."""
    grid = result["grid"]
    ring = np.ones((grid, grid), dtype=bool)
    ring[1:-1, 1:-1] = False
    groups = image_groups(result["group_by"], labels, y_pred)
    n_groups = len(result["group_names"])
    ink = np.zeros((n_groups, *images.shape[-2:]))
    np.add.at(ink, groups, images.sum(dim=1).double().numpy())
    maps = {"ink": normalise_maps(pool_to_grid(ink, grid)), **result["maps"]}
    return {name: [float(m[ring].sum()) if np.isfinite(m).all() else None for m in group_maps]
            for name, group_maps in maps.items()}


def peaks_on_unseen_patches(result: dict) -> dict:
    """{method: [group names whose largest patch is one no class score depends on
    (``result["unseen_patches"]``)]}."""
    unseen = {tuple(p) for p in result.get("unseen_patches", [])}
    out = {}
    for method, maps in result["maps"].items():
        bad = []
        for name, m in zip(result["group_names"], maps):
            if np.isfinite(m).all() and unseen:
                r, c = np.unravel_index(int(np.argmax(m)), m.shape)
                if (int(r), int(c)) in unseen:
                    bad.append(name)
        out[method] = bad
    return out


def save_maps(explain_dir, result: dict) -> dict:
    """Write ``explain_dir/maps_<method>.npz`` for each method of ``result`` (the arrays of
    :data:`MAP_ARRAYS`); returns {method: file name}."""
    files = {}
    for method in result["methods"]:
        path = write_npz(Path(explain_dir) / f"maps_{method}.npz", maps=result["maps"][method],
                         has_mass=has_mass(result["maps"][method]), pixel_maps=result["pixel_maps"][method],
                         counts=result["counts"], group_names=np.asarray(result["group_names"]))
        files[method] = path.name
    return files


def load_maps(run_dir, method: str) -> dict:
    """The saved per-group maps of ``method`` in ``run_dir/explain/``: dict of ndarrays
    (maps (G, grid, grid), has_mass (G,), pixel_maps (G, H, W), counts (G,), group_names (G,))."""
    return read_npz(Path(run_dir) / "explain" / f"maps_{method.replace('-', '_')}.npz")


def write_maps_manifest(explain_dir, summary: dict) -> Path:
    """Write ``explain_dir/manifest.json``: what the maps show (run, split, dataset, methods, grouping,
    grid, counts, files) and what each array of the ``.npz`` files holds; returns its path."""
    manifest = {k: summary[k] for k in ("run", "split", "dataset", "methods", "group_by", "group_names", "grid",
                                         "target", "n_images", "counts", "files")}
    manifest["map_arrays"] = dict(MAP_ARRAYS)
    return write_json(Path(explain_dir) / "manifest.json", manifest)


def saved_maps(run_dir, methods, result: dict, split: str) -> dict:
    """The maps of ``methods`` that ``run_dir/explain/`` already holds for the same split, number of
    images, grouping and grid as ``result`` ({method: (n_groups, grid, grid)}); methods not saved
    there are left out, and a folder explained otherwise gives {}."""
    manifest_path = Path(run_dir) / "explain" / "manifest.json"
    if not manifest_path.is_file():
        return {}
    manifest = read_json(manifest_path)
    same = {"split": split, "group_by": result["group_by"], "grid": result["grid"], "n_images": result["n_images"]}
    if any(manifest.get(key) != value for key, value in same.items()):
        return {}
    saved = manifest.get("files", {}).get("maps", {})
    return {m: load_maps(run_dir, m)["maps"] for m in methods if m in saved}
