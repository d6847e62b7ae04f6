"""Confidence intervals against independent oracles: Wilson vs scipy's binomtest, the vectorised
bootstrap vs a plain loop of scikit-learn calls over the same resample indices, and the
properties every interval must have (contains the estimate, narrows with more images, seeded)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import precision_recall_fscore_support

from digitlens.errors import DigitlensError
from digitlens.metrics import add_bootstrap_intervals, calibration_bins, compute_metrics
from digitlens.intervals import (
    bootstrap_indices,
    bootstrap_metrics,
    format_ci,
    overlapping,
    wilson_interval,
)


def _predictions(n, accuracy=0.9, n_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_classes, n)
    y_pred = np.where(rng.random(n) < accuracy, y_true, rng.integers(0, n_classes, n))
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y_pred] += 3
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, y_pred, proba


@pytest.mark.parametrize("k, n", [(0, 10), (1, 10), (5, 10), (10, 10), (9931, 10000), (3, 1000), (987, 1000)])
def test_wilson_interval_equals_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-12) and high == pytest.approx(expected.high, abs=1e-12)
    ci90 = binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
    assert wilson_interval(k, n, 0.9) == pytest.approx([ci90.low, ci90.high], abs=1e-12)


def test_wilson_interval_is_vectorised_and_rejects_bad_input():
    ci = wilson_interval(np.array([1, 5, 0]), np.array([10, 10, 0]))
    assert ci.shape == (3, 2)
    assert ci[2].tolist() == [0.0, 1.0]  # no trials: no information
    with pytest.raises(DigitlensError, match="0 <= k <= n"):
        wilson_interval(11, 10)
    with pytest.raises(DigitlensError, match="confidence"):
        wilson_interval(1, 10, confidence=95)


@pytest.mark.slow
def test_bootstrap_equals_a_plain_loop_over_the_same_resamples():
    y_true, y_pred, proba = _predictions(300, accuracy=0.8)
    calibrated = proba ** 0.5 / (proba ** 0.5).sum(axis=1, keepdims=True)
    found = bootstrap_metrics(y_true, y_pred, proba, proba_calibrated=calibrated, n_resamples=200, seed=7)
    indices = bootstrap_indices(len(y_true), 200, seed=7)
    per_resample = {"precision": [], "recall": [], "f1": [], "accuracy": [], "macro_f1": [], "ece": [],
                    "ece_calibrated": []}
    for rows in indices:  # the oracle: one scikit-learn / calibration_bins call per resample
        t, p = y_true[rows], y_pred[rows]
        precision, recall, f1, _ = precision_recall_fscore_support(t, p, labels=np.arange(10), zero_division=0)
        per_resample["precision"].append(precision)
        per_resample["recall"].append(recall)
        per_resample["f1"].append(f1)
        per_resample["accuracy"].append([np.mean((t == d) == (p == d)) for d in range(10)])
        per_resample["macro_f1"].append(f1.mean())
        per_resample["ece"].append(calibration_bins(t, proba[rows])["ece"])
        per_resample["ece_calibrated"].append(calibration_bins(t, calibrated[rows])["ece"])
    for key, values in per_resample.items():
        expected = np.moveaxis(np.quantile(np.asarray(values), [0.025, 0.975], axis=0), 0, -1)
        np.testing.assert_allclose(found[key], expected, rtol=1e-12, atol=1e-12, err_msg=key)
    assert found["bootstrap"] == {"n_resamples": 200, "seed": 7, "confidence": 0.95}


def test_bootstrap_is_seeded():
    y_true, y_pred, proba = _predictions(500)
    a = bootstrap_metrics(y_true, y_pred, proba, n_resamples=100, seed=3)
    b = bootstrap_metrics(y_true, y_pred, proba, n_resamples=100, seed=3)
    c = bootstrap_metrics(y_true, y_pred, proba, n_resamples=100, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in ("precision", "f1", "ece"))
    assert not np.array_equal(a["f1"], c["f1"])


def test_intervals_contain_the_estimate_and_shrink_with_more_images():
    widths = []
    for n in (500, 5000):
        y_true, y_pred, proba = _predictions(n, seed=1)
        metrics = add_bootstrap_intervals(compute_metrics(y_true, y_pred, proba), y_true, y_pred, proba,
                                          n_resamples=400, seed=0)
        low, high = metrics["accuracy_ci"]
        assert low <= metrics["accuracy"] <= high
        for row in metrics["per_digit"]:
            for key in ("precision", "recall", "f1", "accuracy"):
                assert row[f"{key}_ci"][0] <= row[key] <= row[f"{key}_ci"][1], (n, row["digit"], key)
        assert metrics["macro"]["f1_ci"][0] <= metrics["macro"]["f1"] <= metrics["macro"]["f1_ci"][1]
        assert metrics["ece_ci"][0] <= metrics["ece"] <= metrics["ece_ci"][1] + 1e-12
        widths.append((high - low, np.mean([r["f1_ci"][1] - r["f1_ci"][0] for r in metrics["per_digit"]])))
    assert widths[1][0] < widths[0][0] / 2 and widths[1][1] < widths[0][1] / 2  # about 1 / sqrt(10)
    assert metrics["bootstrap"] == {"n_resamples": 400, "seed": 0, "confidence": 0.95}


def test_most_confused_pairs_carry_wilson_intervals():
    y_true, y_pred, _ = _predictions(1000, accuracy=0.7)
    metrics = compute_metrics(y_true, y_pred)
    top = metrics["most_confused"][0]
    row = int(np.sum(y_true == top["true"]))
    ci = binomtest(top["count"], row).proportion_ci(method="wilson")
    assert top["share_of_true_ci"] == pytest.approx([ci.low, ci.high])
    assert top["count_ci"][0] <= top["count"] <= top["count_ci"][1]


def test_bad_bootstrap_arguments_give_one_line_errors():
    with pytest.raises(DigitlensError, match="at least 1 resample"):
        bootstrap_indices(10, 0)
    with pytest.raises(DigitlensError, match="no samples"):
        bootstrap_indices(0, 10)


def test_overlap_and_format():
    assert overlapping([(0.9, 0.95), (0.94, 0.97), (0.96, 0.99)]) == [0, 1]
    assert overlapping([(0.9, 0.95), (0.94, 0.97), (0.96, 0.99)], reference=1) == [0, 1, 2]
    assert format_ci(0.99312, (0.99128, 0.99454)) == "99.31% (99.13-99.45)"
    assert format_ci(0.9812, (0.975, 0.987), percent=False, digits=3) == "0.981 (0.975-0.987)"
    assert format_ci(0.5, None) == "50.00%"


def test_report_readings_quote_the_intervals_and_old_runs_still_read(tmp_path):
    from pathlib import Path

    from digitlens.report.collect import RunData
    from digitlens.report.readings import reading_confusion, reading_per_digit, reading_predictions, reading_reliability

    y_true, y_pred, proba = _predictions(2000, accuracy=0.95, seed=2)
    metrics = add_bootstrap_intervals(compute_metrics(y_true, y_pred, proba), y_true, y_pred, proba,
                                      n_resamples=200, seed=0)
    predictions = {"y_true": y_true, "y_pred": y_pred, "proba": proba}
    run = RunData(run_dir=Path(tmp_path), name="run", config={}, metrics=metrics, predictions=predictions)
    low, high = metrics["accuracy_ci"]
    quoted = f"(95% interval {low * 100:.2f}-{high * 100:.2f}%)"
    assert quoted in reading_confusion(run)[0]
    assert quoted in reading_predictions(run)[1]
    assert quoted in " ".join(reading_reliability(run))
    assert f"(95% interval {metrics['ece_ci'][0]:.4f}-{metrics['ece_ci'][1]:.4f})" in reading_reliability(run)[0]
    per_digit = reading_per_digit(run)[0]
    hard = min(metrics["per_digit"], key=lambda r: (r["f1"], r["digit"]))
    ci_of = {r["digit"]: r["f1_ci"] for r in metrics["per_digit"]}
    # the intervals overlap here: the lowest F1 is quoted, no "hardest digit" named
    assert f"Lowest F1: digit {hard['digit']} (F1 {hard['f1']:.3f} (95% interval {hard['f1_ci'][0]:.3f}-" in per_digit
    tied = [d for d in ci_of if ci_of[d][0] <= ci_of[hard["digit"]][1] and ci_of[d][1] >= ci_of[hard["digit"]][0]]
    assert len(tied) > 1 and "Hardest digit" not in per_digit
    assert ("does not single out the hardest digit" in per_digit) or ("ranks no digit hardest or easiest" in per_digit
                                                                      and len(tied) == 10)
    before = {k: v for k, v in compute_metrics(y_true, y_pred, proba).items() if k != "accuracy_ci"}
    old = RunData(run_dir=Path(tmp_path), name="old", config={}, metrics=before,
                  predictions=predictions)  # a metrics.json from before the intervals
    # the report reads metrics.json only: no interval is invented for an old one (none recomputed
    # from the predictions)
    assert f"{before['accuracy'] * 100:.2f}%;" in reading_confusion(old)[0]
    assert "interval" not in reading_confusion(old)[0] + reading_predictions(old)[1]
    assert "95% interval" not in " ".join(reading_per_digit(old)) and "interval" not in reading_reliability(old)[0]
    assert reading_per_digit(old)[0].startswith(f"Lowest F1: digit {hard['digit']} (F1 {hard['f1']:.3f}, precision")
    assert "no digit is called hardest or easiest" in reading_per_digit(old)[0]


@pytest.mark.slow
def test_figures_draw_the_intervals():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from digitlens.plots import PerDigitMetricsDisplay, ReliabilityDiagramDisplay
    from digitlens.plots.reliability_diagram import bin_accuracy_intervals

    y_true, y_pred, proba = _predictions(800, accuracy=0.9, seed=3)
    display = PerDigitMetricsDisplay.from_predictions(y_true, y_pred, bootstrap=200, seed=1).plot()
    expected = bootstrap_metrics(y_true, y_pred, n_resamples=200, seed=1)
    np.testing.assert_allclose(display.intervals["f1"], expected["f1"])
    axis = display.ax_[0]
    bars = [c for c in axis.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 4  # one per metric
    assert "95% intervals" in display.figure_._suptitle.get_text()
    # the value labels (10 per metric, in metric order) sit on the upper end of each error bar
    f1_labels = axis.texts[20:30]
    assert [t.get_text() for t in f1_labels] == [f"{v:.3f}" for v in display.values["f1"]]
    np.testing.assert_allclose([t.xy[1] for t in f1_labels], np.maximum(display.values["f1"], expected["f1"][:, 1]))
    plt.close(display.figure_)
    plain = PerDigitMetricsDisplay.from_predictions(y_true, y_pred).plot()
    assert not any(isinstance(c, ErrorbarContainer) for c in plain.ax_[0].containers)
    plt.close(plain.figure_)
    with pytest.raises(DigitlensError, match=r"f1_ci: expected shape \(10, 2\)"):
        PerDigitMetricsDisplay(digits=np.arange(10), precision=np.ones(10), recall=np.ones(10), f1=np.ones(10),
                               accuracy=np.ones(10), support=np.ones(10), f1_ci=np.ones((10, 3)))

    reliability = ReliabilityDiagramDisplay.from_predictions(y_true, proba).plot()
    assert any(isinstance(c, ErrorbarContainer) for c in reliability.ax_[0].containers)
    plt.close(reliability.figure_)
    ci = bin_accuracy_intervals([0.5, None, 1.0], [10, 0, 4])
    ci10 = binomtest(5, 10).proportion_ci(method="wilson")
    assert ci[0] == pytest.approx([ci10.low, ci10.high]) and np.isnan(ci[1]).all() and ci[2][1] == 1.0


def test_mean_interval_is_the_textbook_student_t_interval():
    from digitlens.intervals import mean_interval

    values = np.arange(1, 11, dtype=float)  # mean 5.5, sample sd sqrt(110/12); t(0.975, 9) = 2.2621571627...
    half = 2.2621571627982 * np.sqrt(110 / 12) / np.sqrt(10)
    assert mean_interval(values) == pytest.approx([5.5 - half, 5.5 + half], abs=1e-9)
    assert mean_interval([0.7]).tolist() == [0.7, 0.7] and mean_interval([0.9] * 5).tolist() == [0.9, 0.9]
    with pytest.raises(DigitlensError, match="no values"):
        mean_interval([])
    # calibration_bins quotes it for the mean confidence
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    bins = calibration_bins(np.array([0, 1, 1, 1]), proba, n_bins=5)
    assert bins["mean_confidence_ci"] == pytest.approx(mean_interval([0.9, 0.6, 0.8, 0.7]).tolist())


def test_a_hardest_digit_is_named_only_when_its_interval_stands_apart(tmp_path):
    from pathlib import Path

    from digitlens.report.collect import RunData
    from digitlens.report.readings import reading_per_digit

    y_true = np.repeat(np.arange(10), 300)
    y_pred = y_true.copy()
    y_pred[np.flatnonzero(y_true == 9)[:150]] = 4       # digit 9: half its images missed, F1 far below the rest
    y_pred[np.flatnonzero(y_true == 3)[:3]] = 5
    metrics = add_bootstrap_intervals(compute_metrics(y_true, y_pred), y_true, y_pred, n_resamples=300, seed=0)
    ci = {r["digit"]: r["f1_ci"] for r in metrics["per_digit"]}
    assert all(ci[9][1] < ci[d][0] for d in range(9))    # the oracle: 9's interval lies below every other
    run = RunData(run_dir=Path(tmp_path), name="run", config={}, metrics=metrics,
                  predictions={"y_true": y_true, "y_pred": y_pred})
    line = reading_per_digit(run)[0]
    assert line.startswith("Hardest digit: 9 (F1 ") and "overlaps no other digit's" in line
    assert "highest F1: digit" in line and "within noise of digits" in line  # eight digits are perfect


def test_mean_interval_stays_within_the_bounds_of_probabilities():
    from digitlens.intervals import mean_interval

    low, high = mean_interval([0.2, 0.99], bounds=(0.0, 1.0))  # two values: the t interval is far wider than [0, 1]
    assert (low, high) == (0.0, 1.0)
    assert mean_interval([0.2, 0.99])[0] < 0  # unclipped without bounds
