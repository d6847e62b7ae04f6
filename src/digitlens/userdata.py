"""Your own digits as a dataset: an image folder or a Kaggle "Digit Recognizer" CSV.

``--dataset`` takes, besides ``mnist`` and ``digits``:

- a folder in the ImageFolder layout, ``root/0/*.png ... root/9/*.png`` (PNG, JPEG or BMP, any
  size, colour or polarity): each image goes through :func:`digitlens.preprocess.to_mnist`
  (MNIST's own recipe; images already in MNIST form, 28x28 grey light-on-dark, pass unchanged).
  Sub-folders must be named 0-9 (hidden ones, starting with ``.``, are skipped); other files
  than images in a class folder are skipped; a class folder without images is an error.
- a CSV in Kaggle's Digit Recognizer format: a header ``label,pixel0,...,pixel783`` (train.csv)
  or ``pixel0,...,pixel783`` (test.csv, no labels), then one row per image of 784 whole numbers
  0-255, row-major 28x28, already in MNIST form (used as they are, divided by 255).

The whole folder or file is the test split (there is nothing to train on or validate with).
A CSV without labels has no accuracy: ``evaluate`` writes ``predictions.csv`` in Kaggle's
submission format (``ImageId,Label``, ImageId from 1) instead. Every problem (a malformed row, a
wrong column count, a non-numeric or out-of-range pixel, an unreadable image, an empty class) is
one DigitlensError naming the file (and line), raised while loading, before anything is written.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from digitlens.dataset_types import DATASETS, DigitDataset
from digitlens.errors import DigitlensError
from digitlens.preprocess import IMAGE_SUFFIXES, to_mnist
from digitlens.runio import write_text

N_PIXELS = 784
PIXEL_COLUMNS = tuple(f"pixel{i}" for i in range(N_PIXELS))


def is_path_dataset(name) -> bool:
    """True when ``--dataset`` names a file or folder (a ``.csv`` file, an existing folder, or any
    path with a separator) rather than a built-in dataset: ``mnist`` and ``digits`` always mean
    those (write ``./digits`` for a folder of that name)."""
    if isinstance(name, os.PathLike):
        return True
    text = str(name)
    if text in DATASETS:
        return False
    return text.lower().endswith(".csv") or os.sep in text or "/" in text or Path(text).is_dir()


def dataset_name(path) -> str:
    """A short name for a path dataset: its file or folder name (``train.csv``, ``scans``)."""
    return Path(path).resolve().name or str(path)


def load_path_dataset(path):
    """The images (and labels, when the data has them) of a CSV file or an image folder as a
    :class:`digitlens.data.DigitDataset` with split ``test``; ``labels`` is None for a CSV
    without a label column."""
    path = Path(path)
    if path.is_dir():
        return load_image_folder(path)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DigitlensError(f"--dataset {path}: expected a .csv file (Kaggle format) or an image folder")
        return load_kaggle_csv(path)
    raise DigitlensError(f"--dataset {path}: no such file or folder")


# --------------------------------------------------------------------------------------------
# Kaggle Digit Recognizer CSV
# --------------------------------------------------------------------------------------------

def _header(path: Path) -> tuple[list[str], bool]:
    """The header row of ``path`` and whether it has a label column; errors name the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DigitlensError(f"{path}: not a readable CSV file ({exc})") from None
    if not header:
        raise DigitlensError(f"{path}: empty file (expected a header label,pixel0..pixel783 or pixel0..pixel783)")
    header = [h.strip() for h in header]
    if header == ["label", *PIXEL_COLUMNS]:
        return header, True
    if header == list(PIXEL_COLUMNS):
        return header, False
    if header and header[0].replace(".", "", 1).isdigit():
        raise DigitlensError(f"{path}: line 1: no header row (expected label,pixel0..pixel783 or pixel0..pixel783)")
    raise DigitlensError(
        f"{path}: line 1: header of {len(header)} columns ({', '.join(header[:2])}{', ...' if len(header) > 2 else ''}) "
        f"is not Kaggle's (expected label,pixel0..pixel783 or pixel0..pixel783)")


