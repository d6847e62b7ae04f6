"""Classification metrics of a set of predictions: accuracy with its Wilson interval, per-digit
precision/recall/F1 (scikit-learn), the confusion matrix and its most-confused pairs, top-label
calibration bins and ECE, bootstrap intervals and temperature scaling, as JSON-ready dicts.

Floor module: pure computation on numpy arrays (no files, no stage); ``evaluate`` writes what it
returns into ``metrics.json``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from digitlens import calibration
from digitlens.errors import DigitlensError
from digitlens.groups import DIGIT_GROUPS
from digitlens.intervals import DEFAULT_BOOTSTRAP, DEFAULT_SEED, bootstrap_metrics, mean_interval, wilson_interval

#: Equal-width confidence bins of the reliability table and the ECE.
ECE_BINS = 15

#: ``metrics.json`` ``calibration_note`` when no validation split is there to fit a temperature on.
NO_VAL_NOTE = "no validation split: temperature scaling skipped"


def as_labels(y: Any, name: str = "y") -> np.ndarray:
    """Integer labels of shape (N,) from labels (N,) or one-hot / scores (N, C) (argmax)."""
    arr = np.asarray(y)
    if arr.ndim == 2:
        arr = arr.argmax(axis=1)
    if arr.ndim != 1:
        raise DigitlensError(f"{name}: expected labels of shape (N,) or one-hot (N, C), got shape {arr.shape}")
    if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise DigitlensError(f"{name}: labels must be whole numbers")
    return arr.astype(np.int64)


def check_proba(proba: Any, n: int) -> np.ndarray:
    """``proba`` as a float64 array (n, n_classes) of probabilities; a one-line error otherwise."""
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] != n:
        raise DigitlensError(f"proba: expected shape ({n}, n_classes), got {proba.shape}")
    if proba.size and (proba.min() < -1e-6 or proba.max() > 1 + 1e-6):
        raise DigitlensError("proba: values must be probabilities in [0, 1] (apply softmax to logits)")
    return proba


def calibration_bins(y_true: Any, proba: Any, n_bins: int = ECE_BINS) -> dict:
    """Top-label reliability table over ``n_bins`` equal-width confidence bins.

    Returns a dict of lists of length ``n_bins``: ``bin_edges`` (n_bins + 1), ``confidence`` (mean
    top probability per bin, None when empty), ``accuracy`` (share of correct top labels, None
    when empty), ``count``; ``ece`` = sum_b count_b / N * |accuracy_b - confidence_b|, and
    ``mean_confidence`` with its 95% Student-t interval ``mean_confidence_ci``.

    A sample falls in bin b when edges[b] < confidence <= edges[b+1] (confidence 0 in bin 0), as
    in ``sklearn.calibration.calibration_curve``. Written by hand because scikit-learn has no
    multiclass expected calibration error and ``calibration_curve`` drops the bin counts.
    """
    y_true = as_labels(y_true, "y_true")
    proba = check_proba(proba, len(y_true))
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct, minlength=n_bins)
    nonempty = count > 0
    mean_conf = np.divide(conf_sum, count, out=np.zeros(n_bins), where=nonempty)
    mean_acc = np.divide(acc_sum, count, out=np.zeros(n_bins), where=nonempty)
    n = max(len(y_true), 1)
    ece = float(np.sum(count / n * np.abs(mean_acc - mean_conf)))
    return {
        "n_bins": n_bins,
        "bin_edges": edges.tolist(),
        "confidence": [float(c) if k else None for c, k in zip(mean_conf, nonempty)],
        "accuracy": [float(a) if k else None for a, k in zip(mean_acc, nonempty)],
        "count": count.astype(int).tolist(),
        "ece": ece,
        "mean_confidence": float(confidence.mean()) if len(y_true) else 0.0,
        "mean_confidence_ci": mean_interval(confidence, bounds=(0.0, 1.0)).tolist() if len(y_true) else [0.0, 0.0],
    }


def expected_calibration_error(y_true: Any, proba: Any, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins (a float in [0, 1])."""
    return calibration_bins(y_true, proba, n_bins)["ece"]


