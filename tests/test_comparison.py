"""Paired comparison of two models: oracles are scipy's binomial test on discordant pairs counted by
hand, plain Python loops over the same bootstrap indices, scikit-learn's F1 and a Holm example
worked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score

from digitlens import DigitlensError
from digitlens.comparison import (ALPHA, bootstrap_p, compare_predictions, holm, mcnemar_exact,
                                  paired_bootstrap_f1, resample_indices)


def test_mcnemar_equals_binomtest_on_hand_counted_pairs():
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    a = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 1])   # wrong on images 8, 9
    b = np.array([0, 1, 9, 9, 9, 9, 9, 7, 8, 0, 0, 1])   # wrong on images 2-6, 9
    # A right and B wrong: 2, 3, 4, 5, 6 -> b = 5; A wrong and B right: 8 -> c = 1; image 9 wrong for both
    r = mcnemar_exact(y, a, b)
    assert (r["b"], r["c"]) == (5, 1)
    assert r["mcnemar_p"] == pytest.approx(binomtest(1, 6, 0.5).pvalue)
    assert r["accuracy_difference"] == pytest.approx((10 - 6) / 12)
    lo, hi = r["accuracy_difference_ci"]
    assert lo <= r["accuracy_difference"] <= hi


def test_equal_predictions_give_p_one_and_no_difference():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 300)
    pred = np.where(rng.random(300) < 0.1, (y + 1) % 10, y)
    r = compare_predictions(y, pred, pred, "cnn", "vit")
    assert r["mcnemar_p"] == 1.0 and r["b"] == r["c"] == 0
    assert r["accuracy_difference"] == 0 and r["accuracy_difference_ci"] == [0.0, 0.0]
    assert r["macro_f1_difference"] == 0 and r["macro_f1_difference_p"] == 1.0
    assert all(d["f1_difference"] == 0 and d["p_holm"] == 1.0 for d in r["per_digit"])
    assert not r["significant"] and "not significant" in r["caption"]


def test_a_clear_difference_on_2000_images_is_significant():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 2000)
    a = np.where(rng.random(2000) < 0.01, (y + 1) % 10, y)      # ~1% errors
    b = np.where(rng.random(2000) < 0.06, (y + 2) % 10, y)      # ~6% errors
    r = compare_predictions(y, a, b, "cnn", "vit")
    assert r["mcnemar_p"] < 0.001 and r["significant"]
    assert r["macro_f1_difference"] > 0 and r["macro_f1_difference_ci"][0] > 0
    assert r["caption"].startswith(f"cnn is more accurate than vit by {r['accuracy_difference'] * 100:.2f} points")
    assert f"b = {r['b']}, c = {r['c']}" in r["caption"] and "McNemar exact p < 0.001" in r["caption"]
    # the sentence is symmetric: swapping the models names the same winner
    swapped = compare_predictions(y, b, a, "vit", "cnn")
    assert swapped["accuracy_difference"] == pytest.approx(-r["accuracy_difference"])
    assert swapped["caption"].startswith("cnn is more accurate than vit")
    # F1 point estimates equal scikit-learn's
    assert r["macro_f1_a"] == pytest.approx(f1_score(y, a, average="macro", labels=range(10)))
    per = f1_score(y, b, average=None, labels=range(10))
    assert [d["f1_b"] for d in r["per_digit"]] == pytest.approx(per)


def test_vectorised_bootstrap_equals_a_python_loop_on_the_same_indices():
    rng = np.random.default_rng(5)
    n, k, reps = 60, 4, 50
    y = rng.integers(0, k, n)
    a = np.where(rng.random(n) < 0.2, rng.integers(0, k, n), y)
    b = np.where(rng.random(n) < 0.4, rng.integers(0, k, n), y)
    idx = resample_indices(n, reps, seed=11)
    assert np.array_equal(idx, resample_indices(n, reps, seed=11))       # same seed, same draws
    r = paired_bootstrap_f1(y, a, b, n_classes=k, idx=idx)

    diffs = []                                                            # the plain loop
    for row in idx:
        fa = f1_score(y[row], a[row], average=None, labels=range(k), zero_division=0)
        fb = f1_score(y[row], b[row], average=None, labels=range(k), zero_division=0)
        diffs.append(fa - fb)
    diffs = np.array(diffs)
    macro = diffs.mean(axis=1)
    assert r["macro_f1_difference_ci"] == pytest.approx(list(np.percentile(macro, [2.5, 97.5])))
    le, ge = (macro <= 0).sum(), (macro >= 0).sum()
    assert r["macro_f1_difference_p"] == pytest.approx(min(1.0, 2 * (min(le, ge) + 1) / (reps + 1)))
    for d in range(k):
        assert r["per_digit"][d]["f1_difference_ci"] == pytest.approx(list(np.percentile(diffs[:, d], [2.5, 97.5])))
    raw = [r["per_digit"][d]["p"] for d in range(k)]
    assert raw == pytest.approx([bootstrap_p(diffs[:, d]) for d in range(k)])
    # mcnemar's interval draws the same indices for the same seed
    m = mcnemar_exact(y, a, b, n_resamples=reps, seed=11)
    acc = [(a[row] == y[row]).mean() - (b[row] == y[row]).mean() for row in idx]
    assert m["accuracy_difference_ci"] == pytest.approx(list(np.percentile(acc, [2.5, 97.5])))
    # the default path (seed, n_resamples) is the same as passing its indices
    assert paired_bootstrap_f1(y, a, b, n_classes=k, n_resamples=reps, seed=11) == r


def test_holm_matches_a_hand_computed_example():
    # m = 4, sorted p: 0.01, 0.02, 0.03, 0.04 -> x4, x3, x2, x1 = 0.04, 0.06, 0.06, 0.04 -> running max
    # 0.04, 0.06, 0.06, 0.06; given in a shuffled order.
    p = [0.03, 0.01, 0.04, 0.02]
    assert holm(p) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])
    assert holm([0.001, 0.9]) == pytest.approx([0.002, 0.9])
    assert holm([0.6, 0.7, 0.8]) == pytest.approx([1.0, 1.0, 1.0])      # capped at 1


def test_caption_when_not_significant_and_bad_input():
    y = np.arange(10).repeat(10)
    a = y.copy()
    b = y.copy()
    a[:2] = 9                       # A wrong on 2 images
    b[50:53] = 0                    # B wrong on 3 images
    r = compare_predictions(y, a, b, "cnn", "vit")
    assert r["mcnemar_p"] == pytest.approx(binomtest(2, 5, 0.5).pvalue) and r["mcnemar_p"] > ALPHA
    assert "cnn and vit differ by 1.00 points" in r["caption"] and "not significant (McNemar exact p = 1" in r["caption"]
    with pytest.raises(DigitlensError, match="lengths differ"):
        mcnemar_exact(y, a[:-1], b)
    with pytest.raises(DigitlensError, match="n_classes = 10"):
        paired_bootstrap_f1(y, a, b + 5)
    with pytest.raises(DigitlensError, match="1-D"):
        compare_predictions(y.reshape(10, 10), a, b)


@pytest.mark.slow
def test_report_writes_comparison_json_equal_to_the_module(tmp_path):
    import json

    from test_report import make_run, parse

    from digitlens.report import write_report
    from digitlens.runio import read_npz

    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(10), 45)                                   # 450 test images
    pa = np.where(rng.random(y.size) < 0.01, (y + 1) % 10, y)
    pb = np.where(rng.random(y.size) < 0.08, (y + 3) % 10, y)
    a = make_run(tmp_path, "cnn", val_accuracy=[0.9], val_loss=[0.3], y_true=y, y_pred=pa)
    b = make_run(tmp_path, "vit", val_accuracy=[0.8], val_loss=[0.4], y_true=y, y_pred=pb)
    out = write_report(a, compare=b)
    js = json.loads((out.parent / "comparison.json").read_text())
    na, nb = read_npz(a / "predictions.npz"), read_npz(b / "predictions.npz")
    assert np.array_equal(na["y_true"], nb["y_true"])
    m = mcnemar_exact(na["y_true"], na["y_pred"], nb["y_pred"])
    f = paired_bootstrap_f1(na["y_true"], na["y_pred"], nb["y_pred"])
    assert (js["b"], js["c"], js["n_images"]) == (m["b"], m["c"], y.size)
    assert (js["name_a"], js["name_b"]) == ("cnn", "vit")
    for key in ("mcnemar_p", "accuracy_difference", "accuracy_difference_ci"):
        assert js[key] == pytest.approx(m[key])
    for key in ("macro_f1_difference", "macro_f1_difference_ci", "macro_f1_difference_p"):
        assert js[key] == pytest.approx(f[key])
    assert len(js["per_digit"]) == 10
    for got, want in zip(js["per_digit"], f["per_digit"]):
        assert got == want                                               # JSON round-trips floats exactly
    assert js["mcnemar_p"] < ALPHA and js["caption"].startswith("cnn is more accurate than vit by")
    text = parse(out).text_all
    assert js["caption"] in text
    assert "Holm-corrected across digits" in text
    assert "is more accurate on the test split" not in text           # the untested sentence is gone


@pytest.mark.slow
def test_report_without_a_paired_test_says_why(tmp_path):
    from test_report import make_run, parse

    from digitlens.report import write_report

    y = np.repeat(np.arange(10), 20)
    pred = y.copy()
    pred[:5] = 1
    a = make_run(tmp_path, "cnn", val_accuracy=[0.9], val_loss=[0.3], y_true=y, y_pred=pred)
    b = make_run(tmp_path, "vit", val_accuracy=[0.8], val_loss=[0.4], y_true=y[::-1], y_pred=y[::-1])
    out = write_report(a, compare=b)
    assert not (out.parent / "comparison.json").exists()
    text = parse(out).text_all
    assert "untested: the two runs were evaluated on different test images" in text
    (b / "predictions.npz").unlink()
    text = parse(write_report(a, compare=b)).text_all
    assert "untested: vit has no predictions.npz" in text


def _wrong_on(y: np.ndarray, images) -> np.ndarray:
    """``y`` with the images at ``images`` misread (as the next digit)."""
    pred = y.copy()
    pred[list(images)] = (y[list(images)] + 1) % 10
    return pred


def _holm_by_loop(p):
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for step, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - step) * p[i]))
        out[i] = running
    return out


def test_compare_variants_names_a_best_only_where_mcnemar_supports_it():
    from digitlens.comparison import compare_variants, variants_sentence

    y = np.random.default_rng(0).integers(0, 10, 400)
    # r = 8 errs on 5 images in each seed; r = 4 on 7 (4 of them shared); r = 64 on 40
    variants = {4: [_wrong_on(y, range(0, 7)), _wrong_on(y, range(1, 8))],
                8: [_wrong_on(y, range(3, 8)), _wrong_on(y, range(3, 8))],
                64: [_wrong_on(y, range(100, 140)), _wrong_on(y, range(200, 240))]}
    r = compare_variants(y, variants)
    right = {k: [p == y for p in v] for k, v in variants.items()}
    raw = []
    for pair in r["pairs"]:
        expected = []
        for ra, rb in zip(right[pair["a"]], right[pair["b"]]):
            b, c = int(sum(ra & ~rb)), int(sum(~ra & rb))
            expected.append(binomtest(min(b, c), b + c, 0.5).pvalue)
            assert (b, c) in [(s["b"], s["c"]) for s in pair["per_seed"]]
        assert pair["p"] == pytest.approx(max(expected))
        raw.append(max(expected))
    assert [p["p_holm"] for p in r["pairs"]] == pytest.approx(_holm_by_loop(raw))
    assert r["best"] == 8 and r["accuracy"] == pytest.approx([np.mean([(p == y).mean() for p in variants[k]])
                                                              for k in (4, 8, 64)])
    assert not r["significant"] and r["within_noise_of_best"] == [8, 4] and not r["all_within_noise"]
    sentence = variants_sentence(r)
    assert sentence.startswith("r = 8 has the highest accuracy, but r = 4 (p = ") and "within noise of it" in sentence
    assert "r = 64 (p < 0.001) is significantly less accurate" in sentence
    assert "most accurate" not in sentence
    # without r = 4, r = 8 beats r = 64 in both seeds: named, with its p-value
    r = compare_variants(y, {8: variants[8], 64: variants[64]})
    assert r["significant"] and r["within_noise_of_best"] == [8]
    assert variants_sentence(r).startswith("r = 8 is the most accurate: better than r = 64 (p < 0.001)")
    # r = 4 against r = 8 alone: within noise, no best
    r = compare_variants(y, {4: variants[4], 8: variants[8]})
    assert r["all_within_noise"] and not r["significant"]
    assert variants_sentence(r).startswith("r = 4 and r = 8 are within noise of each other (smallest corrected p = ")


def test_compare_variants_wants_the_same_winner_in_every_seed():
    from digitlens.comparison import compare_variants

    y = np.random.default_rng(1).integers(0, 10, 400)
    # seed 0: A far better; seed 1: B far better -> each seed alone is significant, the pair is not
    r = compare_variants(y, {"A": [_wrong_on(y, range(2)), _wrong_on(y, range(60))],
                             "B": [_wrong_on(y, range(100, 160)), _wrong_on(y, range(100, 102))]})
    assert all(s["mcnemar_p"] < 1e-6 for s in r["pairs"][0]["per_seed"])
    assert not r["pairs"][0]["significant"] and not r["significant"]
    with pytest.raises(DigitlensError, match="same seeds"):
        compare_variants(y, {"A": [y, y], "B": [y]})
    with pytest.raises(DigitlensError, match="at least two"):
        compare_variants(y, {"A": [y]})
