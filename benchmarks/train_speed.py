"""How fast does a digit classifier reach a given MNIST test accuracy on this CPU?

Trains, in one invocation and each in its own fresh process (so peak memory is per model):
  ref       the PyTorch-examples MNIST CNN exactly as users copy it (conv32-conv64-maxpool-dropout-
            fc128-dropout-fc10, Adadelta lr 1.0, StepLR gamma 0.7, batch 64, a DataLoader over a
            TensorDataset normalised with 0.1307/0.3081), tested after each epoch;
  cnn       digitlens' default ``cnn`` with its default epochs (what `digitlens train` runs);
  cnn-long  the same ``cnn`` with ``--epochs-long`` epochs (the 99.4% configuration);
  vit       digitlens' ``vit`` with its default epochs.
digitlens models are tested ``--evals-per-epoch`` times per epoch; evaluation time is not counted.
The reference trains on all 60,000 training images, digitlens models on the 54,000 of
`digitlens train` (6,000 held out for validation); all are tested on the 10,000 test images.

Prints a markdown table: parameters, training seconds to reach 98.5% / 99.0% / 99.4% test accuracy,
best accuracy, samples/s and peak RSS.

    python benchmarks/train_speed.py [--data-dir DIR] [--epochs-ref 3] [--models ref,cnn,cnn-long,vit] [--quick]
        [--device cpu|cuda] [--precision fp32|bf16]

On ``--device cuda`` the digitlens rows keep the training set on the GPU as `digitlens train` does,
the reference keeps its DataLoader and moves each batch (as the PyTorch example does), one warm-up
step (CUDA context, cuDNN) runs before the clock starts, and the GPU is synchronised before every
reading of the clock.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time

TARGETS = (0.985, 0.990, 0.994)


def _load(data_dir, quick, row, device="cpu"):
    """The reference trains on all 60,000 training images, as the PyTorch example does; digitlens
    rows on the 54,000 that `digitlens train` uses (6,000 held out for validation, seed 0)."""
    from digitlens.data import load_mnist_split, load_splits, locate_mnist

    folder = locate_mnist(data_dir, download=False)
    test = load_mnist_split(folder, "test")
    train = load_mnist_split(folder, "train") if row == "ref" else \
        load_splits("mnist", data_dir=folder, val_fraction=0.1, seed=0, size=28).train
    x, y, xt, yt = train.images, train.labels, test.images, test.labels
    if quick:
        x, y, xt, yt = x[:3000], y[:3000], xt[:1000], yt[:1000]
    if row != "ref":  # digitlens keeps the data on the training device
        x, y, xt, yt = (t.to(device) for t in (x, y, xt, yt))
    return x, y, xt, yt


def example_net_class():
    """The PyTorch-examples MNIST Net (examples/mnist/main.py: conv32-conv64-maxpool-dropout-fc128-
    dropout-fc10, log_softmax), defined on first use so that this script imports torch only in the
    worker processes; benchmarks/byom_reference.py uses the same class."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ExampleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 1)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(9216, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = F.relu(self.conv1(x))
            x = F.relu(self.conv2(x))
            x = F.max_pool2d(x, 2)
            x = self.dropout1(x)
            x = torch.flatten(x, 1)
            x = F.relu(self.fc1(x))
            x = self.dropout2(x)
            return F.log_softmax(self.fc2(x), dim=1)

    return ExampleNet


def _reference(x, y, xt, yt, epochs, trace, device):
    """The PyTorch-examples MNIST CNN and training loop (examples/mnist/main.py), unchanged in substance."""
    ExampleNet = example_net_class()
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(1)
    norm = lambda t: (t - 0.1307) / 0.3081  # noqa: E731  transforms.Normalize((0.1307,), (0.3081,))
    loader = DataLoader(TensorDataset(norm(x), y), batch_size=64, shuffle=True)
    test_loader = DataLoader(TensorDataset(norm(xt), yt), batch_size=1000)
    model = ExampleNet().to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    seconds = 0.0
    _sync(device)
    for _ in range(epochs):
        tic = time.perf_counter()
        model.train()
        for data, target in loader:
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            optimizer.step()
        scheduler.step()
        _sync(device)
        seconds += time.perf_counter() - tic
        model.eval()
        correct = 0
        with torch.no_grad():
            for data, target in test_loader:
                correct += int((model(data.to(device)).argmax(1) == target.to(device)).sum())
        trace.append((seconds, correct / len(yt)))
    return model, seconds, len(y) * epochs


def _sync(device):
    from digitlens.device import synchronize

    synchronize(device)


def _warm_up(model_name, hyper, model_kwargs, x, y, device, precision):
    """One training step of a throwaway copy, so that CUDA's context and cuDNN's kernel choice are
    not timed (nothing on the CPU)."""
    import torch.nn.functional as F

    from digitlens import train as T
    from digitlens.device import autocast

    if device.type == "cpu":
        return
    scratch = T.prepare_model(model_name, 10, T.full_model_kwargs(model_name, model_kwargs), hyper).to(device)
    for _ in range(3):
        with autocast(device, precision):
            loss = F.cross_entropy(scratch(x[:hyper.batch_size]), y[:hyper.batch_size])
        loss.backward()
    T.evaluate_loss_accuracy(scratch, x[:2000], y[:2000])
    _sync(device)


