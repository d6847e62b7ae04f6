"""Which attribution method to believe: a ranking that only a method passing every check can top.

A method is *eligible* to be called most faithful when

1. it passes the model-parameter randomisation check (Adebayo et al. 2018): its maps change when
   the model's weights are re-initialised (mean Spearman |rho| below :data:`SANITY_MAX_SPEARMAN`
   between the maps of the trained and of the fully re-initialised model);
2. it passes the random-logit check (Sixt et al. 2020): its map for a random other class differs
   from the map for the target (mean Spearman below ``RANDOM_LOGIT_THRESHOLD``).

Eligible methods are ranked by the ROAD score (LeRF AUC - MoRF AUC on 7x7 patches removed by
noisy linear imputation, Rong et al. 2022's combination of both orders, which deleting to black
cannot win by construction), then the others by the same score, each with its reasons in plain
words. ``most_faithful`` is the first eligible method, or None when none is eligible.

A third comparison is reported, not required: whether removing the method's most relevant
patches first (ROAD MoRF) hurts the prediction more than removing ink patches in random order
(``beats_ink_random``). On MNIST most patches are empty background, so beating "any patch in
random order" says little; when even the most faithful method does not beat random ink, the
verdict says so, since then its maps localise the evidence no better than the ink itself does.
"""

from __future__ import annotations

import numpy as np

from digitlens.intervals import bootstrap_indices, percentile_interval

#: A method whose maps keep a mean rank correlation of at least this with the maps of a fully
#: re-initialised model fails the randomisation check (Adebayo et al. 2018 judge by eye; 0.5 is
#: digitlens' cut-off).
SANITY_MAX_SPEARMAN = 0.5

#: The score the ranking sorts by (in each method's row of ``faithfulness['methods']``).
SCORE_KEY = "road_score"

RULE = ("most faithful = highest ROAD score (LeRF AUC - MoRF AUC, 7x7 patches removed by noisy linear "
        "imputation) among the methods that pass the randomisation check and the random-logit check")


def reasons_against(row: dict) -> list[str]:
    """The checks a method's row fails, as plain sentences (empty when it passes them all)."""
    reasons = []
    if row.get("passes_sanity_check") is False:
        reasons.append(f"its maps follow the input's ink, not what the model learned: they keep a rank correlation of "
                       f"{row['spearman_fully_randomised']:.2f} with the maps of a fully re-initialised model")
    if row.get("passes_random_logit") is False:
        reasons.append(f"its map for a random other digit is nearly the same (rank correlation "
                       f"{row['random_logit_spearman']:.2f}): it does not explain the class")
    return reasons


def checks_passed(row: dict) -> str:
    """The checks a method passed, in words: both, or only the random-logit check when the
    randomisation check was skipped (a TorchScript or ONNX model)."""
    if "passes_sanity_check" in row:
        return "the randomisation and random-logit checks"
    if "passes_random_logit" in row:
        return "the random-logit check; the randomisation check needs re-initialisable PyTorch layers"
    return "no check: none was run"


def rank_methods(rows: dict) -> dict:
    """Rank the methods of ``rows`` ({method: row}, baselines 'random' and 'ink_random' left out).

    Adds ``eligible``, ``reasons`` and ``rank`` to each row (in place) and returns ``ranking``
    (eligible methods by :data:`SCORE_KEY`, then the rest), ``most_faithful`` (a method or None),
    ``verdict`` (one sentence) and ``rule``.
    """
    names = [m for m in rows if m not in ("random", "ink_random")]
    for m in names:
        rows[m]["reasons"] = reasons_against(rows[m])
        rows[m]["eligible"] = not rows[m]["reasons"]

    def score(m):
        value = rows[m].get(SCORE_KEY)
        return float("-inf") if value is None or value != value else value

    ranking = sorted([m for m in names if rows[m]["eligible"]], key=lambda m: -score(m)) + \
        sorted([m for m in names if not rows[m]["eligible"]], key=lambda m: -score(m))
    for i, m in enumerate(ranking):
        rows[m]["rank"] = i + 1
    best = next((m for m in ranking if rows[m]["eligible"]), None)
    if best is not None:
        verdict = (f"most faithful: {best.replace('_', ' ')} (ROAD score {rows[best][SCORE_KEY]:.3f}; it passes "
                   f"{checks_passed(rows[best])})")
        if rows[best].get("beats_ink_random") is False:
            verdict += (", but removing its most relevant patches hurts the prediction no more than removing ink "
                        "patches in random order, so its maps localise the evidence no better than the ink does")
    else:
        ran_randomisation = any("passes_sanity_check" in rows[m] for m in names)
        verdict = ("no method passes both sanity checks, so none is called most faithful" if ran_randomisation else
                   "no method passes the random-logit check (the randomisation check needs re-initialisable "
                   "PyTorch layers), so none is called most faithful")
    return {"ranking": ranking, "most_faithful": best, "verdict": verdict, "rule": RULE,
            "eligible": [m for m in ranking if rows[m]["eligible"]]}


def margin_over_runner_up(verdict: dict, per_image_scores: dict, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """How far ``verdict['most_faithful']`` is ahead of the next eligible method, paired over images.

    ``per_image_scores``: {method: ndarray (N,) of per-image ROAD scores (LeRF AUC - MoRF AUC)}.
    Returns {} when there is no runner-up, else ``runner_up``, ``difference`` (mean best - runner-up),
    ``difference_ci`` (95% paired percentile bootstrap over images, the same resamples for both) and
    ``within_noise`` (the interval contains 0: the data do not tell the two apart).
    """
    best = verdict.get("most_faithful")
    eligible = [m for m in verdict.get("ranking", []) if m != best and m in verdict.get("eligible", [])]
    if best is None or not eligible:
        return {}
    runner_up = eligible[0]
    diff = np.asarray(per_image_scores[best], dtype=np.float64) - np.asarray(per_image_scores[runner_up], dtype=np.float64)
    boot = diff[bootstrap_indices(len(diff), n_resamples, seed)].mean(axis=1)
    low, high = (float(v) for v in percentile_interval(boot))
    return {"runner_up": runner_up, "difference": float(diff.mean()), "difference_ci": [low, high],
            "within_noise": bool(low <= 0.0 <= high)}
