"""LoRA adaptation of a trained digitlens ViT to a new task, with PEFT (the only stage that imports it).

Tasks:
- ``groups``: binary "is the digit in {1, 2, 4, 6, 9}?" on the base run's own dataset (seed 002);
- ``digits``: scikit-learn's 8x8 digits (other writers) upsampled to 28x28, 10 classes: a domain
  shift for a base trained on MNIST (no shift for one trained on ``digits``);
- ``rotated``: the base run's own dataset with every image turned 90 degrees anticlockwise, 10
  classes: a shift any base needs to adapt to (the digits demo's, where no other data set is
  offline), which the base's stroke features survive but its spatial layout does not.

Every adapter and baseline trains until it converges: a validation split (``val_fraction`` of
the task's training images, the same for every rank and seed) is scored after every epoch, and
training stops after ``patience`` epochs without a better validation accuracy (ties broken by the
lower validation loss), or at ``max_epochs``; the best epoch's weights are put back. The learning
rate follows a one-cycle schedule (``torch.optim.lr_scheduler.OneCycleLR``: warm-up, then cosine
decay to ~0 at ``max_epochs``) whose peak is per method (``SCHEDULES``). ``results.json`` keeps per
row the epochs run, the best epoch, its validation accuracy and the per-epoch curves
(``figures/training_curves.png``, one panel per method).

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

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from digitlens.device import model_device, resolve_device
from digitlens.errors import DigitlensError
from digitlens.runio import (figure_batch, read_json, require_run_dir, save_figure, staged_dir, write_json, write_npz,
                             write_text, writes_folders)

TASKS = ("groups", "digits", "rotated")
GROUP_POSITIVE = (1, 2, 4, 6, 9)
GROUP_NEGATIVE = (0, 3, 5, 7, 8)
GROUP_NAMES = ("in {1, 2, 4, 6, 9}", "in {0, 3, 5, 7, 8}")

#: Defaults chosen so that adapt + subspace for ranks 4, 8, 64 and three seeds stays within a few
#: minutes on 2 CPU cores for the default ViT. ``epochs`` is the most epochs a model may train
#: (the one-cycle schedule's length); early stopping usually ends it sooner.
DEFAULTS = {"epochs": 30, "patience": 4, "val_fraction": 0.2, "n_train": 1500, "n_test": 1000, "batch_size": 64,
            "lora_alpha": 8, "weight_decay": 0.0}

#: Peak learning rate and warm-up share of the one-cycle schedule, per method. Tuned once on the
#: ``digits`` task (MNIST demo ViT -> scikit-learn digits, 970 training and 242 validation images,
#: seed 0, LoRA r = 8, 30 epochs without early stopping), choosing per method the peak with the
#: best validation accuracy among 4 values a factor ~3 apart (README, "LoRA study", 2026-11-26):
#: LoRA 3e-3 (97.5%; 1e-2 and 3e-2 oscillate, 1e-3 is still rising at epoch 30), head only 3e-2
#: (94.2%, as 1e-1 but with a lower loss), full fine-tuning 3e-3 (98.8%; 3e-4 and 1e-3: 97.5%).
#: The new head learns at the head-only peak in every method: it starts from scratch in all three.
SCHEDULES = {"lora": {"lr": 3e-3, "pct_start": 0.1}, "head_only": {"lr": 3e-2, "pct_start": 0.1},
             "full": {"lr": 3e-3, "pct_start": 0.1}}


def _task_data(config: dict, task: str, data_dir, n_train: int, n_test: int):
    """(train_x, train_y, test_x, test_y, test_digits, n_classes) for ``task``; subsets are drawn
    with a fixed seed so every rank and seed sees the same images."""
    from digitlens.data import load_splits, load_splits_for_run

    if task == "groups":
        splits = load_splits_for_run(config, data_dir=data_dir)
    elif task == "digits":
        splits = load_splits("digits", val_fraction=0.1, seed=0)
    elif task == "rotated":
        splits = load_splits_for_run(config, data_dir=data_dir)
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
    if task == "rotated":  # the same digits turned 90 degrees anticlockwise: a new spatial layout
        train_x, test_x = torch.rot90(train_x, 1, dims=(-2, -1)), torch.rot90(test_x, 1, dims=(-2, -1))
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


def validation_split(n_images: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), sorted, of ``n_images`` training images: ``fraction``
    of them (at least 1 when fraction > 0) drawn with a fixed seed, so every rank, seed and method
    is scored on the same validation images."""
    n_val = min(n_images - 1, max(1, round(fraction * n_images))) if fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(n_images)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@torch.no_grad()
