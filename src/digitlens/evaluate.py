"""Evaluate a digit classifier: predictions, metrics, insights and figures.

``evaluate_run(run_dir)`` reads a training run folder and adds to it::

    predictions.npz   y_true (N,), y_pred (N,), proba (N, n_classes) and, when a temperature was
                      fitted on the validation split, proba_calibrated (N, n_classes)
    metrics.json      see :func:`compute_metrics` and :func:`temperature_metrics`
    insights.md/json  see :mod:`digitlens.insights`
    figures/*.png|svg one file pair per figure (see :data:`FIGURES`)

``evaluate_model(model, dataset, out_dir=...)`` does the same for any PyTorch model (an
``nn.Module`` or a TorchScript file) and a dataset, without a training run.

A dataset may be an image folder or a Kaggle CSV (:mod:`digitlens.userdata`); one without labels
(Kaggle's test.csv) gets ``predictions.csv`` (``ImageId,Label``) and ``predictions.npz`` (y_pred,
proba) instead of metrics (see :func:`write_unlabelled_predictions`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digitlens import runio
from digitlens.device import resolve_device
from digitlens.errors import DigitlensError
from digitlens.external import (Preprocessing, UserModel, file_sha256, load_torchscript,  # noqa: F401 (re-exported)
                                load_user_model)
from digitlens.inference import as_model, on_device, predict_logits, predict_proba, softmax  # noqa: F401 (re-exported)
from digitlens.intervals import DEFAULT_BOOTSTRAP, DEFAULT_SEED, bootstrap_metrics, mean_interval, wilson_interval
from digitlens.pyplot import pyplot

#: Stems of the figures written under ``figures/``.
FIGURES = (
    "training_curves",
    "confusion_matrix",
    "per_digit_metrics",
    "per_digit_metrics_groups",
    "prediction_gallery",
    "misclassified_gallery",
    "reliability_diagram",
)

#: Digit groups of the grouped per-digit figure (seed 002 layout) and the ``groups`` task.
DEFAULT_DIGIT_GROUPS = ((1, 2, 4, 6, 9), (0, 3, 5, 7, 8))

ECE_BINS = 15

#: File formats of every figure (``runio.save_figure``).
FIGURE_FORMATS = ("png", "svg")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

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


def _check_proba(proba: Any, n: int) -> np.ndarray:
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
    proba = _check_proba(proba, len(y_true))
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
    :func:`calibration_bins`).

    Per-digit ``accuracy`` is the one-vs-rest accuracy (TP + TN) / N of "is it this digit?";
    per-digit recall is the share of that digit's images recognised. Classes are 0..n_classes-1
    (default: max(10, proba columns, largest label + 1)); a class with no prediction or no support
    gets precision or recall 0 (scikit-learn's ``zero_division=0``).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true = as_labels(y_true, "y_true")
    y_pred = as_labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise DigitlensError(f"y_pred: {len(y_pred)} predictions for {len(y_true)} labels")
    if len(y_true) == 0:
        raise DigitlensError("y_true: no samples to evaluate")
    if proba is not None:
        proba = _check_proba(proba, len(y_true))
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
    if proba is not None:
        calibration = calibration_bins(y_true, proba, n_bins)
        metrics["ece"] = calibration["ece"]
        metrics["calibration"] = calibration
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


#: ``metrics.json`` ``calibration_note`` when no validation split is there to fit a temperature on.
NO_VAL_NOTE = "no validation split: temperature scaling skipped"


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
    from digitlens import calibration

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


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# Writing a full evaluation
# --------------------------------------------------------------------------------------------

def write_figures(out_dir: Path, *, images: np.ndarray, y_true: np.ndarray, proba: np.ndarray,
                  history: dict | None = None, groups=DEFAULT_DIGIT_GROUPS,
                  proba_calibrated: np.ndarray | None = None, temperature: float | None = None,
                  metrics: dict | None = None) -> list[str]:
    """Draw every evaluation figure into ``out_dir/figures/`` (PNG + SVG); return the written paths.
    With ``proba_calibrated`` (N, n_classes) the reliability diagram also shows the temperature-scaled bins;
    with ``metrics`` (from :func:`compute_metrics` on the same predictions) the per-digit bars come from
    it, with error bars where it carries intervals (:func:`add_bootstrap_intervals`)."""
    plt = pyplot()

    from digitlens import plots

    figures_dir = Path(out_dir) / "figures"
    y_pred = proba.argmax(axis=1)
    labels = np.arange(proba.shape[1])
    if metrics is None:
        metrics = compute_metrics(y_true, y_pred, n_classes=len(labels))
    displays = {
        "confusion_matrix": plots.ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=labels),
        "per_digit_metrics": plots.PerDigitMetricsDisplay.from_metrics(metrics),
        "per_digit_metrics_groups": plots.PerDigitMetricsDisplay.from_metrics(
            metrics, groups=groups, metrics=("precision", "recall")),
        "prediction_gallery": plots.PredictionGalleryDisplay.from_predictions(images, y_true, proba=proba),
        "misclassified_gallery": plots.MisclassifiedGalleryDisplay.from_predictions(images, y_true, proba=proba),
        "reliability_diagram": plots.ReliabilityDiagramDisplay.from_predictions(
            y_true, proba, proba_calibrated, temperature),
    }
    if history is not None and len(history.get("epoch", ())):
        displays = {"training_curves": plots.TrainingCurvesDisplay.from_history(history), **displays}
    written: list[str] = []
    with runio.figure_batch():
        for stem, display in displays.items():
            display.plot()
            written += [str(p) for p in runio.save_figure(display.figure_, figures_dir / stem, formats=FIGURE_FORMATS)]
            plt.close(display.figure_)
    return written


def write_unlabelled_predictions(model: Any, images: torch.Tensor, out_dir: Path | None, *, source: dict,
                                 progress: bool, files: list[str] | None = None) -> dict:
    """Predict images that have no labels (a Kaggle test.csv): no accuracy, no metrics. With
    ``out_dir`` writes ``predictions.csv`` in Kaggle's submission format (``ImageId,Label``,
    ImageId from 1), ``predictions.npz`` (``y_pred`` (N,), ``proba`` (N, n_classes), and ``files``
    (N,) for an image folder) and ``evaluation.json``. Returns the summary dict: ``accuracy``
    None, ``n_samples``, ``labelled`` False, ``note``, ``y_pred`` (list) without ``out_dir``."""
    from digitlens.userdata import write_kaggle_submission

    proba = softmax(predict_logits(model, images, progress=progress))
    y_pred = proba.argmax(axis=1).astype(np.int64)
    counts = np.bincount(y_pred, minlength=proba.shape[1])
    summary = {"accuracy": None, "n_samples": int(len(y_pred)), "labelled": False,
               "predicted_counts": counts.astype(int).tolist(), "source": source,
               "note": "no labels: no accuracy; predictions in Kaggle's submission format (ImageId,Label)"}
    if out_dir is None:
        summary["y_pred"] = y_pred.tolist()
        return summary
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"y_pred": y_pred, "proba": proba.astype(np.float32)}
    if files is not None:
        arrays["files"] = np.asarray(files, dtype=str)
    runio.write_npz(out_dir / "predictions.npz", **arrays)
    write_kaggle_submission(out_dir / "predictions.csv", y_pred)
    summary.update({"out_dir": str(out_dir), "files": ["predictions.csv", "predictions.npz"], "figures": [],
                    "insights": []})
    runio.write_json(out_dir / "evaluation.json", summary)
    return summary


def check_bootstrap(bootstrap: Any) -> int:
    """``bootstrap`` as a number of resamples >= 0 (0: no bootstrap intervals); a one-line error otherwise."""
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise DigitlensError(f"--bootstrap {bootstrap!r}: expected a number of resamples >= 0 "
                             f"(0 skips the bootstrap intervals; default {DEFAULT_BOOTSTRAP})")
    return int(bootstrap)


def _evaluate(model: Any, images: torch.Tensor, labels: torch.Tensor | None, out_dir: Path | None, *,
              history: dict | None, source: dict, progress: bool, val: Any = None,
              bootstrap: int = DEFAULT_BOOTSTRAP, bootstrap_seed: int = DEFAULT_SEED, sizes: dict | None = None,
              files: list[str] | None = None, device: Any = None) -> dict:
    """Predict the test ``images``/``labels``, fit the temperature on ``val`` (a DigitDataset or
    None), add the intervals (``bootstrap`` resamples, 0: Wilson accuracy interval only), and write
    every file into ``out_dir`` (None: write nothing); return the summary dict. ``sizes``: ``n_val``
    and ``n_train_eval`` for the insights (:func:`digitlens.insights.derive_insights`). ``labels``
    None: :func:`write_unlabelled_predictions`. ``files``: the image file of each sample (an image
    folder), kept in ``predictions.npz``."""
    from digitlens import insights as insights_mod

    model = on_device(as_model(model), resolve_device(device))
    if labels is None:
        return write_unlabelled_predictions(model, images, out_dir, source=source, progress=progress, files=files)
    logits = predict_logits(model, images, progress=progress)
    if isinstance(model, UserModel):  # what was declared and what was detected, after the first prediction
        source = {**source, "user_model": model.describe()}
    proba = softmax(logits)
    y_true = labels.numpy().astype(np.int64)
    y_pred = proba.argmax(axis=1).astype(np.int64)
    metrics = compute_metrics(y_true, y_pred, proba)
    if val is not None and len(val):
        val_logits = predict_logits(model, val.images, progress=progress, description="predicting (validation)")
        val_labels = val.labels.numpy()
    else:
        val_logits = val_labels = None
    calibrated, proba_calibrated = temperature_metrics(y_true, logits, val_logits, val_labels,
                                                       split=getattr(val, "split", "val"))
    metrics.update(calibrated)
    if bootstrap:
        add_bootstrap_intervals(metrics, y_true, y_pred, proba, proba_calibrated,
                                n_resamples=bootstrap, seed=bootstrap_seed)
    metrics["source"] = source
    summary = {"accuracy": metrics["accuracy"], "accuracy_ci": metrics["accuracy_ci"], "ece": metrics["ece"], "n_samples": metrics["n_samples"],
               "n_errors": metrics["n_errors"], "macro_f1": metrics["macro"]["f1"],
               "temperature": metrics["temperature"], "ece_calibrated": metrics.get("ece_calibrated"),
               "source": source}
    if "calibration_note" in metrics:
        summary["calibration_note"] = metrics["calibration_note"]
    if out_dir is None:
        summary["metrics"] = metrics
        summary["insights"] = insights_mod.derive_insights(metrics, history, **(sizes or {}))["summary"]
        return summary
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"y_true": y_true, "y_pred": y_pred, "proba": proba.astype(np.float32)}
    if proba_calibrated is not None:
        arrays["proba_calibrated"] = proba_calibrated
    if files is not None:
        arrays["files"] = np.asarray(files, dtype=str)
    runio.write_npz(out_dir / "predictions.npz", **arrays)
    runio.write_json(out_dir / "metrics.json", metrics)
    found = insights_mod.write_insights(out_dir, metrics, history, **(sizes or {}))
    figures = write_figures(out_dir, images=images.numpy(), y_true=y_true, proba=proba, history=history,
                            proba_calibrated=proba_calibrated, temperature=metrics["temperature"],
                            metrics=metrics)
    summary.update({
        "out_dir": str(out_dir),
        "files": ["predictions.npz", "metrics.json", "insights.md", "insights.json"],
        "figures": [str(Path(f).relative_to(out_dir)) for f in figures],
        "insights": found["summary"],
    })
    runio.write_json(out_dir / "evaluation.json", summary)
    return summary


def evaluate_run(run_dir: str | os.PathLike, *, model: Any = None, data_dir: str | os.PathLike | None = None,
                 progress: bool = True, bootstrap: int = DEFAULT_BOOTSTRAP, bootstrap_seed: int = DEFAULT_SEED,
                 dataset: Any = None, out_dir: str | os.PathLike | None = None, device: Any = None,
                 preprocessing: Preprocessing | dict | None = None, trust_code: bool = False) -> dict:
    """Evaluate a training run on its test split and write predictions, metrics, insights and
    figures into the run folder. The temperature (see :func:`temperature_metrics`) is fitted on
    the run's validation split, never on the test split; a run trained with ``val_fraction=0``
    gets ``"temperature": null`` and a ``calibration_note``.

    ``model``: None (the run's own ``model.safetensors``, or the model file recorded in the
    folder's config.json by :func:`evaluate_model`), a user's ``nn.Module``, or the path of a
    TorchScript or ONNX file. ``preprocessing``: what a user's model expects
    (:class:`digitlens.external.Preprocessing`, or a dict; for a user model's folder the one
    recorded in config.json is the default and a dict overrides only the keys it holds). Returns a
    summary dict (also written as ``evaluation.json``) with ``accuracy``, ``ece``, ``temperature``, ``ece_calibrated``, ``n_errors``, ``macro_f1``,
    ``files``, ``figures`` and ``insights``.

    ``bootstrap``: resamples of the test images behind the 95% intervals in ``metrics.json``
    (per-digit precision/recall/F1, macro F1, ECE; 0 skips them), drawn with ``bootstrap_seed``.
    ``device``: where the model predicts ('auto' by default: CUDA when available; see
    :func:`digitlens.device.resolve_device`); a run trained on a GPU evaluates on a CPU and back.

    ``dataset``: evaluate on other data than the run's test split: a dataset name, an image
    folder or a Kaggle CSV (:mod:`digitlens.userdata`; all of it is the test split), or a
    DigitDataset. Its files go to ``out_dir`` (default ``RUN_DIR/evaluate/NAME/``, NAME the
    file or folder name), so the run's own evaluation stays; the temperature is still fitted on
    the run's validation split.

    ``model`` (a user's model instead of the run's): its results go to ``out_dir`` (required; the
    run's own evaluation is never overwritten), with a ``config.json`` that later stages reuse.
    ``trust_code``: load a TorchScript file (code; refused otherwise, see
    :func:`digitlens.external.load_torchscript`).
    """
    from digitlens import data, models
    from digitlens.external import trusted_by_record
    from digitlens.plots.training_curves import read_history

    bootstrap = check_bootstrap(bootstrap)
    run_dir = runio.require_run_dir(run_dir)
    config = runio.read_json(run_dir / "config.json")
    if "dataset" not in config:
        raise DigitlensError(f"{run_dir / 'config.json'}: missing key 'dataset'")
    if model is None and config.get("model_file"):  # a folder written by evaluate_model for a user's model
        recorded = config.get("preprocessing") or {}
        if isinstance(preprocessing, dict):  # a dict overrides only the keys it holds
            preprocessing = {**recorded, **preprocessing}
        model = load_user_model(config["model_file"], preprocessing if preprocessing is not None else recorded,
                                trust_code=trust_code or trusted_by_record(config))
        source = {"model": str(config["model_file"]), "run_dir": str(run_dir)}
    elif model is None:
        if preprocessing is not None:
            raise DigitlensError(f"{run_dir}: --input-scale/--normalize/--outputs describe a user's model "
                                 "(--model-file); a digitlens run normalises its own inputs")
        model = models.load_model(run_dir)
        source = {"model": "run", "run_dir": str(run_dir), "architecture": config.get("model")}
    else:
        if out_dir is None:
            raise DigitlensError(f"--model-file: give --out DIR for its results ({run_dir} holds the evaluation of "
                                 "its own model, which another model's results would overwrite)")
        check_out_folder(Path(out_dir))
        if isinstance(model, (str, os.PathLike)) or preprocessing is not None:
            model = load_user_model(model, preprocessing, trust_code=trust_code)
        source = {"model": (model.path or model.name) if isinstance(model, UserModel) else type(model).__name__,
                  "run_dir": str(run_dir)}
    own_model = source.get("model") == "run" or config.get("model_file") is not None
    if dataset is not None:  # the user's data first: a bad file fails before the run's data is read
        test, name = _test_split(dataset, data_dir)
        target = Path(out_dir) if out_dir is not None else run_dir / "evaluate" / _out_name(dataset, name)
    elif out_dir is not None and own_model:
        raise DigitlensError("--out: only used with --dataset or --model-file (the run's own evaluation is written "
                             "into the run folder)")
    splits = data.load_splits_for_run(config, data_dir=data_dir) if dataset is None or test.labels is not None else None
    if dataset is None:
        test, name = splits.test, config["dataset"]
        target = run_dir if own_model else Path(out_dir)
    source["dataset"] = name
    history_path = run_dir / "history.csv"
    history = read_history(history_path) if history_path.is_file() else None
    val = splits.val if splits is not None else None
    sizes = {"n_val": config.get("n_val", len(val) if val is not None else None),
             "n_train_eval": config.get("train_eval_size")}
    summary = _evaluate(model, test.images, test.labels, target, history=history, source=source,
                        progress=progress, val=val, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed,
                        sizes=sizes, files=test.files, device=device)
    if dataset is None and isinstance(model, UserModel) and model.path:
        # the flags given now are what later stages on this folder reuse
        write_user_model_config(target, model, dataset=config["dataset"],
                                data_dir=data_dir if data_dir is not None else config.get("data_dir"))
    return summary


def check_out_folder(out_dir: Path) -> None:
    """Refuse an ``--out`` folder that another stage owns: a model's evaluation goes to a new or empty
    folder, or to one that an earlier evaluation wrote (``evaluation.json``, or a ``config.json``
    naming a ``model_file``); never into a training run or someone's other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DigitlensError(f"--out {out_dir}: is a file, not a folder")
    if out_dir.is_dir() and runio.has_content(out_dir):  # (the writer's own lock file does not count)
        config = out_dir / "config.json"
        ours = (out_dir / "evaluation.json").is_file() and not config.is_file()
        if config.is_file():
            try:
                ours = bool(runio.read_json(config).get("model_file"))
            except DigitlensError:
                ours = False
        if not ours:
            raise DigitlensError(f"--out {out_dir}: folder is not empty and holds no earlier evaluation of a model "
                                 "file (a run folder or other files would be overwritten); choose a new --out folder")


def _test_split(dataset: Any, data_dir) -> tuple[Any, str]:
    """The test split of ``dataset`` (a name, a path or a DigitDataset) and the name recorded for it."""
    from digitlens import data

    if isinstance(dataset, data.DigitDataset):
        return dataset, f"{dataset.name}/{dataset.split}"
    if isinstance(dataset, (str, os.PathLike)):
        return data.load_splits(str(dataset), data_dir=data_dir, val_fraction=0).test, str(dataset)
    raise DigitlensError(f"dataset: expected a dataset name, a path or a DigitDataset, got {type(dataset).__name__}")


def _out_name(dataset: Any, name: str) -> str:
    """The folder name under RUN_DIR/evaluate/ for ``dataset``: its file or folder name."""
    from digitlens.userdata import dataset_name, is_path_dataset

    return dataset_name(dataset) if isinstance(dataset, (str, os.PathLike)) and is_path_dataset(dataset) \
        else name.replace("/", "_")


def evaluate_model(model: Any, dataset: Any = "digits", *, out_dir: str | os.PathLike | None = None,
                   data_dir: str | os.PathLike | None = None, history: Any = None, progress: bool = True,
                   val_dataset: Any = None, bootstrap: int = DEFAULT_BOOTSTRAP, bootstrap_seed: int = DEFAULT_SEED,
                   preprocessing: Preprocessing | dict | None = None, device: Any = None,
                   trust_code: bool = False) -> dict:
    """Evaluate any model without a training run ("bring your own model").

    ``model``: an ``nn.Module`` taking (N, 1, 28, 28) images in [0, 1] and returning logits, a
    TorchScript (``.pt``) or ONNX (``.onnx``) file path, or a :class:`digitlens.external.UserModel`.
    ``preprocessing``: what the model expects and returns (:class:`digitlens.external.Preprocessing`
    or its dict: ``input_scale`` 1 or 255, ``normalize`` (mean, std), ``outputs`` auto, logits,
    probs or log_probs); a file's input layout and outputs are detected unless declared. With
    ``out_dir`` a ``config.json`` records the model file, dataset and preprocessing, so ``explain``
    and ``report`` on that folder use the same model the same way. ``dataset``: a
    :class:`digitlens.data.DigitDataset`, a dataset name (its test split is used), or the path of an
    image folder or Kaggle CSV (all of it). ``history``: optional training history (dict, DataFrame, or a path to
    a Keras CSVLogger / history JSON / digitlens history.csv) for the training-curves figure and
    the overfitting insight. With ``out_dir`` every file of :func:`evaluate_run` is written there;
    without, nothing is written and the summary carries the full ``metrics`` dict and the
    ``insights`` sentences.

    ``val_dataset``: an optional :class:`digitlens.data.DigitDataset` the model was not trained
    on, to fit temperature scaling on; without one the temperature is skipped (``"temperature":
    null`` and a ``calibration_note``), since fitting it on the test split would flatter it.
    ``bootstrap``, ``bootstrap_seed``, ``device``: as for :func:`evaluate_run` (a model on another
    device is copied there; the caller's model is not moved).
    """
    from digitlens import data
    from digitlens.plots.training_curves import normalise_history, read_history

    bootstrap = check_bootstrap(bootstrap)
    if out_dir is not None:
        check_out_folder(Path(out_dir))
    test, name = _test_split(dataset, data_dir)
    if val_dataset is not None:
        if not isinstance(val_dataset, data.DigitDataset):
            raise DigitlensError(f"val_dataset: expected a DigitDataset or None, got {type(val_dataset).__name__}")
        if val_dataset is test or val_dataset.split == "test":
            raise DigitlensError("val_dataset: must not be the test split (the temperature would be fitted on "
                                 "the images it is scored on)")
    if isinstance(history, (str, os.PathLike)):
        history = read_history(history)
    elif history is not None:
        history = normalise_history(history)
    if isinstance(model, (str, os.PathLike, UserModel)) or preprocessing is not None:
        model = load_user_model(model, preprocessing, trust_code=trust_code)
        source = {"model": model.path or model.name, "dataset": name}
    else:
        source = {"model": type(model).__name__, "dataset": name}
    summary = _evaluate(model, test.images, test.labels, Path(out_dir) if out_dir is not None else None,
                        history=history, source=source, progress=progress, val=val_dataset,
                        bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, files=test.files, device=device)
    if out_dir is not None and isinstance(model, UserModel) and model.path:  # a module has no file to reload
        write_user_model_config(Path(out_dir), model, dataset=name, data_dir=data_dir)
    return summary


def write_user_model_config(out_dir: Path, model: UserModel, *, dataset: str, data_dir: Any = None) -> Path | None:
    """Write ``out_dir/config.json`` for a user's model: ``model`` (the file's name), ``model_file``
    (absolute path), ``model_format``, ``preprocessing`` (as declared), ``layout`` and ``outputs``
    (as used), ``dataset``, ``data_dir``, ``n_classes``, ``val_fraction`` 0 and ``seed`` 0, so that
    ``evaluate``, ``explain`` and ``report`` on ``out_dir`` reuse them. A training run's config.json
    there is left alone (returns None)."""
    path = out_dir / "config.json"
    if path.is_file() and not runio.read_json(path).get("model_file"):
        return None
    info = model.describe()
    config = {"model": model.name, "model_file": str(Path(model.path).resolve()) if model.path else None,
              "model_format": info["format"], "preprocessing": info["preprocessing"], "layout": info["layout"],
              "outputs": info["outputs"], "outputs_detected": info["outputs_detected"], "dataset": dataset,
              "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None, "n_classes": 10,
              "val_fraction": 0.0,
              "seed": 0}
    if info["format"] == "torchscript" and model.path:  # it was loaded, so the user trusted this file's bytes
        config["trusted_sha256"] = file_sha256(model.path)
    return runio.write_json(path, config)


# One writer per folder (issue 14): the run folder, and an --out folder, are locked while a stage
# writes them. Wrapped here, below the definitions, so the functions' own code stays as it is.
def _evaluate_run_folders(run_dir, *args, out_dir=None, **kwargs):
    return [(run_dir, "run"), (out_dir, "out") if out_dir is not None else None]


def _evaluate_model_folders(model, *args, out_dir=None, **kwargs):
    return [(out_dir, "out") if out_dir is not None else None]


evaluate_run = runio.writes_folders("evaluate", _evaluate_run_folders)(evaluate_run)
evaluate_model = runio.writes_folders("evaluate", _evaluate_model_folders)(evaluate_model)
