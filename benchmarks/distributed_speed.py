"""One process against torchrun with N gloo processes on this machine's CPU cores.

Trains the default CNN on MNIST (1 epoch) and explains its 10,000 test images (saliency,
integrated gradients, Grad-CAM; no faithfulness) with `digitlens train|explain [--nproc N]`, and
prints a markdown table: the training seconds the run records (train_summary.json), the command's
wall-clock seconds (process start-up, data loading and torchrun's rendezvous included), and the
test accuracy of each run (the same band, not the same bits: batch norm sees 1/N of each batch).

    python benchmarks/distributed_speed.py [--data-dir DIR] [--nproc 2] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "digitlens", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"digitlens {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("DIGITLENS_DATA"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("--data-dir: give the MNIST folder or set DIGITLENS_DATA")
    env = dict(os.environ, DIGITLENS_DEVICE="cpu", DIGITLENS_FIGURE_WORKERS="0", MPLBACKEND="Agg")
    root = Path(tempfile.mkdtemp(prefix="digitlens-dist-"))
    rows = []
    for nproc in (1, args.nproc):
        run = root / f"nproc{nproc}"
        common = ["--data-dir", args.data_dir, "--no-progress"] + ([] if nproc == 1 else ["--nproc", str(nproc)])
        train_wall = _run(["train", "--dataset", "mnist", "--epochs", str(args.epochs), "--out", str(run), *common], env)
        summary = json.loads((run / "train_summary.json").read_text())
        explain_wall = _run(["explain", str(run), "--methods", "saliency,integrated_gradients,gradcam",
                             "--faithfulness-size", "0", *common], env)
        metrics = json.loads((run / "explain" / "explain_metrics.json").read_text())
        _run(["evaluate", str(run), "--no-progress", "--data-dir", args.data_dir], env)
        accuracy = json.loads((run / "metrics.json").read_text())["accuracy"]
        rows.append((nproc, summary["train_seconds"], train_wall, sum(metrics["seconds"].values()), explain_wall,
                     accuracy))
        print(f"done nproc={nproc}", file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"\nMNIST, default CNN, {args.epochs} epoch(s), {os.cpu_count()} CPU cores, gloo; "
          f"load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}\n")
    print("| processes | training s (recorded) | train command s | explain maps s (rank 0) | explain command s | test accuracy |")
    print("|---:|---:|---:|---:|---:|---:|")
    for nproc, train_s, train_wall, maps_s, explain_wall, acc in rows:
        print(f"| {nproc} | {train_s:.1f} | {train_wall:.1f} | {maps_s:.1f} | {explain_wall:.1f} | {acc * 100:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