def confidence_by_outcome(y_true: Any, proba: Any) -> dict:
    """The model's confidence (top probability) on its right and on its wrong predictions.

    Returns ``correct`` and ``wrong``, each ``{"n", "mean_confidence", "mean_confidence_ci"}`` (the
    95% Student-t interval of the mean over those images, :func:`digitlens.intervals.mean_interval`,
    clipped to [0, 1]; mean and interval None when there are no such images), ``interval``
    (``"student_t"``), and ``most_confident_mistake``: ``{"index", "true", "predicted",
    "confidence"}`` of the wrong prediction with the highest confidence (ties: the first image, as
    the misclassified gallery orders them), None without mistakes."""
    y_true = as_labels(y_true, "y_true")
    proba = check_proba(proba, len(y_true))
    confidence = proba.max(axis=1)
    y_pred = proba.argmax(axis=1)
    right = y_pred == y_true
    out: dict[str, Any] = {"interval": "student_t"}
    for name, mask in (("correct", right), ("wrong", ~right)):
        values = confidence[mask]
        out[name] = {"n": int(mask.sum()),
                     "mean_confidence": float(values.mean()) if values.size else None,
                     "mean_confidence_ci": mean_interval(values, bounds=(0.0, 1.0)).tolist() if values.size else None}
    wrong = np.flatnonzero(~right)
    if wrong.size:
        worst = int(wrong[np.argmax(confidence[wrong])])  # argmax: the first of tied images
        out["most_confident_mistake"] = {"index": worst, "true": int(y_true[worst]), "predicted": int(y_pred[worst]),
                                         "confidence": float(confidence[worst])}
    else:
        out["most_confident_mistake"] = None
    return out


def group_metrics(y_true: Any, y_pred: Any, groups: Any = DIGIT_GROUPS) -> list[dict]:
    """Precision, recall and F1 of each digit group (default :data:`digitlens.groups.DIGIT_GROUPS`)
    as a binary decision "is it in this group?" (scikit-learn on the relabelled predictions).

    Returns one dict per group: ``digits`` (list), ``precision``, ``recall``, ``f1``, ``support``
    (test images of the group), ``n_predicted`` (images predicted in it), ``precision_ci`` and
    ``recall_ci`` (95% Wilson intervals of TP / n_predicted and TP / support)."""
    from sklearn.metrics import precision_recall_fscore_support  # lazy: ~1 s to import, see compute_metrics

    y_true = as_labels(y_true, "y_true")
    y_pred = as_labels(y_pred, "y_pred")
    out = []
    for group in groups:
        digits = [int(d) for d in group]
        truth, guess = np.isin(y_true, digits), np.isin(y_pred, digits)
        p, r, f, _ = precision_recall_fscore_support(truth, guess, average="binary", pos_label=True, zero_division=0)
        tp, support, predicted = int(np.sum(truth & guess)), int(truth.sum()), int(guess.sum())
        out.append({"digits": digits, "precision": float(p), "recall": float(r), "f1": float(f),
                    "support": support, "n_predicted": predicted,
                    "precision_ci": [float(v) for v in wilson_interval(tp, predicted)],
                    "recall_ci": [float(v) for v in wilson_interval(tp, support)]})
    return out


def most_confused_pairs(confusion: Any, top: int = 10) -> list[dict]:
    """The off-diagonal cells of a confusion matrix, largest count first (ties: smaller true, then
    predicted digit), as dicts ``true``, ``predicted``, ``count``, ``count_ci`` (95% Wilson interval
    of count / N, times N: the counts a rerun on as many images could give), ``share_of_true``
    (count / row sum) and ``share_of_true_ci`` (its 95% Wilson interval)."""
    cm = np.asarray(confusion)
    rows = cm.sum(axis=1)
    total = int(cm.sum())
    pairs = [
        (int(cm[t, p]), t, p)
        for t in range(cm.shape[0]) for p in range(cm.shape[1])
        if t != p and cm[t, p] > 0
    ]
    pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [
        {"true": t, "predicted": p, "count": c,
         "count_ci": [float(v) * total for v in wilson_interval(c, total)],
         "share_of_true": float(c / rows[t]) if rows[t] else 0.0,
         "share_of_true_ci": [float(v) for v in wilson_interval(c, rows[t])]}
        for c, t, p in pairs[:top]
    ]


