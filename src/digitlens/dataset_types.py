"""The shapes data take in digitlens: :class:`DigitDataset` (one split) and :class:`Splits`, and the
names of the built-in datasets. :mod:`digitlens.data` (built-in datasets) and
:mod:`digitlens.userdata` (a user's folders and CSV files) both produce them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: The built-in datasets (:func:`digitlens.data.load_splits`); anything else given as ``--dataset`` is a path.
DATASETS = ("mnist", "digits")


@dataclass
class DigitDataset:
    """Images and labels of one split.

    images: float32 tensor of shape (N, 1, H, W) in [0, 1]; labels: int64 tensor of shape (N,),
    or None for unlabelled data (a Kaggle test.csv); files: the image file of each sample, for
    image folders (else None).
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor | None
    files: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Splits:
    """The train, validation and test parts of a dataset."""

    train: DigitDataset
    val: DigitDataset
    test: DigitDataset
