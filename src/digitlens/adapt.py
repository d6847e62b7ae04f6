"""LoRA adaptation of a trained digitlens ViT to a new task, with PEFT (the only stage that imports it).

Tasks:
- ``groups``: binary "is the digit in {1, 2, 4, 6, 9}?" on the base run's own dataset (seed 002);
- ``digits``: scikit-learn's 8x8 digits (other writers) upsampled to 28x28, 10 classes.

For every rank and seed a LoRA adapter on the blocks' ``q`` and ``v`` projections (``targets``)
is trained together with a fresh classification head (the head is in PEFT's ``modules_to_save``)
and written in PEFT's format to ``runs/BASE/adapt/TASK/r{rank}_s{seed}/``
(``adapter_config.json`` + ``adapter_model.safetensors``; ``PeftModel.from_pretrained`` loads it,
see :func:`load_adapted_model`). Two baselines are trained on the same data: head only and full
fine-tuning (its weights go to ``full_s{seed}/model.safetensors`` for the intruder-dimension
comparison). ``results.json`` and ``results.md`` hold accuracy against trainable parameters.

Per-digit precision / recall of the binary groups decision (seed 002). For a digit d whose group
is g, restrict the test set to the images of d plus the images of the other group; on that subset,
with "predicted g" as the positive decision, recall_d = share of d's images put into g, and
precision_d = share of d among the subset's images predicted g (so a digit's precision falls when
the other group's images leak into g). Computed with scikit-learn.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from digitlens.device import model_device, resolve_device
from digitlens.errors import DigitlensError
from digitlens.runio import (figure_batch, read_json, require_run_dir, save_figure, staged_dir, write_json, write_npz,
                             write_text, writes_folders)

TASKS = ("groups", "digits")
GROUP_POSITIVE = (1, 2, 4, 6, 9)
GROUP_NEGATIVE = (0, 3, 5, 7, 8)
GROUP_NAMES = ("in {1, 2, 4, 6, 9}", "in {0, 3, 5, 7, 8}")

#: Defaults chosen so that adapt + subspace for ranks 4, 8, 64 and two seeds stays within a few
#: minutes on 2 CPU cores for the default ViT (see benchmarks/subspace_speed.py).
DEFAULTS = {"epochs": 2, "n_train": 1500, "n_test": 1000, "batch_size": 64, "lora_alpha": 8,
            "lr_lora": 2e-3, "lr_head": 5e-3, "lr_full": 3e-4, "weight_decay": 0.0}


def _task_data(config: dict, task: str, data_dir, n_train: int, n_test: int):
    """(train_x, train_y, test_x, test_y, test_digits, n_classes) for ``task``; subsets are drawn
    with a fixed seed so every rank and seed sees the same images."""
    from digitlens.data import load_splits, load_splits_for_run

    if task == "groups":
        splits = load_splits_for_run(config, data_dir=data_dir)
    elif task == "digits":
        splits = load_splits("digits", val_fraction=0.1, seed=0)
    else:
        raise DigitlensError(f"--task {task!r}: unknown task (choose from {', '.join(TASKS)})")
    rng = np.random.default_rng(0)
    train_idx = np.sort(rng.permutation(len(splits.train))[:n_train]) if n_train else np.arange(len(splits.train))
    test_idx = np.sort(rng.permutation(len(splits.test))[:n_test]) if n_test else np.arange(len(splits.test))
    train_x, train_digits = splits.train.images[train_idx], splits.train.labels[train_idx]
    test_x, test_digits = splits.test.images[test_idx], splits.test.labels[test_idx]
    if task == "groups":
        positive = torch.tensor(GROUP_POSITIVE)
        return (train_x, torch.isin(train_digits, positive).long(), test_x,
                torch.isin(test_digits, positive).long(), test_digits, 2)
    return train_x, train_digits, test_x, test_digits, test_digits, 10


def _fresh_base(run_dir: Path, n_classes: int, seed: int) -> nn.Module:
    """The base run's model; its head is replaced by a new one when ``n_classes`` differs."""
    from digitlens.models import load_model

    model = load_model(run_dir)
    if not hasattr(model, "head") or not isinstance(model.head, nn.Linear):
        raise DigitlensError(f"{run_dir}: adapt needs a model with a linear 'head' (the ViT); "
                             f"this run's model is {type(model).__name__}")
    if model.head.out_features != n_classes:
        torch.manual_seed(seed)
        model.head = nn.Linear(model.head.in_features, n_classes)
    return model


