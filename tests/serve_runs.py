"""Two small digits runs for the serve tests: a CNN trained briefly and an untrained ViT, each a
run folder with config.json, model.safetensors, predictions.npz and metrics.json (the files
``digitlens evaluate`` writes and ``digitlens serve`` reads), built once per test session."""

from __future__ import annotations

import torch
from training import train_briefly


def small_runs(tmp_path_factory) -> tuple:
    """``(cnn_run_dir, vit_run_dir)`` under the session's temporary folder; reused when present."""
    from digitlens import data, models, runio
    from digitlens.inference import predict_proba
    from digitlens.metrics import compute_metrics
    from digitlens.train import full_model_kwargs

    root = tmp_path_factory.getbasetemp() / "serve-runs"
    folders = (root / "cnn", root / "vit")
    if all((f / "metrics.json").is_file() for f in folders):
        return folders
    splits = data.load_splits("digits", val_fraction=0.1, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches on a shared machine: one thread is faster
    try:
        for folder, name, epochs in ((folders[0], "cnn", 3), (folders[1], "vit", 0)):
            kwargs = full_model_kwargs(name, {"depth": 2, "dim": 32, "heads": 2} if name == "vit" else None)
            torch.manual_seed(0)
            model = models.build_model(name, **kwargs)
            model = train_briefly(model, splits.train.images, splits.train.labels, epochs=epochs) if epochs else model.eval()
            config = {"dataset": "digits", "model": name, "model_kwargs": kwargs, "n_classes": 10, "seed": 0,
                      "val_fraction": 0.1, "data_dir": None, "image_size": 28}
            folder.mkdir(parents=True, exist_ok=True)
            runio.write_json(folder / "config.json", config)
            models.save_model(model, folder / "model.safetensors")
            proba = predict_proba(model, splits.test.images)
            y_true = splits.test.labels.numpy()
            runio.write_npz(folder / "predictions.npz", y_true=y_true, y_pred=proba.argmax(axis=1), proba=proba)
            runio.write_json(folder / "metrics.json", compute_metrics(y_true, proba.argmax(axis=1), proba))
    finally:
        torch.set_num_threads(threads)
    return folders
