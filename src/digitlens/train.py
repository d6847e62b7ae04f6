"""Train a digit classifier into a run folder (``runs/NAME/``).

``train(out_dir, dataset=..., model=...)`` writes ``config.json`` (everything needed to reproduce
the run, with library versions), ``history.csv`` (Keras' History column names), a checkpoint
after every epoch under ``checkpoints/`` and, at the end, ``model.safetensors`` and
``train_summary.json``. ``resume=True`` continues a killed run from its last checkpoint and gives
bit-identical final weights to an uninterrupted run: every random draw is either derived from
``seed`` and the epoch number (the data order) or restored from the checkpoint (torch's RNG).

``history.csv``'s ``loss`` and ``accuracy`` are Keras': averaged over the epoch's batches while the
weights change, in train mode, with label smoothing and augmentation. They are not comparable with
``val_loss``/``val_accuracy`` (end of epoch, eval mode, plain cross-entropy), so every epoch also
measures ``train_eval_loss``/``train_eval_accuracy`` the way the validation split is measured, on the
first ``train_eval_size`` (:data:`TRAIN_EVAL_SIZE`) training images.

Data are preloaded as tensors; a DataLoader would only add per-batch Python overhead here. On a
GPU (``device='cuda'``) the whole training set lives on the GPU as one tensor, batches are gathered
and shifted there, and ``precision='bf16'`` runs the forward pass under autocast.

Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel. Every rank
draws the same epoch order (the equivalent of DistributedSampler with ``set_epoch``: the order is
a function of seed and epoch) and takes every ``world_size``-th image of each batch, so the global
batch stays ``batch_size`` and the learning rate is not scaled: the gradient DDP averages is that of
the same global batch. Batch norm keeps per-rank statistics (of ``batch_size / world_size``
images), so results fall in the same accuracy band as one process, not on the same bits. Only rank
0 writes the run folder.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import importlib.metadata
import inspect
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import TextColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import digitlens
from digitlens import distributed, models
from digitlens.data import load_splits
from digitlens.dataset_types import DATASETS, Splits
from digitlens.device import autocast, check_precision, resolve_device, synchronize
from digitlens.errors import DigitlensError
from digitlens.models import MODELS, build_model, count_parameters, save_model
from digitlens.progress import progress_bar
from digitlens.runio import atomic_path, has_content, read_json, run_lock, write_json, write_text
from digitlens.userdata import is_path_dataset

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "train_eval_loss", "train_eval_accuracy",
                   "lr", "seconds")

#: Training images (the first ones of the training split) measured at the end of every epoch like the
#: validation split: eval mode, no augmentation, plain cross-entropy (``train_eval_*`` in history.csv).
TRAIN_EVAL_SIZE = 2000
#: Batch size of that pass: the ViT's forward runs 2.5x faster in batches of 256 than of 2,000 on a CPU
#: (0.37 s against 0.92 s for 2,000 MNIST images on 2 cores), about 1% of its 30 s epoch.
TRAIN_EVAL_BATCH_SIZE = 256

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "constant")


# --------------------------------------------------------------------------- configuration


def _number(name: str, value, kind: type, flag: str | None = None):
    """``value`` as ``kind`` (int or float); a one-line error naming ``flag`` (or the field) otherwise."""
    try:
        if isinstance(value, bool) or (kind is int and float(value) != int(value)):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise DigitlensError(f"{flag or 'train: ' + name} {value!r}: expected {'a whole number' if kind is int else 'a number'}") from None


@dataclass(frozen=True)
class Hyper:
    """Training hyper-parameters of one run (config.json holds them as top-level keys), checked on creation."""

    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    label_smoothing: float
    schedule: str
    pct_start: float
    augment: int
    val_fraction: float
    threads: int | None = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("batch_size", _number("batch_size", self.batch_size, int, "--batch-size"))
        set_("lr", _number("lr", self.lr, float, "--lr"))
        for name in ("momentum", "weight_decay", "label_smoothing", "pct_start"):
            set_(name, _number(name, getattr(self, name), float))
        set_("augment", _number("augment", self.augment, int, "--augment"))
        set_("val_fraction", _number("val_fraction", self.val_fraction, float, "--val-fraction"))
        if self.threads is not None:
            set_("threads", _number("threads", self.threads, int, "--threads"))
        set_("nesterov", bool(self.nesterov))
        set_("channels_last", bool(self.channels_last))
        if self.optimizer not in OPTIMIZERS:
            raise DigitlensError(f"--optimizer {self.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise DigitlensError(f"--schedule {self.schedule!r}: choose from {', '.join(SCHEDULES)}")
        if self.batch_size < 2:
            raise DigitlensError(f"--batch-size {self.batch_size}: must be at least 2")
        if not self.lr > 0:
            raise DigitlensError(f"--lr {self.lr}: must be positive")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DigitlensError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.augment < 0:
            raise DigitlensError(f"--augment {self.augment}: must be 0 (off) or a number of pixels")
        if self.threads is not None and self.threads < 1:
            raise DigitlensError(f"--threads {self.threads}: must be at least 1")
        if not (self.momentum >= 0 and self.weight_decay >= 0):
            raise DigitlensError(f"train: momentum {self.momentum} and weight_decay {self.weight_decay} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise DigitlensError(f"train: label_smoothing {self.label_smoothing}: must be in [0, 1)")
        if not 0.0 < self.pct_start < 1.0:
            raise DigitlensError(f"train: pct_start {self.pct_start}: must be in (0, 1)")

    def updated(self, overrides: Mapping) -> "Hyper":
        """A copy with ``overrides`` (None values ignored); an unknown name is a one-line error."""
        unknown = sorted(set(overrides) - set(HYPER_FIELDS))
        if unknown:
            raise DigitlensError(f"train: unknown hyper-parameter {unknown[0]!r} (known: {', '.join(sorted(HYPER_FIELDS))})")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


HYPER_FIELDS = tuple(f.name for f in dataclasses.fields(Hyper))

#: Training hyper-parameters per model; any of them can be overridden through ``train(**hyper)``.
DEFAULT_HYPER: Mapping[str, Hyper] = MappingProxyType({
    "cnn": Hyper(batch_size=128, optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 label_smoothing=0.1, schedule="onecycle", pct_start=0.25, augment=0, val_fraction=0.1,
                 threads=None, channels_last=True),
    "mlp": Hyper(batch_size=128, optimizer="adamw", lr=2e-3, momentum=0.9, nesterov=False, weight_decay=1e-4,
                 label_smoothing=0.0, schedule="onecycle", pct_start=0.25, augment=0, val_fraction=0.1,
                 threads=None, channels_last=False),
    "vit": Hyper(batch_size=128, optimizer="adamw", lr=4e-3, momentum=0.9, nesterov=False, weight_decay=0.05,
                 label_smoothing=0.1, schedule="onecycle", pct_start=0.2, augment=0, val_fraction=0.1,
                 threads=None, channels_last=False),
})

#: The ``cnn``'s settings for long MNIST runs (``epochs >= LONG_RUN_EPOCHS``): larger batches are cheaper per
#: image but need more epochs, and random 1-pixel shifts pay off once the model has time to use them.
#: On MNIST ``--epochs 6`` with these reaches 99.4% test accuracy; the 1-epoch default reaches 99.0%.
LONG_RUN_HYPER: Mapping[str, Hyper] = MappingProxyType({
    "cnn": dataclasses.replace(DEFAULT_HYPER["cnn"], batch_size=256, lr=0.2, label_smoothing=0.0, augment=1)})
LONG_RUN_EPOCHS = 4

#: Default number of epochs per (dataset, model): the fast configuration.
DEFAULT_EPOCHS: Mapping[tuple[str, str], int] = MappingProxyType({
    ("mnist", "cnn"): 1, ("mnist", "mlp"): 5, ("mnist", "vit"): 5,
    ("digits", "cnn"): 8, ("digits", "mlp"): 30, ("digits", "vit"): 40,
})

#: Smaller batches for the tiny ``digits`` dataset (1,212 training images), unless overridden.
DIGITS_BATCH_SIZE = 32

_MODEL_CLASSES = {"cnn": models.CNN, "mlp": models.MLP, "vit": models.ViT}


def _class_defaults(model: str) -> dict:
    """The constructor defaults of ``model``'s class (n_classes left out)."""
    return {name: p.default for name, p in inspect.signature(_MODEL_CLASSES[model]).parameters.items()
            if name != "n_classes" and p.default is not inspect.Parameter.empty}


