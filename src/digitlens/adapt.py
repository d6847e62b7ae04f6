"""LoRA adaptation of a trained digitlens ViT to a new task, with PEFT (the only stage that imports it).

Tasks:
- ``groups``: binary "is the digit in {1, 2, 4, 6, 9}?" on the base run's own dataset (seed 002;
  the groups are :mod:`digitlens.groups`);
- ``digits``: scikit-learn's 8x8 digits (other writers) upsampled to 28x28, 10 classes: a domain
  shift for a base trained on MNIST (no shift for one trained on ``digits``);
- ``rotated``: the base run's own dataset with every image turned 90 degrees anticlockwise, 10
  classes: a shift any base needs to adapt to (the digits demo's, where no other data set is
  offline), which the base's stroke features survive but its spatial layout does not.

What a study trains is a :class:`LoraStudyConfig` (validated where it is made, written to
``adapt/TASK/config.json`` and into ``results.json`` under ``config``; :func:`load_study_config`
reads it back, also from results written before it existed).

Every adapter and baseline trains until it converges: a validation split (``val_fraction`` of
the task's training images, the same for every rank and seed) is scored after every epoch, and
training stops once ``patience`` epochs pass without a higher validation accuracy, or at
``epochs`` (the cap); the best epoch's weights are put back (highest validation accuracy, ties:
lower validation loss). The learning rate follows a one-cycle schedule
(``torch.optim.lr_scheduler.OneCycleLR``: warm-up, then cosine decay to ~0 at ``epochs``) whose
peak is per method (``SCHEDULES``, overridable per study). ``results.json`` keeps per row the
epochs run, the best epoch, its validation accuracy, why training stopped and the per-epoch curves.

For every rank and seed a LoRA adapter on the blocks' ``q`` and ``v`` projections (``targets``)
is trained together with a fresh classification head (the head is in PEFT's ``modules_to_save``)
and written in PEFT's format to ``runs/BASE/adapt/TASK/r{rank}_s{seed}/``
(``adapter_config.json`` + ``adapter_model.safetensors``; ``PeftModel.from_pretrained`` loads it,
see :func:`load_adapted_model`). Two baselines are trained on the same data: head only and full
fine-tuning (its weights go to ``full_s{seed}/model.safetensors`` for the intruder-dimension
comparison). ``results.json`` and ``results.md`` hold accuracy against trainable parameters; the
figures are listed in ``adapt/TASK/figures.json`` (:class:`digitlens.figure_writer.FigureWriter`).

``results.json`` keys a reader needs (see :func:`adapt_run`): ``verdict`` (did LoRA match full
fine-tuning within the seeds' spread, from which rank), ``convergence`` (how many models stopped
by early stopping, which hit the cap), ``summary`` (per method and rank), ``rows`` (per model),
``rank_comparison`` (McNemar's test of the ranks), ``config``.

Per-digit precision / recall of the binary groups decision (seed 002). For a digit d whose group
is g, restrict the test set to the images of d plus the images of the other group; on that subset,
with "predicted g" as the positive decision, recall_d = share of d's images put into g, and
precision_d = share of d among the subset's images predicted g (so a digit's precision falls when
the other group's images leak into g). Computed with scikit-learn.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter
from torch import nn

from digitlens.comparison import compare_variants, variants_sentence
from digitlens.data import load_splits, load_splits_for_run
from digitlens.device import resolve_device
from digitlens.errors import DigitlensError
from digitlens.figure_writer import FigureWriter
from digitlens.groups import DIGIT_GROUPS, GROUP_NAMES, GROUP_POSITIVE
from digitlens.inference import predict_logits
from digitlens.intervals import format_ci, wilson_interval
from digitlens.models import load_model, save_model
from digitlens.pyplot import pyplot
from digitlens.plots.per_digit_metrics import PerDigitMetricsDisplay
from digitlens.runio import (finish_files, read_json, require_run_dir, staged_dir, write_json, write_npz, write_text,
                             writes_folders)

TASKS = ("groups", "digits", "rotated")
METHODS = ("lora", "head_only", "full")
METHOD_NAMES = {"lora": "LoRA", "head_only": "head only", "full": "full fine-tuning"}

#: Peak learning rate and warm-up share of the one-cycle schedule, per method. Tuned once on the
#: ``digits`` task (MNIST demo ViT -> scikit-learn digits, 970 training and 242 validation images,
#: seed 0, LoRA r = 8, 30 epochs without early stopping), choosing per method the peak with the
#: best validation accuracy among 4 values a factor ~3 apart (README, "LoRA study", 2026-11-26):
#: LoRA 3e-3 (97.5%; 1e-2 and 3e-2 oscillate, 1e-3 is still rising at epoch 30), head only 3e-2
#: (94.2%, as 1e-1 but with a lower loss), full fine-tuning 3e-3 (98.8%; 3e-4 and 1e-3: 97.5%).
#: The new head learns at the head-only peak in every method: it starts from scratch in all three.
#: A study may override them (``LoraStudyConfig.schedules``; the digits demo's ``rotated`` does).
SCHEDULES = {"lora": {"lr": 3e-3, "pct_start": 0.1}, "head_only": {"lr": 3e-2, "pct_start": 0.1},
             "full": {"lr": 3e-3, "pct_start": 0.1}}

#: The command-line flag of each configuration field that has one: an error names what the user typed.
CLI_FLAGS = {"task": "--task", "ranks": "--ranks", "seeds": "--seeds", "targets": "--targets", "epochs": "--epochs",
             "patience": "--patience", "n_train": "--n-train", "n_test": "--n-test"}


def _bad(name: str, value: Any, problem: str) -> DigitlensError:
    """A one-line error naming the configuration field (by its flag where it has one)."""
    shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else repr(value) if isinstance(value, str) else value
    return DigitlensError(f"{CLI_FLAGS.get(name, name)} {shown}: {problem}")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
            isinstance(value, float) and value.is_integer()):
        raise _bad(name, value, "expected a whole number")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _bad(name, value, "expected a number")
    return float(value)


def _schedules(value: Any) -> dict[str, dict[str, float]]:
    """``SCHEDULES`` with the methods and keys given in ``value`` replaced, validated."""
    if not isinstance(value, dict):
        raise _bad("schedules", value, "expected {method: {'lr': ..., 'pct_start': ...}}")
    merged = {method: dict(hyper) for method, hyper in SCHEDULES.items()}
    for method, hyper in value.items():
        if method not in METHODS or not isinstance(hyper, dict):
            raise _bad("schedules", method, f"not a method with a schedule (choose from {', '.join(METHODS)})")
        for key, number in hyper.items():
            if key in ("name", "epochs"):  # descriptive keys of results.json's "schedules" (older results)
                continue
            if key not in ("lr", "pct_start"):
                raise _bad(f"schedules.{method}.{key}", number, "unknown key (lr or pct_start)")
            number = _as_float(f"schedules.{method}.{key}", number)
            if key == "lr" and not number > 0:
                raise _bad(f"schedules.{method}.lr", number, "must be positive")
            if key == "pct_start" and not 0 < number < 1:
                raise _bad(f"schedules.{method}.pct_start", number, "must be between 0 and 1")
            merged[method][key] = number
    return merged


@dataclass(frozen=True)
class LoraStudyConfig:
    """What one LoRA study trains: ranks x seeds of LoRA adapters plus (``baselines``) head-only
    and full fine-tuning per seed, on ``task``. Checked when made: a bad field is a one-line
    :class:`DigitlensError` naming it (by its command-line flag where it has one).

    Defaults keep adapt + subspace for ranks 4, 8, 64 and three seeds within a few minutes on 2
    CPU cores for the default ViT. ``epochs`` is the cap: the most epochs a model may train (the
    one-cycle schedule's length); early stopping after ``patience`` epochs without a higher
    validation accuracy usually ends it sooner. ``n_train`` / ``n_test``: images drawn from the
    task's splits (0 = all); ``val_fraction`` of the ``n_train`` images validate.
    """

    task: str = "groups"
    ranks: tuple[int, ...] = (4, 8, 64)
    seeds: tuple[int, ...] = (0, 1)
    targets: tuple[str, ...] = ("q", "v")
    epochs: int = 30
    patience: int = 4
    val_fraction: float = 0.2
    n_train: int = 1500
    n_test: int = 1000
    batch_size: int = 64
    lora_alpha: float = 8.0
    weight_decay: float = 0.0
    baselines: bool = True
    schedules: dict = field(default_factory=lambda: {m: dict(h) for m, h in SCHEDULES.items()})

    def __post_init__(self) -> None:
        def put(name, value):
            object.__setattr__(self, name, value)  # frozen: normalised once, here

        if self.task not in TASKS:
            raise _bad("task", self.task, f"unknown task (choose from {', '.join(TASKS)})")
        for name in ("ranks", "seeds"):
            values = getattr(self, name)
            values = (values,) if isinstance(values, (int, str)) else tuple(values)
            values = tuple(_as_int(name, v) for v in values)
            if not values:
                raise _bad(name, values, "give at least one")
            if len(set(values)) < len(values):
                raise _bad(name, values, "a value repeats")
            put(name, values)
        if min(self.ranks) < 1:
            raise _bad("ranks", self.ranks, "give positive integers")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise _bad("targets", targets, "give one or more linear layer names")
        put("targets", tuple(t.strip() for t in targets))
        for name, least in (("epochs", 1), ("patience", 1), ("n_train", 0), ("n_test", 0), ("batch_size", 1)):
            value = _as_int(name, getattr(self, name))
            if value < least:
                raise _bad(name, value, f"must be at least {least}")
            put(name, value)
        for name in ("val_fraction", "lora_alpha", "weight_decay"):
            put(name, _as_float(name, getattr(self, name)))
        if not 0 < self.val_fraction < 1:
            raise _bad("val_fraction", self.val_fraction, "must be between 0 and 1")
        if not self.lora_alpha > 0:
            raise _bad("lora_alpha", self.lora_alpha, "must be positive")
        if self.weight_decay < 0:
            raise _bad("weight_decay", self.weight_decay, "must be at least 0")
        if not isinstance(self.baselines, bool):
            raise _bad("baselines", self.baselines, "expected true or false")
        put("schedules", _schedules(self.schedules))

    def to_json(self) -> dict:
        """The fields as a JSON-ready dict (tuples as lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict, source: str | Path = "config") -> "LoraStudyConfig":
        """The config saved by :meth:`to_json`; keys it does not know are ignored. A bad field is a
        one-line DigitlensError naming ``source`` and the field."""
        if not isinstance(data, dict):
            raise DigitlensError(f"{source}: not a LoRA study configuration (expected a JSON object)")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except DigitlensError as exc:
            raise DigitlensError(f"{source}: {exc}") from None

    def replace(self, **changes: Any) -> "LoraStudyConfig":
        """A copy with ``changes`` (None values ignored: 'not given'); checked like a new one."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"LoraStudyConfig has no field {unknown[0]!r}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def load_study_config(adapt_dir: str | Path) -> LoraStudyConfig:
    """The :class:`LoraStudyConfig` of the study in ``adapt_dir`` (``runs/BASE/adapt/TASK``): its
    ``config.json``, else ``results.json``'s ``config``, else (results written before the config
    existed) rebuilt from ``results.json``'s top-level keys, where ``n_train`` counted the training
    images without the validation split."""
    adapt_dir = Path(adapt_dir)
    if (adapt_dir / "config.json").is_file():
        return LoraStudyConfig.from_json(read_json(adapt_dir / "config.json"), adapt_dir / "config.json")
    results_path = adapt_dir / "results.json"
    if not results_path.is_file():
        raise DigitlensError(f"{adapt_dir}: no config.json or results.json (not a `digitlens adapt` folder)")
    results = read_json(results_path)
    if not isinstance(results, dict):
        raise DigitlensError(f"{results_path}: not a LoRA study's results (expected a JSON object)")
    if isinstance(results.get("config"), dict):
        return LoraStudyConfig.from_json(results["config"], results_path)
    old = {k: results[k] for k in ("task", "ranks", "seeds", "targets", "epochs", "patience", "val_fraction",
                                   "lora_alpha", "n_test", "schedules") if results.get(k) is not None}
    if isinstance(results.get("n_train"), int):
        old["n_train"] = results["n_train"] + int(results.get("n_validation") or 0)
    old["baselines"] = any(r.get("method") != "lora" for r in results.get("rows", []) if isinstance(r, dict))
    return LoraStudyConfig.from_json(old, results_path)


@dataclass
class TaskData:
    """A study's images: ``fit`` and ``val`` (on the training device) from the task's training
    split, ``test`` on the CPU; images (N, 1, 28, 28) float32, labels (N,) int64; ``test_digits``
    the test images' digits (the labels themselves except for ``groups``)."""

    fit_x: torch.Tensor
    fit_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_digits: torch.Tensor
    n_classes: int


