"""Explanations: where a digit model looks, digit by digit, and how far each picture can be trusted.

``explain_run(run_dir)`` writes ``runs/NAME/explain/``; ``explain_model(model, images, labels)``
works on any nn.Module; ``PerDigitMaps(model, method).attribute(images, labels)`` gives the
per-digit maps of one method; ``attribute(model, images, target, method)`` one batch of
per-image maps; ``faithfulness_report(model, images, targets, methods)`` the faithfulness
verdict (ROAD, deletion/insertion, the randomisation and random-logit checks).
"""

from digitlens.explain.aggregate import GROUP_BY, PerDigitMaps, has_mass, normalise_maps, pool_to_grid
from digitlens.explain.faithfulness import (cascading_randomisation, curve_auc, ink_random_order, patch_order,
                                            perturbation_curves, random_logit_similarity, random_order,
                                            spearman_rows)
from digitlens.explain.methods import (METHODS, attention_rollout, attribute, class_token_attention,
                                       default_methods, gradcam_layer_name, integrated_gradients, layer_reach,
                                       prepare_model)
from digitlens.explain.road import linear_imputation, road_auc, road_curves
from digitlens.explain.run import explain_model, explain_run, faithfulness_report, load_maps
from digitlens.explain.verdict import rank_methods

__all__ = [
    "GROUP_BY", "METHODS", "PerDigitMaps", "attention_rollout", "attribute", "cascading_randomisation",
    "class_token_attention", "curve_auc", "default_methods", "explain_model", "explain_run", "faithfulness_report",
    "gradcam_layer_name", "has_mass", "ink_random_order", "integrated_gradients", "layer_reach", "linear_imputation",
    "load_maps", "normalise_maps", "patch_order", "perturbation_curves", "pool_to_grid", "prepare_model",
    "random_logit_similarity", "random_order", "rank_methods", "road_auc", "road_curves", "spearman_rows",
]