def _checked_model_kwargs(model: str, model_kwargs: Mapping | None) -> dict:
    """``model_kwargs`` as a dict, after checking that ``model``'s class takes each of them."""
    known = _class_defaults(model)
    unknown = sorted(set(model_kwargs or {}) - set(known))
    if unknown:
        raise DigitlensError(f"model_kwargs: {model} has no argument {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return dict(model_kwargs or {})


#: Architecture settings train() uses unless given: the ViT is made shallower than the class default
#: (2 blocks, MLP width 128, dim 128 so LoRA ranks up to 64 fit) to train within minutes on a CPU.
#: A small MLP per 4x4 patch and a fixed sine-cosine position embedding make it learn faster: on
#: MNIST, 5 epochs reach 98.8% (98.5% after 4 epochs, 146 s on 2 CPU cores); with a linear patch
#: embedding and learned positions the same budget gave 97.9%.
DEFAULT_MODEL_KWARGS: Mapping[str, Mapping] = MappingProxyType({
    "vit": MappingProxyType(_checked_model_kwargs("vit", {"dim": 128, "depth": 2, "heads": 4, "mlp_dim": 128,
                                                          "patch_hidden": 64, "pos_embed": "sincos"}))})


def full_model_kwargs(model: str, model_kwargs: Mapping | None) -> dict:
    """Every constructor argument of ``model`` (except n_classes): its class defaults, then
    :data:`DEFAULT_MODEL_KWARGS`, then ``model_kwargs``; as JSON types, so config.json pins the
    architecture even if a default changes later."""
    merged = _class_defaults(model)
    merged.update(DEFAULT_MODEL_KWARGS.get(model, {}))
    merged.update(_checked_model_kwargs(model, model_kwargs))
    return json.loads(json.dumps(merged))


def width_kwargs(model: str | None, widths) -> dict | None:
    """``model_kwargs`` for the CLI's repeated ``--width``: ``widths`` for cnn/mlp, ``dim`` for vit
    (None when no width was given)."""
    if not widths:
        return None
    if (model or "cnn") == "vit":
        if len(widths) != 1:
            raise DigitlensError(f"--width {list(widths)}: the vit takes one width (its embedding dim)")
        return {"dim": int(widths[0])}
    return {"widths": [int(w) for w in widths]}


def library_versions() -> dict[str, str]:
    """Versions of Python, torch, numpy, scikit-learn and digitlens."""
    # scikit-learn's version from its metadata: importing sklearn costs seconds, and train never needs it
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "sklearn": importlib.metadata.version("scikit-learn"),
            "digitlens": getattr(digitlens, "__version__", "unknown")}


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise DigitlensError(f"--model {model!r}: unknown model (choose from {', '.join(MODELS)})")


