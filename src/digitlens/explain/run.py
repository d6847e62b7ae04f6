"""The explain stage's orchestration: ``explain_model`` (any nn.Module, from Python) and
``explain_run`` (a run folder -> ``explain/``).

It predicts (:func:`digitlens.inference.predict`), streams the images through
:class:`~digitlens.explain.aggregate.PerDigitMaps` for each method, asks
:func:`~digitlens.explain.scoring.faithfulness_report` for the verdict, and writes the maps
(:mod:`~digitlens.explain.maps`), the figures (:mod:`~digitlens.explain.figures`, listed in
``explain/figures.json``) and ``explain_metrics.json``, all into one staged folder.
"""

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
from digitlens.data import load_mnist_split, load_splits_for_run, locate_mnist
from digitlens.device import resolve_device, synchronize
from digitlens.errors import DigitlensError
from digitlens.explain.aggregate import PerDigitMaps
from digitlens.explain.figures import MapsComparison, write_comparison_figures, write_figures
from digitlens.explain.maps import (group_names, has_mass, outer_ring_shares, peaks_on_unseen_patches, pool_to_grid,
                                    save_maps, saved_maps, write_maps_manifest)
from digitlens.explain.methods import (CAM_METHODS, IG_TOLERANCE, INPUT_GRADIENT_METHODS, fold_batch_norm,
                                       forward_only_file, gradcam_layer_name, layer_reach, parse_methods, prepare_model)
from digitlens.explain.scoring import can_reinitialise, faithfulness_report
from digitlens.external import UserModel, load_user_model, trusted_by_record
from digitlens.figure_writer import FigureWriter
from digitlens.inference import predict
from digitlens.models import load_model
from digitlens.progress import progress_bar
from digitlens.runio import read_json, require_run_dir, run_lock, staged_dir, write_json

#: Integrated-gradients steps (Captum's Gauss-Legendre rule) for the per-image overlays.
OVERLAY_IG_STEPS = 128


def _targets_for(group_by: str, labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    return labels if group_by == "true" else preds


def _subset(n_total: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_total)[:min(size, n_total)])


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
    with progress_bar(progress and main) as bar:
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
    out["outer_ring_share"] = outer_ring_shares(out, images, labels_np, y_pred)
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
    run_dir = require_run_dir(run_dir)
    config = read_json(Path(run_dir) / "config.json")
    if split not in ("train", "val", "test"):
        raise DigitlensError(f"--split {split!r}: choose train, val or test")
    if config.get("dataset") == "mnist" and split == "test":
        folder = locate_mnist(data_dir if data_dir is not None else config.get("data_dir"))
        return load_mnist_split(folder, "test", verify=bool(config.get("verify", True)))
    return getattr(load_splits_for_run(config, data_dir=data_dir), split)


def _json_summary(result: dict) -> dict:
    keep = ("methods", "group_by", "group_names", "grid", "target", "n_images", "seconds", "integrated_gradients",
            "gradcam_layer", "empty_maps", "unseen_patches", "outer_ring_share", "faithfulness", "comparison")
    summary = {k: result[k] for k in keep if k in result}
    summary["counts"] = result["counts"].tolist()
    summary["peaks_on_unseen_patches"] = peaks_on_unseen_patches(result)
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
    """Write the files of ``run_dir``'s explain stage into ``explain_dir``: the maps and their
    ``manifest.json``, the figures and their ``figures.json``, ``explain_metrics.json``; return the summary."""
    map_files = save_maps(explain_dir, result)
    figs = []
    # The overlays show single images, so their integrated gradients use a fixed fine rule rather
    # than the completeness-adaptive one of the per-digit maps: 128 steps are 0.6-0.8% (mean
    # relative L1) from a 512-step reference on the default MNIST CNN after 1 and 3 epochs, the
    # adaptive default 5-6%. Up to 24 images make this cheap.
    method_kwargs = {"gradcam": {"gradcam_layer": result.get("gradcam_layer", gradcam_layer)},
                     "hirescam": {"gradcam_layer": result.get("gradcam_layer", gradcam_layer)},
                     "integrated_gradients": {"n_steps": ig_n_steps or OVERLAY_IG_STEPS}}
    # With figure workers the figures are drawn by other processes while the comparison computes.
    with FigureWriter(explain_dir, "explain") as writer:
        if figures:
            figs = write_figures(writer, run_dir.name, result, model, data.images, split=split, image_index=image_index,
                                 method_kwargs=method_kwargs)
        if compare is not None or compare_methods:
            comparisons = _comparisons(run_dir, result, compare, compare_methods, data_dir=data_dir, split=split,
                                       batch_size=batch_size, progress=progress, gradcam_layer=gradcam_layer,
                                       ig_tolerance=ig_tolerance, ig_n_steps=ig_n_steps)
            figs += write_comparison_figures(writer, comparisons, group_names=result["group_names"],
                                             group_by=result["group_by"], split=split)
    summary = _json_summary(result)
    summary.update(run=str(run_dir), split=split, dataset=data.name,
                   files={"maps": map_files, "figures": figs, "metrics": "explain_metrics.json"})
    if user_info is not None:
        summary["user_model"] = user_info
    write_json(explain_dir / "explain_metrics.json", summary)
    write_maps_manifest(explain_dir, summary)
    return summary


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


def _comparisons(run_dir: Path, result: dict, compare, compare_methods: bool, **kw) -> list[MapsComparison]:
    """The maps to draw side by side: the first two methods of ``result`` (``compare_methods``) and
    each method that applies to both runs against the other run ``compare`` (its saved maps when
    its explain/ folder matches, else explained here). Adds ``result["comparison"]`` (the paired
    accuracy test) when ``compare`` is given."""
    comparisons = []
    if compare_methods:
        if len(result["methods"]) < 2:
            raise DigitlensError("--compare-methods: give at least two --methods")
        a, b = result["methods"][:2]
        comparisons.append(MapsComparison(f"{a}_vs_{b}", result["maps"][a], result["maps"][b], f"{run_dir.name}: {a}",
                                          f"{run_dir.name}: {b}", methods=(a, b), runs=(run_dir.name, run_dir.name)))
    if compare is not None:
        other = Path(compare)
        other_model = load_model(other)
        other_methods = [m for m in result["methods"] if m in parse_methods(None, prepare_model(other_model))
                         or m in INPUT_GRADIENT_METHODS]
        if not other_methods:
            raise DigitlensError(f"--compare {other}: no method applies to both runs")
        other_maps = saved_maps(other, other_methods, result, kw["split"])
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
            comparisons.append(MapsComparison(f"{m}_{run_dir.name}_vs_{other.name}", result["maps"][m], other_maps[m],
                                              f"{run_dir.name}: {m}", f"{other.name}: {m}", methods=(m, m),
                                              runs=(run_dir.name, other.name),
                                              caption=textwrap.fill(caption, 160) if caption else None))
    return comparisons
