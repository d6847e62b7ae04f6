"""Numbers behind the report: per-run summaries and the reading lines under each figure.

One source for every number: the readings only read what the stages wrote (``metrics.json``,
``insights.json``, ``explain/explain_metrics.json``, ``adapt/<TASK>/results.json``,
``subspace/<TASK>/*.json``, and the training history through :func:`digitlens.history.read_history`); they
recompute nothing those files hold. A reading returns an empty list when the numbers it needs are
not there (a stage not run, an older run), and a file that is there but of the wrong shape is a
one-line DigitlensError naming it (:func:`reading`), never a silently missing line.

Which figure a reading is about comes from the figure's manifest entry (``method``, ``rank``,
``ranks``, ``seeds``, ``module``, ``task``, ``corrected``), never from its file name.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.intervals import overlapping, wilson_interval
from digitlens.report.collect import FigureRef, RunData


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


def interval(ci: Any, digits: int = 2, percent: bool = True) -> str:
    """``" (95% interval 99.13-99.45%)"`` for a [low, high] pair, ``""`` without one."""
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci)):
        return ""
    if percent:
        return f" (95% interval {ci[0] * 100:.{digits}f}-{ci[1] * 100:.{digits}f}%)"
    return f" (95% interval {ci[0]:.{digits}f}-{ci[1]:.{digits}f})"


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



# --------------------------------------------------------------------------- training


def best_validation_of(run: RunData) -> dict | None:
    """``insights.json``'s ``best_validation`` dict (see :func:`digitlens.history.best_validation`:
    ``best_val_accuracy``, ``best_val_accuracy_epoch``, ``best_val_accuracy_ci``,
    ``final_val_accuracy``, ``final_val_accuracy_ci``, ``n_epochs``, ``train_eval_accuracy_at_best``
    and its ``_ci`` or ``train_accuracy_at_best``) when it is available; None otherwise (not
    evaluated, no validation split, or evaluated before the stage wrote it)."""
    found = (run.insights or {}).get("best_validation") if isinstance(run.insights, dict) else None
    return found if isinstance(found, dict) and found.get("available") else None


def history_summary(run: RunData) -> dict | None:
    """Epochs and the training time as the history holds them, the final loss and training
    accuracy, and the best validation accuracy as the evaluate stage wrote it into ``insights.json``
    (:func:`best_validation_of`, its keys merged in); ``None`` without history."""
    rows = run.history
    if not rows:
        return None
    epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(rows)]
    out: dict[str, Any] = {"epochs": len(rows), "last_epoch": epochs[-1]}
    out["seconds"] = sum(r.get("seconds", 0.0) for r in rows) if any("seconds" in r for r in rows) else None
    out.update({k: v for k, v in (best_validation_of(run) or {}).items() if k != "available"})
    if rows[-1].get("loss") is not None:
        out["final_loss"] = rows[-1]["loss"]
    if rows[-1].get("accuracy") is not None:
        out["final_accuracy"] = rows[-1]["accuracy"]
    return out


def overfitting_of(run: RunData) -> dict | None:
    """``insights.json``'s ``overfitting`` dict (keys ``available``, ``diverges``, ``from_epoch``,
    ``best_epoch``, ``min_val_loss``, ``final_val_loss``, ``final_rise_percent``, ``reasons``), or
    None for a run not evaluated."""
    found = (run.insights or {}).get("overfitting") if isinstance(run.insights, dict) else None
    return found if isinstance(found, dict) else None


def overfitting_sentence(o: dict) -> str:
    """What ``insights.json`` says about overfitting, in one sentence (the evaluate stage's rule)."""
    if not o.get("available"):
        return f"Overfitting not assessed: {o.get('reason') or 'the insights give no reason'}."
    head = (f"Validation loss is lowest in epoch {o['best_epoch']} ({o['min_val_loss']:.4f}) and ends at "
            f"{o['final_val_loss']:.4f} ({o['final_rise_percent']:+.1f}%)")
    if o["diverges"]:
        return f"{head}: the model overfits from epoch {o['from_epoch']} ({'; '.join(o.get('reasons') or [])})."
    return f"{head}: no sign of overfitting by the evaluate stage's rule."


def reading_training(run: RunData, shows: dict | None = None) -> list[str]:
    """The best validation accuracy with its epoch and Wilson interval (``insights.json``'s
    ``best_validation``), the overfitting verdict and the training time."""
    h = history_summary(run) or {}
    lines = []
    if "best_val_accuracy" in h:
        line = (f"Validation accuracy peaked at {pct_ci(h['best_val_accuracy'], h.get('best_val_accuracy_ci'))} in epoch "
                f"{h['best_val_accuracy_epoch']}")
        n_train_eval = h.get("n_train_eval")
        if h.get("train_eval_accuracy_at_best") is not None:
            measured = pct_ci(h["train_eval_accuracy_at_best"], h.get("train_eval_accuracy_at_best_ci"))
            line += (f" (accuracy on {n_train_eval:,} training images measured the same way then {measured})"
                     if isinstance(n_train_eval, int) else f" (training images measured the same way then {measured})")
        elif h.get("train_accuracy_at_best") is not None:  # older runs: only Keras' in-epoch running mean
            line += f" (training accuracy then {pct(h['train_accuracy_at_best'], 2)}, measured during the epoch)"
        if h.get("final_val_accuracy") is not None:
            line += (f" and ended at {pct_ci(h['final_val_accuracy'], h.get('final_val_accuracy_ci'))} after "
                     f"{h.get('n_epochs', h['epochs'])} epochs")
        lines.append(line + ".")
    o = overfitting_of(run)
    if o is not None:
        lines.append(overfitting_sentence(o))
    if h.get("seconds"):
        lines[-1:] = [lines[-1] + f" Training took {h['seconds']:.1f} s."] if lines else [f"Training took {h['seconds']:.1f} s."]
    return lines


# --------------------------------------------------------------------------- evaluation


def evaluation_of(run: RunData) -> dict | None:
    """``metrics.json`` as the readings use it: ``n``, ``errors``, ``correct``, ``accuracy``,
    ``accuracy_ci``, ``labels`` (digits), arrays ``precision``, ``recall``, ``f1``,
    ``per_digit_accuracy``, ``support`` (one value per digit), ``f1_ci`` (digit -> interval or None),
    ``confusion`` ((C, C) array or None), ``most_confused`` (list), ``macro_f1`` and ``macro_f1_ci``;
    None when the run has no ``metrics.json`` with per-digit rows (not evaluated, or older)."""
    m = run.metrics
    if not isinstance(m, dict) or not isinstance(m.get("accuracy"), (int, float)) or not isinstance(m.get("per_digit"), list):
        return None
    source = run.run_dir / "metrics.json"
    try:
        rows = sorted(m["per_digit"], key=lambda r: r["digit"])
        n = int(m["n_samples"])
        errors = int(m["n_errors"])
        out = {
            "n": n, "errors": errors, "correct": n - errors, "accuracy": float(m["accuracy"]),
            "accuracy_ci": m.get("accuracy_ci"), "labels": [int(r["digit"]) for r in rows],
            "precision": np.array([r["precision"] for r in rows], dtype=float),
            "recall": np.array([r["recall"] for r in rows], dtype=float),
            "f1": np.array([r["f1"] for r in rows], dtype=float),
            "per_digit_accuracy": np.array([r["accuracy"] for r in rows], dtype=float),
            "support": np.array([r["support"] for r in rows], dtype=int),
            "f1_ci": {int(r["digit"]): r.get("f1_ci") for r in rows},
            "rows": {int(r["digit"]): r for r in rows},
            "confusion": np.array(m["confusion_matrix"], dtype=int) if "confusion_matrix" in m else None,
            "most_confused": list(m.get("most_confused") or []),
            "macro_f1": float(m["macro"]["f1"]) if isinstance(m.get("macro"), dict) else None,
            "macro_f1_ci": dig(m, "macro.f1_ci"),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise DigitlensError(f"{source}: not a metrics file of the evaluate stage ({type(exc).__name__}: {exc})") from None
    if out["labels"] != list(range(len(rows))):
        raise DigitlensError(f"{source}: per_digit rows are not the digits 0..{len(rows) - 1}")
    return out


def accuracy_text(p: dict) -> str:
    """The test accuracy in percent with ``metrics.json``'s 95% Wilson interval."""
    return pct_ci(p["accuracy"], p["accuracy_ci"])


def reading_confusion(run: RunData, shows: dict | None = None) -> list[str]:
    p = evaluation_of(run)
    if not p:
        return []
    lines = [f"{p['correct']:,} of {p['n']:,} test images are classified correctly, {accuracy_text(p)}; "
             f"the {p['errors']:,} mistakes are the off-diagonal cells."]
    if p["most_confused"]:
        top = p["most_confused"][0]
        t, q, c = top["true"], top["predicted"], top["count"]
        lines.append(f"The most frequent confusion is a true {t} read as {q} ({c} image{'s' if c != 1 else ''}, "
                     f"{pct_ci(top['share_of_true'], top.get('share_of_true_ci'), 1)} of the {t}s).")
    elif p["errors"] == 0:
        lines.append("There is no confusion at all: every test image lies on the diagonal.")
    return lines


def f1_ties(p: dict) -> tuple[dict, list[int] | None, list[int] | None]:
    """(digit -> F1 bootstrap interval from ``metrics.json``, the digits whose F1 interval overlaps
    that of the lowest F1 (it first), those overlapping the highest (it first)); the lists are None
    without an interval for every digit."""
    f1, ci = p["f1"], p["f1_ci"]
    if not (len(ci) == len(f1) and all(ci.values())):
        return ci, None, None

    def tied(hardest_first: bool) -> list[int]:
        order = sorted(ci, key=lambda x: (f1[x], x) if hardest_first else (-f1[x], x))
        return [order[i] for i in overlapping([ci[x] for x in order])]

    return ci, tied(True), tied(False)


def reading_per_digit(run: RunData, shows: dict | None = None) -> list[str]:
    """The lowest and highest F1; a "hardest" or "easiest" digit is named only when its bootstrap F1
    interval overlaps no other digit's (without intervals, only the lowest and highest F1)."""
    p = evaluation_of(run)
    if not p:
        return []
    f1 = p["f1"]
    hard, easy = int(np.argmin(f1)), int(np.argmax(f1))
    ci, tied_hard, tied_easy = f1_ties(p)
    hard_f1 = (f"F1 {f1[hard]:.3f}{interval(ci.get(hard), 3, False)}, precision {p['precision'][hard]:.3f}, "
               f"recall {p['recall'][hard]:.3f}")
    easy_f1 = f"F1 {f1[easy]:.3f}{interval(ci.get(easy), 3, False)}"
    if tied_hard is None:
        line = (f"Lowest F1: digit {hard} ({hard_f1}); highest: digit {easy} ({easy_f1}); without bootstrap "
                f"intervals (evaluate the run again) no digit is called hardest or easiest")
    elif len(tied_hard) == len(tied_easy) == len(f1) > 2:
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
    low = int(np.argmin(p["recall"]))
    missed = (f"{int(p['support'][low] - p['confusion'][low, low])} of its {int(p['support'][low])} images missed"
              if p["confusion"] is not None else f"{int(p['support'][low])} images")
    lines.append(f"Lowest recall is for {low} ({p['recall'][low]:.3f}: {missed}); F1 spreads over "
                 f"{f1.max() - f1.min():.3f} between digits.")
    return lines


def reading_groups(run: RunData, shows: dict | None = None) -> list[str]:
    """Precision and recall of each digit group as a binary decision, with their Wilson intervals
    (``metrics.json``'s ``groups``, see :func:`digitlens.metrics.group_metrics`), and the digit of
    the group with the lowest recall; nothing for a run evaluated before the stage wrote them."""
    p = evaluation_of(run)
    groups = (run.metrics or {}).get("groups")
    if not p or not isinstance(groups, list):
        return []
    lines = []
    for i, g in enumerate(groups):
        digits = [d for d in g["digits"] if d < len(p["labels"])]
        worst = min(digits, key=lambda d: p["recall"][d])
        lines.append(f"Group {i + 1}, digits {', '.join(map(str, g['digits']))}: precision "
                     f"{g['precision']:.3f}{interval(g.get('precision_ci'), 3, False)}, recall "
                     f"{g['recall']:.3f}{interval(g.get('recall_ci'), 3, False)} as the decision “in this group?”; "
                     f"of its digits, {worst} has the lowest per-digit recall ({p['recall'][worst]:.3f}).")
    return lines


def reading_reliability(run: RunData, shows: dict | None = None) -> list[str]:
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
    p = evaluation_of(run)
    conf = dig(metrics, "calibration.mean_confidence")
    if p and isinstance(conf, (int, float)):
        gap = conf - p["accuracy"]
        lines.append(f"Mean confidence {pct_ci(conf, dig(metrics, 'calibration.mean_confidence_ci'))} against accuracy "
                     f"{accuracy_text(p)}: "
                     f"the model is {'over' if gap > 0 else 'under'}confident by {abs(gap) * 100:.2f} points overall.")
    return lines


def confidence_sentence(run: RunData, digits: int = 1) -> str | None:
    """The mean confidence of the right and of the wrong predictions with their Student-t intervals
    (``metrics.json``'s ``confidence_by_outcome``); None for a run evaluated before it was written."""
    found = (run.metrics or {}).get("confidence_by_outcome")
    if not isinstance(found, dict) or not isinstance(found.get("correct"), dict):
        return None
    right, wrong = found["correct"], found.get("wrong") or {}
    if right.get("mean_confidence") is None:
        return "No prediction is right, so there is no mean confidence of right predictions."
    line = (f"Correct predictions carry a mean confidence of "
            f"{pct_ci(right['mean_confidence'], right.get('mean_confidence_ci'), digits)}")
    if wrong.get("mean_confidence") is not None:
        line += f", mistakes {pct_ci(wrong['mean_confidence'], wrong.get('mean_confidence_ci'), digits)}"
    return line + " (Student-t intervals over the images)."


def most_confident_mistake_sentence(run: RunData) -> str | None:
    """The wrong prediction with the highest confidence (``metrics.json``'s
    ``confidence_by_outcome.most_confident_mistake``); None without one."""
    worst = dig(run.metrics or {}, "confidence_by_outcome.most_confident_mistake")
    if not isinstance(worst, dict):
        return None
    return (f"The most confident mistake (test image {worst['index']:,}) reads a {worst['true']} as "
            f"{worst['predicted']} with {pct(worst['confidence'], 1)} confidence.")


def reading_predictions(run: RunData, shows: dict | None = None) -> list[str]:
    """The mean confidence of right and wrong predictions (overall for older runs) and the accuracy."""
    p = evaluation_of(run)
    if not p:
        return []
    conf = dig(run.metrics or {}, "calibration.mean_confidence")
    first = confidence_sentence(run) or (
        f"Predictions carry a mean confidence of {pct_ci(conf, dig(run.metrics, 'calibration.mean_confidence_ci'), 1)}."
        if isinstance(conf, (int, float)) else f"{p['errors']:,} of the {p['n']:,} test images are misclassified.")
    return [first, f"Accuracy over the whole test split is {accuracy_text(p)} ({p['correct']:,} of {p['n']:,})."]


def reading_misclassified(run: RunData, shows: dict | None = None) -> list[str]:
    p = evaluation_of(run)
    if not p:
        return []
    if not p["errors"]:
        return ["No test image is misclassified."]
    ci = p["accuracy_ci"]
    error_ci = [1.0 - ci[1], 1.0 - ci[0]] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
    return [f"{p['errors']:,} test images ({pct_ci(p['errors'] / p['n'], error_ci)}) are misclassified, "
            "most confident first.", most_confident_mistake_sentence(run)]


# --------------------------------------------------------------------------- explanations


def faithfulness_of(run: RunData) -> dict | None:
    """``explain_metrics.json``'s faithfulness block: ``methods`` (name -> AUCs...), ``ranking``."""
    block = dig(run.explain_metrics or {}, "faithfulness")
    return block if isinstance(block, dict) and isinstance(block.get("methods"), dict) else None


def label(method: str) -> str:
    return method.replace("_", " ")


def checks_passed(row: dict) -> str:
    """The sanity checks a method passed, in words, from its row of ``explain_metrics.json``."""
    if "passes_sanity_check" in row:
        return "the randomisation and random-logit checks"
    if "passes_random_logit" in row:
        return "the random-logit check; the randomisation check needs re-initialisable PyTorch layers"
    return "no check: none was run"


def reading_faithfulness(run: RunData, shows: dict | None = None) -> list[str]:
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


def reading_heatmap(run: RunData, shows: dict | None = None) -> list[str]:
    """Where the figure's ``method`` ranks for faithfulness and how much of its map lies on the outer
    ring of patches (``explain_metrics.json``)."""
    method = (shows or {}).get("method")
    if not method:
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
    return lines


def reading_heatmap_compare(run: RunData, shows: dict | None = None) -> list[str]:
    return reading_heatmap(run, shows)[:1] or reading_faithfulness(run)[:1]


def reading_overlay(run: RunData, shows: dict | None = None) -> list[str]:
    method = (shows or {}).get("method")
    return ([f"Heatmaps by {label(method)}."] if method else []) + reading_predictions(run)[1:]


# --------------------------------------------------------------------------- LoRA study


def lora_summary(run: RunData, task: str | None = None) -> tuple[str, dict] | None:
    """(task, ``adapt/<task>/results.json``) of the figure's task (the only one when it names none)."""
    if task in run.adapt_results:
        return task, run.adapt_results[task]
    if task is None and len(run.adapt_results) == 1:
        return next(iter(run.adapt_results.items()))
    return None


def mean_accuracy_text(row: dict, n_test: Any) -> str:
    """A ``summary`` row's ``accuracy_mean`` with results.json's ``accuracy_mean_ci``; for a
    results.json written before the stage recorded it, the Wilson interval of ``n_test`` images."""
    if row.get("accuracy_mean_ci") is not None:
        return pct_ci(row["accuracy_mean"], row["accuracy_mean_ci"])
    return wilson_text(row["accuracy_mean"], n_test)  # older results.json only


def reading_adapt(run: RunData, shows: dict | None = None) -> list[str]:
    """The smallest rank's accuracy, the paired test of the ranks, the baselines and the verdict."""
    found = lora_summary(run, (shows or {}).get("task"))
    if not found:
        return []
    task, res = found
    rows = res.get("summary") or []
    lora = [r for r in rows if r.get("method") == "lora"]
    if not lora:
        return []
    small = min(lora, key=lambda r: r["rank"])
    n_test = res.get("n_test")  # older results.json without accuracy_mean_ci: the Wilson interval of that many images
    line = (f"On task “{task}”, LoRA r = {small['rank']} reaches {mean_accuracy_text(small, n_test)} with "
            f"{small['trainable_params']:,} trainable parameters ({small['trainable_fraction'] * 100:.2f}% of the model); "
            + rank_sentence(res, lora))
    others = {r["method"]: r for r in rows if r.get("method") in ("head_only", "full")}
    second = ", ".join(f"{'head only' if k == 'head_only' else 'full fine-tuning'} "
                       f"{mean_accuracy_text(v, n_test)} ({v['trainable_params']:,} parameters)"
                       for k, v in others.items())
    verdict = (res.get("verdict") or {}).get("sentence")
    return [line] + ([f"Baselines: {second}."] if second else []) + ([verdict] if verdict else [])


def reading_adapt_curves(run: RunData, shows: dict | None = None) -> list[str]:
    found = lora_summary(run, (shows or {}).get("task"))
    return _convergence_lines(found[1]) if found else []


def reading_adapt_per_digit(run: RunData, shows: dict | None = None) -> list[str]:
    """The per-digit group metrics of the figure's rank and seed: the ``per_digit`` entry of
    ``results.json`` whose ``rank`` and ``seed`` fields are those of the figure (any seed when the
    figure names none and one entry has that rank)."""
    shows = shows or {}
    found = lora_summary(run, shows.get("task"))
    rank = shows.get("rank")
    if not found or rank is None or not isinstance(found[1].get("per_digit"), dict):
        return []
    entries = [e for e in found[1]["per_digit"].values()
               if isinstance(e, dict) and e.get("rank") == rank and shows.get("seed", e.get("seed")) == e.get("seed")]
    if len(entries) != 1:  # none (an older results.json without the fields) or not one adapter
        return []
    pd = entries[0]
    rec, prec = np.asarray(pd["recall"]), np.asarray(pd["precision"])
    lo, plo = int(np.argmin(rec)), int(np.argmin(prec))
    return [f"With r = {rank}, the digit put least often into its own group is {pd['digit'][lo]} "
            f"(recall {rec[lo]:.3f}); the group that others leak into most is that of {pd['digit'][plo]} "
            f"(precision {prec[plo]:.3f}).",
            f"Recall ranges from {rec.min():.3f} to {rec.max():.3f} over the ten digits."]


def rank_sentence(res: dict, lora: list[dict]) -> str:
    """The paired test of the LoRA ranks (``rank_comparison`` in ``results.json``); without it, the
    highest mean accuracy marked as untested, never a "best rank"."""
    found = res.get("rank_comparison")
    if found:
        return found["sentence"]
    if len(lora) < 2:
        return "only one rank was trained."
    top = max(lora, key=lambda r: r["accuracy_mean"])
    return (f"r = {top['rank']} has the highest mean accuracy ({mean_accuracy_text(top, res.get('n_test'))}), "
            "untested: results.json holds no paired test of the ranks, so no rank is called best.")


def subspace_summary(run: RunData, task: str | None) -> dict | None:
    """``subspace/<task>/subspace.json`` (the only task's when the figure names none)."""
    files = run.subspace.get(task) if task is not None else (
        next(iter(run.subspace.values())) if len(run.subspace) == 1 else None)
    js = (files or {}).get("subspace.json")
    return js if isinstance(js, dict) and "modules" in js else None


def _modules_shown(modules: list[dict], shows: dict) -> list[dict]:
    """The modules of ``subspace.json`` a figure shows: its ``modules`` list, or its ``module``
    (a full module name, or a projection such as ``q`` that every block has)."""
    names = shows.get("modules")
    if isinstance(names, list):
        return [m for m in modules if m["module"] in names]
    name = shows.get("module")
    if not name:
        return []
    return [m for m in modules if m["module"] == name or m["module"].endswith("." + name)]


def reading_phi_w(run: RunData, shows: dict | None = None) -> list[str]:
    """phi(W, A_r) of the modules the figure shows, per rank, against a random A."""
    shows = shows or {}
    js = subspace_summary(run, shows.get("task"))
    if not js:
        return []
    picked = _modules_shown(js["modules"], shows)
    if not picked:
        return []
    corrected = bool(shows.get("corrected"))
    what = "chance-corrected phi" if corrected else "phi"
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


def _comparison_shown(js: dict, kind: str, shows: dict, figure: FigureRef | None) -> dict | None:
    """The entry of ``subspace.json``'s ``comparisons`` a figure shows: by its ``ranks`` (or ``seeds``
    and ``rank``) when the entries record them, else the entry whose ``figures`` list the figure's file."""
    comps = [c for c in js.get("comparisons", []) if c.get("kind") == kind]
    for c in comps:
        if kind == "ranks" and c.get("ranks") is not None and c["ranks"] == shows.get("ranks"):
            return c
        if kind == "seeds" and c.get("seeds") is not None and c["seeds"] == shows.get("seeds") \
                and c.get("rank") == shows.get("rank"):
            return c
    if figure is not None:
        for c in comps:
            if any(str(f).endswith(figure.path.name) for f in c.get("figures") or []):
                return c
    return comps[0] if len(comps) == 1 else None


def reading_phi_between(run: RunData, shows: dict | None = None, figure: FigureRef | None = None,
                        kind: str = "ranks") -> list[str]:
    """phi between the adapters of two ranks (``kind`` "ranks") or two seeds ("seeds")."""
    shows = shows or {}
    js = subspace_summary(run, shows.get("task"))
    comp = _comparison_shown(js, kind, shows, figure) if js else None
    if not comp or not comp.get("modules"):
        return []
    entries = comp["modules"]
    corrected = bool(shows.get("corrected"))
    top = f" ({_above_chance(entries, '1_1')})" if _above_chance(entries, "1_1") else ""
    first = (f"{comp['title']}: top direction phi(1, 1) = {np.mean([e['phi_1_1'] for e in entries]):.3f} "
             f"against chance {np.mean([e['chance_1_1'] for e in entries]):.3f}, averaged over {len(entries)} "
             f"modules{top}.")
    return [first, f"At i = j = k: {_phi_line(entries, corrected)}.", _phi_finding(run, js, kind, shows, comp, entries)]


def _phi_finding(run: RunData, js: dict, kind: str, shows: dict, comp: dict, entries: list[dict]) -> str:
    """What the comparison found: a shared top direction (most modules above chance at (1, 1)), or
    nothing above chance, and why."""
    tested = [e for e in entries if "p_1_1" in e]
    if not tested:
        return ""
    hits = sum(bool(e["above_chance_1_1"]) for e in tested)
    phi_top = np.mean([e["phi_1_1"] for e in tested])
    chance = np.mean([e["chance_1_1"] for e in tested])
    ranks, seeds = shows.get("ranks") or comp.get("ranks"), shows.get("seeds") or comp.get("seeds")
    if kind == "ranks":
        who = f"r = {ranks[0]} and r = {ranks[1]}" if ranks else "the two ranks"
    else:
        rank = shows.get("rank", comp.get("rank"))
        who = (f"seeds {seeds[0]} and {seeds[1]}" if seeds else "the two seeds") + (f" at r = {rank}" if rank else "")
    if hits * 2 > len(tested):
        like = ("a low-rank change carries most of the adaptation, as in the paper's Figure 3" if kind == "ranks"
                else "different random starts find the same top direction, as in the paper's Figure 4")
        return (f"{who} share their top direction in {hits} of {len(tested)} modules (mean phi {phi_top:.2f}, "
                f"chance {chance:.3f}): {like}.")
    return (f"{who} share no top direction beyond chance in most modules ({hits} of {len(tested)} above chance; "
            f"mean phi {phi_top:.3f}, chance {chance:.3f}): {_why_nothing(run, js.get('task'))}")


def reading_amplification(run: RunData, shows: dict | None = None) -> list[str]:
    """The amplification factor per rank over seeds (``amplification_by_rank``), else the mean over modules."""
    js = subspace_summary(run, (shows or {}).get("task"))
    if not js:
        return []
    by_rank = js.get("amplification_by_rank") or []
    if by_rank:
        return _amplification_lines(by_rank)
    amps: dict[int, list[float]] = {}
    for mod in js["modules"]:
        for a in mod.get("adapters", []):
            value = (a.get("amplification") or {}).get("amplification")
            if isinstance(value, (int, float)) and math.isfinite(value):
                amps.setdefault(a["rank"], []).append(value)
    return (["Mean amplification factor ‖ΔW‖ / ‖UᵀWVᵀ‖ per rank: "
             + ", ".join(f"r = {r}: {np.mean(v):.2f}" for r, v in sorted(amps.items())) + "."] if amps else [])


def reading_spectrum(run: RunData, shows: dict | None = None) -> list[str]:
    """The mean effective rank of ΔW per rank, over modules."""
    js = subspace_summary(run, (shows or {}).get("task"))
    if not js:
        return []
    eff: dict[int, list[float]] = {}
    for mod in js["modules"]:
        for a in mod.get("adapters", []):
            if isinstance(a.get("effective_rank"), (int, float)):
                eff.setdefault(a["rank"], []).append(a["effective_rank"])
    return (["Mean effective rank of ΔW: " + ", ".join(f"{np.mean(v):.1f} of r = {r}" for r, v in sorted(eff.items()))
             + f", over {len(js['modules'])} modules."] if eff else [])


# --------------------------------------------------------------------------- registry

Reading = Callable[..., list]

#: The reading of each figure kind of the manifest contract (kinds without one get no reading lines).
READINGS: dict[str, Reading] = {
    "training_curves": reading_training,
    "confusion_matrix": reading_confusion,
    "confusion_matrix_normalised": reading_confusion,
    "per_digit": reading_per_digit,
    "per_digit_groups": reading_groups,
    "reliability": reading_reliability,
    "predictions": reading_predictions,
    "misclassified": reading_misclassified,
    "overlay": reading_overlay,
    "overlay_misclassified": reading_misclassified,
    "faithfulness": reading_faithfulness,
    "sanity": reading_faithfulness,
    "heatmap": reading_heatmap,
    "heatmap_compare": reading_heatmap_compare,
    "adapt_accuracy": reading_adapt,
    "adapt_per_digit": reading_adapt_per_digit,
    "adapt_training_curves": reading_adapt_curves,
    "subspace_paper_figure": reading_phi_w,
    "phi_w_vs_a": reading_phi_w,
    "phi_rank_vs_rank": lambda run, shows, figure=None: reading_phi_between(run, shows, figure, "ranks"),
    "phi_seed_vs_seed": lambda run, shows, figure=None: reading_phi_between(run, shows, figure, "seeds"),
    "amplification": reading_amplification,
    "spectrum": reading_spectrum,
}

#: Readings that need the figure itself (to find its entry in a stage's JSON).
NEEDS_FIGURE = {"phi_rank_vs_rank", "phi_seed_vs_seed"}


def source_of(kind: str, run: RunData, shows: dict) -> str:
    """The stage file a reading of ``kind`` reads (for the error message of a broken one)."""
    task = shows.get("task", "<task>")
    if kind in ("adapt_accuracy", "adapt_per_digit", "adapt_training_curves"):
        return str(run.run_dir / "adapt" / str(task) / "results.json")
    if kind in ("subspace_paper_figure", "phi_w_vs_a", "phi_rank_vs_rank", "phi_seed_vs_seed", "amplification", "spectrum"):
        return str(run.run_dir / "subspace" / str(task) / "subspace.json")
    if kind in ("faithfulness", "sanity", "heatmap", "heatmap_compare"):
        return str(run.run_dir / "explain" / "explain_metrics.json")
    if kind == "training_curves":
        return f"{run.run_dir / 'insights.json'} or {run.run_dir / 'history.csv'}"
    return str(run.run_dir / "metrics.json")


def reading(kind: str | None, run: RunData, figure: FigureRef | dict | None = None) -> list[str]:
    """The reading lines (at most three) under a figure of ``kind`` for ``run``; ``figure`` is the
    figure (or just what it shows, a dict of ``method``, ``rank``, ``task``...). Empty when the kind
    has no reading or its numbers are not in the run; a stage file of the wrong shape is a one-line
    DigitlensError naming it."""
    func = READINGS.get(kind or "")
    if func is None:
        return []
    shows = figure.shows if isinstance(figure, FigureRef) else dict(figure or {})
    try:
        if kind in NEEDS_FIGURE:
            lines = func(run, shows, figure if isinstance(figure, FigureRef) else None)
        else:
            lines = func(run, shows)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise DigitlensError(f"{source_of(kind, run, shows)}: does not hold what the {kind} figure's reading needs "
                             f"({type(exc).__name__}: {exc})") from None
    return [line for line in lines if line][:3]
