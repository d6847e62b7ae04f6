"""The issue-11 example on MNIST: does `digitlens evaluate --model-file` give a user's model its own accuracy?

Trains the PyTorch-examples MNIST CNN (conv32-conv64-maxpool-dropout-fc128-dropout-fc10,
log_softmax; Adadelta lr 1.0, batch 64, inputs normalised with 0.1307/0.3081) for ``--steps``
steps on the MNIST training images, measures its test accuracy with its own loop, saves it as
TorchScript (ref.pt) and ONNX (ref.onnx), and runs ``digitlens evaluate --model-file FILE
--dataset mnist --out DIR`` on both, with and without ``--normalize 0.1307,0.3081``.

Prints a markdown table: accuracy and ECE per file and flags, against the model's own loop.

    python benchmarks/byom_reference.py [--data-dir DIR] [--steps 400] [--out /tmp/byom]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from train_speed import example_net_class  # this folder: sys.path[0] when run as a script

MEAN, STD = 0.1307, 0.3081


# pytorch/examples mnist/main.py's Net, the one class train_speed.py's reference row trains too.
ExampleNet = example_net_class()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="/tmp/byom_reference")
    args = parser.parse_args()

    from digitlens.data import load_mnist_split, locate_mnist

    folder = locate_mnist(args.data_dir, download=False)
    train, test = load_mnist_split(folder, "train"), load_mnist_split(folder, "test")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    model = ExampleNet()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    t0 = time.perf_counter()
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(0, len(train), (64,))
        loss = F.nll_loss(model((train.images[idx] - MEAN) / STD), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    train_s = time.perf_counter() - t0
    with torch.no_grad():  # the example's own test loop
        correct = sum(int((model((test.images[i:i + 1000] - MEAN) / STD).argmax(1) == test.labels[i:i + 1000]).sum())
                      for i in range(0, len(test), 1000))
    own = correct / len(test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(out / "ref.pt"))
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(out / "ref.onnx"), dynamo=False,
                          input_names=["input"], output_names=["log_probs"],
                          dynamic_axes={"input": {0: "batch"}, "log_probs": {0: "batch"}})
    rows = [f"| the example's own loop | | {own:.4%} ({correct}/{len(test)}) | | {train_s:.0f} s of training, {args.steps} steps |"]
    for name in ("ref.pt", "ref.onnx"):
        for flags in ([], ["--normalize", f"{MEAN},{STD}"]):
            run_dir = out / f"{name.replace('.', '_')}{'_normalized' if flags else ''}"
            cmd = [sys.executable, "-m", "digitlens.cli", "evaluate", "--model-file", str(out / name), "--dataset", "mnist",
                   "--out", str(run_dir), "--no-progress", *flags] + (["--data-dir", args.data_dir] if args.data_dir else [])
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if done.returncode:
                rows.append(f"| {name} | {' '.join(flags)} | failed: {done.stderr.strip()[-200:]} | | |")
                continue
            metrics = json.loads((run_dir / "metrics.json").read_text())
            same = "equal" if metrics["n_samples"] - metrics["n_errors"] == correct else "DIFFERENT"
            rows.append(f"| {name} | {' '.join(flags) or '(none)'} | {metrics['accuracy']:.4%} | {metrics['ece']:.3f} | "
                        f"{same} to the own loop; outputs {metrics['source']['user_model']['outputs']}; {seconds:.0f} s |")
    print("| model | flags | test accuracy | ECE | note |\n|---|---|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
