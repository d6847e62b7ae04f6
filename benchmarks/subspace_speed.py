"""Speed of the LoRA subspace study; prints dated markdown tables.

1. phi(i, j) for all i, j at d = 4096, r = 256: the vectorised ``digitlens.subspace.phi_matrix``
   (one product, squared, 2-D cumulative sums) against the naive double loop of the definition,
   in the same run. The full naive loop costs ~ d r^4 / 2 flops (hours), so it is timed on a
   random sample of (i, j) pairs and extrapolated to all r^2 pairs; the values on the sample are
   compared with the vectorised ones.
2. ``adapt`` (kept small: ranks 4, 8, 64, seeds 0 and 1, both baselines, 2 epochs on 1,000
   training images) then the subspace analysis (``analyse_run``: every measure, table and figure)
   on the default ViT that ``digitlens train --model vit`` builds (``train.full_model_kwargs``),
   task ``groups``. ``--run RUN_DIR`` adapts that trained ViT run instead (copied, not modified);
   without it an untrained default ViT stands in (seed 0): the timings hold, the accuracies mean
   nothing.

    python benchmarks/subspace_speed.py [--dataset mnist|digits] [--data-dir DIR] [--run RUN_DIR] [--skip-adapt]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from digitlens.adapt import adapt_run  # noqa: E402
from digitlens.models import build_model, save_model  # noqa: E402
from digitlens.runio import read_json, write_json  # noqa: E402
from digitlens.subspace.measures import phi_matrix, right_singular_vectors  # noqa: E402
from digitlens.subspace.run import analyse_run  # noqa: E402
from digitlens.train import full_model_kwargs  # noqa: E402

ADAPT = {"task": "groups", "ranks": (4, 8, 64), "seeds": (0, 1), "epochs": 2, "n_train": 1000, "n_test": 1000}


def naive_phi_at(u_rows: np.ndarray, v_rows: np.ndarray, i: int, j: int) -> float:
    """The definition for one (i, j): ||U[:i] V[:j]^T||_F^2 / min(i, j)."""
    return float(np.linalg.norm(u_rows[:i] @ v_rows[:j].T, "fro") ** 2 / min(i, j))


def bench_phi(d: int, r: int, n_pairs: int, repeats: int) -> list[str]:
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


def _base_run(folder: Path, run: str | None, dataset: str, data_dir: str | None) -> str:
    """Write the base run into ``folder``: a copy of ``run``'s config and weights, or an untrained
    default ViT; return how the table names it."""
    if run:
        config = read_json(Path(run) / "config.json")
        if config.get("model") != "vit":
            raise SystemExit(f"--run {run}: need a ViT run, got {config.get('model')}")
        shutil.copy(Path(run) / "config.json", folder / "config.json")
        shutil.copy(Path(run) / "model.safetensors", folder / "model.safetensors")
        kwargs = config.get("model_kwargs", {})
        return (f"trained ViT run `{Path(run).name}` on {config.get('dataset')} (dim {kwargs.get('dim')}, "
                f"depth {kwargs.get('depth')})")
    kwargs = full_model_kwargs("vit", None)
    torch.manual_seed(0)
    save_model(build_model("vit", n_classes=10, **kwargs), folder / "model.safetensors")
    write_json(folder / "config.json", {"dataset": dataset, "model": "vit", "model_kwargs": kwargs, "n_classes": 10,
                                        "seed": 0, "val_fraction": 0.1, "data_dir": data_dir, "epochs": 0})
    return (f"UNTRAINED default ViT (dim {kwargs['dim']}, depth {kwargs['depth']}, mlp {kwargs['mlp_dim']}, "
            f"patch MLP {kwargs['patch_hidden']}, {kwargs['pos_embed']} positions; accuracies meaningless)")


def bench_adapt(run: str | None, dataset: str, data_dir: str | None) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix="digitlens_bench_"))
    try:
        base = tmp / "base"
        base.mkdir()
        what = _base_run(base, run, dataset, data_dir)
        t0 = time.perf_counter()
        results = adapt_run(base, data_dir=data_dir, progress=False, **ADAPT)
        adapt_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = analyse_run(base, task=ADAPT["task"])
        subspace_seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_modules = len(summary["modules"])
    lines = [f"### adapt + subspace, task {ADAPT['task']} on {dataset}: {what}", "",
             f"{results['n_train']} training images, {results['n_test']} test images, at most {ADAPT['epochs']} epochs, "
             f"seeds {results['seeds']}, torch threads {torch.get_num_threads()}", "",
             "| method | r | trainable params | train seconds per model (mean over seeds) | test accuracy |",
             "|---|---|---|---|---|"]
    for row in results["summary"]:
        lines.append(f"| {row['method']} | {row['rank'] or ''} | {row['trainable_params']:,} | {row['train_seconds_mean']:.1f} "
                     f"| {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} |")
    total = adapt_seconds + subspace_seconds
    lines += ["", "| stage | seconds |", "|---|---|",
              f"| adapt (all ranks, seeds, baselines, evaluation, figures) | {adapt_seconds:.1f} |",
              f"| subspace ({n_modules} modules; {len(summary['comparisons'])} comparisons; "
              f"{len(summary['figures'])} figures) | {subspace_seconds:.1f} |",
              f"| total | {total:.1f} |", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "digits"), help="the base run's dataset")
    parser.add_argument("--data-dir", default=os.environ.get("DIGITLENS_DATA"), help="MNIST folder (default DIGITLENS_DATA)")
    parser.add_argument("--run", default=None, help="trained ViT run to adapt (copied, not modified)")
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--r", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=200, help="(i, j) pairs timed with the naive loop")
    parser.add_argument("--skip-adapt", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"## Subspace benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start\n", flush=True)
    print("\n".join(bench_phi(args.d, args.r, args.pairs, repeats=3)), flush=True)
    if not args.skip_adapt:
        print("\n".join(bench_adapt(args.run, args.dataset, args.data_dir)), flush=True)
    print(f"Whole benchmark: {time.perf_counter() - started:.0f} s wall; load average at the end "
          f"{os.getloadavg()[0]:.1f} (other processes share the cores when it exceeds their count).")


if __name__ == "__main__":
    main()
