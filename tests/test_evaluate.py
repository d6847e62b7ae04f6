"""Evaluation: metrics against scikit-learn, ECE against hand-computed and sklearn-derived oracles,
and the full evaluate stage on a tiny trained run (files, predictions, CLI, bring-your-own model)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from typer.testing import CliRunner

from digitlens import data, models, runio
from digitlens.errors import DigitlensError
from digitlens.calibration import fit_temperature
from digitlens.evaluate import FIGURES, evaluate_model, evaluate_run
from digitlens.inference import predict_proba
from digitlens.groups import DIGIT_GROUPS
from digitlens.metrics import (NO_VAL_NOTE, calibration_bins, compute_metrics, confidence_by_outcome,
                               expected_calibration_error, group_metrics)

LABELS = np.arange(10)


def _assert_matches_sklearn(y_true, y_pred, metrics):
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=LABELS, average=average, zero_division=0)
        values = {key: metrics[average][key] for key in ("precision", "recall", "f1")}  # beside *_ci intervals
        assert values == pytest.approx({"precision": p, "recall": r, "f1": f})
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=LABELS, average=None, zero_division=0)
    per = metrics["per_digit"]
    assert [row["digit"] for row in per] == list(range(10))
    np.testing.assert_allclose([row["precision"] for row in per], p)
    np.testing.assert_allclose([row["recall"] for row in per], r)
    np.testing.assert_allclose([row["f1"] for row in per], f)
    assert [row["support"] for row in per] == s.tolist()
    # one-vs-rest accuracy, naive formula: share of samples where "is digit d" is decided right
    naive = [np.mean((y_true == d) == (y_pred == d)) for d in range(10)]
    np.testing.assert_allclose([row["accuracy"] for row in per], naive)
    cm = confusion_matrix(y_true, y_pred, labels=LABELS)
    assert metrics["confusion_matrix"] == cm.tolist()
    assert metrics["n_errors"] == int(np.sum(y_true != y_pred))


def test_metrics_equal_sklearn_on_a_realistic_confusion():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 10, 500)
    y_pred = np.where(rng.random(500) < 0.85, y_true, rng.integers(0, 10, 500))
    metrics = compute_metrics(y_true, y_pred)
    _assert_matches_sklearn(y_true, y_pred, metrics)
    assert "ece" not in metrics
    json.dumps(metrics)  # JSON-ready


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=120))
def test_metrics_equal_sklearn_for_random_labels(pairs):
    y_true = np.array([t for t, _ in pairs])
    y_pred = np.array([p for _, p in pairs])
    metrics = compute_metrics(y_true, y_pred)
    _assert_matches_sklearn(y_true, y_pred, metrics)
    pairs_out = metrics["most_confused"]
    counts = [p["count"] for p in pairs_out]
    assert counts == sorted(counts, reverse=True)
    cm = np.array(metrics["confusion_matrix"])
    off_diagonal = cm[~np.eye(10, dtype=bool)]
    assert counts == sorted(off_diagonal[off_diagonal > 0].tolist(), reverse=True)[:10]
    for p in pairs_out:
        assert p["true"] != p["predicted"]
        assert p["count"] == cm[p["true"], p["predicted"]]
        assert p["share_of_true"] == pytest.approx(p["count"] / np.sum(y_true == p["true"]))


def test_one_hot_labels_are_accepted_like_keras_users_have_them():
    y_true = np.array([0, 1, 2, 2, 9])
    y_pred = np.array([0, 1, 1, 2, 9])
    from_one_hot = compute_metrics(np.eye(10)[y_true], np.eye(10)[y_pred])
    assert from_one_hot == compute_metrics(y_true, y_pred)


def test_ece_on_hand_built_probabilities():
    # 4 samples, 15 bins of width 1/15.
    #  conf 0.95 correct, conf 0.95 wrong -> bin 14: acc 0.5, conf 0.95 -> |0.5-0.95| * 2/4 = 0.225
    #  conf 0.60 correct                  -> bin 8 (0.533, 0.6]: |1-0.6| * 1/4 = 0.100
    #  conf 0.30 wrong                    -> bin 4 (0.267, 0.333]: |0-0.3| * 1/4 = 0.075
    proba = np.full((4, 10), 0.0)
    proba[0, 3], proba[0, 0] = 0.95, 0.05          # predicts 3, true 3
    proba[1, 5], proba[1, 1] = 0.95, 0.05          # predicts 5, true 1
    proba[2, 7], proba[2, 2] = 0.60, 0.40          # predicts 7, true 7
    proba[3, :] = 0.7 / 9
    proba[3, 4] = 0.30                             # predicts 4, true 0
    y_true = np.array([3, 1, 7, 0])
    assert expected_calibration_error(y_true, proba) == pytest.approx(0.225 + 0.100 + 0.075)
    bins = calibration_bins(y_true, proba)
    assert bins["count"][14] == 2 and bins["count"][8] == 1 and bins["count"][4] == 1
    assert sum(bins["count"]) == 4
    assert bins["accuracy"][14] == pytest.approx(0.5)
    assert bins["confidence"][8] == pytest.approx(0.6)
    assert bins["accuracy"][0] is None  # empty bin


def test_ece_is_zero_when_confident_and_right_and_one_when_confident_and_wrong():
    y = np.array([0, 1, 2])
    assert expected_calibration_error(y, np.eye(10)[y]) == 0.0
    assert expected_calibration_error(y, np.eye(10)[(y + 1) % 10]) == pytest.approx(1.0)


def test_ece_agrees_with_sklearn_calibration_curve():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2000, 10)) * 3
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y_true = np.where(rng.random(2000) < 0.7, proba.argmax(axis=1), rng.integers(0, 10, 2000))
    conf, correct = proba.max(axis=1), (proba.argmax(axis=1) == y_true).astype(int)
    acc_bins, conf_bins = calibration_curve(correct, conf, n_bins=15, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], conf), minlength=15)
    oracle = np.sum(counts[counts > 0] / len(conf) * np.abs(acc_bins - conf_bins))
    metrics = compute_metrics(y_true, proba.argmax(axis=1), proba)
    assert metrics["ece"] == pytest.approx(oracle)
    assert [c for c in metrics["calibration"]["count"] if c] == counts[counts > 0].tolist()


def _random_predictions(seed=3, n=400):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 10, n)
    logits = rng.normal(size=(n, 10))
    logits[np.arange(n), y_true] += 2.0            # mostly right, some confident mistakes
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, proba


def test_confidence_of_right_and_wrong_predictions_against_numpy_and_scipy():
    from scipy.stats import ttest_1samp

    y_true, proba = _random_predictions()
    found = confidence_by_outcome(y_true, proba)
    confidence, y_pred = proba.max(axis=1), proba.argmax(axis=1)
    for name, mask in (("correct", y_pred == y_true), ("wrong", y_pred != y_true)):
        assert found[name]["n"] == int(mask.sum()) > 1
        assert found[name]["mean_confidence"] == pytest.approx(confidence[mask].mean())
        ci = ttest_1samp(confidence[mask], 0.0).confidence_interval(0.95)  # Student-t interval of the mean
        assert found[name]["mean_confidence_ci"] == pytest.approx([ci.low, ci.high])
    assert found["interval"] == "student_t"
    # the most confident mistake: a plain loop over the images, first of ties
    best = None
    for i in range(len(y_true)):
        if y_pred[i] != y_true[i] and (best is None or confidence[i] > confidence[best]):
            best = i
    assert found["most_confident_mistake"] == {"index": best, "true": int(y_true[best]),
                                               "predicted": int(y_pred[best]),
                                               "confidence": pytest.approx(float(confidence[best]))}
    metrics = compute_metrics(y_true, y_pred, proba)
    assert metrics["confidence_by_outcome"] == found
    # no mistakes: no mean confidence of mistakes and no most confident mistake, not a crash
    right = confidence_by_outcome(y_pred, proba)
    assert right["wrong"] == {"n": 0, "mean_confidence": None, "mean_confidence_ci": None}
    assert right["most_confident_mistake"] is None and right["correct"]["n"] == len(y_pred)


def test_group_precision_and_recall_are_those_of_the_binary_decision():
    from scipy.stats import binomtest
    from sklearn.metrics import f1_score, precision_score, recall_score

    y_true, proba = _random_predictions(seed=5)
    y_pred = proba.argmax(axis=1)
    found = compute_metrics(y_true, y_pred)["groups"]
    assert [g["digits"] for g in found] == [list(g) for g in DIGIT_GROUPS]
    for group, row in zip(DIGIT_GROUPS, found):
        truth = np.array([t in group for t in y_true])     # the binary relabelling, by hand
        guess = np.array([p in group for p in y_pred])
        assert row["precision"] == pytest.approx(precision_score(truth, guess))
        assert row["recall"] == pytest.approx(recall_score(truth, guess))
        assert row["f1"] == pytest.approx(f1_score(truth, guess))
        tp = int(np.sum(truth & guess))
        assert (row["support"], row["n_predicted"]) == (int(truth.sum()), int(guess.sum()))
        for key, n in (("precision_ci", guess.sum()), ("recall_ci", truth.sum())):
            ci = binomtest(tp, int(n)).proportion_ci(confidence_level=0.95, method="wilson")
            assert row[key] == pytest.approx([ci.low, ci.high])
    # not the mean of the per-digit values the report used to average: the groups differ in size
    per_digit = precision_recall_fscore_support(y_true, y_pred, labels=LABELS, zero_division=0)[0]
    assert found[0]["precision"] != pytest.approx(np.mean(per_digit[list(DIGIT_GROUPS[0])]))
    assert group_metrics(y_true, y_pred) == found
    assert "groups" not in compute_metrics([0, 1, 1], [0, 1, 0], n_classes=3)  # the groups need digits 0-9


def test_bad_inputs_give_one_line_errors():
    with pytest.raises(DigitlensError, match="3 predictions for 2 labels"):
        compute_metrics([0, 1], [0, 1, 2])
    with pytest.raises(DigitlensError, match="proba"):
        compute_metrics([0, 1], [0, 1], np.array([[5.0, -3.0], [0.0, 1.0]]))
    with pytest.raises(DigitlensError, match="no samples"):
        compute_metrics([], [])


# ---------------------------------------------------------------------------------------------
# The evaluate stage on a tiny trained run (digits, small MLP, a few epochs: about a second).
# ---------------------------------------------------------------------------------------------

def make_tiny_run(run_dir):
    """A real run folder from ``digitlens.train.train``: digits, a 32-unit MLP, 3 epochs (< 1 s)."""
    from digitlens.train import train

    threads = torch.get_num_threads()
    try:  # one thread is fastest for a tiny model and immune to a busy machine
        train(run_dir, dataset="digits", model="mlp", epochs=3, seed=0, progress=False,
              model_kwargs={"widths": [32]}, threads=1)
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A tiny run evaluated through the CLI (`digitlens evaluate RUN`); returns (run_dir, summary)."""
    from digitlens.cli import app

    run_dir = make_tiny_run(tmp_path_factory.mktemp("runs") / "tiny")
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = runio.read_json(run_dir / "evaluation.json")
    low, high = summary["accuracy_ci"]
    assert f"accuracy {summary['accuracy']:.4f} (95% Wilson interval {low:.4f}-{high:.4f})" in result.output
    return run_dir, summary


