"""How far to trust an attribution method.

- Deletion / insertion curves (Petsiuk et al. 2018, RISE): remove (or reveal) patches in the
  order of the attribution and follow the probability of the target class; a random order is the
  baseline. Lower deletion AUC and higher insertion AUC mean a more faithful ordering.
- Model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"):
  re-initialise the model from the top layer down and measure the Spearman rank correlation
  between the maps of the trained and of the randomised model. A method whose maps barely change
  does not depend on what the model learned.

- A second random baseline, :func:`ink_random_order`: ink patches in random order first, then
  the empty ones. On MNIST most patches are empty background, so "any patch in random order" is
  too easy to beat; a method should beat "any ink in random order". Constant-0 deletion also
  favours methods that multiply by the input (Hooker et al. 2019; Rong et al. 2022): see
  :mod:`digitlens.explain.road` for ROAD's debiased removal.
- The random-logit check (Sixt, Granz & Landgraf 2020): a method whose map for a random other
  class is nearly the map for the target does not explain the class.

Captum has no deletion/insertion metric, cascading randomisation or random-logit check, hence
these functions. Quantus (0.6) has some of them but is a test-only dependency: it evaluates one
step of one image batch at a time in numpy; here every (image, step) row that changes the image
is evaluated in large batches, and steps that change nothing are not evaluated at all.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from digitlens.device import model_device


def patch_order(scores: np.ndarray, seed: int | None = None) -> np.ndarray:
    """Patch indices sorted from most to least important: scores (N, g, g) -> (N, g*g).

    Equal scores keep their index order (``seed=None``) or are shuffled with
    ``numpy.random.default_rng(seed)``: a map that is constant over a patch (Grad-CAM, attention,
    occlusion at pixel level) or zero on the background (integrated gradients) then removes its
    tied pixels in random order rather than top-left first."""
    flat = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    if seed is None:
        return np.argsort(-flat, axis=1, kind="stable")
    tie_break = np.random.default_rng(seed).random(flat.shape)
    return np.lexsort((tie_break, -flat), axis=1)


#: A pixel counts as ink above this value (images in [0, 1]). MNIST's background is exactly 0; 9% of
#: its non-zero pixels are faint anti-aliased edges at or below 0.1 (about 26/255). On the test set
#: 36% of the 4x4 patches and 18% of the pixels hold ink.
INK_THRESHOLD = 0.1


def random_order(n: int, n_patches: int, seed: int = 0) -> np.ndarray:
    """A random patch order per image, (n, n_patches), reproducible by ``seed``."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_patches) for _ in range(n)]) if n else np.zeros((0, n_patches), int)


def unit_pixels(grid: int, h: int, w: int) -> torch.Tensor:
    """(H, W) long: the unit (patch) index of each pixel, (i * grid // H) * grid + j * grid // W;
    the patches that a nearest-neighbour upsampling of a (grid, grid) mask paints."""
    rows = torch.arange(h) * grid // h
    cols = torch.arange(w) * grid // w
    return rows[:, None] * grid + cols[None, :]


def unit_ranks(order: np.ndarray, grid: int, h: int, w: int) -> torch.Tensor:
    """Position in ``order`` (N, grid*grid) of the unit holding each pixel: (N, H, W) long."""
    order_t = torch.as_tensor(np.ascontiguousarray(order), dtype=torch.long)
    n, n_units = order_t.shape
    if n_units != grid * grid:
        raise ValueError(f"order of shape {tuple(order_t.shape)}: expected (N, {grid * grid}) for grid {grid}")
    rank = torch.empty_like(order_t)
    rank.scatter_(1, order_t, torch.arange(n_units).expand(n, -1).contiguous())
    return rank[:, unit_pixels(grid, h, w)]


