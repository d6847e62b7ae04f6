"""Your own data as --dataset: Kaggle Digit Recognizer CSVs (with and without labels) and image
folders written from the MNIST test images reproduce the IDX results exactly; Kaggle's submission
format; one-line errors naming file and line for every kind of bad file, with nothing written."""

from __future__ import annotations

import csv
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score
from typer.testing import CliRunner

from digitlens import data, runio, userdata
from digitlens.cli import app
from digitlens.errors import DigitlensError
from digitlens.evaluate import evaluate_model
from digitlens.inference import predict_proba

from training import brief_mnist_run

REAL_MNIST = os.environ.get("DIGITLENS_DATA")
needs_mnist = pytest.mark.skipif(not REAL_MNIST, reason="DIGITLENS_DATA is not set (folder with the MNIST .gz files)")
N_IMAGES = 500


def write_kaggle_csv(path, images: np.ndarray, labels=None):
    """Kaggle's format with the csv module: header, then label (if any) and 784 pixels 0-255 per row."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow((["label"] if labels is not None else []) + [f"pixel{i}" for i in range(784)])
        for k, image in enumerate(images):
            writer.writerow(([int(labels[k])] if labels is not None else []) + image.reshape(-1).astype(int).tolist())
    return path


def write_image_folder(root, images: np.ndarray, labels) -> dict:
    """root/<digit>/<index>.png for each uint8 image (N, 28, 28); returns {file: index}."""
    where = {}
    for k, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{k:05d}.png"
        Image.fromarray(image).save(path)
        where[str(path)] = k
    return where


@pytest.fixture(autouse=True)
def png_figures_only(monkeypatch):
    """Evaluation figures as PNG only (SVG doubles the drawing time; not what these tests check)."""
    import digitlens.evaluate

    monkeypatch.setattr(digitlens.evaluate, "FIGURE_FORMATS", ("png",))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: small batches on a shared 2-core machine run faster so (see training.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist_first(tmp_path_factory):
    """(run_dir, model, the first 500 MNIST test images as a DigitDataset, the same as uint8 (500, 28, 28))."""
    folder = data.locate_mnist(download=False)
    test = data.load_mnist_split(folder, "test")
    first = data.DigitDataset("mnist", "test", test.images[:N_IMAGES], test.labels[:N_IMAGES])
    raw = np.round(first.images[:, 0].numpy() * 255).astype(np.uint8)
    run_dir, model = brief_mnist_run(tmp_path_factory.getbasetemp() / "brief-mnist-cnn")  # shared with test_predict
    return run_dir, model, first, raw


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- real formats reproduce the IDX results ------------------------------------------------

@pytest.mark.slow
@pytest.mark.mnist
@needs_mnist
def test_kaggle_train_csv_reproduces_the_idx_results_exactly(mnist_first, tmp_path):
    run_dir, model, first, raw = mnist_first
    path = write_kaggle_csv(tmp_path / "train.csv", raw, first.labels.numpy())
    loaded = userdata.load_kaggle_csv(path)
    assert torch.equal(loaded.images, first.images) and torch.equal(loaded.labels, first.labels)
    assert loaded.split == "test" and loaded.name == "train.csv"
    from_csv = evaluate_model(model, str(path), bootstrap=0, progress=False)
    from_idx = evaluate_model(model, first, bootstrap=0, progress=False)
    assert from_csv["accuracy"] == from_idx["accuracy"]
    assert from_csv["metrics"]["confusion_matrix"] == from_idx["metrics"]["confusion_matrix"]
    # the CLI on a run folder: predictions equal the model's on the IDX pixels, accuracy equals sklearn's
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), "--dataset", str(path), "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    preds = runio.read_npz(out / "predictions.npz")
    expected = predict_proba(model, first.images).argmax(axis=1)
    np.testing.assert_array_equal(preds["y_pred"], expected)
    np.testing.assert_array_equal(preds["y_true"], first.labels.numpy())
    metrics = runio.read_json(out / "metrics.json")
    assert metrics["accuracy"] == accuracy_score(first.labels.numpy(), expected)
    assert metrics["source"]["dataset"] == str(path)
    assert metrics["temperature"] is not None  # fitted on the run's own validation split
    assert f"accuracy {metrics['accuracy']:.4f}" in result.output


@pytest.mark.slow
@pytest.mark.mnist
@needs_mnist
def test_kaggle_test_csv_without_labels_gets_a_submission_file(mnist_first, tmp_path):
    run_dir, model, first, raw = mnist_first
    path = write_kaggle_csv(tmp_path / "test.csv", raw)
    loaded = userdata.load_kaggle_csv(path)
    assert loaded.labels is None and torch.equal(loaded.images, first.images)
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), "--dataset", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = run_dir / "evaluate" / "test.csv"  # the default: the run's own evaluation stays untouched
    assert "no accuracy" in result.output and str(out / "predictions.csv") in result.output
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["ImageId", "Label"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, N_IMAGES + 1))
    expected = predict_proba(model, first.images).argmax(axis=1)
    assert [int(r[1]) for r in rows[1:]] == expected.tolist()
    assert not (out / "metrics.json").exists() and not (run_dir / "metrics.json").exists()
    summary = runio.read_json(out / "evaluation.json")
    assert summary["accuracy"] is None and summary["n_samples"] == N_IMAGES
    assert summary["predicted_counts"] == np.bincount(expected, minlength=10).tolist()


@pytest.mark.slow
@pytest.mark.mnist
@needs_mnist
def test_an_image_folder_of_mnist_pngs_reproduces_the_idx_results_exactly(mnist_first, tmp_path):
    run_dir, model, first, raw = mnist_first
    root = tmp_path / "mnist_png"
    where = write_image_folder(root, raw, first.labels.numpy())
    loaded = userdata.load_image_folder(root)
    order = [where[f] for f in loaded.files]
    assert sorted(order) == list(range(N_IMAGES))
    # 28x28 grey light-on-dark images are MNIST form already: passed through, pixel for pixel
    assert torch.equal(loaded.images, first.images[order])
    assert torch.equal(loaded.labels, first.labels[order])
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), "--dataset", str(root), "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    preds = runio.read_npz(out / "predictions.npz")
    expected = predict_proba(model, first.images).argmax(axis=1)
    np.testing.assert_array_equal(preds["y_pred"], expected[order])
    assert [where[f] for f in preds["files"]] == order
    assert runio.read_json(out / "metrics.json")["accuracy"] == accuracy_score(first.labels.numpy(), expected)


@pytest.mark.slow
@pytest.mark.mnist
@needs_mnist
def test_a_folder_of_large_dark_on_light_colour_images_is_brought_to_mnist_form(mnist_first, tmp_path):
    """The same digits as 3x larger RGB JPEGs and BMPs, dark ink on grey paper, off-centre: the
    recipe recovers MNIST form, so the model stays about as accurate as on the IDX pixels."""
    run_dir, model, first, raw = mnist_first
    n = 200
    root = tmp_path / "scans"
    rng = np.random.default_rng(0)
    for k in range(n):
        big = np.asarray(Image.fromarray(raw[k]).resize((84, 84), Image.Resampling.BILINEAR), dtype=np.float64)
        paper = np.full((120, 150), 220.0)
        top, left = rng.integers(0, 36), rng.integers(0, 66)
        paper[top:top + 84, left:left + 84] -= big * 0.8
        paper = np.clip(paper + rng.normal(0, 4, paper.shape), 0, 255).astype(np.uint8)
        folder = root / str(int(first.labels[k]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([paper] * 3, axis=-1)).save(folder / f"{k:05d}.{'jpg' if k % 2 else 'bmp'}")
    loaded = userdata.load_image_folder(root)
    assert loaded.images.shape == (n, 1, 28, 28) and len(loaded.files) == n
    on_scans = evaluate_model(model, loaded, bootstrap=0, progress=False)["accuracy"]
    on_idx = accuracy_score(first.labels[:n].numpy(), predict_proba(model, first.images[:n]).argmax(axis=1))
    assert on_scans >= on_idx - 0.03, (on_scans, on_idx)


# --- the split and the train refusal --------------------------------------------------------

@pytest.mark.slow
def test_a_path_dataset_is_all_test_split(tmp_path):
    rng = np.random.default_rng(0)
    path = write_kaggle_csv(tmp_path / "train.csv", rng.integers(0, 256, (7, 28, 28)), np.arange(7) % 10)
    splits = data.load_splits(str(path))
    assert len(splits.test) == 7 and len(splits.train) == 0 and len(splits.val) == 0
    assert userdata.is_path_dataset(str(path)) and userdata.is_path_dataset(str(tmp_path))
    assert not userdata.is_path_dataset("mnist") and not userdata.is_path_dataset("digits")
    from digitlens.train import train

    with pytest.raises(DigitlensError, match="test data only"):
        train(tmp_path / "run", dataset=str(path))


def test_csv_pixels_are_exactly_uint8_over_255_and_blank_lines_are_skipped(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3, 28, 28))
    path = write_kaggle_csv(tmp_path / "t.csv", pixels, [3, 1, 4])
    with open(path, "a") as fh:
        fh.write("\n\n")
    loaded = userdata.load_kaggle_csv(path)
    expected = torch.from_numpy(pixels.astype(np.uint8).astype(np.float32) / 255.0).unsqueeze(1)
    assert torch.equal(loaded.images, expected) and loaded.labels.tolist() == [3, 1, 4]


# --- bad files: one line naming the file (and line), nothing written ------------------------

def _good_rows(n=3, labelled=True):
    header = (["label"] if labelled else []) + [f"pixel{i}" for i in range(784)]
    rows = [([str(k % 10)] if labelled else []) + ["0"] * 784 for k in range(n)]
    return header, rows


def _bad_csv(kind):
    header, rows = _good_rows()
    if kind == "short row":
        rows[1] = rows[1][:-1]
        return header, rows, "line 3: 784 columns, expected 785"
    if kind == "long row":
        rows[2] = rows[2] + ["0"]
        return header, rows, "line 4: 786 columns, expected 785"
    if kind == "text pixel":
        rows[0][5] = "dark"
        return header, rows, "line 2: pixel4 'dark' is not a number"
    if kind == "empty pixel":
        rows[1][1] = ""
        return header, rows, "line 3: pixel0 '' is not a number"
    if kind == "pixel 256":
        rows[2][10] = "256"
        return header, rows, "line 4: pixel9 256 is not a whole number 0-255"
    if kind == "negative pixel":
        rows[0][784] = "-1"
        return header, rows, "line 2: pixel783 -1 is not a whole number 0-255"
    if kind == "fractional pixel":
        rows[1][3] = "12.5"
        return header, rows, "line 3: pixel2 12.5 is not a whole number 0-255"
    if kind == "label 10":
        rows[1][0] = "10"
        return header, rows, "line 3: label 10 is not a digit 0-9"
    if kind == "wrong header":
        return ["id"] + header[1:], rows, "line 1: header of 785 columns (id, pixel0, ...) is not Kaggle's"
    if kind == "no header":
        return rows[0], rows[1:], "line 1: no header row"
    if kind == "too few columns everywhere":
        return header[:-1], [r[:-1] for r in rows], "header of 784 columns"
    if kind == "header only":
        return header, [], "no data rows after the header"
    raise AssertionError(kind)


BAD_CSV_KINDS = ["short row", "long row", "text pixel", "empty pixel", "pixel 256", "negative pixel",
                 "fractional pixel", "label 10", "wrong header", "no header", "too few columns everywhere",
                 "header only"]


@pytest.mark.parametrize("kind", BAD_CSV_KINDS)
def test_bad_csv_gives_one_line_naming_file_and_line(tmp_path, kind):
    header, rows, message = _bad_csv(kind)
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    with pytest.raises(DigitlensError) as info:
        userdata.load_kaggle_csv(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(path)) and message in text, text


def test_an_empty_csv_file_is_named(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DigitlensError, match="empty.csv: empty file"):
        userdata.load_kaggle_csv(path)


def _noise_image(path, size=(40, 30)):
    rng = np.random.default_rng(0)
    arr = np.full(size, 230, np.uint8)
    arr[10:30, 12:18] = 20  # a dark stroke: a "1" on light paper
    Image.fromarray(arr + rng.integers(0, 5, size).astype(np.uint8)).save(path)


def _bad_folder(root, kind):
    """Build a bad image folder of ``kind`` under ``root``; return the text the error must hold."""
    root.mkdir()
    if kind == "no class folders":
        _noise_image(root / "a.png")
        return f"{root}: no class sub-folders"
    (root / "1").mkdir()
    _noise_image(root / "1" / "a.png")
    if kind == "empty class":
        (root / "7").mkdir()
        (root / "7" / "notes.txt").write_text("not an image")
        return f"{root / '7'}: empty class"
    if kind == "unreadable image":
        (root / "1" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        return f"{root / '1' / 'b.png'}: not a readable image"
    if kind == "not a digit folder":
        (root / "cats").mkdir()
        _noise_image(root / "cats" / "c.png")
        return f"{root / 'cats'}: class folder named 'cats', expected a digit 0-9"
    if kind == "blank image":
        Image.fromarray(np.full((30, 30), 255, np.uint8)).save(root / "1" / "blank.png")
        return f"{root / '1' / 'blank.png'}: no ink found"
    raise AssertionError(kind)


BAD_FOLDER_KINDS = ["no class folders", "empty class", "unreadable image", "not a digit folder", "blank image"]


@pytest.mark.parametrize("kind", BAD_FOLDER_KINDS)
def test_bad_image_folder_gives_one_line_naming_the_file(tmp_path, kind):
    root = tmp_path / "digits_in"
    message = _bad_folder(root, kind)
    with pytest.raises(DigitlensError) as info:
        userdata.load_image_folder(root)
    assert "\n" not in str(info.value) and message in str(info.value), str(info.value)


@pytest.fixture
def scripted_model(tmp_path):
    """An (untrained) TorchScript model file: the errors come before it is ever run."""
    path = tmp_path / "linear.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))).save(str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["csv:" + k for k in ("short row", "pixel 256", "label 10")]
                         + ["folder:" + k for k in ("empty class", "unreadable image")])
def test_cli_bad_data_is_one_line_and_writes_nothing(tmp_path, scripted_model, kind):
    family, name = kind.split(":")
    if family == "csv":
        header, rows, message = _bad_csv(name)
        dataset = tmp_path / "train.csv"
        with open(dataset, "w", newline="") as fh:
            csv.writer(fh).writerows([header, *rows])
        message = f"{dataset}: {message}"
    else:
        dataset = tmp_path / "folder"
        message = _bad_folder(dataset, name)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["evaluate", "--model-file", str(scripted_model), "--dataset", str(dataset),
                                      "--out", str(out), "--no-progress"])
    _one_line_error(result, message)
    assert not out.exists()


@pytest.mark.slow
def test_cli_unlabelled_csv_with_a_model_file(tmp_path, scripted_model):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (5, 28, 28))
    path = write_kaggle_csv(tmp_path / "test.csv", pixels)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["evaluate", "--model-file", str(scripted_model), "--dataset", str(path),
                                      "--out", str(out), "--no-progress", "--trust-code"])
    assert result.exit_code == 0, result.output
    lines = (out / "predictions.csv").read_text().splitlines()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(scripted_model))
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).unsqueeze(1)
    expected = model(x).argmax(dim=1).tolist()
    assert lines == ["ImageId,Label"] + [f"{i},{p}" for i, p in enumerate(expected, start=1)]