@pytest.mark.slow
def test_evaluate_run_writes_every_file(evaluated_run):
    run_dir, summary = evaluated_run
    for name in ("predictions.npz", "metrics.json", "insights.md", "insights.json", "evaluation.json"):
        assert (run_dir / name).is_file(), name
    for stem in FIGURES:
        for ext in ("png", "svg"):
            path = run_dir / "figures" / f"{stem}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path
    assert "Overfitting" in (run_dir / "insights.md").read_text()


@pytest.mark.slow
def test_figure_manifest_lists_every_figure_with_its_kind(evaluated_run):
    from digitlens.figure_writer import read_figure_manifest

    run_dir, summary = evaluated_run
    manifest = runio.read_json(run_dir / "figures" / "figures.json")
    assert manifest["stage"] == "evaluate"
    entries = {Path(e["path"]).stem: e for e in manifest["figures"]}
    assert set(entries) == set(FIGURES)  # every figure drawn is listed, nothing else
    kinds = {stem: (e["kind"], e["section"]) for stem, e in entries.items()}
    assert kinds == {"training_curves": ("training_curves", "training"),
                     "confusion_matrix": ("confusion_matrix", "evaluation"),
                     "per_digit_metrics": ("per_digit", "evaluation"),
                     "per_digit_metrics_groups": ("per_digit_groups", "evaluation"),
                     "prediction_gallery": ("predictions", "galleries"),
                     "misclassified_gallery": ("misclassified", "galleries"),
                     "reliability_diagram": ("reliability", "evaluation")}
    metrics = runio.read_json(run_dir / "metrics.json")
    correct = metrics["n_samples"] - metrics["n_errors"]
    assert f"{correct:,} of {metrics['n_samples']:,} correct" in entries["confusion_matrix"]["title"]
    assert all(e["title"] for e in entries.values())
    assert entries["reliability_diagram"]["calibrated"] is (metrics["temperature"] is not None)
    assert entries["per_digit_metrics_groups"]["groups"] == [[1, 2, 4, 6, 9], [0, 3, 5, 7, 8]]
    listed = {f for e in manifest["figures"] for f in e["files"]}
    on_disk = {p.name for p in (run_dir / "figures").iterdir()} - {"figures.json"}
    assert listed == on_disk
    assert sorted(summary["figures"]) == sorted(f"figures/{f}" for f in listed)
    assert len(read_figure_manifest(run_dir / "figures")) == len(FIGURES)


