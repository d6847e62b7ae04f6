"""Insights from constructed metrics and histories: easiest/hardest digits, confused pairs,
overfitting onset (diverging and not), generalisation gap, and the written files."""

from __future__ import annotations

import numpy as np
import pytest

from digitlens import runio
from digitlens.metrics import add_bootstrap_intervals, compute_metrics
from digitlens.history import detect_overfitting, load_history
from digitlens.insights import derive_insights, generalisation_gap, rank_digits, write_insights


def _history(loss, val_loss, accuracy=None, val_accuracy=None):
    n = len(loss)
    history = {"epoch": np.arange(1, n + 1), "loss": np.array(loss, float), "val_loss": np.array(val_loss, float)}
    if accuracy is not None:
        history["accuracy"] = np.array(accuracy, float)
        history["val_accuracy"] = np.array(val_accuracy, float)
    return history


def test_rising_validation_loss_while_training_loss_falls_is_overfitting():
    found = detect_overfitting(_history(loss=[0.9, 0.5, 0.3, 0.2, 0.12, 0.08],
                                        val_loss=[0.6, 0.4, 0.30, 0.32, 0.35, 0.41]))
    assert found["diverges"] is True
    assert found["best_epoch"] == 3 and found["from_epoch"] == 4
    assert found["min_val_loss"] == pytest.approx(0.30)
    assert found["longest_rise"] == 3
    assert found["final_rise_percent"] == pytest.approx((0.41 - 0.30) / 0.30 * 100)
    assert any("3 consecutive epochs from epoch 4" in r for r in found["reasons"])


def test_steadily_falling_validation_loss_is_not_overfitting():
    found = detect_overfitting(_history(loss=[0.9, 0.5, 0.3, 0.2], val_loss=[0.6, 0.4, 0.3, 0.25]))
    assert found["diverges"] is False and found["from_epoch"] is None
    assert found["best_epoch"] == 4 and found["final_rise_percent"] == 0.0


def test_a_one_epoch_bump_within_tolerance_is_noise():
    # rises once (0.250 -> 0.255, +2%) and recovers only partly: below both thresholds
    found = detect_overfitting(_history(loss=[0.5, 0.3, 0.2, 0.15, 0.1], val_loss=[0.4, 0.3, 0.25, 0.255, 0.252]))
    assert found["diverges"] is False
    assert found["longest_rise"] == 1


def test_ending_well_above_the_minimum_counts_even_without_a_streak():
    # zig-zag: never two rises in a row, but ends 20% above the minimum
    found = detect_overfitting(_history(loss=[0.5, 0.3, 0.2, 0.15, 0.1, 0.05],
                                        val_loss=[0.4, 0.25, 0.28, 0.27, 0.31, 0.30]))
    assert found["diverges"] is True and found["from_epoch"] == 3
    assert found["longest_rise"] == 1
    assert found["final_rise_percent"] == pytest.approx(20.0)


def test_validation_loss_rising_while_training_loss_also_rises_is_not_the_streak_rule():
    found = detect_overfitting(_history(loss=[0.5, 0.3, 0.31, 0.32], val_loss=[0.4, 0.3, 0.302, 0.304]))
    assert found["longest_rise"] == 0 and found["diverges"] is False


def test_history_without_validation_is_reported_as_not_assessed():
    assert detect_overfitting({"epoch": np.arange(1, 4), "loss": np.ones(3)})["available"] is False


