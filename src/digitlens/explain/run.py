"""``explain_model`` (any nn.Module, from Python) and ``explain_run`` (a run folder -> ``explain/``)."""

from __future__ import annotations

import contextlib
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from digitlens import distributed
from digitlens.comparison import compare_predictions
from digitlens.device import model_device, resolve_device, synchronize
from digitlens.errors import DigitlensError
from digitlens.external import OnnxForward, UserModel, load_user_model, trusted_by_record
from digitlens.runio import run_lock
from digitlens.explain.aggregate import PerDigitMaps, group_names, has_mass, normalise_maps, pool_to_grid
from digitlens.explain.faithfulness import (INK_THRESHOLD, RANDOM_LOGIT_THRESHOLD, cascading_randomisation,
                                            curve_auc, ink_random_order, patch_order, perturbation_curves,
                                            random_logit_similarity, random_order)
from digitlens.explain.road import ROAD_FRACTIONS, road_areas, road_auc, road_curves
from digitlens.explain.verdict import SANITY_MAX_SPEARMAN, margin_over_runner_up, rank_methods
from digitlens.explain.methods import (CAM_METHODS, IG_TOLERANCE, INPUT_GRADIENT_METHODS, attribute, fold_batch_norm,
                                      forward_only_file, gradcam_layer_name, layer_reach, parse_methods,
                                      prepare_model)
from digitlens.plots._common import pyplot

#: Integrated-gradients steps (Captum's Gauss-Legendre rule) for the per-image overlays.
OVERLAY_IG_STEPS = 128


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels (N,) and class probabilities (N, n_classes) in batches, on the model's device."""
    preds, probs = [], []
    device = model_device(model)
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            p = torch.softmax(model(images[start:start + batch_size].to(device)).float(), dim=1).cpu()
            probs.append(p.numpy())
            preds.append(p.argmax(1).numpy())
    return np.concatenate(preds), np.concatenate(probs)


def _targets_for(group_by: str, labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    return labels if group_by == "true" else preds


def _subset(n_total: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_total)[:min(size, n_total)])