def _digitlens(model_name, x, y, xt, yt, epochs, evals_per_epoch, hyper_overrides, model_kwargs, trace,
               device, precision):
    import torch

    from digitlens import train as T

    epochs = epochs or T.DEFAULT_EPOCHS[("mnist", model_name)]
    hyper = T.resolve_hyper(model_name, "mnist", hyper_overrides, epochs)
    _warm_up(model_name, hyper, model_kwargs, x, y, device, precision)
    torch.manual_seed(0)
    model = T.prepare_model(model_name, 10, T.full_model_kwargs(model_name, model_kwargs), hyper).to(device)
    bs = hyper.batch_size
    per_epoch = T.steps_per_epoch(len(y), bs)
    optimizer, scheduler = T.make_optimizer(model, hyper, per_epoch * epochs)
    eval_at = {round(per_epoch * (i + 1) / evals_per_epoch) - 1 for i in range(evals_per_epoch)}
    clock = {"paused": 0.0, "start": 0.0}

    def on_batch(step, _loss):
        if step in eval_at:
            _sync(device)
            now = time.perf_counter()
            _, acc = T.evaluate_loss_accuracy(model, xt, yt)
            model.train()
            trace.append((now - clock["start"] - clock["paused"], acc))
            clock["paused"] += time.perf_counter() - now

    _sync(device)
    clock["start"] = time.perf_counter()
    for epoch in range(epochs):
        T.train_one_epoch(model, x, y, optimizer, scheduler, batch_size=bs, seed=0, epoch=epoch,
                          label_smoothing=hyper.label_smoothing, augment=hyper.augment,
                          on_batch=on_batch, precision=precision)
    _sync(device)
    seconds = time.perf_counter() - clock["start"] - clock["paused"]
    return model, seconds, per_epoch * bs * epochs


def _child(row, args, queue):
    import torch

    from digitlens.device import check_precision, resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = check_precision(args.precision, device)
    x, y, xt, yt = _load(args.data_dir, args.quick, row, device)
    trace: list[tuple[float, float]] = []
    overrides = json.loads(args.hyper) if args.hyper else {}
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if row == "ref":
        model, seconds, samples = _reference(x, y, xt, yt, args.epochs_ref, trace, device)
    elif row == "cnn-long":
        model, seconds, samples = _digitlens("cnn", x, y, xt, yt, args.epochs_long, args.evals_per_epoch,
                                             overrides, kwargs, trace, device, precision)
    else:
        model, seconds, samples = _digitlens(row, x, y, xt, yt, args.epochs or None, args.evals_per_epoch,
                                             overrides, kwargs, trace, device, precision)
    params = sum(p.numel() for p in model.parameters())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    queue.put({"row": row, "params": params, "seconds": seconds, "samples": samples, "trace": trace,
               "epochs": samples / len(y),
               "peak_mib": peak_kib / 1024})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("DIGITLENS_DATA"),
                        help="folder with the MNIST IDX files (default: $DIGITLENS_DATA)")
    parser.add_argument("--epochs-ref", type=int, default=3, help="epochs of the PyTorch-examples reference")
    parser.add_argument("--epochs-long", type=int, default=6, help="epochs of the cnn-long row")
    parser.add_argument("--epochs", type=int, default=0, help="epochs of the cnn/vit rows (default: digitlens' default)")
    parser.add_argument("--models", default="ref,cnn,cnn-long,vit", help="rows, comma-separated: ref,cnn,cnn-long,vit,mlp")
    parser.add_argument("--evals-per-epoch", type=int, default=4, help="test evaluations per epoch of digitlens models")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--hyper", default="", help='JSON hyper-parameter overrides for every digitlens row, e.g. \'{"lr": 0.2}\'')
    parser.add_argument("--model-kwargs", default="", help="JSON model kwargs for every digitlens row")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3,000 training and 1,000 test images, 1 epoch each")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    parser.add_argument("--precision", default="fp32", help="fp32 (default) or bf16 autocast (CUDA only)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs_ref, args.epochs_long, args.epochs = 1, 1, args.epochs or 1
        args.evals_per_epoch = min(args.evals_per_epoch, 2)
    if not args.data_dir:
        parser.error("--data-dir: give the MNIST folder or set DIGITLENS_DATA")

    ctx = mp.get_context("spawn")
    results = []
    for row in [r.strip() for r in args.models.split(",") if r.strip()]:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(row, args, queue))
        proc.start()
        result = queue.get()
        proc.join()
        results.append(result)
        trace = ", ".join(f"{s:.1f}s:{a * 100:.2f}" for s, a in result["trace"])
        print(f"[{row}] {result['seconds']:.1f} s, test accuracy over time: {trace}", file=sys.stderr, flush=True)

    load = os.getloadavg()
    device_name = args.device
    if args.device.startswith("cuda"):
        import torch

        device_name = f"{args.device} ({torch.cuda.get_device_name()}), {args.precision}"
    print(f"\nMNIST, device {device_name}, {args.threads} threads, torch {__import__('torch').__version__}, "
          f"load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}{' (QUICK smoke test)' if args.quick else ''}\n")
    header = ["model", "params", "epochs", "train s"] + [f"s to {t * 100:.1f}%" for t in TARGETS] + \
             ["best test acc", "samples/s", "peak RSS MiB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in results:
        reached = []
        for target in TARGETS:
            first = next((s for s, a in r["trace"] if a >= target), None)
            reached.append("not reached" if first is None else f"{first:.1f}")
        best = max(a for _, a in r["trace"])
        epochs = r["epochs"]
        print(f"| {r['row']} | {r['params']:,} | {epochs:.0f} | {r['seconds']:.1f} | " + " | ".join(reached) +
              f" | {best * 100:.2f}% | {r['samples'] / r['seconds']:,.0f} | {r['peak_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