def _loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y), in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for k in range(0, len(y), batch_size):
        logits = model(x[k:k + batch_size])
        loss += float(nn.functional.cross_entropy(logits, y[k:k + batch_size], reduction="sum"))
        correct += int((logits.argmax(1) == y[k:k + batch_size]).sum())
    return loss / len(y), correct / len(y)


def _train(model: nn.Module, x, y, val_x, val_y, *, epochs: int, lr: float, pct_start: float, patience: int,
           batch_size: int, seed: int, weight_decay: float, progress: bool, label: str,
           epoch_limit: int | None = None, head_lr: float | None = None) -> dict:
    """AdamW with a one-cycle schedule over ``epochs`` on the parameters that require grad (those
    of the ``head`` at peak ``head_lr`` when given, the others at ``lr``), scored
    on (val_x, val_y) after every epoch; stops after ``patience`` epochs without a higher
    validation accuracy and puts the best epoch's weights back (highest validation accuracy,
    ties: lower validation loss). ``epoch_limit`` stops after that many epochs regardless (same
    schedule; for checks).

    Returns ``{"seconds", "epochs_run", "best_epoch", "best_val_accuracy", "best_val_loss",
    "last_improvement_epoch" (the last epoch whose validation accuracy rose), "stop_reason"
    ("patience", "max_epochs" or "epoch_limit"), "stopped_early" (stopped by patience, also when
    that happened at the last allowed epoch), "curve": {"epoch", "train_loss", "train_accuracy",
    "val_loss", "val_accuracy", "lr"} (lists, one entry per epoch)}``. PyTorch has no early
    stopping of its own; this loop is it.
    """
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    is_head = [head_lr is not None and ("head." in name or name.startswith("head")) for name, _ in params]
    groups = [{"params": [p for (_, p), h in zip(params, is_head) if h == flag], "lr": head_lr if flag else lr}
              for flag in (False, True) if any(h == flag for h in is_head)]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    steps = -(-len(y) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=epochs * steps,
                                                    pct_start=pct_start)
    gen = torch.Generator().manual_seed(seed)
    curve: dict[str, list] = {"epoch": [], "train_loss": [], "train_accuracy": [], "val_loss": [], "val_accuracy": [],
                              "lr": []}
    best = {"epoch": 0, "accuracy": -1.0, "loss": float("inf"), "weights": None}
    # Patience counts from the last epoch whose validation accuracy rose: a plateau of equal
    # accuracies whose loss keeps creeping down (as it does while the one-cycle rate decays) is
    # converged, so it stops training; among its epochs the lowest validation loss is kept.
    improved_epoch, stop_reason = 0, "max_epochs" if epoch_limit is None or epoch_limit >= epochs else "epoch_limit"
    start = time.perf_counter()
    last = epochs if epoch_limit is None else min(epochs, epoch_limit)
    for epoch in range(1, last + 1):
        model.train()
        order = torch.randperm(len(y), generator=gen).to(x.device)  # drawn on the CPU: the same order on any device
        total, correct = 0.0, 0
        for k in range(0, len(y), batch_size):
            idx = order[k:k + batch_size]
            logits = model(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        val_loss, val_acc = _loss_and_accuracy(model, val_x, val_y)
        for key, value in zip(curve, (epoch, total / len(y), correct / len(y), val_loss, val_acc,
                                      opt.param_groups[0]["lr"])):
            curve[key].append(value)
        if val_acc > best["accuracy"]:
            improved_epoch = epoch
        if val_acc > best["accuracy"] or (val_acc == best["accuracy"] and val_loss < best["loss"]):
            best = {"epoch": epoch, "accuracy": val_acc, "loss": val_loss,
                    "weights": {name: p.detach().clone() for name, p in params}}
        if progress:
            print(f"  {label}: epoch {epoch}/{epochs} loss {total / len(y):.4f} validation accuracy {val_acc:.4f}"
                  f"{' (best)' if best['epoch'] == epoch else ''}", flush=True)
        if epoch - improved_epoch >= patience:
            stop_reason = "patience"
            break
    with torch.no_grad():
        for name, p in params:
            p.copy_(best["weights"][name])
    model.eval()
    return {"seconds": time.perf_counter() - start, "epochs_run": len(curve["epoch"]), "best_epoch": best["epoch"],
            "best_val_accuracy": best["accuracy"], "best_val_loss": best["loss"],
            "last_improvement_epoch": improved_epoch, "stop_reason": stop_reason,
            "stopped_early": stop_reason == "patience", "curve": curve}


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
              batch_size: int | None = None, device=None, patience: int | None = None,
              val_fraction: float | None = None) -> dict:
    """Train LoRA adapters (every rank x seed) and the head-only / full fine-tuning baselines (every
    seed) on ``task`` until they converge (``epochs`` at most, early stopping after ``patience``
    epochs without a better validation accuracy on ``val_fraction`` of the training images); write
    ``runs/BASE/adapt/TASK/`` and return the ``results.json`` dict. ``device``: where they train
    ('auto' by default, see :func:`digitlens.device.resolve_device`); every model starts from the
    same CPU initialisation, and adapters are saved from the CPU."""
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
    patience = DEFAULTS["patience"] if patience is None else int(patience)
    val_fraction = DEFAULTS["val_fraction"] if val_fraction is None else float(val_fraction)
    if epochs < 1:
        raise DigitlensError(f"--epochs {epochs}: must be at least 1")
    if patience < 1:
        raise DigitlensError(f"--patience {patience}: must be at least 1")
    if not 0 < val_fraction < 1:
        raise DigitlensError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    train_x, train_y, test_x, test_y, test_digits, n_classes = _task_data(config, task, data_dir, n_train, n_test)
    fit_idx, val_idx = validation_split(len(train_y), val_fraction)
    run_device = resolve_device(device)
    # The training and validation images live on the device.
    val_x, val_y = train_x[val_idx].to(run_device), train_y[val_idx].to(run_device)
    train_x, train_y = train_x[fit_idx].to(run_device), train_y[fit_idx].to(run_device)
    final_dir = run_dir / "adapt" / task
    # adapt/TASK/ is written whole into a temporary sibling and swapped in at the end: a later
    # subspace analysis or report never reads new adapters beside an old results.json.
    with staged_dir(final_dir) as out_dir:
        def recorded(path: Path) -> str:
            """Where ``path`` (written under the temporary folder) will be, relative to the run folder."""
            return str((final_dir / path.relative_to(out_dir)).relative_to(run_dir))

        probe = _fresh_base(run_dir, n_classes, 0)
        _check_targets(probe, targets, run_dir)
        width = getattr(probe.head, "in_features", None)
        if width is not None and max(ranks) > width:
            raise DigitlensError(f"--ranks {max(ranks)}: larger than the model width {width}")
        total_params = sum(p.numel() for p in probe.parameters())
        common = dict(epochs=epochs, batch_size=batch_size, weight_decay=DEFAULTS["weight_decay"], progress=progress,
                      patience=patience)
        rows, predictions = [], {}

        def fit(model, method, seed, label):
            # The fresh head learns at the head-only peak in every method (it starts from scratch there too).
            return _train(model, train_x, train_y, val_x, val_y, seed=seed, label=label,
                          head_lr=SCHEDULES["head_only"]["lr"], **SCHEDULES[method], **common)

        def record(method, rank, seed, model, fitted, adapter_dir=None):
            seconds = fitted["seconds"]
            y_pred = predict(model, test_x)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            acc = float((y_pred == test_y.numpy()).mean())
            predictions[f"{method}_r{rank}_s{seed}" if rank else f"{method}_s{seed}"] = y_pred
            rows.append({"method": method, "rank": rank, "seed": seed, "trainable_params": int(trainable),
                         "trainable_fraction": trainable / total_params, "accuracy": acc, "train_seconds": seconds,
                         "adapter_dir": None if adapter_dir is None else recorded(adapter_dir),
                         **{k: fitted[k] for k in ("epochs_run", "best_epoch", "best_val_accuracy", "best_val_loss",
                                                   "last_improvement_epoch", "stop_reason", "stopped_early", "curve")}})
            if progress:
                print(f"{task}: {method}{f' r={rank}' if rank else ''} seed {seed}: accuracy {acc:.4f}, "
                      f"{trainable:,} trainable parameters, best epoch {fitted['best_epoch']} of {fitted['epochs_run']}, "
                      f"{seconds:.1f} s", flush=True)

        for rank in ranks:
            for seed in seeds:
                torch.manual_seed(seed)
                model = get_peft_model(_fresh_base(run_dir, n_classes, seed), _lora_config(rank, targets, alpha)).to(run_device)
                fitted = fit(model, "lora", seed, f"lora r={rank} seed {seed}")
                adapter_dir = out_dir / f"r{rank}_s{seed}"
                _save_adapter_atomically(model, adapter_dir)
                record("lora", rank, seed, model, fitted, adapter_dir)
        if baselines:
            from digitlens.models import save_model

            for seed in seeds:  # every seed, so that LoRA is compared with the baselines' own spread
                torch.manual_seed(seed)
                head_model = _fresh_base(run_dir, n_classes, seed).to(run_device)
                for name, p in head_model.named_parameters():
                    p.requires_grad_(name.startswith("head."))
                record("head_only", 0, seed, head_model, fit(head_model, "head_only", seed, f"head only seed {seed}"))
                torch.manual_seed(seed)
                full_model = _fresh_base(run_dir, n_classes, seed).to(run_device)
                fitted = fit(full_model, "full", seed, f"full fine-tuning seed {seed}")
                full_dir = out_dir / f"full_s{seed}"
                save_model(full_model, full_dir / "model.safetensors")
                record("full", 0, seed, full_model, fitted, full_dir)
        write_npz(out_dir / "predictions.npz", y_true=test_y.numpy(), digits=test_digits.numpy(),
                  **{k: v for k, v in predictions.items()})
        results = {
            "task": task, "base_run": str(run_dir), "n_classes": n_classes, "targets": targets, "ranks": ranks,
            "seeds": seeds, "lora_alpha": alpha, "epochs": epochs, "n_train": int(len(train_y)),
            "n_validation": int(len(val_y)), "patience": patience, "val_fraction": val_fraction,
            "n_test": int(len(test_y)), "total_params": int(total_params),
            "schedules": {method: {"name": "onecycle (cosine)", "epochs": epochs, **hyper} for method, hyper in SCHEDULES.items()},
            "rows": rows, "summary": _summarise(rows), "figures": [],
        }
        results["verdict"] = lora_verdict(rows, task)
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
            stem = out_dir / "figures" / "training_curves"
            plot_training_curves(results, stem)
            results["figures"].append(recorded(stem.with_suffix(".png")))
        results["markdown"] = results_markdown(results) + convergence_markdown(results)
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
                    "accuracy_min": float(acc.min()), "accuracy_max": float(acc.max()),
                    "train_seconds_mean": float(np.mean([r["train_seconds"] for r in group]))})
        if all("epochs_run" in r for r in group):
            out[-1]["epochs_run_mean"] = float(np.mean([r["epochs_run"] for r in group]))
            out[-1]["best_val_accuracy_mean"] = float(np.mean([r["best_val_accuracy"] for r in group]))
            out[-1]["stopped_early"] = int(sum(bool(r["stopped_early"]) for r in group))
    return out


