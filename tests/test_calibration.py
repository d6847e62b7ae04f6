"""Temperature scaling: the fit recovers a known temperature, never raises the NLL, works on
logits whose float32 probabilities underflow; the calibrated metrics use the same bins; the
reliability diagram, the insight and the report reading show what the temperature did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from digitlens.calibration import apply_temperature, fit_temperature, nll, temperature_fit
from digitlens.errors import DigitlensError
from digitlens.metrics import NO_VAL_NOTE, calibration_bins, compute_metrics, temperature_metrics
from digitlens.insights import derive_insights
from digitlens.plots import ReliabilityDiagramDisplay
from digitlens.report.collect import RunData
from digitlens.report.readings import reading_reliability


def _sample_labels(logits, temperature, rng):
    """Labels drawn from softmax(logits / temperature), one per row: int array (N,)."""
    p = apply_temperature(logits, temperature)
    return (p.cumsum(axis=1) > rng.random((len(p), 1))).argmax(axis=1)


def _synthetic(n=20000, t0=0.5, seed=0, scale=2.5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 10)) * scale
    return logits, _sample_labels(logits, t0, rng)


@pytest.mark.parametrize("t0", [0.4, 1.0, 2.5])
def test_fit_recovers_a_known_temperature(t0):
    logits, labels = _synthetic(t0=t0, seed=int(t0 * 10))
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(t0, rel=0.04)
    # the optimum: a small step either way raises the NLL
    assert nll(logits, labels, t) <= min(nll(logits, labels, t * 1.01), nll(logits, labels, t / 1.01))


@pytest.mark.parametrize("seed", range(6))
def test_nll_after_is_never_above_before(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    logits = rng.normal(size=(n, 10)) * rng.uniform(0.1, 6)
    labels = _sample_labels(logits, rng.choice([0.3, 1.0, 3.0]), rng) if seed % 2 else rng.integers(0, 10, n)
    fit = temperature_fit(logits, labels)
    assert fit["nll_after"] <= fit["nll_before"] + 1e-12
    assert fit["nll_before"] == pytest.approx(nll(logits, labels, 1.0))
    assert fit["split"] == "val" and fit["n_images"] == n and fit["temperature"] > 0


def test_fit_works_on_logits_whose_float32_probabilities_underflow():
    # margins of ~120 make float32 softmax exactly 0 for the true class of the wrong samples,
    # so log(proba) is -inf; the fit on logits stays finite and softens (T > 1)
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 2000)
    predicted = np.where(rng.random(2000) < 0.9, labels, (labels + 1) % 10)
    logits = rng.normal(size=(2000, 10))
    logits[np.arange(2000), predicted] += 120.0
    proba32 = apply_temperature(logits, 1.0).astype(np.float32)
    assert np.any(proba32[np.arange(2000), labels] == 0.0)
    fit = temperature_fit(logits, labels)
    assert np.isfinite(fit["nll_after"]) and fit["nll_after"] < fit["nll_before"]
    assert fit["temperature"] > 10 and not fit["at_bound"]


def test_apply_temperature_keeps_the_argmax_and_sums_to_one():
    logits, _ = _synthetic(n=500)
    for t in (0.1, 0.7, 4.0):
        p = apply_temperature(logits, t)
        assert p.shape == logits.shape
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
        np.testing.assert_array_equal(p.argmax(axis=1), logits.argmax(axis=1))
    # T < 1 sharpens, T > 1 softens
    assert apply_temperature(logits, 0.5).max(1).mean() > apply_temperature(logits, 1).max(1).mean() \
        > apply_temperature(logits, 2).max(1).mean()


def test_no_mistakes_on_val_gives_the_rule_of_succession_confidence_not_one_hot():
    # every sample right: the NLL falls all the way to T -> 0 (one-hot probabilities); instead T
    # makes the mean top probability (n + 1) / (n + 2)
    rng = np.random.default_rng(7)
    labels = np.arange(60) % 10
    logits = rng.normal(size=(60, 10)) * 0.5
    logits[np.arange(60), labels] += 5.0
    assert np.all(logits.argmax(1) == labels)
    assert nll(logits, labels, 0.02) < nll(logits, labels, 0.1) < nll(logits, labels, 1.0)  # no minimum
    fit = temperature_fit(logits, labels)
    assert fit["method"] == "rule_of_succession" and fit["n_errors"] == 0 and not fit["at_bound"]
    assert apply_temperature(logits, fit["temperature"]).max(1).mean() == pytest.approx(61 / 62)
    assert fit["nll_after"] <= fit["nll_before"]
    # already more confident than that: left alone, never softened without a mistake to justify it
    assert fit_temperature(logits * 10, labels) == 1.0
    # one mistake is enough for the NLL to have a minimum again
    labels[0] = (labels[0] + 1) % 10
    assert temperature_fit(logits, labels)["method"] == "nll"


def test_bad_inputs_give_one_line_errors():
    logits, labels = _synthetic(n=50)
    for call, match in [
        (lambda: fit_temperature(logits[0], labels), "logits"),
        (lambda: fit_temperature(logits, labels[:-1]), "labels"),
        (lambda: fit_temperature(logits, labels + 10), "labels"),
        (lambda: fit_temperature(logits[:0], labels[:0]), "labels: no samples"),
        (lambda: fit_temperature(np.where(logits > 0, np.nan, logits), labels), "logits"),
        (lambda: fit_temperature(logits, labels, bounds=(0, 1)), "bounds"),
        (lambda: apply_temperature(logits, 0.0), "temperature"),
        (lambda: apply_temperature(logits, "hot"), "temperature"),
    ]:
        with pytest.raises(DigitlensError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


# --- evaluate's calibration keys --------------------------------------------------------------

def test_temperature_metrics_use_the_val_split_and_the_same_bins():
    val_logits, val_labels = _synthetic(n=8000, t0=0.5, seed=1)
    test_logits, test_labels = _synthetic(n=3000, t0=0.5, seed=2)
    keys, proba_calibrated = temperature_metrics(test_labels, test_logits, val_logits, val_labels)
    assert keys["temperature"] == pytest.approx(fit_temperature(val_logits, val_labels))
    assert keys["temperature"] != pytest.approx(fit_temperature(test_logits, test_labels), rel=1e-4)
    assert keys["temperature_fit"]["n_images"] == 8000 and keys["temperature_fit"]["split"] == "val"
    assert proba_calibrated.dtype == np.float32 and proba_calibrated.shape == (3000, 10)
    oracle = calibration_bins(test_labels, proba_calibrated)
    assert keys["ece_calibrated"] == oracle["ece"]
    assert keys["calibration_calibrated"] == oracle
    raw = compute_metrics(test_labels, test_logits.argmax(1), apply_temperature(test_logits, 1.0))
    assert keys["calibration_calibrated"]["bin_edges"] == raw["calibration"]["bin_edges"]
    assert keys["ece_calibrated"] < raw["ece"] / 3  # labels drawn at T = 0.5: raw is under-confident
    assert keys["nll_calibrated"] < keys["nll"]


def test_temperature_metrics_without_a_validation_split_leave_a_note():
    logits, labels = _synthetic(n=300)
    for val in [(None, None), (logits[:0], labels[:0])]:
        keys, proba_calibrated = temperature_metrics(labels, logits, *val)
        assert proba_calibrated is None
        assert keys["temperature"] is None and keys["calibration_note"] == NO_VAL_NOTE
        assert "ece_calibrated" not in keys
    # a broken user model (NaN logits) gets a note, not a crash
    keys, proba_calibrated = temperature_metrics(labels, np.full_like(logits, np.nan), logits, labels)
    assert proba_calibrated is None and keys["temperature"] is None
    assert keys["calibration_note"].startswith("temperature scaling skipped: logits")


# --- reliability diagram, insight, report reading -----------------------------------------

@pytest.mark.slow
def test_reliability_diagram_draws_raw_and_calibrated_series():
    logits, labels = _synthetic(n=3000, seed=4)
    t = fit_temperature(logits, labels)
    raw, calibrated = apply_temperature(logits, 1.0), apply_temperature(logits, t)
    display = ReliabilityDiagramDisplay.from_predictions(labels, raw, calibrated, t).plot()
    oracle_raw, oracle_cal = calibration_bins(labels, raw), calibration_bins(labels, calibrated)
    np.testing.assert_allclose([b.get_height() for b in display.bars_],
                               [a or 0.0 for a in oracle_raw["accuracy"]])
    np.testing.assert_allclose([b.get_height() for b in display.bars_calibrated_],
                               [a or 0.0 for a in oracle_cal["accuracy"]])
    np.testing.assert_array_equal([b.get_height() for b in display.count_bars_calibrated_], oracle_cal["count"])
    title = display.figure_.texts[0].get_text() if display.figure_.texts else display.figure_._suptitle.get_text()
    assert f"ECE = {oracle_raw['ece']:.4f}" in title and f"{oracle_cal['ece']:.4f}" in title
    assert f"T = {t:.3g}" in title
    assert len(display.ax_) == 4  # raw (accuracy, counts), then scaled (accuracy, counts)
    assert display.ax_[0].get_legend().get_title().get_text() == f"raw: ECE {oracle_raw['ece']:.4f}"
    assert display.ax_[2].get_legend().get_title().get_text() == f"scaled, T = {t:.3g}: ECE {oracle_cal['ece']:.4f}"
    # without a calibrated series: one column, as before
    single = ReliabilityDiagramDisplay.from_predictions(labels, raw).plot()
    assert single.bars_calibrated_ is None and len(single.ax_) == 2
    assert "temperature" not in single.figure_._suptitle.get_text()
    with pytest.raises(DigitlensError, match="proba_calibrated"):
        ReliabilityDiagramDisplay.from_predictions(labels, raw, calibrated[:10])


def _metrics_with_temperature():
    val_logits, val_labels = _synthetic(n=4000, t0=0.5, seed=5)
    logits, labels = _synthetic(n=2000, t0=0.5, seed=6)
    metrics = compute_metrics(labels, logits.argmax(1), apply_temperature(logits, 1.0))
    keys, _ = temperature_metrics(labels, logits, val_logits, val_labels)
    return {**metrics, **keys}


def test_insight_says_what_the_temperature_did():
    metrics = _metrics_with_temperature()
    found = derive_insights(metrics)
    sentence = next(s for s in found["summary"] if s.startswith("Calibration"))
    assert f"ECE {metrics['ece']:.4f} (under-confident" in sentence
    assert f"T = {metrics['temperature']:.3g}" in sentence and "validation split" in sentence
    assert f"to {metrics['ece_calibrated']:.4f}" in sentence and "proba_calibrated" in sentence
    assert found["calibration"]["temperature"] == metrics["temperature"]

    perfect_val = {**metrics, "temperature_fit": {**metrics["temperature_fit"], "n_errors": 0,
                                                  "method": "rule_of_succession", "n_images": 135}}
    sentence = next(s for s in derive_insights(perfect_val)["summary"] if s.startswith("Calibration"))
    assert "no mistakes" in sentence and "(n+1)/(n+2) = 99.27%" in sentence

    no_val = {**metrics, "temperature": None, "calibration_note": NO_VAL_NOTE}
    for key in ("temperature_fit", "ece_calibrated", "calibration_calibrated"):
        no_val.pop(key)
    sentence = next(s for s in derive_insights(no_val)["summary"] if s.startswith("Calibration"))
    assert NO_VAL_NOTE in sentence and "T =" not in sentence

    old = {k: v for k, v in no_val.items() if k not in ("temperature", "calibration_note")}
    sentence = next(s for s in derive_insights(old)["summary"] if s.startswith("Calibration"))
    assert sentence.startswith(f"Calibration: ECE {metrics['ece']:.4f} (under-confident")


def test_report_reading_mentions_the_calibrated_ece_and_t():
    metrics = _metrics_with_temperature()
    run = RunData(run_dir=Path("."), name="r", config={}, metrics=metrics)
    line = reading_reliability(run)[0]
    assert f"is {metrics['ece']:.4f}" in line
    assert f"T = {metrics['temperature']:.3g}" in line and f"brings it to {metrics['ece_calibrated']:.4f}" in line
    run.metrics = {"ece": 0.05, "temperature": None, "calibration_note": NO_VAL_NOTE}
    assert NO_VAL_NOTE in reading_reliability(run)[0]
    run.metrics = {"ece": 0.05}  # an old run
    assert reading_reliability(run) == ["Expected calibration error is 0.0500: on average, confidence and "
                                        "accuracy differ by 5.00 points."]