def _check_dataset(dataset: str) -> None:
    if dataset in DATASETS:
        return
    if is_path_dataset(dataset):
        raise DigitlensError(f"--dataset {dataset}: a folder or CSV is test data only; train on "
                             f"{' or '.join(DATASETS)}, then `digitlens evaluate RUN --dataset {dataset}`")
    raise DigitlensError(f"--dataset {dataset!r}: unknown dataset (choose from {', '.join(DATASETS)})")


def default_hyper(model: str, dataset: str, epochs: int | None = None) -> Hyper:
    """The hyper-parameters ``model`` trains with on ``dataset`` unless overridden: its defaults, with
    :data:`DIGITS_BATCH_SIZE` on digits and its long-run settings on MNIST when ``epochs >= LONG_RUN_EPOCHS``."""
    _check_model(model)
    if dataset == "digits":
        return dataclasses.replace(DEFAULT_HYPER[model], batch_size=DIGITS_BATCH_SIZE)
    if epochs is not None and epochs >= LONG_RUN_EPOCHS and model in LONG_RUN_HYPER:
        return LONG_RUN_HYPER[model]
    return DEFAULT_HYPER[model]


def resolve_hyper(model: str, dataset: str, hyper: Mapping, epochs: int | None = None) -> Hyper:
    """:func:`default_hyper` updated with ``hyper`` (None values ignored; checked)."""
    return default_hyper(model, dataset, epochs).updated(hyper)


