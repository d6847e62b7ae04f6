"""Display classes on plain numpy arrays: the numbers drawn equal independent computations
(scikit-learn, numpy), and the three history readers (digitlens history.csv, Keras CSVLogger,
Keras history JSON) give the same curves."""

from __future__ import annotations

import csv
import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402

from digitlens.errors import DigitlensError  # noqa: E402
from digitlens.figure_writer import save_figure_files  # noqa: E402
from digitlens.plots.prediction_gallery import format_confidence  # noqa: E402
from digitlens.plots import (  # noqa: E402
    ConfusionMatrixDisplay,
    MisclassifiedGalleryDisplay,
    PerDigitMetricsDisplay,
    PredictionGalleryDisplay,
    ReliabilityDiagramDisplay,
    TrainingCurvesDisplay,
    load_history,
    read_history_csv,
    read_keras_csvlogger,
    read_keras_history_json,
)

HISTORY = {
    "loss": [0.90, 0.40, 0.25, 0.18, 0.12],
    "accuracy": [0.70, 0.88, 0.93, 0.95, 0.97],
    "val_loss": [0.50, 0.30, 0.22, 0.24, 0.27],
    "val_accuracy": [0.84, 0.91, 0.94, 0.935, 0.93],
}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def predictions():
    rng = np.random.default_rng(0)
    n = 300
    y_true = rng.integers(0, 10, n)
    logits = rng.normal(size=(n, 10))
    logits[np.arange(n), y_true] += 3.0
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    images = rng.random((n, 28, 28)).astype(np.float32)
    return images, y_true, proba


# --- training curves and history readers ---------------------------------------------------