def _task_data(config: dict, task: str, data_dir, n_train: int, n_test: int):
    """(train_x, train_y, test_x, test_y, test_digits, n_classes) for ``task``; subsets are drawn
    with a fixed seed so every rank and seed sees the same images."""
    if task == "digits":
        splits = load_splits("digits", val_fraction=0.1, seed=0)
    elif task in ("groups", "rotated"):
        splits = load_splits_for_run(config, data_dir=data_dir)
    else:
        raise _bad("task", task, f"unknown task (choose from {', '.join(TASKS)})")
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


def _study_data(run_config: dict, study: LoraStudyConfig, data_dir, device: torch.device) -> TaskData:
    """The task's images split into fit / validation (on ``device``) and test (CPU)."""
    train_x, train_y, test_x, test_y, test_digits, n_classes = _task_data(run_config, study.task, data_dir,
                                                                          study.n_train, study.n_test)
    fit_idx, val_idx = validation_split(len(train_y), study.val_fraction)
    return TaskData(fit_x=train_x[fit_idx].to(device), fit_y=train_y[fit_idx].to(device),
                    val_x=train_x[val_idx].to(device), val_y=train_y[val_idx].to(device),
                    test_x=test_x, test_y=test_y, test_digits=test_digits, n_classes=n_classes)