#: config.json keys written at the start of a run besides the settings: facts about it, not choices.
RECORDED_KEYS = ("n_classes", "n_parameters", "n_train", "n_val", "n_test", "steps_per_epoch", "threads_used",
                 "versions", "train_eval_size", "device", "precision", "world_size")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run, checked on creation; :meth:`to_json` is config.json's
    settings (the facts of :data:`RECORDED_KEYS` follow them in the file)."""

    dataset: str
    model: str
    model_kwargs: Mapping  # every constructor argument (full_model_kwargs), JSON types
    seed: int
    data_dir: str | None
    epochs: int
    hyper: Hyper
    image_size: int = 28
    verify: bool = True

    def __post_init__(self) -> None:
        _check_dataset(self.dataset)
        _check_model(self.model)
        object.__setattr__(self, "seed", _number("seed", self.seed, int, "--seed"))
        object.__setattr__(self, "epochs", _number("epochs", self.epochs, int, "--epochs"))
        if self.epochs < 1:
            raise DigitlensError(f"--epochs {self.epochs}: must be at least 1")
        _checked_model_kwargs(self.model, self.model_kwargs)

    @classmethod
    def create(cls, *, dataset: str | None = None, model: str | None = None, epochs: int | None = None,
               seed: int | None = None, data_dir: str | os.PathLike | None = None,
               model_kwargs: Mapping | None = None, verify: bool = True, **hyper) -> "TrainConfig":
        """A new run's configuration: ``dataset`` digits, ``model`` cnn, ``seed`` 0 and the
        per-model defaults (:data:`DEFAULT_EPOCHS`, :func:`default_hyper`, :data:`DEFAULT_MODEL_KWARGS`)
        for whatever is None; ``hyper`` overrides :class:`Hyper` fields."""
        dataset, model = dataset or "digits", model or "cnn"
        _check_dataset(dataset)
        _check_model(model)
        epochs = DEFAULT_EPOCHS[(dataset, model)] if epochs is None else _number("epochs", epochs, int, "--epochs")
        return cls(dataset=dataset, model=model, model_kwargs=full_model_kwargs(model, model_kwargs),
                   seed=0 if seed is None else seed, data_dir=None if data_dir is None else str(Path(data_dir).resolve()),
                   epochs=epochs, hyper=resolve_hyper(model, dataset, hyper, epochs), verify=verify)

    def to_json(self) -> dict:
        """The settings as config.json holds them (``verify`` only when False, as older runs lack it)."""
        return {"dataset": self.dataset, "model": self.model, "model_kwargs": json.loads(json.dumps(dict(self.model_kwargs))),
                "seed": self.seed, "data_dir": self.data_dir, "image_size": self.image_size, "epochs": self.epochs,
                **dataclasses.asdict(self.hyper), **({} if self.verify else {"verify": False})}

    @classmethod
    def from_json(cls, data: Mapping, source: str | os.PathLike = "config.json") -> "TrainConfig":
        """The configuration of a run from its config.json dict (recorded facts ignored). A hyper-parameter
        missing from an older file takes the model's default; a missing setting is a one-line error."""
        missing = [key for key in ("dataset", "model", "model_kwargs", "seed", "epochs") if key not in data]
        if missing:
            raise DigitlensError(f"{source}: missing key {missing[0]!r}")
        defaults = default_hyper(data["model"], data["dataset"], data["epochs"])
        return cls(dataset=data["dataset"], model=data["model"], model_kwargs=dict(data["model_kwargs"]),
                   seed=data["seed"], data_dir=data.get("data_dir"), epochs=data["epochs"],
                   hyper=defaults.updated({k: data[k] for k in HYPER_FIELDS if k in data}),
                   image_size=int(data.get("image_size", 28)), verify=bool(data.get("verify", True)))


# --------------------------------------------------------------------------- building blocks