def _check_targets(model: nn.Module, targets, run_dir) -> None:
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise DigitlensError(f"--targets {','.join(targets)}: {run_dir}'s model has no linear layer named "
                             f"{missing[0]!r} (has {', '.join(sorted(names))})")


def _lora_config(rank: int, targets, alpha: float):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                      modules_to_save=["head"])


def _train(model: nn.Module, x, y, *, epochs: int, lr: float, batch_size: int, seed: int, weight_decay: float,
           progress: bool, label: str) -> float:
    """AdamW on the parameters that require grad; returns seconds spent."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=gen).to(x.device)  # drawn on the CPU: the same order on any device
        total = 0.0
        for k in range(0, len(y), batch_size):
            idx = order[k:k + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if progress:
            print(f"  {label}: epoch {epoch + 1}/{epochs} loss {total / len(y):.4f}", flush=True)
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Predicted class per image: ndarray of shape (N,), computed on the model's device."""
    model.eval()
    device = model_device(model)
    return np.concatenate([model(x[k:k + batch_size].to(device)).argmax(1).cpu().numpy()
                           for k in range(0, len(x), batch_size)])


def _save_adapter_atomically(peft_model, target: Path) -> None:
    """``save_pretrained`` into a temporary folder, then swap it in, so a crash never leaves a
    half-written adapter folder (PEFT writes its files in place, 0600): each file gets the umask
    mode and is fsynced before the swap."""
    from digitlens.runio import finish_files, staged_dir

    with staged_dir(target) as tmp:
        peft_model.save_pretrained(str(tmp))
        finish_files(tmp)