def lora_verdict(rows: list[dict], task: str) -> dict:
    """Did LoRA match full fine-tuning within the seeds' spread, and from which rank?

    A rank matches when its best seed's test accuracy reaches the worst seed's of full fine-tuning
    (the two ranges of accuracies over seeds overlap, or LoRA's lies higher). ``matched_from_rank``
    is the smallest rank from which every larger rank matches too (None: no such rank, or no
    full fine-tuning row). Returns ``{"matched_from_rank", "full": {"min", "max", "n_seeds"},
    "ranks": [{"rank", "min", "max", "mean", "n_seeds", "matched"}], "sentence"}``.
    """
    full = [r["accuracy"] for r in rows if r["method"] == "full"]
    ranks = sorted({r["rank"] for r in rows if r["method"] == "lora"})
    if not full or not ranks:
        return {"matched_from_rank": None, "full": None, "ranks": [], "sentence": None}
    full_range = {"min": float(min(full)), "max": float(max(full)), "n_seeds": len(full)}
    per_rank = []
    for rank in ranks:
        acc = [r["accuracy"] for r in rows if r["method"] == "lora" and r["rank"] == rank]
        per_rank.append({"rank": rank, "min": float(min(acc)), "max": float(max(acc)), "mean": float(np.mean(acc)),
                         "n_seeds": len(acc), "matched": bool(max(acc) >= full_range["min"])})
    matched_from = None
    for entry in reversed(per_rank):
        if not entry["matched"]:
            break
        matched_from = entry["rank"]

    def span(lo, hi):
        return f"{100 * lo:.1f}%" if lo == hi else f"{100 * lo:.1f}-{100 * hi:.1f}%"

    full_text = f"full fine-tuning's {span(full_range['min'], full_range['max'])}"
    seeds_text = f"over {per_rank[0]['n_seeds']} seed{'s' if per_rank[0]['n_seeds'] != 1 else ''}"
    if matched_from is not None:
        entry = next(e for e in per_rank if e["rank"] == matched_from)
        sentence = (f"On task “{task}”, LoRA matched full fine-tuning within the seeds' spread from r = {matched_from}: "
                    f"r = {matched_from} reaches {span(entry['min'], entry['max'])} {seeds_text} against {full_text}.")
    elif any(e["matched"] for e in per_rank):
        hits = ", ".join(f"r = {e['rank']}" for e in per_rank if e["matched"])
        misses = ", ".join(f"r = {e['rank']} ({span(e['min'], e['max'])})" for e in per_rank if not e["matched"])
        sentence = (f"On task “{task}”, LoRA matched full fine-tuning within the seeds' spread at {hits} but not at "
                    f"the larger {misses}, {seeds_text} against {full_text}.")
    else:
        best = max(per_rank, key=lambda e: e["mean"])
        sentence = (f"On task “{task}”, LoRA did not match full fine-tuning within the seeds' spread at any rank: "
                    f"its best, r = {best['rank']}, reaches {span(best['min'], best['max'])} {seeds_text} "
                    f"against {full_text}.")
    return {"matched_from_rank": matched_from, "full": full_range, "ranks": per_rank, "sentence": sentence}