def ink_random_order(images, grid: int, seed: int = 0, *, threshold: float = INK_THRESHOLD) -> np.ndarray:
    """A random order that removes ink first: the units (patches, or pixels with ``grid`` = H)
    holding a pixel above ``threshold`` in random order, then the empty ones in random order.

    A second random baseline for deletion / ROAD on MNIST, where most units are empty background
    and a plain random order is too easy to beat: a method should beat "any ink, in random
    order". images: (N, C, H, W). Returns ndarray of shape (N, grid*grid), a permutation per
    image, reproducible by ``seed``.
    """
    x = torch.as_tensor(images)
    n, _, h, w = x.shape
    n_units = grid * grid
    ink_pixels = (x > threshold).any(dim=1).reshape(n, -1).to(torch.float32)
    ink = torch.zeros(n, n_units).index_add_(1, unit_pixels(grid, h, w).reshape(-1), ink_pixels) > 0
    keys = np.random.default_rng(seed).random((n, n_units)) + (~ink).numpy()  # ink in [0, 1), empty in [1, 2)
    return np.argsort(keys, axis=1, kind="stable")


def targets_tensor(target, n: int) -> torch.Tensor:
    """An int or (n,) class indices as a (n,) long tensor."""
    if np.ndim(target) == 0:
        return torch.full((n,), int(target), dtype=torch.long)
    t = torch.as_tensor(np.asarray(target), dtype=torch.long).reshape(-1)
    if len(t) != n:
        raise ValueError(f"{len(t)} targets for {n} images")
    return t


def _channels_last(model: nn.Module) -> bool:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv is not None and conv.weight.is_contiguous(memory_format=torch.channels_last)


#: Rows per forward pass by default. Small batches stay in the CPU caches: the default CNN ran
#: 42,700 images/s at 128 rows, 38,600 at 256 and 32,300 at 1,024 on one thread of this
#: project's machine (pixel deletion curves: 1,500, 1,400 and 1,300 images/s at 128, 256, 512).
FORWARD_ROWS = 128


def model_scores(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, measure: str = "probability",
                 batch_size: int = FORWARD_ROWS) -> np.ndarray:
    """The model's softmax probability of ``targets`` (``measure="probability"``) or 1.0 where its
    arg-max is the target (``"accuracy"``) for the rows of x (R, C, H, W): ndarray (R,)."""
    model.eval()
    device = model_device(model)
    out = np.zeros(len(x))
    fmt = torch.channels_last if _channels_last(model) else torch.contiguous_format
    if device.type != "cpu":  # one transfer, then large batches: the GPU is not cache-bound
        x, targets, batch_size = x.to(device), targets.to(device), max(batch_size, 8192)
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size].contiguous(memory_format=fmt))
            t = targets[i:i + batch_size, None]
            if measure == "probability":
                out[i:i + len(t)] = torch.softmax(logits, dim=1).gather(1, t)[:, 0].cpu().numpy()
            else:
                out[i:i + len(t)] = (logits.argmax(dim=1, keepdim=True) == t)[:, 0].cpu().numpy()
    return out