def load_adapted_model(run_dir, adapter_dir, n_classes: int | None = None):
    """The base run's model with the LoRA adapter in ``adapter_dir`` loaded by
    ``PeftModel.from_pretrained`` (eval mode). ``n_classes`` defaults to the value in the task's
    ``results.json``."""
    from peft import PeftModel

    run_dir, adapter_dir = require_run_dir(run_dir), Path(adapter_dir)
    if n_classes is None:
        n_classes = int(read_json(adapter_dir.parent / "results.json")["n_classes"])
    base = _fresh_base(run_dir, n_classes, seed=0)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DigitlensError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def per_digit_group_metrics(digits, y_true_group, y_pred_group) -> dict:
    """Per-digit precision / recall / F1 / accuracy of the binary groups decision (definition in the
    module docstring): dict of lists over digits 0-9 plus ``support``."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    digits, y_true_group, y_pred_group = map(np.asarray, (digits, y_true_group, y_pred_group))
    out = {"digit": list(range(10)), "precision": [], "recall": [], "f1": [], "accuracy": [], "support": []}
    for d in range(10):
        own_group = 1 if d in GROUP_POSITIVE else 0
        subset = (digits == d) | (y_true_group != own_group)
        kwargs = {"pos_label": own_group, "zero_division": 0.0}
        t, p = y_true_group[subset], y_pred_group[subset]
        out["precision"].append(float(precision_score(t, p, **kwargs)))
        out["recall"].append(float(recall_score(t, p, **kwargs)))
        out["f1"].append(float(f1_score(t, p, **kwargs)))
        out["accuracy"].append(float(accuracy_score(t, p)))
        out["support"].append(int((digits == d).sum()))
    return out


def plot_per_digit_groups(metrics: dict, stem, title: str) -> list:
    """Seed-002 figure: per-digit precision and recall, one row per group."""
    from digitlens.plots._common import pyplot
    from digitlens.plots.per_digit_metrics import PerDigitMetricsDisplay

    display = PerDigitMetricsDisplay(digits=metrics["digit"], precision=metrics["precision"],
                                     recall=metrics["recall"], f1=metrics["f1"], accuracy=metrics["accuracy"],
                                     support=metrics["support"], groups=[GROUP_POSITIVE, GROUP_NEGATIVE],
                                     group_names=[f"positive group {GROUP_NAMES[0]}", f"negative group {GROUP_NAMES[1]}"])
    display.plot(title=title)
    written = save_figure(display.figure_, stem)
    pyplot().close(display.figure_)
    return written


def adapt_run(run_dir, *, task: str = "groups", ranks=(4, 8, 64), seeds=(0, 1), targets=("q", "v"),
              epochs: int | None = None, data_dir=None, progress: bool = True, n_train: int | None = None,
              n_test: int | None = None, baselines: bool = True, lora_alpha: float | None = None,
              batch_size: int | None = None, device=None) -> dict:
    """Train LoRA adapters (every rank x seed) and the head-only / full fine-tuning baselines on
    ``task``; write ``runs/BASE/adapt/TASK/`` and return the ``results.json`` dict. ``device``: where
    they train ('auto' by default, see :func:`digitlens.device.resolve_device`); every model starts
    from the same CPU initialisation, and adapters are saved from the CPU."""
    from peft import get_peft_model

    run_dir = require_run_dir(run_dir)
    config = read_json(run_dir / "config.json")
    if task not in TASKS:
        raise DigitlensError(f"--task {task!r}: unknown task (choose from {', '.join(TASKS)})")
    ranks, seeds, targets = [int(r) for r in ranks], [int(s) for s in seeds], [str(t) for t in targets]
    if not ranks or min(ranks) < 1:
        raise DigitlensError(f"--ranks {ranks}: give positive integers")
    if not seeds:
        raise DigitlensError("--seeds: give at least one seed")
    epochs = DEFAULTS["epochs"] if epochs is None else int(epochs)
    n_train = DEFAULTS["n_train"] if n_train is None else int(n_train)
    n_test = DEFAULTS["n_test"] if n_test is None else int(n_test)
    batch_size = batch_size or DEFAULTS["batch_size"]
    alpha = DEFAULTS["lora_alpha"] if lora_alpha is None else float(lora_alpha)
    if epochs < 1:
        raise DigitlensError(f"--epochs {epochs}: must be at least 1")
    train_x, train_y, test_x, test_y, test_digits, n_classes = _task_data(config, task, data_dir, n_train, n_test)
    run_device = resolve_device(device)
    train_x, train_y = train_x.to(run_device), train_y.to(run_device)  # the training set lives on the device
    final_dir = run_dir / "adapt" / task
    # adapt/TASK/ is written whole into a temporary sibling and swapped in at the end: a later
    # subspace analysis or report never reads new adapters beside an old results.json.
    with staged_dir(final_dir) as out_dir:
        probe = _fresh_base(run_dir, n_classes, 0)
        _check_targets(probe, targets, run_dir)
        width = getattr(probe.head, "in_features", None)
        if width is not None and max(ranks) > width:
            raise DigitlensError(f"--ranks {max(ranks)}: larger than the model width {width}")
        total_params = sum(p.numel() for p in probe.parameters())
        common = dict(epochs=epochs, batch_size=batch_size, weight_decay=DEFAULTS["weight_decay"], progress=progress)
        rows, predictions = [], {}

        def recorded(path: Path) -> str:
            """Where ``path`` (written under the temporary folder) will be, relative to the run folder."""
            return str((final_dir / path.relative_to(out_dir)).relative_to(run_dir))

        def record(method, rank, seed, model, seconds, adapter_dir=None):
            y_pred = predict(model, test_x)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            acc = float((y_pred == test_y.numpy()).mean())
            predictions[f"{method}_r{rank}_s{seed}" if rank else f"{method}_s{seed}"] = y_pred
            rows.append({"method": method, "rank": rank, "seed": seed, "trainable_params": int(trainable),
                         "trainable_fraction": trainable / total_params, "accuracy": acc, "train_seconds": seconds,
                         "adapter_dir": None if adapter_dir is None else recorded(adapter_dir)})
            if progress:
                print(f"{task}: {method}{f' r={rank}' if rank else ''} seed {seed}: accuracy {acc:.4f}, "
                      f"{trainable:,} trainable parameters, {seconds:.1f} s", flush=True)

        for rank in ranks:
            for seed in seeds:
                torch.manual_seed(seed)
                model = get_peft_model(_fresh_base(run_dir, n_classes, seed), _lora_config(rank, targets, alpha)).to(run_device)
                seconds = _train(model, train_x, train_y, lr=DEFAULTS["lr_lora"], seed=seed,
                                 label=f"lora r={rank} seed {seed}", **common)
                adapter_dir = out_dir / f"r{rank}_s{seed}"
                _save_adapter_atomically(model, adapter_dir)
                record("lora", rank, seed, model, seconds, adapter_dir)
        if baselines:
            seed = seeds[0]
            torch.manual_seed(seed)
            head_model = _fresh_base(run_dir, n_classes, seed).to(run_device)
            for name, p in head_model.named_parameters():
                p.requires_grad_(name.startswith("head."))
            seconds = _train(head_model, train_x, train_y, lr=DEFAULTS["lr_head"], seed=seed, label="head only", **common)
            record("head_only", 0, seed, head_model, seconds)
            torch.manual_seed(seed)
            full_model = _fresh_base(run_dir, n_classes, seed).to(run_device)
            seconds = _train(full_model, train_x, train_y, lr=DEFAULTS["lr_full"], seed=seed, label="full fine-tuning",
                             **common)
            from digitlens.models import save_model

            full_dir = out_dir / f"full_s{seed}"
            save_model(full_model, full_dir / "model.safetensors")
            record("full", 0, seed, full_model, seconds, full_dir)
        write_npz(out_dir / "predictions.npz", y_true=test_y.numpy(), digits=test_digits.numpy(),
                  **{k: v for k, v in predictions.items()})
        results = {
            "task": task, "base_run": str(run_dir), "n_classes": n_classes, "targets": targets, "ranks": ranks,
            "seeds": seeds, "lora_alpha": alpha, "epochs": epochs, "n_train": int(len(train_y)),
            "n_test": int(len(test_y)), "total_params": int(total_params),
            "learning_rates": {k: DEFAULTS[k] for k in ("lr_lora", "lr_head", "lr_full")},
            "rows": rows, "summary": _summarise(rows), "figures": [],
        }
        if len(ranks) > 1:  # a best rank only where the paired test supports it
            results["rank_comparison"] = rank_comparison(test_y.numpy(), predictions, ranks, seeds)
        with figure_batch():  # worker processes draw the figures side by side
            if task == "groups":
                results["per_digit_definition"] = ("per digit d of group g, on the test images of d plus those of the other "
                                                   "group: recall = share of d put into g; precision = share of d among the "
                                                   "images predicted g")
                results["per_digit"] = {}
                for rank in ranks:
                    key = f"lora_r{rank}_s{seeds[0]}"
                    metrics = per_digit_group_metrics(test_digits.numpy(), test_y.numpy(), predictions[key])
                    results["per_digit"][key] = metrics
                    stem = out_dir / "figures" / f"per_digit_groups_r{rank}"
                    plot_per_digit_groups(metrics, stem, f"Groups task, LoRA r={rank} (seed {seeds[0]}): per-digit precision "
                                                         "and recall of 'in {1, 2, 4, 6, 9}?'")
                    results["figures"].append(recorded(stem.with_suffix(".png")))
            stem = out_dir / "figures" / "accuracy_vs_params"
            _plot_accuracy_vs_params(results, stem)
            results["figures"].append(recorded(stem.with_suffix(".png")))
        results["markdown"] = results_markdown(results)
        write_text(out_dir / "results.md", results["markdown"])
        write_json(out_dir / "results.json", results)
        return results


def _summarise(rows: list[dict]) -> list[dict]:
    """One row per (method, rank): mean and std of accuracy over seeds, trainable parameters, seconds."""
    keys = []
    for row in rows:
        if (row["method"], row["rank"]) not in keys:
            keys.append((row["method"], row["rank"]))
    out = []
    for method, rank in keys:
        group = [r for r in rows if r["method"] == method and r["rank"] == rank]
        acc = np.array([r["accuracy"] for r in group])
        out.append({"method": method, "rank": rank, "trainable_params": group[0]["trainable_params"],
                    "trainable_fraction": group[0]["trainable_fraction"], "accuracy_mean": float(acc.mean()),
                    "accuracy_std": float(acc.std()), "n_seeds": len(group),
                    "train_seconds_mean": float(np.mean([r["train_seconds"] for r in group]))})
    return out


def rank_comparison(y_true, predictions: dict, ranks, seeds) -> dict:
    """:func:`digitlens.comparison.compare_variants` of the LoRA ranks on the same test images (each
    rank's predictions per seed, ``predictions`` keyed ``lora_r{rank}_s{seed}``) plus its ``sentence``."""
    from digitlens.comparison import compare_variants, variants_sentence

    found = compare_variants(y_true, {int(r): [predictions[f"lora_r{r}_s{s}"] for s in seeds] for r in ranks})
    found["sentence"] = variants_sentence(found, "r = ")
    return found


def results_markdown(results: dict) -> str:
    """Accuracy against trainable parameters as a markdown table, then the paired test of the ranks.

    Test accuracy is the mean over seeds with the 95% Wilson interval of ``n_test`` images (the
    test-set noise of one run: the seeds share the images) and the spread (std) over seeds."""
    from digitlens.intervals import format_ci, wilson_interval

    n_test = int(results["n_test"])
    lines = [f"Task `{results['task']}`: {results['n_train']} training images, {n_test} test images, "
             f"{results['epochs']} epochs; LoRA on {', '.join(results['targets'])} with alpha = {results['lora_alpha']:g}.",
             "", f"| method | r | trainable parameters | % of model | test accuracy, mean over seeds (95% Wilson interval "
             f"of {n_test} images) | std over seeds (points) | seeds | train s |", "|---|---|---|---|---|---|---|---|"]
    for row in results["summary"]:
        name = {"lora": "LoRA", "head_only": "head only", "full": "full fine-tuning"}[row["method"]]
        mean = row["accuracy_mean"]
        ci = wilson_interval(round(mean * n_test), n_test) if n_test > 0 else None
        lines.append(f"| {name} | {row['rank'] or ''} | {row['trainable_params']:,} | {100 * row['trainable_fraction']:.2f} "
                     f"| {format_ci(mean, ci)} | {100 * row['accuracy_std']:.2f} | {row['n_seeds']} "
                     f"| {row['train_seconds_mean']:.1f} |")
    comparison = results.get("rank_comparison")
    if comparison:
        lines += ["", f"Ranks compared: {comparison['sentence']}"]
    return "\n".join(lines) + "\n"


def _plot_accuracy_vs_params(results: dict, stem) -> None:
    from digitlens.plots._common import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    markers = {"lora": ("o", "#1f77b4"), "head_only": ("s", "#7f7f7f"), "full": ("D", "#d62728")}
    for method, (marker, colour) in markers.items():
        pts = [r for r in results["summary"] if r["method"] == method]
        if not pts:
            continue
        ax.errorbar([p["trainable_params"] for p in pts], [p["accuracy_mean"] for p in pts],
                    yerr=[p["accuracy_std"] for p in pts], fmt=marker + ("-" if method == "lora" else ""),
                    color=colour, capsize=3,
                    label={"lora": "LoRA", "head_only": "head only", "full": "full fine-tuning"}[method])
        for p in pts:
            if method == "lora":
                ax.annotate(f"r={p['rank']}", (p["trainable_params"], p["accuracy_mean"]), textcoords="offset points",
                            xytext=(4, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Task '{results['task']}': accuracy vs trainable parameters\n"
                 f"({results['n_train']} training images, {results['epochs']} epochs; mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, stem)
    plt.close(fig)


# One writer per run folder (issue 14): adapt holds the run's lock while it writes adapt/TASK/.
adapt_run = writes_folders("adapt", lambda run_dir, *args, **kwargs: [(run_dir, "run")])(adapt_run)
