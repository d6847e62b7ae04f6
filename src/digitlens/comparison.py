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
    from scipy.stats import binomtest  # lazy: scipy.stats takes ~0.5 s to import

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


def compare_variants(y_true: Any, variants: dict, *, alpha: float = ALPHA) -> dict:
    """Which of several variants (LoRA ranks, say) is more accurate than the others on the same images.

    ``variants``: label -> list of prediction arrays (N,), one per seed, the seeds in the same order
    for every variant. Every pair of variants is compared with McNemar's exact test seed by seed
    (the same seed on the same images); a pair's p-value is the largest over the seeds (the
    difference must hold in every seed: an intersection-union test, valid at ``alpha``), and the
    pairs' p-values are Holm-corrected. ``best`` (highest mean accuracy) is named ``significant``
    only when it beats every other variant after the correction.

    Returns ``{"labels", "n_images", "n_seeds", "accuracy" (mean over seeds, in the order of labels), "best",
    "significant", "within_noise_of_best" (labels, best first), "all_within_noise", "pairs": [{"a", "b",
    "accuracy_difference" (mean over seeds, a - b), "per_seed": [{"b", "c", "mcnemar_p"}], "p", "p_holm",
    "significant"}], "alpha", "method"}``.
    """
    from scipy.stats import binomtest  # lazy: scipy.stats takes ~0.5 s to import

    labels = list(variants)
    if len(labels) < 2:
        raise DigitlensError(f"variants: need at least two to compare, got {len(labels)}")
    y = np.asarray(y_true, dtype=np.int64)
    right = {}
    for label in labels:
        preds = [np.asarray(p) for p in variants[label]]
        if not preds or any(p.shape != y.shape for p in preds):
            raise DigitlensError(f"variants[{label!r}]: expected one prediction array of shape {y.shape} per seed")
        right[label] = np.stack([p == y for p in preds])
    n_seeds = {len(r) for r in right.values()}
    if len(n_seeds) != 1:
        raise DigitlensError(f"variants: every variant needs the same seeds (got {sorted(n_seeds)} prediction arrays)")
    accuracy = {label: float(right[label].mean()) for label in labels}
    pairs = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            per_seed = []
            for ra, rb in zip(right[a], right[b]):
                n_b, n_c = int(np.sum(ra & ~rb)), int(np.sum(~ra & rb))
                p = 1.0 if n_b + n_c == 0 else min(1.0, float(binomtest(min(n_b, n_c), n_b + n_c, 0.5).pvalue))
                per_seed.append({"b": n_b, "c": n_c, "mcnemar_p": p})
            pairs.append({"a": a, "b": b, "accuracy_difference": accuracy[a] - accuracy[b], "per_seed": per_seed,
                          "p": max(s["mcnemar_p"] for s in per_seed)})
    for pair, p_holm in zip(pairs, holm([pair["p"] for pair in pairs])):
        pair["p_holm"] = float(p_holm)
        # significant only when the same side wins in every seed
        sides = {np.sign(s["b"] - s["c"]) for s in pair["per_seed"]}
        pair["significant"] = bool(p_holm < alpha and len(sides) == 1 and 0 not in sides)
    best = max(labels, key=lambda label: accuracy[label])

    def against_best(label):
        return next(p for p in pairs if {p["a"], p["b"]} == {best, label})

    within = [best] + [label for label in sorted(labels, key=lambda v: -accuracy[v])
                       if label != best and not against_best(label)["significant"]]
    return {"labels": labels, "n_images": int(y.size), "n_seeds": n_seeds.pop(),
            "accuracy": [accuracy[label] for label in labels], "best": best,
            "significant": len(within) == 1, "within_noise_of_best": within,
            "all_within_noise": not any(p["significant"] for p in pairs), "pairs": pairs, "alpha": alpha,
            "method": ("McNemar exact test per seed on the same test images; a pair's p is the largest over the seeds; "
                       "Holm-corrected across pairs")}


def _and_list(items: list) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def variants_sentence(result: dict, name: str = "r = ") -> str:
    """One sentence on :func:`compare_variants`: the best variant only where the test supports it,
    else which are within noise of each other (or of the best), with the corrected p-values."""
    alpha, best = result["alpha"], result["best"]
    how = (f"McNemar exact test on the same {result['n_images']:,} test images"
           + (f", in each of {result['n_seeds']} seeds (largest p)" if result["n_seeds"] > 1 else "")
           + ", Holm-corrected")

    def p_of(a, b):
        pair = next(p for p in result["pairs"] if {p["a"], p["b"]} == {a, b})
        return f"p {format_p(pair['p_holm'], alpha)}"

    others = [v for v in result["labels"] if v != best]
    if result["significant"]:
        return (f"{name}{best} is the most accurate: better than " + _and_list([f"{name}{v} ({p_of(best, v)})" for v in others])
                + f" ({how}).")
    if result["all_within_noise"]:
        low = min(result["pairs"], key=lambda p: p["p_holm"])
        return (f"{_and_list([f'{name}{v}' for v in result['labels']])} are within noise of each other "
                f"(smallest corrected p {format_p(low['p_holm'], alpha)}, {name}{low['a']} against {name}{low['b']}; {how}), "
                "so the data name no best one.")
    tied = result["within_noise_of_best"][1:]
    worse = [v for v in others if v not in tied]
    return (f"{name}{best} has the highest accuracy, but " + _and_list([f"{name}{v} ({p_of(best, v)})" for v in tied])
            + (" is" if len(tied) == 1 else " are") + " within noise of it; "
            + _and_list([f"{name}{v} ({p_of(best, v)})" for v in worse]) + (" is" if len(worse) == 1 else " are")
            + f" significantly less accurate ({how}).")
