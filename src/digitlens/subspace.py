"""What LoRA adapters change in a model's weights: subspace similarity, amplification, spectra.

All linear algebra is float64 numpy. The measures follow Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models" (section 7 and appendix H), plus effective rank (Roy &
Vetterli 2007) and intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning:
An Illusion of Equivalence").

- ``phi_matrix(U, V)``: normalised subspace similarity
  ``phi(i, j) = ||U[:i]^T-span . V[:j]-span||_F^2 / min(i, j)`` for every i, j at once, where U
  and V hold orthonormal directions as ROWS (e.g. ``Vh`` of an SVD: right-singular vectors).
  For random subspaces of R^d, ``E[phi(i, j)] = max(i, j) / d`` (``chance_phi``); the
  chance-corrected value is ``(phi - E) / (1 - E)`` (0 = chance, 1 = one subspace contains the
  other).
- ``amplification(W, delta_W)``: ``||dW||_F / ||U^T W V^T||_F`` with U, V the top-r singular
  vectors of dW, and the same projection for W's own top-r directions and random directions
  (the paper's Table 7).
- ``analyse_adapters(base, [adapter dirs], out)`` works on any PEFT LoRA adapter: modules are
  matched to base weights by name; ``analyse_run(run_dir, task)`` runs it on a digitlens run's
  adapters (``runs/BASE/adapt/TASK/r{rank}_s{seed}``) and writes ``runs/BASE/subspace/``.

Reading adapters needs only ``safetensors`` and ``adapter_config.json``; PEFT is not imported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from digitlens.device import resolve_device
from digitlens.errors import DigitlensError
from digitlens.runio import (figure_batch, read_json, require_run_dir, write_json, write_text,
                             writes_folders)

# PEFT prefixes a module's name with these when it saves an adapter.
_PEFT_PREFIXES = ("base_model.model.",)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


# --------------------------------------------------------------------------------------------
# Measures on plain matrices
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Reading PEFT LoRA adapters and base weights (no PEFT import)
# --------------------------------------------------------------------------------------------

@dataclass
class LoraModule:
    """One adapted linear layer: ``delta = scale * B @ A``; A of shape (r, in), B of shape (out, r)."""

    name: str
    lora_a: np.ndarray
    lora_b: np.ndarray
    scale: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def delta(self) -> np.ndarray:
        """scale * B @ A as float64, shape (out, in)."""
        return self.scale * (self.lora_b @ self.lora_a)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from a folder: its config and its modules by (stripped) name."""

    path: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.path.name


def _strip_peft_prefix(name: str) -> str:
    for prefix in _PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _pattern_value(patterns: dict, name: str, default, config_path: Path | str = "adapter_config.json",
                   field_name: str = "alpha_pattern"):
    """PEFT's rank_pattern / alpha_pattern lookup: first key that matches the end of ``name``
    (a one-line DigitlensError for a pattern that is not a {regex: value} object)."""
    if patterns is None:
        return default
    if not isinstance(patterns, dict):
        raise DigitlensError(f"{config_path}: {field_name} is a {type(patterns).__name__}, expected an object")
    for key, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", name)
        except re.error as exc:
            raise DigitlensError(f"{config_path}: {field_name} key {key!r} is not a regular expression ({exc})") from None
        if matched:
            return value
    return default


