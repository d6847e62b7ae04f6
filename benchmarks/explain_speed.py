"""Speed and memory of per-digit maps: digitlens versus Captum used as its tutorials show.

Each measurement runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own.
Prints a markdown table: images/s per method, peak RSS, integrated gradients' completeness error
(mean |sum(attr) - (f(x) - f(black))| / |f(x) - f(black)|) and mean number of steps.

    python benchmarks/explain_speed.py --data-dir /path/to/mnist [--run runs/mnist_cnn] [--threads 2]

Without --run a default CNN is trained on MNIST for one epoch in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _load(run, data_dir, n):
    from digitlens.explain.run import load_run_split
    from digitlens.models import load_model

    data = load_run_split(run, "test", data_dir)
    return load_model(run), data.images[:n], data.labels[:n]


def _peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM of /proc/self/status (Linux). ru_maxrss is no good
    here: across fork + exec it keeps the parent's peak (the parent trains the model)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(name: str, run: str, data_dir: str, n: int, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    model, x, y = _load(run, data_dir, n)
    lib, method = name.split(":")
    extra = {}
    t0 = time.perf_counter()
    if lib == "digitlens":
        from digitlens.explain import explain_model

        method, _, tolerance = method.partition("@")  # "integrated_gradients@0.015": another tolerance
        methods = ["saliency", "integrated_gradients", "gradcam"] if method == "all3" else [method]
        ig = {"ig_tolerance": float(tolerance)} if tolerance else {}
        out = explain_model(model, x, y.numpy(), methods=methods, faithfulness_size=0, batch_size=250, **ig)
        if "integrated_gradients" in out:
            extra = {"rel_error": out["integrated_gradients"]["completeness_rel_error_mean"],
                     "steps": out["integrated_gradients"]["mean_evaluated_steps"]}
    else:  # Captum as in its tutorials: one attribute call per batch of 100, weights left trainable
        from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

        model.eval()
        sums = torch.zeros(10, 28, 28, dtype=torch.float64)
        rel = []
        for start in range(0, len(y), 100):
            xb, yb = x[start:start + 100].clone().requires_grad_(), y[start:start + 100]
            if method == "saliency":
                a = Saliency(model).attribute(xb, target=yb)
            elif method == "integrated_gradients":
                a, delta = IntegratedGradients(model).attribute(xb, target=yb, n_steps=50,
                                                                return_convergence_delta=True)
                with torch.no_grad():
                    gap = (model(xb) - model(torch.zeros_like(xb))).gather(1, yb[:, None])[:, 0]
                rel.append((delta.abs() / gap.abs().clamp_min(1e-3)).detach().numpy())
            else:
                convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
                a = LayerGradCam(model, convs[-1]).attribute(xb, target=yb)
                a = LayerAttribution.interpolate(a, (28, 28), "bilinear")
            sums.index_add_(0, yb, a.detach().abs().sum(1).double())
        if rel:
            extra = {"rel_error": float(np.concatenate(rel).mean()), "steps": 50}
    seconds = time.perf_counter() - t0
    peak_mb = _peak_rss_mb()
    return {"name": name, "n": int(len(y)), "seconds": seconds, "peak_rss_mb": peak_mb, **extra}


def main(argv=None):
    from digitlens.explain.methods import IG_TOLERANCE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("DIGITLENS_DATA"))
    parser.add_argument("--run", default=None, help="run folder of the model (default: train a CNN for 1 epoch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=10000, help="test images for digitlens and fast Captum methods")
    parser.add_argument("--captum-ig-n", type=int, default=1000, help="test images for Captum's (slow) IG")
    parser.add_argument("--strict-tolerance", type=float, default=0.015,
                        help="IG tolerance of the extra digitlens row (the other rows use digitlens' default)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data_dir is None:
        parser.error("--data-dir (or DIGITLENS_DATA) is required: the MNIST IDX files")
    if args.worker:
        print(json.dumps(worker(args.worker, args.run, args.data_dir, args.n, args.threads)))
        return
    run = args.run
    if run is None:
        from digitlens.train import train

        run = os.path.join(tempfile.mkdtemp(prefix="digitlens-bench-"), "mnist_cnn")
        train(run, dataset="mnist", model="cnn", epochs=1, data_dir=args.data_dir, progress=False)
    jobs = [("captum:saliency", args.n), ("digitlens:saliency", args.n),
            ("captum:gradcam", args.n), ("digitlens:gradcam", args.n),
            ("captum:integrated_gradients", min(args.captum_ig_n, args.n)), ("digitlens:integrated_gradients", args.n),
            # on Captum's images, so the two completeness errors are measured on the same images
            (f"digitlens:integrated_gradients@{args.strict_tolerance}", min(args.captum_ig_n, args.n)),
            ("digitlens:all3", args.n)]
    rows = []
    for name, n in jobs:
        cmd = [sys.executable, __file__, "--worker", name, "--run", run, "--data-dir", args.data_dir,
               "--n", str(n), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done {name}", file=sys.stderr, flush=True)
    print(f"\nModel: {run} ({args.threads} threads)\n")
    print("| method | library | images | seconds | images/s | peak RSS (MB) | IG completeness error (mean rel.) | IG steps evaluated per image (mean) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lib, method = r["name"].split(":")
        label = "saliency + integrated_gradients + gradcam" if method == "all3" else method
        if method.startswith("integrated_gradients") and lib == "digitlens":
            name, _, tolerance = method.partition("@")
            label = f"{name} (tolerance {tolerance or IG_TOLERANCE})"
        err = f"{r['rel_error']:.4f}" if "rel_error" in r else ""
        steps = f"{r['steps']:.1f}" if "steps" in r else ""
        print(f"| {label} | {lib} | {r['n']:,} | {r['seconds']:.1f} | {r['n'] / r['seconds']:,.0f} | "
              f"{r['peak_rss_mb']:,.0f} | {err} | {steps} |")


if __name__ == "__main__":
    main()
