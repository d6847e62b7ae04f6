"""Confidence intervals for evaluation numbers: plain functions the stages import.

* :func:`wilson_interval`: the Wilson score interval of a proportion k / n (accuracy, the
  accuracy in one calibration bin, the share of a digit read as another).
* :func:`bootstrap_metrics`: percentile intervals of per-digit precision, recall, F1 and
  one-vs-rest accuracy, macro F1 and the ECE, from a seeded bootstrap over the test images. All
  resamples are evaluated at once (one ``np.bincount`` over B * K * K confusion cells), so
  1,000 resamples of 10,000 images take well under a second.
* :func:`mean_interval`: the Student-t interval of a mean (the mean confidence over test images).
* :func:`overlapping`, :func:`format_ci`: which intervals overlap; ``99.31% (99.13-99.45)``.

Same seed, same indices, same intervals.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from digitlens.errors import DigitlensError

#: Resamples of :func:`bootstrap_metrics` in ``evaluate`` (about 0.3 s on 10,000 images).
DEFAULT_BOOTSTRAP = 1000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
#: Largest number of (resample, image) pairs held in memory at once.
_CHUNK_ELEMENTS = 4_000_000


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise DigitlensError(f"confidence: expected a level in (0, 1), got {confidence}")
    return float(confidence)


def wilson_interval(k: Any, n: Any, confidence: float = CONFIDENCE) -> np.ndarray:
    """Wilson score interval of the proportion ``k / n``: array of shape ``(..., 2)`` (low, high)
    for scalar or array ``k``, ``n``; n = 0 gives (0, 1)."""
    z = NormalDist().inv_cdf(0.5 + _check_confidence(confidence) / 2)
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise DigitlensError("k: expected 0 <= k <= n successes")
    safe_n = np.where(n > 0, n, 1.0)
    p = k / safe_n
    denominator = 1 + z * z / safe_n
    centre = (p + z * z / (2 * safe_n)) / denominator
    half = z / denominator * np.sqrt(p * (1 - p) / safe_n + z * z / (4 * safe_n * safe_n))
    low = np.where(n > 0, np.clip(centre - half, 0.0, 1.0), 0.0)
    high = np.where(n > 0, np.clip(centre + half, 0.0, 1.0), 1.0)
    # the exact ends: no success -> low 0, all successes -> high 1 (rounding gives 1e-17 otherwise)
    low = np.where(k == 0, 0.0, low)
    high = np.where((k == n) & (n > 0), 1.0, high)
    return np.stack([low, high], axis=-1)


def mean_interval(values: Any, confidence: float = CONFIDENCE, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Student-t interval of the mean of ``values`` (1-D, e.g. the model's confidence on each test
    image): array (low, high); (mean, mean) for fewer than two values or no spread. ``bounds``
    (low, high): the range the values live in (probabilities: (0, 1)); the interval is clipped to it,
    which matters only for a handful of values."""
    from scipy.stats import t as student_t  # lazy: scipy.stats takes ~0.5 s to import

    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise DigitlensError("values: no values to average")
    mean = float(values.mean())
    if values.size < 2:
        return np.array([mean, mean])
    half = float(student_t.ppf(0.5 + _check_confidence(confidence) / 2, values.size - 1)
                 * values.std(ddof=1) / np.sqrt(values.size))
    out = np.array([mean - half, mean + half])
    return out if bounds is None else np.clip(out, *bounds)