def convergence_markdown(results: dict) -> str:
    """Convergence per method and rank: epochs run (mean over seeds, of at most ``epochs``), how
    many seeds stopped early, best validation accuracy; then the verdict sentence."""
    rows = [r for r in results["summary"] if "epochs_run_mean" in r]
    if not rows:
        return ""
    lines = ["", f"Convergence: validation split of {results.get('n_validation')} training images, early stopping "
             f"after {results.get('patience')} epochs without a better validation accuracy (best epoch's weights kept).",
             "", "| method | r | epochs run (mean) | stopped early | best validation accuracy (mean) |",
             "|---|---|---|---|---|"]
    for row in rows:
        name = {"lora": "LoRA", "head_only": "head only", "full": "full fine-tuning"}[row["method"]]
        lines.append(f"| {name} | {row['rank'] or ''} | {row['epochs_run_mean']:.1f} of {results['epochs']} "
                     f"| {row['stopped_early']}/{row['n_seeds']} | {row['best_val_accuracy_mean']:.4f} |")
    sentence = (results.get("verdict") or {}).get("sentence")
    return "\n".join(lines + (["", sentence] if sentence else [])) + "\n"


def plot_training_curves(results: dict, stem) -> list:
    """Per-epoch curves, one column per method (LoRA per rank, head only, full fine-tuning): top row
    training (dashed) and validation (solid) loss, bottom row validation accuracy with the kept
    (best) epoch marked; one colour per seed."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from digitlens.plots._common import pyplot

    plt = pyplot()
    keys = []
    for row in results["rows"]:
        if "curve" in row and (row["method"], row["rank"]) not in keys:
            keys.append((row["method"], row["rank"]))
    fig, axes = plt.subplots(2, max(1, len(keys)), figsize=(2.9 * max(1, len(keys)), 5.6), layout="constrained",
                             squeeze=False, sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seeds = list(results["seeds"])
    for col, (method, rank) in enumerate(keys):
        top, bottom = axes[0, col], axes[1, col]
        for row in (r for r in results["rows"] if (r["method"], r["rank"]) == (method, rank) and "curve" in r):
            c = row["curve"]
            colour = colours[seeds.index(row["seed"]) % len(colours)] if row["seed"] in seeds else "k"
            top.plot(c["epoch"], c["train_loss"], "--", color=colour, lw=1)
            top.plot(c["epoch"], c["val_loss"], "-", color=colour, lw=1.3, label=f"seed {row['seed']}")
            bottom.plot(c["epoch"], c["val_accuracy"], "-", color=colour, lw=1.3)
            bottom.plot([row["best_epoch"]], [row["best_val_accuracy"]], "o", color=colour, ms=5)
        name = {"lora": f"LoRA r={rank}", "head_only": "head only", "full": "full fine-tuning"}[method]
        top.set_title(name)
        top.set_yscale("log")  # losses span decades (full fine-tuning's training loss reaches ~0.002)
        top.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        top.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        top.yaxis.set_minor_formatter(NullFormatter())
        bottom.set_xlabel("epoch")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        if col == 0:
            top.set_ylabel("cross-entropy (dashed: training,\nsolid: validation)")
            bottom.set_ylabel("validation accuracy (dot: kept epoch)")
            top.legend(fontsize=7)
    fig.suptitle(f"Task '{results['task']}': training curves ({results['n_train']} training, "
                 f"{results.get('n_validation')} validation images; early stopping, patience {results.get('patience')})")
    written = save_figure(fig, stem)
    plt.close(fig)
    return written


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
             f"at most {results['epochs']} epochs; LoRA on {', '.join(results['targets'])} with alpha = {results['lora_alpha']:g}.",
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
                 f"({results['n_train']} training images, early stopping; mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, stem)
    plt.close(fig)


# One writer per run folder (issue 14): wrapped below the definition, so the function's own code stays as it is.
adapt_run = writes_folders("adapt", lambda run_dir, *args, **kwargs: [(run_dir, "run")])(adapt_run)
