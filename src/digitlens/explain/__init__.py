"""Explanations: where a digit model looks, digit by digit, and how far each picture can be trusted.

``explain_run(run_dir)`` writes ``runs/NAME/explain/``; ``explain_model(model, images, labels)``
works on any nn.Module; ``PerDigitMaps(model, method).attribute(images, labels)`` gives the
per-digit maps of one method; ``attribute(model, images, target, method)`` one batch of
per-image maps.
"""

from digitlens.explain.aggregate import GROUP_BY, PerDigitMaps, normalise_maps, pool_to_grid
from digitlens.explain.faithfulness import (cascading_randomisation, curve_auc, patch_order, perturbation_curves,
                                            random_order, spearman_rows)
from digitlens.explain.methods import (METHODS, attention_rollout, attribute, class_token_attention,
                                       default_methods, integrated_gradients, prepare_model)
from digitlens.explain.run import explain_model, explain_run, faithfulness, load_maps

__all__ = [
    "GROUP_BY", "METHODS", "PerDigitMaps", "attention_rollout", "attribute", "cascading_randomisation",
    "class_token_attention", "curve_auc", "default_methods", "explain_model", "explain_run", "faithfulness",
    "integrated_gradients", "load_maps", "normalise_maps", "patch_order", "perturbation_curves", "pool_to_grid",
    "prepare_model", "random_order", "spearman_rows",
]
