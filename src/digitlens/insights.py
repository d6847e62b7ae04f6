"""Insights derived from a run's metrics and training history, each with the numbers behind it:
easiest and hardest digits, most-confused pairs, overfitting (whether and from which epoch the
validation loss diverges), the generalisation gap and calibration.

Train and validation numbers are compared like with like: a digitlens history's
``train_eval_loss``/``train_eval_accuracy`` (training images measured at the end of the epoch in eval
mode, plain cross-entropy, as ``val_loss``/``val_accuracy`` are). Keras' ``loss``/``accuracy``
(averaged during the epoch, in train mode, with label smoothing and augmentation) are never set
against the validation loss: a history without the ``train_eval_*`` columns gets no loss gap.

``derive_insights(metrics, history)`` returns a JSON-ready dict; ``render_markdown`` turns it into
``insights.md``; ``write_insights(out_dir, ...)`` writes both files.

``insights.json`` holds ``accuracy``, ``accuracy_ci``, ``n_errors``, ``n_samples``, ``digits``,
``confused_pairs``, ``confused_pairs_within_noise``, ``generalisation_gap``, ``calibration``,
``summary``, ``best_validation`` (the best validation accuracy, its epoch and its Wilson interval of
``n_val`` images: :func:`digitlens.history.best_validation`) and ``overfitting``, the verdict of digitlens' one overfitting rule
(:func:`digitlens.history.detect_overfitting`; the report reads it from here, never recomputes it):

    available           bool: False without a history, without loss/val_loss, or without a finite
                        val_loss (a run trained with val_fraction=0)
    diverges            bool, or None when not available
    rule                the rule in words
    reason              (not available only) why not
    from_epoch          first epoch after the best one when it diverges, else None
    best_epoch          epoch of the lowest val_loss
    n_epochs            epochs in the history
    min_val_loss        val_loss at best_epoch
    final_val_loss      val_loss at the last epoch
    final_rise_percent  100 * (final_val_loss - min_val_loss) / min_val_loss
    train_loss_at_best, final_train_loss, train_loss_column (train_eval_loss when recorded, else loss)
    longest_rise        most consecutive epochs after the best with val_loss up and train loss down
    reasons             sentences, one per part of the rule that fired ([] when it does not diverge)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from digitlens import runio
from digitlens.history import best_validation, detect_overfitting, normalise_history
from digitlens.intervals import format_ci, overlapping, wilson_interval

#: ``generalisation_gap()["compared"]``: whether train and validation were measured alike.
COMPARED_EVAL = "end-of-epoch eval mode"
NOT_COMPARABLE = "not comparable"
#: Why a history without ``train_eval_loss`` gets no loss gap.
NOT_COMPARABLE_REASON = ("the history records only the training loss averaged during each epoch (train mode, "
                         "label smoothing, augmentation), not one measured like val_loss")


def rank_digits(metrics: dict, k: int = 3) -> dict:
    """The ``k`` easiest and hardest digits by per-digit F1 (ties: recall, then digit), each a dict
    with ``digit``, ``f1``, ``precision``, ``recall``, ``support`` and, when ``metrics`` has them,
    ``f1_ci``, ``precision_ci``, ``recall_ci``; digits with no test images are skipped.

    With F1 intervals, ``easiest_within_noise`` / ``hardest_within_noise`` list the digits (best /
    worst first) whose F1 interval overlaps that of the easiest / hardest digit: the data cannot
    order them. Without intervals both are None. ``n_ranked``: digits with test images."""
    rows = [r for r in metrics["per_digit"] if r["support"] > 0]
    ordered = sorted(rows, key=lambda r: (-r["f1"], -r["recall"], r["digit"]))
    keep = ("digit", "f1", "f1_ci", "precision", "precision_ci", "recall", "recall_ci", "support")
    k = min(k, len(ordered) // 2) if len(ordered) > 1 else len(ordered)
    found = {
        "easiest": [{key: r[key] for key in keep if key in r} for r in ordered[:k]],
        "hardest": [{key: r[key] for key in keep if key in r} for r in reversed(ordered[len(ordered) - k:])],
        "easiest_within_noise": None,
        "hardest_within_noise": None,
        "n_ranked": len(ordered),
    }
    if ordered and all("f1_ci" in r for r in ordered):
        for label, seq in (("easiest", ordered), ("hardest", ordered[::-1])):
            found[f"{label}_within_noise"] = [seq[i]["digit"] for i in overlapping([r["f1_ci"] for r in seq])]
    return found


def confused_pairs_within_noise(pairs: list[dict]) -> list[int] | None:
    """Positions of the pairs whose ``count_ci`` overlaps that of the first (most confused) pair;
    None when the pairs carry no intervals."""
    if not pairs or not all("count_ci" in p for p in pairs):
        return None
    return overlapping([p["count_ci"] for p in pairs])


def _and(items) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def noise_sentence(digits: dict, label: str) -> str | None:
    """``"digits 6, 9 and 5 are within noise of each other (F1 intervals overlap)"`` for the
    easiest or hardest digits (``label``), or that the first digit stands out; None without intervals."""
    tied = digits.get(f"{label}_within_noise")
    if not tied:
        return None
    if len(tied) == 1:
        return f"digit {tied[0]} is the {label} beyond noise (its F1 interval overlaps no other digit's)"
    if len(tied) == digits.get("n_ranked") and len(tied) > 2:
        return (f"all {len(tied)} digits are within noise of digit {tied[0]} (their F1 intervals overlap its), "
                f"so the test set does not rank them")
    return f"digits {_and(tied)} are within noise of each other (F1 intervals overlap)"


def generalisation_gap(history: dict[str, np.ndarray] | None, metrics: dict | None = None) -> dict:
    """Train minus validation accuracy and validation minus train loss at the last epoch, and train
    accuracy minus test accuracy when ``metrics`` are given.

    With ``train_eval_loss``/``train_eval_accuracy`` in the history, ``compared`` is
    ``"end-of-epoch eval mode"`` and the train side is those columns (``train_loss`` /
    ``train_accuracy``), measured like the validation split. Without them ``compared`` is
    ``"not comparable"``: ``loss_gap`` is None and ``loss_gap_reason`` says why, while the accuracy
    gap still uses Keras' ``accuracy`` and ``train_accuracy_measured`` says how it was measured.
    Missing columns (or NaN at the last epoch, no validation split) give None."""
    gap: dict[str, Any] = {}
    if history is not None and len(history.get("epoch", ())):
        last = -1

        def value(name):  # None when missing or NaN at the last epoch (no validation split)
            values = history.get(name)
            return None if values is None or np.isnan(float(values[last])) else float(values[last])

        val_acc, val_loss = value("val_accuracy"), value("val_loss")
        eval_loss, eval_acc = value("train_eval_loss"), value("train_eval_accuracy")
        gap["epoch"] = int(history["epoch"][last])
        if eval_loss is not None and eval_acc is not None:
            gap["compared"] = COMPARED_EVAL
            gap["train_loss"], gap["train_accuracy"] = eval_loss, eval_acc
            gap["train_accuracy_measured"] = "end of epoch, eval mode, no augmentation"
            gap["loss_gap"] = val_loss - eval_loss if val_loss is not None else None
            gap["loss_gap_reason"] = None if val_loss is not None else "no validation loss"
        else:
            gap["compared"] = NOT_COMPARABLE
            gap["train_loss"] = None
            gap["train_accuracy"] = value("accuracy")
            gap["train_accuracy_measured"] = ("during training (train mode, augmentation, weights changing)"
                                              if gap["train_accuracy"] is not None else None)
            gap["loss_gap"] = None
            gap["loss_gap_reason"] = NOT_COMPARABLE_REASON
        gap["val_loss"] = val_loss
        gap["val_accuracy"] = val_acc
        gap["accuracy_gap"] = (gap["train_accuracy"] - val_acc
                               if gap["train_accuracy"] is not None and val_acc is not None else None)
    if metrics is not None:
        gap["test_accuracy"] = metrics["accuracy"]
        if gap.get("train_accuracy") is not None:
            gap["train_minus_test_accuracy"] = gap["train_accuracy"] - metrics["accuracy"]
    return gap


def _calibration_insight(metrics: dict) -> dict | None:
    """Calibration facts from ``metrics``: ECE, mean confidence vs accuracy and its tendency, and,
    when ``evaluate`` fitted one, the temperature and the ECE after scaling (None without ``ece``)."""
    if "ece" not in metrics:
        return None
    mean_conf = metrics["calibration"]["mean_confidence"]
    diff = mean_conf - metrics["accuracy"]
    tendency = "over-confident" if diff > 0.005 else "under-confident" if diff < -0.005 else "well calibrated"
    found = {"ece": metrics["ece"], "mean_confidence": mean_conf,
             "mean_confidence_ci": metrics["calibration"].get("mean_confidence_ci"), "accuracy": metrics["accuracy"],
             "accuracy_ci": metrics.get("accuracy_ci"), "confidence_minus_accuracy": diff, "tendency": tendency}
    if metrics.get("temperature") is not None and metrics.get("ece_calibrated") is not None:
        fit = metrics.get("temperature_fit") or {}
        found.update({
            "temperature": metrics["temperature"],
            "ece_calibrated": metrics["ece_calibrated"],
            "mean_confidence_calibrated": (metrics.get("calibration_calibrated") or {}).get("mean_confidence"),
            "mean_confidence_calibrated_ci": (metrics.get("calibration_calibrated") or {}).get("mean_confidence_ci"),
            "fit_split": fit.get("split", "val"),
            "fit_n_images": fit.get("n_images"),
            "fit_at_bound": fit.get("at_bound"),
            "fit_method": fit.get("method", "nll"),
        })
    elif "temperature" in metrics or metrics.get("calibration_note"):
        found["temperature"] = None
        found["note"] = metrics.get("calibration_note", "temperature scaling skipped")
    return found


def _add_gap_intervals(gap: dict, metrics: dict, n_val: int | None, n_train_eval: int | None) -> None:
    """Wilson intervals of the generalisation gap's accuracies, in place: ``test_accuracy_ci`` (from
    ``metrics``), ``val_accuracy_ci`` (``n_val`` images) and, for a train accuracy measured like
    validation, ``train_accuracy_ci`` (``n_train_eval`` images); none where the count is unknown."""
    if "test_accuracy" in gap:
        gap["test_accuracy_ci"] = metrics.get("accuracy_ci")
    for key, n in (("val_accuracy", n_val), ("train_accuracy", n_train_eval)):
        if key == "train_accuracy" and gap.get("compared") != COMPARED_EVAL:
            continue  # Keras' in-epoch running mean: no sample of one model's predictions
        if gap.get(key) is not None and isinstance(n, (int, np.integer)) and n > 0:
            gap[f"{key}_ci"] = wilson_interval(round(gap[key] * n), int(n)).tolist()


def calibration_sentence(calibration: dict) -> str:
    """The one-sentence calibration finding of :func:`derive_insights` (a str)."""
    c = calibration
    head = (f"Calibration: ECE {c['ece']:.4f} ({c['tendency']}: mean confidence "
            f"{format_ci(c['mean_confidence'], c.get('mean_confidence_ci'))} vs accuracy "
            f"{format_ci(c['accuracy'], c.get('accuracy_ci'))})")
    if c.get("ece_calibrated") is not None:
        split = "validation split" if c.get("fit_split") == "val" else f"{c.get('fit_split')} split"
        n = f", {c['fit_n_images']:,} images" if c.get("fit_n_images") else ""
        t = c["temperature"]
        effect = (f"{'sharpens' if t < 1 else 'softens'} the probabilities and brings test ECE to "
                  f"{c['ece_calibrated']:.4f}" if t != 1 else
                  f"leaves the probabilities as they are (test ECE {c['ece_calibrated']:.4f})")
        bound = "; at the edge of its search range" if c.get("fit_at_bound") else ""
        if c.get("fit_method") == "rule_of_succession" and c.get("fit_n_images"):
            n_val = c["fit_n_images"]
            bound += (f"; the validation split has no mistakes, so the NLL has no minimum and T is set for a "
                      f"mean confidence of (n+1)/(n+2) = {(n_val + 1) / (n_val + 2):.2%}")
        after = (f"; mean confidence {format_ci(c['mean_confidence_calibrated'], c.get('mean_confidence_calibrated_ci'))}"
                 if c.get("mean_confidence_calibrated") is not None else "")
        return (f"{head}; temperature scaling fitted on the {split} (T = {c['temperature']:.3g}{n}{bound}) "
                f"{effect}{after} — "
                f"use proba_calibrated in predictions.npz, or divide the logits by T before the softmax.")
    if c.get("note"):
        hint = " (give a held-out validation split to fit a temperature)" if "no validation split" in c["note"] else ""
        return f"{head}; {c['note'].rstrip('.')}{hint}."
    return f"{head}."


def derive_insights(metrics: dict, history: Any = None, *, k: int = 3, top_pairs: int = 5,
                    n_val: int | None = None, n_train_eval: int | None = None) -> dict:
    """All insights as a JSON-ready dict with keys ``accuracy``, ``accuracy_ci`` (None for metrics
    without it), ``n_errors``, ``n_samples``, ``digits`` (easiest/hardest, see :func:`rank_digits`),
    ``confused_pairs``, ``confused_pairs_within_noise`` (see :func:`confused_pairs_within_noise`), ``overfitting``,
    ``best_validation`` (see :func:`digitlens.history.best_validation`), ``generalisation_gap``,
    ``calibration`` and ``summary`` (a list of one-sentence findings with their numbers).

    ``n_val``, ``n_train_eval``: images behind ``val_accuracy`` and ``train_eval_accuracy`` in the
    history (the run's ``n_val`` and ``train_eval_size``); with them the generalisation gap quotes
    both accuracies with their Wilson intervals (``val_accuracy_ci``, ``train_accuracy_ci``)."""
    if history is not None:
        history = normalise_history(history)
    digits = rank_digits(metrics, k)
    pairs = metrics["most_confused"][:top_pairs]
    overfitting = detect_overfitting(history)
    gap = generalisation_gap(history, metrics)
    _add_gap_intervals(gap, metrics, n_val, n_train_eval)
    calibration = _calibration_insight(metrics)

    def fmt_digit(r):
        return (f"{r['digit']} (F1 {format_ci(r['f1'], r.get('f1_ci'), percent=False, digits=3)}, "
                f"recall {r['recall']:.3f}, n={r['support']})")

    def fmt_pair(p):
        share = format_ci(p["share_of_true"], p.get("share_of_true_ci"), digits=1)
        return f"{p['true']} read as {p['predicted']} ({p['count']}x, {share} of the {p['true']}s)"

    macro = format_ci(metrics["macro"]["f1"], metrics["macro"].get("f1_ci"), percent=False, digits=4)
    summary = [f"Test accuracy {format_ci(metrics['accuracy'], metrics.get('accuracy_ci'))}: "
               f"{metrics['n_errors']:,} errors in {metrics['n_samples']:,} images (macro F1 {macro})"
               + (f"; intervals are 95% (Wilson for accuracy, bootstrap over the test images with "
                  f"{metrics['bootstrap']['n_resamples']:,} resamples for F1)." if "bootstrap" in metrics else ".")]
    if digits["easiest"]:
        for label in ("easiest", "hardest"):
            note = noise_sentence(digits, label)
            summary.append(f"{label.capitalize()} digits: " + ", ".join(fmt_digit(r) for r in digits[label])
                           + (f"; {note}." if note else "."))
    tied_pairs = confused_pairs_within_noise(pairs)
    if pairs:
        note = ""
        if tied_pairs is not None and len(tied_pairs) > 1:
            note = ("; " + _and(f"{pairs[i]['true']}→{pairs[i]['predicted']}" for i in tied_pairs)
                    + " are within noise of each other (count intervals overlap)")
        elif tied_pairs is not None and len(pairs) > 1:
            note = (f"; {pairs[0]['true']}→{pairs[0]['predicted']} is the most frequent beyond noise "
                    f"(its count interval overlaps no other pair's)")
        summary.append("Most confused: " + ", ".join(fmt_pair(p) for p in pairs) + note + ".")
    else:
        summary.append("No confusions: every test image was classified correctly.")
    if overfitting.get("available"):
        if overfitting["diverges"]:
            summary.append(
                f"Overfitting: validation loss diverges from epoch {overfitting['from_epoch']} "
                f"(minimum {overfitting['min_val_loss']:.4f} at epoch {overfitting['best_epoch']}, "
                f"final {overfitting['final_val_loss']:.4f}, {overfitting['final_rise_percent']:+.1f}%): "
                + "; ".join(overfitting["reasons"]) + ".")
        else:
            summary.append(
                f"No overfitting detected over {overfitting['n_epochs']} epochs: validation loss is lowest at "
                f"epoch {overfitting['best_epoch']} ({overfitting['min_val_loss']:.4f}) and ends at "
                f"{overfitting['final_val_loss']:.4f} ({overfitting['final_rise_percent']:+.1f}%).")
    else:
        summary.append(f"Overfitting not assessed: {overfitting['reason']}.")
    if gap.get("accuracy_gap") is not None:
        if gap["compared"] == COMPARED_EVAL:
            head = (f"Generalisation gap at epoch {gap['epoch']} (training images measured like the validation "
                    f"split: end of epoch, eval mode, no augmentation, plain cross-entropy): train accuracy "
                    f"{format_ci(gap['train_accuracy'], gap.get('train_accuracy_ci'))} vs validation "
                    f"{format_ci(gap['val_accuracy'], gap.get('val_accuracy_ci'))}")
            tail = (f", validation minus train loss {gap['loss_gap']:+.4f}." if gap.get("loss_gap") is not None
                    else ".")
        else:
            head = (f"Generalisation gap at epoch {gap['epoch']}: train accuracy {gap['train_accuracy']:.2%} "
                    f"(measured {gap['train_accuracy_measured']}) vs validation "
                    f"{format_ci(gap['val_accuracy'], gap.get('val_accuracy_ci'))}")
            tail = "; losses not compared: " + NOT_COMPARABLE_REASON + "."
        summary.append(f"{head} ({gap['accuracy_gap'] * 100:+.2f} points); test accuracy "
                       f"{format_ci(gap['test_accuracy'], gap.get('test_accuracy_ci'))}"
                       + tail)
    if calibration is not None:
        summary.append(calibration_sentence(calibration))
    return {
        "accuracy": metrics["accuracy"],
        "accuracy_ci": metrics.get("accuracy_ci"),
        "n_errors": metrics["n_errors"],
        "n_samples": metrics["n_samples"],
        "digits": digits,
        "confused_pairs": pairs,
        "confused_pairs_within_noise": tied_pairs,
        "overfitting": overfitting,
        "best_validation": best_validation(history, n_val=n_val, n_train_eval=n_train_eval),
        "generalisation_gap": gap,
        "calibration": calibration,
        "summary": summary,
    }


def render_markdown(insights: dict, title: str = "Insights") -> str:
    """``insights.md``: the summary sentences, then tables of the digits and confused pairs (values
    with their 95% intervals in brackets where the metrics have them)."""
    lines = [f"# {title}", ""]
    lines += [f"- {sentence}" for sentence in insights["summary"]]
    digits = insights["digits"]
    if digits["easiest"]:
        lines += ["", "## Easiest and hardest digits (by F1)", "",
                  "| | digit | F1 | precision | recall | test images |", "|---|---|---|---|---|---|"]
        for label in ("easiest", "hardest"):
            for r in digits[label]:
                cells = [format_ci(r[key], r.get(f"{key}_ci"), percent=False, digits=4)
                         for key in ("f1", "precision", "recall")]
                lines.append(f"| {label} | {r['digit']} | {' | '.join(cells)} | {r['support']} |")
    if insights["confused_pairs"]:
        lines += ["", "## Most-confused pairs", "", "| true | predicted as | count | share of true digit |",
                  "|---|---|---|---|"]
        for p in insights["confused_pairs"]:
            lines.append(f"| {p['true']} | {p['predicted']} | {p['count']} | "
                         f"{format_ci(p['share_of_true'], p.get('share_of_true_ci'))} |")
    overfitting = insights["overfitting"]
    if overfitting.get("available"):
        lines += ["", "## Overfitting", "", f"Rule: {overfitting['rule']}.", ""]
        lines.append(f"Diverges: **{'yes' if overfitting['diverges'] else 'no'}**"
                     + (f", from epoch {overfitting['from_epoch']}" if overfitting["diverges"] else ""))
    lines.append("")
    return "\n".join(lines)


def write_insights(out_dir: str | os.PathLike, metrics: dict, history: Any = None, *, n_val: int | None = None,
                   n_train_eval: int | None = None) -> dict:
    """Derive the insights (:func:`derive_insights`) and write ``insights.json`` and ``insights.md`` into
    ``out_dir``; return them."""
    out_dir = Path(out_dir)
    found = derive_insights(metrics, history, n_val=n_val, n_train_eval=n_train_eval)
    runio.write_json(out_dir / "insights.json", found)
    runio.write_text(out_dir / "insights.md", render_markdown(found))
    return found