def _abs_maps(model, images, targets, method, batch_size, **kw) -> np.ndarray:
    """Per-image |attribution| summed over channels, (N, H, W), computed in batches."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        a = attribute(model, images[sl], torch.as_tensor(targets[sl]), method, **kw)
        out.append(a.detach().abs().sum(1).numpy())
    return np.concatenate(out) if out else np.zeros((0, *images.shape[-2:]))


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
    re-initialise; ``randomisation_note`` says so). Returns a JSON-able dict.
    """
    method_kwargs = method_kwargs or {}
    scorer = scoring_model if scoring_model is not None else model
    n, _, h, w = images.shape
    result = {"n_images": int(n), "grid": grid, "sanity_n_images": int(min(sanity_size, n)), "methods": {},
              "road_fractions": list(ROAD_FRACTIONS), "ink_threshold": INK_THRESHOLD,
              "random_logit_threshold": RANDOM_LOGIT_THRESHOLD, "sanity_max_spearman": SANITY_MAX_SPEARMAN}
    curves, per_image_score = {}, {}
    pixel_maps = {m: _abs_maps(model, images, targets, m, batch_size, **method_kwargs.get(m, {})) for m in methods}
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
            return {m: _abs_maps(m_, images[sub], targets[sub], m, batch_size, **sanity_kwargs[m]).reshape(-1, h * w)
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
                lambda x, t, m=m: _abs_maps(model, x, np.asarray(t), m, batch_size, **sanity_kwargs[m]),
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


def explain_model(model: nn.Module, images, labels, *, methods=None, group_by: str = "true", grid: int = 7,
                  batch_size: int | None = None, n_classes: int | None = None, progress: bool = False,
                  faithfulness_size: int = 500, sanity_size: int = 64, seed: int = 0,
                  gradcam_layer: str | None = None, ig_tolerance: float = IG_TOLERANCE, ig_n_steps: int | None = None,
                  device: str | torch.device | None = None, dist_context=None) -> dict:
    """Explain a model on images (N, C, H, W) in [0, 1] with labels (N,).

    Returns a dict with ``maps`` {method: ndarray (n_groups, grid, grid), sums to 1 per group, all-NaN
    for a group without mass}, ``empty_maps`` {method: [group names without mass]},
    ``gradcam_layer`` (the layer Grad-CAM read), ``unseen_patches`` ([row, col] of input patches
    no class score depends on),
    ``pixel_maps`` {method: (n_groups, H, W) mean |attribution|}, ``counts`` (n_groups,),
    ``group_names``, ``y_pred``, ``proba``, ``seconds`` {method: s}, ``integrated_gradients``
    (completeness summary) and ``faithfulness`` (see :func:`faithfulness_report`; skipped when
    ``faithfulness_size`` is 0).

    ``device`` ('auto' by default, see :func:`digitlens.device.resolve_device`): where the model
    runs; images stay on the CPU and go over batch by batch (``batch_size``: 250 on the CPU, 4,000
    on a GPU). ``dist_context`` (:func:`digitlens.distributed.context`): each rank attributes its
    share of the images and the per-group sums are added with ``all_reduce``; only rank 0 goes on
    to the faithfulness verdict (the other ranks' result has no ``faithfulness``).
    ``model`` may be a :class:`digitlens.external.UserModel` (a TorchScript or ONNX file with its
    declared preprocessing): it is explained on ``images`` as given, so attributions are on the
    [0, 1] pixels, not on the normalised tensor; ``user_model`` records what was declared and
    detected. An ONNX model runs forward only: occlusion (its default), feature ablation and
    Shapley value sampling; no randomisation check.
    """
    run_device = resolve_device(device)
    batch_size = batch_size or (250 if run_device.type == "cpu" else 4000)
    torch.manual_seed(seed)
    images = torch.as_tensor(images, dtype=torch.float32)
    labels_np = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[0] != labels_np.shape[0]:
        raise DigitlensError(f"images of shape {tuple(images.shape)}: expected (N, C, H, W) matching {labels_np.shape[0]} labels")
    if isinstance(model, UserModel):
        model = model.prepare(images).torch_module()
    frozen = prepare_model(model).to(run_device)
    methods = parse_methods(methods, frozen)
    y_pred, proba = predict(frozen, images)
    n_classes = n_classes or proba.shape[1]
    names = group_names(group_by, n_classes)
    targets = _targets_for(group_by, labels_np, y_pred)
    probe = images[:256]
    if set(methods) & set(CAM_METHODS):  # checked once: every position of the layer's map must reach the output
        gradcam_layer = gradcam_layer_name(frozen, probe, gradcam_layer)
    method_kwargs = {"gradcam": {"gradcam_layer": gradcam_layer}, "hirescam": {"gradcam_layer": gradcam_layer},
                     "integrated_gradients": {"tolerance": ig_tolerance, "n_steps": ig_n_steps}}
    if run_device.type != "cpu":  # a GPU wants many scaled images per pass (on the CPU 512 stay in cache)
        method_kwargs["integrated_gradients"]["internal_batch_size"] = 16384
    out = {"methods": list(methods), "group_by": group_by, "group_names": names, "grid": grid,
           "target": "true label" if group_by == "true" else "predicted label",
           "n_images": int(images.shape[0]), "maps": {}, "pixel_maps": {}, "seconds": {},
           "y_true": labels_np, "y_pred": y_pred, "proba": proba, "empty_maps": {}}
    if set(methods) & set(CAM_METHODS):
        out["gradcam_layer"] = gradcam_layer
    # Patches of the input that no class score depends on (none for digitlens' models): a map whose
    # largest patch lies there would point at what the model cannot see.
    if forward_only_file(frozen) is None:
        seen = pool_to_grid(layer_reach(frozen, None, probe).astype(np.float64), grid) > 0
        out["unseen_patches"] = [[int(r), int(c)] for r, c in zip(*np.nonzero(~seen))]
    else:  # no gradients to ask which input patches reach the output
        out["unseen_patches"] = []
    folded = fold_batch_norm(frozen)  # same function of the input, faster gradients
    share = distributed.shard(images.shape[0], dist_context)  # this rank's images (all of them for one process)
    main = dist_context is None or dist_context.is_main
    with _progress(progress and main) as bar:
        for method in methods:
            agg = PerDigitMaps(folded if method in INPUT_GRADIENT_METHODS else frozen, method, grid=grid,
                               group_by=group_by, n_classes=n_classes, **method_kwargs.get(method, {}))
            task = bar.add_task(f"{method:<22}", total=share.stop - share.start)
            synchronize(run_device)
            t0 = time.perf_counter()
            for start in range(share.start, share.stop, batch_size):
                sl = slice(start, min(start + batch_size, share.stop))
                agg.update(images[sl], torch.as_tensor(labels_np[sl]), torch.as_tensor(y_pred[sl]))
                bar.advance(task, images[sl].shape[0])
            if dist_context is not None:
                agg.all_reduce()
            synchronize(run_device)
            out["seconds"][method] = time.perf_counter() - t0
            out["maps"][method] = agg.maps()
            out["pixel_maps"][method] = agg.pixel_maps()
            out["counts"] = agg.counts_.copy()
            out["empty_maps"][method] = [names[g] for g in np.flatnonzero(~has_mass(out["maps"][method]))]
            if method == "integrated_gradients":
                info = agg.ig_info
                rel = np.asarray(info.rel_error)
                out["integrated_gradients"] = {
                    "tolerance": ig_tolerance, "n_steps": ig_n_steps or "adaptive",
                    "mean_steps": float(np.mean(info.steps)), "max_steps": int(np.max(info.steps)),
                    "mean_evaluated_steps": float(np.mean(info.evaluated_steps)),
                    "completeness_abs_error_mean": float(np.mean(info.abs_delta)),
                    "completeness_rel_error_mean": float(rel.mean()),
                    "completeness_rel_error_median": float(np.median(rel)),
                    "completeness_rel_error_p95": float(np.quantile(rel, 0.95)),
                    "fraction_above_tolerance": float((rel > ig_tolerance).mean()),
                }
    out["outer_ring_share"] = _outer_ring_shares(out, images, labels_np, y_pred)
    if faithfulness_size > 0 and main:
        idx = _subset(images.shape[0], faithfulness_size, seed)
        t0 = time.perf_counter()
        out["faithfulness"] = faithfulness_report(frozen, images[idx], targets[idx], methods, grid=grid, seed=seed,
                                           sanity_size=sanity_size, batch_size=batch_size,
                                           method_kwargs=method_kwargs, scoring_model=folded, n_classes=n_classes,
                                           randomisation=can_reinitialise(frozen))
        out["faithfulness"]["seconds"] = time.perf_counter() - t0
    return out


def load_run_split(run_dir, split: str = "test", data_dir=None):
    """The images and labels of ``split`` ('train', 'val' or 'test') of the run's dataset.

    For MNIST's test split only the test files are read (keeps memory low)."""
    from digitlens.data import load_mnist_split, load_splits_for_run, locate_mnist
    from digitlens.runio import read_json, require_run_dir

    run_dir = require_run_dir(run_dir)
    config = read_json(Path(run_dir) / "config.json")
    if split not in ("train", "val", "test"):
        raise DigitlensError(f"--split {split!r}: choose train, val or test")
    if config.get("dataset") == "mnist" and split == "test":
        folder = locate_mnist(data_dir if data_dir is not None else config.get("data_dir"))
        return load_mnist_split(folder, "test", verify=bool(config.get("verify", True)))
    return getattr(load_splits_for_run(config, data_dir=data_dir), split)


def _save_maps(explain_dir: Path, result: dict) -> dict:
    from digitlens.runio import write_npz

    files = {}
    for method in result["methods"]:
        path = write_npz(explain_dir / f"maps_{method}.npz", maps=result["maps"][method],
                         has_mass=has_mass(result["maps"][method]), pixel_maps=result["pixel_maps"][method],
                         counts=result["counts"], group_names=np.asarray(result["group_names"]))
        files[method] = path.name
    return files


def load_maps(run_dir, method: str) -> dict:
    """The saved per-group maps of ``method`` in ``run_dir/explain/``: dict of ndarrays
    (maps (G, grid, grid), pixel_maps (G, H, W), counts (G,), group_names (G,))."""
    from digitlens.runio import read_npz

    return read_npz(Path(run_dir) / "explain" / f"maps_{method}.npz")


def _overlay_examples(frozen, images, y_true, y_pred, proba, method, method_kwargs, n=8, seed=0):
    """Per-image attributions for a prediction gallery and a misclassified gallery."""
    rng = np.random.default_rng(seed)
    correct = np.flatnonzero(y_true == y_pred)
    wrong = np.flatnonzero(y_true != y_pred)
    chosen = np.sort(rng.permutation(correct)[:n]) if correct.size else correct
    # most confident mistakes first: the most surprising ones
    wrong = wrong[np.argsort(-proba[wrong, y_pred[wrong]])][:n]
    galleries = {}
    for name, idx in (("predictions", chosen), ("misclassified", wrong)):
        if idx.size == 0:
            continue
        x = images[idx]
        pred_map = _abs_maps(frozen, x, y_pred[idx], method, len(idx), **method_kwargs)
        true_map = _abs_maps(frozen, x, y_true[idx], method, len(idx), **method_kwargs) if name == "misclassified" else None
        galleries[name] = dict(images=x[:, 0].numpy(), heatmaps=pred_map, second_heatmaps=true_map,
                               y_true=y_true[idx], y_pred=y_pred[idx], proba=proba[idx, y_pred[idx]], indices=idx)
    return galleries


def write_figures(run_dir: Path, result: dict, model: nn.Module, images: torch.Tensor, *, image_index: int = 0,
                  overlay_method: str | None = None, method_kwargs=None, fig_dir: Path | None = None) -> list[str]:
    """All figures of the explain stage under ``fig_dir`` (default ``run_dir/explain/figures/``);
    returns their PNG names."""
    plt = pyplot()  # Agg unless MPLBACKEND chose a backend
    from digitlens.plots.faithfulness import FaithfulnessDisplay
    from digitlens.plots.filters import FeatureMapsDisplay, FiltersDisplay
    from digitlens.plots.heatmaps import PerDigitMapsDisplay
    from digitlens.plots.overlays import AttributionOverlayDisplay
    from digitlens.runio import save_figure

    fig_dir = run_dir / "explain" / "figures" if fig_dir is None else Path(fig_dir)
    written = []
    name = run_dir.name

    def save(display, stem):
        save_figure(display.figure_, fig_dir / stem)
        plt.close(display.figure_)
        written.append(f"{stem}.png")

    for method in result["methods"]:
        disp = PerDigitMapsDisplay(maps=result["maps"][method], group_names=result["group_names"],
                                   title=f"{name}: {method} per {'digit' if result['group_by'] != 'correct' else 'group'}"
                                         f" ({result['group_by']} label, n={result['n_images']})")
        save(disp.plot(), f"per_digit_{method}")
    frozen = prepare_model(model)
    overlay_method = overlay_method or next((m for m in ("integrated_gradients", "saliency") if m in result["methods"]),
                                            result["methods"][0])
    galleries = _overlay_examples(frozen, images, result["y_true"], result["y_pred"], result["proba"], overlay_method,
                                  (method_kwargs or {}).get(overlay_method, {}))
    for gname, g in galleries.items():
        title = (f"{name}: why these predictions ({overlay_method})" if gname == "predictions"
                 else f"{name}: misclassified, most confident first ({overlay_method})")
        disp = AttributionOverlayDisplay(images=g["images"], heatmaps=g["heatmaps"], second_heatmaps=g["second_heatmaps"],
                                         y_true=g["y_true"], y_pred=g["y_pred"], proba=g["proba"], title=title)
        save(disp.plot(), f"overlays_{gname}")
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):  # a TorchScript or ONNX file shows none
        save(FiltersDisplay.from_model(model).plot(), "filters_first_layer")
    fm = FeatureMapsDisplay.from_model(model, images[image_index:image_index + 1])
    if fm is not None:
        save(fm.plot(), "feature_maps")
    if "faithfulness" in result:
        save(FaithfulnessDisplay(metrics=result["faithfulness"], title=f"{name}: how faithful is each method").plot(),
             "faithfulness")
    return written