def _fresh_base(run_dir: Path, n_classes: int, seed: int) -> nn.Module:
    """The base run's model; its head is replaced by a new one when ``n_classes`` differs."""
    model = load_model(run_dir)
    if not hasattr(model, "head") or not isinstance(model.head, nn.Linear):
        raise DigitlensError(f"{run_dir}: adapt needs a model with a linear 'head' (the ViT); "
                             f"this run's model is {type(model).__name__}")
    if model.head.out_features != n_classes:
        torch.manual_seed(seed)
        model.head = nn.Linear(model.head.in_features, n_classes)
    return model


def _check_base(run_dir: Path, study: LoraStudyConfig, n_classes: int) -> int:
    """Check the base model can take the study (linear layers named ``targets``, ranks at most
    its width); return its parameter count."""
    with torch.random.fork_rng(devices=[]):  # building it draws from (and seeds) the global RNG
        probe = _fresh_base(run_dir, n_classes, 0)
    names = {name.rsplit(".", 1)[-1] for name, mod in probe.named_modules() if isinstance(mod, nn.Linear)}
    missing = [t for t in study.targets if t not in names]
    if missing:
        raise DigitlensError(f"--targets {','.join(study.targets)}: {run_dir}'s model has no linear layer named "
                             f"{missing[0]!r} (has {', '.join(sorted(names))})")
    width = getattr(probe.head, "in_features", None)
    if width is not None and max(study.ranks) > width:
        raise DigitlensError(f"--ranks {max(study.ranks)}: larger than the model width {width}")
    return sum(p.numel() for p in probe.parameters())


