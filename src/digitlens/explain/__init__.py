"""Explanations: where a digit model looks, digit by digit, and how far each picture can be trusted.

``explain_run(run_dir)`` writes ``runs/NAME/explain/``; ``explain_model(model, images, labels)``
works on any nn.Module (both in :mod:`~digitlens.explain.run`, the orchestration);
``PerDigitMaps(model, method).attribute(images, labels)`` gives the per-digit maps of one method;
``attribute(model, images, target, method)`` one batch of per-image maps;
``faithfulness_report(model, images, targets, methods)`` the faithfulness verdict (ROAD,
deletion/insertion, the randomisation and random-logit checks; :mod:`~digitlens.explain.scoring`).
Map files, grouping and pooling live in the floor module :mod:`~digitlens.explain.maps`, the
stage's figures in :mod:`~digitlens.explain.figures`.

The names below are loaded on first use (PEP 562), so that importing the floor module
``digitlens.explain.maps`` (as the figures in :mod:`digitlens.plots` do) does not load the stage
modules above it.
"""

import importlib

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "PerDigitMaps": "aggregate",
    **dict.fromkeys(("cascading_randomisation", "curve_auc", "ink_random_order", "patch_order", "perturbation_curves",
                     "random_logit_similarity", "random_order", "spearman_rows"), "faithfulness"),
    **dict.fromkeys(("GROUP_BY", "GroupedMaps", "has_mass", "load_maps", "normalise_maps", "pool_to_grid"), "maps"),
    **dict.fromkeys(("METHODS", "attention_rollout", "attribute", "class_token_attention", "default_methods",
                     "gradcam_layer_name", "integrated_gradients", "layer_reach", "prepare_model"), "methods"),
    **dict.fromkeys(("linear_imputation", "road_auc", "road_curves"), "road"),
    **dict.fromkeys(("explain_model", "explain_run"), "run"),
    "faithfulness_report": "scoring",
    "rank_methods": "verdict",
}

_SUBMODULES = ("aggregate", "faithfulness", "figures", "maps", "methods", "road", "run", "scoring", "verdict")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