def _outer_ring_shares(result: dict, images: torch.Tensor, labels: np.ndarray, y_pred: np.ndarray) -> dict:
    """Share of each group's map on the outer ring of grid cells, per method, and the same share of
    the group's ink (``"ink"``): {name: [share per group, None where the map has no mass]}.
    On MNIST the ring (pixels 0-3 and 24-27 of a 7x7 grid) holds a few percent of the ink, so a
    map with much more mass there points at background."""
    grid = result["grid"]
    ring = np.ones((grid, grid), dtype=bool)
    ring[1:-1, 1:-1] = False
    groups = {"true": labels, "predicted": y_pred, "correct": (y_pred == labels).astype(np.int64)}[result["group_by"]]
    n_groups = len(result["group_names"])
    ink = np.zeros((n_groups, *images.shape[-2:]))
    np.add.at(ink, groups, images.sum(dim=1).double().numpy())
    maps = {"ink": normalise_maps(pool_to_grid(ink, grid)), **result["maps"]}
    return {name: [float(m[ring].sum()) if np.isfinite(m).all() else None for m in group_maps]
            for name, group_maps in maps.items()}


def _peaks_on_unseen(result: dict) -> dict:
    """{method: [group names whose largest patch is one no class score depends on]}."""
    unseen = {tuple(p) for p in result.get("unseen_patches", [])}
    out = {}
    for method, maps in result["maps"].items():
        bad = []
        for name, m in zip(result["group_names"], maps):
            if np.isfinite(m).all() and unseen:
                r, c = np.unravel_index(int(np.argmax(m)), m.shape)
                if (int(r), int(c)) in unseen:
                    bad.append(name)
        out[method] = bad
    return out