def _lora_config(rank: int, targets, alpha: float):
    from peft import LoraConfig  # lazy: PEFT (and transformers under it) takes seconds to import

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                      modules_to_save=["head"])


def _model_plan(study: LoraStudyConfig) -> list[tuple[str, int, int]]:
    """(method, rank, seed) of every model the study trains, in training order (rank 0: a baseline)."""
    plan = [("lora", rank, seed) for rank in study.ranks for seed in study.seeds]
    if study.baselines:  # every seed, so that LoRA is compared with the baselines' own spread
        for seed in study.seeds:
            plan += [("head_only", 0, seed), ("full", 0, seed)]
    return plan


def _fresh_model(run_dir: Path, study: LoraStudyConfig, method: str, rank: int, seed: int, n_classes: int) -> nn.Module:
    """The untrained model of one (method, rank, seed): the base with a new head, wrapped by PEFT
    (LoRA), with only the head trainable (head only) or whole (full). Draws its initialisation
    from the global RNG: call it where :func:`_train_models` seeds that."""
    from peft import get_peft_model  # lazy: see _lora_config

    model = _fresh_base(run_dir, n_classes, seed)
    if method == "lora":
        return get_peft_model(model, _lora_config(rank, study.targets, study.lora_alpha))
    if method == "head_only":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    return model


def _model_key(method: str, rank: int, seed: int) -> str:
    """The model's name in ``predictions.npz``: ``lora_r{rank}_s{seed}`` or ``{method}_s{seed}``."""
    return f"{method}_r{rank}_s{seed}" if rank else f"{method}_s{seed}"


def _model_label(method: str, rank: int, seed: int) -> str:
    return f"{METHOD_NAMES[method]}{f' r={rank}' if rank else ''} seed {seed}"


def _save_trained(model: nn.Module, method: str, rank: int, seed: int, out_dir: Path) -> Path | None:
    """Write a LoRA adapter (PEFT format, ``r{rank}_s{seed}/``) or full fine-tuning's weights
    (``full_s{seed}/model.safetensors``); return the folder (None for head only: nothing to keep)."""
    if method == "lora":
        folder = out_dir / f"r{rank}_s{seed}"
        _save_adapter_atomically(model, folder)
        return folder
    if method == "full":
        folder = out_dir / f"full_s{seed}"
        save_model(model, folder / "model.safetensors")
        return folder
    return None
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


