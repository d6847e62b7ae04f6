"""digitlens.history: the one parser of training histories (the report reads history.csv through
it too). Its row reader is checked against a plain csv.DictReader loop, and the array reader must
give the same numbers as the rows."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from digitlens.errors import DigitlensError
from digitlens.history import detect_overfitting, load_history, read_history

HEADER = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "train_eval_loss", "train_eval_accuracy", "lr",
          "seconds"]


def report_read_history(path):
    """The oracle: the report's reader before it used digitlens.history, a plain csv.DictReader
    loop (rows of floats, empty cells left out, None when the file is absent or has no rows)."""
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DigitlensError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    rows = []
    for line_no, row in enumerate(csv.DictReader(text.splitlines()), start=2):
        parsed = {}
        for key, value in row.items():
            if key is None or value in (None, ""):
                continue
            try:
                parsed[key.strip()] = float(value)
            except ValueError:
                raise DigitlensError(f"{path}: line {line_no}: column {key!r} is not a number ({value!r})") from None
        rows.append(parsed)
    return rows or None


def _write(path, rows, header=HEADER):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_rows_equal_the_report_readers_rows(tmp_path):
    rng = np.random.default_rng(0)
    rows = [[e, *rng.uniform(0, 1, size=7).round(6), 0.5 + e] for e in range(1, 6)]
    rows[2][3] = ""  # an empty cell is left out of its row
    full = _write(tmp_path / "history.csv", rows)
    assert read_history(full) == report_read_history(full)
    assert read_history(full)[2].keys() == set(HEADER) - {"val_loss"}
    short = tmp_path / "short.csv"
    short.write_text("epoch,loss,val_loss\n1,0.5,0.4\n2,0.3\n")  # a short row: its missing cells left out
    assert read_history(short) == report_read_history(short) == [{"epoch": 1, "loss": 0.5, "val_loss": 0.4},
                                                                 {"epoch": 2, "loss": 0.3}]
    assert read_history(tmp_path / "absent.csv") is None and report_read_history(tmp_path / "absent.csv") is None
    header_only = tmp_path / "empty.csv"
    header_only.write_text("epoch,loss\n")
    assert read_history(header_only) is None and report_read_history(header_only) is None


def test_bad_rows_are_one_line_errors(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n1,abc\n")
    for reader in (read_history, report_read_history, load_history):
        with pytest.raises(DigitlensError, match=r"history.csv: line 2: column 'loss' is not a number \('abc'\)"):
            reader(path)
    # More cells than columns: the report's reader meant to refuse it but skipped csv.DictReader's
    # None key first, so it kept the row silently; the one parser refuses it.
    path.write_text("epoch,loss\n1,0.5,7\n")
    assert report_read_history(path) == [{"epoch": 1.0, "loss": 0.5}]
    for reader in (read_history, load_history):
        with pytest.raises(DigitlensError, match=r"history.csv: line 2: 3 cells for 2 columns"):
            reader(path)


def test_non_utf8_history_is_one_line_for_every_reader(tmp_path):
    path = tmp_path / "history.csv"
    path.write_bytes(b"\xff\xfeepoch,loss\n")
    for reader in (read_history, report_read_history, load_history):
        with pytest.raises(DigitlensError, match=r"history.csv: not UTF-8 text \(byte 0\)"):
            reader(path)


def test_arrays_hold_the_numbers_of_the_rows(tmp_path):
    rows = [[e, 1.0 / e, 0.5 + e / 10, "nan", "", 0.9 / e, 0.6, 0.01, 1.5] for e in range(1, 4)]
    path = _write(tmp_path / "history.csv", rows)
    arrays = load_history(path)
    np.testing.assert_array_equal(arrays["epoch"], [1, 2, 3])  # digitlens' epochs are 1-based already
    for row, i in zip(read_history(path), range(3)):
        for key, value in row.items():
            np.testing.assert_equal(arrays[key][i], value)
    assert np.isnan(arrays["val_accuracy"]).all()  # empty cells are NaN in the arrays
    # a run trained with val_fraction=0: overfitting is not assessed (and no All-NaN error)
    verdict = detect_overfitting(arrays)
    assert verdict["available"] is False and verdict["diverges"] is None and "no validation loss" in verdict["reason"]