def _json_summary(result: dict) -> dict:
    keep = ("methods", "group_by", "group_names", "grid", "target", "n_images", "seconds", "integrated_gradients",
            "gradcam_layer", "empty_maps", "unseen_patches", "outer_ring_share", "faithfulness", "comparison")
    summary = {k: result[k] for k in keep if k in result}
    summary["counts"] = result["counts"].tolist()
    summary["peaks_on_unseen_patches"] = _peaks_on_unseen(result)
    if "faithfulness" in result:  # the verdict at the top level, as every reader quotes it
        f = result["faithfulness"]
        summary.update(most_faithful=f["most_faithful"], ranking=f["ranking"], verdict=f["verdict"])
    return summary


def explain_run(run_dir, *, methods=None, group_by: str = "true", grid: int = 7, data_dir=None, split: str = "test",
                batch_size: int | None = None, progress: bool = True, compare=None, compare_methods: bool = False,
                faithfulness_size: int = 500, sanity_size: int = 64, gradcam_layer: str | None = None,
                ig_tolerance: float = IG_TOLERANCE, ig_n_steps: int | None = None, image_index: int = 0,
                figures: bool = True, seed: int = 0, device: str | torch.device | None = None,
                preprocessing: dict | None = None, trust_code: bool = False) -> dict | None:
    """Explain the model of ``run_dir`` on a whole split and write ``run_dir/explain/``:
    ``maps_<method>.npz`` (maps (G, grid, grid), pixel_maps, counts, group_names), ``manifest.json``,
    ``explain_metrics.json`` and ``figures/``. ``compare`` (another run folder) adds side-by-side
    figures with the difference; ``compare_methods`` compares the first two methods.
    Returns the summary written to ``explain_metrics.json`` plus ``files``.

    Under torchrun (``WORLD_SIZE`` > 1) the split is sharded across the processes, the per-digit
    sums are added with ``all_reduce`` and rank 0 alone computes the verdict and writes; the other
    ranks return None.

    A folder written by ``evaluate --model-file`` (its config.json names ``model_file``) explains
    that file with the preprocessing recorded there; ``preprocessing`` (a dict) overrides the keys
    it holds; a TorchScript file needs ``trust_code`` unless that folder recorded its trust
    (:func:`digitlens.external.trusted_by_record`).
    """
    from digitlens.models import load_model
    from digitlens.runio import read_json, require_run_dir

    run_dir = require_run_dir(run_dir)
    config = read_json(run_dir / "config.json")
    run_device = distributed.rank_device(resolve_device(device))
    ctx = distributed.context(run_device)
    lock = contextlib.ExitStack()
    try:
        # Rank 0 alone writes explain/, so it alone holds the run folder's writer lock.
        distributed.rank0_decides(ctx, lambda: (require_run_dir(run_dir),
                                                lock.enter_context(run_lock(run_dir, "explain"))) and None)
        data = load_run_split(run_dir, split, data_dir)
        user_info = None
        if config.get("model_file"):
            user = load_user_model(config["model_file"], {**(config.get("preprocessing") or {}), **(preprocessing or {})},
                                   trust_code=trust_code or trusted_by_record(config))
            model = user.prepare(data.images).torch_module()
            user_info = user.describe()
        elif preprocessing:
            raise DigitlensError(f"{run_dir}: --input-scale/--normalize/--outputs describe a user's model "
                                 "(evaluate --model-file); a digitlens run normalises its own inputs")
        else:
            model = load_model(run_dir)
        if figures and not 0 <= image_index < len(data):
            raise DigitlensError(f"--image-index {image_index}: must be between 0 and {len(data) - 1}")
        result = explain_model(model, data.images, data.labels.numpy(), methods=methods, group_by=group_by, grid=grid,
                               batch_size=batch_size, progress=progress, faithfulness_size=faithfulness_size,
                               sanity_size=sanity_size, seed=seed, gradcam_layer=gradcam_layer, ig_tolerance=ig_tolerance,
                               ig_n_steps=ig_n_steps, device=run_device, dist_context=ctx)
        summary = None
        if ctx is None or ctx.is_main:
            summary = _write_explain_dir(run_dir, result, model, data, split=split, compare=compare,
                                         compare_methods=compare_methods, data_dir=data_dir, batch_size=batch_size,
                                         progress=progress, gradcam_layer=gradcam_layer, ig_tolerance=ig_tolerance,
                                         ig_n_steps=ig_n_steps, image_index=image_index, figures=figures,
                                         user_info=user_info)
        distributed.barrier(ctx)  # no rank returns before rank 0 has written explain/
        return summary
    finally:
        lock.close()
        distributed.finish(ctx)


