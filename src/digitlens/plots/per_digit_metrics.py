"""Per-digit precision / recall / F1 / accuracy bars, either all digits in one row or one row per
digit group (e.g. {1, 2, 4, 6, 9} above {0, 3, 5, 7, 8}) with every value written on its bar."""

from __future__ import annotations

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.metrics import add_bootstrap_intervals, compute_metrics, per_digit_arrays
from digitlens.plots._common import METRIC_COLOURS, METRIC_LABELS, METRIC_SHORT, axes_grid

METRICS = ("precision", "recall", "f1", "accuracy")


def _draw_metric_bars(axis, digits, values: dict, support, metrics, *, write_values: bool, vertical_values: bool,
                      intervals: dict | None = None):
    """Grouped bars: one cluster per digit, one bar per metric, with error bars for the metrics in
    ``intervals`` (name -> (n_digits, 2) low/high); returns the bar containers."""
    n_metrics = len(metrics)
    width = 0.8 / n_metrics
    x = np.arange(len(digits))
    containers = []
    for m, name in enumerate(metrics):
        heights = np.asarray(values[name])
        bars = axis.bar(x + (m - (n_metrics - 1) / 2) * width, heights, width * 0.95,
                        color=METRIC_COLOURS[name], label=METRIC_LABELS[name])
        containers.append(bars)
        centres = x + (m - (n_metrics - 1) / 2) * width
        ci = (intervals or {}).get(name)
        tops = heights
        if ci is not None:
            ci = np.asarray(ci, dtype=np.float64)
            yerr = np.clip(np.stack([heights - ci[:, 0], ci[:, 1] - heights]), 0, None)
            axis.errorbar(centres, heights, yerr=yerr, fmt="none", ecolor="black", elinewidth=0.9,
                          capsize=2.5, capthick=0.9, zorder=3)
            tops = np.maximum(heights, ci[:, 1])
        if write_values:
            if vertical_values:
                labels = [f"{v:.3f}" for v in heights]
                style = {"rotation": 90, "fontsize": 7}
            else:
                labels = [f"{METRIC_SHORT[name]}={v:.3f}" for v in heights]
                style = {"fontsize": 7.5}
            for cx, top, text in zip(centres, tops, labels):  # above the bar or its error bar
                axis.annotate(text, (cx, top), xytext=(0, 2), textcoords="offset points", ha="center",
                              va="bottom", **style)
    axis.set_xticks(x, [f"{d}\nn={s:,}" for d, s in zip(digits, support)])
    axis.set_xlabel("digit (n = test images of that digit)")
    axis.set_ylabel("score")
    axis.set_ylim(0, 1.24 if vertical_values else 1.14)
    axis.set_yticks(np.linspace(0, 1, 6))
    axis.grid(axis="y", alpha=0.3)
    return containers


