"""The evaluate stage: predict a test split, then write predictions, metrics, insights and figures.

``evaluate_run(run_dir)`` reads a training run folder and adds to it::

    predictions.npz   y_true (N,), y_pred (N,), proba (N, n_classes) and, when a temperature was
                      fitted on the validation split, proba_calibrated (N, n_classes)
    metrics.json      see :func:`digitlens.metrics.compute_metrics` and :func:`digitlens.metrics.temperature_metrics`
    insights.md/json  see :mod:`digitlens.insights`
    evaluation.json   the summary :func:`evaluate_run` returns
    figures/          one PNG + SVG pair per figure and ``figures.json``, their manifest (see
                      :data:`FIGURE_KINDS` and :mod:`digitlens.figure_writer`)

These files (:data:`OUTPUTS`) are replaced as a whole: they are written into a temporary folder
and swapped in at the end (:func:`digitlens.runio.staged_files`), so a killed evaluation leaves
the previous evaluation's files, or the new ones, never a mix.

``evaluate_model(model, dataset, out_dir=...)`` does the same for any PyTorch model (an
``nn.Module``, a TorchScript or ONNX file) and a dataset, without a training run.

A dataset may be an image folder or a Kaggle CSV (:mod:`digitlens.userdata`); one without labels
(Kaggle's test.csv) gets ``predictions.csv`` (``ImageId,Label``) and ``predictions.npz`` (y_pred,
proba) instead of metrics (see :func:`write_unlabelled_predictions`).

The metric maths are in :mod:`digitlens.metrics`, the insights in :mod:`digitlens.insights`, the
figures in :mod:`digitlens.plots`; this module only orchestrates them and writes the files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digitlens import data, insights, models, plots, runio
from digitlens.device import resolve_device
from digitlens.errors import DigitlensError
from digitlens.external import Preprocessing, UserModel, file_sha256, load_user_model, trusted_by_record
from digitlens.figure_writer import FigureWriter
from digitlens.groups import DIGIT_GROUPS
from digitlens.history import load_history, normalise_history
from digitlens.inference import as_model, on_device, predict_logits, softmax
from digitlens.intervals import DEFAULT_BOOTSTRAP, DEFAULT_SEED, check_bootstrap
from digitlens.metrics import add_bootstrap_intervals, compute_metrics, temperature_metrics
from digitlens.pyplot import pyplot
from digitlens.userdata import dataset_name, is_path_dataset, write_kaggle_submission

#: Digit groups of the grouped per-digit figure (see :mod:`digitlens.groups`).
DEFAULT_DIGIT_GROUPS = DIGIT_GROUPS

#: File formats of every figure.
FIGURE_FORMATS = ("png", "svg")

#: What an evaluation writes into its folder, replaced as a whole (see :func:`write_outputs`): a
#: name the new evaluation does not write is removed, so no file of an older one stays beside it.
OUTPUTS = ("predictions.npz", "predictions.csv", "metrics.json", "insights.json", "insights.md", "evaluation.json",
           "figures")


# --------------------------------------------------------------------------------------------
# Writing a full evaluation
# --------------------------------------------------------------------------------------------

#: The figures of an evaluation: file stem -> (kind, section, caption when the figure has no title).
FIGURE_KINDS = {
    "training_curves": ("training_curves", "training", "Training curves: accuracy and loss, train vs validation"),
    "confusion_matrix": ("confusion_matrix", "evaluation", "Confusion matrix of the test split"),
    "per_digit_metrics": ("per_digit", "evaluation", "Per-digit precision, recall, F1 and accuracy"),
    "per_digit_metrics_groups": ("per_digit_groups", "evaluation", "Per-digit precision and recall by digit group"),
    "prediction_gallery": ("predictions", "galleries", "Test images with their predictions"),
    "misclassified_gallery": ("misclassified", "galleries", "Misclassified test images"),
    "reliability_diagram": ("reliability", "evaluation", "Reliability diagram: confidence vs accuracy"),
}

#: Stems of the figures written under ``figures/``, in drawing order (training_curves only with a history).
FIGURES = tuple(FIGURE_KINDS)


def write_figures(out_dir: Path, *, images: np.ndarray, y_true: np.ndarray, proba: np.ndarray,
                  history: dict | None = None, groups=DEFAULT_DIGIT_GROUPS,
                  proba_calibrated: np.ndarray | None = None, temperature: float | None = None,
                  metrics: dict | None = None, split: str = "test") -> list[str]:
    """Draw every evaluation figure into ``out_dir/figures/`` (PNG + SVG, :data:`FIGURE_FORMATS`) and
    list them in ``out_dir/figures/figures.json`` (:class:`digitlens.figure_writer.FigureWriter`, kinds
    and sections of :data:`FIGURE_KINDS`); return the written paths (figures.json not included).
    With ``proba_calibrated`` (N, n_classes) the reliability diagram also shows the temperature-scaled bins;
    with ``metrics`` (from :func:`compute_metrics` on the same predictions) the per-digit bars come from
    it, with error bars where it carries intervals (:func:`add_bootstrap_intervals`)."""
    plt = pyplot()
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
    with FigureWriter(Path(out_dir) / "figures", "evaluate", formats=FIGURE_FORMATS) as writer:
        for stem, display in displays.items():
            display.plot()
            kind, section, caption = FIGURE_KINDS[stem]
            shows: dict[str, Any] = {"split": split} if stem != "training_curves" else {}
            if stem == "per_digit_metrics_groups":
                shows["group_by"] = "digit group"
                shows["groups"] = [list(map(int, g)) for g in groups]
            if stem == "reliability_diagram":
                shows["calibrated"] = proba_calibrated is not None
            writer.save(display.figure_, stem, kind=kind, section=section,
                        title=display.figure_.get_suptitle() or caption, **shows)
            plt.close(display.figure_)
    return [str(p) for p in writer.paths()]


def write_unlabelled_predictions(model: Any, images: torch.Tensor, out_dir: Path | None, *, source: dict,
                                 progress: bool, files: list[str] | None = None, staging: Path | None = None) -> dict:
    """Predict images that have no labels (a Kaggle test.csv): no accuracy, no metrics. With
    ``out_dir`` writes ``predictions.csv`` in Kaggle's submission format (``ImageId,Label``,
    ImageId from 1), ``predictions.npz`` (``y_pred`` (N,), ``proba`` (N, n_classes), and ``files``
    (N,) for an image folder) and ``evaluation.json`` (into ``staging`` when given, the folder
    :func:`write_outputs` swaps in). Returns the summary dict: ``accuracy`` None, ``n_samples``,
    ``labelled`` False, ``note``, ``y_pred`` (list) without ``out_dir``."""
    proba = softmax(predict_logits(model, images, progress=progress))
    y_pred = proba.argmax(axis=1).astype(np.int64)
    counts = np.bincount(y_pred, minlength=proba.shape[1])
    summary = {"accuracy": None, "n_samples": int(len(y_pred)), "labelled": False,
               "predicted_counts": counts.astype(int).tolist(), "source": source,
               "note": "no labels: no accuracy; predictions in Kaggle's submission format (ImageId,Label)"}
    if out_dir is None:
        summary["y_pred"] = y_pred.tolist()
        return summary
    folder = staging if staging is not None else out_dir
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"y_pred": y_pred, "proba": proba.astype(np.float32)}
    if files is not None:
        arrays["files"] = np.asarray(files, dtype=str)
    runio.write_npz(folder / "predictions.npz", **arrays)
    write_kaggle_submission(folder / "predictions.csv", y_pred)
    summary.update({"out_dir": str(out_dir), "files": ["predictions.csv", "predictions.npz"], "figures": [],
                    "insights": []})
    runio.write_json(folder / "evaluation.json", summary)
    return summary


def _evaluate(model: Any, images: torch.Tensor, labels: torch.Tensor | None, out_dir: Path | None, *,
              history: dict | None, source: dict, progress: bool, val: Any = None,
              bootstrap: int = DEFAULT_BOOTSTRAP, bootstrap_seed: int = DEFAULT_SEED, sizes: dict | None = None,
              files: list[str] | None = None, device: Any = None, staging: Path | None = None) -> dict:
    """Predict the test ``images``/``labels``, fit the temperature on ``val`` (a DigitDataset or
    None), add the intervals (``bootstrap`` resamples, 0: Wilson accuracy interval only), and write
    every file of the evaluation of ``out_dir`` (None: write nothing) into ``staging`` (the folder
    :func:`write_outputs` swaps in; None: into ``out_dir`` itself); return the summary dict. ``sizes``: ``n_val``
    and ``n_train_eval`` for the insights (:func:`digitlens.insights.derive_insights`). ``labels``
    None: :func:`write_unlabelled_predictions`. ``files``: the image file of each sample (an image
    folder), kept in ``predictions.npz``."""
    model = on_device(as_model(model), resolve_device(device))
    if labels is None:
        return write_unlabelled_predictions(model, images, out_dir, source=source, progress=progress, files=files,
                                            staging=staging)
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
        summary["insights"] = insights.derive_insights(metrics, history, **(sizes or {}))["summary"]
        return summary
    folder = staging if staging is not None else out_dir
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"y_true": y_true, "y_pred": y_pred, "proba": proba.astype(np.float32)}
    if proba_calibrated is not None:
        arrays["proba_calibrated"] = proba_calibrated
    if files is not None:
        arrays["files"] = np.asarray(files, dtype=str)
    runio.write_npz(folder / "predictions.npz", **arrays)
    runio.write_json(folder / "metrics.json", metrics)
    found = insights.write_insights(folder, metrics, history, **(sizes or {}))
    figures = write_figures(folder, images=images.numpy(), y_true=y_true, proba=proba, history=history,
                            proba_calibrated=proba_calibrated, temperature=metrics["temperature"],
                            metrics=metrics)
    summary.update({
        "out_dir": str(out_dir),
        "files": ["predictions.npz", "metrics.json", "insights.md", "insights.json"],
        "figures": [Path(f).relative_to(folder).as_posix() for f in figures],
        "insights": found["summary"],
    })
    runio.write_json(folder / "evaluation.json", summary)
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
    history = load_history(history_path) if history_path.is_file() else None
    val = splits.val if splits is not None else None
    sizes = {"n_val": config.get("n_val", len(val) if val is not None else None),
             "n_train_eval": config.get("train_eval_size")}
    with runio.staged_files(target, OUTPUTS) as staging:
        summary = _evaluate(model, test.images, test.labels, target, history=history, source=source,
                            progress=progress, val=val, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed,
                            sizes=sizes, files=test.files, device=device, staging=staging)
        if dataset is None and isinstance(model, UserModel) and model.path:
            # the flags given now are what later stages on this folder reuse
            write_user_model_config(target, model, dataset=config["dataset"],
                                    data_dir=data_dir if data_dir is not None else config.get("data_dir"),
                                    into=staging)
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
    if isinstance(dataset, data.DigitDataset):
        return dataset, f"{dataset.name}/{dataset.split}"
    if isinstance(dataset, (str, os.PathLike)):
        return data.load_splits(str(dataset), data_dir=data_dir, val_fraction=0).test, str(dataset)
    raise DigitlensError(f"dataset: expected a dataset name, a path or a DigitDataset, got {type(dataset).__name__}")


def _out_name(dataset: Any, name: str) -> str:
    """The folder name under RUN_DIR/evaluate/ for ``dataset``: its file or folder name."""
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
        history = load_history(history)
    elif history is not None:
        history = normalise_history(history)
    if isinstance(model, (str, os.PathLike, UserModel)) or preprocessing is not None:
        model = load_user_model(model, preprocessing, trust_code=trust_code)
        source = {"model": model.path or model.name, "dataset": name}
    else:
        source = {"model": type(model).__name__, "dataset": name}
    run = dict(history=history, source=source, progress=progress, val=val_dataset, bootstrap=bootstrap,
               bootstrap_seed=bootstrap_seed, files=test.files, device=device)
    if out_dir is None:
        return _evaluate(model, test.images, test.labels, None, **run)
    with runio.staged_files(out_dir, OUTPUTS) as staging:
        summary = _evaluate(model, test.images, test.labels, Path(out_dir), staging=staging, **run)
        if isinstance(model, UserModel) and model.path:  # a module has no file to reload
            write_user_model_config(Path(out_dir), model, dataset=name, data_dir=data_dir, into=staging)
    return summary


def write_user_model_config(out_dir: Path, model: UserModel, *, dataset: str, data_dir: Any = None,
                            into: Path | None = None) -> Path | None:
    """Write ``out_dir/config.json`` for a user's model: ``model`` (the file's name), ``model_file``
    (absolute path), ``model_format``, ``preprocessing`` (as declared), ``layout`` and ``outputs``
    (as used), ``dataset``, ``data_dir``, ``n_classes``, ``val_fraction`` 0 and ``seed`` 0, so that
    ``evaluate``, ``explain`` and ``report`` on ``out_dir`` reuse them. A training run's config.json
    there is left alone (returns None). ``into``: write the file there instead (the staging folder
    swapped into ``out_dir`` with the rest of the evaluation)."""
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
    return runio.write_json((into if into is not None else out_dir) / "config.json", config)


# One writer per folder (issue 14): the run folder, and an --out folder, are locked while a stage
# writes them. Wrapped here, below the definitions, so the functions' own code stays as it is.
def _evaluate_run_folders(run_dir, *args, out_dir=None, **kwargs):
    return [(run_dir, "run"), (out_dir, "out") if out_dir is not None else None]


def _evaluate_model_folders(model, *args, out_dir=None, **kwargs):
    return [(out_dir, "out") if out_dir is not None else None]


evaluate_run = runio.writes_folders("evaluate", _evaluate_run_folders)(evaluate_run)
evaluate_model = runio.writes_folders("evaluate", _evaluate_model_folders)(evaluate_model)