def prepare_model(model: str, n_classes: int, model_kwargs: Mapping, hyper: Hyper) -> nn.Module:
    """Build ``model`` for training; with ``hyper.channels_last`` its weights use the NHWC layout,
    which oneDNN's CPU convolutions and max-pooling run faster (same numbers, another memory order)."""
    try:
        net = build_model(model, n_classes=n_classes, **model_kwargs)
    except TypeError as exc:
        raise DigitlensError(f"model_kwargs {dict(model_kwargs)}: {exc}") from None
    if hyper.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def make_optimizer(model: nn.Module, hyper: Hyper, total_steps: int):
    """(optimizer, scheduler) for ``hyper``; the scheduler is stepped once per batch."""
    lr = hyper.lr
    # On CUDA the fused kernels (one launch per step instead of one per operation and parameter
    # group) matter for a model this small; on the CPU torch's default implementation stays, so CPU
    # results do not change.
    fused = {"fused": True} if next(model.parameters()).device.type == "cuda" else {}
    if hyper.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=hyper.momentum,
                                    nesterov=hyper.nesterov, weight_decay=hyper.weight_decay, **fused)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=hyper.weight_decay, **fused)
    if hyper.schedule == "onecycle":
        total_steps = max(1, total_steps)
        pct_start = hyper.pct_start
        if pct_start * total_steps == 1.0:
            # OneCycleLR's warm-up then ends at step 0 and it divides by its zero length (4 steps,
            # pct_start 0.25); the next float up gives the same rates (the limit of a vanishing warm-up).
            pct_start = math.nextafter(pct_start, 1.0)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                        pct_start=pct_start)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    """Batches per epoch: full batches only (the last partial one is dropped; the order changes
    every epoch, so every image is still seen), or one batch of everything when ``n < batch_size``."""
    return max(1, n_samples // batch_size)


def epoch_order(n_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the training set for ``epoch`` (0-based), derived from seed and epoch only,
    so a resumed run sees exactly the order an uninterrupted one would."""
    generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch) + 1)
    return torch.randperm(n_samples, generator=generator)  # on the CPU on every device: the same order everywhere


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with zeros (background).

    Hand-written because torchvision (RandomAffine) is not usable beside this torch build;
    it is one pad and one gather of shifted 28x28 crops.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    # The shifts come from a CPU generator (the same draws on every device), the gathers run on x's device.
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None].expand(n, c, h, w + 2 * max_shift)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :].expand(n, c, h, w)
    return torch.gather(out, 3, cols)


def train_one_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer, scheduler, *,
                    batch_size: int, seed: int, epoch: int, label_smoothing: float = 0.0, augment: int = 0,
                    on_batch: Callable[[int, float], None] | None = None, precision: str = "fp32",
                    rank: int = 0, world_size: int = 1) -> tuple[float, float]:
    """Train ``model`` for one epoch over ``images`` (N, 1, 28, 28, on the model's device); return
    (mean loss, accuracy) over the training batches, as Keras reports them (over all ranks).
    ``on_batch(step, loss)`` is called after each batch. With ``world_size`` > 1 this rank trains on
    images ``rank, rank + world_size, ...`` of each global batch of ``batch_size``."""
    model.train()
    n = int(labels.shape[0])
    bs = min(batch_size, n)
    device = images.device
    order = epoch_order(n, seed, epoch).to(device)
    shift_gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch) + 7_919) if augment else None
    # float64 sums (MPS has no float64; there float32)
    total_loss = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for step in range(steps_per_epoch(n, bs)):
        index = order[step * bs:(step + 1) * bs]
        xb, yb = images[index], labels[index]
        if augment:  # drawn for the whole global batch, so every rank shifts its images as one process would
            xb = random_shift(xb, int(augment), shift_gen)
        if world_size > 1:
            xb, yb = xb[rank::world_size], yb[rank::world_size]
        with autocast(device, precision):
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            total_loss += loss.detach().to(total_loss.dtype) * len(yb)
            correct += (logits.argmax(1) == yb).sum()
        seen += len(yb)
        if on_batch is not None:
            # On an accelerator reading the loss waits for the GPU: only every 50th batch.
            on_batch(step, float(loss.detach()) if device.type == "cpu" or step % 50 == 0 else None)
    if world_size > 1:  # the epoch's loss and accuracy over every rank's images
        totals = torch.stack([total_loss.double().cpu(), correct.double().cpu(), torch.tensor(float(seen), dtype=torch.float64)])
        if device.type == "cuda":
            totals = totals.to(device)
        distributed.all_reduce_sum(totals)
        total_loss, correct, seen = totals[0], totals[1], float(totals[2])
    return float(total_loss) / seen, int(correct) / seen


@torch.no_grad()
def evaluate_loss_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           batch_size: int = 2000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode; (nan, nan) for an empty split."""
    n = int(labels.shape[0])
    if n == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, n, batch_size):
        logits = model(images[start:start + batch_size]).float()
        yb = labels[start:start + batch_size]
        total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return total_loss / n, correct / n


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / "checkpoints" / f"epoch_{epoch:03d}.pt"


def last_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest finished epoch in ``out_dir/checkpoints``, or None."""
    folder = Path(out_dir) / "checkpoints"
    found = sorted(folder.glob("epoch_*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


def _to_cpu(obj):
    """``obj`` with every tensor inside (dicts, lists) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint(out_dir: Path, epoch: int, model, optimizer, scheduler, history: list[dict]) -> Path:
    """Write ``checkpoints/epoch_NNN.pt`` (1-based epoch) atomically: model, optimizer and scheduler
    states, torch's RNG states (dropout draws from them) and the history so far; only tensors and primitives,
    all on the CPU, so it loads with ``torch.load(..., weights_only=True)`` on any machine."""
    state = {
        "epoch": int(epoch),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": _to_cpu(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() and torch.cuda.is_initialized() else {}),
        "history": [dict(row) for row in history],
    }
    path = _checkpoint_path(out_dir, epoch)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``, never pickle)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DigitlensError(f"{path}: unreadable checkpoint ({first})") from None


def _write_history(out_dir: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    write_text(out_dir / "history.csv", buffer.getvalue())


# --------------------------------------------------------------------------- the run


def _prepare_out_dir(out: Path, requested: dict, resume: bool) -> tuple[dict | None, Path | None]:
    """Check ``out`` against ``resume``; return (stored config.json dict, last checkpoint) when resuming."""
    config_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise DigitlensError(f"--out {out}: is a file, not a folder; choose a new --out folder")
    if not resume:
        if config_path.is_file():
            finished = (out / "model.safetensors").is_file()
            raise DigitlensError(
                f"--out {out}: already holds a {'finished' if finished else 'started'} run; "
                + ("choose a new --out folder" if finished else "pass --resume to continue it or choose a new --out folder"))
        if has_content(out):
            raise DigitlensError(f"--out {out}: folder is not empty and holds no digitlens run; choose a new --out folder")
        return None, None
    if not config_path.is_file():
        raise DigitlensError(f"--resume: {out} holds no run to resume (no config.json)")
    stored = read_json(config_path)
    if requested.get("model_kwargs") is not None and stored.get("model") in DEFAULT_HYPER:
        requested = dict(requested, model_kwargs=full_model_kwargs(stored["model"], requested["model_kwargs"]))
    for key, value in requested.items():
        if value is not None and key in stored and stored[key] != value:
            raise DigitlensError(f"--resume: {out} was trained with {key}={stored[key]!r}, not {value!r}")
    # No checkpoint yet (killed during the first epoch): the run restarts from epoch 1 with its config.
    return stored, last_checkpoint(out)


def _resumed_config(out: Path, stored: dict, data_dir, hyper: Mapping) -> TrainConfig:
    """The configuration of the run in ``out`` (its config.json dict ``stored``); ``data_dir`` may
    point elsewhere, any other ``hyper`` value given must equal the run's."""
    config = TrainConfig.from_json(stored, out / "config.json")
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=str(Path(data_dir).resolve()))
    recorded = config.to_json()
    different = {k: v for k, v in hyper.items() if v is not None and recorded.get(k) != v}
    if different:
        key = sorted(different)[0]
        raise DigitlensError(f"--resume: {out} was trained with {key}={stored.get(key)!r}, not {different[key]!r}")
    return config


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """Run the block with ``threads`` torch CPU threads (None: leave them), restoring the caller's count."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _seeded_global_rng(seed: int, device: torch.device):
    """Seed torch's global RNG (the weight initialisation and dropout draw from it; a Generator cannot
    reach them) for the block only: ``fork_rng`` gives the caller back its own RNG state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=devices))
    torch.manual_seed(seed)
    return stack