def _evaluation_files(folder: Path) -> dict[str, bytes]:
    """The bytes of every file an evaluation owns in ``folder`` (evaluate.OUTPUTS, figures/ included;
    an SVG's bytes are left out: it holds the time it was drawn)."""
    from digitlens.evaluate import OUTPUTS

    found = {}
    for name in OUTPUTS:
        path = folder / name
        if path.is_dir():
            found.update({p.relative_to(folder).as_posix(): b"" if p.suffix == ".svg" else p.read_bytes()
                          for p in path.rglob("*") if p.is_file()})
        elif path.is_file():
            found[name] = path.read_bytes()
    return found


@pytest.mark.slow
def test_a_failed_evaluation_leaves_the_old_one_whole_and_a_new_one_replaces_it_whole(evaluated_run, tmp_path,
                                                                                    monkeypatch):
    import digitlens.evaluate

    run_dir = tmp_path / "run"
    shutil.copytree(evaluated_run[0], run_dir)
    (run_dir / "predictions.csv").write_text("ImageId,Label\n1,7\n")  # a file of an older, unlabelled evaluation
    (run_dir / "figures" / "old_figure.png").write_bytes(b"old")
    before = _evaluation_files(run_dir)
    kept = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name not in before}

    def broken(*args, **kwargs):  # fails after predictions, metrics and insights are written
        raise DigitlensError("figures: broken on purpose")

    monkeypatch.setattr(digitlens.evaluate, "write_figures", broken)
    with pytest.raises(DigitlensError, match="broken on purpose"):
        evaluate_run(run_dir, progress=False, bootstrap=0)
    assert _evaluation_files(run_dir) == before  # nothing of the failed evaluation, nothing lost
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".staged")]
    monkeypatch.undo()
    monkeypatch.setattr(digitlens.evaluate, "FIGURE_FORMATS", ("png",))
    evaluate_run(run_dir, progress=False, bootstrap=0)
    after = _evaluation_files(run_dir)
    assert "predictions.csv" not in after and "figures/old_figure.png" not in after
    assert not any(name.endswith(".svg") for name in after)  # the whole figures/ folder is the new one
    assert "bootstrap" not in runio.read_json(run_dir / "metrics.json")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name in kept} == kept  # the run's own files
    assert not [p for p in run_dir.rglob("*") if p.name.startswith((".staged", ".tmp"))]


