"""Speed of the LoRA study; prints markdown tables.

1. phi(i, j) for all i, j at d = 4096, r = 256: the vectorised ``digitlens.subspace.phi_matrix``
   (one product, squared, 2-D cumulative sums) against the naive double loop of the definition,
   in the same run. The full naive loop costs ~ d r^4 / 2 flops (hours), so it is timed on a
   random sample of (i, j) pairs and extrapolated to all r^2 pairs; the values on the sample are
   compared with the vectorised ones.
2. ``digitlens adapt`` + ``digitlens subspace`` with their defaults (ranks 4, 8, 64, seeds 0, 1,
   head-only and full fine-tuning baselines) on MNIST with the default ViT: seconds per rank and
   the total, plus test accuracy. ``--run RUN_DIR`` uses a trained ViT run (copied to a temporary
   folder); without it an untrained default ViT stands in (timings only, accuracies meaningless).

    python benchmarks/subspace_speed.py [--data-dir DIR] [--run runs/vit_mnist] [--skip-adapt]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def naive_phi_at(u_rows: np.ndarray, v_rows: np.ndarray, i: int, j: int) -> float:
    """The definition for one (i, j): ||U[:i] V[:j]^T||_F^2 / min(i, j)."""
    return float(np.linalg.norm(u_rows[:i] @ v_rows[:j].T, "fro") ** 2 / min(i, j))


def bench_phi(d: int, r: int, n_pairs: int, repeats: int) -> list[str]:
    from digitlens.subspace import phi_matrix, right_singular_vectors

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((r, d)), rng.standard_normal((r, d))
    t0 = time.perf_counter()
    u, v = right_singular_vectors(a), right_singular_vectors(b)
    svd_seconds = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fast = phi_matrix(u, v)
        times.append(time.perf_counter() - t0)
    fast_seconds = min(times)
    pairs = rng.integers(1, r + 1, size=(n_pairs, 2))
    t0 = time.perf_counter()
    naive = np.array([naive_phi_at(u, v, int(i), int(j)) for i, j in pairs])
    sample_seconds = time.perf_counter() - t0
    naive_total = sample_seconds / n_pairs * r * r
    max_diff = float(np.abs(naive - fast[pairs[:, 0] - 1, pairs[:, 1] - 1]).max())
    return [
        f"### phi(i, j) for all i, j: d = {d}, r = {r} ({r * r:,} pairs), float64", "",
        "| method | seconds | speed-up | max abs difference |", "|---|---|---|---|",
        f"| vectorised phi_matrix (best of {repeats}) | {fast_seconds:.4f} | {naive_total / fast_seconds:,.0f}x | (reference) |",
        f"| naive double loop, extrapolated from {n_pairs} random (i, j) pairs ({sample_seconds:.1f} s measured) "
        f"| {naive_total:,.0f} | 1x | {max_diff:.1e} |",
        f"| (SVD of both A matrices, shared by both methods) | {svd_seconds:.3f} | | |", "",
        f"Target: >= 100x faster and identical to 1e-9: {'met' if naive_total / fast_seconds >= 100 and max_diff <= 1e-9 else 'NOT met'}.",
        "",
    ]


def bench_adapt(run: str | None, data_dir: str | None) -> list[str]:
    import torch

    from digitlens.adapt import adapt_run
    from digitlens.models import build_model, save_model
    from digitlens.runio import read_json, write_json
    from digitlens.subspace import analyse_run

    tmp = Path(tempfile.mkdtemp(prefix="digitlens_bench_"))
    base = tmp / "base"
    base.mkdir()
    if run:
        config = read_json(Path(run) / "config.json")
        if config.get("dataset") != "mnist" or config.get("model") != "vit":
            raise SystemExit(f"--run {run}: need a ViT run on MNIST, got {config.get('model')} on {config.get('dataset')}")
        shutil.copy(Path(run) / "config.json", base / "config.json")
        shutil.copy(Path(run) / "model.safetensors", base / "model.safetensors")
    else:
        torch.manual_seed(0)
        save_model(build_model("vit", n_classes=10), base / "model.safetensors")
        write_json(base / "config.json", {"dataset": "mnist", "model": "vit", "model_kwargs": {}, "n_classes": 10,
                                          "seed": 0, "val_fraction": 0.1, "data_dir": data_dir, "epochs": 0})
    t0 = time.perf_counter()
    results = adapt_run(base, task="groups", data_dir=data_dir, progress=False)
    adapt_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    analyse_run(base, task="groups")
    subspace_seconds = time.perf_counter() - t0
    lines = [f"### adapt + subspace on MNIST, task groups, default ViT ({'trained run ' + run if run else 'UNTRAINED ViT: accuracies meaningless'}), "
             f"torch threads {torch.get_num_threads()}", "",
             f"{results['n_train']} training images, {results['n_test']} test images, {results['epochs']} epochs, "
             f"seeds {results['seeds']}", "",
             "| method | r | trainable params | train seconds per adapter (mean over seeds) | test accuracy |",
             "|---|---|---|---|---|"]
    for row in results["summary"]:
        lines.append(f"| {row['method']} | {row['rank'] or ''} | {row['trainable_params']:,} | {row['train_seconds_mean']:.1f} "
                     f"| {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} |")
    total = adapt_seconds + subspace_seconds
    lines += ["", "| stage | seconds |", "|---|---|", f"| adapt (all ranks, seeds, baselines, evaluation, figures) | {adapt_seconds:.1f} |",
              f"| subspace (all analyses and figures) | {subspace_seconds:.1f} |", f"| total | {total:.1f} |", "",
              f"Target: adapt + subspace < 300 s on 2 cores: {'met' if total < 300 else 'NOT met'}.", ""]
    shutil.rmtree(tmp, ignore_errors=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("DIGITLENS_DATA"), help="MNIST folder (default DIGITLENS_DATA)")
    parser.add_argument("--run", default=None, help="trained ViT run on MNIST to adapt (copied, not modified)")
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--r", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=200, help="(i, j) pairs timed with the naive loop")
    parser.add_argument("--skip-adapt", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("MPLBACKEND", "Agg")
    lines = bench_phi(args.d, args.r, args.pairs, repeats=3)
    print("\n".join(lines), flush=True)
    if not args.skip_adapt:
        print("\n".join(bench_adapt(args.run, args.data_dir)))


if __name__ == "__main__":
    main()
