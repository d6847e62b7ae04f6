"""Per-digit maps: stream images in batches, keep only per-group sums of |attribution|.

Memory stays bounded by one batch: per-image maps are reduced to (groups, H, W) sums at once.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from digitlens.device import model_device
from digitlens.errors import DigitlensError
from digitlens.explain.methods import IGInfo, attribute, parse_methods

GROUP_BY = ("true", "predicted", "correct")


def group_names(group_by: str, n_classes: int = 10) -> list[str]:
    """Names of the groups: digits '0'..'9' or ['incorrect', 'correct']."""
    if group_by not in GROUP_BY:
        raise DigitlensError(f"--group-by {group_by!r}: choose from {', '.join(GROUP_BY)}")
    return ["incorrect", "correct"] if group_by == "correct" else [str(i) for i in range(n_classes)]


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


class PerDigitMaps:
    """Per-digit maps of one attribution ``method`` for ``model``, in Captum's style.

    ``attribute(images, labels)`` returns an ndarray of shape (n_groups, grid, grid), each map the
    mean |attribution| of the group pooled onto the grid and normalised to sum 1; a group with no
    images or no attribution at all is all-NaN (see :func:`normalise_maps`). The same result
    comes from calling ``update`` batch by batch and then ``maps()`` (bounded memory).

    group_by: 'true' (default), 'predicted' or 'correct'. The attribution target is the true label
    for 'true' and the predicted label otherwise.
    """

    def __init__(self, model: nn.Module, method: str = "saliency", *, grid: int = 7, group_by: str = "true",
                 n_classes: int = 10, **method_kwargs):
        self.model = model
        self.method = parse_methods([method], model)[0]
        self.grid, self.group_by, self.n_classes = grid, group_by, n_classes
        self.group_names = group_names(group_by, n_classes)
        self.method_kwargs = method_kwargs
        self.ig_info = IGInfo()
        self.reset()

    def reset(self) -> "PerDigitMaps":
        self.sums_ = None
        self.counts_ = np.zeros(len(self.group_names), dtype=np.int64)
        self.ig_info = IGInfo()
        return self

    def update(self, images: torch.Tensor, labels, predictions=None) -> torch.Tensor:
        """Add one batch; returns the batch's |attribution| summed over channels, (N, H, W)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if predictions is None and self.group_by != "true":
            with torch.no_grad():
                predictions = self.model(images.to(model_device(self.model))).argmax(1).cpu()
        predictions = None if predictions is None else torch.as_tensor(predictions, dtype=torch.long)
        target = labels if self.group_by == "true" else predictions
        attr = attribute(self.model, images, target, self.method, ig_info=self.ig_info, **self.method_kwargs)
        per_image = attr.detach().abs().sum(dim=1).double()
        if self.group_by == "true":
            groups = labels
        elif self.group_by == "predicted":
            groups = predictions
        else:
            groups = (predictions == labels).long()
        if self.sums_ is None:
            self.sums_ = torch.zeros(len(self.group_names), *per_image.shape[1:], dtype=torch.float64)
        self.sums_.index_add_(0, groups, per_image)
        self.counts_ += np.bincount(groups.numpy(), minlength=len(self.group_names))
        return per_image

    def all_reduce(self) -> "PerDigitMaps":
        """Add up the sums, counts and integrated-gradients records of every rank of the process group
        (torchrun), so that each rank holds the maps of all images."""
        import torch.distributed as dist

        from digitlens.distributed import all_reduce_sum

        if self.sums_ is None:  # a rank without images still takes part in the sum
            raise DigitlensError("PerDigitMaps.all_reduce: this rank saw no images (more processes than batches?)")
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        both = torch.cat([self.sums_.flatten(), torch.as_tensor(self.counts_, dtype=torch.float64)]).to(device)
        all_reduce_sum(both)
        both = both.cpu()
        self.sums_ = both[:self.sums_.numel()].reshape(self.sums_.shape)
        self.counts_ = both[self.sums_.numel():].round().to(torch.int64).numpy()
        records = [None] * dist.get_world_size()
        dist.all_gather_object(records, vars(self.ig_info))
        self.ig_info = IGInfo(**{key: [v for r in records for v in r[key]] for key in vars(self.ig_info)})
        return self

    def pixel_maps(self) -> np.ndarray:
        """Mean |attribution| per group at full resolution, (n_groups, H, W), not normalised."""
        if self.sums_ is None:
            raise DigitlensError("PerDigitMaps: no images seen yet")
        counts = np.maximum(self.counts_, 1)[:, None, None]
        return self.sums_.numpy() / counts

    def maps(self) -> np.ndarray:
        """The per-group maps pooled onto the grid and normalised to sum 1: (n_groups, grid, grid);
        all-NaN for a group without mass."""
        return normalise_maps(pool_to_grid(self.pixel_maps(), self.grid))

    def attribute(self, images: torch.Tensor, labels, *, batch_size: int = 256, predictions=None) -> np.ndarray:
        """Per-group maps over all ``images`` (N, C, H, W), computed in batches: (n_groups, grid, grid)."""
        self.reset()
        for start in range(0, images.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            self.update(images[sl], torch.as_tensor(labels)[sl],
                        None if predictions is None else torch.as_tensor(predictions)[sl])
        return self.maps()
