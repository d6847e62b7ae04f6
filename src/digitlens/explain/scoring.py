"""The faithfulness verdict of the explain stage: how far each method's maps can be trusted.

:func:`faithfulness_report` scores every method on a subset of images with the building blocks of
:mod:`digitlens.explain.faithfulness` (deletion / insertion, the random baselines, the
randomisation and random-logit checks) and :mod:`digitlens.explain.road` (ROAD), then ranks them
with :mod:`digitlens.explain.verdict`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from digitlens.explain.faithfulness import (INK_THRESHOLD, RANDOM_LOGIT_THRESHOLD, cascading_randomisation,
                                            curve_auc, ink_random_order, patch_order, perturbation_curves,
                                            random_logit_similarity, random_order)
from digitlens.explain.maps import pool_to_grid
from digitlens.explain.methods import abs_attribution_maps, method_name
from digitlens.explain.road import ROAD_FRACTIONS, road_areas, road_auc, road_curves
from digitlens.explain.verdict import SANITY_MAX_SPEARMAN, margin_over_runner_up, rank_methods
from digitlens.external import OnnxForward


def faithfulness_report(model: nn.Module, images: torch.Tensor, targets: np.ndarray, methods, *, grid: int = 7,
                        batch_size: int = 256, seed: int = 0, sanity_size: int = 64, method_kwargs=None,
                        scoring_model: nn.Module | None = None, n_classes: int = 10, randomisation: bool = True) -> dict:
    """How far each method's maps can be trusted, on ``images`` (N, C, H, W) towards ``targets`` (N,).

    Per method (and for two random baselines, ``random``: any patch, ``ink_random``: ink patches
    first): deletion / insertion AUCs (7x7 patches set to 0) and ROAD AUCs (Rong et al. 2022:
    patches, and single pixels, removed by noisy linear imputation, most- and least-relevant
    first) with the score LeRF - MoRF; on the first ``sanity_size`` images the randomisation
    check (Adebayo et al. 2018) and the random-logit check (Sixt et al. 2020). Then the verdict of
    :mod:`digitlens.explain.verdict`: ``ranking``, ``most_faithful``, ``verdict``, and per method
    ``eligible`` and ``reasons``. ``scoring_model`` (default ``model``) is the same function of
    the input evaluated for the curves (e.g. the batch-norm-folded copy). ``randomisation=False``
    skips the randomisation check (a TorchScript or ONNX file has no layers digitlens can
    re-initialise; ``randomisation_note`` says so). Method names may be dashed or underscored; the
    result uses the underscored ones. Returns a JSON-able dict.
    """
    methods = [method_name(m) for m in methods]
    method_kwargs = {method_name(m): kw for m, kw in (method_kwargs or {}).items()}
    scorer = scoring_model if scoring_model is not None else model
    n, _, h, w = images.shape
    result = {"n_images": int(n), "grid": grid, "sanity_n_images": int(min(sanity_size, n)), "methods": {},
              "road_fractions": list(ROAD_FRACTIONS), "ink_threshold": INK_THRESHOLD,
              "random_logit_threshold": RANDOM_LOGIT_THRESHOLD, "sanity_max_spearman": SANITY_MAX_SPEARMAN}
    curves, per_image_score = {}, {}
    pixel_maps = {m: abs_attribution_maps(model, images, targets, m, batch_size, **method_kwargs.get(m, {})) for m in methods}
    orders = {m: (patch_order(pool_to_grid(a, grid), seed=seed), patch_order(a, seed=seed)) for m, a in pixel_maps.items()}
    orders["random"] = (random_order(n, grid * grid, seed), random_order(n, h * w, seed))
    orders["ink_random"] = (ink_random_order(images, grid, seed), ink_random_order(images, h, seed))
    for name, (order, pixel_order) in orders.items():
        dele = perturbation_curves(scorer, images, targets, order, grid, mode="deletion")
        ins = perturbation_curves(scorer, images, targets, order, grid, mode="insertion")
        road = {f"road{level}_{mode}": road_curves(scorer, images, targets, o, grid=g, mode=mode, seed=seed)
                for level, o, g in (("", order, grid), ("_pixel", pixel_order, h)) for mode in ("morf", "lerf")}
        curves[name] = {"deletion": dele.mean(0).tolist(), "insertion": ins.mean(0).tolist(),
                        **{k: v.mean(0).tolist() for k, v in road.items()}}
        per_image_score[name] = road_areas(road["road_lerf"]) - road_areas(road["road_morf"])
        row = {"deletion_auc": curve_auc(dele), "insertion_auc": curve_auc(ins),
               **{f"{k}_auc": road_auc(v) for k, v in road.items()}}
        row["insertion_minus_deletion"] = row["insertion_auc"] - row["deletion_auc"]
        row["road_score"] = row["road_lerf_auc"] - row["road_morf_auc"]
        row["road_pixel_score"] = row["road_pixel_lerf_auc"] - row["road_pixel_morf_auc"]
        result["methods"][name] = row
    rnd, ink = result["methods"]["random"], result["methods"]["ink_random"]
    for name, row in result["methods"].items():
        if name in ("random", "ink_random"):
            continue
        row["beats_random"] = bool(row["deletion_auc"] < rnd["deletion_auc"] and row["insertion_auc"] > rnd["insertion_auc"])
        # Against random ink only most-relevant-first is compared: the reverse of an ink-first order
        # removes the empty background first, which imputation leaves unchanged (a LeRF no method can beat).
        row["beats_ink_random"] = bool(row["road_morf_auc"] < ink["road_morf_auc"])
    result["curves"] = curves
    if sanity_size > 0:
        sub = slice(0, min(sanity_size, n))
        sanity_kwargs = {m: dict(method_kwargs.get(m, {})) for m in methods}
        if "integrated_gradients" in sanity_kwargs:
            sanity_kwargs["integrated_gradients"].setdefault("max_steps", 33)

        def map_fn(m_):
            return {m: abs_attribution_maps(m_, images[sub], targets[sub], m, batch_size, **sanity_kwargs[m]).reshape(-1, h * w)
                    for m in methods}

        if randomisation:
            stages = cascading_randomisation(model, map_fn, seed=seed)
            result["randomisation"] = {
                "layers": [name for name, _ in stages],
                "spearman": {m: [float(np.mean(c[m])) for _, c in stages] for m in methods},
            }
        else:
            result["randomisation_note"] = ("randomisation check skipped: the model is a TorchScript or ONNX file "
                                            "whose layers digitlens cannot re-initialise")
        for m in methods:
            if randomisation:
                final = result["randomisation"]["spearman"][m][-1]
                result["methods"][m]["spearman_fully_randomised"] = final
                result["methods"][m]["passes_sanity_check"] = bool(abs(final) < SANITY_MAX_SPEARMAN)
            similarity = random_logit_similarity(
                lambda x, t, m=m: abs_attribution_maps(model, x, np.asarray(t), m, batch_size, **sanity_kwargs[m]),
                images[sub], targets[sub], n_classes, seed=seed)
            result["methods"][m]["random_logit_spearman"] = float(np.mean(similarity))
            result["methods"][m]["passes_random_logit"] = bool(np.mean(similarity) < RANDOM_LOGIT_THRESHOLD)
    result.update(rank_methods(result["methods"]))
    margin = margin_over_runner_up(result, per_image_score, seed=seed)
    if margin:
        result["margin"] = margin
        if margin["within_noise"]:
            lo, hi = margin["difference_ci"]
            result["verdict"] += (f"; {margin['runner_up'].replace('_', ' ')} is within noise of it (ROAD score "
                                  f"difference {margin['difference']:.3f}, 95% interval {lo:.3f} to {hi:.3f} over "
                                  f"{n} images)")
    return result




def can_reinitialise(model: nn.Module) -> bool:
    """False when ``model`` holds a TorchScript module or an ONNX session: their layers cannot be
    re-initialised by their ``reset_parameters`` (the randomisation check needs that)."""
    return not any(isinstance(m, (torch.jit.ScriptModule, OnnxForward)) for m in model.modules())