def _save_adapter_atomically(peft_model, target: Path) -> None:
    """``save_pretrained`` into a temporary folder, then swap it in, so a crash never leaves a
    half-written adapter folder (PEFT writes its files in place, 0600): each file gets the umask
    mode and is fsynced before the swap."""
    with staged_dir(target) as tmp:
        peft_model.save_pretrained(str(tmp))
        finish_files(tmp)


def load_adapted_model(run_dir, adapter_dir, n_classes: int | None = None):
    """The base run's model with the LoRA adapter in ``adapter_dir`` loaded by
    ``PeftModel.from_pretrained`` (eval mode). ``n_classes`` defaults to the value in the task's
    ``results.json``."""
    from peft import PeftModel  # lazy: see _lora_config

    run_dir, adapter_dir = require_run_dir(run_dir), Path(adapter_dir)
    if n_classes is None:
        n_classes = int(read_json(adapter_dir.parent / "results.json")["n_classes"])
    with torch.random.fork_rng(devices=[]):  # the new head's draws leave the caller's RNG as it was
        base = _fresh_base(run_dir, n_classes, seed=0)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DigitlensError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def per_digit_group_metrics(digits, y_true_group, y_pred_group) -> dict:
    """Per-digit precision / recall / F1 / accuracy of the binary groups decision (definition in the
    module docstring): dict of lists over digits 0-9 plus ``support``."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score  # lazy: only the groups task needs it

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




def plot_per_digit_groups(metrics: dict, title: str):
    """Seed-002 figure: per-digit precision and recall, one row per group; returns the Figure."""
    display = PerDigitMetricsDisplay(digits=metrics["digit"], precision=metrics["precision"],
                                     recall=metrics["recall"], f1=metrics["f1"], accuracy=metrics["accuracy"],
                                     support=metrics["support"], groups=list(DIGIT_GROUPS),
                                     group_names=[f"positive group {GROUP_NAMES[0]}", f"negative group {GROUP_NAMES[1]}"])
    display.plot(title=title)
    return display.figure_


def _fit(model: nn.Module, method: str, rank: int, seed: int, data: TaskData, study: LoraStudyConfig,
         progress: bool) -> dict:
    """:func:`_train` with the study's schedule for ``method``; the fresh head learns at the
    head-only peak in every method (it starts from scratch there too)."""
    return _train(model, data.fit_x, data.fit_y, data.val_x, data.val_y, seed=seed, epochs=study.epochs,
                  patience=study.patience, batch_size=study.batch_size, weight_decay=study.weight_decay,
                  progress=progress, label=_model_label(method, rank, seed), head_lr=study.schedules["head_only"]["lr"],
                  **study.schedules[method])


def _row(method: str, rank: int, seed: int, model: nn.Module, fitted: dict, y_pred: np.ndarray, data: TaskData,
         total_params: int, saved: str | None) -> dict:
    """One ``results.json`` row: the model's test accuracy, trainable parameters and convergence."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "rank": rank, "seed": seed, "trainable_params": int(trainable),
            "trainable_fraction": trainable / total_params, "accuracy": float((y_pred == data.test_y.numpy()).mean()),
            "train_seconds": fitted["seconds"], "adapter_dir": saved,
            **{k: fitted[k] for k in ("epochs_run", "best_epoch", "best_val_accuracy", "best_val_loss",
                                      "last_improvement_epoch", "stop_reason", "stopped_early", "curve")}}