def _write_explain_dir(run_dir: Path, result: dict, model, data, *, split, compare, compare_methods, data_dir,
                       batch_size, progress, gradcam_layer, ig_tolerance, ig_n_steps, image_index, figures,
                       user_info=None) -> dict:
    """Write ``run_dir/explain/`` (maps, figures, comparisons, metrics, manifest) for ``result``."""
    from digitlens.runio import staged_dir

    # The whole of explain/ is written into a temporary sibling and swapped in at the end, so a
    # reader (explain --compare, report) finds the old output or the new one, never a mix.
    with staged_dir(run_dir / "explain") as explain_dir:
        return _write_explain_files(run_dir, explain_dir, result, model, data, split=split, compare=compare,
                                    compare_methods=compare_methods, data_dir=data_dir, batch_size=batch_size,
                                    progress=progress, gradcam_layer=gradcam_layer, ig_tolerance=ig_tolerance,
                                    ig_n_steps=ig_n_steps, image_index=image_index, figures=figures,
                                    user_info=user_info)


def _write_explain_files(run_dir: Path, explain_dir: Path, result: dict, model, data, *, split, compare,
                         compare_methods, data_dir, batch_size, progress, gradcam_layer, ig_tolerance, ig_n_steps,
                         image_index, figures, user_info=None) -> dict:
    """Write the files of ``run_dir``'s explain stage into ``explain_dir``; return the summary."""
    from digitlens.runio import figure_batch, write_json

    map_files = _save_maps(explain_dir, result)
    figs = []
    # The overlays show single images, so their integrated gradients use a fixed fine rule rather
    # than the completeness-adaptive one of the per-digit maps: 128 steps are 0.6-0.8% (mean
    # relative L1) from a 512-step reference on the default MNIST CNN after 1 and 3 epochs, the
    # adaptive default 5-6%. Up to 24 images make this cheap.
    method_kwargs = {"gradcam": {"gradcam_layer": result.get("gradcam_layer", gradcam_layer)},
                     "hirescam": {"gradcam_layer": result.get("gradcam_layer", gradcam_layer)},
                     "integrated_gradients": {"n_steps": ig_n_steps or OVERLAY_IG_STEPS}}
    with figure_batch():  # the figures are drawn by worker processes while the comparison computes
        if figures:
            figs = write_figures(run_dir, result, model, data.images, image_index=image_index,
                                 method_kwargs=method_kwargs, fig_dir=explain_dir / "figures")
        if compare is not None or compare_methods:
            figs += _write_comparisons(run_dir, result, compare, compare_methods, fig_dir=explain_dir / "figures",
                                       data_dir=data_dir, split=split,
                                       batch_size=batch_size, progress=progress, gradcam_layer=gradcam_layer,
                                       ig_tolerance=ig_tolerance, ig_n_steps=ig_n_steps)
    summary = _json_summary(result)
    summary.update(run=str(run_dir), split=split, dataset=data.name,
                   files={"maps": map_files, "figures": figs, "metrics": "explain_metrics.json"})
    if user_info is not None:
        summary["user_model"] = user_info
    write_json(explain_dir / "explain_metrics.json", summary)
    manifest = {k: summary[k] for k in ("run", "split", "dataset", "methods", "group_by", "group_names", "grid",
                                         "target", "n_images", "counts", "files")}
    manifest["map_arrays"] = {"maps": "(n_groups, grid, grid), each map sums to 1; all-NaN for a group without mass "
                                      "(no images, or attribution zero on every image)",
                              "has_mass": "(n_groups,) bool, False where maps is all-NaN",
                              "pixel_maps": "(n_groups, H, W), mean |attribution| per group",
                              "counts": "(n_groups,) images per group", "group_names": "(n_groups,)"}
    write_json(explain_dir / "manifest.json", manifest)
    return summary