def test_an_evaluation_killed_after_its_commit_is_finished_by_the_next_writer(tmp_path, monkeypatch):
    """The swap of staged files starts with one rename (the commit); a kill after it leaves a
    ``.staged.*.swap`` folder that the next writer (run_lock -> clean_orphans) moves in."""
    folder = tmp_path / "out"
    (folder / "figures").mkdir(parents=True)
    (folder / "metrics.json").write_text("old")
    (folder / "predictions.csv").write_text("old")
    (folder / "figures" / "a.png").write_text("old")
    (folder / "config.json").write_text("{}")

    def killed(swap, target):  # the process dies between the commit rename and the first move
        raise KeyboardInterrupt

    monkeypatch.setattr(runio, "_finish_swap", killed)
    with pytest.raises(KeyboardInterrupt):
        with runio.staged_files(folder, ("metrics.json", "predictions.csv", "figures")) as staging:
            (staging / "metrics.json").write_text("new")
            (staging / "figures").mkdir()
            (staging / "figures" / "b.png").write_text("new")
    assert (folder / "metrics.json").read_text() == "old"  # nothing moved yet
    monkeypatch.undo()
    with runio.run_lock(folder, "evaluate"):  # what every writer does first
        pass
    assert (folder / "metrics.json").read_text() == "new"
    assert not (folder / "predictions.csv").exists()
    assert sorted(p.name for p in (folder / "figures").iterdir()) == ["b.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "figures", "metrics.json"]


@pytest.mark.slow
def test_evaluate_killed_anywhere_leaves_the_old_or_the_new_evaluation(evaluated_run, tmp_path):
    """SIGKILL `digitlens evaluate` at seeded random moments (a whole process: ~10-20 s each):
    the run folder holds the old evaluation's files or the new one's, never a mix."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(12)
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated_run[0], run_dir)
    old = _evaluation_files(run_dir)
    env = dict(os.environ, DIGITLENS_FIGURE_WORKERS="0")
    args = [sys.executable, "-m", "digitlens", "evaluate", str(run_dir), "--no-progress", "--bootstrap", "50"]
    tic = time.monotonic()
    subprocess.run(args, env=env, check=True, capture_output=True)  # the new evaluation, whole
    duration = time.monotonic() - tic
    new = _evaluation_files(run_dir)
    assert new != old and json.loads(new["metrics.json"])["bootstrap"]["n_resamples"] == 50
    shutil.rmtree(run_dir)  # put the old evaluation back, then kill re-evaluations
    shutil.copytree(evaluated_run[0], run_dir)
    for fraction in rng.uniform(0.3, 1.0, size=3):
        proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=duration * fraction)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with runio.run_lock(run_dir, "test"):  # the next writer finishes or drops what the killed one left
            pass
        found = _evaluation_files(run_dir)
        assert found in (old, new), f"a mix after a kill at {fraction:.2f} of {duration:.1f} s"
        assert not [p for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".swap", ".old"))]


@pytest.mark.slow
def test_predictions_match_the_model_and_metrics_match_sklearn(evaluated_run):
    run_dir, summary = evaluated_run
    preds = runio.read_npz(run_dir / "predictions.npz")
    test = data.load_splits("digits").test
    model = models.load_model(run_dir)
    with torch.no_grad():
        logits = model(test.images)
    np.testing.assert_array_equal(preds["y_true"], test.labels.numpy())
    np.testing.assert_array_equal(preds["y_pred"], logits.argmax(1).numpy())
    np.testing.assert_allclose(preds["proba"], torch.softmax(logits, 1).numpy(), atol=1e-5)
    assert preds["proba"].shape == (len(test), 10)
    metrics = runio.read_json(run_dir / "metrics.json")
    _assert_matches_sklearn(preds["y_true"], preds["y_pred"], metrics)
    assert summary["accuracy"] == pytest.approx(accuracy_score(preds["y_true"], preds["y_pred"]))
    assert summary["accuracy"] > 0.8  # the tiny model did learn something


@pytest.mark.slow
def test_metrics_json_carries_the_intervals(evaluated_run, tmp_path):
    from scipy.stats import binomtest

    from digitlens.intervals import bootstrap_metrics

    run_dir, summary = evaluated_run
    metrics = runio.read_json(run_dir / "metrics.json")
    preds = runio.read_npz(run_dir / "predictions.npz")
    n, k = metrics["n_samples"], metrics["n_samples"] - metrics["n_errors"]
    wilson = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert metrics["accuracy_ci"] == pytest.approx([wilson.low, wilson.high])
    assert summary["accuracy_ci"] == metrics["accuracy_ci"]
    assert metrics["bootstrap"] == {"n_resamples": 1000, "seed": 0, "confidence": 0.95}
    again = bootstrap_metrics(preds["y_true"], preds["y_pred"], preds["proba"],
                              proba_calibrated=preds.get("proba_calibrated"), n_resamples=1000, seed=0)
    for row in metrics["per_digit"]:
        for key in ("precision", "recall", "f1", "accuracy"):
            assert row[f"{key}_ci"] == pytest.approx(again[key][row["digit"]].tolist())
    assert metrics["macro"]["f1_ci"] == pytest.approx(again["macro_f1"].tolist())
    assert metrics["ece_ci"] == pytest.approx(again["ece"].tolist())
    if metrics.get("ece_calibrated") is not None:
        assert metrics["ece_calibrated_ci"] == pytest.approx(again["ece_calibrated"].tolist())
    insights = runio.read_json(run_dir / "insights.json")
    assert insights["digits"]["hardest"][0]["f1_ci"] and insights["digits"]["hardest_within_noise"]
    # the readings the report quotes, against numpy on predictions.npz
    confidence = preds["proba"].max(axis=1)
    wrong = np.flatnonzero(preds["y_pred"] != preds["y_true"])
    found = metrics["confidence_by_outcome"]
    assert found["wrong"]["n"] == len(wrong) > 0
    assert found["wrong"]["mean_confidence"] == pytest.approx(confidence[wrong].mean(), rel=1e-6)
    assert found["correct"]["mean_confidence"] == pytest.approx(np.delete(confidence, wrong).mean(), rel=1e-6)
    worst = found["most_confident_mistake"]
    assert confidence[worst["index"]] == pytest.approx(confidence[wrong].max())
    assert (worst["true"], worst["predicted"]) == (preds["y_true"][worst["index"]], preds["y_pred"][worst["index"]])
    assert [g["digits"] for g in metrics["groups"]] == [list(g) for g in DIGIT_GROUPS]
    # the best validation accuracy: numpy over history.csv, Wilson interval of the run's n_val images
    history = np.genfromtxt(run_dir / "history.csv", delimiter=",", names=True)
    best = insights["best_validation"]
    assert best["best_val_accuracy"] == pytest.approx(history["val_accuracy"].max())
    assert best["best_val_accuracy_epoch"] == int(history["epoch"][np.argmax(history["val_accuracy"])])
    n_val = runio.read_json(run_dir / "config.json")["n_val"]
    ci = binomtest(round(best["best_val_accuracy"] * n_val), n_val).proportion_ci(confidence_level=0.95,
                                                                                  method="wilson")
    assert best["n_val"] == n_val and best["best_val_accuracy_ci"] == pytest.approx([ci.low, ci.high])
    # bootstrap=0 keeps only the (free) Wilson intervals
    plain = evaluate_model(models.load_model(run_dir), data.load_splits("digits").test, progress=False,
                           bootstrap=0)["metrics"]
    assert "bootstrap" not in plain and "f1_ci" not in plain["per_digit"][0] and plain["accuracy_ci"]
    with pytest.raises(DigitlensError, match="bootstrap"):
        evaluate_model(models.load_model(run_dir), data.load_splits("digits").test, progress=False, bootstrap=-1)


@pytest.mark.slow
def test_evaluate_is_deterministic(evaluated_run):
    run_dir, _ = evaluated_run
    first = runio.read_npz(run_dir / "predictions.npz")
    again = evaluate_model(models.load_model(run_dir), "digits", progress=False)
    assert again["metrics"]["accuracy"] == runio.read_json(run_dir / "metrics.json")["accuracy"]
    proba = predict_proba(models.load_model(run_dir), data.load_splits("digits").test.images, batch_size=7)
    np.testing.assert_allclose(proba, first["proba"], atol=1e-6)


@pytest.mark.slow
def test_bring_your_own_module_and_torchscript(evaluated_run, tmp_path, monkeypatch):
    import digitlens.evaluate

    monkeypatch.setattr(digitlens.evaluate, "FIGURE_FORMATS", ("png",))  # SVG is checked above; save time
    run_dir, summary = evaluated_run
    model = models.load_model(run_dir)
    script = tmp_path / "model.pt"
    with pytest.warns(DeprecationWarning):  # torch 2.13 deprecates TorchScript; users still have such files
        torch.jit.script(model).save(str(script))

    class Wrapped(torch.nn.Module):  # returns (logits, extra) like a ViT with attentions
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x), None

    from_module = evaluate_model(Wrapped(model), "digits", progress=False)
    assert from_module["accuracy"] == pytest.approx(summary["accuracy"])
    out = tmp_path / "byo"
    result = CliRunner().invoke(
        __import__("digitlens.cli", fromlist=["app"]).app,
        ["evaluate", "--model-file", str(script), "--dataset", "digits", "--out", str(out), "--no-progress", "--trust-code"])
    assert result.exit_code == 0, result.output
    assert runio.read_json(out / "metrics.json")["accuracy"] == pytest.approx(summary["accuracy"])
    assert (out / "figures" / "confusion_matrix.png").is_file()
    assert not (out / "figures" / "training_curves.png").exists()  # no history given


@pytest.mark.slow
def test_keras_history_file_feeds_the_overfitting_insight(evaluated_run, tmp_path):
    run_dir, _ = evaluated_run
    log = tmp_path / "training.log"  # Keras CSVLogger: 0-based epochs, alphabetical columns
    log.write_text("epoch,accuracy,loss,val_accuracy,val_loss\n"
                   "0,0.90,0.40,0.91,0.30\n1,0.95,0.20,0.93,0.25\n2,0.97,0.10,0.92,0.27\n3,0.99,0.05,0.92,0.29\n")
    summary = evaluate_model(models.load_model(run_dir), "digits", history=log, progress=False)
    overfitting = [s for s in summary["insights"] if s.startswith("Overfitting")]
    assert overfitting and "diverges from epoch 3" in overfitting[0] and "epoch 2" in overfitting[0]


@pytest.mark.slow
def test_evaluate_run_api_with_a_users_module(evaluated_run, monkeypatch):
    import digitlens.evaluate

    run_dir, summary = evaluated_run
    monkeypatch.setattr(digitlens.evaluate, "write_figures", lambda *a, **k: [])  # figures checked above
    again = evaluate_run(run_dir, model=models.load_model(run_dir), progress=False, out_dir=run_dir.parent / "users_module")
    assert again["accuracy"] == summary["accuracy"]
    assert again["source"]["model"] == "MLP"


def _logits(model, images):
    with torch.no_grad():
        return model(images).double().numpy()


@pytest.mark.slow
def test_metrics_and_predictions_carry_the_temperature_fitted_on_the_val_split(evaluated_run):
    run_dir, summary = evaluated_run
    metrics = runio.read_json(run_dir / "metrics.json")
    preds = runio.read_npz(run_dir / "predictions.npz")
    splits = data.load_splits("digits")  # the run's splits: val_fraction 0.1, seed 0
    model = models.load_model(run_dir)
    oracle_t = fit_temperature(_logits(model, splits.val.images), splits.val.labels.numpy())
    assert metrics["temperature"] == pytest.approx(oracle_t, rel=1e-4)
    assert metrics["temperature"] != pytest.approx(
        fit_temperature(_logits(model, splits.test.images), splits.test.labels.numpy()), rel=1e-3)
    fit = metrics["temperature_fit"]
    assert fit["split"] == "val" and fit["n_images"] == len(splits.val)
    assert fit["nll_after"] <= fit["nll_before"]
    # raw proba kept; calibrated proba = softmax(logits / T), float32 (N, 10)
    np.testing.assert_allclose(preds["proba"], torch.softmax(torch.from_numpy(_logits(model, splits.test.images)), 1),
                               atol=1e-5)
    calibrated = preds["proba_calibrated"]
    assert calibrated.dtype == np.float32 and calibrated.shape == preds["proba"].shape
    expected = torch.softmax(torch.from_numpy(_logits(model, splits.test.images)) / metrics["temperature"], 1)
    np.testing.assert_allclose(calibrated, expected.numpy(), atol=1e-5)
    # same bins as the raw ECE, computed on the stored calibrated probabilities
    assert metrics["ece"] == pytest.approx(calibration_bins(preds["y_true"], preds["proba"])["ece"])
    assert metrics["calibration_calibrated"] == calibration_bins(preds["y_true"], calibrated)
    assert metrics["ece_calibrated"] == metrics["calibration_calibrated"]["ece"]
    assert metrics["calibration_calibrated"]["bin_edges"] == metrics["calibration"]["bin_edges"]
    assert summary["temperature"] == metrics["temperature"] and summary["ece_calibrated"] == metrics["ece_calibrated"]
    assert f"T = {metrics['temperature']:.3g}" in (run_dir / "insights.md").read_text()


@pytest.mark.slow
def test_the_temperature_comes_from_the_val_split_even_when_it_differs_from_test(evaluated_run, tmp_path,
                                                                                   monkeypatch):
    import digitlens.evaluate

    run_dir = tmp_path / "run"
    shutil.copytree(evaluated_run[0], run_dir)
    splits = data.load_splits("digits")
    rng = np.random.default_rng(0)
    # a validation split whose labels are shuffled: its NLL wants a large T (near-uniform), test's does not
    val = data.DigitDataset("digits", "val", splits.val.images, splits.val.labels[rng.permutation(len(splits.val))])
    monkeypatch.setattr(data, "load_splits_for_run", lambda config, data_dir=None: data.Splits(splits.train, val, splits.test))
    monkeypatch.setattr(digitlens.evaluate, "write_figures", lambda *a, **k: [])
    summary = evaluate_run(run_dir, progress=False)
    model = models.load_model(run_dir)
    on_val = fit_temperature(_logits(model, val.images), val.labels.numpy())
    on_test = fit_temperature(_logits(model, splits.test.images), splits.test.labels.numpy())
    assert on_val > 2 * on_test
    assert summary["temperature"] == pytest.approx(on_val, rel=1e-4)


@pytest.mark.slow
def test_no_validation_split_gives_a_note_not_a_crash(evaluated_run, tmp_path, monkeypatch):
    import digitlens.evaluate
    from digitlens.train import train

    monkeypatch.setattr(digitlens.evaluate, "FIGURE_FORMATS", ("png",))
    run_dir, _ = evaluated_run
    model = models.load_model(run_dir)
    # a user's model on a dataset name: no validation split
    out = tmp_path / "byo"
    summary = evaluate_model(model, "digits", out_dir=out, progress=False)
    metrics = runio.read_json(out / "metrics.json")
    assert metrics["temperature"] is None and metrics["calibration_note"] == NO_VAL_NOTE
    assert "ece_calibrated" not in metrics and summary["ece_calibrated"] is None
    assert "proba_calibrated" not in runio.read_npz(out / "predictions.npz")
    assert (out / "figures" / "reliability_diagram.png").is_file()
    assert any(NO_VAL_NOTE in s for s in summary["insights"])
    # ...unless the user supplies one; the test split is refused
    splits = data.load_splits("digits")
    with_val = evaluate_model(model, "digits", val_dataset=splits.val, progress=False)
    assert with_val["temperature"] == pytest.approx(runio.read_json(run_dir / "metrics.json")["temperature"])
    with pytest.raises(DigitlensError, match="val_dataset"):
        evaluate_model(model, splits.test, val_dataset=splits.test, progress=False)
    # a run trained with val_fraction=0
    threads = torch.get_num_threads()
    try:
        train(tmp_path / "noval", dataset="digits", model="mlp", epochs=1, seed=0, progress=False,
              model_kwargs={"widths": [16]}, threads=1, val_fraction=0)
    finally:
        torch.set_num_threads(threads)
    summary = evaluate_run(tmp_path / "noval", progress=False)
    assert summary["temperature"] is None and summary["calibration_note"] == NO_VAL_NOTE
    assert runio.read_json(tmp_path / "noval" / "metrics.json")["calibration_note"] == NO_VAL_NOTE


@pytest.mark.slow
def test_cli_evaluate_one_line_errors(evaluated_run, tmp_path):
    from digitlens.cli import app

    run_dir, summary = evaluated_run
    runner = CliRunner()

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    result = runner.invoke(app, ["evaluate", str(not_a_run)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(not_a_run) in lines[0]

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    result = runner.invoke(app, ["evaluate", str(run_dir), "--model-file", str(bad), "--out", str(tmp_path / "bad_eval")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "bad.pt" in result.output


@pytest.mark.slow
@pytest.mark.mnist
@pytest.mark.skipif(not os.environ.get("DIGITLENS_DATA"), reason="DIGITLENS_DATA is not set (folder with the MNIST .gz files)")
def test_cli_evaluates_a_torchscript_file_on_mnist_without_a_run(evaluated_run, tmp_path, monkeypatch):
    import digitlens.evaluate
    from digitlens.cli import app

    monkeypatch.setattr(digitlens.evaluate, "FIGURE_FORMATS", ("png",))
    run_dir, _ = evaluated_run
    script = tmp_path / "digits_mlp.pt"
    with pytest.warns(DeprecationWarning):
        torch.jit.script(models.load_model(run_dir)).save(str(script))
    out = tmp_path / "mnist_eval"
    result = CliRunner().invoke(app, ["evaluate", "--model-file", str(script), "--dataset", "mnist",
                                      "--out", str(out), "--no-progress", "--trust-code"])
    assert result.exit_code == 0, result.output
    preds = runio.read_npz(out / "predictions.npz")
    assert preds["proba"].shape == (10000, 10)
    metrics = runio.read_json(out / "metrics.json")
    _assert_matches_sklearn(preds["y_true"], preds["y_pred"], metrics)
    assert sum(row["support"] for row in metrics["per_digit"]) == 10000


@pytest.mark.slow
def test_cli_bootstrap_option_sets_the_resamples_and_refuses_negatives(evaluated_run, tmp_path):
    from digitlens.cli import app
    from digitlens.intervals import bootstrap_metrics

    run_dir, _ = evaluated_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "model.safetensors", "history.csv"):
        shutil.copy(run_dir / name, copy / name)
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(copy), "--no-progress", "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    metrics = runio.read_json(copy / "metrics.json")
    assert metrics["bootstrap"] == {"n_resamples": 200, "seed": 0, "confidence": 0.95}
    preds = runio.read_npz(copy / "predictions.npz")
    again = bootstrap_metrics(preds["y_true"], preds["y_pred"], preds["proba"], n_resamples=200, seed=0)
    assert metrics["macro"]["f1_ci"] == pytest.approx(again["macro_f1"].tolist())
    result = runner.invoke(app, ["evaluate", str(copy), "--no-progress", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    metrics = runio.read_json(copy / "metrics.json")
    assert "bootstrap" not in metrics and "f1_ci" not in metrics["macro"] and metrics["accuracy_ci"]
    # a negative count is refused in one line, before any prediction, by every command that evaluates
    for args in (["evaluate", str(copy), "--bootstrap", "-1"], ["report", str(copy), "--bootstrap", "-5"],
                 ["demo", "--out", str(tmp_path / "demo"), "--bootstrap", "-2"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --bootstrap -"), (args, result.output)
    assert not (tmp_path / "demo").exists()