def _first_bad_row(path: Path, n_columns: int, labelled: bool) -> str | None:
    """The first problem found reading ``path`` row by row (``line N: ...``), or None.

    The slow path, run only after numpy's parser refused the file, to name the line it refused.
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != n_columns:
                return f"line {line}: {len(row)} columns, expected {n_columns}"
            for column, cell in enumerate(row):
                try:
                    float(cell)
                except ValueError:
                    name = "label" if labelled and column == 0 else PIXEL_COLUMNS[column - labelled]
                    return f"line {line}: {name} {cell.strip()!r} is not a number"
    return None


def _range_error(values: np.ndarray, low: int, high: int) -> int | None:
    """Index of the first value of ``values`` that is not a whole number in [low, high], or None."""
    bad = ~np.isfinite(values) | (values < low) | (values > high) | (np.mod(values, 1) != 0)
    flat = np.flatnonzero(bad)
    return int(flat[0]) if flat.size else None


def load_kaggle_csv(path: str | os.PathLike):
    """A Kaggle Digit Recognizer CSV (train.csv with labels, test.csv without) as a
    :class:`digitlens.data.DigitDataset`: images float32 (N, 1, 28, 28) = pixel / 255, labels
    int64 (N,) or None, split ``test``. Raises a one-line DigitlensError naming the file and line
    of the first problem."""
    path = Path(path)
    _, labelled = _header(path)
    n_columns = N_PIXELS + labelled
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": reported below as one line
            # numpy's C parser reads a 42,000-row train.csv (76 MB) in 2.8 s here; a refused
            # file is read again by _first_bad_row to name the line.
            table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2, encoding="utf-8-sig")
    except (ValueError, UnicodeDecodeError) as exc:
        problem = _first_bad_row(path, n_columns, labelled)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DigitlensError(f"{path}: {problem or first}") from None
    if table.shape[0] == 0:
        raise DigitlensError(f"{path}: no data rows after the header")
    if table.shape[1] != n_columns:
        problem = _first_bad_row(path, n_columns, labelled)
        raise DigitlensError(f"{path}: {problem or f'{table.shape[1]} columns, expected {n_columns}'}")
    pixels = table[:, labelled:]
    bad = _range_error(pixels, 0, 255)
    if bad is not None:
        row, column = divmod(bad, N_PIXELS)
        raise DigitlensError(f"{path}: {_data_line(path, row)}: pixel{column} {pixels[row, column]:g} "
                             f"is not a whole number 0-255")
    labels = None
    if labelled:
        bad = _range_error(table[:, 0], 0, 9)
        if bad is not None:
            raise DigitlensError(f"{path}: {_data_line(path, bad)}: label {table[bad, 0]:g} is not a digit 0-9")
        labels = torch.from_numpy(table[:, 0].astype(np.int64))
    # The same float32 arithmetic as the IDX reader (uint8 / 255), so the pixels are identical.
    images = torch.from_numpy(pixels.astype(np.uint8).astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return DigitDataset(dataset_name(path), "test", images, labels)


def _data_line(path: Path, row: int) -> str:
    """``line N`` of data row ``row`` (0-based) of ``path``, counting the header and blank lines."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        seen = -1
        for number, text in enumerate(fh, start=1):
            if number == 1 or not text.strip():
                continue
            seen += 1
            if seen == row:
                return f"line {number}"
    return f"data row {row + 1}"


def write_kaggle_submission(path: str | os.PathLike, predictions) -> Path:
    """Write ``predictions`` (N,) as Kaggle's submission CSV ``ImageId,Label`` (ImageId from 1),
    atomically; returns the path."""
    predictions = np.asarray(predictions).astype(np.int64)
    lines = ["ImageId,Label", *(f"{i},{int(p)}" for i, p in enumerate(predictions, start=1))]
    return write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------

def image_folder_files(root: str | os.PathLike) -> list[tuple[Path, int]]:
    """``(file, digit)`` for every image of an ImageFolder tree ``root/0 ... root/9``, class by
    class, files in name order. Raises a one-line DigitlensError for a missing folder, no class
    folders, a sub-folder not named 0-9, or a class folder without images."""
    root = Path(root)
    if not root.is_dir():
        raise DigitlensError(f"{root}: folder not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DigitlensError(f"{root}: no class sub-folders (expected {root}/0/*.png ... {root}/9/*.png)")
    files: list[tuple[Path, int]] = []
    for folder in folders:
        if folder.name not in tuple("0123456789"):
            raise DigitlensError(f"{folder}: class folder named {folder.name!r}, expected a digit 0-9")
        images = sorted(p for p in folder.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DigitlensError(f"{folder}: empty class (no {'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images)")
        files += [(p, int(folder.name)) for p in images]
    return files


def load_image_folder(root: str | os.PathLike):
    """An ImageFolder tree (see :func:`image_folder_files`) as a :class:`digitlens.data.DigitDataset`:
    images float32 (N, 1, 28, 28) through :func:`digitlens.preprocess.to_mnist`, labels int64 (N,)
    from the folder names, split ``test``, and ``files`` (N,) the image paths."""
    files = image_folder_files(root)
    images = torch.stack([to_mnist(path) for path, _ in files])
    labels = torch.tensor([digit for _, digit in files], dtype=torch.int64)
    return DigitDataset(dataset_name(root), "test", images, labels, files=[str(p) for p, _ in files])
