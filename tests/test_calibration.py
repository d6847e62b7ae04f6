"""Temperature scaling: the fit recovers a known temperature, never raises the NLL, works on
logits whose float32 probabilities underflow; the calibrated metrics use the same bins; the
reliability diagram, the insight and the report reading show what the temperature did."""

from __future__ import annotations

import numpy as np
import pytest

from digitlens.calibration import apply_temperature, fit_temperature, nll, temperature_fit
from digitlens.errors import DigitlensError
from digitlens.evaluate import calibration_bins
from digitlens.plots import ReliabilityDiagramDisplay


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


# --- reliability diagram -----------------------------------------

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
    title = display.ax_[0].get_title()
    assert f"ECE = {oracle_raw['ece']:.4f}" in title and f"{oracle_cal['ece']:.4f}" in title
    assert f"T = {t:.3g}" in title
    legend = [text.get_text() for text in display.ax_[0].get_legend().get_texts()]
    assert any(f"ECE {oracle_raw['ece']:.4f}" in s for s in legend)
    assert any(f"ECE {oracle_cal['ece']:.4f}" in s and "scaled" in s for s in legend)
    # without a calibrated series: one bar series, as before
    single = ReliabilityDiagramDisplay.from_predictions(labels, raw).plot()
    assert single.bars_calibrated_ is None and "temperature" not in single.ax_[0].get_title()
    with pytest.raises(DigitlensError, match="proba_calibrated"):
        ReliabilityDiagramDisplay.from_predictions(labels, raw, calibrated[:10])