def _load_training_data(config: TrainConfig) -> Splits:
    """The run's train/val/test splits; a training split of a single digit is a one-line error."""
    splits = load_splits(config.dataset, data_dir=config.data_dir, val_fraction=config.hyper.val_fraction,
                         seed=config.seed, size=config.image_size, verify=config.verify)
    present = torch.unique(splits.train.labels).tolist()
    if len(present) < 2:  # all-zero labels would "train" to a perfect score on nothing
        raise DigitlensError(f"--dataset {config.dataset}: the training split holds only digit "
                             f"{', '.join(map(str, present)) or '(none)'}; nothing to tell apart")
    return splits


def _n_classes(splits: Splits) -> int:
    """Output classes: at least 10, more when the labels go higher."""
    return max(int(torch.cat([splits.train.labels, splits.test.labels]).max()) + 1, 10)


def _recorded_facts(net: nn.Module, splits: Splits, n_classes: int, per_epoch: int, run_device: torch.device,
                    precision: str, world_size: int) -> dict:
    """config.json's :data:`RECORDED_KEYS`: facts about a new run, measured at its start."""
    n_train = len(splits.train)
    return {"n_classes": n_classes, "n_parameters": count_parameters(net), "n_train": n_train,
            "n_val": len(splits.val), "n_test": len(splits.test), "steps_per_epoch": per_epoch,
            "threads_used": torch.get_num_threads(), "versions": library_versions(),
            "train_eval_size": min(TRAIN_EVAL_SIZE, n_train),
            "device": str(run_device), "precision": precision, "world_size": world_size}


def _restore_checkpoint(path: Path, net: nn.Module, optimizer, scheduler, run_device: torch.device) -> tuple[int, list[dict]]:
    """Load checkpoint ``path`` into the model, optimizer, scheduler and torch's RNG; return
    (epochs done, history so far). A numpy RNG state in older checkpoints is ignored (training draws none)."""
    state = load_checkpoint(path)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if run_device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], run_device)
    return int(state["epoch"]), list(state["history"])


@dataclass
class _Session:
    """What the epoch loop works with: the model (``trained`` is its DDP wrapper under torchrun),
    its optimizer and the data, on the training device."""

    out: Path
    config: TrainConfig
    net: nn.Module
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    batch_size: int
    per_epoch: int
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    train_eval: tuple[torch.Tensor, torch.Tensor]
    device: torch.device
    precision: str
    rank: int
    world_size: int
    main: bool


