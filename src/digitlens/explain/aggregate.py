"""Per-digit maps: stream images in batches, keep only per-group sums of |attribution|.

Memory stays bounded by one batch: per-image maps are reduced to (groups, H, W) sums at once.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from digitlens.device import model_device
from digitlens.distributed import all_reduce_sum
from digitlens.errors import DigitlensError
from digitlens.explain.maps import GroupedMaps, group_names, image_groups
from digitlens.explain.methods import IGInfo, attribute, parse_methods

__all__ = ["PerDigitMaps"]


class PerDigitMaps(GroupedMaps):
    """Per-digit maps of one attribution ``method`` for ``model``, in Captum's style.

    ``attribute(images, labels)`` returns an ndarray of shape (n_groups, grid, grid), each map the
    mean |attribution| of the group pooled onto the grid and normalised to sum 1; a group with no
    images or no attribution at all is all-NaN (see :func:`normalise_maps`). The same result
    comes from calling ``update`` batch by batch and then ``maps()`` (bounded memory); the sums
    are kept by :class:`digitlens.explain.maps.GroupedMaps`.

    group_by: 'true' (default), 'predicted' or 'correct'. The attribution target is the true label
    for 'true' and the predicted label otherwise.
    """

    def __init__(self, model: nn.Module, method: str = "saliency", *, grid: int = 7, group_by: str = "true",
                 n_classes: int = 10, **method_kwargs):
        self.model = model
        self.method = parse_methods([method], model)[0]
        self.group_by, self.n_classes = group_by, n_classes
        self.group_names = group_names(group_by, n_classes)
        self.method_kwargs = method_kwargs
        super().__init__(len(self.group_names), grid)

    def reset(self) -> "PerDigitMaps":
        super().reset()
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
        self.add(per_image, image_groups(self.group_by, labels, predictions))
        return per_image

    def all_reduce(self) -> "PerDigitMaps":
        """Add up the sums, counts and integrated-gradients records of every rank of the process group
        (torchrun), so that each rank holds the maps of all images."""
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

    def attribute(self, images: torch.Tensor, labels, *, batch_size: int = 256, predictions=None) -> np.ndarray:
        """Per-group maps over all ``images`` (N, C, H, W), computed in batches: (n_groups, grid, grid)."""
        self.reset()
        for start in range(0, images.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            self.update(images[sl], torch.as_tensor(labels)[sl],
                        None if predictions is None else torch.as_tensor(predictions)[sl])
        return self.maps()
