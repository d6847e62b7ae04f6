"""The misclassified images, most confident mistakes first, titled true / predicted (confidence)."""

from __future__ import annotations

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.plots._common import as_image_stack
from digitlens.plots.prediction_gallery import PredictionGalleryDisplay, _predictions_from


class MisclassifiedGalleryDisplay(PredictionGalleryDisplay):
    """The most confident mistakes, drawn like :class:`PredictionGalleryDisplay` (same parameters)."""

    default_title = "Most confident mistakes"

    @classmethod
    def from_predictions(cls, images, y_true, y_pred=None, *, proba=None, confidence=None, n_images: int = 20,
                         title=None) -> "MisclassifiedGalleryDisplay":
        """Pick the misclassified images, sorted by the confidence of the wrong prediction
        (highest first; ties and missing confidences keep dataset order), at most ``n_images``."""
        images = as_image_stack(images)
        y_true, y_pred, confidence = _predictions_from(y_true, y_pred, proba, confidence)
        if len(images) != len(y_true):
            raise DigitlensError(f"images: {len(images)} images for {len(y_true)} labels")
        wrong = np.flatnonzero(y_true != y_pred)
        if confidence is not None:
            wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
        shown = wrong[:n_images]
        if title is None:
            title = (f"{cls.default_title}: {len(shown)} of {len(wrong):,} errors "
                     f"in {len(y_true):,} images (true / predicted (confidence))")
        return cls(images=images[shown], y_true=y_true[shown], y_pred=y_pred[shown],
                   confidence=None if confidence is None else confidence[shown], indices=shown, title=title)