def _fit(session: _Session, start_epoch: int, history: list[dict], progress: bool) -> list[dict]:
    """Train from ``start_epoch`` (0-based) to the configured epochs, measuring and (rank 0) checkpointing
    after each; return the whole history (``history`` so far plus the new rows)."""
    config, history = session.config, list(history)
    show = progress and session.main
    with progress_bar(show, TextColumn("loss {task.fields[loss]:.4f}")) as bar:
        task = bar.add_task("training", total=session.per_epoch * (config.epochs - start_epoch), loss=float("nan"))

        def on_batch(step: int, loss_value: float | None) -> None:
            bar.update(task, advance=1, **({} if loss_value is None else {"loss": loss_value}))

        for epoch in range(start_epoch, config.epochs):
            bar.update(task, description=f"epoch {epoch + 1}/{config.epochs}")
            row = _one_epoch(session, epoch, on_batch)
            history.append(row)
            if session.main:
                save_checkpoint(session.out, epoch + 1, session.net, session.optimizer, session.scheduler, history)
                _write_history(session.out, history)
            if show:
                bar.console.print(f"epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f}, accuracy {row['accuracy']:.4f}, "
                                  f"val_loss {row['val_loss']:.4f}, val_accuracy {row['val_accuracy']:.4f}, "
                                  f"train_eval_loss {row['train_eval_loss']:.4f} ({row['seconds']:.1f} s)")
    return history


def _one_epoch(session: _Session, epoch: int, on_batch) -> dict:
    """Train epoch ``epoch`` (0-based) and measure it: its history.csv row."""
    lr_at_start = session.optimizer.param_groups[0]["lr"]
    synchronize(session.device)
    tic = time.perf_counter()
    loss, accuracy = train_one_epoch(
        session.trained, *session.train, session.optimizer, session.scheduler, batch_size=session.batch_size,
        seed=session.config.seed, epoch=epoch, label_smoothing=session.config.hyper.label_smoothing,
        augment=session.config.hyper.augment, on_batch=on_batch, precision=session.precision,
        rank=session.rank, world_size=session.world_size)
    synchronize(session.device)
    seconds = time.perf_counter() - tic
    # Every rank measures (the same model on the same images), only rank 0 writes; not part of
    # `seconds` (training time).
    val_loss, val_accuracy = evaluate_loss_accuracy(session.net, *session.val)
    train_eval_loss, train_eval_accuracy = evaluate_loss_accuracy(session.net, *session.train_eval,
                                                                  batch_size=TRAIN_EVAL_BATCH_SIZE)
    return {"epoch": epoch + 1, "loss": loss, "accuracy": accuracy, "val_loss": val_loss,
            "val_accuracy": val_accuracy, "train_eval_loss": train_eval_loss,
            "train_eval_accuracy": train_eval_accuracy, "lr": lr_at_start, "seconds": seconds}


def train(out_dir: str | os.PathLike, *, dataset: str | None = None, model: str | None = None,
          epochs: int | None = None, seed: int | None = None, data_dir: str | os.PathLike | None = None,
          resume: bool = False, progress: bool = True, model_kwargs: dict | None = None,
          device: str | torch.device | None = None, precision: str | None = None, verify: bool = True,
          **hyper) -> dict:
    """Train ``model`` (default ``cnn``) on ``dataset`` (default ``digits``) into ``out_dir``.

    ``seed`` defaults to 0 and ``epochs`` to a fast per-model/per-dataset value
    (:data:`DEFAULT_EPOCHS`). ``**hyper`` overrides fields of :class:`Hyper` (batch_size, lr,
    optimizer, weight_decay, label_smoothing, augment, val_fraction, threads, ...; defaults in
    :data:`DEFAULT_HYPER`). With ``resume=True`` the run in ``out_dir`` continues from its last
    checkpoint; arguments left as None take the run's recorded values and any other value must match them.

    ``device``: 'auto' (default, or ``$DIGITLENS_DEVICE``), 'cpu', 'cuda[:N]' or 'mps';
    ``precision``: 'fp32' (default) or 'bf16' (autocast, CUDA only). Neither defines the run: a run
    trained on a GPU resumes on a CPU. ``verify=False`` (``--no-verify``) trains on MNIST files
    that are not the canonical ones (recorded as ``verify: false`` in ``config.json``, so later
    stages accept them too). Under torchrun the processes train one model together
    (see the module docstring); only rank 0 writes. The caller's torch thread count and global
    RNG state are as they were when it returns.

    Returns a summary dict (also written to ``train_summary.json``): run folder, dataset, model,
    epochs, parameter count, the last history row, training seconds and samples per second.
    """
    out = Path(out_dir)
    if model_kwargs is not None:  # as config.json will hold them (tuples become lists)
        model_kwargs = json.loads(json.dumps(dict(model_kwargs)))
    DEFAULT_HYPER["cnn"].updated(hyper)  # an unknown hyper-parameter is refused before anything happens
    requested = {"dataset": dataset, "model": model, "model_kwargs": model_kwargs, "seed": seed, "epochs": epochs}
    run_device = distributed.rank_device(resolve_device(device))
    precision = check_precision(precision, run_device)
    ctx = distributed.context(run_device)
    try:
        with contextlib.ExitStack() as lock_stack:
            def decide():
                # Rank 0 alone writes, so it alone holds the run folder's writer lock (until train returns);
                # every rank gets its answer (or its error).
                if out.exists() and not out.is_dir():
                    raise DigitlensError(f"--out {out}: is a file, not a folder; choose a new --out folder")
                lock_stack.enter_context(run_lock(out, "train", create=True))
                return _prepare_out_dir(out, requested, resume)

            stored, checkpoint_path = distributed.rank0_decides(ctx, decide)
            if stored is not None:
                config = _resumed_config(out, stored, data_dir, hyper)
            else:
                config = TrainConfig.create(dataset=dataset, model=model, epochs=epochs, seed=seed, data_dir=data_dir,
                                            model_kwargs=model_kwargs, verify=verify, **hyper)
            return _train(out, config, stored, checkpoint_path, ctx, run_device, precision, progress)
    finally:
        distributed.finish(ctx)


