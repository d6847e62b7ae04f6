"""Accuracy and loss curves (train vs validation) with the best epoch marked.

The figure draws a *normalised history* (see :mod:`digitlens.history`, which reads digitlens'
``history.csv``, a Keras ``CSVLogger`` file, a saved Keras ``history.history`` JSON, a dict of
lists or a pandas DataFrame) and marks the best epoch and a diverging validation loss by the one
overfitting rule, :func:`digitlens.history.detect_overfitting`. The figure pairs ``train_eval_*`` with ``val_*`` (both measured at the end of each epoch in
eval mode); see :class:`TrainingCurvesDisplay`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from digitlens.history import CURVES, best_epoch_index, detect_overfitting, load_history, normalise_history
from digitlens.plots._common import axes_grid

#: What the in-epoch training columns (Keras' ``loss``/``accuracy``) are: not comparable with validation.
IN_EPOCH = "in-epoch mean, train mode"
#: The note drawn under a figure whose history has no ``train_eval_*`` columns (older runs, Keras).
NOT_LIKE_FOR_LIKE_NOTE = ("No end-of-epoch train measurement in this history (train_eval_loss/accuracy): the train curve is\n"
                          "the in-epoch running mean in train mode (label smoothing, augmentation), not like for like "
                          "with validation.")


def _measured(values) -> np.ndarray | None:
    """``values`` as an array, or None when absent or all NaN (a column an older run never filled)."""
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    return None if values.size == 0 or np.all(np.isnan(values)) else values


class TrainingCurvesDisplay:
    """Accuracy and loss per epoch, training vs validation, best epoch marked.

    The like-for-like pair is ``train_eval_*`` (training images measured at the end of each epoch
    in eval mode, without label smoothing or augmentation, as the validation split is) against
    ``val_*``; Keras' in-epoch ``loss``/``accuracy`` is then drawn only as a faint dotted line. A
    history without ``train_eval_*`` draws the in-epoch curve with a note that it is not like for
    like (:data:`NOT_LIKE_FOR_LIKE_NOTE`).

    Parameters
    ----------
    epoch : ndarray of shape (n_epochs,), 1-based.
    loss, val_loss, accuracy, val_accuracy : ndarray of shape (n_epochs,) or None.
    train_eval_loss, train_eval_accuracy : ndarray of shape (n_epochs,) or None, default=None.
    best_epoch : int or None, the epoch number (not index) to mark, default=None.
    diverges_from : int or None, first epoch of a diverging validation loss (shaded), default=None.
    """

    def __init__(self, *, epoch, loss=None, val_loss=None, accuracy=None, val_accuracy=None, train_eval_loss=None,
                 train_eval_accuracy=None, best_epoch=None, diverges_from=None):
        self.epoch = np.asarray(epoch)
        self.loss, self.val_loss = loss, val_loss
        self.accuracy, self.val_accuracy = accuracy, val_accuracy
        self.train_eval_loss, self.train_eval_accuracy = _measured(train_eval_loss), _measured(train_eval_accuracy)
        self.best_epoch = best_epoch
        self.diverges_from = diverges_from

    @classmethod
    def from_history(cls, history: Any) -> "TrainingCurvesDisplay":
        """Build from a history dict / DataFrame / Keras History, or a path to a history file.
        The best epoch and the start of a diverging validation loss follow
        :func:`digitlens.history.detect_overfitting`."""
        if isinstance(history, (str, os.PathLike)):
            history = load_history(history)
        else:
            history = normalise_history(history)
        best = best_epoch_index(history)
        overfitting = detect_overfitting(history)
        return cls(epoch=history["epoch"], **{k: history.get(k) for k in CURVES},
                   train_eval_loss=history.get("train_eval_loss"), train_eval_accuracy=history.get("train_eval_accuracy"),
                   best_epoch=int(history["epoch"][best]) if best is not None else None,
                   diverges_from=overfitting.get("from_epoch") if overfitting.get("diverges") else None)

    def plot(self, ax=None, *, title: str | None = None) -> "TrainingCurvesDisplay":
        """Draw accuracy (left) and loss (right). ``ax``: None or a pair of Axes.

        ``lines_`` maps ``train_eval_accuracy``/``train_eval_loss`` (when measured), ``accuracy``/``loss``
        (in-epoch) and ``val_accuracy``/``val_loss`` to their Line2D; ``note_`` is the not-like-for-like
        note (None when every drawn training curve is measured like validation)."""
        fig, axes = axes_grid(ax, 2, figsize=(11, 4.2))
        panels = (("accuracy", self.accuracy, self.train_eval_accuracy, self.val_accuracy),
                  ("loss", self.loss, self.train_eval_loss, self.val_loss))
        best_idx = None
        if self.best_epoch is not None:
            hits = np.flatnonzero(self.epoch == self.best_epoch)
            best_idx = int(hits[0]) if len(hits) else None
        self.lines_ = {}
        self.note_ = None
        for axis, (name, in_epoch, measured, val) in zip(axes, panels):
            if measured is not None:
                self.lines_[f"train_eval_{name}"], = axis.plot(self.epoch, measured, "o-", color="#1f77b4", ms=3.5,
                                                               label=f"train {name} (epoch end, eval mode)")
                if in_epoch is not None:
                    self.lines_[name], = axis.plot(self.epoch, in_epoch, ":", color="0.55", lw=1.2, alpha=0.7,
                                                   label=f"train {name}, {IN_EPOCH}: not like for like")
            elif in_epoch is not None:
                self.lines_[name], = axis.plot(self.epoch, in_epoch, "o-", color="#1f77b4", ms=3.5,
                                               label=f"train {name} ({IN_EPOCH})")
                if val is not None:
                    self.note_ = NOT_LIKE_FOR_LIKE_NOTE
            if val is not None:
                self.lines_[f"val_{name}"], = axis.plot(self.epoch, val, "s-", color="#ff7f0e", ms=3.5,
                                                       label=f"validation {name}")
            if in_epoch is None and measured is None and val is None:
                axis.text(0.5, 0.5, f"no {name} recorded", ha="center", va="center", transform=axis.transAxes)
            if best_idx is not None:
                axis.axvline(self.best_epoch, color="0.4", ls="--", lw=1, label=f"best epoch ({self.best_epoch})")
                if val is not None and not np.isnan(val[best_idx]):
                    value = val[best_idx]
                    text = f"{value:.2%}" if name == "accuracy" else f"{value:.4f}"
                    axis.plot([self.best_epoch], [value], marker="*", ms=14, color="#d62728", zorder=5)
                    axis.annotate(f"val {text}", (self.best_epoch, value), textcoords="offset points",
                                  xytext=(6, 8 if name == "accuracy" else -14), fontsize=9, color="#d62728")
            if self.diverges_from is not None and name == "loss":
                axis.axvspan(self.diverges_from - 0.5, self.epoch[-1] + 0.5, color="#d62728", alpha=0.08,
                             label=f"val loss diverging (from epoch {self.diverges_from})")
            axis.set_xlabel("epoch")
            axis.set_ylabel(name)
            axis.set_title(f"{name.capitalize()}: train vs validation"
                           + (" (both at epoch end)" if measured is not None and val is not None else ""))
            axis.grid(alpha=0.3)
            if len(self.epoch) <= 20:
                axis.set_xticks(self.epoch)
            axis.legend(loc="best", fontsize=8)
        if title:
            fig.suptitle(title)
        if self.note_:
            fig.text(0.5, 0.01, self.note_, ha="center", va="bottom", fontsize=8, color="0.3")
            fig.tight_layout(rect=(0, 0.07, 1, 1))
        else:
            fig.tight_layout()
        self.ax_, self.figure_ = axes, fig
        return self