def bootstrap_indices(n: int, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Row indices of ``n_resamples`` bootstrap resamples of ``n`` items: int32 array of shape
    (n_resamples, n), drawn with replacement by ``numpy.random.default_rng(seed)``."""
    if int(n_resamples) < 1:
        raise DigitlensError(f"bootstrap: expected at least 1 resample, got {n_resamples}")
    if int(n) < 1:
        raise DigitlensError("bootstrap: no samples to resample")
    return np.random.default_rng(seed).integers(0, int(n), size=(int(n_resamples), int(n)), dtype=np.int32)


def percentile_interval(samples: Any, confidence: float = CONFIDENCE) -> np.ndarray:
    """Percentile interval over the first axis of ``samples`` (B, ...): array of shape (..., 2)."""
    alpha = 1 - _check_confidence(confidence)
    q = np.quantile(np.asarray(samples, dtype=np.float64), [alpha / 2, 1 - alpha / 2], axis=0)
    return np.moveaxis(q, 0, -1)


def confusion_matrices(y_true: np.ndarray, y_pred: np.ndarray, indices: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix of every resample: int64 array (B, n_classes, n_classes), rows = true digit;
    ``indices`` (B, N) as from :func:`bootstrap_indices`."""
    cell = (np.asarray(y_true, np.int64) * n_classes + np.asarray(y_pred, np.int64))
    n_resamples = indices.shape[0]
    kk = n_classes * n_classes
    out = np.empty((n_resamples, kk), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(indices.shape[1], 1))
    for start in range(0, n_resamples, step):  # chunks bound the memory; each chunk is one bincount
        block = indices[start:start + step]
        offset = np.arange(block.shape[0], dtype=np.int64)[:, None] * kk
        out[start:start + step] = np.bincount((offset + cell[block]).ravel(),
                                              minlength=block.shape[0] * kk).reshape(-1, kk)
    return out.reshape(n_resamples, n_classes, n_classes)


def scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class ``precision``, ``recall``, ``f1``, one-vs-rest ``accuracy`` (each (..., K)) and
    ``macro_f1`` (...) from confusion matrices (..., K, K); 0 where a denominator is 0 (as
    scikit-learn's ``zero_division=0``)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    predicted = cm.sum(axis=-2)
    actual = cm.sum(axis=-1)
    n = cm.sum(axis=(-2, -1))[..., None]
    fp, fn = predicted - tp, actual - tp

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {"precision": ratio(tp, predicted), "recall": ratio(tp, actual), "f1": f1,
            "accuracy": ratio(n - fp - fn, np.broadcast_to(n, tp.shape)), "macro_f1": f1.mean(axis=-1)}


def _bin_of(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], confidence, side="left")  # as metrics.calibration_bins


def bootstrap_ece(y_true: np.ndarray, proba: np.ndarray, indices: np.ndarray, n_bins: int) -> np.ndarray:
    """Top-label ECE (``n_bins`` equal-width bins, as :func:`digitlens.metrics.calibration_bins`)
    of every resample: float array (B,)."""
    proba = np.asarray(proba, dtype=np.float64)
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    which = _bin_of(confidence, n_bins).astype(np.int64)
    gap = correct - confidence  # sum over a bin of (correct - confidence) = count * (accuracy - confidence)
    n_resamples, n = indices.shape
    out = np.empty(n_resamples)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n_resamples, step):
        block = indices[start:start + step]
        offset = np.arange(block.shape[0], dtype=np.int64)[:, None] * n_bins
        sums = np.bincount((offset + which[block]).ravel(), weights=gap[block].ravel(),
                           minlength=block.shape[0] * n_bins).reshape(-1, n_bins)
        out[start:start + step] = np.abs(sums).sum(axis=1) / n
    return out


def bootstrap_metrics(y_true: Any, y_pred: Any, proba: Any = None, *, n_classes: int | None = None,
                      proba_calibrated: Any = None, n_resamples: int = DEFAULT_BOOTSTRAP,
                      seed: int = DEFAULT_SEED, confidence: float = CONFIDENCE, n_bins: int = 15) -> dict:
    """Percentile bootstrap intervals over the test images (resampled with replacement).

    Returns a dict of float arrays: ``precision``, ``recall``, ``f1``, ``accuracy`` (one-vs-rest)
    of shape (n_classes, 2); ``macro_f1`` (2,); with ``proba`` (N, n_classes) ``ece`` (2,), with
    ``proba_calibrated`` ``ece_calibrated`` (2,) over the same resamples; and ``bootstrap``:
    ``{"n_resamples", "seed", "confidence"}``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise DigitlensError(f"y_pred: expected labels of shape {y_true.shape} like y_true, got {y_pred.shape}")
    if n_classes is None:
        n_classes = max(10, int(max(y_true.max(), y_pred.max())) + 1)
    indices = bootstrap_indices(len(y_true), n_resamples, seed)
    scores = scores_from_confusion(confusion_matrices(y_true, y_pred, indices, n_classes))
    out: dict[str, Any] = {name: percentile_interval(scores[name], confidence)
                           for name in ("precision", "recall", "f1", "accuracy", "macro_f1")}
    for key, value in (("ece", proba), ("ece_calibrated", proba_calibrated)):
        if value is not None:
            out[key] = percentile_interval(bootstrap_ece(y_true, value, indices, n_bins), confidence)
    out["bootstrap"] = {"n_resamples": int(n_resamples), "seed": int(seed), "confidence": float(confidence)}
    return out


def overlapping(intervals: Sequence[Sequence[float]], reference: int = 0) -> list[int]:
    """Positions of the intervals (each (low, high)) that overlap ``intervals[reference]``,
    ``reference`` included, in their order."""
    low, high = intervals[reference]
    return [i for i, (a, b) in enumerate(intervals) if a <= high and b >= low]


def format_ci(value: float, ci: Sequence[float] | None, *, percent: bool = True, digits: int = 2) -> str:
    """``99.31% (99.13-99.45)`` (percent) or ``0.981 (0.975-0.987)``; just the value without ``ci``."""
    if percent:
        head = f"{value * 100:.{digits}f}%"
        return head if ci is None else f"{head} ({ci[0] * 100:.{digits}f}-{ci[1] * 100:.{digits}f})"
    head = f"{value:.{digits}f}"
    return head if ci is None else f"{head} ({ci[0]:.{digits}f}-{ci[1]:.{digits}f})"


def check_bootstrap(bootstrap: Any) -> int:
    """``bootstrap`` as a number of resamples >= 0 (0: no bootstrap intervals); a one-line error otherwise."""
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise DigitlensError(f"--bootstrap {bootstrap!r}: expected a number of resamples >= 0 "
                             f"(0 skips the bootstrap intervals; default {DEFAULT_BOOTSTRAP})")
    return int(bootstrap)
