"""ROAD: RemOve And Debias (Rong, Leemann, Nguyen, Fiedler, Rasti, Kasneci, Kasneci 2022, "A Consistent
and Efficient Evaluation Strategy for Attribution Methods", ICML).

Deleting pixels by setting them to a constant leaks the shape of the deleted region to the model,
and on MNIST, where 0 is the background, a method that multiplies by the input (integrated
gradients, input x gradient) "deletes" nothing but ink and wins by construction (Hooker et al.
2019). ROAD instead imputes every removed pixel as the weighted mean of its 8 neighbours (direct
neighbours 1/6, diagonal ones 1/12, renormalised at the border), solving the linear system over
all removed pixels jointly, plus a little Gaussian noise, so the removed region carries no
information of its own.

Quantus (0.6, ``quantus.functions.perturb_func.noisy_linear_imputation``) builds one scipy sparse
system per image and per fraction in Python and solves it with SuperLU; it is a test-only
dependency of digitlens. Here the systems of many images and fractions are solved together by
conjugate gradients on the 28x28 grid (batched torch tensors, float64, residual below 1e-8):
the same numbers (within 1e-6 after casting to float32) at a fraction of the time.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from digitlens.device import model_device
from digitlens.explain.faithfulness import model_scores, targets_tensor, unit_ranks

#: Default fractions of the units (patches or pixels) removed, one curve point each: 0 % to 90 %.
#: Rong et al. report 10 % ... 90 %; 0 % is the unperturbed image, so a curve starts at the model's
#: own probability. 100 % is left out: with every pixel removed the system has no data
#: (digitlens then imputes 0 plus the noise).
ROAD_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))

#: Residual 2-norm at which conjugate gradients stop (pixel values are in [0, 1]). Measured on the
#: default MNIST CNN (2,000 test images, LeRF on 7x7 patches): 1e-8 changes no curve value by more
#: than 3e-7 against 1e-10 and runs 12% faster.
ROAD_TOLERANCE = 1e-8


def _neighbour_sum(u: torch.Tensor) -> torch.Tensor:
    """S(u): the separable [1, 2, 1] x [1, 2, 1] filter with zero padding, (R, H, W) -> (R, H, W).

    The ROAD weights are (S(u) - 4u) / 12: 1/6 for the 4 direct and 1/12 for the 4 diagonal
    neighbours; two 3-tap passes are cheaper than a 3x3 convolution (float64 has no fast conv)."""
    p = F.pad(u, (1, 1, 1, 1))
    h = p[:, :, :-2] + p[:, :, 2:]
    h.add_(p[:, :, 1:-1], alpha=2.0)
    v = h[:, :-2] + h[:, 2:]
    return v.add_(h[:, 1:-1], alpha=2.0)


@contextlib.contextmanager
def _one_thread():
    """Run the conjugate-gradient loop on one intra-op thread. Its ~12 small tensor operations per
    iteration each end in an OpenMP barrier: on this project's 2-core machine one thread solved
    1,000 MNIST systems in 0.13 s, two threads took 0.75 s on a lightly loaded machine and 13 s
    when other processes held the cores (a barrier waits for a descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _solve(values: torch.Tensor, masks: torch.Tensor, tol: float = ROAD_TOLERANCE,
           max_iter: int | None = None, check_every: int = 8) -> torch.Tensor:
    """Linear imputation of the masked pixels of each row: (R, H, W) float64 values and bool masks
    -> (R, H, W) float64, the imputed values on the mask and 0 elsewhere.

    For a masked pixel i with valid neighbours j (weights w_ij): s_i x_i - sum_{j masked} w_ij x_j
    = sum_{j unmasked} w_ij v_j, s_i = sum_j w_ij. The matrix is symmetric and positive definite
    (every masked region touches an unmasked pixel unless the whole image is masked), so
    conjugate gradients converge; each row stops when its residual norm is below ``tol`` and
    converged rows leave the batch. A row without data (b = 0: a fully masked image, or masked
    regions that border only zeros) has the solution 0.
    """
    r_count, h, w = values.shape
    out = torch.zeros_like(values)
    if r_count == 0:
        return out
    m = masks.to(values.dtype)
    ones = torch.ones(1, h, w, dtype=values.dtype, device=values.device)
    c1 = (_neighbour_sum(ones)[0] - 4.0) / 12.0 + 1.0 / 3.0  # s_i + 4/12: A u = m c1 u - m S(u) / 12
    b = _neighbour_sum(values * (1.0 - m)).mul_(m / 12.0)
    rr = torch.linalg.vecdot(b.flatten(1), b.flatten(1))
    alive = torch.nonzero(rr > tol * tol).flatten()
    if len(alive) == 0:
        return out
    m, r, rr = m[alive], b[alive], rr[alive]
    mc1 = m * c1
    x = torch.zeros_like(r)
    p = r.clone()
    max_iter = max_iter or 4 * h * w
    it = 0
    while len(alive):
        for _ in range(check_every):
            ap = torch.addcmul(mc1 * p, m, _neighbour_sum(p), value=-1.0 / 12.0)
            # a row can reach a zero residual exactly (one masked pixel: one step); clamping the
            # denominators then gives alpha = beta = 0 instead of 0 / 0
            alpha = rr / torch.linalg.vecdot(p.flatten(1), ap.flatten(1)).clamp_min(1e-300)
            x.addcmul_(alpha[:, None, None], p)
            r.addcmul_(alpha[:, None, None], ap, value=-1.0)
            rr_new = torch.linalg.vecdot(r.flatten(1), r.flatten(1))
            p = p.mul_((rr_new / rr.clamp_min(1e-300))[:, None, None]).add_(r)
            rr = rr_new
        it += check_every
        done = (rr <= tol * tol) | (it >= max_iter)
        if done.any():
            out[alive[done]] = x[done]
            keep = ~done
            alive, m, mc1, x, r, p, rr = alive[keep], m[keep], mc1[keep], x[keep], r[keep], p[keep], rr[keep]
    return out


def linear_imputation(images: torch.Tensor, masks: torch.Tensor, *, noise: float = 0.0,
                      generator: torch.Generator | None = None, tol: float = ROAD_TOLERANCE,
                      batch_size: int = 256) -> torch.Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022): every masked pixel becomes the weighted
    mean of its 8 neighbours (1/6 direct, 1/12 diagonal, renormalised at the border), all masked
    pixels solved jointly, plus ``noise`` times standard normal noise drawn from ``generator``.

    images: (N, C, H, W); masks: (N, H, W) or (N, 1, H, W), True where a pixel is removed (every
    channel is imputed on its own with the same mask). Returns a tensor shaped and typed like
    ``images``. With ``noise=0`` it equals ``quantus.functions.perturb_func.noisy_linear_imputation``
    within 1e-6 (float32 images).
    """
    n, c, h, w = images.shape
    masks = torch.as_tensor(masks, dtype=torch.bool).reshape(n, 1, h, w).expand(n, c, h, w).reshape(n * c, h, w)
    values = images.detach().reshape(n * c, h, w).to(torch.float64)
    with _one_thread():
        imputed = torch.cat([_solve(values[i:i + batch_size], masks[i:i + batch_size], tol)
                             for i in range(0, n * c, batch_size)]) if n * c else values.clone()
    if noise:
        imputed = imputed + noise * torch.randn(imputed.shape, generator=generator, dtype=torch.float64)
    out = torch.where(masks, imputed, values)
    return out.reshape(n, c, h, w).to(images.dtype)


def removed_counts(n_units: int, fractions) -> np.ndarray:
    """Units removed at each fraction: floor(n_units * fraction), as Quantus' ROAD counts pixels
    (``int(a_size * p / 100)``; the 1e-9 keeps e.g. 0.3 * 784 from rounding down to 234)."""
    return np.floor(n_units * np.asarray(fractions, dtype=np.float64) + 1e-9).astype(np.int64)


def road_curves(model: nn.Module, images: torch.Tensor, target, order: np.ndarray, *, grid: int,
                mode: str = "morf", fractions=ROAD_FRACTIONS, noise: float = 0.01, seed: int = 0,
                batch_size: int = 256, measure: str = "probability", tol: float = ROAD_TOLERANCE) -> np.ndarray:
    """ROAD curves (Rong et al. 2022): remove a growing fraction of the units of ``order`` by
    noisy linear imputation and follow the model's belief in ``target``.

    images: (N, C, H, W) in the model's input space; target: an int or (N,) class indices;
    order: (N, grid*grid) unit indices from most to least relevant (as :func:`patch_order`
    returns; unit u covers the pixels (i, j) with (i * grid // H) * grid + j * grid // W == u, so
    ``grid=7`` removes 4x4 patches of a 28x28 image and ``grid=28`` single pixels).
    mode: ``"morf"`` removes the most relevant units first, ``"lerf"`` the least relevant first;
    fraction f removes floor(f * grid*grid) units. noise: standard deviation of the Gaussian noise
    added to each imputed pixel: one (C, H, W) field per image, shared by its fractions (a pixel
    gets the same noise whichever fraction removes it; Quantus draws anew per fraction), drawn
    from a ``torch.Generator`` seeded with ``seed`` one image after another (the same seed gives
    the same curves whatever ``batch_size``).
    measure: ``"probability"`` (softmax probability of the target) or ``"accuracy"`` (1.0 where
    the arg-max is the target, what Quantus' ``ROAD`` averages over images).
    batch_size: (image, fraction) rows imputed together (conjugate gradients ran fastest at about
    250 rows: large enough for few Python steps, small enough for the caches).

    Returns an ndarray of shape (N, len(fractions)). A faithful ordering makes MoRF fall fast and
    LeRF stay high.
    """
    if mode not in ("morf", "lerf"):
        raise ValueError(f"mode {mode!r}: choose morf or lerf")
    if measure not in ("probability", "accuracy"):
        raise ValueError(f"measure {measure!r}: choose probability or accuracy")
    images = images.detach()
    n, c, h, w = images.shape
    n_units = grid * grid
    targets = targets_tensor(target, n)
    counts = torch.as_tensor(removed_counts(n_units, fractions))
    n_fr = len(counts)
    rank = unit_ranks(order, grid, h, w)  # (N, H, W): position in the order of each pixel's unit
    if mode == "lerf":
        rank = n_units - 1 - rank
    generator = torch.Generator().manual_seed(int(seed))
    out = np.zeros((n, n_fr))
    # On a GPU the imputation runs there too, in chunks large enough to keep it busy.
    device = model_device(model)
    if device.type != "cpu":
        batch_size = max(batch_size, 8192)
        images, rank, counts = images.to(device), rank.to(device), counts.to(device)
    per_chunk = max(1, batch_size // n_fr)
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        b = stop - start
        masks = rank[start:stop, None] < counts[None, :, None, None]  # (b, F, H, W)
        masks = masks[:, :, None].expand(b, n_fr, c, h, w).reshape(-1, h, w)
        values = images[start:stop, None].expand(b, n_fr, c, h, w).reshape(-1, h, w).to(torch.float64)
        with _one_thread():
            imputed = _solve(values, masks, tol)
        if noise:  # one noise field per image, shared by its fractions (drawn image after image, on the CPU)
            eps = torch.stack([torch.randn((c, h, w), generator=generator, dtype=torch.float64) for _ in range(b)])
            imputed += noise * eps.to(device)[:, None].expand(b, n_fr, c, h, w).reshape(-1, h, w)
        x = torch.where(masks, imputed, values).to(images.dtype).reshape(b * n_fr, c, h, w)
        t = targets[start:stop].repeat_interleave(n_fr)
        out[start:stop] = model_scores(model, x, t, measure).reshape(b, n_fr)
    return out


def road_areas(curves: np.ndarray, fractions=ROAD_FRACTIONS) -> np.ndarray:
    """Area under each ROAD curve (N, F) -> (N,) over the fractions removed (trapezoid rule on the
    fractions themselves), divided by the fraction range so that it lies in [0, 1]."""
    curves = np.asarray(curves, dtype=np.float64)
    f = np.asarray(fractions, dtype=np.float64)
    if len(f) < 2:
        return np.full(len(curves), np.nan)
    return ((curves[:, 1:] + curves[:, :-1]) * np.diff(f)).sum(axis=1) / 2 / (f[-1] - f[0])


def road_auc(curves: np.ndarray, fractions=ROAD_FRACTIONS) -> float:
    """Mean of :func:`road_areas` over the images (NaN without images)."""
    curves = np.asarray(curves, dtype=np.float64)
    return float(road_areas(curves, fractions).mean()) if curves.size else float("nan")


__all__ = ["ROAD_FRACTIONS", "ROAD_TOLERANCE", "linear_imputation", "removed_counts", "road_areas", "road_auc",
           "road_curves"]