def _positive_number(value, config_path: Path, field_name: str) -> float:
    """``value`` as a finite float (a one-line DigitlensError naming the field otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DigitlensError(f"{config_path}: {field_name} {value!r} is not a finite number")
    return float(value)


def read_lora_adapter(adapter_dir) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    into float64 numpy arrays; raise a one-line DigitlensError if it is not one."""
    from safetensors import SafetensorError

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not adapter_dir.is_dir():
        raise DigitlensError(f"--adapter {adapter_dir}: folder not found")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise DigitlensError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise DigitlensError(f"{config_path}: peft_type {config.get('peft_type')!r} is not a LoRA adapter")
    if not weights_path.is_file():
        raise DigitlensError(f"{weights_path}: file not found (only .safetensors adapters are read)")
    try:
        tensors = _load_safetensors_float64(weights_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DigitlensError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    if config.get("use_dora") or any("lora_magnitude_vector" in key for key in tensors):
        # DoRA rescales every row of W + dW by a learned magnitude: its update is not scale * B @ A,
        # and analysing it as plain LoRA would describe a different matrix.
        raise DigitlensError(f"{adapter_dir}: a DoRA adapter (use_dora / lora_magnitude_vector); only plain LoRA "
                             "adapters are analysed")
    bad = next((k for k, v in tensors.items() if not np.isfinite(v).all()), None)
    if bad is not None:
        raise DigitlensError(f"{weights_path}: tensor {bad!r} holds NaN or infinite values")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            pairs.setdefault(_strip_peft_prefix(match["module"]), {})[match["which"]] = value
    if not pairs:
        raise DigitlensError(f"{weights_path}: no '*.lora_A.weight' / '*.lora_B.weight' tensors found")
    adapter = LoraAdapter(adapter_dir, config)
    default_alpha = _positive_number(config.get("lora_alpha", config.get("r", 8)), config_path, "lora_alpha")
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise DigitlensError(f"{weights_path}: module {name!r} has lora_{next(iter(pair))} but not its partner")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise DigitlensError(f"{weights_path}: module {name!r}: lora_A {a.shape} and lora_B {b.shape} "
                                 "are not a (r, in) / (out, r) pair (conv LoRA is not supported)")
        rank = a.shape[0]
        if rank == 0:
            raise DigitlensError(f"{weights_path}: module {name!r} has rank 0 (lora_A {a.shape})")
        alpha = _positive_number(_pattern_value(config.get("alpha_pattern"), name, default_alpha, config_path),
                                 config_path, f"alpha_pattern value for {name!r}")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        adapter.modules[name] = LoraModule(name, a, b, scale, bool(config.get("fan_in_fan_out", False)))
    return adapter


def _load_safetensors_float64(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float64 numpy arrays (bfloat16 via torch)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            tensor = fh.get_tensor(key)
            if not tensor.is_floating_point():
                # Quantised weights (int8 with separate scales) are not the matrices they stand for.
                raise DigitlensError(f"{path}: tensor {key!r} is {str(tensor.dtype).replace('torch.', '')}; "
                                     "only floating-point weights are analysed (not a quantised model)")
            out[key] = tensor.double().numpy()
    return out


def load_base_weights(base_path) -> dict[str, np.ndarray]:
    """Every tensor of a base-model ``.safetensors`` file as float64 numpy arrays by name."""
    from safetensors import SafetensorError

    base_path = Path(base_path)
    if not base_path.is_file():
        raise DigitlensError(f"--base {base_path}: file not found")
    try:
        weights = _load_safetensors_float64(base_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DigitlensError(f"--base {base_path}: not a readable safetensors file ({exc})") from None
    bad = next((k for k, v in weights.items() if not np.isfinite(v).all()), None)
    if bad is not None:
        raise DigitlensError(f"--base {base_path}: tensor {bad!r} holds NaN or infinite values")
    return weights


def match_base_weight(base: dict[str, np.ndarray], module: LoraModule, base_label: str = "base") -> np.ndarray:
    """The base weight of ``module`` in (out, in) orientation, found by name (exact, else the one
    key whose module path ends with the adapter's or vice versa); one-line error on no match,
    several matches or a shape that does not fit the LoRA update."""
    name = module.name
    candidates = [f"{name}.weight", f"{name}.base_layer.weight"]
    key = next((c for c in candidates if c in base), None)
    if key is None:
        suffix_hits = [k for k in base if k.endswith(".weight")
                       and (k[:-7].endswith("." + name) or name.endswith("." + k[:-7]))]
        if len(suffix_hits) == 1:
            key = suffix_hits[0]
        elif len(suffix_hits) > 1:
            raise DigitlensError(f"{base_label}: adapter module {name!r} matches several base weights "
                                 f"({', '.join(sorted(suffix_hits)[:3])})")
        else:
            raise DigitlensError(f"{base_label}: no weight named {name + '.weight'!r} for adapter module "
                                 f"{name!r} (base has e.g. {', '.join(sorted(base)[:3])})")
    weight = base[key]
    if module.fan_in_fan_out:
        weight = weight.T
    expected = (module.lora_b.shape[0], module.lora_a.shape[1])
    if weight.shape != expected:
        raise DigitlensError(f"{base_label}: weight {key!r} has shape {tuple(weight.shape)} but adapter module "
                             f"{name!r} changes a {expected} matrix (lora_B {module.lora_b.shape} @ lora_A "
                             f"{module.lora_a.shape})")
    return weight


# --------------------------------------------------------------------------------------------
# Analyses writing tables and figures
# --------------------------------------------------------------------------------------------

def analyse_adapters(base_path, adapter_dirs, out_dir, *, random_seed: int = 0, intruder_top_k: int = 10,
                     intruder_threshold: float = 0.5, modules: list[str] | None = None,
                     progress: bool = False, base_weights: dict | None = None, figures: bool = True,
                     device=None) -> dict:
    """Analyse PEFT LoRA adapters of any model against its base weights; write JSON and figures.

    ``adapter_dirs``: one or more adapter folders (all adapting the same base). For every adapted
    module of the first adapter: singular-value spectrum and effective rank of dW, amplification
    (Table 7), intruder dimensions of W + dW, and phi(W, A_k) for each adapter k plus a random
    Gaussian A (the seed-003 four-panel figure). With two or more adapters, phi(A_1, A_k) per
    module. Writes ``out_dir/subspace.json``, ``out_dir/summary.md`` and (with ``figures``)
    ``out_dir/figures/``; returns the summary dict. ``device``: where the SVDs run (see :func:`svd`).
    """
    out_dir = Path(out_dir)
    adapter_dirs = [Path(p) for p in adapter_dirs]
    if not adapter_dirs:
        raise DigitlensError("--adapter: give at least one adapter folder")
    base = base_weights if base_weights is not None else load_base_weights(base_path)
    adapters = [read_lora_adapter(p) for p in adapter_dirs]
    labels = _unique_labels(adapters)
    names = list(adapters[0].modules)
    if modules:
        missing = [m for m in modules if m not in adapters[0].modules]
        if missing:
            raise DigitlensError(f"--module {missing[0]!r}: not in {adapter_dirs[0]} "
                                 f"(has {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
        names = list(modules)
    for adapter in adapters[1:]:
        absent = [n for n in names if n not in adapter.modules]
        if absent:
            raise DigitlensError(f"--adapter {adapter.path}: has no module {absent[0]!r} that "
                                 f"{adapters[0].path} adapts")
    base_label = str(base_path)
    rng = np.random.default_rng(random_seed)
    module_results, panels = [], {}
    for name in names:
        if progress:
            print(f"subspace: {name}", flush=True)
        weight = match_base_weight(base, adapters[0].modules[name], base_label)
        for adapter in adapters[1:]:
            match_base_weight(base, adapter.modules[name], base_label)
        result, panels[name] = _analyse_module(name, weight, [a.modules[name] for a in adapters], labels, rng,
                                               intruder_top_k, intruder_threshold, device)
        module_results.append(result)
    summary = {
        "base": str(base_path),
        "adapters": [str(p) for p in adapter_dirs],
        "labels": labels,
        "chance_note": ("for random subspaces E[phi(i, j)] = max(i, j) / d; corrected = (phi - E) / (1 - E); "
                        f"above chance: phi larger than for random subspaces of the same shapes (Monte-Carlo null, "
                        f"{NULL_DRAWS} draws, one-sided p < {ALPHA}, not corrected for the number of modules)"),
        "modules": module_results,
        "figures": [],
    }
    if figures:
        ranks = [a.modules[names[0]].rank for a in adapters]
        summary["figures"] = _plot_phi_w(panels, labels, ranks, {m["module"]: m["d_in"] for m in module_results},
                                         out_dir / "figures")
    _write_outputs(out_dir, summary, figures)
    return summary


def _unique_labels(adapters: list[LoraAdapter]) -> list[str]:
    labels = [a.label for a in adapters]
    if len(set(labels)) != len(labels):
        labels = [f"{i + 1}:{a.path.parent.name}/{a.label}" for i, a in enumerate(adapters)]
    return labels


def _analyse_module(name, weight, lora_modules: list[LoraModule], labels, rng, top_k, threshold, device=None):
    """All measures for one module: (JSON-ready dict, list of phi(W, A_k) arrays + the random one)."""
    d_in = weight.shape[1]
    w_rows = right_singular_vectors(weight, device)
    per_adapter = []
    phis_w = []
    for label, module in zip(labels, lora_modules):
        delta = module.delta
        s = svd(delta, compute_uv=False, device=device)
        phi_w = phi_matrix(w_rows, right_singular_vectors(module.lora_a, device))
        phis_w.append(phi_w)
        per_adapter.append({
            "adapter": label,
            "rank": module.rank,
            "scale": module.scale,
            "singular_values": s[: max(module.rank, 1)].tolist(),
            "effective_rank": effective_rank(s[: module.rank]),
            "amplification": amplification(weight, delta, rank=module.rank,
                                           seed=int(rng.integers(2 ** 31)), device=device),
            "intruders": intruder_dimensions(weight, weight + delta, top_k=top_k, threshold=threshold, device=device),
            "phi_W_A": phi_summary(phi_w, d_in),
        })
    random_rank = max(m.rank for m in lora_modules)
    random_a = rng.standard_normal((random_rank, d_in))
    phi_random = phi_matrix(w_rows, right_singular_vectors(random_a, device))
    result = {"module": name, "shape": list(weight.shape), "d_in": int(d_in), "adapters": per_adapter,
              "phi_W_random": phi_summary(phi_random, d_in)}
    if len(lora_modules) > 1:
        first = right_singular_vectors(lora_modules[0].lora_a, device)
        result["phi_between"] = [
            {"a": labels[0], "b": labels[k], **phi_summary(phi_matrix(first, right_singular_vectors(m.lora_a, device)), d_in)}
            for k, m in enumerate(lora_modules[1:], start=1)
        ]
    return result, phis_w + [phi_random]


def _target_groups(names: list[str], max_layers: int) -> dict[str, list[str]]:
    """Modules grouped by their last name part (q, v, q_proj, ...), at most ``max_layers`` evenly
    spaced modules per group (first and last included)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[2], []).append(name)
    for target, members in groups.items():
        if len(members) > max_layers:
            keep = np.unique(np.linspace(0, len(members) - 1, max_layers).round().astype(int))
            groups[target] = [members[k] for k in keep]
    return groups


def _plot_phi_w(panels: dict, labels, ranks, dims: dict, fig_dir: Path, max_layers: int = 6) -> list[str]:
    """phi(W, A_k, i, j) figures: one per target (rows: layers, columns: adapters + random A), and
    the seed-003 four-panel figure for the last layer of the first target named like a query."""
    from digitlens.plots.subspace import plot_phi_w_panels

    titles = [_rank_title(label, rank) for label, rank in zip(labels, ranks)]
    groups = _target_groups(list(panels), max_layers)
    written = []
    for target, members in groups.items():
        by_dim = {dims[m] for m in members}
        if len(by_dim) != 1:  # rectangular layers of different widths: one figure per module
            for m in members:
                written += plot_phi_w_panels([m], [panels[m]], titles, dims[m], fig_dir / f"phi_W_vs_A__{_safe(m)}")
            continue
        written += plot_phi_w_panels(members, [panels[m] for m in members], titles, by_dim.pop(),
                                     fig_dir / f"phi_W_vs_A__{_safe(target)}")
    query = next((t for t in groups if t.lower() in ("q", "q_proj", "query", "wq")), next(iter(groups)))
    seed_module = groups[query][-1]
    written += plot_phi_w_panels([seed_module], [panels[seed_module]], titles, dims[seed_module],
                                 fig_dir / "phi_W_vs_A_seed003")
    return [str(p) for p in written if str(p).endswith(".png")]


def _rank_title(label: str, rank: int) -> str:
    return f"{label} (r={rank})"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)  # no dots: save_figure replaces the suffix


def _write_outputs(out_dir: Path, summary: dict, figures: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures:
        from digitlens.plots.subspace import plot_amplification_table, plot_spectra

        fig_dir = out_dir / "figures"
        written = plot_spectra(summary["modules"], fig_dir / "dW_spectra")
        written += plot_amplification_table(summary["modules"], fig_dir / "amplification")
        summary["figures"] += [str(p) for p in written if str(p).endswith(".png")]
    summary["markdown"] = summary_markdown(summary)
    write_text(out_dir / "summary.md", summary["markdown"])
    write_json(out_dir / "subspace.json", summary)


def _verdict_cell(entry: dict, label: str) -> str:
    """'yes (p = 0.001)' / 'no (p = 0.3)' for phi at ``label`` ('1_1' or 'k_k'); '' without a test."""
    if f"p_{label}" not in entry:
        return ""
    return f"{'yes' if entry[f'above_chance_{label}'] else 'no'} (p = {entry[f'p_{label}']:.2g})"


def _amplification_verdict(amp: dict) -> str:
    """'yes (p = ...)' when ΔW's top directions carry more of W than random ones; '' without a test."""
    if "p_proj_dW" not in amp:
        return ""
    return f"{'yes' if amp['above_chance'] else 'no'} (p = {amp['p_proj_dW']:.2g})"


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_markdown(summary: dict) -> str:
    """Markdown tables of a summary: per module and adapter, phi(W, A) at (k, k) raw / chance /
    corrected, amplification (Table 7), effective rank and intruder count."""
    lines = ["| module | adapter | r | phi(W,A) k,k | chance | corrected | above chance | ||dW||_F | ||U^T W V^T|| dW "
             "| W dirs | random | amplification | dW dirs in W above chance | eff. rank | intruders |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mod in summary["modules"]:
        for ad in mod["adapters"]:
            p, amp = ad["phi_W_A"], ad["amplification"]
            lines.append(
                f"| {mod['module']} | {ad['adapter']} | {ad['rank']} | {_fmt(p['phi_k_k'])} | {_fmt(p['chance_k_k'])} "
                f"| {_fmt(p['corrected_k_k'])} | {_verdict_cell(p, 'k_k')} | {_fmt(amp['norm_dW'])} | {_fmt(amp['proj_dW'])} "
                f"| {_fmt(amp['proj_W'])} | {_fmt(amp.get('proj_random_mean', amp['proj_random']))} "
                f"| {amp['amplification']:.3g} "
                f"| {_amplification_verdict(amp)} "
                f"| {_fmt(ad['effective_rank'], 2)} "
                f"| {ad['intruders']['count']}/{ad['intruders']['top_k']} |")
        p = mod["phi_W_random"]
        lines.append(f"| {mod['module']} | random Gaussian A | {p['shape'][1]} | {_fmt(p['phi_k_k'])} | "
                     f"{_fmt(p['chance_k_k'])} | {_fmt(p['corrected_k_k'])} | {_verdict_cell(p, 'k_k')} | | | | | | | | |")
    between = [(m["module"], b) for m in summary["modules"] for b in m.get("phi_between", [])]
    if between:
        lines += ["", "| module | phi(A_a, A_b) | i=j=1 | chance | corrected | above chance | i=j=k | chance | corrected "
                  "| above chance |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, b in between:
            lines.append(f"| {name} | {b['a']} vs {b['b']} | {_fmt(b['phi_1_1'])} | {_fmt(b['chance_1_1'])} | "
                         f"{_fmt(b['corrected_1_1'])} | {_verdict_cell(b, '1_1')} | {_fmt(b['phi_k_k'])} (k={b['k']}) "
                         f"| {_fmt(b['chance_k_k'])} | {_fmt(b['corrected_k_k'])} | {_verdict_cell(b, 'k_k')} |")
    lines += ["", summary.get("chance_note", ""), ""]
    return "\n".join(lines)


def analyse_run(run_dir, task: str = "groups", *, out_dir=None, seed_for_ranks: int | None = None,
                figures: bool = True, progress: bool = False, **kwargs) -> dict:
    """The LoRA study of a digitlens run's adapters (``runs/BASE/adapt/TASK/``): everything of
    :func:`analyse_adapters` for the ranks of one seed (phi(W_q, A_r) for every r plus a random
    A: the seed-003 figure), phi(A_r, A_r') between the smallest-but-one and the largest rank
    (paper figure 3, r = 8 vs 64 by default), phi between two seeds at the same rank (figure 4),
    and intruder dimensions of full fine-tuning as a reference. Writes
    ``runs/BASE/subspace/TASK/`` (``subspace.json``, ``summary.md``, ``figures/``); returns the
    summary dict."""
    with figure_batch():  # worker processes draw the figures side by side
        return _analyse_run(run_dir, task, out_dir=out_dir, seed_for_ranks=seed_for_ranks, figures=figures,
                            progress=progress, **kwargs)


def _analyse_run(run_dir, task, *, out_dir, seed_for_ranks, figures, progress, **kwargs) -> dict:
    run_dir = require_run_dir(run_dir)
    adapt_dir = run_dir / "adapt" / task
    results = read_json(adapt_dir / "results.json") if (adapt_dir / "results.json").is_file() else None
    if results is None:
        raise DigitlensError(f"{adapt_dir}: no results.json (run `digitlens adapt {run_dir} --task {task}` first)")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "subspace" / task
    lora_rows = [r for r in results["rows"] if r["method"] == "lora"]
    ranks = sorted({r["rank"] for r in lora_rows})
    seeds = sorted({r["seed"] for r in lora_rows})
    seed = seeds[0] if seed_for_ranks is None else seed_for_ranks
    dirs = {(r["rank"], r["seed"]): run_dir / r["adapter_dir"] for r in lora_rows}
    for path in dirs.values():
        if not path.is_dir():
            raise DigitlensError(f"{path}: adapter folder listed in {adapt_dir / 'results.json'} is missing")
    base_path = run_dir / "model.safetensors"
    base = load_base_weights(base_path)
    summary = analyse_adapters(base_path, [dirs[(r, seed)] for r in ranks], out_dir, figures=figures,
                               progress=progress, base_weights=base, **kwargs)
    adapters = {key: read_lora_adapter(path) for key, path in dirs.items()}
    names = [m["module"] for m in summary["modules"]]
    comparisons = []
    if len(ranks) >= 2:
        small = ranks[-2] if len(ranks) > 2 else ranks[0]
        comparisons.append(("ranks", f"phi(A_r={small}, A_r={ranks[-1]}), seed {seed}",
                            adapters[(small, seed)], adapters[(ranks[-1], seed)], f"rank{small}_vs_rank{ranks[-1]}"))
    if len(seeds) >= 2:
        for rank in ranks:
            comparisons.append(("seeds", f"phi(A_r={rank} seed {seeds[0]}, A_r={rank} seed {seeds[1]})",
                                adapters[(rank, seeds[0])], adapters[(rank, seeds[1])],
                                f"seed{seeds[0]}_vs_seed{seeds[1]}_rank{rank}"))
    summary["comparisons"] = []
    for kind, title, first, second, stem in comparisons:
        grid = {}
        entry = {"kind": kind, "title": title, "modules": []}
        for name in names:
            p = phi_matrix(right_singular_vectors(first.modules[name].lora_a, kwargs.get("device")),
                           right_singular_vectors(second.modules[name].lora_a, kwargs.get("device")))
            grid[name] = p
            entry["modules"].append({"module": name, **phi_summary(p, first.modules[name].lora_a.shape[1])})
        if figures:
            dim = first.modules[names[0]].lora_a.shape[1]
            entry["figures"] = _plot_module_grid(grid, dim, title, out_dir / "figures" / f"phi_{stem}")
            summary["figures"] += [p for p in entry["figures"] if p.endswith(".png")]
        summary["comparisons"].append(entry)
    full = [r for r in results["rows"] if r["method"] == "full" and r.get("adapter_dir")]
    if full:
        full_weights = load_base_weights(run_dir / full[0]["adapter_dir"] / "model.safetensors")
        top_k = kwargs.get("intruder_top_k", 10)
        threshold = kwargs.get("intruder_threshold", 0.5)
        summary["full_finetuning_intruders"] = [
            {"module": name, **intruder_dimensions(base[f"{name}.weight"], full_weights[f"{name}.weight"], top_k, threshold,
                                                   device=kwargs.get("device"))}
            for name in names if f"{name}.weight" in full_weights]
    summary["amplification_by_rank"] = amplification_over_seeds(base, adapters, names, device=kwargs.get("device"))
    summary["task"] = task
    summary["markdown"] = summary_markdown(summary) + _comparisons_markdown(summary) + amplification_markdown(summary)
    write_text(out_dir / "summary.md", summary["markdown"])
    write_json(out_dir / "subspace.json", summary)
    return summary


#: The LoRA paper's Table 7 (Hu et al. 2021): amplification factor of W_q in GPT-3's 48th layer.
PAPER_TABLE7_WQ = {4: 21.5, 64: 2.0}
_QUERY_NAMES = ("q", "q_proj", "query", "wq")


def amplification_over_seeds(base: dict, adapters: dict, names: list[str], device=None) -> list[dict]:
    """The amplification factor per target (last part of the module name: q, v, ...) and rank with
    its spread over seeds: for each seed the mean over the target's modules, then ``mean``, ``std``
    (ddof 1; 0 for one seed), ``min``, ``max`` over seeds; ``random_mean`` (the factor of random
    directions, mean over modules and seeds), ``above_chance`` / ``n_tests`` (module-seed pairs whose
    ΔW directions carry more of W than random ones, p < ALPHA) and ``paper`` (GPT-3 W_q, Table 7,
    for query targets at r = 4 and 64; else None). ``adapters``: {(rank, seed): LoraAdapter}."""
    targets: dict[str, list[str]] = {}
    for name in names:
        targets.setdefault(name.rpartition(".")[2], []).append(name)
    out = []
    for target, members in targets.items():
        for rank in sorted({r for r, _ in adapters}):
            seeds = sorted(s for r, s in adapters if r == rank)
            per_seed, random_factors, above = [], [], 0
            for seed in seeds:
                factors = []
                for name in members:
                    module = adapters[(rank, seed)].modules[name]
                    amp = amplification(match_base_weight(base, module), module.delta, rank=module.rank, device=device)
                    factors.append(amp["amplification"])
                    random_factors.append(amp["amplification_random_mean"])
                    above += int(amp["above_chance"])
                per_seed.append(float(np.mean(factors)))
            values = np.array(per_seed)
            out.append({"target": target, "rank": int(rank), "seeds": seeds, "per_seed": per_seed,
                        "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        "min": float(values.min()), "max": float(values.max()),
                        "random_mean": float(np.mean(random_factors)), "above_chance": above,
                        "n_tests": len(seeds) * len(members),
                        "paper": PAPER_TABLE7_WQ.get(int(rank)) if target.lower() in _QUERY_NAMES else None})
    return out


def amplification_markdown(summary: dict) -> str:
    """The amplification factor per target and rank, mean ± std over seeds, beside the paper's."""
    rows = summary.get("amplification_by_rank") or []
    if not rows:
        return ""
    lines = ["### Amplification factor over seeds (paper: Table 7)", "",
             "| target | r | amplification (mean ± std over seeds) | seeds | random directions | ΔW's directions in W "
             "above chance | GPT-3 W_q (paper) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['rank']} | {r['mean']:.2f} ± {r['std']:.2f} | {len(r['seeds'])} "
                     f"| {r['random_mean']:.2f} | {r['above_chance']}/{r['n_tests']} "
                     f"| {'' if r['paper'] is None else format(r['paper'], 'g')} |")
    lines += ["", f"Above chance: ||UᵀWVᵀ|| for ΔW's top-r directions larger than for random directions "
                  f"(Monte-Carlo, {PROJECTION_DRAWS} draws, p < {ALPHA}).", ""]
    return "\n".join(lines)


def _plot_module_grid(grid: dict[str, np.ndarray], dim: int, title: str, stem) -> list[str]:
    """phi heatmaps with one row per target (last part of the module name, e.g. q, v) and one
    column per layer, raw and chance-corrected."""
    from digitlens.plots.subspace import save_phi_pair

    targets, layers = [], []
    for name in grid:
        layer, _, target = name.rpartition(".")
        if target not in targets:
            targets.append(target)
        if layer not in layers:
            layers.append(layer)
    phis = [[grid.get(f"{layer}.{target}") for layer in layers] for target in targets]
    titles = [[f"{layer}.{target}" for layer in layers] for target in targets]
    return [str(p) for p in save_phi_pair(phis, titles, dim, stem, row_labels=targets, title=title)]


def _comparisons_markdown(summary: dict) -> str:
    lines = []
    for comp in summary.get("comparisons", []):
        lines += [f"### {comp['title']}", "", "| module | phi(1,1) | chance | corrected | above chance | phi(k,k) | k "
                  "| chance | corrected | above chance | mean phi | mean chance |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in comp["modules"]:
            lines.append(f"| {m['module']} | {_fmt(m['phi_1_1'])} | {_fmt(m['chance_1_1'])} | {_fmt(m['corrected_1_1'])} "
                         f"| {_verdict_cell(m, '1_1')} | {_fmt(m['phi_k_k'])} | {m['k']} | {_fmt(m['chance_k_k'])} "
                         f"| {_fmt(m['corrected_k_k'])} | {_verdict_cell(m, 'k_k')} | {_fmt(m['phi_mean'])} "
                         f"| {_fmt(m['chance_mean'])} |")
        lines.append("")
    intruders = summary.get("full_finetuning_intruders")
    if intruders:
        lines += ["### Intruder dimensions of full fine-tuning (reference for the LoRA rows above)", "",
                  "| module | intruders among top-k |", "|---|---|"]
        lines += [f"| {m['module']} | {m['count']}/{m['top_k']} |" for m in intruders]
        lines.append("")
    return "\n".join(lines)


# One writer per folder (issue 14): the run folder, or the --out folder of a bring-your-own analysis.
analyse_run = writes_folders("subspace", lambda run_dir, *args, **kwargs: [(run_dir, "run")])(analyse_run)
analyse_adapters = writes_folders(
    "subspace", lambda base_path, adapter_dirs, out_dir, *args, **kwargs: [(out_dir, "out")])(analyse_adapters)
