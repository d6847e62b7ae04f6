"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

One scalar T > 0 divides the logits: ``softmax(logits / T)``. T > 1 softens an over-confident
model, T < 1 sharpens an under-confident one (e.g. trained with label smoothing). The predicted
digit never changes, only the confidence. T is fitted by minimising the negative log-likelihood
on a held-out split (the validation split, never the test split).

A floor module: numpy and scipy only, no digitlens stages.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from digitlens.errors import DigitlensError

#: Search range of the temperature; a fit that ends at either end is reported as ``at_bound``.
T_BOUNDS = (1e-2, 1e2)


def _check_logits(logits: Any, name: str = "logits") -> np.ndarray:
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise DigitlensError(f"{name}: expected logits of shape (N, n_classes >= 2), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DigitlensError(f"{name}: logits must be finite (no NaN or inf)")
    return arr


def _check_labels(labels: Any, n: int, n_classes: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DigitlensError(f"labels: expected shape ({n},), got {arr.shape}")
    if arr.size and (not np.all(np.equal(np.mod(arr, 1), 0)) or arr.min() < 0 or arr.max() >= n_classes):
        raise DigitlensError(f"labels: expected whole numbers in [0, {n_classes - 1}]")
    return arr.astype(np.int64)


def _check_temperature(temperature: Any) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise DigitlensError(f"temperature: expected a positive number, got {temperature!r}") from None
    if not (t > 0 and math.isfinite(t)):
        raise DigitlensError(f"temperature: expected a positive finite number, got {temperature!r}")
    return t


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64, same shape as ``logits``)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _nll_per_sample(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-log softmax(z)[y] per row of float64 ``z`` (N, C): shape (N,). Written as
    (max - z_y) + log1p(sum over the other classes of exp(z_j - max)) so that a confident, correct
    sample keeps its tiny positive loss instead of rounding to 0 (1 + 1e-20 == 1 in float64);
    otherwise the NLL goes flat as T -> 0 and the fit stops anywhere on the plateau."""
    rows = np.arange(len(y))
    top = z.argmax(axis=1)
    m = z[rows, top]
    e = np.exp(z - m[:, None])
    e[rows, top] = 0.0
    return (m - z[rows, y]) + np.log1p(e.sum(axis=1))


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` (N,) under ``softmax(logits / temperature)``,
    ``logits`` of shape (N, n_classes); computed from the logits, so it never takes log(0)."""
    z = _check_logits(logits)
    y = _check_labels(labels, z.shape[0], z.shape[1])
    if not len(y):
        raise DigitlensError("labels: no samples")
    t = _check_temperature(temperature)
    return float(_nll_per_sample(z / t, y).mean())


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / temperature)``: float64 array of shape (N, n_classes)."""
    z = _check_logits(logits)
    return np.exp(log_softmax(z / _check_temperature(temperature)))


def _mean_confidence(shifted: np.ndarray, temperature: float) -> float:
    return float(np.exp(log_softmax(shifted / temperature)).max(axis=1).mean())


def _no_mistakes_temperature(shifted: np.ndarray, n: int, bounds: tuple[float, float]) -> float:
    """The temperature (at most 1) at which the mean top probability of ``shifted`` (N, C) is
    (n + 1) / (n + 2), Laplace's rule-of-succession accuracy after n right out of n."""
    from scipy.optimize import brentq  # lazy: scipy.optimize takes ~0.5 s to import

    target = (n + 1) / (n + 2)
    lo, hi = bounds
    hi = min(hi, 1.0)
    if lo >= hi or _mean_confidence(shifted, hi) >= target:  # already that confident: leave it
        return float(hi) if lo < hi else float(lo)
    if _mean_confidence(shifted, lo) <= target:  # ties: cannot get that confident within bounds
        return float(lo)
    # the mean top probability falls as T grows, so there is one root in log T
    root = brentq(lambda log_t: _mean_confidence(shifted, math.exp(log_t)) - target, math.log(lo), math.log(hi),
                  xtol=1e-8)
    return float(math.exp(root))


def fit_temperature(logits: Any, labels: Any, *, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The temperature T in ``bounds`` minimising :func:`nll` of ``labels`` (N,) under
    ``softmax(logits / T)``, ``logits`` of shape (N, n_classes); a float.

    Written by hand because scikit-learn has no temperature scaling (``CalibratedClassifierCV``
    offers per-class sigmoid / isotonic fits, which change the argmax and need many more samples).
    The NLL is convex in 1/T, hence unimodal in log T, so a bounded Brent search on log T
    (``scipy.optimize.minimize_scalar``) finds the global minimum without gradients or a start
    value. The result is never worse than T = 1.

    When no sample is misclassified the NLL keeps falling as T -> 0 (no minimum: the "fit" would
    make every probability one-hot). Then T is the one that makes the mean top probability
    (N + 1) / (N + 2), the rule-of-succession estimate of the accuracy, and at most 1.
    """
    from scipy.optimize import minimize_scalar  # lazy: scipy.optimize takes ~0.5 s to import

    z = _check_logits(logits)
    y = _check_labels(labels, z.shape[0], z.shape[1])
    if not len(y):
        raise DigitlensError("labels: no samples to fit a temperature on")
    lo, hi = (float(b) for b in bounds)
    if not 0 < lo < hi or not math.isfinite(hi):
        raise DigitlensError(f"bounds: expected 0 < low < high, got {bounds}")
    shifted = z - z.max(axis=1, keepdims=True)  # same softmax, smaller numbers
    if np.all(z.argmax(axis=1) == y):
        return _no_mistakes_temperature(shifted, len(y), (lo, hi))

    def objective(log_t: float) -> float:
        return float(_nll_per_sample(shifted * math.exp(-log_t), y).mean())

    result = minimize_scalar(objective, bounds=(math.log(lo), math.log(hi)), method="bounded",
                             options={"xatol": 1e-6})
    # Never worse than leaving the model alone (T = 1) when 1 is in range.
    if lo <= 1.0 <= hi and objective(0.0) <= objective(result.x):
        return 1.0
    return float(math.exp(result.x))


def temperature_fit(logits: Any, labels: Any, *, split: str = "val", bounds: tuple[float, float] = T_BOUNDS) -> dict:
    """Fit T on ``logits`` (N, n_classes) and ``labels`` (N,); return a JSON-ready dict with
    ``temperature``, ``split``, ``n_images``, ``n_errors`` (argmax != label), ``method``
    (``"nll"``, or ``"rule_of_succession"`` when ``n_errors`` is 0, see :func:`fit_temperature`),
    ``nll_before`` (T = 1), ``nll_after`` and ``at_bound`` (True when T ended within 1% of either
    end of ``bounds``)."""
    t = fit_temperature(logits, labels, bounds=bounds)
    z = np.asarray(logits)
    n_errors = int(np.sum(z.argmax(axis=1) != np.asarray(labels)))
    lo, hi = bounds
    return {
        "temperature": t,
        "split": split,
        "n_images": int(np.asarray(labels).shape[0]),
        "n_errors": n_errors,
        "method": "nll" if n_errors else "rule_of_succession",
        "nll_before": nll(logits, labels, 1.0),
        "nll_after": nll(logits, labels, t),
        "at_bound": bool(t <= lo * 1.01 or t >= hi / 1.01),
    }