def compute_metrics(y_true: Any, y_pred: Any, proba: Any = None, *, n_classes: int | None = None,
                    top_pairs: int = 10, n_bins: int = ECE_BINS) -> dict:
    """Classification metrics as a JSON-ready dict.

    Keys: ``n_samples``, ``n_classes``, ``accuracy``, ``accuracy_ci`` ([low, high], the 95% Wilson
    score interval, see :func:`digitlens.intervals.wilson_interval`), ``n_errors``, ``macro`` and ``weighted``
    (``precision``, ``recall``, ``f1``), ``per_digit`` (a list with one dict per class:
    ``digit``, ``precision``, ``recall``, ``f1``, ``accuracy``, ``support``), ``confusion_matrix``
    (n_classes x n_classes list of lists, rows = true digit), ``most_confused`` (see
    :func:`most_confused_pairs`), and with ``proba``: ``ece`` and ``calibration`` (see
    :func:`calibration_bins`) and ``confidence_by_outcome`` (see :func:`confidence_by_outcome`); with
    10 or more classes ``groups`` (see :func:`group_metrics`, the digit groups of :mod:`digitlens.groups`).

    Per-digit ``accuracy`` is the one-vs-rest accuracy (TP + TN) / N of "is it this digit?";
    per-digit recall is the share of that digit's images recognised. Classes are 0..n_classes-1
    (default: max(10, proba columns, largest label + 1)); a class with no prediction or no support
    gets precision or recall 0 (scikit-learn's ``zero_division=0``).
    """
    # scikit-learn's metrics take ~1 s to import: only when metrics are computed, not when a
    # figure module that imports this one is loaded.
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true = as_labels(y_true, "y_true")
    y_pred = as_labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise DigitlensError(f"y_pred: {len(y_pred)} predictions for {len(y_true)} labels")
    if len(y_true) == 0:
        raise DigitlensError("y_true: no samples to evaluate")
    if proba is not None:
        proba = check_proba(proba, len(y_true))
    if n_classes is None:
        n_classes = max(10, proba.shape[1] if proba is not None else 0, int(max(y_true.max(), y_pred.max())) + 1)
    labels = np.arange(n_classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    n = len(y_true)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    one_vs_rest_accuracy = (n - fp - fn) / n
    summary = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        summary[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    accuracy = float(accuracy_score(y_true, y_pred))
    metrics = {
        "n_samples": int(n),
        "n_classes": int(n_classes),
        "accuracy": accuracy,
        "accuracy_ci": [float(v) for v in wilson_interval(int(np.sum(y_true == y_pred)), n)],
        "n_errors": int(np.sum(y_true != y_pred)),
        "macro": summary["macro"],
        "weighted": summary["weighted"],
        "per_digit": [
            {"digit": int(d), "precision": float(precision[d]), "recall": float(recall[d]), "f1": float(f1[d]),
             "accuracy": float(one_vs_rest_accuracy[d]), "support": int(support[d])}
            for d in labels
        ],
        "confusion_matrix": cm.astype(int).tolist(),
        "most_confused": most_confused_pairs(cm, top_pairs),
    }
    if all(d < n_classes for group in DIGIT_GROUPS for d in group):
        metrics["groups"] = group_metrics(y_true, y_pred)
    if proba is not None:
        calibration = calibration_bins(y_true, proba, n_bins)
        metrics["ece"] = calibration["ece"]
        metrics["calibration"] = calibration
        metrics["confidence_by_outcome"] = confidence_by_outcome(y_true, proba)
    return metrics


def add_bootstrap_intervals(metrics: dict, y_true: Any, y_pred: Any, proba: Any = None,
                            proba_calibrated: Any = None, *, n_resamples: int = DEFAULT_BOOTSTRAP,
                            seed: int = DEFAULT_SEED,
                            n_bins: int = ECE_BINS) -> dict:
    """Add 95% percentile-bootstrap intervals (see :func:`digitlens.intervals.bootstrap_metrics`) to
    ``metrics`` in place and return it: ``precision_ci``, ``recall_ci``, ``f1_ci``, ``accuracy_ci``
    beside each value in ``per_digit``, ``macro.f1_ci``, ``ece_ci`` (with ``proba``),
    ``ece_calibrated_ci`` (with ``proba_calibrated``) and ``bootstrap`` (resamples, seed, confidence)."""
    found = bootstrap_metrics(as_labels(y_true, "y_true"), as_labels(y_pred, "y_pred"), proba,
                              n_classes=metrics["n_classes"], proba_calibrated=proba_calibrated,
                              n_resamples=n_resamples, seed=seed, n_bins=n_bins)
    rows = []
    for row in metrics["per_digit"]:
        d = row["digit"]
        new = {}
        for key, value in row.items():
            new[key] = value
            if key in ("precision", "recall", "f1", "accuracy"):
                new[f"{key}_ci"] = [float(v) for v in found[key][d]]
        rows.append(new)
    metrics["per_digit"] = rows
    metrics["macro"]["f1_ci"] = [float(v) for v in found["macro_f1"]]
    for key in ("ece", "ece_calibrated"):
        if key in found:
            metrics[f"{key}_ci"] = [float(v) for v in found[key]]
    metrics["bootstrap"] = found["bootstrap"]
    return metrics


def per_digit_arrays(metrics: dict) -> dict[str, np.ndarray]:
    """``metrics['per_digit']`` as arrays: ``digit``, ``precision``, ``recall``, ``f1``,
    ``accuracy``, ``support``, each of shape (n_classes,), and any ``*_ci`` of shape (n_classes, 2)."""
    rows = metrics["per_digit"]
    return {key: np.array([row[key] for row in rows]) for key in rows[0] if all(key in r for r in rows)}


def temperature_metrics(y_true: Any, logits: Any, val_logits: Any = None, val_labels: Any = None, *,
                        n_bins: int = ECE_BINS, split: str = "val") -> tuple[dict, np.ndarray | None]:
    """Temperature scaling fitted on the validation logits, applied to the test logits.

    ``y_true`` (N,) and ``logits`` (N, n_classes) are the test split; ``val_logits`` (M, n_classes)
    and ``val_labels`` (M,) the split T is fitted on (None or M = 0: no fit). Returns ``(keys,
    proba_calibrated)``: ``keys`` holds ``temperature`` (float, or None without a validation
    split), ``nll`` (test, T = 1) and, after a fit, ``temperature_fit`` (see
    :func:`digitlens.calibration.temperature_fit`), ``nll_calibrated`` (test), ``ece_calibrated``
    and ``calibration_calibrated`` (:func:`calibration_bins` of the calibrated test
    probabilities, same bins as ``ece``), else ``calibration_note``; ``proba_calibrated`` is a
    float32 array (N, n_classes), or None without a fit.
    """
    y_true = as_labels(y_true, "y_true")
    keys: dict[str, Any] = {"temperature": None}
    try:  # a user's model may give NaN logits or fewer classes than the labels: report, do not fail
        keys["nll"] = calibration.nll(logits, y_true)
        if val_logits is None or val_labels is None or len(val_labels) == 0:
            keys["calibration_note"] = NO_VAL_NOTE
            return keys, None
        fit = calibration.temperature_fit(val_logits, as_labels(val_labels, "val_labels"), split=split)
    except DigitlensError as exc:
        keys["calibration_note"] = f"temperature scaling skipped: {exc}"
        return keys, None
    temperature = fit.pop("temperature")
    proba_calibrated = calibration.apply_temperature(logits, temperature).astype(np.float32)
    bins = calibration_bins(y_true, proba_calibrated, n_bins)
    keys.update({
        "temperature": temperature,
        "temperature_fit": fit,
        "nll_calibrated": calibration.nll(logits, y_true, temperature),
        "ece_calibrated": bins["ece"],
        "calibration_calibrated": bins,
    })
    return keys, proba_calibrated