def _train(out: Path, config: TrainConfig, stored: dict | None, checkpoint_path: Path | None, ctx,
           run_device: torch.device, precision: str, progress: bool) -> dict:
    """Train the run ``config`` describes (``stored``: its config.json dict when resuming, else None);
    return the summary dict."""
    world_size = 1 if ctx is None else ctx.world_size
    main = ctx is None or ctx.is_main
    resuming = stored is not None
    if config.hyper.batch_size % world_size:
        raise DigitlensError(f"--batch-size {config.hyper.batch_size}: must be a multiple of the {world_size} "
                             "processes (each trains on an equal share of every batch)")
    # A resumed run uses the thread count of the original, so reductions split the same way.
    threads = config.hyper.threads or (stored.get("threads_used") if resuming else None)
    with _torch_threads(threads):
        splits = _load_training_data(config)
        with _seeded_global_rng(config.seed, run_device):
            n_classes = _n_classes(splits)
            net = prepare_model(config.model, n_classes, config.model_kwargs, config.hyper).to(run_device)
            n_train = len(splits.train)
            batch_size = min(config.hyper.batch_size, n_train)
            per_epoch = steps_per_epoch(n_train, batch_size)
            optimizer, scheduler = make_optimizer(net, config.hyper, per_epoch * config.epochs)
            if not resuming:
                stored = {**config.to_json(),
                          **_recorded_facts(net, splits, n_classes, per_epoch, run_device, precision, world_size)}
                if main:
                    out.mkdir(parents=True, exist_ok=True)
                    write_json(out / "config.json", stored)
            start_epoch, history = 0, []
            if checkpoint_path is not None:
                start_epoch, history = _restore_checkpoint(checkpoint_path, net, optimizer, scheduler, run_device)
            # Older runs have no train_eval_size in config.json; resuming one measures from then on.
            n_train_eval = int(stored.get("train_eval_size", min(TRAIN_EVAL_SIZE, n_train)))
            # The data live on the training device as whole tensors (no DataLoader, no per-batch copies).
            train_images, train_labels = splits.train.images.to(run_device), splits.train.labels.to(run_device)
            session = _Session(
                out=out, config=config, net=net, trained=_distributed_wrapper(net, ctx, run_device),
                optimizer=optimizer, scheduler=scheduler, batch_size=batch_size, per_epoch=per_epoch,
                train=(train_images, train_labels),
                val=(splits.val.images.to(run_device), splits.val.labels.to(run_device)),
                train_eval=(train_images[:n_train_eval], train_labels[:n_train_eval]),
                device=run_device, precision=precision, rank=0 if ctx is None else ctx.rank,
                world_size=world_size, main=main)
            history = _fit(session, start_epoch, history, progress)
    train_seconds = sum(row["seconds"] for row in history)
    summary = {
        "run_dir": str(out), "dataset": config.dataset, "model": config.model, "epochs": config.epochs,
        "n_parameters": stored["n_parameters"], "final": history[-1] if history else None,
        "train_seconds": train_seconds,
        "samples_per_second": n_train * len(history) / train_seconds if train_seconds > 0 else None,
        "resumed_from_epoch": start_epoch if resuming else None,
        "device": str(run_device), "precision": precision, "world_size": world_size,
    }
    if main:
        save_model(net, out / "model.safetensors")
        write_json(out / "train_summary.json", _finite(summary))
    distributed.barrier(ctx)  # nobody returns before rank 0 has written the model
    return summary


def _distributed_wrapper(net: nn.Module, ctx, run_device: torch.device) -> nn.Module:
    """``net`` in DistributedDataParallel under torchrun, else ``net`` itself."""
    if ctx is None:
        return net
    return DistributedDataParallel(net, device_ids=[run_device.index] if run_device.type == "cuda" else None)


def _finite(obj):
    """Replace NaN floats (empty validation split) by None so the JSON stays valid."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj
