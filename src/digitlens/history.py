"""Training histories: the one parser for digitlens' ``history.csv``, a Keras ``CSVLogger`` file and
a saved Keras ``history.history`` JSON, and the one overfitting rule (:func:`detect_overfitting`).

Two shapes come out of it:

* a *normalised history* (:func:`load_history`, :func:`normalise_history`): a dict of numpy arrays
  of shape (n_epochs,) with ``epoch`` (1-based ints) and whichever of ``loss``, ``accuracy``,
  ``val_loss``, ``val_accuracy`` (and extra columns such as ``train_eval_loss``,
  ``train_eval_accuracy``, ``lr``, ``seconds``) were recorded; what the figures and the insights use;
* the *rows* of a ``history.csv`` (:func:`read_history`): a list with one dict of floats per epoch,
  empty cells left out; what the report reads.

Floor module: numpy and the standard library only, no stage.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.intervals import wilson_interval
from digitlens.runio import read_text

CURVES = ("loss", "accuracy", "val_loss", "val_accuracy")
#: Column names of older Keras versions and other frameworks, mapped onto Keras' current ones.
_ALIASES = {"acc": "accuracy", "val_acc": "val_accuracy", "train_loss": "loss", "train_accuracy": "accuracy"}
#: Cells that stand for a missing value (Keras' CSVLogger writes "NA").
_MISSING = ("", "NA", "nan")

#: Validation loss must rise for at least this many consecutive epochs while training loss falls...
DIVERGENCE_PATIENCE = 2
#: ...or end more than this fraction above its minimum, to count as diverging.
DIVERGENCE_TOLERANCE = 0.05


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

def parse_history_csv(path: str | os.PathLike, *, short_rows: bool = False) -> tuple[list[str], list[list[float | None]]]:
    """The header (column names, stripped) and the rows of a history CSV file; each row a list as
    long as the header of floats, or None for a missing cell (empty, ``NA``; ``nan`` is NaN).

    ``short_rows``: a row with fewer cells than the header is padded with None (else a one-line
    error naming the line). A row with more cells, a cell that is not a number, a file that is
    missing, not UTF-8 or not CSV are one-line DigitlensErrors naming the file."""
    path = Path(path)
    text = read_text(path)
    try:
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise DigitlensError(f"{path}: not a readable CSV file ({exc})") from None
    if not lines or not lines[0]:
        raise DigitlensError(f"{path}: empty history file (no header)")
    header = [h.strip() for h in lines[0]]
    rows: list[list[float | None]] = []
    for line_no, cells in enumerate(lines[1:], start=2):
        if not cells:
            continue
        if len(cells) > len(header) or (len(cells) < len(header) and not short_rows):
            raise DigitlensError(f"{path}: line {line_no}: {len(cells)} cells for {len(header)} columns")
        row: list[float | None] = []
        for name, cell in zip(header, cells):
            cell = cell.strip()
            if cell in _MISSING[:2]:
                row.append(None)
                continue
            try:
                row.append(float(cell))
            except ValueError:
                raise DigitlensError(f"{path}: line {line_no}: column {name!r} is not a number ({cell!r})") from None
        rows.append(row + [None] * (len(header) - len(row)))
    return header, rows


def read_history(path: str | os.PathLike) -> list[dict[str, float]] | None:
    """Rows of a ``history.csv`` as dicts of floats (empty cells and missing trailing cells left
    out); None when the file is absent or has no rows. Errors as :func:`parse_history_csv`."""
    path = Path(path)
    if not path.is_file():
        return None
    header, rows = parse_history_csv(path, short_rows=True)
    found = [{name: value for name, value in zip(header, row) if value is not None} for row in rows]
    return found or None


def _columns(path: Path) -> dict[str, list[float]]:
    header, rows = parse_history_csv(path)
    return {name: [np.nan if row[i] is None else row[i] for row in rows] for i, name in enumerate(header)}


def normalise_history(history: Any, *, zero_based_epochs: bool | None = None) -> dict[str, np.ndarray]:
    """A normalised history (see module docstring) from a dict of lists, a DataFrame, a Keras
    ``History`` object (its ``.history``) or an already normalised history.

    Epochs: taken from an ``epoch`` column when there is one (shifted by +1 when
    ``zero_based_epochs``, or when None and the first epoch is 0), else numbered 1..n.
    """
    if hasattr(history, "history") and isinstance(history.history, dict):  # keras.callbacks.History
        history = history.history
    if hasattr(history, "to_dict") and hasattr(history, "columns"):  # pandas.DataFrame
        history = history.to_dict("list")
    if not isinstance(history, dict):
        raise DigitlensError(f"history: expected a dict of lists or a DataFrame, got {type(history).__name__}")
    columns: dict[str, np.ndarray] = {}
    for key, values in history.items():
        name = _ALIASES.get(str(key), str(key))
        try:
            columns[name] = np.asarray(values, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise DigitlensError(f"history: column {key!r} is not numeric") from None
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise DigitlensError(f"history: columns have different lengths {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    if "epoch" in columns:
        epoch = columns["epoch"]
        if zero_based_epochs or (zero_based_epochs is None and n and epoch[0] == 0):
            epoch = epoch + 1
        columns["epoch"] = epoch.astype(np.int64)
    else:
        columns["epoch"] = np.arange(1, n + 1, dtype=np.int64)
    if not any(k in columns for k in CURVES):
        raise DigitlensError(f"history: none of the columns {', '.join(CURVES)} found (got {', '.join(history)})")
    return {"epoch": columns.pop("epoch"), **columns}


def _with_path(path: Path, func, *args, **kwargs):
    try:
        return func(*args, **kwargs)
    except DigitlensError as exc:
        message = str(exc)
        raise DigitlensError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def read_keras_csvlogger(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A normalised history from a Keras ``CSVLogger`` file (its 0-based ``epoch`` becomes 1-based)."""
    path = Path(path)
    return _with_path(path, normalise_history, _columns(path), zero_based_epochs=True)


def read_keras_history_json(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A normalised history from a JSON file holding Keras' ``history.history`` dict
    (``{"loss": [...], "val_loss": [...], ...}``); epochs are numbered 1..n."""
    path = Path(path)
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DigitlensError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return _with_path(path, normalise_history, obj)


def read_history_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A normalised history from digitlens' own ``history.csv`` (epoch, loss, accuracy, val_loss,
    val_accuracy, train_eval_loss, train_eval_accuracy, lr, seconds)."""
    path = Path(path)
    return _with_path(path, normalise_history, _columns(path))


def load_history(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A normalised history from any supported file: ``.json`` (Keras ``history.history``), a
    digitlens ``history.csv`` (it has a ``seconds`` column) or a Keras ``CSVLogger`` file."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return read_keras_history_json(path)
    columns = _columns(path)
    zero_based = None if "seconds" in columns else True
    return _with_path(path, normalise_history, columns, zero_based_epochs=zero_based)


# --------------------------------------------------------------------------------------------
# Readings of a normalised history
# --------------------------------------------------------------------------------------------

def has_values(history: dict, name: str) -> bool:
    """``name`` is a column of ``history`` with at least one finite value."""
    values = history.get(name)
    return values is not None and len(values) > 0 and bool(np.any(np.isfinite(np.asarray(values, dtype=np.float64))))


def best_epoch_index(history: dict[str, np.ndarray]) -> int | None:
    """Index of the best epoch: lowest ``val_loss`` (Keras' EarlyStopping default), else highest
    ``val_accuracy``; None without validation data."""
    for key, pick in (("val_loss", np.nanargmin), ("val_accuracy", np.nanargmax)):
        values = history.get(key)
        if values is not None and len(values) and not np.all(np.isnan(values)):
            return int(pick(values))
    return None


def _wilson(share: float | None, n: int | None) -> list[float] | None:
    """The 95% Wilson interval of ``share`` of ``n`` images; None when either is unknown."""
    if share is None or not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
        return None
    return [float(v) for v in wilson_interval(round(float(share) * int(n)), int(n))]


def best_validation(history: dict[str, np.ndarray] | None, *, n_val: int | None = None,
                    n_train_eval: int | None = None) -> dict:
    """The best validation accuracy of a normalised history, its epoch and its 95% Wilson interval.

    Returns ``available`` (False without a finite ``val_accuracy``, with ``reason``) and, when
    available: ``best_val_accuracy`` (the highest, first epoch of ties), ``best_val_accuracy_epoch``,
    ``best_val_accuracy_ci`` (Wilson interval of ``n_val`` images; None without ``n_val``), ``n_val``,
    ``final_val_accuracy`` and ``final_val_accuracy_ci`` (last epoch), ``n_epochs``, and at the best
    epoch ``train_eval_accuracy_at_best`` with ``train_eval_accuracy_at_best_ci`` (``n_train_eval``
    training images measured like validation) when recorded, else ``train_accuracy_at_best``
    (Keras' in-epoch running mean: no interval) when recorded."""
    if history is None or not has_values(history, "val_accuracy"):
        reason = "no training history" if history is None else "the history has no validation accuracy"
        return {"available": False, "reason": reason}
    val = np.asarray(history["val_accuracy"], dtype=np.float64)
    epoch = np.asarray(history["epoch"])
    best = int(np.nanargmax(val))
    out: dict[str, Any] = {
        "available": True,
        "best_val_accuracy": float(val[best]),
        "best_val_accuracy_epoch": int(epoch[best]),
        "best_val_accuracy_ci": _wilson(float(val[best]), n_val),
        "n_val": int(n_val) if isinstance(n_val, (int, np.integer)) else None,
        "final_val_accuracy": float(val[-1]) if np.isfinite(val[-1]) else None,
        "n_epochs": int(len(epoch)),
    }
    out["final_val_accuracy_ci"] = _wilson(out["final_val_accuracy"], n_val)
    if has_values(history, "train_eval_accuracy") and np.isfinite(history["train_eval_accuracy"][best]):
        measured = float(history["train_eval_accuracy"][best])
        out.update(train_eval_accuracy_at_best=measured,
                   train_eval_accuracy_at_best_ci=_wilson(measured, n_train_eval),
                   n_train_eval=int(n_train_eval) if isinstance(n_train_eval, (int, np.integer)) else None)
    elif has_values(history, "accuracy") and np.isfinite(history["accuracy"][best]):
        out["train_accuracy_at_best"] = float(history["accuracy"][best])
    return out


def detect_overfitting(history: dict[str, np.ndarray] | None, *, patience: int = DIVERGENCE_PATIENCE,
                       tolerance: float = DIVERGENCE_TOLERANCE) -> dict:
    """Whether and from which epoch the validation loss diverges: the one overfitting rule of
    digitlens (``insights.json``'s ``overfitting``, the training-curves figure, the report).

    The best epoch is the one with the lowest ``val_loss`` (NaN epochs skipped). The run
    *diverges* when, after the best epoch, either (a) ``val_loss`` rises on ``patience`` or more
    consecutive epochs while the training loss falls on each of them (``train_eval_loss``,
    measured like ``val_loss``, when the history has it, else Keras' ``loss``: only its direction
    is used, never its level), or (b) the last ``val_loss`` is more than ``tolerance`` (relative)
    above the minimum. ``from_epoch`` is then the first epoch after the best one.

    Returns a dict with ``available`` and ``diverges`` (None when not available), ``rule`` (this
    definition in words) and, when not available, ``reason``; when available also ``from_epoch``,
    ``best_epoch``, ``n_epochs``, ``min_val_loss``, ``final_val_loss``, ``final_rise_percent``,
    ``train_loss_at_best``, ``final_train_loss``, ``longest_rise`` (epochs, with training loss
    falling), ``train_loss_column`` (which training loss was used) and ``reasons`` (sentences).
    Not available: no history, no ``loss``/``val_loss`` columns, or no finite validation loss (a
    run trained without a validation split).
    """
    rule = (f"val_loss rises for >= {patience} consecutive epochs after its minimum while training loss "
            f"falls, or ends > {tolerance:.0%} above its minimum")
    if history is None:
        return {"available": False, "diverges": None, "rule": rule, "reason": "no training history"}
    if "val_loss" not in history or "loss" not in history or len(history["val_loss"]) == 0:
        return {"available": False, "diverges": None, "rule": rule,
                "reason": "the history has no loss and val_loss columns"}
    if not has_values(history, "val_loss"):
        return {"available": False, "diverges": None, "rule": rule,
                "reason": "the history has no validation loss (trained without a validation split)"}
    train_column = "train_eval_loss" if has_values(history, "train_eval_loss") else "loss"
    epoch = np.asarray(history["epoch"])
    loss = np.asarray(history[train_column], dtype=np.float64)
    val = np.asarray(history["val_loss"], dtype=np.float64)
    best = int(np.nanargmin(val))
    min_val, final_val = float(val[best]), float(val[-1])
    rise = (final_val - min_val) / abs(min_val) if min_val else 0.0
    # Longest streak after the best epoch of (val_loss up, train loss down) from one epoch to the next.
    longest, run, streak_start, longest_start = 0, 0, None, None
    for i in range(best + 1, len(val)):
        if val[i] > val[i - 1] and loss[i] < loss[i - 1]:
            run += 1
            streak_start = epoch[i] if run == 1 else streak_start
            if run > longest:
                longest, longest_start = run, streak_start
        else:
            run = 0
    reasons = []
    if longest >= patience:
        reasons.append(f"val_loss rose on {longest} consecutive epochs from epoch {int(longest_start)} "
                       f"while training loss fell")
    if rise > tolerance:
        reasons.append(f"final val_loss {final_val:.4f} is {rise:.1%} above its minimum {min_val:.4f} "
                       f"(epoch {int(epoch[best])})")
    diverges = bool(reasons)
    return {
        "available": True,
        "diverges": diverges,
        "from_epoch": int(epoch[best + 1]) if diverges else None,
        "best_epoch": int(epoch[best]),
        "n_epochs": int(len(epoch)),
        "min_val_loss": min_val,
        "final_val_loss": final_val,
        "final_rise_percent": 100.0 * rise,
        "train_loss_at_best": float(loss[best]),
        "final_train_loss": float(loss[-1]),
        "longest_rise": int(longest),
        "train_loss_column": train_column,
        "reasons": reasons,
        "rule": rule,
    }
