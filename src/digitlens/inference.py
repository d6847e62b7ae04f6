"""Running a model on images: the one place digitlens turns images into logits and probabilities.

Every stage (evaluate, explain, predict, serve, adapt) predicts through :func:`predict_logits`, so a
model is always put in eval mode, run in batches on its own device and given the same checks.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from digitlens.device import model_device
from digitlens.errors import DigitlensError
from digitlens.external import UserModel, load_user_model
from digitlens.progress import progress_bar


def as_model(model: Any) -> Any:
    """``model`` itself when it is a module, a UserModel or a callable; a model file loaded as a UserModel."""
    if isinstance(model, (str, os.PathLike)):
        return load_user_model(model)
    if not isinstance(model, (nn.Module, UserModel)) and not callable(model):
        raise DigitlensError(f"model: expected a torch.nn.Module or a model file, got {type(model).__name__}")
    return model


def on_device(model: Any, device: torch.device) -> Any:
    """``model`` itself when it already lives on ``device`` (or is a plain function), else a copy moved
    there, so that a caller's model is never moved behind its back."""
    if not isinstance(model, nn.Module) or model_device(model) == device:
        return model
    return copy.deepcopy(model).to(device)


def predict_logits(model: Any, images: torch.Tensor, *, batch_size: int = 1000, progress: bool = False,
                   description: str = "predicting") -> np.ndarray:
    """Logits of ``model`` on ``images`` (N, 1, H, W): float32 array of shape (N, n_classes).

    Runs in batches under ``torch.inference_mode()`` with the model in eval mode (its previous
    mode is restored). A model returning a tuple (e.g. logits and attentions) uses its first item.
    ``model`` may be a :class:`digitlens.external.UserModel` or a model file (its declared
    preprocessing applied, its outputs turned into logits).
    """
    model = as_model(model)
    if isinstance(model, UserModel):
        model = model.prepare(images).torch_module()
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        device = next(model.parameters()).device  # type: ignore[union-attr]
    except (StopIteration, AttributeError, TypeError):
        device = torch.device("cpu")
    chunks = []
    starts = range(0, len(images), batch_size)
    try:
        with torch.inference_mode(), progress_bar(progress, transient=True) as bar:
            task = bar.add_task(description, total=len(starts))
            for start in starts:
                out = model(images[start:start + batch_size].to(device))
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if not isinstance(out, torch.Tensor) or out.ndim != 2:
                    raise DigitlensError(
                        f"model: expected logits of shape (batch, n_classes), got {getattr(out, 'shape', type(out).__name__)}")
                chunks.append(out.float().cpu())
                bar.advance(task)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DigitlensError(f"model: failed on images of shape {tuple(images.shape[1:])} ({first})") from None
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, 10), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the classes of float32 ``logits`` (N, n_classes): float32 array of the same shape."""
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1).numpy()


def predict_proba(model: Any, images: torch.Tensor, *, batch_size: int = 1000, progress: bool = False) -> np.ndarray:
    """Softmax probabilities of ``model`` on ``images`` (N, 1, H, W): float32 array of shape
    (N, n_classes); see :func:`predict_logits`."""
    return softmax(predict_logits(model, images, batch_size=batch_size, progress=progress))


def predict(model: Any, images: torch.Tensor, *, batch_size: int = 1000, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels (N,) int64 and softmax probabilities (N, n_classes) float32 of ``model`` on ``images``."""
    proba = predict_proba(model, images, batch_size=batch_size, progress=progress)
    return proba.argmax(axis=1), proba
