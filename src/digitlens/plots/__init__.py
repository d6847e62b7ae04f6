"""Figures as scikit-learn style Display classes, one per file.

Each has ``from_predictions(...)`` on plain numpy arrays (so Keras, JAX or scikit-learn users can
use it), ``plot(ax=None) -> self`` keeping ``ax_`` and ``figure_``. matplotlib is imported only
when plotting; without an explicit backend the non-interactive Agg backend is used.

Figures import only the computation floor (:mod:`digitlens.metrics`, :mod:`digitlens.history`,
:mod:`digitlens.intervals`, ...), never a stage. The history readers are re-exported from
:mod:`digitlens.history` for convenience (``load_history`` reads any history file into arrays).
"""

from digitlens.plots.confusion_matrix import ConfusionMatrixDisplay
from digitlens.plots.misclassified_gallery import MisclassifiedGalleryDisplay
from digitlens.plots.per_digit_metrics import PerDigitMetricsDisplay
from digitlens.plots.prediction_gallery import PredictionGalleryDisplay
from digitlens.plots.reliability_diagram import ReliabilityDiagramDisplay
from digitlens.history import (
    load_history,
    normalise_history,
    read_history_csv,
    read_keras_csvlogger,
    read_keras_history_json,
)
from digitlens.plots.training_curves import TrainingCurvesDisplay

__all__ = [
    "ConfusionMatrixDisplay",
    "MisclassifiedGalleryDisplay",
    "PerDigitMetricsDisplay",
    "PredictionGalleryDisplay",
    "ReliabilityDiagramDisplay",
    "TrainingCurvesDisplay",
    "load_history",
    "normalise_history",
    "read_history_csv",
    "read_keras_csvlogger",
    "read_keras_history_json",
]