def _saved_maps(run_dir: Path, methods, result: dict, split: str) -> dict:
    """The maps of ``methods`` that ``run_dir/explain/`` already holds for the same split, number of
    images, grouping and grid as ``result`` ({method: (n_groups, grid, grid)}); methods not saved there are left out."""
    from digitlens.runio import read_json

    manifest_path = run_dir / "explain" / "manifest.json"
    if not manifest_path.is_file():
        return {}
    manifest = read_json(manifest_path)
    same = {"split": split, "group_by": result["group_by"], "grid": result["grid"], "n_images": result["n_images"]}
    if any(manifest.get(key) != value for key, value in same.items()):
        return {}
    saved = manifest.get("files", {}).get("maps", {})
    return {m: load_maps(run_dir, m)["maps"] for m in methods if m in saved}


def _paired_accuracy_test(result: dict, name_a: str, name_b: str, other_model: nn.Module, data) -> dict:
    """McNemar's exact test (and the paired bootstrap) of this run's predictions against the other
    run's on the same images (:func:`digitlens.comparison.compare_predictions`); a note instead
    when the two splits are not the same images."""
    labels_b = data.labels.numpy()
    if labels_b.shape != result["y_true"].shape or not np.array_equal(labels_b, result["y_true"]):
        return {"note": f"{name_b} was explained on other images than {name_a}: no paired test"}
    pred_b, _ = predict(prepare_model(other_model), data.images)
    out = compare_predictions(result["y_true"], result["y_pred"], pred_b, name_a, name_b)
    return {k: out[k] for k in ("name_a", "name_b", "n_images", "b", "c", "mcnemar_p", "accuracy_difference",
                                "accuracy_difference_ci", "significant", "caption") if k in out}


