"""Numbers behind the report: per-run summaries and the two-line readings under each figure.

Every reading is computed from the run's own files (history, predictions, stage JSONs); a
reading function returns an empty list when the numbers it needs are not there, never a
canned sentence.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from digitlens.intervals import mean_interval, overlapping, wilson_interval
from digitlens.report.collect import RunData


def pct(value: float | None, digits: int = 1) -> str:
    """``0.9912`` -> ``"99.1%"``; values above 1 are taken as already in percent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    value = float(value)
    return f"{value * 100 if abs(value) <= 1.0 else value:.{digits}f}%"


def num(value: Any, digits: int = 3) -> str:
    """A number for a table cell: ints with thousands separators, floats to ``digits`` places."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** (-digits)):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def dig(obj: Any, *paths: str, default: Any = None) -> Any:
    """The first of several dotted key paths present in nested dicts (``"macro.f1"``)."""
    for path in paths:
        cur = obj
        ok = True
        for key in path.split("."):
            if isinstance(cur, dict) and key in cur:
                cur = cur[key]
            else:
                ok = False
                break
        if ok and cur is not None:
            return cur
    return default


# --------------------------------------------------------------------------- training


def history_summary(run: RunData) -> dict | None:
    """Best epochs and the overfitting point from ``history.csv``; ``None`` without history."""
    rows = run.history
    if not rows:
        return None
    epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(rows)]
    out: dict[str, Any] = {"epochs": len(rows), "last_epoch": epochs[-1]}
    out["seconds"] = sum(r.get("seconds", 0.0) for r in rows) if any("seconds" in r for r in rows) else None
    val_acc = [r.get("val_accuracy") for r in rows]
    if all(v is not None for v in val_acc):
        best = int(np.argmax(val_acc))
        out.update(best_val_accuracy=val_acc[best], best_val_accuracy_epoch=epochs[best],
                   train_accuracy_at_best=rows[best].get("accuracy"), final_val_accuracy=val_acc[-1])
        measured = rows[best].get("train_eval_accuracy")  # training images measured like validation
        if measured is not None and not (isinstance(measured, float) and math.isnan(measured)):
            out["train_eval_accuracy_at_best"] = measured
    val_loss = [r.get("val_loss") for r in rows]
    if all(v is not None for v in val_loss):
        low = int(np.argmin(val_loss))
        out.update(min_val_loss=val_loss[low], min_val_loss_epoch=epochs[low], final_val_loss=val_loss[-1])
        out["val_loss_rise"] = (val_loss[-1] - val_loss[low]) / val_loss[low] if val_loss[low] > 0 else None
    if rows[-1].get("loss") is not None:
        out["final_loss"] = rows[-1]["loss"]
    if rows[-1].get("accuracy") is not None:
        out["final_accuracy"] = rows[-1]["accuracy"]
    return out


def pct_ci(value: float | None, ci: Any, digits: int = 2) -> str:
    """A percentage with its 95% interval in a sentence (``"99.37% (95% interval 99.19-99.51%)"``);
    the bare percentage without an interval. Tables use :func:`digitlens.intervals.format_ci`."""
    return pct(value, digits) + interval(ci, digits)


def wilson_text(share: float | None, n: Any, digits: int = 2) -> str:
    """A share of ``n`` items with its 95% Wilson interval (``"99.37% (95% interval 99.19-99.51%)"``);
    the bare percentage when ``n`` is unknown."""
    if share is None or not isinstance(n, (int, np.integer)) or n <= 0:
        return pct(share, digits)
    return pct_ci(share, wilson_interval(round(float(share) * int(n)), int(n)).tolist(), digits)


def reading_training(run: RunData) -> list[str]:
    h = history_summary(run)
    if not h:
        return []
    lines = []
    n_val = run.config.get("n_val")
    if "best_val_accuracy" in h:
        line = (f"Validation accuracy peaked at {wilson_text(h['best_val_accuracy'], n_val)} in epoch "
                f"{h['best_val_accuracy_epoch']}")
        n_train_eval = run.config.get("train_eval_size")
        if h.get("train_eval_accuracy_at_best") is not None:
            line += (f" (accuracy on {n_train_eval:,} training images measured the same way then "
                     f"{wilson_text(h['train_eval_accuracy_at_best'], n_train_eval)})"
                     if isinstance(n_train_eval, int) else
                     f" (training images measured the same way then {pct(h['train_eval_accuracy_at_best'], 2)})")
        elif h.get("train_accuracy_at_best") is not None:  # older runs: only Keras' in-epoch running mean
            line += f" (training accuracy then {pct(h['train_accuracy_at_best'], 2)}, measured during the epoch)"
        line += f" and ended at {wilson_text(h['final_val_accuracy'], n_val)} after {h['epochs']} epochs."
        lines.append(line)
    if "min_val_loss" in h:
        rise = h.get("val_loss_rise") or 0.0
        if h["min_val_loss_epoch"] < h["last_epoch"] and rise > 0.02:
            lines.append(f"Validation loss was lowest in epoch {h['min_val_loss_epoch']} ({h['min_val_loss']:.4f}) and "
                         f"rose {rise * 100:.0f}% by the last epoch: the model started to overfit.")
        else:
            lines.append(f"Validation loss was lowest in epoch {h['min_val_loss_epoch']} ({h['min_val_loss']:.4f}) and did "
                         f"not rise after it by more than 2%: no sign of overfitting.")
    if h.get("seconds"):
        lines[-1:] = [lines[-1] + f" Training took {h['seconds']:.1f} s."] if lines else [f"Training took {h['seconds']:.1f} s."]
    return lines


# --------------------------------------------------------------------------- evaluation


def prediction_summary(run: RunData) -> dict | None:
    """Accuracy, per-digit scores (scikit-learn), confusion and mistakes from ``predictions.npz``; mean
    confidences (all, right, wrong) with their Student-t intervals (``*_ci``)."""
    pred = run.predictions
    if not pred or "y_true" not in pred or "y_pred" not in pred:
        return None
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(pred["y_true"]).astype(int)
    y_pred = np.asarray(pred["y_pred"]).astype(int)
    n_classes = int(run.config.get("n_classes", max(y_true.max(), y_pred.max()) + 1))
    labels = list(range(n_classes))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pair = np.unravel_index(int(np.argmax(off)), off.shape)
    out = {
        "n": int(y_true.size), "correct": int((y_true == y_pred).sum()), "accuracy": float((y_true == y_pred).mean()),
        "labels": labels, "confusion": cm, "precision": precision, "recall": recall, "f1": f1, "support": support,
        # one-vs-rest accuracy of "is it digit d?": (TP + TN) / N
        "per_digit_accuracy": (y_true.size - (cm.sum(0) - np.diag(cm)) - (cm.sum(1) - np.diag(cm))) / y_true.size,
        "most_confused": (int(pair[0]), int(pair[1]), int(off[pair])) if off.max() > 0 else None,
    }
    proba = pred.get("proba")
    if proba is not None and proba.ndim == 2 and proba.shape[0] == y_true.size:
        conf = proba.max(1)
        out["mean_confidence"] = float(conf.mean())
        out["mean_confidence_ci"] = mean_interval(conf, bounds=(0.0, 1.0)).tolist()
        wrong = np.flatnonzero(y_true != y_pred)
        if wrong.size:
            worst = wrong[np.argmax(conf[wrong])]
            out["worst_mistake"] = (int(y_true[worst]), int(y_pred[worst]), float(conf[worst]))
            out["mean_confidence_wrong"] = float(conf[wrong].mean())
            out["mean_confidence_wrong_ci"] = mean_interval(conf[wrong], bounds=(0.0, 1.0)).tolist()
        right = np.flatnonzero(y_true == y_pred)
        if right.size:
            out["mean_confidence_right"] = float(conf[right].mean())
            out["mean_confidence_right_ci"] = mean_interval(conf[right], bounds=(0.0, 1.0)).tolist()
    return out


def ece_of(run: RunData) -> float | None:
    value = dig(run.metrics or {}, "ece", "expected_calibration_error", "calibration.ece")
    return float(value) if isinstance(value, (int, float)) else None


def temperature_scaling_of(run: RunData) -> dict | None:
    """``temperature``, ``ece_calibrated`` and ``split`` from ``metrics.json`` when evaluate fitted a
    temperature; ``{"note": ...}`` when it recorded why it did not; None for older runs."""
    metrics = run.metrics or {}
    t, ece = metrics.get("temperature"), metrics.get("ece_calibrated")
    if isinstance(t, (int, float)) and isinstance(ece, (int, float)):
        return {"temperature": float(t), "ece_calibrated": float(ece),
                "split": dig(metrics, "temperature_fit.split", default="val")}
    note = metrics.get("calibration_note")
    return {"note": str(note)} if note else None


def metrics_of(run: RunData, p: dict | None) -> dict:
    """``metrics.json`` when it describes the same predictions as ``p`` (same image count and
    accuracy), else an empty dict: its intervals are then quoted beside the numbers."""
    metrics = run.metrics or {}
    if not p or metrics.get("n_samples") != p["n"] or not isinstance(metrics.get("accuracy"), (int, float)):
        return {}
    return metrics if abs(metrics["accuracy"] - p["accuracy"]) < 1e-9 else {}


def interval(ci: Any, digits: int = 2, percent: bool = True) -> str:
    """``" (95% interval 99.13-99.45%)"`` for a [low, high] pair, ``""`` without one."""
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci)):
        return ""
    if percent:
        return f" (95% interval {ci[0] * 100:.{digits}f}-{ci[1] * 100:.{digits}f}%)"
    return f" (95% interval {ci[0]:.{digits}f}-{ci[1]:.{digits}f})"


def accuracy_text(run: RunData, p: dict) -> str:
    """The test accuracy in percent with its Wilson interval (``metrics.json``'s, else from the counts)."""
    ci = metrics_of(run, p).get("accuracy_ci") or wilson_interval(p["correct"], p["n"]).tolist()
    return pct_ci(p["accuracy"], ci)


def reading_confusion(run: RunData) -> list[str]:
    p = prediction_summary(run)
    if not p:
        return []
    lines = [f"{p['correct']:,} of {p['n']:,} test images are classified correctly, {accuracy_text(run, p)}; "
             f"the {p['n'] - p['correct']:,} mistakes are the off-diagonal cells."]
    if p["most_confused"]:
        t, q, c = p["most_confused"]
        lines.append(f"The most frequent confusion is a true {t} read as {q} ({c} image{'s' if c != 1 else ''}, "
                     f"{wilson_text(c / max(p['support'][t], 1), int(p['support'][t]), 1)} of the {t}s).")
    else:
        lines.append("There is no confusion at all: every test image lies on the diagonal.")
    return lines


def f1_ties(run: RunData, p: dict) -> tuple[dict, list[int] | None, list[int] | None]:
    """(digit -> F1 bootstrap interval from ``metrics.json``, the digits whose F1 interval overlaps
    that of the lowest F1 (it first), those overlapping the highest (it first)); the lists are None
    without an interval for every digit."""
    f1 = p["f1"]
    rows = metrics_of(run, p).get("per_digit") or []
    ci = {r["digit"]: r.get("f1_ci") for r in rows if isinstance(r, dict) and "digit" in r}
    if not (len(ci) == len(f1) and all(ci.values())):
        return ci, None, None

    def tied(hardest_first: bool) -> list[int]:
        order = sorted(ci, key=lambda x: (f1[x], x) if hardest_first else (-f1[x], x))
        return [order[i] for i in overlapping([ci[x] for x in order])]

    return ci, tied(True), tied(False)


def reading_per_digit(run: RunData) -> list[str]:
    """The lowest and highest F1; a "hardest" or "easiest" digit is named only when its bootstrap F1
    interval overlaps no other digit's (without intervals, only the lowest and highest F1)."""
    p = prediction_summary(run)
    if not p:
        return []
    f1 = p["f1"]
    hard, easy = int(np.argmin(f1)), int(np.argmax(f1))
    ci, tied_hard, tied_easy = f1_ties(run, p)
    known = tied_hard is not None
    hard_f1 = (f"F1 {f1[hard]:.3f}{interval(ci.get(hard), 3, False)}, precision {p['precision'][hard]:.3f}, "
               f"recall {p['recall'][hard]:.3f}")
    easy_f1 = f"F1 {f1[easy]:.3f}{interval(ci.get(easy), 3, False)}"
    if not known:
        line = (f"Lowest F1: digit {hard} ({hard_f1}); highest: digit {easy} ({easy_f1}); without bootstrap "
                f"intervals (evaluate the run again) no digit is called hardest or easiest")
    else:
        if len(tied_hard) == len(tied_easy) == len(f1) > 2:
            line = (f"Lowest F1: digit {hard} ({hard_f1}); highest: digit {easy} ({easy_f1}); but every digit's F1 "
                    f"interval overlaps both, so the test set ranks no digit hardest or easiest")
        else:
            if len(tied_hard) == 1:
                line = f"Hardest digit: {hard} ({hard_f1}); its F1 interval overlaps no other digit's"
            else:
                line = (f"Lowest F1: digit {hard} ({hard_f1}); but the F1 intervals of digits "
                        f"{', '.join(map(str, tied_hard))} overlap {hard}'s, so the test set does not single out "
                        f"the hardest digit")
            if len(tied_easy) == 1:
                line += f"; easiest: {easy} ({easy_f1}), beyond noise"
            else:
                line += (f"; highest F1: digit {easy} ({easy_f1}), within noise of digit"
                         f"{'s' if len(tied_easy) > 2 else ''} {', '.join(map(str, tied_easy[1:]))}")
    lines = [line + "."]
    low_recall = int(np.argmin(p["recall"]))
    lines.append(f"Lowest recall is for {low_recall} ({p['recall'][low_recall]:.3f}: "
                 f"{int(p['support'][low_recall] - p['confusion'][low_recall, low_recall])} of its {int(p['support'][low_recall])} "
                 f"images missed); F1 spreads over {f1.max() - f1.min():.3f} between digits.")
    return lines


def reading_groups(run: RunData) -> list[str]:
    """Mean precision and recall per digit group (the groups of ``evaluate.DEFAULT_DIGIT_GROUPS``)."""
    from digitlens.evaluate import DEFAULT_DIGIT_GROUPS

    p = prediction_summary(run)
    if not p:
        return []
    parts = []
    for group in DEFAULT_DIGIT_GROUPS:
        g = [d for d in group if d < len(p["labels"])]
        worst = min(g, key=lambda d: p["recall"][d])
        parts.append(f"digits {', '.join(map(str, g))}: mean precision {np.mean(p['precision'][g]):.3f}, "
                     f"mean recall {np.mean(p['recall'][g]):.3f} (lowest recall {worst}: {p['recall'][worst]:.3f})")
    return [f"Group {i + 1}, {part}." for i, part in enumerate(parts)]


def reading_reliability(run: RunData) -> list[str]:
    p = prediction_summary(run)
    ece = ece_of(run)
    lines = []
    scaling = temperature_scaling_of(run)
    metrics = run.metrics or {}
    if ece is not None:
        line = (f"Expected calibration error is {ece:.4f}{interval(metrics.get('ece_ci'), 4, False)}: on average, "
                f"confidence and accuracy differ by {ece * 100:.2f} points")
        if scaling and "temperature" in scaling:
            split = "validation" if scaling["split"] == "val" else scaling["split"]
            line += (f"; temperature scaling fitted on the {split} split (T = {scaling['temperature']:.3g}) "
                     f"brings it to {scaling['ece_calibrated']:.4f}"
                     f"{interval(metrics.get('ece_calibrated_ci'), 4, False)}.")
        elif scaling:
            line += f" ({scaling['note']})."
        else:
            line += "."
        lines.append(line)
    if p and "mean_confidence" in p:
        gap = p["mean_confidence"] - p["accuracy"]
        lines.append(f"Mean confidence {pct_ci(p['mean_confidence'], p['mean_confidence_ci'])} against accuracy "
                     f"{accuracy_text(run, p)}: "
                     f"the model is {'over' if gap > 0 else 'under'}confident by {abs(gap) * 100:.2f} points overall.")
    return lines


def reading_predictions(run: RunData) -> list[str]:
    p = prediction_summary(run)
    if not p or "mean_confidence" not in p:
        return reading_confusion(run)[:1]
    lines = [f"Correct predictions carry a mean confidence of "
             f"{pct_ci(p.get('mean_confidence_right'), p.get('mean_confidence_right_ci'), 1)}"
             + (f", mistakes {pct_ci(p['mean_confidence_wrong'], p['mean_confidence_wrong_ci'], 1)}."
                if "mean_confidence_wrong" in p else ".")]
    lines.append(f"Accuracy over the whole test split is {accuracy_text(run, p)} ({p['correct']:,} of {p['n']:,}).")
    return lines


def reading_misclassified(run: RunData) -> list[str]:
    p = prediction_summary(run)
    if not p:
        return []
    wrong = p["n"] - p["correct"]
    if not wrong:
        return ["No test image is misclassified."]
    lines = [f"{wrong:,} test images ({wilson_text(wrong / p['n'], p['n'])}) are misclassified, most confident first."]
    if "worst_mistake" in p:
        t, q, c = p["worst_mistake"]
        lines.append(f"The most confident mistake reads a {t} as {q} with {pct(c, 1)} confidence.")
    return lines


# --------------------------------------------------------------------------- explanations


def faithfulness_of(run: RunData) -> dict | None:
    """``explain_metrics.json``'s faithfulness block: ``methods`` (name -> AUCs...), ``ranking``."""
    block = dig(run.explain_metrics or {}, "faithfulness")
    return block if isinstance(block, dict) and isinstance(block.get("methods"), dict) else None


def label(method: str) -> str:
    return method.replace("_", " ")


def method_of(stem: str, run: RunData) -> str | None:
    """The explanation method a figure name refers to (longest known method name in ``stem``)."""
    methods = dig(run.explain_metrics or {}, "methods", default=[]) or []
    found = [m for m in methods if m in stem]
    return max(found, key=len) if found else None


def reading_faithfulness(run: RunData, stem: str = "") -> list[str]:
    """The explain stage's verdict as it wrote it (``most_faithful``, ``ranking``, each method's
    ``reasons``), and the ROAD scores against the ink-first random baseline."""
    f = faithfulness_of(run)
    if not f:
        return []
    rows = {m: v for m, v in f["methods"].items() if m not in ("random", "ink_random")}
    ranking = f.get("ranking") or list(rows)
    if "most_faithful" not in f:  # explained before the verdict existed: the old deletion/insertion ranking
        best = ranking[0]
        return [f"Ranked by insertion − deletion (patches set to 0), {label(best)} comes first "
                f"({rows[best]['insertion_minus_deletion']:.3f}); this run predates the ROAD and sanity-check verdict: "
                f"run `digitlens explain` again for it."]
    from digitlens.explain.verdict import checks_passed  # the verdict's own words (imports torch: only here)

    best = f["most_faithful"]
    ink = f["methods"].get("ink_random", {})
    if best:
        line = (f"Most faithful: {label(best)}, ROAD score (LeRF − MoRF AUC) {rows[best]['road_score']:.3f}; it passes "
                f"{checks_passed(rows[best])}")
        margin = f.get("margin") or {}
        if margin.get("within_noise"):
            lo, hi = margin["difference_ci"]
            line += (f"; {label(margin['runner_up'])} is within noise of it (difference {margin['difference']:.3f}, "
                     f"95% interval {lo:.3f} to {hi:.3f})")
        if "road_morf_auc" in ink:
            beats = rows[best].get("beats_ink_random")
            line += (f". Removing its most relevant patches first {'hurts the prediction more than' if beats else 'hurts the prediction no more than'} "
                     f"removing ink patches in random order (ROAD MoRF AUC {rows[best]['road_morf_auc']:.3f} against "
                     f"{ink['road_morf_auc']:.3f})" + ("" if beats else ", so its maps localise the evidence no better than the ink does"))
    else:
        line = ("No method passes both sanity checks (randomisation and random logit), so none is called most faithful"
                if "randomisation_note" not in f else
                "No method passes the random-logit check (the randomisation check needs re-initialisable PyTorch "
                "layers), so none is called most faithful")
    lines = [line + f"; over {f.get('n_images', '?')} test images."]
    failing = [m for m in ranking if rows[m].get("reasons")]
    if failing:
        lines.append(" ".join(f"{label(m).capitalize()} is not trusted: {rows[m]['reasons'][0]}." for m in failing[:2])
                     + (f" ({len(failing) - 2} more in the table.)" if len(failing) > 2 else ""))
    return lines


def map_stats(run: RunData, method: str) -> dict | None:
    """Concentration of the saved per-digit maps of ``method`` (``explain/maps_<method>.npz``);
    groups without mass (all-NaN maps) are left out and listed in ``empty``."""
    path = run.run_dir / "explain" / f"maps_{method}.npz"
    if not path.is_file():
        return None
    from digitlens.runio import read_npz

    data = read_npz(path)
    maps = data.get("maps")
    if maps is None or maps.ndim != 3:
        return None
    names = [str(n) for n in data.get("group_names", np.arange(len(maps)))]
    ok = np.isfinite(maps).all(axis=(1, 2)) & (np.nan_to_num(maps).sum(axis=(1, 2)) > 0)
    empty = [n for n, good in zip(names, ok) if not good]
    if not ok.any():
        return {"empty": empty, "names": names}
    flat = maps[ok].reshape(int(ok.sum()), -1)
    k = max(1, flat.shape[1] // 10)
    top = np.sort(flat, axis=1)[:, ::-1][:, :k].sum(1) / flat.sum(1)
    mean_map = maps[ok].mean(0)
    r, c = np.unravel_index(int(np.argmax(mean_map)), mean_map.shape)
    return {"top_share": top, "k": k, "cells": flat.shape[1], "peak": (int(r), int(c)), "grid": maps.shape[1:],
            "empty": empty, "names": [n for n, good in zip(names, ok) if good]}


def reading_heatmap(run: RunData, stem: str = "") -> list[str]:
    method = method_of(stem, run)
    if method is None:
        return []
    lines = []
    f = faithfulness_of(run)
    if f and method in f["methods"]:
        row = f["methods"][method]
        ranking = f.get("ranking") or []
        position = f"ranks {ranking.index(method) + 1} of {len(ranking)}" if method in ranking else "is not ranked"
        if "road_score" in row:
            line = f"{label(method).capitalize()} {position} for faithfulness (ROAD score {row['road_score']:.3f})"
            line += ((": it passes both sanity checks." if "passes_sanity_check" in row else
                      ": it passes the random-logit check.") if row.get("eligible") else
                     f"; not trusted: {row['reasons'][0]}." if row.get("reasons") else ".")
        else:
            line = (f"{label(method).capitalize()} {position} for faithfulness (insertion − deletion "
                    f"{row['insertion_minus_deletion']:.3f}).")
        lines.append(line)
    rings = dig(run.explain_metrics or {}, "outer_ring_share", default={}) or {}
    names = dig(run.explain_metrics or {}, "group_names", default=[]) or []
    shares = [(n, v) for n, v in zip(names, rings.get(method) or []) if v is not None]
    ink = [v for v in rings.get("ink") or [] if v is not None]
    if shares and ink:
        worst = max(shares, key=lambda item: item[1])
        lines.append(f"On the outer ring of patches, where the digits hold {min(ink) * 100:.0f}-{max(ink) * 100:.0f}% of "
                     f"their ink, {label(method)} puts {min(v for _, v in shares) * 100:.0f}-{worst[1] * 100:.0f}% of its "
                     f"map (most for digit {worst[0]}).")
    st = map_stats(run, method)
    if st and st.get("empty"):
        lines.append(f"No map for digit{'s' if len(st['empty']) > 1 else ''} {', '.join(st['empty'])}: "
                     f"{label(method)} gives zero attribution on every such image (or there are none), "
                     f"so that panel is hatched rather than drawn as a distribution.")
    if st and "top_share" in st:
        t = st["top_share"]
        hi, lo = int(np.argmax(t)), int(np.argmin(t))
        lines.append(f"The top {st['k']} of {st['cells']} patches hold {t[hi] * 100:.0f}% of the attribution for digit "
                     f"{st['names'][hi]} (most focused) and {t[lo] * 100:.0f}% for digit {st['names'][lo]} (most spread); "
                     f"averaged over digits the strongest patch is row {st['peak'][0]}, column {st['peak'][1]}.")
    return lines


def reading_heatmap_compare(run: RunData, stem: str = "") -> list[str]:
    return reading_heatmap(run, stem)[:1] or reading_faithfulness(run)[:1]


def reading_filters(run: RunData, stem: str = "") -> list[str]:
    """Norms of the first-layer kernels (the 4-D weight with one input channel) from the weights."""
    path = run.run_dir / "model.safetensors"
    if not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        names = [n for n in fh.keys() if n.endswith("weight") and len(fh.get_slice(n).get_shape()) == 4
                 and fh.get_slice(n).get_shape()[1] == 1]
        if not names:
            return []
        preferred = [n for n in ("patch_embed.proj.weight", "patch_embed.weight") if n in names]
        name = preferred[0] if preferred else sorted(names)[0]
        w = fh.get_tensor(name).astype(np.float64)
    norms = np.sqrt((w.reshape(w.shape[0], -1) ** 2).sum(1))
    flat = int((norms < 0.1 * norms.max()).sum())
    lines = [f"The first layer ({name}) has {w.shape[0]} kernels of {w.shape[2]}×{w.shape[3]} pixels; their norms range "
             f"from {norms.min():.2f} to {norms.max():.2f} (median {np.median(norms):.2f})."]
    lines.append(f"{flat} kernel{'s are' if flat != 1 else ' is'} nearly flat (norm under 10% of the largest)"
                 + (": the layer has spare capacity." if flat else ": every kernel is in use."))
    return lines


def reading_overlay(run: RunData, stem: str = "") -> list[str]:
    lines = reading_predictions(run)
    method = method_of(stem, run)
    return ([f"Heatmaps by {label(method)}."] if method else []) + lines[:1]


def reading_overlay_mis(run: RunData, stem: str = "") -> list[str]:
    return reading_misclassified(run)


# --------------------------------------------------------------------------- LoRA study


def lora_summary(run: RunData, task: str | None = None) -> tuple[str, dict] | None:
    if not run.adapt_results:
        return None
    task = task if task in run.adapt_results else next(iter(run.adapt_results))
    return task, run.adapt_results[task]


def reading_adapt(run: RunData, stem: str = "") -> list[str]:
    task = next((t for t in run.adapt_results if f"adapt/{t}/" in stem), None)
    found = lora_summary(run, task)
    if not found:
        return []
    task, res = found
    rows = res.get("summary") or []
    lora = [r for r in rows if r.get("method") == "lora"]
    if not lora:
        return []
    if stem.endswith("training_curves"):
        return _convergence_lines(res)
    m = re.search(r"_r(\d+)$", stem)
    if m and isinstance(res.get("per_digit"), dict):
        key = next((k for k in res["per_digit"] if k.startswith(f"lora_r{m.group(1)}_")), None)
        if key:
            pd = res["per_digit"][key]
            rec = np.asarray(pd["recall"])
            prec = np.asarray(pd["precision"])
            lo, plo = int(np.argmin(rec)), int(np.argmin(prec))
            return [f"With r = {m.group(1)}, the digit put least often into its own group is {pd['digit'][lo]} "
                    f"(recall {rec[lo]:.3f}); the group that others leak into most is that of {pd['digit'][plo]} "
                    f"(precision {prec[plo]:.3f}).",
                    f"Recall ranges from {rec.min():.3f} to {rec.max():.3f} over the ten digits."]
    small = min(lora, key=lambda r: r["rank"])
    n_test = res.get("n_test")  # each accuracy (a mean over seeds) with the Wilson interval of that many images
    line = (f"On task “{task}”, LoRA r = {small['rank']} reaches {wilson_text(small['accuracy_mean'], n_test)} with "
            f"{small['trainable_params']:,} trainable parameters ({small['trainable_fraction'] * 100:.2f}% of the model); "
            + rank_sentence(run, task, res, lora))
    others = {r["method"]: r for r in rows if r.get("method") in ("head_only", "full")}
    second = ", ".join(f"{'head only' if k == 'head_only' else 'full fine-tuning'} "
                       f"{wilson_text(v['accuracy_mean'], n_test)} ({v['trainable_params']:,} parameters)"
                       for k, v in others.items())
    verdict = (res.get("verdict") or {}).get("sentence")
    return [line] + ([f"Baselines: {second}."] if second else []) + ([verdict] if verdict else [])


def _convergence_lines(res: dict) -> list[str]:
    """Whether the study's models converged: how many stopped early (validation accuracy flat for
    ``patience`` epochs) and the epochs they used."""
    rows = [r for r in res.get("rows", []) if "epochs_run" in r]
    if not rows:
        return []
    early = [r for r in rows if r.get("stopped_early")]
    lines = [f"{len(early)} of {len(rows)} models stopped early (no better validation accuracy for "
             f"{res.get('patience')} epochs) after {min(r['epochs_run'] for r in rows)}-{max(r['epochs_run'] for r in rows)} "
             f"of at most {res.get('epochs')} epochs; each keeps its best epoch's weights."]
    late = [r for r in rows if r["best_epoch"] == r["epochs_run"] and not r.get("stopped_early")]
    if late:
        lines.append(f"{len(late)} model{'s' if len(late) != 1 else ''} still improved in the last epoch "
                     f"({', '.join(sorted({_method_name(r) for r in late}))}); the schedule's learning rate had "
                     "decayed to ~0 there, so more epochs would change little.")
    return lines


def _method_name(row: dict) -> str:
    return {"lora": f"LoRA r = {row.get('rank')}", "head_only": "head only", "full": "full fine-tuning"}.get(
        row.get("method"), str(row.get("method")))


def rank_sentence(run: RunData, task: str, res: dict, lora: list[dict]) -> str:
    """The paired test of the LoRA ranks (``rank_comparison`` in ``results.json``, or computed from the
    task's ``predictions.npz`` for results written before it existed); without predictions, the highest
    mean accuracy marked as untested, never a "best rank"."""
    found = res.get("rank_comparison")
    if not found and len(lora) > 1:
        path = run.run_dir / "adapt" / task / "predictions.npz"
        seeds, ranks = res.get("seeds"), [r["rank"] for r in lora]
        if path.is_file() and seeds:
            from digitlens.adapt import rank_comparison
            from digitlens.runio import read_npz

            preds = read_npz(path)
            if all(f"lora_r{r}_s{s}" in preds for r in ranks for s in seeds):
                found = rank_comparison(preds["y_true"], preds, ranks, seeds)
    if found:
        return found["sentence"]
    if len(lora) < 2:
        return "only one rank was trained."
    top = max(lora, key=lambda r: r["accuracy_mean"])
    return (f"r = {top['rank']} has the highest mean accuracy ({wilson_text(top['accuracy_mean'], res.get('n_test'))}), "
            "untested: the task's predictions.npz is missing, so no rank is called best.")


def _subspace_summary(run: RunData, stem: str) -> dict | None:
    for rel, js in run.subspace.items():
        if isinstance(js, dict) and "modules" in js and (Path(rel).parent.name in stem or len(run.subspace) == 1):
            return js
    return next((js for js in run.subspace.values() if isinstance(js, dict) and "modules" in js), None)


def _above_chance(entries: list[dict], label: str = "k_k") -> str:
    """'above chance: yes (p = 0.001)' for one module; 'above chance in m of n modules (p < 0.05)'
    for several; '' when the entries carry no test."""
    tested = [e for e in entries if f"p_{label}" in e]
    if not tested:
        return ""
    if len(tested) == 1:
        e = tested[0]
        return f"above chance: {'yes' if e[f'above_chance_{label}'] else 'no'} (p = {e[f'p_{label}']:.2g})"
    hits = sum(bool(e[f"above_chance_{label}"]) for e in tested)
    return (f"above chance in {hits} of {len(tested)} modules (p < 0.05; "
            f"median p = {np.median([e[f'p_{label}'] for e in tested]):.2g})")


def _phi_line(entries: list[dict], corrected: bool) -> str:
    """Mean phi at i = j = k over modules (raw or chance-corrected) with the chance level and the
    Monte-Carlo verdict."""
    verdict = _above_chance(entries)
    verdict = f", {verdict}" if verdict else ""
    if corrected:
        return f"corrected {np.mean([e['corrected_k_k'] for e in entries]):+.3f}{verdict}"
    return (f"{np.mean([e['phi_k_k'] for e in entries]):.3f} (chance {np.mean([e['chance_k_k'] for e in entries]):.3f}"
            f"{verdict})")


def _why_nothing(run: RunData, task: str | None) -> str:
    """Why adapters may share nothing beyond chance, from the task's accuracies: the base already
    solves the task (LoRA no better than the head alone), or the change is spread over many
    directions."""
    res = run.adapt_results.get(task or "") or {}
    rows = {(r.get("method"), r.get("rank")): r.get("accuracy_mean") for r in res.get("summary", [])}
    lora = [v for (m, _), v in rows.items() if m == "lora" and v is not None]
    head = rows.get(("head_only", 0))
    if lora and head is not None and max(lora) <= head:
        return (f"LoRA is no better than training the head alone ({pct(max(lora))} against {pct(head)}): the base's "
                "features already solve this task, so ΔW has no consistent direction to learn.")
    return ("the adapters gain accuracy but not along one shared direction: the change is spread over many "
            "directions (or these adapters are too small a change to stand out of the null).")


def reading_subspace(run: RunData, stem: str = "") -> list[str]:
    js = _subspace_summary(run, stem)
    if not js:
        return []
    modules = js["modules"]
    name = stem.rsplit("/", 1)[-1]
    corrected = name.endswith("_corrected")
    base = name[: -len("_corrected")] if corrected else name
    what = "chance-corrected phi" if corrected else "phi"
    picked = None
    if base.startswith("phi_W_vs_A__"):
        proj = base[len("phi_W_vs_A__"):]
        picked = [m for m in modules if m["module"].replace(".", "_").endswith(proj)]
    elif base.startswith("phi_W_vs_A"):   # the seed-003 figure: the first q projection, as in the paper
        picked = [next((m for m in modules if m["module"].endswith(".q")), modules[0])]
    if picked:
        ranks = sorted({a["rank"] for m in picked for a in m.get("adapters", [])})
        parts = []
        for r in ranks:
            entries = [a["phi_W_A"] for m in picked for a in m["adapters"] if a["rank"] == r and "phi_W_A" in a]
            if entries:
                parts.append(f"r = {r}: {_phi_line(entries, corrected)}")
        rnd = [m["phi_W_random"] for m in picked if isinstance(m.get("phi_W_random"), dict)]
        where = picked[0]["module"] if len(picked) == 1 else f"{len(picked)} modules (mean)"
        lines = [f"{where}, {what} between W's and A's top-k directions at i = j = k: " + "; ".join(parts) + "."]
        if rnd:
            lines.append(f"A random Gaussian A gives {_phi_line(rnd, corrected)}: an adapter above that line "
                         "shares directions with W beyond chance.")
        return lines
    m = re.match(r"phi_(rank|seed)(\d+)_vs_(?:rank|seed)(\d+)(?:_rank(\d+))?$", base)
    if m:
        kind = "ranks" if m.group(1) == "rank" else "seeds"
        comps = [c for c in js.get("comparisons", []) if c.get("kind") == kind
                 and (kind == "ranks" or f"A_r={m.group(4)} " in c.get("title", ""))]
        if comps:
            entries = comps[0]["modules"]
            top = f" ({_above_chance(entries, '1_1')})" if _above_chance(entries, "1_1") else ""
            first = (f"{comps[0]['title']}: top direction phi(1, 1) = {np.mean([e['phi_1_1'] for e in entries]):.3f} "
                     f"against chance {np.mean([e['chance_1_1'] for e in entries]):.3f}, averaged over {len(entries)} "
                     f"modules{top}.")
            return [first, f"At i = j = k: {_phi_line(entries, corrected)}.", _phi_finding(run, js, kind, m, entries)]
        return []
    by_rank = js.get("amplification_by_rank") or []
    if by_rank and "amplification" in name:
        return _amplification_lines(by_rank)
    amps: dict[int, list[float]] = {}
    eff: dict[int, list[float]] = {}
    for mod in modules:
        for a in mod.get("adapters", []):
            value = (a.get("amplification") or {}).get("amplification")
            if isinstance(value, (int, float)) and math.isfinite(value) and not by_rank:  # else: with verdicts above
                amps.setdefault(a["rank"], []).append(value)
            if isinstance(a.get("effective_rank"), (int, float)):
                eff.setdefault(a["rank"], []).append(a["effective_rank"])
    lines = []
    if amps:
        lines.append("Mean amplification factor ‖ΔW‖ / ‖UᵀWVᵀ‖ per rank: "
                     + ", ".join(f"r = {r}: {np.mean(v):.2f}" for r, v in sorted(amps.items())) + ".")
    if eff:
        lines.append("Mean effective rank of ΔW: " + ", ".join(f"{np.mean(v):.1f} of r = {r}" for r, v in sorted(eff.items()))
                     + f", over {len(modules)} modules.")
    return lines


def _phi_finding(run: RunData, js: dict, kind: str, m, entries: list[dict]) -> str:
    """What the comparison found: a shared top direction (most modules above chance at (1, 1)), or
    nothing above chance, and why."""
    tested = [e for e in entries if "p_1_1" in e]
    if not tested:
        return ""
    hits = sum(bool(e["above_chance_1_1"]) for e in tested)
    phi_top = np.mean([e["phi_1_1"] for e in tested])
    chance = np.mean([e["chance_1_1"] for e in tested])
    who = (f"r = {m.group(2)} and r = {m.group(3)}" if kind == "ranks"
           else f"seeds {m.group(2)} and {m.group(3)} at r = {m.group(4)}")
    if hits * 2 > len(tested):
        like = ("a low-rank change carries most of the adaptation, as in the paper's Figure 3" if kind == "ranks"
                else "different random starts find the same top direction, as in the paper's Figure 4")
        return (f"{who} share their top direction in {hits} of {len(tested)} modules (mean phi {phi_top:.2f}, "
                f"chance {chance:.3f}): {like}.")
    return (f"{who} share no top direction beyond chance in most modules ({hits} of {len(tested)} above chance; "
            f"mean phi {phi_top:.3f}, chance {chance:.3f}): {_why_nothing(run, js.get('task'))}")


def _amplification_lines(by_rank: list[dict]) -> list[str]:
    """The amplification factor per rank (first target named like a query, else the first target),
    mean ± std over seeds, with random directions' factor, the chance verdict and the paper's value."""
    targets = list(dict.fromkeys(r["target"] for r in by_rank))
    target = next((t for t in targets if t.lower() in ("q", "q_proj", "query", "wq")), targets[0])
    rows = [r for r in by_rank if r["target"] == target]
    parts = []
    for r in rows:
        paper = f"; GPT-3 W_q in the paper: {r['paper']:g}" if r.get("paper") is not None else ""
        spread = (f"{r['mean']:.2f} ± {r['std']:.2f} over {len(r['seeds'])} seeds" if len(r["seeds"]) > 1
                  else f"{r['mean']:.2f} (1 seed, no spread)")
        parts.append(f"r = {r['rank']}: {spread} (random directions {r['random_mean']:.2f}{paper})")
    hits, tests = sum(r["above_chance"] for r in rows), sum(r["n_tests"] for r in rows)
    lines = [f"Amplification factor ‖ΔW‖ / ‖UᵀWVᵀ‖ of the {target} projections: " + "; ".join(parts) + "."]
    if hits * 2 > tests:
        below = all(r["mean"] < r["random_mean"] for r in rows)
        verdict = ("ΔW's top directions carry more of W than random directions (the paper: 'ΔW has a stronger "
                   "correlation with W than a random matrix')"
                   + ("; every factor is below that of random directions, so ΔW mostly strengthens directions W "
                      "already carries, whereas in GPT-3 (21.5 at r = 4) it amplified directions W leaves weak"
                      if below else ""))
    else:
        verdict = ("ΔW's top directions carry no more of W than random directions, so the factor is about what random "
                   "directions give")
    lines.append(f"Above chance in {hits} of {tests} module-seed pairs (p < 0.05): {verdict}.")
    return lines


# --------------------------------------------------------------------------- registry

Reading = Callable[[RunData], list]

READINGS: dict[str, Reading] = {
    "training": reading_training,
    "confusion": reading_confusion,
    "per_digit": reading_per_digit,
    "per_digit_groups": reading_groups,
    "reliability": reading_reliability,
    "predictions": reading_predictions,
    "misclassified": reading_misclassified,
    "faithfulness": reading_faithfulness,
    "heatmap": reading_heatmap,
    "heatmap_compare": reading_heatmap_compare,
    "filters": reading_filters,
    "overlay": reading_overlay,
    "overlay_mis": reading_overlay_mis,
    "adapt": reading_adapt,
    "subspace": reading_subspace,
}

# Readings that depend on which figure (method, rank, module) take its path as well.
NEEDS_PATH = {"faithfulness", "heatmap", "heatmap_compare", "filters", "overlay", "overlay_mis", "adapt", "subspace"}


def reading(kind: str | None, run: RunData, path: str = "") -> list[str]:
    """The reading lines of figure kind ``kind`` (at ``path`` in the run, without suffix) for
    ``run``; empty when the kind is unknown or its numbers are missing."""
    func = READINGS.get(kind or "")
    if func is None:
        return []
    try:
        lines = func(run, path) if kind in NEEDS_PATH else func(run)
        return [line for line in lines if line][:3]
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
        # A stage's JSON of an unexpected shape must not break the whole report: the figure
        # stays, without a reading.
        return []