def test_generalisation_gap_compares_like_with_like():
    # Keras' loss (0.2, label-smoothed, during the epoch) must not enter the gap; train_eval_* do.
    history = _history([0.5, 0.2], [0.4, 0.3], accuracy=[0.9, 0.99], val_accuracy=[0.88, 0.97])
    history["train_eval_loss"] = np.array([0.35, 0.05])
    history["train_eval_accuracy"] = np.array([0.9, 0.995])
    gap = generalisation_gap(history, {"accuracy": 0.96})
    assert gap["compared"] == "end-of-epoch eval mode"
    assert gap["train_loss"] == pytest.approx(0.05) and gap["train_accuracy"] == pytest.approx(0.995)
    assert gap["loss_gap"] == pytest.approx(0.25)
    assert gap["accuracy_gap"] == pytest.approx(0.025)
    assert gap["train_minus_test_accuracy"] == pytest.approx(0.035)
    found = derive_insights(_metrics_with_known_hard_digit(), history)
    sentence = next(s for s in found["summary"] if s.startswith("Generalisation gap"))
    assert "eval mode" in sentence and "validation minus train loss +0.2500" in sentence
    assert "99.50%" in sentence and "+2.50 points" in sentence
    # with the image counts behind them, both accuracies carry scipy's Wilson interval
    from scipy.stats import binomtest

    found = derive_insights(_metrics_with_known_hard_digit(), history, n_val=100, n_train_eval=200)
    sentence = next(s for s in found["summary"] if s.startswith("Generalisation gap"))
    for k, n in ((199, 200), (97, 100)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert f"{k / n * 100:.2f}% ({ci.low * 100:.2f}-{ci.high * 100:.2f})" in sentence
    assert found["generalisation_gap"]["val_accuracy_ci"] == pytest.approx(
        list(binomtest(97, 100).proportion_ci(method="wilson")))


def test_old_style_history_gets_no_loss_gap_and_says_why():
    # A history without train_eval_* (older digitlens runs, Keras): the smoothed, in-epoch training loss
    # (0.45, floor far above 0) against the validation loss would give an artefact, -0.41.
    history = _history([0.9, 0.45], [0.1, 0.04], accuracy=[0.9, 0.97], val_accuracy=[0.97, 0.99])
    gap = generalisation_gap(history, {"accuracy": 0.985})
    assert gap["compared"] == "not comparable"
    assert gap["loss_gap"] is None and "during each epoch" in gap["loss_gap_reason"]
    assert gap["accuracy_gap"] == pytest.approx(-0.02) and "during training" in gap["train_accuracy_measured"]
    found = derive_insights(_metrics_with_known_hard_digit(), history)
    sentence = next(s for s in found["summary"] if s.startswith("Generalisation gap"))
    assert "losses not compared" in sentence and "measured during training" in sentence
    assert "-0.41" not in sentence and "minus train loss" not in sentence
    # The overfitting rule falls back on Keras' loss for its direction only.
    assert found["overfitting"]["train_loss_column"] == "loss"


def test_overfitting_uses_the_eval_mode_training_loss_when_present():
    # Keras' loss keeps falling but the eval-mode training loss rises with val_loss: no "while training loss
    # falls" streak; without train_eval_loss the same history shows one.
    loss, val = [0.9, 0.5, 0.3, 0.2, 0.12, 0.08], [0.6, 0.4, 0.30, 0.302, 0.304, 0.306]
    plain = detect_overfitting(_history(loss, val))
    assert plain["longest_rise"] == 3 and plain["train_loss_column"] == "loss"
    history = _history(loss, val)
    history["train_eval_loss"] = np.array([0.5, 0.3, 0.2, 0.21, 0.22, 0.23])
    found = detect_overfitting(history)
    assert found["train_loss_column"] == "train_eval_loss" and found["longest_rise"] == 0
    assert found["final_train_loss"] == pytest.approx(0.23)


def _metrics_with_known_hard_digit():
    # digit 8 is read as 3 in 4 of its 10 images and 5 as 3 in 2 of 10; everything else right
    y_true = np.repeat(np.arange(10), 10)
    y_pred = y_true.copy()
    y_pred[80:84] = 3
    y_pred[50:52] = 3
    proba = np.eye(10)[y_pred] * 0.9 + 0.01
    return compute_metrics(y_true, y_pred, proba)


def test_easiest_and_hardest_digits_come_from_the_metrics():
    digits = rank_digits(_metrics_with_known_hard_digit(), k=3)
    hardest = [r["digit"] for r in digits["hardest"]]
    assert hardest[0] == 8 and hardest[1] == 3 and hardest[2] == 5
    assert digits["hardest"][0]["recall"] == pytest.approx(0.6)
    assert {r["digit"] for r in digits["easiest"]} <= {0, 1, 2, 4, 6, 7, 9}
    assert all(r["f1"] == 1.0 for r in digits["easiest"])


def test_summary_sentences_carry_the_numbers(tmp_path):
    metrics = _metrics_with_known_hard_digit()
    history = _history([0.9, 0.5, 0.3, 0.2, 0.1], [0.6, 0.4, 0.3, 0.33, 0.36],
                       accuracy=[0.7, 0.8, 0.9, 0.95, 0.99], val_accuracy=[0.7, 0.8, 0.88, 0.87, 0.86])
    found = write_insights(tmp_path, metrics, history)
    text = " ".join(found["summary"])
    assert "8 read as 3 (4x, 40.0% (16.8-68.7) of the 8s)" in text  # Wilson interval of 4 / 10
    assert "5 read as 3 (2x, 20.0% (5.7-51.0) of the 5s)" in text
    assert "diverges from epoch 4" in text and "epoch 3" in text
    assert "Hardest digits: 8 (F1 " in text
    assert "Test accuracy 94.00% (87.52-97.22)" in text  # with its Wilson interval
    assert found["overfitting"]["from_epoch"] == 4
    saved = runio.read_json(tmp_path / "insights.json")
    assert saved["summary"] == found["summary"]
    markdown = (tmp_path / "insights.md").read_text()
    assert "| 8 | 3 | 4 | 40.00% (16.82-68.73) |" in markdown and "Diverges: **yes**, from epoch 4" in markdown


def test_insights_without_history_say_so():
    found = derive_insights(_metrics_with_known_hard_digit(), None)
    assert found["overfitting"]["available"] is False
    assert any("Overfitting not assessed" in s for s in found["summary"])


def test_history_of_a_run_without_validation_split_is_not_assessed_not_a_crash():
    # digitlens.train with val_fraction=0 writes NaN val_loss / val_accuracy
    nan = float("nan")
    history = _history([0.9, 0.5, 0.3], [nan, nan, nan], accuracy=[0.7, 0.8, 0.9], val_accuracy=[nan, nan, nan])
    found = derive_insights(_metrics_with_known_hard_digit(), history)
    assert found["overfitting"]["available"] is False
    assert "no validation loss" in found["overfitting"]["reason"]
    assert found["generalisation_gap"]["accuracy_gap"] is None
    assert not any("nan" in s for s in found["summary"])


def test_digits_and_pairs_within_noise_are_said_to_be(tmp_path):
    metrics = _metrics_with_known_hard_digit()  # 10 images per digit: nothing can be singled out
    y_true = np.repeat(np.arange(10), 10)
    y_pred = y_true.copy()
    y_pred[80:84] = 3
    y_pred[50:52] = 3
    add_bootstrap_intervals(metrics, y_true, y_pred, n_resamples=300, seed=0)
    found = write_insights(tmp_path, metrics)
    hardest = found["digits"]["hardest_within_noise"]
    assert hardest[:2] == [8, 3] and len(hardest) > 2  # 8's F1 interval overlaps 3's and more
    text = " ".join(found["summary"])
    assert f"digits {hardest[0]}, {hardest[1]}" in text and "are within noise of each other (F1 intervals overlap)" in text
    assert "Hardest digits: 8 (F1 0.750 (" in text
    assert "8→3 and 5→3 are within noise of each other (count intervals overlap)" in text
    assert found["confused_pairs_within_noise"] == [0, 1]
    saved = runio.read_json(tmp_path / "insights.json")
    assert saved["digits"]["hardest"][0]["f1_ci"] == metrics["per_digit"][8]["f1_ci"]
    assert saved["accuracy_ci"] == metrics["accuracy_ci"]
    markdown = (tmp_path / "insights.md").read_text()
    assert "| hardest | 8 | 0.7500 (" in markdown


def test_a_digit_far_from_the_others_stands_out():
    # 1,000 images per digit; 9 is read as 4 in 300 of its images, every other digit is right
    y_true = np.repeat(np.arange(10), 1000)
    y_pred = y_true.copy()
    y_pred[9000:9300] = 4
    metrics = add_bootstrap_intervals(compute_metrics(y_true, y_pred), y_true, y_pred, n_resamples=300, seed=0)
    found = derive_insights(metrics)
    assert found["digits"]["hardest_within_noise"] == [9]
    text = " ".join(found["summary"])
    assert "digit 9 is the hardest beyond noise" in text
    assert "9→4 is the most frequent" not in text  # a single confused pair: no ranking to qualify


def test_metrics_of_older_runs_without_intervals_make_no_noise_claims():
    metrics = _metrics_with_known_hard_digit()
    del metrics["accuracy_ci"]  # as a metrics.json written before the intervals
    for pair in metrics["most_confused"]:
        del pair["count_ci"], pair["share_of_true_ci"]
    found = derive_insights(metrics)
    assert found["digits"]["hardest_within_noise"] is None and found["confused_pairs_within_noise"] is None
    assert not any("noise" in s for s in found["summary"])
    assert "Test accuracy 94.00%: 6 errors" in found["summary"][0]
    assert "8 read as 3 (4x, 40.0% of the 8s)" in " ".join(found["summary"])


def test_when_every_digit_overlaps_the_insight_says_the_test_set_does_not_rank_them():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 10, 5000)
    y_pred = np.where(rng.random(5000) < 0.99, y_true, rng.integers(0, 10, 5000))  # errors spread evenly
    metrics = add_bootstrap_intervals(compute_metrics(y_true, y_pred), y_true, y_pred, n_resamples=300, seed=0)
    found = derive_insights(metrics)
    assert len(found["digits"]["easiest_within_noise"]) == 10
    assert any("all 10 digits are within noise of digit" in s and "does not rank them" in s for s in found["summary"])


