"""The figures of the explain stage, drawn with the Display classes of :mod:`digitlens.plots` and
saved through a :class:`digitlens.figure_writer.FigureWriter` whose folder is ``RUN/explain/``:
the files go to ``figures/`` and each is listed in ``RUN/explain/figures.json`` with its kind,
section, method(s), grouping and split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from digitlens.explain.methods import abs_attribution_maps, prepare_model
from digitlens.figure_writer import FigureWriter
from digitlens.pyplot import pyplot
from digitlens.plots.faithfulness import FaithfulnessDisplay
from digitlens.plots.filters import FeatureMapsDisplay, FiltersDisplay
from digitlens.plots.heatmaps import PerDigitMapsComparisonDisplay, PerDigitMapsDisplay
from digitlens.plots.overlays import AttributionOverlayDisplay

#: The sub-folder of ``RUN/explain/`` that holds the figure files.
FIGURE_FOLDER = "figures"


@dataclass
class MapsComparison:
    """Two sets of per-group maps (n_groups, grid, grid) to draw side by side, with their difference.
    ``stem``: the file name after ``compare_``; ``methods``: the method of each side;
    ``runs``: the run of each side; ``caption``: a line drawn above the figure (or None)."""

    stem: str
    maps_a: np.ndarray
    maps_b: np.ndarray
    name_a: str
    name_b: str
    methods: tuple[str, str]
    runs: tuple[str, str]
    caption: str | None = None


def overlay_examples(frozen: nn.Module, images: torch.Tensor, y_true, y_pred, proba, method: str, method_kwargs,
                     n: int = 8, seed: int = 0) -> dict:
    """Per-image attributions for a prediction gallery (up to ``n`` right predictions, drawn at
    random) and a misclassified gallery (the ``n`` most confident mistakes): {gallery name: dict of
    images (n, H, W), heatmaps (n, H, W) towards the prediction, second_heatmaps (towards the true
    label, misclassified only), y_true, y_pred, proba of the prediction, indices}."""
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
        pred_map = abs_attribution_maps(frozen, x, y_pred[idx], method, len(idx), **method_kwargs)
        true_map = (abs_attribution_maps(frozen, x, y_true[idx], method, len(idx), **method_kwargs)
                    if name == "misclassified" else None)
        galleries[name] = dict(images=x[:, 0].numpy(), heatmaps=pred_map, second_heatmaps=true_map,
                               y_true=y_true[idx], y_pred=y_pred[idx], proba=proba[idx, y_pred[idx]], indices=idx)
    return galleries


def write_figures(writer: FigureWriter, run_name: str, result: dict, model: nn.Module, images: torch.Tensor, *,
                  split: str, image_index: int = 0, overlay_method: str | None = None,
                  method_kwargs=None) -> list[str]:
    """Draw the figures of one explained run (``result`` of :func:`digitlens.explain.run.explain_model`)
    into ``writer``'s ``figures/``: the per-group maps of each method, the attribution overlays,
    the first-layer filters and feature maps (convolutional models) and the faithfulness verdict.
    Returns the PNG file names (relative to ``figures/``)."""
    plt = pyplot()  # Agg unless MPLBACKEND chose a backend
    written = []
    group_by, methods = result["group_by"], list(result["methods"])
    shows = dict(group_by=group_by, split=split, run=run_name)

    def save(display, stem, *, kind, section, title, **what):
        writer.save(display.figure_, f"{FIGURE_FOLDER}/{stem}", kind=kind, section=section, title=title,
                    **shows, **what)
        plt.close(display.figure_)
        written.append(f"{stem}.png")

    per = "digit" if group_by != "correct" else "group"
    for method in methods:
        title = f"{run_name}: {method} per {per} ({group_by} label, n={result['n_images']})"
        disp = PerDigitMapsDisplay(maps=result["maps"][method], group_names=result["group_names"], title=title)
        save(disp.plot(), f"per_digit_{method}", kind="heatmap", section="explanations", title=title, method=method)
    frozen = prepare_model(model)
    overlay_method = overlay_method or next((m for m in ("integrated_gradients", "saliency") if m in methods),
                                            methods[0])
    galleries = overlay_examples(frozen, images, result["y_true"], result["y_pred"], result["proba"], overlay_method,
                                 (method_kwargs or {}).get(overlay_method, {}))
    for gname, g in galleries.items():
        title = (f"{run_name}: why these predictions ({overlay_method})" if gname == "predictions"
                 else f"{run_name}: misclassified, most confident first ({overlay_method})")
        disp = AttributionOverlayDisplay(images=g["images"], heatmaps=g["heatmaps"], second_heatmaps=g["second_heatmaps"],
                                         y_true=g["y_true"], y_pred=g["y_pred"], proba=g["proba"], title=title)
        save(disp.plot(), f"overlays_{gname}", kind="overlay" if gname == "predictions" else "overlay_misclassified",
             section="galleries", title=title, method=overlay_method)
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):  # a TorchScript or ONNX file shows none
        filters = FiltersDisplay.from_model(model)
        save(filters.plot(), "filters_first_layer", kind="filters", section="filters",
             title=f"{run_name}: the filters of the first convolution ({filters.layer_name})", module=filters.layer_name)
    fm = FeatureMapsDisplay.from_model(model, images[image_index:image_index + 1])
    if fm is not None:
        save(fm.plot(), "feature_maps", kind="feature_maps", section="filters",
             title=f"{run_name}: conv feature maps of image {image_index} of the {split} split, most active channels",
             image_index=image_index)
    if "faithfulness" in result:
        title = f"{run_name}: how faithful is each method"
        save(FaithfulnessDisplay(metrics=result["faithfulness"], title=title).plot(), "faithfulness",
             kind="faithfulness", section="explanations", title=title, methods=methods)
    return written


def write_comparison_figures(writer: FigureWriter, comparisons: list[MapsComparison], *, group_names, group_by: str,
                             split: str) -> list[str]:
    """Draw each :class:`MapsComparison` (A, B on one colour scale, and A - B) into ``writer``'s
    ``figures/compare_<stem>``; returns the PNG file names (relative to ``figures/``)."""
    plt = pyplot()
    written = []
    for c in comparisons:
        disp = PerDigitMapsComparisonDisplay(maps_a=c.maps_a, maps_b=c.maps_b, name_a=c.name_a, name_b=c.name_b,
                                             group_names=group_names, title=c.caption).plot()
        what = ({"method": c.methods[0], "runs": list(c.runs)} if c.methods[0] == c.methods[1]
                else {"methods": list(c.methods), "run": c.runs[0]})
        writer.save(disp.figure_, f"{FIGURE_FOLDER}/compare_{c.stem}", kind="heatmap_compare", section="explanations",
                    title=f"{c.name_a} vs {c.name_b}, and their difference", group_by=group_by, split=split, **what)
        plt.close(disp.figure_)
        written.append(f"compare_{c.stem}.png")
    return written
