"""Speed and memory of per-digit maps: digitlens versus Captum used as its tutorials show.

Each measurement runs in a fresh subprocess so its peak resident memory (VmHWM) is its own.
Prints a markdown table: images/s per method, peak RSS and, for integrated gradients, the mean
completeness error (|sum(attr) - (f(x) - f(black))| / |f(x) - f(black)|), the mean gradient
evaluations per image, and the attribution error on the first --reference-n images: the mean
relative L1 distance sum|attr - ref| / sum|ref| to integrated gradients with 512 Gauss-Legendre
steps (a completeness error near 0 does not by itself make every pixel right).

A second table times the faithfulness curves (deletion at pixel and patch level, insertion, ROAD
MoRF / LeRF at patch and pixel level) in digitlens on --n images and in Quantus 0.6
(PixelFlipping, RegionPerturbation, ROAD) on the first --quantus-n, on the same frozen model and
the same saliency maps, with the largest difference between the two libraries' values where
they compute the same thing.

    python benchmarks/explain_speed.py --data-dir /path/to/mnist [--run runs/mnist_cnn] [--threads 2]
        [--tables attribution|faithfulness|all] [--device cpu|cuda]

``--device cuda`` runs the attribution table (digitlens and Captum alike, images on the GPU for
Captum, digitlens' own batching) on the GPU and adds its peak GPU memory; the faithfulness table
stays on the CPU (Quantus is run with device="cpu").

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

from digitlens.explain.methods import IG_TOLERANCE


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


REFERENCE_STEPS = 512


def _ig_settings(method: str) -> dict:
    """"integrated_gradients@0.01": tolerance 0.01; "integrated_gradients@steps50": 50 fixed steps."""
    _, _, setting = method.partition("@")
    if setting.startswith("steps"):
        return {"ig_n_steps": int(setting[5:])}
    return {"ig_tolerance": float(setting)} if setting else {}


def _attribution_error(attr, reference) -> float:
    """Mean over images of sum|attr - ref| / sum|ref|."""
    dims = tuple(range(1, attr.dim()))
    return float(((attr - reference).abs().sum(dims) / reference.abs().sum(dims).clamp_min(1e-12)).mean())


def worker(name: str, run: str, data_dir: str, n: int, threads: int, reference_file: str | None = None,
           device: str = "cpu") -> dict:
    import numpy as np
    import torch

    from digitlens.device import resolve_device, synchronize

    torch.set_num_threads(threads)
    dev = resolve_device(device)
    model, x, y = _load(run, data_dir, n)
    model = model.to(dev)
    if dev.type == "cuda":  # a warm-up pass, so CUDA's start-up is not timed
        with torch.no_grad():
            model.eval()(x[:256].to(dev))
        synchronize(dev)
    lib, method = name.split(":")
    extra = {}
    if lib == "reference":  # Captum's IG with many steps on the first images (untimed, an oracle)
        from captum.attr import IntegratedGradients

        model.eval()
        xr, yr = x[:n].to(dev), y[:n].to(dev)
        ref = torch.cat([IntegratedGradients(model).attribute(xr[i:i + 50], baselines=torch.zeros_like(xr[i:i + 50]),
                                                              target=yr[i:i + 50], n_steps=REFERENCE_STEPS,
                                                              internal_batch_size=1024).detach().cpu()
                         for i in range(0, n, 50)])
        torch.save(ref, reference_file)
        return {"name": name, "n": n, "seconds": 0.0, "peak_rss_mb": _peak_rss_mb()}
    reference = None
    if method.startswith("integrated_gradients") and reference_file and os.path.isfile(reference_file):
        reference = torch.load(reference_file, weights_only=True)
    t0 = time.perf_counter()
    if lib == "digitlens":
        from digitlens.explain.run import explain_model

        ig = _ig_settings(method)
        method = method.partition("@")[0]
        methods = ["saliency", "integrated_gradients", "gradcam"] if method == "all3" else [method]
        out = explain_model(model, x, y.numpy(), methods=methods, faithfulness_size=0, device=dev, **ig)
        synchronize(dev)
        seconds = time.perf_counter() - t0
        if "integrated_gradients" in out:
            extra = {"rel_error": out["integrated_gradients"]["completeness_rel_error_mean"],
                     "steps": out["integrated_gradients"]["mean_evaluated_steps"]}
            if reference is not None and method == "integrated_gradients":
                from digitlens.explain.methods import attribute, fold_batch_norm, prepare_model

                folded = fold_batch_norm(prepare_model(model))  # as explain_model runs it
                k = reference.shape[0]
                kwargs = {"n_steps": ig["ig_n_steps"]} if "ig_n_steps" in ig else {"tolerance": ig.get("ig_tolerance", IG_TOLERANCE)}
                attr = torch.cat([attribute(folded, x[i:min(i + 250, k)], y[i:min(i + 250, k)], "integrated_gradients",
                                            **kwargs) for i in range(0, k, 250)])
                extra["attr_error"] = _attribution_error(attr, reference)
    else:  # Captum as in its tutorials: one attribute call per batch of 100, weights left trainable
        from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

        model.eval()
        sums = torch.zeros(10, 28, 28, dtype=torch.float64, device=dev)
        rel, ref_attr = [], []
        for start in range(0, len(y), 100):
            xb, yb = x[start:start + 100].to(dev).requires_grad_(), y[start:start + 100].to(dev)
            if method == "saliency":
                a = Saliency(model).attribute(xb, target=yb)
            elif method == "integrated_gradients":
                a, delta = IntegratedGradients(model).attribute(xb, target=yb, n_steps=50,
                                                                return_convergence_delta=True)
                with torch.no_grad():
                    gap = (model(xb) - model(torch.zeros_like(xb))).gather(1, yb[:, None])[:, 0]
                rel.append((delta.abs() / gap.abs().clamp_min(1e-3)).detach().cpu().numpy())
                if reference is not None and start < reference.shape[0]:
                    ref_attr.append(a.detach().cpu()[:reference.shape[0] - start])
            else:
                convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
                a = LayerGradCam(model, convs[-1]).attribute(xb, target=yb)
                a = LayerAttribution.interpolate(a, (28, 28), "bilinear")
            sums.index_add_(0, yb, a.detach().abs().sum(1).double())
        synchronize(dev)
        seconds = time.perf_counter() - t0
        if rel:
            extra = {"rel_error": float(np.concatenate(rel).mean()), "steps": 50}
        if ref_attr:
            extra["attr_error"] = _attribution_error(torch.cat(ref_attr), reference)
    peak_mb = _peak_rss_mb()
    if dev.type == "cuda":
        extra["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return {"name": name, "n": int(len(y)), "seconds": seconds, "peak_rss_mb": peak_mb, **extra}


# name -> (what digitlens computes, Quantus' metric of the same values or None)
FAITH_CURVES = {
    "deletion_pixel": "deletion, 28 steps of 28 pixels (Quantus PixelFlipping, features_in_step=28)",
    "deletion_patch": "deletion, 49 patches of 4x4 (Quantus RegionPerturbation, patch_size=4)",
    "insertion_patch": "insertion, 49 patches of 4x4 (no Quantus metric)",
    "road_morf_patch": "ROAD MoRF, 4x4 patches, 10 fractions (Quantus ROAD on patch-constant maps)",
    "road_lerf_patch": "ROAD LeRF, 4x4 patches, 10 fractions (Quantus ROAD on patch-constant maps)",
    "road_morf_pixel": "ROAD MoRF, pixels, 10 fractions (Quantus ROAD)",
    "road_lerf_pixel": "ROAD LeRF, pixels, 10 fractions (Quantus ROAD)",
}


def _saliency_maps(model, x, y):
    """|gradient| maps (N, 28, 28) float64 with a tie-break of 1e-6 of the maximum (seeded), so that
    numpy's unstable argsort (Quantus) and digitlens' stable one give the same order."""
    import numpy as np
    import torch

    from digitlens.explain.methods import attribute

    a = torch.cat([attribute(model, x[i:i + 500], y[i:i + 500], "saliency") for i in range(0, len(y), 500)])
    a = a.abs().sum(1).double().numpy()
    return a + 1e-6 * a.max() * np.random.default_rng(0).random(a.shape)


def _digitlens_curve(curve, model, x, y, a, noise=0.01):
    """The curve as digitlens computes it, in the form Quantus returns it."""
    from digitlens.explain.faithfulness import patch_order, perturbation_curves
    from digitlens.explain.road import ROAD_FRACTIONS, road_curves

    kind, *rest = curve.split("_")
    grid = 28 if rest[-1] == "pixel" else 7
    scores = a if grid == 28 else a.reshape(len(a), 7, 4, 7, 4).sum(axis=(2, 4))
    order = patch_order(scores)
    if kind == "deletion" and grid == 28:
        return perturbation_curves(model, x, y, order, 28, units_per_step=28)[:, 1:]
    if kind in ("deletion", "insertion"):
        c = perturbation_curves(model, x, y, order, grid, mode=kind)
        return c[:, :1] - c[:, 1:]  # RegionPerturbation's drop from the unperturbed prediction
    return road_curves(model, x, y, order, grid=grid, mode=rest[0], fractions=ROAD_FRACTIONS, noise=noise,
                       measure="accuracy").mean(axis=0)


def _quantus_curve(curve, model, x, y, a):
    import numpy as np
    import quantus

    from digitlens.explain.road import ROAD_FRACTIONS, removed_counts

    kind, *rest = curve.split("_")
    xb, yb, ab = x.numpy(), y.numpy(), a[:, None]
    if curve == "deletion_pixel":
        metric = quantus.PixelFlipping(features_in_step=28, perturb_baseline="black", disable_warnings=True)
    elif curve == "deletion_patch":
        metric = quantus.RegionPerturbation(patch_size=4, regions_evaluation=49, order="morf",
                                            perturb_baseline="black", disable_warnings=True)
    else:
        if rest[-1] == "patch":  # every pixel carries its patch's score; k patches = 16k pixels
            ab = np.kron(a.reshape(len(a), 7, 4, 7, 4).sum(axis=(2, 4)), np.ones((4, 4)))[:, None]
            percentages = [k * 100 / 49 + 1e-7 for k in removed_counts(49, ROAD_FRACTIONS)]
        else:
            percentages = [100 * f for f in ROAD_FRACTIONS]
        if rest[0] == "lerf":  # Quantus' ROAD removes the most relevant first: reverse the scores
            ab = ab.max() - ab
        metric = quantus.ROAD(noise=0.0, percentages=percentages, disable_warnings=True)
        # ROAD's post-processing keeps the first batch only: one batch for all images
        scores = metric(model=model, x_batch=xb, y_batch=yb, a_batch=ab, device="cpu", batch_size=len(yb))
        return np.array([scores[p] for p in percentages])
    return np.asarray(metric(model=model, x_batch=xb, y_batch=yb, a_batch=ab, device="cpu", batch_size=len(yb)))


def faith_worker(name: str, run: str, data_dir: str, n: int, threads: int) -> dict:
    import warnings

    import numpy as np
    import torch

    from digitlens.explain.methods import fold_batch_norm, prepare_model

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    _, lib, curve = name.split(":")
    model, x, y = _load(run, data_dir, n)
    # the frozen, batch-norm-folded, channels-last copy that the explain stage runs gradient methods
    # on (the same function of the input); Quantus gets the same model
    model = fold_batch_norm(prepare_model(model))
    a = _saliency_maps(model, x, y)  # untimed
    t0, c0 = time.perf_counter(), time.process_time()
    if lib == "digitlens":
        _digitlens_curve(curve, model, x, y, a)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        extra = {}
    else:
        theirs = _quantus_curve(curve, model, x, y, a)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        ours = _digitlens_curve(curve, model, x, y, a, noise=0.0)  # untimed, on the same images
        extra = {"max_abs_diff": float(np.abs(ours - theirs).max())}
    return {"name": name, "n": int(len(y)), "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": _peak_rss_mb(),
            **extra}


def _faith_table(rows):
    speed = {r["name"]: r["n"] / r["seconds"] for r in rows}
    print("| curve | library | images | seconds | CPU seconds | images/s | digitlens / Quantus images/s | peak RSS (MB) | "
          "max abs difference from digitlens on Quantus' images (deletion: probabilities; ROAD: accuracy per "
          "fraction, noise 0) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        _, lib, curve = r["name"].split(":")
        ratio = ""
        if lib == "digitlens" and f"faith:quantus:{curve}" in speed:
            ratio = f"{speed[r['name']] / speed[f'faith:quantus:{curve}']:.1f}x"
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        print(f"| {FAITH_CURVES[curve]} | {lib} | {r['n']:,} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
              f"{r['n'] / r['seconds']:,.0f} | "
              f"{ratio} | {r['peak_rss_mb']:,.0f} | {diff} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("DIGITLENS_DATA"))
    parser.add_argument("--run", default=None, help="run folder of the model (default: train a CNN for 1 epoch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=10000, help="test images for digitlens and fast Captum methods")
    parser.add_argument("--captum-ig-n", type=int, default=1000, help="test images for Captum's (slow) IG")
    parser.add_argument("--reference-n", type=int, default=200,
                        help=f"first test images on which IG is compared with {REFERENCE_STEPS} Gauss-Legendre steps")
    parser.add_argument("--quantus-n", type=int, default=200,
                        help="test images for Quantus' (slow) faithfulness metrics")
    parser.add_argument("--tables", choices=("attribution", "faithfulness", "all"), default="all",
                        help="which tables to measure")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (the attribution table; default cpu)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data_dir is None:
        parser.error("--data-dir (or DIGITLENS_DATA) is required: the MNIST IDX files")
    if args.worker:
        if args.worker.startswith("faith:"):
            print(json.dumps(faith_worker(args.worker, args.run, args.data_dir, args.n, args.threads)))
        else:
            print(json.dumps(worker(args.worker, args.run, args.data_dir, args.n, args.threads, args.reference_file,
                                    args.device)))
        return
    run = args.run
    if run is None:
        from digitlens.train import train

        run = os.path.join(tempfile.mkdtemp(prefix="digitlens-bench-"), "mnist_cnn")
        train(run, dataset="mnist", model="cnn", epochs=1, data_dir=args.data_dir, progress=False, device=args.device)
    n_ig = min(args.captum_ig_n, args.n)
    reference_file = os.path.join(tempfile.mkdtemp(prefix="digitlens-bench-ref-"), "reference.pt")
    jobs = [("reference:integrated_gradients", min(args.reference_n, n_ig)),
            ("captum:saliency", args.n), ("digitlens:saliency", args.n),
            ("captum:gradcam", args.n), ("digitlens:gradcam", args.n),
            ("captum:integrated_gradients", n_ig), ("digitlens:integrated_gradients", args.n),
            # on Captum's images, so that the completeness errors are measured on the same images
            ("digitlens:integrated_gradients", n_ig),
            ("digitlens:integrated_gradients@steps50", n_ig),  # Captum's own rule and steps, digitlens' model copy
            ("digitlens:all3", args.n)]
    if args.tables == "faithfulness":
        jobs = []
    if args.tables != "attribution":
        n_q = min(args.quantus_n, args.n)
        for curve in FAITH_CURVES:
            jobs.append((f"faith:digitlens:{curve}", args.n))
            if not curve.startswith("insertion"):
                jobs.append((f"faith:quantus:{curve}", n_q))
    rows, faith_rows = [], []
    for name, n in jobs:
        cmd = [sys.executable, __file__, "--worker", name, "--run", run, "--data-dir", args.data_dir,
               "--n", str(n), "--threads", str(args.threads), "--reference-file", reference_file,
               "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
        if name.startswith("faith:"):
            faith_rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        elif not name.startswith("reference"):
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done {name}", file=sys.stderr, flush=True)
    print(f"\nModel: {run} ({args.threads} threads, device {args.device})\n")
    if faith_rows:
        _faith_table(faith_rows)
        print()
    if not rows:
        return
    n_ref = min(args.reference_n, n_ig)
    print("| method | library | images | seconds | images/s | peak RSS (MB) | IG completeness error (mean rel.) | "
          f"IG gradient evaluations per image (mean) | IG attribution error vs {REFERENCE_STEPS} steps (mean rel. L1, first {n_ref}) | "
          "peak GPU memory (MB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lib, method = r["name"].split(":")
        label = "saliency + integrated_gradients + gradcam" if method == "all3" else method
        if method.startswith("integrated_gradients") and lib == "digitlens":
            ig = _ig_settings(method)
            label = (f"integrated_gradients ({ig['ig_n_steps']} steps)" if "ig_n_steps" in ig
                     else f"integrated_gradients (tolerance {ig.get('ig_tolerance', IG_TOLERANCE)})")
        elif method == "integrated_gradients":
            label = "integrated_gradients (50 steps)"
        cells = [f"{r[key]:{fmt}}" if key in r else "" for key, fmt in
                 (("rel_error", ".4f"), ("steps", ".1f"), ("attr_error", ".4f"), ("peak_gpu_mb", ",.0f"))]
        print(f"| {label} | {lib} | {r['n']:,} | {r['seconds']:.1f} | {r['n'] / r['seconds']:,.0f} | "
              f"{r['peak_rss_mb']:,.0f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
