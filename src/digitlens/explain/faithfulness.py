"""How far to trust an attribution method.

- Deletion / insertion curves (Petsiuk et al. 2018, RISE): remove (or reveal) patches in the
  order of the attribution and follow the probability of the target class; a random order is the
  baseline. Lower deletion AUC and higher insertion AUC mean a more faithful ordering.
- Model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"):
  re-initialise the model from the top layer down and measure the Spearman rank correlation
  between the maps of the trained and of the randomised model. A method whose maps barely change
  does not depend on what the model learned.

Captum has no deletion/insertion metric or cascading randomisation, hence these few lines.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def patch_order(scores: np.ndarray) -> np.ndarray:
    """Patch indices sorted from most to least important: scores (N, g, g) -> (N, g*g)."""
    flat = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    return np.argsort(-flat, axis=1, kind="stable")


def random_order(n: int, n_patches: int, seed: int = 0) -> np.ndarray:
    """A random patch order per image, (n, n_patches), reproducible by ``seed``."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_patches) for _ in range(n)]) if n else np.zeros((0, n_patches), int)


def perturbation_curves(model: nn.Module, images: torch.Tensor, target, order: np.ndarray, grid: int, *,
                        mode: str = "deletion", baseline: float = 0.0, batch_size: int = 2048) -> np.ndarray:
    """Probability of ``target`` while patches are removed ('deletion': replaced by ``baseline``)
    or revealed ('insertion': starting from an all-``baseline`` image) in ``order``.

    images: (N, C, H, W); order: (N, grid*grid) patch indices. Returns (N, grid*grid + 1): step k
    has the first k patches of the order removed / revealed.
    """
    n, _, h, w = images.shape
    n_patches = grid * grid
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1).expand(n) if np.ndim(target) == 0 \
        else torch.as_tensor(target, dtype=torch.long)
    order_t = torch.as_tensor(np.asarray(order), dtype=torch.long)
    # rank[n, p] = position of patch p in the order; mask at step k covers patches with rank < k.
    rank = torch.empty_like(order_t)
    rank.scatter_(1, order_t, torch.arange(n_patches).expand(n, -1).contiguous())
    steps = torch.arange(n_patches + 1)
    out = np.zeros((n, n_patches + 1))
    per_image = n_patches + 1
    images_per_chunk = max(1, batch_size // per_image)
    model.eval()
    with torch.no_grad():
        for start in range(0, n, images_per_chunk):
            sl = slice(start, start + images_per_chunk)
            m = (rank[sl][:, None, :] < steps[None, :, None]).float()  # (b, steps, patches)
            b = m.shape[0]
            m = m.reshape(b * per_image, 1, grid, grid)
            m = F.interpolate(m, size=(h, w), mode="nearest")
            x = images[sl].repeat_interleave(per_image, dim=0)
            if mode == "deletion":
                x = x * (1 - m) + baseline * m
            elif mode == "insertion":
                x = baseline * (1 - m) + x * m
            else:
                raise ValueError(f"mode {mode!r}: choose deletion or insertion")
            prob = torch.softmax(model(x), dim=1)
            t = target[sl].repeat_interleave(per_image)
            out[start:start + b] = prob.gather(1, t[:, None]).reshape(b, per_image).numpy()
    return out


def curve_auc(curves: np.ndarray) -> float:
    """Mean area under curves of shape (N, steps) on a [0, 1] x-axis (trapezoid rule)."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.size == 0:
        return float("nan")
    dx = 1.0 / (curves.shape[1] - 1)
    return float(np.mean((curves[:, 1:] + curves[:, :-1]).sum(axis=1) * dx / 2))


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between matching rows of a and b, (N, D) -> (N,) (scipy ranks)."""
    from scipy.stats import rankdata

    ra = rankdata(np.asarray(a).reshape(len(a), -1), axis=1)
    rb = rankdata(np.asarray(b).reshape(len(b), -1), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    return np.divide((ra * rb).sum(1), den, out=np.zeros(len(ra)), where=den > 0)


def randomisation_units(model: nn.Module) -> list[tuple[str, list[nn.Module], list[nn.Parameter]]]:
    """The layers re-initialised one after another, top (output) first: (name, modules, bare params).

    Children of top-level containers (nn.Sequential / nn.ModuleList) are units of their own, as
    are other top-level modules with parameters; parameters held directly by the model (e.g. a
    ViT's class token and position embedding) form a last unit 'embeddings'.
    """
    units = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            for sub_name, sub in child.named_children():
                if any(True for _ in sub.parameters()):
                    units.append((f"{name}.{sub_name}", [sub], []))
        elif any(True for _ in child.parameters()):
            units.append((name, [child], []))
    bare = list(model.parameters(recurse=False))
    units.reverse()
    if bare:
        units.append(("embeddings", [], bare))
    return units


def reinitialise(unit, generator_seed: int) -> None:
    """Re-initialise one unit in place with its layers' own ``reset_parameters`` (seeded)."""
    _, modules, bare = unit
    torch.manual_seed(generator_seed)
    for module in modules:
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    with torch.no_grad():
        for p in bare:
            p.normal_(0.0, 0.02)


def cascading_randomisation(model: nn.Module, map_fn, seed: int = 0) -> list[tuple[str, dict]]:
    """Adebayo et al.'s cascading randomisation: re-initialise units top-down, cumulatively.

    ``map_fn(model) -> {method: ndarray (N, H, W)}`` computes the maps to compare. Returns
    [(unit name, {method: Spearman correlation per image (N,)})], one entry per randomised stage.
    """
    reference = map_fn(model)
    randomised = copy.deepcopy(model)
    units = randomisation_units(randomised)
    out = []
    for i, unit in enumerate(units):
        reinitialise(unit, seed + i)
        for p in randomised.parameters():
            p.requires_grad_(False)
        randomised.eval()
        maps = map_fn(randomised)
        out.append((unit[0], {k: spearman_rows(reference[k], maps[k]) for k in reference}))
    return out