class PerDigitMetricsDisplay:
    """Per-digit metric bars.

    Parameters
    ----------
    digits : ndarray of shape (n_classes,).
    precision, recall, f1, accuracy : ndarray of shape (n_classes,); ``accuracy`` is one-vs-rest.
    support : ndarray of shape (n_classes,), test images per digit.
    groups : sequence of sequences of digits, default=None: one row per group (seed 002 layout);
        None draws all digits in one row.
    group_names : sequence of str, default=None ("group 1", ...).
    metrics : which metrics to draw, default=None (all four, or precision and recall with groups).
    precision_ci, recall_ci, f1_ci, accuracy_ci : ndarray of shape (n_classes, 2) or None, default=None:
        95% intervals (low, high) drawn as error bars, e.g. from
        :func:`digitlens.intervals.bootstrap_metrics`.
    """

    def __init__(self, *, digits, precision, recall, f1, accuracy, support, groups=None, group_names=None, metrics=None,
                 precision_ci=None, recall_ci=None, f1_ci=None, accuracy_ci=None):
        self.digits = np.asarray(digits)
        self.values = {"precision": np.asarray(precision), "recall": np.asarray(recall),
                       "f1": np.asarray(f1), "accuracy": np.asarray(accuracy)}
        self.support = np.asarray(support)
        self.intervals = {}
        for name, ci in (("precision", precision_ci), ("recall", recall_ci), ("f1", f1_ci), ("accuracy", accuracy_ci)):
            if ci is None:
                continue
            ci = np.asarray(ci, dtype=np.float64)
            if ci.shape != (len(self.digits), 2):
                raise DigitlensError(f"{name}_ci: expected shape ({len(self.digits)}, 2), got {ci.shape}")
            self.intervals[name] = ci
        self.groups = [tuple(int(d) for d in g) for g in groups] if groups is not None else None
        if self.groups is not None:
            unknown = sorted({d for g in self.groups for d in g} - set(self.digits.tolist()))
            if unknown:
                raise DigitlensError(f"groups: digit(s) {unknown} not among the classes {self.digits.tolist()}")
        self.group_names = list(group_names) if group_names is not None else None
        default = ("precision", "recall") if self.groups is not None else METRICS
        self.metrics = tuple(metrics) if metrics is not None else default
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise DigitlensError(f"metrics: unknown metric {bad[0]!r} (choose from {', '.join(METRICS)})")

    @classmethod
    def from_metrics(cls, computed: dict, **kwargs) -> "PerDigitMetricsDisplay":
        """Build from a ``metrics.json`` dict (its ``per_digit`` list, with error bars where the rows
        carry ``*_ci``); ``kwargs`` as for ``__init__``."""
        arrays = per_digit_arrays(computed)
        cis = {f"{m}_ci": arrays[f"{m}_ci"] for m in METRICS if f"{m}_ci" in arrays}
        return cls(digits=arrays["digit"], precision=arrays["precision"], recall=arrays["recall"], f1=arrays["f1"],
                   accuracy=arrays["accuracy"], support=arrays["support"], **cis, **kwargs)

    @classmethod
    def from_predictions(cls, y_true, y_pred, *, labels=None, groups=None, group_names=None,
                         metrics=None, bootstrap: int = 0, seed: int = 0) -> "PerDigitMetricsDisplay":
        """Compute the per-digit metrics with scikit-learn (see :func:`digitlens.metrics.compute_metrics`);
        with ``bootstrap`` > 0 resamples (seeded by ``seed``) also their 95% intervals, drawn as error bars."""
        computed = compute_metrics(y_true, y_pred, n_classes=len(labels) if labels is not None else None)
        if bootstrap:
            add_bootstrap_intervals(computed, y_true, y_pred, n_resamples=bootstrap, seed=seed)
        return cls.from_metrics(computed, groups=groups, group_names=group_names, metrics=metrics)

    def plot(self, ax=None, *, title: str | None = None) -> "PerDigitMetricsDisplay":
        """Draw the bars. ``ax``: None, one Axes (no groups) or one Axes per group."""
        index = {int(d): i for i, d in enumerate(self.digits)}
        groups = self.groups or [tuple(int(d) for d in self.digits)]
        names = self.group_names or ([f"group {i + 1}" for i in range(len(groups))] if self.groups else [""])
        width = min(14.0, max(7.0, 0.34 * len(self.metrics) * max(len(g) for g in groups) + 2))
        height = 3.6 * len(groups) + 1.0
        fig, axes = axes_grid(ax, len(groups), ncols=1, figsize=(width, height))
        self.bars_ = []
        for axis, group, name in zip(axes, groups, names):
            rows = [index[d] for d in group]
            values = {m: self.values[m][rows] for m in self.metrics}
            intervals = {m: self.intervals[m][rows] for m in self.metrics if m in self.intervals}
            self.bars_.append(_draw_metric_bars(axis, group, values, self.support[rows], self.metrics,
                                                write_values=True, vertical_values=self.groups is None,
                                                intervals=intervals))
            if self.groups is not None:
                means = ", ".join(f"mean {METRIC_SHORT[m]} {values[m].mean():.3f}" for m in self.metrics)
                axis.set_title(f"{name}: digits {', '.join(map(str, group))}  ({means})", fontsize=11)
        if title is None:
            title = ("Precision and recall per digit, by digit group" if self.groups is not None
                     else "Per-digit precision, recall, F1 and one-vs-rest accuracy")
            if any(m in self.intervals for m in self.metrics):
                title += " (error bars: 95% intervals)"
        fig.suptitle(title, y=0.995)
        handles, labels = axes[0].get_legend_handles_labels()
        top = 1 - 0.5 / fig.get_figheight()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.3 / fig.get_figheight()),
                   ncols=len(self.metrics), fontsize=9, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, top))
        self.ax_, self.figure_ = axes, fig
        return self
