"""Figures as scikit-learn style Display classes, one per file.

Each has ``from_predictions(...)`` on plain numpy arrays (so Keras, JAX or scikit-learn users can
use it), ``plot(ax=None) -> self`` keeping ``ax_`` and ``figure_``. matplotlib is imported only
when plotting; without an explicit backend the non-interactive Agg backend is used.
"""

from digitlens.plots.confusion_matrix import ConfusionMatrixDisplay
from digitlens.plots.misclassified_gallery import MisclassifiedGalleryDisplay
from digitlens.plots.per_digit_metrics import PerDigitMetricsDisplay
from digitlens.plots.prediction_gallery import PredictionGalleryDisplay
from digitlens.plots.reliability_diagram import ReliabilityDiagramDisplay
from digitlens.plots.training_curves import (
    TrainingCurvesDisplay,
    normalise_history,
    read_history,
    read_history_csv,
    read_keras_csvlogger,
    read_keras_history_json,
)

__all__ = [
    "ConfusionMatrixDisplay",
    "MisclassifiedGalleryDisplay",
    "PerDigitMetricsDisplay",
    "PredictionGalleryDisplay",
    "ReliabilityDiagramDisplay",
    "TrainingCurvesDisplay",
    "normalise_history",
    "read_history",
    "read_history_csv",
    "read_keras_csvlogger",
    "read_keras_history_json",
]