def test_an_old_history_csv_without_train_eval_columns_still_reads(tmp_path):

    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,accuracy,val_loss,val_accuracy,lr,seconds\n"
                    "1,0.61,0.91,0.12,0.965,0.01,10.0\n2,0.52,0.975,0.08,0.98,0.02,10.0\n")
    history = load_history(path)
    assert "train_eval_loss" not in history
    found = derive_insights(_metrics_with_known_hard_digit(), history)
    assert found["generalisation_gap"]["compared"] == "not comparable"
    assert found["generalisation_gap"]["loss_gap"] is None
    assert found["overfitting"]["available"] is True


def test_best_validation_accuracy_is_the_highest_epoch_with_its_wilson_interval(tmp_path):
    from scipy.stats import binomtest

    val_accuracy = [0.70, 0.88, 0.91, 0.91, 0.86]      # a tie: the first of the two epochs is the best
    history = _history([0.9, 0.5, 0.3, 0.2, 0.1], [0.6, 0.4, 0.3, 0.33, 0.36],
                       accuracy=[0.7, 0.8, 0.9, 0.95, 0.99], val_accuracy=val_accuracy)
    found = write_insights(tmp_path, _metrics_with_known_hard_digit(), history, n_val=200)["best_validation"]
    best = int(np.argmax(val_accuracy))                  # numpy's argmax: first of ties
    assert (found["best_val_accuracy"], found["best_val_accuracy_epoch"]) == (val_accuracy[best], best + 1) == (0.91, 3)
    for key, value in (("best_val_accuracy_ci", val_accuracy[best]), ("final_val_accuracy_ci", val_accuracy[-1])):
        ci = binomtest(round(value * 200), 200).proportion_ci(confidence_level=0.95, method="wilson")
        assert found[key] == pytest.approx([ci.low, ci.high])
    assert found["n_val"] == 200 and found["n_epochs"] == 5 and found["train_accuracy_at_best"] == 0.9
    assert runio.read_json(tmp_path / "insights.json")["best_validation"] == found
    # without the count of validation images: the value, no invented interval
    assert derive_insights(_metrics_with_known_hard_digit(), history)["best_validation"]["best_val_accuracy_ci"] is None
    # no validation split (NaN columns) or no history: not available, with the reason
    nan = float("nan")
    no_val = _history([0.9, 0.5], [nan, nan], accuracy=[0.7, 0.8], val_accuracy=[nan, nan])
    assert derive_insights(_metrics_with_known_hard_digit(), no_val)["best_validation"] == {
        "available": False, "reason": "the history has no validation accuracy"}
    assert derive_insights(_metrics_with_known_hard_digit(), None)["best_validation"]["available"] is False


def test_best_validation_quotes_the_training_images_measured_like_validation(tmp_path):
    from scipy.stats import binomtest

    from digitlens.history import best_validation

    history = _history([0.9, 0.5, 0.3], [0.6, 0.4, 0.45], accuracy=[0.7, 0.8, 0.9], val_accuracy=[0.8, 0.9, 0.85])
    history["train_eval_accuracy"] = np.array([0.75, 0.95, 0.97])
    found = best_validation(history, n_val=100, n_train_eval=400)
    ci = binomtest(380, 400).proportion_ci(confidence_level=0.95, method="wilson")
    assert found["train_eval_accuracy_at_best"] == 0.95 and found["n_train_eval"] == 400
    assert found["train_eval_accuracy_at_best_ci"] == pytest.approx([ci.low, ci.high])
    assert "train_accuracy_at_best" not in found  # Keras' running mean only when nothing better was measured