def _write_comparisons(run_dir: Path, result: dict, compare, compare_methods: bool, *, fig_dir: Path,
                       **kw) -> list[str]:
    plt = pyplot()
    from digitlens.models import load_model
    from digitlens.plots.heatmaps import PerDigitMapsComparisonDisplay
    from digitlens.runio import save_figure

    written = []
    pairs = []
    if compare_methods:
        if len(result["methods"]) < 2:
            raise DigitlensError("--compare-methods: give at least two --methods")
        a, b = result["methods"][:2]
        pairs.append((f"{a}_vs_{b}", result["maps"][a], result["maps"][b], f"{run_dir.name}: {a}", f"{run_dir.name}: {b}",
                      None))
    if compare is not None:
        other = Path(compare)
        other_model = load_model(other)
        other_methods = [m for m in result["methods"] if m in parse_methods(None, prepare_model(other_model))
                         or m in INPUT_GRADIENT_METHODS]
        if not other_methods:
            raise DigitlensError(f"--compare {other}: no method applies to both runs")
        other_maps = _saved_maps(other, other_methods, result, kw["split"])
        missing = [m for m in other_methods if m not in other_maps]
        data = load_run_split(other, kw["split"], kw["data_dir"])
        result["comparison"] = _paired_accuracy_test(result, run_dir.name, other.name, other_model, data)
        if missing:
            other_result = explain_model(other_model, data.images, data.labels.numpy(), methods=missing,
                                         group_by=result["group_by"], grid=result["grid"], batch_size=kw["batch_size"],
                                         progress=kw["progress"], faithfulness_size=0, gradcam_layer=kw["gradcam_layer"],
                                         ig_tolerance=kw["ig_tolerance"], ig_n_steps=kw["ig_n_steps"])
            other_maps.update(other_result["maps"])
        caption = result["comparison"].get("caption")  # the paired accuracy test, on every run-vs-run figure
        for m in other_methods:
            pairs.append((f"{m}_{run_dir.name}_vs_{other.name}", result["maps"][m], other_maps[m],
                          f"{run_dir.name}: {m}", f"{other.name}: {m}", textwrap.fill(caption, 160) if caption else None))
    for stem, maps_a, maps_b, name_a, name_b, title in pairs:
        disp = PerDigitMapsComparisonDisplay(maps_a=maps_a, maps_b=maps_b, name_a=name_a, name_b=name_b,
                                             group_names=result["group_names"], title=title).plot()
        save_figure(disp.figure_, fig_dir / f"compare_{stem}")
        plt.close(disp.figure_)
        written.append(f"compare_{stem}.png")
    return written
