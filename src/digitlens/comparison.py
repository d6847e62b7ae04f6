"""Paired tests for two models' predictions on the same test images.

Both models classify the *same* images, so their errors are correlated: a test that treats the
two accuracies as independent samples is wrong (usually too conservative). Everything here is
paired:

* :func:`mcnemar_exact` — McNemar's exact test on the discordant images (b: A right and B wrong,
  c: A wrong and B right); two-sided p = ``binomtest(min(b, c), b + c, 0.5)``. The 95% interval
  of the accuracy difference is a **paired percentile bootstrap** (each resample draws image
  indices once and scores both models on them).
* :func:`paired_bootstrap_f1` — macro-F1 and per-digit F1 differences with paired percentile
  intervals and two-sided bootstrap p-values, the per-digit ones Holm-corrected across digits.
* :func:`compare_predictions` — both, plus a one-sentence caption for reports.

A floor module: numpy and scipy only, no digitlens stages. Same seed -> same result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.intervals import bootstrap_indices, confusion_matrices, scores_from_confusion
from digitlens.intervals import percentile_interval as _percentile_interval

#: Significance level of every test here (McNemar, bootstrap, Holm-corrected per digit).
ALPHA = 0.05
#: Coverage of the bootstrap intervals.
CONFIDENCE = 0.95


def _check(y_true: Any, pred_a: Any, pred_b: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = []
    for name, arr in (("y_true", y_true), ("pred_a", pred_a), ("pred_b", pred_b)):
        arr = np.asarray(arr)
        if arr.ndim != 1 or arr.size == 0:
            raise DigitlensError(f"{name}: expected a non-empty 1-D array of labels, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise DigitlensError(f"{name}: labels must be integers")
            arr = arr.astype(np.int64)
        if arr.min() < 0:
            raise DigitlensError(f"{name}: labels must be >= 0")
        arrays.append(arr.astype(np.int64))
    if not arrays[0].size == arrays[1].size == arrays[2].size:
        raise DigitlensError(f"y_true, pred_a, pred_b: lengths differ ({arrays[0].size}, {arrays[1].size}, "
                             f"{arrays[2].size}); the two models must be scored on the same images")
    return arrays[0], arrays[1], arrays[2]


def resample_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Bootstrap image indices, shape (n_resamples, n): :func:`digitlens.intervals.bootstrap_indices`.

    The same rows index both models' predictions: that is what makes the bootstrap paired.
    """
    return bootstrap_indices(n, n_resamples, seed)


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> list:
    """``[low, high]`` percentile interval of bootstrap ``samples`` as lists ((R,) -> 2 floats,
    (R, K) -> K pairs): :func:`digitlens.intervals.percentile_interval`."""
    return _percentile_interval(samples, confidence).tolist()


def bootstrap_p(samples: np.ndarray) -> np.ndarray | float:
    """Two-sided bootstrap p-value of "difference = 0" from bootstrap differences, shape (R,) or (R, K).

    p = 2 min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (R + 1), capped at 1 (the +1 keeps p > 0 with a
    finite number of resamples; p < ALPHA exactly when 0 is far enough outside the percentile interval).
    """
    samples = np.asarray(samples)
    r = samples.shape[0]
    le = (samples <= 0).sum(axis=0)
    ge = (samples >= 0).sum(axis=0)
    p = np.minimum(1.0, 2 * (np.minimum(le, ge) + 1) / (r + 1))
    return float(p) if np.ndim(p) == 0 else p


def holm(pvalues: Any) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order and shape as ``pvalues``).

    Sort ascending p_(1) <= ... <= p_(m); adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    Rejecting where adjusted p < alpha controls the family-wise error rate at alpha.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise DigitlensError(f"pvalues: expected a 1-D array, got shape {p.shape}")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.maximum.accumulate(scaled)
    return out