def _write_three_history_files(folder):
    n = len(HISTORY["loss"])
    digitlens_csv = folder / "history.csv"
    with open(digitlens_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"])
        for i in range(n):
            writer.writerow([i + 1, *(HISTORY[k][i] for k in ("loss", "accuracy", "val_loss", "val_accuracy")), 0.01, 1.5])
    # Keras CSVLogger: 0-based epoch, keys sorted alphabetically
    keras_csv = folder / "training.log"
    with open(keras_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        keys = sorted(HISTORY)
        writer.writerow(["epoch", *keys])
        for i in range(n):
            writer.writerow([i, *(HISTORY[k][i] for k in keys)])
    keras_json = folder / "history.json"
    keras_json.write_text(json.dumps(HISTORY))
    return digitlens_csv, keras_csv, keras_json


@pytest.mark.slow
def test_three_history_formats_give_the_same_curves(tmp_path):
    digitlens_csv, keras_csv, keras_json = _write_three_history_files(tmp_path)
    histories = [read_history_csv(digitlens_csv), read_keras_csvlogger(keras_csv), read_keras_history_json(keras_json),
                 load_history(digitlens_csv), load_history(keras_csv), load_history(keras_json)]
    for history in histories:
        np.testing.assert_array_equal(history["epoch"], [1, 2, 3, 4, 5])
        for key, values in HISTORY.items():
            np.testing.assert_allclose(history[key], values)
    drawn = []
    for history in histories:
        display = TrainingCurvesDisplay.from_history(history).plot()
        assert display.best_epoch == 3  # lowest val_loss
        assert display.diverges_from == 4  # val_loss rises on epochs 4 and 5 while loss falls
        drawn.append({k: line.get_ydata() for k, line in display.lines_.items()})
        assert list(display.lines_["loss"].get_xdata()) == [1, 2, 3, 4, 5]
    for other in drawn[1:]:
        for key in drawn[0]:
            np.testing.assert_allclose(other[key], drawn[0][key])
    np.testing.assert_allclose(drawn[0]["val_accuracy"], HISTORY["val_accuracy"])


def test_history_from_dict_dataframe_like_and_old_keras_names():
    class FakeDataFrame:  # pandas is not a dependency; duck-typed like DataFrame.to_dict("list")
        columns = list(HISTORY)

        def to_dict(self, orient):
            assert orient == "list"
            return dict(HISTORY)

    class FakeKerasHistory:
        history = {"acc": HISTORY["accuracy"], "val_acc": HISTORY["val_accuracy"],
                   "loss": HISTORY["loss"], "val_loss": HISTORY["val_loss"]}

    for source in (HISTORY, FakeDataFrame(), FakeKerasHistory()):
        display = TrainingCurvesDisplay.from_history(source)
        np.testing.assert_allclose(display.accuracy, HISTORY["accuracy"])
        np.testing.assert_allclose(display.val_loss, HISTORY["val_loss"])
        assert display.best_epoch == 3


def test_training_curves_without_validation_and_on_given_axes():
    fig, axes = plt.subplots(1, 2)
    display = TrainingCurvesDisplay.from_history({"loss": [1.0, 0.5], "accuracy": [0.5, 0.8]}).plot(ax=axes)
    assert display.best_epoch is None and display.diverges_from is None and display.figure_ is fig
    assert set(display.lines_) == {"loss", "accuracy"}


def test_training_curves_pair_the_end_of_epoch_train_measurement_with_validation(tmp_path):
    """train_eval_* (measured like validation) is the drawn train curve; Keras' in-epoch loss stays only as
    a faint dotted line, and a history without train_eval_* says on the figure that it is not like for like."""
    from digitlens.plots.training_curves import NOT_LIKE_FOR_LIKE_NOTE

    measured = {"train_eval_loss": [0.9, 0.4, 0.2, 0.15, 0.12], "train_eval_accuracy": [0.7, 0.85, 0.93, 0.95, 0.97]}
    path = tmp_path / "history.csv"  # digitlens' own history.csv, as train writes it
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", *HISTORY, *measured, "lr", "seconds"])
        for i in range(5):
            writer.writerow([i + 1, *(HISTORY[k][i] for k in HISTORY), *(measured[k][i] for k in measured), 0.1, 1.0])
    display = TrainingCurvesDisplay.from_history(path).plot()
    assert display.note_ is None
    for name in ("loss", "accuracy"):
        measured_line, in_epoch, val = (display.lines_[k] for k in (f"train_eval_{name}", name, f"val_{name}"))
        np.testing.assert_allclose(measured_line.get_ydata(), measured[f"train_eval_{name}"])
        np.testing.assert_allclose(in_epoch.get_ydata(), HISTORY[name])
        np.testing.assert_allclose(val.get_ydata(), HISTORY[f"val_{name}"])
        assert measured_line.get_linestyle() == "-" and in_epoch.get_linestyle() == ":"
        assert in_epoch.get_alpha() < 1 and "not like for like" in in_epoch.get_label()
        assert "eval mode" in measured_line.get_label()
    assert not any(NOT_LIKE_FOR_LIKE_NOTE in t.get_text() for t in display.figure_.texts)
    plt.close(display.figure_)
    # an old run (no train_eval_* columns, or only NaN in them): the in-epoch curve, with the note
    for history in (HISTORY, {**HISTORY, "train_eval_loss": [float("nan")] * 5}):
        display = TrainingCurvesDisplay.from_history(history).plot()
        assert display.note_ == NOT_LIKE_FOR_LIKE_NOTE
        assert any(t.get_text() == NOT_LIKE_FOR_LIKE_NOTE for t in display.figure_.texts)
        assert "train_eval_loss" not in display.lines_ and display.lines_["loss"].get_linestyle() == "-"
        plt.close(display.figure_)


def test_bad_history_files_name_the_file(tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("epoch,loss\n0,0.5\n1\n")
    with pytest.raises(DigitlensError, match="ragged.csv: line 3"):
        read_keras_csvlogger(ragged)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("epoch,foo\n0,1\n")
    with pytest.raises(DigitlensError, match="wrong.csv: .*none of the columns"):
        load_history(wrong)
    with pytest.raises(DigitlensError, match="missing.json: file not found"):
        read_keras_history_json(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(DigitlensError, match="broken.json: not valid JSON"):
        read_keras_history_json(broken)


# --- confusion matrix ----------------------------------------------------------------------

@pytest.mark.slow
def test_confusion_matrix_counts_and_row_normalised(predictions, tmp_path):
    _, y_true, proba = predictions
    y_pred = proba.argmax(axis=1)
    display = ConfusionMatrixDisplay.from_predictions(y_true, y_pred).plot()
    expected = confusion_matrix(y_true, y_pred, labels=range(10))
    np.testing.assert_array_equal(display.im_[0].get_array(), expected)
    np.testing.assert_allclose(display.im_[1].get_array(), expected / expected.sum(axis=1, keepdims=True) * 100)
    assert display.ax_[0].get_xlabel() == "predicted digit" and display.ax_[0].get_ylabel() == "true digit"
    assert len(display.figure_.axes) == 4  # two matrices and two colour bars
    written = save_figure_files(display.figure_, tmp_path / "cm")
    assert [p.suffix for p in written] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in written)


def test_confusion_matrix_rows_without_samples_are_zero_not_nan():
    display = ConfusionMatrixDisplay(confusion_matrix=np.array([[2, 0], [0, 0]]))
    np.testing.assert_array_equal(display.normalized, [[1.0, 0.0], [0.0, 0.0]])


# --- per-digit metrics, flat and grouped ---------------------------------------------------

def test_per_digit_bars_equal_sklearn(predictions):
    _, y_true, proba = predictions
    y_pred = proba.argmax(axis=1)
    display = PerDigitMetricsDisplay.from_predictions(y_true, y_pred).plot()
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=range(10), zero_division=0)
    one_vs_rest = [np.mean((y_true == d) == (y_pred == d)) for d in range(10)]
    heights = [[bar.get_height() for bar in container] for container in display.bars_[0]]
    np.testing.assert_allclose(heights, [p, r, f, one_vs_rest])
    assert len(display.ax_) == 1


def test_grouped_layout_has_a_row_per_group_with_values_written(predictions):
    _, y_true, proba = predictions
    y_pred = proba.argmax(axis=1)
    groups = ((1, 2, 4, 6, 9), (0, 3, 5, 7, 8))
    display = PerDigitMetricsDisplay.from_predictions(y_true, y_pred, groups=groups,
                                                      group_names=["positive", "negative"]).plot()
    p, r, _, support = precision_recall_fscore_support(y_true, y_pred, labels=range(10), zero_division=0)
    assert len(display.ax_) == 2
    for axis, containers, group in zip(display.ax_, display.bars_, groups):
        assert [t.get_text().split("\n")[0] for t in axis.get_xticklabels()] == [str(d) for d in group]
        assert len(containers) == 2  # precision and recall
        np.testing.assert_allclose([b.get_height() for b in containers[0]], p[list(group)])
        np.testing.assert_allclose([b.get_height() for b in containers[1]], r[list(group)])
        texts = [t.get_text() for t in axis.texts]
        assert f"p={p[group[0]]:.3f}" in texts and f"r={r[group[-1]]:.3f}" in texts
    assert display.ax_[0].get_title().startswith("positive: digits 1, 2, 4, 6, 9")


def test_grouped_layout_rejects_unknown_digits(predictions):
    _, y_true, proba = predictions
    with pytest.raises(DigitlensError, match="groups: digit"):
        PerDigitMetricsDisplay.from_predictions(y_true, proba.argmax(1), groups=((1, 12),))


# --- galleries -----------------------------------------------------------------------------

def test_prediction_gallery_titles_and_colours(predictions):
    images, y_true, proba = predictions
    display = PredictionGalleryDisplay.from_predictions(images, y_true, proba=proba, n_images=12, seed=None).plot()
    y_pred = proba.argmax(axis=1)
    assert len(display.ax_) == 12
    for i, axis in enumerate(display.ax_):
        title = axis.title
        assert title.get_text() == f"true {y_true[i]}\npred {y_pred[i]} ({format_confidence(proba[i, y_pred[i]])})"
        expected = "#1a7f37" if y_true[i] == y_pred[i] else "#cf222e"
        assert matplotlib.colors.to_hex(title.get_color()) == expected
        np.testing.assert_array_equal(axis.images[0].get_array(), images[i])


@pytest.mark.parametrize("shape", [(-1, 784), (-1, 28, 28, 1), (-1, 1, 28, 28)])
def test_gallery_accepts_keras_and_torch_image_shapes(predictions, shape):
    images, y_true, proba = predictions
    display = PredictionGalleryDisplay.from_predictions(images.reshape(shape), y_true, proba=proba, n_images=3)
    assert display.images.shape == (3, 28, 28)


def test_misclassified_gallery_shows_most_confident_mistakes_first(predictions):
    images, y_true, proba = predictions
    y_pred = proba.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    confidence = proba.max(axis=1)
    expected = wrong[np.argsort(-confidence[wrong], kind="stable")][:8]
    display = MisclassifiedGalleryDisplay.from_predictions(images, y_true, proba=proba, n_images=8).plot()
    np.testing.assert_array_equal(display.indices, expected)
    assert np.all(np.diff(display.confidence) <= 0)
    assert np.all(display.y_true != display.y_pred)
    assert f"of {len(wrong)} errors" in display.figure_._suptitle.get_text()
    first = display.ax_[0].title.get_text()
    assert first == f"true {y_true[expected[0]]}\npred {y_pred[expected[0]]} ({format_confidence(confidence[expected[0]])})"


def test_confidences_near_one_keep_their_decimals():
    assert format_confidence(0.9997) == "99.97%" and format_confidence(0.5) == "50%"
    assert format_confidence(0.999999) == ">99.99%"


def test_misclassified_gallery_with_labels_only_and_with_no_mistakes():
    images = np.zeros((4, 8, 8))
    display = MisclassifiedGalleryDisplay.from_predictions(images, [1, 2, 3, 4], [1, 0, 3, 0]).plot()
    np.testing.assert_array_equal(display.indices, [1, 3])
    assert display.confidence is None
    perfect = MisclassifiedGalleryDisplay.from_predictions(images, [1, 2, 3, 4], [1, 2, 3, 4]).plot()
    assert len(perfect.images) == 0 and perfect.figure_ is not None


# --- reliability diagram -------------------------------------------------------------------

def test_reliability_diagram_bars_counts_and_ece(predictions):
    _, y_true, proba = predictions
    display = ReliabilityDiagramDisplay.from_predictions(y_true, proba).plot()
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    which = np.minimum((np.ceil(confidence * 15) - 1).astype(int), 14)  # (k/15, (k+1)/15]
    counts = np.bincount(which, minlength=15)
    np.testing.assert_array_equal([b.get_height() for b in display.count_bars_], counts)
    accuracy = [correct[which == b].mean() if counts[b] else 0.0 for b in range(15)]
    np.testing.assert_allclose([b.get_height() for b in display.bars_], accuracy)
    ece = sum(counts[b] / len(y_true) * abs(accuracy[b] - confidence[which == b].mean()) for b in range(15) if counts[b])
    assert display.ece == pytest.approx(ece)
    assert f"ECE = {ece:.4f}" in display.figure_._suptitle.get_text()
    assert display.ax_[1].get_ylabel().startswith("images in bin")
