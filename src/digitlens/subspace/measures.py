"""The measures of the LoRA subspace study on plain matrices (the computation floor: numpy and
torch only, no stage logic, no file I/O).

All linear algebra is float64. The measures follow Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models" (section 7 and appendix H), plus effective rank (Roy & Vetterli 2007) and
intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence").

- ``phi_matrix(U, V)``: normalised subspace similarity
  ``phi(i, j) = ||U[:i]^T-span . V[:j]-span||_F^2 / min(i, j)`` for every i, j at once, where U
  and V hold orthonormal directions as ROWS (e.g. ``Vh`` of an SVD: right-singular vectors).
  For random subspaces of R^d, ``E[phi(i, j)] = max(i, j) / d`` (``chance_phi``); the
  chance-corrected value is ``(phi - E) / (1 - E)`` (0 = chance, 1 = one subspace contains the
  other). ``random_phi_null`` / ``phi_significance``: the Monte-Carlo null and the test against it.
- ``amplification(W, delta_W)``: ``||dW||_F / ||U^T W V^T||_F`` with U, V the top-r singular
  vectors of dW, and the same projection for W's own top-r directions and random directions
  (the paper's Table 7), tested against ``projection_null``.
- ``effective_rank``, ``intruder_dimensions``: spectra of dW and of W + dW.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from digitlens.device import resolve_device
from digitlens.errors import DigitlensError

def svd(matrix, *, compute_uv: bool = True, device=None):
    """The thin SVD of ``matrix`` in float64 as NumPy arrays: (U, S, Vh), or S alone without
    ``compute_uv``. On the CPU (``device`` None or 'cpu') NumPy's LAPACK computes it; on another
    device ``torch.linalg.svd`` does (float64 there too), worth it for the 4,096-wide matrices of a
    language model's adapters. Signs of singular vectors may differ between the two; every measure
    here (phi, amplification, intruders) is invariant to them."""
    matrix = np.asarray(matrix, dtype=np.float64)
    target = None if device is None else resolve_device(device)
    if target is None or target.type == "cpu":
        return np.linalg.svd(matrix, full_matrices=False, compute_uv=compute_uv)
    t = torch.as_tensor(matrix, device=target)
    if not compute_uv:
        return torch.linalg.svdvals(t).cpu().numpy()
    u, s_, vh = torch.linalg.svd(t, full_matrices=False)
    return u.cpu().numpy(), s_.cpu().numpy(), vh.cpu().numpy()


def right_singular_vectors(matrix, device=None) -> np.ndarray:
    """Right-singular vectors of ``matrix`` (float64) as rows, strongest first: ndarray of shape
    (min(m, n), n); ``device`` as for :func:`svd`."""
    _, _, vh = svd(matrix, device=device)
    return vh


def phi_matrix(u_rows, v_rows, max_i: int | None = None, max_j: int | None = None) -> np.ndarray:
    """Normalised subspace similarity for all (i, j): ndarray of shape (max_i, max_j) with
    ``out[i-1, j-1] = ||u_rows[:i] @ v_rows[:j].T||_F^2 / min(i, j)``.

    ``u_rows`` (shape (p, d)) and ``v_rows`` (shape (q, d)) hold orthonormal directions as rows.
    One product, squared, a 2-D cumulative sum and a division: no loop over (i, j).
    """
    u_rows = np.asarray(u_rows, dtype=np.float64)
    v_rows = np.asarray(v_rows, dtype=np.float64)
    if u_rows.ndim != 2 or v_rows.ndim != 2 or u_rows.shape[1] != v_rows.shape[1]:
        raise DigitlensError(f"phi: direction matrices of shapes {u_rows.shape} and {v_rows.shape} "
                             "do not live in the same space (need (p, d) and (q, d))")
    max_i = u_rows.shape[0] if max_i is None else min(max_i, u_rows.shape[0])
    max_j = v_rows.shape[0] if max_j is None else min(max_j, v_rows.shape[0])
    overlap_sq = (u_rows[:max_i] @ v_rows[:max_j].T) ** 2
    cumulative = overlap_sq.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, max_i + 1)[:, None]
    j = np.arange(1, max_j + 1)[None, :]
    return cumulative / np.minimum(i, j)


def phi(a, b, max_i: int | None = None, max_j: int | None = None) -> np.ndarray:
    """``phi(A, B, i, j)`` with the right-singular vectors of matrices ``a`` (shape (r_a, d)) and
    ``b`` (shape (r_b, d)): ndarray of shape (max_i, max_j), default (rank a, rank b)."""
    return phi_matrix(right_singular_vectors(a), right_singular_vectors(b), max_i, max_j)


def chance_phi(shape: tuple[int, int], dim: int) -> np.ndarray:
    """Expected phi of two random subspaces of R^dim: ``max(i, j) / dim``, ndarray of ``shape``."""
    i = np.arange(1, shape[0] + 1)[:, None]
    j = np.arange(1, shape[1] + 1)[None, :]
    return np.maximum(i, j) / float(dim)


def chance_corrected(phi_values: np.ndarray, dim: int) -> np.ndarray:
    """``(phi - E) / (1 - E)`` with ``E = max(i, j) / dim``; NaN where E = 1 (no room for chance)."""
    expected = chance_phi(phi_values.shape, dim)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (phi_values - expected) / (1.0 - expected)
    out[expected >= 1.0] = np.nan
    return out


def phi_summary(phi_values: np.ndarray, dim: int, significance: bool = True, seed: int = 0) -> dict:
    """Raw, chance and chance-corrected phi at (1, 1), at (k, k) with k = min(shape) and the mean
    over the grid: a flat dict of floats; with ``significance`` also the Monte-Carlo test of
    :func:`phi_significance` at (1, 1) and (k, k)."""
    expected = chance_phi(phi_values.shape, dim)
    corrected = chance_corrected(phi_values, dim)
    k = min(phi_values.shape)
    out = {"dim": int(dim), "shape": list(phi_values.shape)}
    for label, (ii, jj) in (("1_1", (0, 0)), ("k_k", (k - 1, k - 1))):
        out[f"phi_{label}"] = float(phi_values[ii, jj])
        out[f"chance_{label}"] = float(expected[ii, jj])
        out[f"corrected_{label}"] = _finite_or_none(corrected[ii, jj])
    out["k"] = int(k)
    out["phi_mean"] = float(phi_values.mean())
    out["chance_mean"] = float(expected.mean())
    out["corrected_mean"] = _finite_or_none(np.nanmean(corrected)) if np.isfinite(corrected).any() else None
    if significance:
        out.update(phi_significance(phi_values, dim, seed=seed))
    return out


def random_phi_null(dim: int, shape: tuple[int, int], n_draws: int = 1000, seed: int = 0) -> np.ndarray:
    """Monte-Carlo null of phi: phi(i, j) of ``n_draws`` pairs of random subspaces of R^dim (QR of
    Gaussian matrices, all draws at once), ndarray of shape (n_draws, shape[0], shape[1]). Its mean
    is ``chance_phi(shape, dim)``. phi with one subspace fixed (W's directions) has the same null, as
    the distribution of a random subspace is rotation invariant. Seeded: same seed, same draws."""
    p, q = int(shape[0]), int(shape[1])
    if not (1 <= p <= dim and 1 <= q <= dim):
        raise DigitlensError(f"phi null: shape {shape} does not fit in R^{dim}")
    rng = np.random.default_rng(seed)
    out = np.empty((n_draws, p, q))
    for start in range(0, n_draws, _chunk(dim * max(p, q))):  # draws in chunks of at most ~64 MB
        stop = min(n_draws, start + _chunk(dim * max(p, q)))
        u = np.linalg.qr(rng.standard_normal((stop - start, dim, p)))[0]  # batched QR: orthonormal columns
        v = np.linalg.qr(rng.standard_normal((stop - start, dim, q)))[0]
        out[start:stop] = (np.einsum("ndp,ndq->npq", u, v) ** 2).cumsum(axis=1).cumsum(axis=2)
    return out / np.minimum(np.arange(1, p + 1)[:, None], np.arange(1, q + 1)[None, :])


def _chunk(floats_per_draw: int) -> int:
    """Draws per chunk so that one chunk's Gaussian matrix holds at most 2^23 float64 (64 MB)."""
    return max(1, 2 ** 23 // max(1, floats_per_draw))


_NULL_CACHE: dict[tuple, np.ndarray] = {}


def _cached_null(dim: int, k: int, n_draws: int, seed: int) -> np.ndarray:
    key = (dim, k, n_draws, seed)
    if key not in _NULL_CACHE:
        _NULL_CACHE[key] = random_phi_null(dim, (k, k), n_draws, seed)
    return _NULL_CACHE[key]


def monte_carlo_p(observed: float, null: np.ndarray) -> float:
    """One-sided Monte-Carlo p-value of ``observed`` being this large under ``null`` (1-D draws):
    ``(1 + #{null >= observed}) / (1 + n)``, never 0 (Davison & Hinkley 1997, eq. 4.11)."""
    null = np.asarray(null, dtype=np.float64).ravel()
    return float((1 + np.count_nonzero(null >= observed - 1e-12)) / (1 + null.size))


#: Significance level of every "above chance" verdict (one test per number; not corrected for the
#: many modules, so about 1 in 20 of the numbers that are chance will read "yes").
ALPHA = 0.05
NULL_DRAWS = 1000
#: Draws of the projection null (one per weight and rank, each a batched QR of two (out, r) and
#: (in, r) matrices per draw): 200 keep the analysis to seconds and resolve p down to 0.005.
PROJECTION_DRAWS = 200


def phi_significance(phi_values: np.ndarray, dim: int, n_draws: int = NULL_DRAWS, seed: int = 0) -> dict:
    """phi at (1, 1) and at (k, k), k = min(shape), against the Monte-Carlo null of random subspaces
    of the same shapes (:func:`random_phi_null`): the null's mean, its 95th percentile, the p-value
    and ``above_chance_*`` (p < ALPHA), as a flat dict."""
    k = min(phi_values.shape)
    null = _cached_null(int(dim), int(k), int(n_draws), int(seed))
    out = {"null_draws": int(n_draws)}
    for label, idx in (("1_1", 0), ("k_k", k - 1)):
        draws = null[:, idx, idx]
        p = monte_carlo_p(float(phi_values[idx, idx]), draws)
        out[f"null_mean_{label}"] = float(draws.mean())
        out[f"null_q95_{label}"] = float(np.quantile(draws, 0.95))
        out[f"p_{label}"] = p
        out[f"above_chance_{label}"] = bool(p < ALPHA)
    return out


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def effective_rank(singular_values) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(-sum p log p)`` with ``p = s / sum(s)``."""
    s = np.asarray(singular_values, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def random_orthonormal(dim: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k random orthonormal columns in R^dim (QR of a Gaussian matrix): ndarray of shape (dim, k)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, k)))
    return q * np.sign(np.diag(r))


_PROJECTION_CACHE: dict[tuple, np.ndarray] = {}


def projection_null(weight, rank: int, n_draws: int = PROJECTION_DRAWS, seed: int = 0) -> np.ndarray:
    """``||U^T W V||_F`` for ``n_draws`` pairs of random orthonormal U (out, rank), V (in, rank)
    (batched QR of Gaussian matrices): ndarray of shape (n_draws,), the chance distribution of the
    projection in :func:`amplification`. Cached per (W, rank, n_draws, seed): the seeds of one rank
    share it. Cost: n_draws x 2 r m n flops (a second per module at m = n = 128, r = 64 on 2 cores;
    minutes for a 4,096-wide language model at r = 64)."""
    w = np.ascontiguousarray(weight, dtype=np.float64)
    key = (hash(w.tobytes()), w.shape, int(rank), int(n_draws), int(seed))
    if key not in _PROJECTION_CACHE:
        _PROJECTION_CACHE[key] = _projection_null(w, int(rank), int(n_draws), int(seed))
    return _PROJECTION_CACHE[key]


def _projection_null(w: np.ndarray, rank: int, n_draws: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(n_draws)
    size = _chunk(max(w.shape) * rank)
    for start in range(0, n_draws, size):  # chunks of at most ~64 MB per Gaussian matrix
        stop = min(n_draws, start + size)
        u = np.linalg.qr(rng.standard_normal((stop - start, w.shape[0], rank)))[0]
        v = np.linalg.qr(rng.standard_normal((stop - start, w.shape[1], rank)))[0]
        out[start:stop] = np.linalg.norm(np.transpose(u, (0, 2, 1)) @ w @ v, axis=(1, 2))
    return out


def amplification(weight, delta, rank: int | None = None, seed: int = 0, device=None,
                  null_draws: int = PROJECTION_DRAWS) -> dict:
    """The paper's Table 7 for one weight matrix: how strongly ``delta`` amplifies directions of
    ``weight`` (both of shape (out, in)).

    Returns a dict of floats: ``norm_W``, ``norm_dW``, ``proj_dW`` = ||U^T W V^T||_F with U, V the
    top-``rank`` left/right singular vectors of dW (default rank: dW's numerical rank),
    ``proj_W`` (same with W's own top directions), ``proj_random`` (random orthonormal U, V),
    ``amplification`` = norm_dW / proj_dW, and the factors one would get for W's own and random
    directions (norm_dW / proj_W, norm_dW / proj_random). With ``null_draws`` the projection is
    tested against :func:`projection_null` (the paper: "ΔW has a stronger correlation with W than a
    random matrix"): ``p_proj_dW`` (one-sided, proj_dW this large by chance), ``above_chance``,
    ``proj_random_mean`` and ``amplification_random_mean`` (the factor of random directions).
    """
    w = np.asarray(weight, dtype=np.float64)
    dw = np.asarray(delta, dtype=np.float64)
    if w.shape != dw.shape:
        raise DigitlensError(f"amplification: weight shape {w.shape} and update shape {dw.shape} differ")
    u_d, s_d, vh_d = svd(dw, device=device)
    if rank is None:
        rank = int((s_d > s_d[0] * 1e-10).sum()) if s_d.size and s_d[0] > 0 else 1
    u_w, _, vh_w = svd(w, device=device)
    rng = np.random.default_rng(seed)
    u_r = random_orthonormal(w.shape[0], rank, rng)
    v_r = random_orthonormal(w.shape[1], rank, rng)
    norm_dw = float(np.linalg.norm(dw))

    def projected(u, vh):
        return float(np.linalg.norm(u.T @ w @ vh.T))

    proj_dw = projected(u_d[:, :rank], vh_d[:rank])
    proj_w = projected(u_w[:, :rank], vh_w[:rank])
    proj_random = projected(u_r, v_r.T)
    null = projection_null(w, rank, n_draws=null_draws) if null_draws else None
    significance = {}
    if null is not None:
        p = monte_carlo_p(proj_dw, null)
        significance = {"null_draws": int(null_draws), "proj_random_mean": float(null.mean()),
                        "proj_random_q95": float(np.quantile(null, 0.95)), "p_proj_dW": p,
                        "above_chance": bool(p < ALPHA),
                        "amplification_random_mean": norm_dw / float(null.mean()) if null.mean() > 0 else float("inf")}
    return {**significance,
        "rank": int(rank),
        "norm_W": float(np.linalg.norm(w)),
        "norm_dW": norm_dw,
        "proj_dW": proj_dw,
        "proj_W": proj_w,
        "proj_random": proj_random,
        "amplification": norm_dw / proj_dw if proj_dw > 0 else float("inf"),
        "amplification_W_dirs": norm_dw / proj_w if proj_w > 0 else float("inf"),
        "amplification_random_dirs": norm_dw / proj_random if proj_random > 0 else float("inf"),
    }


def intruder_dimensions(base_weight, adapted_weight, top_k: int = 10, threshold: float = 0.5, device=None) -> dict:
    """Intruder dimensions (Shuttleworth et al. 2024): among the top-``top_k`` left-singular vectors
    of the adapted weight, those whose largest |cosine| with every left-singular vector of the
    base weight is below ``threshold``.

    Returns ``{"count", "top_k", "threshold", "max_abs_cosine": list of top_k floats}``.
    """
    u_base, _, _ = svd(base_weight, device=device)
    u_new, _, _ = svd(adapted_weight, device=device)
    top_k = min(top_k, u_new.shape[1])
    best = np.abs(u_new[:, :top_k].T @ u_base).max(axis=1)
    return {"count": int((best < threshold).sum()), "top_k": int(top_k), "threshold": float(threshold),
            "max_abs_cosine": best.tolist()}


#: The LoRA paper's Table 7 (Hu et al. 2021): amplification factor of W_q in GPT-3's 48th layer.
PAPER_TABLE7_WQ = {4: 21.5, 64: 2.0}
