"""A few epochs of Adam on small data, for tests that need a model which has learned something."""

from __future__ import annotations

import torch
from torch import nn


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 3, seed: int = 0) -> nn.Module:
    """Train ``model`` on images x (N, C, H, W) and labels y (N,) with Adam (lr 3e-3, batches of 64,
    seeded shuffles); returns it in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def brief_mnist_run(run_dir, n_train: int = 12000, epochs: int = 1):
    """A run folder (config.json + model.safetensors, as ``digitlens train --dataset mnist``
    writes them) holding the default CNN trained by :func:`train_briefly` on the first
    ``n_train`` images of the run's own training split (DIGITLENS_DATA); about 97% test accuracy
    in a few seconds. Returns ``(run_dir, model)``; an existing run folder is reused."""
    from pathlib import Path

    from digitlens import data, models, runio
    from digitlens.train import full_model_kwargs

    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").is_file():
        return run_dir, models.load_model(run_dir)
    config = {"dataset": "mnist", "model": "cnn", "model_kwargs": full_model_kwargs("cnn", None), "n_classes": 10,
              "seed": 0, "val_fraction": 0.1, "data_dir": None, "image_size": 28}
    train = data.load_splits("mnist", val_fraction=0.1, seed=0, download=False).train
    # One thread: on a machine shared with other jobs, two threads make small conv batches many
    # times slower (measured 8.5 s against 50 s here), and the results do not change.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_briefly(models.build_model("cnn", **config["model_kwargs"]), train.images[:n_train],
                              train.labels[:n_train], epochs=epochs)
    finally:
        torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    runio.write_json(run_dir / "config.json", config)
    models.save_model(model, run_dir / "model.safetensors")
    return run_dir, models.load_model(run_dir)


class ExpectsMnistNormalised(nn.Module):
    """``inner`` (a model of [0, 1] pixels) as a user ships a model trained on normalised inputs:
    it expects ``(x - 0.1307) / 0.3081`` and undoes it, so with ``--normalize 0.1307,0.3081``
    declared it must predict exactly like ``inner``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x * 0.3081 + 0.1307)