def _train_models(run_dir: Path, study: LoraStudyConfig, data: TaskData, out_dir: Path, final_dir: Path,
                  total_params: int, device: torch.device, progress: bool) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Train, save and test every model of :func:`_model_plan`; return (rows, test predictions by
    :func:`_model_key`). Saved folders are recorded relative to the run folder, where
    ``final_dir`` (``out_dir``'s final name) puts them."""
    rows, predictions = [], {}
    for method, rank, seed in _model_plan(study):
        # PEFT's initialisation and the model's dropout draw from the global RNG (they take no
        # generator): seeded per model, so each model's result depends on its seed alone, and put
        # back afterwards, so the study leaves the caller's RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _fresh_model(run_dir, study, method, rank, seed, data.n_classes).to(device)
            fitted = _fit(model, method, rank, seed, data, study, progress)
        saved = _save_trained(model, method, rank, seed, out_dir)
        y_pred = predict_logits(model, data.test_x, batch_size=500).argmax(axis=1)
        predictions[_model_key(method, rank, seed)] = y_pred
        rows.append(_row(method, rank, seed, model, fitted, y_pred, data, total_params,
                         None if saved is None else str((final_dir / saved.relative_to(out_dir)).relative_to(run_dir))))
        if progress:
            print(f"{study.task}: {_model_label(method, rank, seed)}: accuracy {rows[-1]['accuracy']:.4f}, "
                  f"{rows[-1]['trainable_params']:,} trainable parameters, best epoch {fitted['best_epoch']} of "
                  f"{fitted['epochs_run']} ({fitted['stop_reason']}), {fitted['seconds']:.1f} s", flush=True)
    return rows, predictions


def convergence(rows: list[dict], epochs: int) -> dict:
    """How the study's models stopped: ``{"n_models", "stopped_early" (count stopped by patience),
    "hit_cap": [labels of models that ran to the ``epochs`` cap without it], "all_stopped_early",
    "epochs_run_max", "sentence"}``; rows without convergence records (older results) are not counted."""
    counted = [r for r in rows if "stopped_early" in r]
    capped = [_model_label(r["method"], r["rank"], r["seed"]) for r in counted if not r["stopped_early"]]
    n = len(counted)
    if not counted:
        sentence = None
    elif not capped:
        sentence = (f"All {n} models stopped by early stopping (after {min(r['epochs_run'] for r in counted)}-"
                    f"{max(r['epochs_run'] for r in counted)} of at most {epochs} epochs).")
    else:
        sentence = (f"{n - len(capped)} of {n} models stopped by early stopping; {len(capped)} ran to the "
                    f"{epochs}-epoch cap still improving ({', '.join(capped)}).")
    return {"n_models": n, "stopped_early": n - len(capped), "hit_cap": capped, "all_stopped_early": bool(counted) and not capped,
            "epochs_run_max": max((r["epochs_run"] for r in counted), default=None), "sentence": sentence}


def _study_results(run_dir: Path, study: LoraStudyConfig, data: TaskData, rows: list[dict],
                   predictions: dict[str, np.ndarray], total_params: int) -> dict:
    """The ``results.json`` dict of a trained study (everything but figures and markdown)."""
    results = {
        "task": study.task, "base_run": str(run_dir), "n_classes": data.n_classes, "targets": list(study.targets),
        "ranks": list(study.ranks), "seeds": list(study.seeds), "lora_alpha": study.lora_alpha, "epochs": study.epochs,
        "n_train": int(len(data.fit_y)), "n_validation": int(len(data.val_y)), "patience": study.patience,
        "val_fraction": study.val_fraction, "n_test": int(len(data.test_y)), "total_params": int(total_params),
        "schedules": {method: {"name": "onecycle (cosine)", "epochs": study.epochs, **hyper}
                      for method, hyper in study.schedules.items()},
        "config": study.to_json(), "rows": rows, "summary": _summarise(rows, int(len(data.test_y))),
        "verdict": lora_verdict(rows, study.task), "convergence": convergence(rows, study.epochs), "figures": [],
    }
    if len(study.ranks) > 1:  # a best rank only where the paired test supports it
        results["rank_comparison"] = rank_comparison(data.test_y.numpy(), predictions, study.ranks, study.seeds)
    if study.task == "groups":
        results["per_digit_definition"] = ("per digit d of group g, on the test images of d plus those of the other "
                                           "group: recall = share of d put into g; precision = share of d among the "
                                           "images predicted g")
        seed = study.seeds[0]  # each entry names its adapter: the report reads rank and seed, not the key
        results["per_digit"] = {_model_key("lora", rank, seed): {
            "method": "lora", "rank": int(rank), "seed": int(seed),
            **per_digit_group_metrics(data.test_digits.numpy(), data.test_y.numpy(),
                                      predictions[_model_key("lora", rank, seed)])}
            for rank in study.ranks}
    results["markdown"] = results_markdown(results) + convergence_markdown(results)
    return results


def _draw_figures(results: dict, out_dir: Path) -> list[str]:
    """Draw the study's figures into ``out_dir/figures/`` and list them in ``out_dir/figures.json``
    (kinds ``adapt_accuracy``, ``adapt_training_curves``, ``adapt_per_digit``; section ``lora``);
    return the PNG paths relative to ``out_dir``."""
    task, ranks, seeds = results["task"], results["ranks"], results["seeds"]
    methods = list(dict.fromkeys(row["method"] for row in results["summary"]))
    plt = pyplot()
    with FigureWriter(out_dir, "adapt") as writer:
        for metrics in results.get("per_digit", {}).values():
            rank = metrics["rank"]
            title = (f"Groups task, LoRA r={rank} (seed {metrics['seed']}): per-digit precision and recall of "
                     f"'{GROUP_NAMES[0]}?'")
            fig = plot_per_digit_groups(metrics, title)
            writer.save(fig, f"figures/per_digit_groups_r{rank}", kind="adapt_per_digit", section="lora", title=title,
                        task=task, method="lora", rank=rank, seed=metrics["seed"])
            plt.close(fig)
        fig = plot_accuracy_vs_params(results)
        writer.save(fig, "figures/accuracy_vs_params", kind="adapt_accuracy", section="lora",
                    title=f"Task '{task}': test accuracy against trainable parameters (LoRA r = "
                          f"{', '.join(map(str, ranks))}; mean ± std over {len(seeds)} seed(s))",
                    task=task, methods=methods, ranks=ranks, seeds=seeds)
        plt.close(fig)
        fig = plot_training_curves(results)
        writer.save(fig, "figures/training_curves", kind="adapt_training_curves", section="lora",
                    title=f"Task '{task}': training and validation curves of every model (one panel per method)",
                    task=task, methods=methods, ranks=ranks, seeds=seeds)
        plt.close(fig)
    return [entry["path"] for entry in writer.entries]


@writes_folders("adapt", lambda run_dir, *args, **kwargs: [(run_dir, "run")])  # one writer per run folder
def adapt_run(run_dir, config: LoraStudyConfig | None = None, *, data_dir=None, progress: bool = True, device=None,
              **overrides: Any) -> dict:
    """Train the LoRA study ``config`` (default :class:`LoraStudyConfig`; ``overrides`` replace its
    fields, e.g. ``task="digits", ranks=(4, 64)``; None means 'not given') on the run in
    ``run_dir``; write ``runs/BASE/adapt/TASK/`` (adapters, ``config.json``, ``results.json``,
    ``results.md``, ``predictions.npz``, ``figures/`` and ``figures.json``) and return the
    ``results.json`` dict. ``device``: where the models train ('auto' by default, see
    :func:`digitlens.device.resolve_device`); every model starts from the same CPU initialisation.

    ``results.json``: ``verdict`` (:func:`lora_verdict`), ``convergence`` (:func:`convergence`),
    ``summary`` (per method and rank: ``accuracy_mean`` / ``_std`` / ``_min`` / ``_max`` over seeds,
    ``trainable_params``, ``epochs_run_mean``, ``stopped_early`` count), ``rows`` (per model:
    ``accuracy``, ``epochs_run``, ``best_epoch``, ``best_val_accuracy``, ``stop_reason``, ``curve``),
    ``rank_comparison`` (:func:`rank_comparison`, two or more ranks), ``config``, ``figures``
    (PNG paths relative to the run folder) and, for ``groups``, ``per_digit``.
    """
    study = (config or LoraStudyConfig()).replace(**overrides)
    run_dir = require_run_dir(run_dir)
    run_device = resolve_device(device)
    data = _study_data(read_json(run_dir / "config.json"), study, data_dir, run_device)
    total_params = _check_base(run_dir, study, data.n_classes)
    final_dir = run_dir / "adapt" / study.task
    # adapt/TASK/ is written whole into a temporary sibling and swapped in at the end: a later
    # subspace analysis or report never reads new adapters beside an old results.json.
    with staged_dir(final_dir) as out_dir:
        rows, predictions = _train_models(run_dir, study, data, out_dir, final_dir, total_params, run_device, progress)
        write_npz(out_dir / "predictions.npz", y_true=data.test_y.numpy(), digits=data.test_digits.numpy(), **predictions)
        results = _study_results(run_dir, study, data, rows, predictions, total_params)
        results["figures"] = [str((final_dir / path).relative_to(run_dir)) for path in _draw_figures(results, out_dir)]
        write_json(out_dir / "config.json", study.to_json())
        write_text(out_dir / "results.md", results["markdown"])
        write_json(out_dir / "results.json", results)
    return results


def _summarise(rows: list[dict], n_test: int | None = None) -> list[dict]:
    """One row per (method, rank): mean and std of accuracy over seeds, trainable parameters, seconds;
    with ``n_test`` also ``accuracy_mean_ci``, the 95% Wilson interval of that accuracy on ``n_test``
    test images (the test set's sampling noise, not the seeds' spread), as results.md and the report quote it."""
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
        if n_test:
            out[-1]["accuracy_mean_ci"] = wilson_interval(round(float(acc.mean()) * n_test), n_test).tolist()
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
        name = METHOD_NAMES[row["method"]]
        lines.append(f"| {name} | {row['rank'] or ''} | {row['epochs_run_mean']:.1f} of {results['epochs']} "
                     f"| {row['stopped_early']}/{row['n_seeds']} | {row['best_val_accuracy_mean']:.4f} |")
    sentences = [(results.get("convergence") or {}).get("sentence"), (results.get("verdict") or {}).get("sentence")]
    return "\n".join(lines + [line for s in sentences if s for line in ("", s)]) + "\n"


def plot_training_curves(results: dict):
    """Per-epoch curves, one column per method (LoRA per rank, head only, full fine-tuning): top row
    training (dashed) and validation (solid) loss, bottom row validation accuracy with the kept
    (best) epoch marked; one colour per seed. Returns the Figure."""
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
        top.set_title(f"LoRA r={rank}" if method == "lora" else METHOD_NAMES[method])
        top.set_yscale("log")  # losses span decades (full fine-tuning's training loss reaches ~0.002)
        top.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        top.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        top.yaxis.set_minor_formatter(NullFormatter())
        bottom.set_xlabel("epoch")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        if col == 0:
            top.set_ylabel("cross-entropy\n(dashed: training, solid: validation)", fontsize=9)
            bottom.set_ylabel("validation accuracy\n(dot: kept epoch)", fontsize=9)
            top.legend(fontsize=7)
    fig.suptitle(f"Task '{results['task']}': training curves ({results['n_train']} training, "
                 f"{results.get('n_validation')} validation images; early stopping, patience {results.get('patience')}, "
                 f"at most {results['epochs']} epochs)")
    return fig


def rank_comparison(y_true, predictions: dict, ranks, seeds) -> dict:
    """:func:`digitlens.comparison.compare_variants` of the LoRA ranks on the same test images (each
    rank's predictions per seed, ``predictions`` keyed ``lora_r{rank}_s{seed}``) plus its ``sentence``."""
    found = compare_variants(y_true, {int(r): [predictions[f"lora_r{r}_s{s}"] for s in seeds] for r in ranks})
    found["sentence"] = variants_sentence(found, "r = ")
    return found


def results_markdown(results: dict) -> str:
    """Accuracy against trainable parameters as a markdown table, then the paired test of the ranks.

    Test accuracy is the mean over seeds with the 95% Wilson interval of ``n_test`` images (the
    test-set noise of one run: the seeds share the images) and the spread (std) over seeds."""
    n_test = int(results["n_test"])
    lines = [f"Task `{results['task']}`: {results['n_train']} training images, {n_test} test images, "
             f"at most {results['epochs']} epochs; LoRA on {', '.join(results['targets'])} with alpha = {results['lora_alpha']:g}.",
             "", f"| method | r | trainable parameters | % of model | test accuracy, mean over seeds (95% Wilson interval "
             f"of {n_test} images) | std over seeds (points) | seeds | train s |", "|---|---|---|---|---|---|---|---|"]
    for row in results["summary"]:
        name = METHOD_NAMES[row["method"]]
        mean = row["accuracy_mean"]
        ci = wilson_interval(round(mean * n_test), n_test) if n_test > 0 else None
        lines.append(f"| {name} | {row['rank'] or ''} | {row['trainable_params']:,} | {100 * row['trainable_fraction']:.2f} "
                     f"| {format_ci(mean, ci)} | {100 * row['accuracy_std']:.2f} | {row['n_seeds']} "
                     f"| {row['train_seconds_mean']:.1f} |")
    comparison = results.get("rank_comparison")
    if comparison:
        lines += ["", f"Ranks compared: {comparison['sentence']}"]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_params(results: dict):
    """Test accuracy (mean ± std over seeds) against trainable parameters, LoRA per rank and the
    baselines; returns the Figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    markers = {"lora": ("o", "#1f77b4"), "head_only": ("s", "#7f7f7f"), "full": ("D", "#d62728")}
    for method, (marker, colour) in markers.items():
        pts = [r for r in results["summary"] if r["method"] == method]
        if not pts:
            continue
        ax.errorbar([p["trainable_params"] for p in pts], [p["accuracy_mean"] for p in pts],
                    yerr=[p["accuracy_std"] for p in pts], fmt=marker + ("-" if method == "lora" else ""),
                    color=colour, capsize=3, label=METHOD_NAMES[method])
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
    return fig