def perturbation_curves(model: nn.Module, images: torch.Tensor, target, order: np.ndarray, grid: int, *,
                        mode: str = "deletion", baseline: float = 0.0, units_per_step: int = 1,
                        batch_size: int = FORWARD_ROWS) -> np.ndarray:
    """Probability of ``target`` while units are removed ('deletion': replaced by ``baseline``)
    or revealed ('insertion': starting from an all-``baseline`` image) in ``order``
    (Petsiuk et al. 2018; Samek et al. 2017's region perturbation and Bach et al. 2015's pixel
    flipping are the deletion curve at ``grid`` = 7 and 28).

    images: (N, C, H, W); target: an int or (N,) class indices; order: (N, grid*grid) unit
    indices (a unit is a patch of the grid; ``grid`` = H gives single pixels). Each step removes
    / reveals the next ``units_per_step`` units (Quantus' ``features_in_step``). Returns ndarray
    of shape (N, ceil(grid*grid / units_per_step) + 1): column k after k steps, column 0 the
    unperturbed (deletion) or all-baseline (insertion) image. batch_size: (image, step) rows
    built and evaluated together.

    Only distinct images are evaluated: a step that removes / reveals nothing but ``baseline``
    pixels repeats the previous value, and the all-baseline image is evaluated once for all
    images (on MNIST most patches are empty background, so this skips most forward passes).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode {mode!r}: choose deletion or insertion")
    images = images.detach()
    n, c, h, w = images.shape
    n_steps = -(-grid * grid // units_per_step)
    targets = targets_tensor(target, n)
    step_of = unit_ranks(order, grid, h, w) // units_per_step + 1  # (N, H, W): step removing each pixel
    differs = (images != baseline).any(dim=1).reshape(n, -1).to(torch.float32)
    moved = torch.zeros(n, n_steps + 1).scatter_add_(1, step_of.reshape(n, -1), differs)  # non-baseline pixels per step
    done = moved.cumsum(1)
    left = done if mode == "insertion" else done[:, -1:] - done  # non-baseline pixels in the image after step k
    flat = left == 0  # the image is all baseline
    evaluate = (moved > 0) & ~flat
    evaluate[:, 0] = ~flat[:, 0]
    rows_n, rows_k = torch.nonzero(evaluate, as_tuple=True)
    fill = torch.as_tensor(baseline, dtype=images.dtype)
    scores = np.zeros(len(rows_n))
    for i in range(0, len(rows_n), batch_size):
        rn, rk = rows_n[i:i + batch_size], rows_k[i:i + batch_size]
        hit = (step_of[rn] <= rk[:, None, None])[:, None]  # (R, 1, H, W): removed / revealed pixels
        x = torch.where(hit, fill, images[rn]) if mode == "deletion" else torch.where(hit, images[rn], fill)
        scores[i:i + len(rn)] = model_scores(model, x, targets[rn], batch_size=batch_size)
    values = torch.zeros(n, n_steps + 1, dtype=torch.float64)
    values[rows_n, rows_k] = torch.from_numpy(scores)
    # each step takes the value of the last evaluated step, or of the all-baseline image
    steps = torch.arange(n_steps + 1).expand(n, -1)
    last = torch.where(evaluate, steps, torch.zeros_like(steps)).cummax(dim=1).values
    out = values.gather(1, last)
    if flat.any():
        blank = torch.full((1, c, h, w), float(baseline), dtype=images.dtype)
        with torch.no_grad():
            p_blank = torch.softmax(model.eval()(blank.to(model_device(model))), dim=1)[0].double().cpu()
        out = torch.where(flat, p_blank[targets][:, None], out)
    return out.numpy()


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


#: Mean Spearman correlation between the maps for the true class and for a random other class
#: above which a method "does not explain the class". Sixt et al. 2020 show that modified
#: back-propagation rules (e.g. LRP-alpha1-beta0, deep Taylor's z+) give nearly the same map for
#: any logit; the cut-off 0.9 is digitlens' choice, not a number from the paper.
RANDOM_LOGIT_THRESHOLD = 0.9


def random_logit_similarity(attribute_fn, images, targets, n_classes: int, seed: int = 0) -> np.ndarray:
    """The random-logit check (Sixt, Granz & Landgraf 2020, "When Explanations Lie: Why Many
    Modified BP Attributions Fail", ICML): explain each image for its target and for a random
    other class, and compare the two maps.

    attribute_fn(images, targets) -> maps of shape (N, H, W) (tensor or ndarray); targets: (N,)
    class indices; the other class is drawn uniformly among the n_classes - 1 others with
    ``numpy.random.default_rng(seed)``. Returns ndarray of shape (N,): the Spearman rank correlation
    of the two maps per image (:func:`spearman_rows`). A method whose mean exceeds
    :data:`RANDOM_LOGIT_THRESHOLD` gives nearly the same map whatever class it is asked about: it
    shows the input, not the class.
    """
    targets_np = np.asarray(targets, dtype=np.int64).reshape(-1)
    if n_classes < 2:
        raise ValueError(f"n_classes {n_classes}: the random-logit check needs at least 2 classes")
    offset = np.random.default_rng(seed).integers(1, n_classes, size=len(targets_np))
    others = (targets_np + offset) % n_classes

    def maps(t):
        m = attribute_fn(images, torch.as_tensor(t))
        m = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
        return m.reshape(len(t), -1)

    return spearman_rows(maps(targets_np), maps(others))


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