def mcnemar_exact(y_true: Any, pred_a: Any, pred_b: Any, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """McNemar's exact test of A against B on the same images.

    Returns ``{"b", "c", "n", "mcnemar_p", "accuracy_a", "accuracy_b", "accuracy_difference" (A - B),
    "accuracy_difference_ci" ([low, high], paired percentile bootstrap, CONFIDENCE)}``.
    """
    from scipy.stats import binomtest

    y, a, b_ = _check(y_true, pred_a, pred_b)
    right_a, right_b = a == y, b_ == y
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    p = 1.0 if b + c == 0 else float(binomtest(min(b, c), b + c, 0.5).pvalue)
    diff_per_image = right_a.astype(np.int8) - right_b.astype(np.int8)
    idx = resample_indices(y.size, n_resamples, seed)
    boot = diff_per_image[idx].mean(axis=1)
    return {"b": b, "c": c, "n": int(y.size), "mcnemar_p": min(p, 1.0),
            "accuracy_a": float(right_a.mean()), "accuracy_b": float(right_b.mean()),
            "accuracy_difference": float(diff_per_image.mean()), "accuracy_difference_ci": percentile_interval(boot)}


def f1_of_resamples(y_true: np.ndarray, pred: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-digit F1 of ``pred`` on each resample ``idx[r]``: (R, n_classes), 0 where undefined
    (scikit-learn's ``zero_division=0``), from :mod:`digitlens.intervals`' confusion matrices."""
    return scores_from_confusion(confusion_matrices(y_true, pred, idx, n_classes))["f1"]


def paired_bootstrap_f1(y_true: Any, pred_a: Any, pred_b: Any, n_classes: int = 10, n_resamples: int = 1000,
                        seed: int = 0, *, idx: np.ndarray | None = None) -> dict:
    """Macro-F1 and per-digit F1 differences (A - B) with paired bootstrap intervals and p-values.

    Returns ``{"macro_f1_a", "macro_f1_b", "macro_f1_difference", "macro_f1_difference_ci" ([low, high]),
    "macro_f1_difference_p", "per_digit": [{"digit", "f1_a", "f1_b", "f1_difference", "f1_difference_ci",
    "p", "p_holm", "significant"} x n_classes], "n_resamples"}``. ``idx`` (R, N) overrides the resamples.
    """
    y, a, b = _check(y_true, pred_a, pred_b)
    top = int(max(y.max(), a.max(), b.max()))
    if top >= n_classes:
        raise DigitlensError(f"labels: found label {top}, but n_classes = {n_classes}")
    if idx is None:
        idx = resample_indices(y.size, n_resamples, seed)
    full = np.arange(y.size)[None, :]
    f1_a = f1_of_resamples(y, a, full, n_classes)[0]
    f1_b = f1_of_resamples(y, b, full, n_classes)[0]
    boot = f1_of_resamples(y, a, idx, n_classes) - f1_of_resamples(y, b, idx, n_classes)
    macro_boot = boot.mean(axis=1)
    p_digit = bootstrap_p(boot)
    p_holm = holm(p_digit)
    ci = percentile_interval(boot)
    per_digit = [{"digit": d, "f1_a": float(f1_a[d]), "f1_b": float(f1_b[d]), "f1_difference": float(f1_a[d] - f1_b[d]),
                  "f1_difference_ci": ci[d], "p": float(p_digit[d]), "p_holm": float(p_holm[d]),
                  "significant": bool(p_holm[d] < ALPHA)} for d in range(n_classes)]
    return {"macro_f1_a": float(f1_a.mean()), "macro_f1_b": float(f1_b.mean()),
            "macro_f1_difference": float(f1_a.mean() - f1_b.mean()),
            "macro_f1_difference_ci": percentile_interval(macro_boot),
            "macro_f1_difference_p": bootstrap_p(macro_boot), "per_digit": per_digit, "n_resamples": int(idx.shape[0])}


def format_p(p: float, alpha: float = ALPHA) -> str:
    """``p`` for a sentence: '< 0.001', else two significant digits (three where two would round across alpha)."""
    if p < 0.001:
        return "< 0.001"
    text = f"{p:.2g}"
    if (float(text) < alpha) != (p < alpha):
        text = f"{p:.3g}"
    return f"= {text}"


def caption(result: dict, alpha: float = ALPHA) -> str:
    """One sentence on accuracy: which model is more accurate, by how much, and McNemar's verdict."""
    name_a, name_b = result["name_a"], result["name_b"]
    d = result["accuracy_difference"] * 100
    lo, hi = (v * 100 for v in result["accuracy_difference_ci"])
    b, c, p = result["b"], result["c"], result["mcnemar_p"]
    counts = f"b = {b}, c = {c} discordant images of {result['n_images']:,}"
    if p < alpha and d != 0:
        better, worse = (name_a, name_b) if d > 0 else (name_b, name_a)
        lo, hi = (lo, hi) if d > 0 else (-hi, -lo)
        return (f"{better} is more accurate than {worse} by {abs(d):.2f} points (95% CI {lo:.2f} to {hi:.2f}), "
                f"McNemar exact p {format_p(p, alpha)} ({counts}).")
    return (f"{name_a} and {name_b} differ by {abs(d):.2f} points of accuracy (95% CI of {name_a} − {name_b}: "
            f"{lo:.2f} to {hi:.2f}): not significant (McNemar exact p {format_p(p, alpha)}, {counts}).")


def compare_predictions(y_true: Any, pred_a: Any, pred_b: Any, name_a: str = "A", name_b: str = "B", *,
                        n_classes: int = 10, n_resamples: int = 1000, seed: int = 0, alpha: float = ALPHA) -> dict:
    """Both paired analyses of A against B on the same images, with a ``caption``.

    Returns the keys of :func:`mcnemar_exact` and :func:`paired_bootstrap_f1` (differences are A - B;
    both use the same resample indices) plus ``name_a``, ``name_b``, ``n_images``, ``alpha``,
    ``confidence``, ``seed``, ``significant`` (McNemar p < alpha), ``method`` and ``caption``.
    """
    y, a, b = _check(y_true, pred_a, pred_b)
    out: dict[str, Any] = {"name_a": name_a, "name_b": name_b, "n_images": int(y.size)}
    out.update(mcnemar_exact(y, a, b, n_resamples=n_resamples, seed=seed))
    out.update(paired_bootstrap_f1(y, a, b, n_classes, n_resamples, seed))
    out.update({"alpha": alpha, "confidence": CONFIDENCE, "seed": seed, "significant": out["mcnemar_p"] < alpha,
                "method": ("McNemar exact test on the discordant images; paired percentile bootstrap "
                           f"({n_resamples} resamples, the same images for both models) for the intervals and "
                           "F1 p-values; per-digit p-values Holm-corrected across digits")})
    out["caption"] = caption(out, alpha)
    return out
