"""Predict digits in image files: ``predict_images(model_or_run, paths)``.

Each image (PNG, JPEG or BMP; a photo, a scan or a drawing, dark ink on light paper or light on
dark) goes through :func:`digitlens.preprocess.to_mnist`, MNIST's own preprocessing, and then the
model. Optionally writes, per image, the preprocessing stages side by side (``show_steps``) and an
attribution overlay (``explain``: any one method of :mod:`digitlens.explain.methods` the model
supports).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from digitlens import models
from digitlens.errors import DigitlensError
from digitlens.explain.methods import attribute, parse_methods, prepare_model
from digitlens.external import UserModel, load_user_model
from digitlens.figure_writer import FigureWriter
from digitlens.inference import predict_proba
from digitlens.plots.predict import PredictionExplanationDisplay, PreprocessingStepsDisplay
from digitlens.preprocess import to_mnist
from digitlens.pyplot import pyplot
from digitlens.runio import read_json

#: How many of the most probable digits each result lists (``top``).
TOP = 3


def load_predictor(model_or_run: Any, preprocessing: dict | None = None, trust_code: bool = False) -> tuple[Any, str]:
    """The model behind ``model_or_run`` and a name for it: a digitlens run folder (its
    ``model.safetensors``), a user's model file (TorchScript ``.pt`` or ONNX ``.onnx``) or a folder
    written by ``evaluate --model-file --out`` (its recorded file and preprocessing), or an
    ``nn.Module``. ``preprocessing`` (``input_scale``, ``normalize``, ``outputs``; see
    :class:`digitlens.external.Preprocessing`) describes a user's model. Returns ``(model, name)``:
    an eval-mode ``nn.Module`` for a digitlens run or a plain module, else a
    :class:`digitlens.external.UserModel` (its layout is detected on the images to predict).
    ``trust_code``: load a TorchScript file (code that runs when loaded; refused otherwise)."""
    if isinstance(model_or_run, nn.Module) and not preprocessing:
        return model_or_run.eval(), type(model_or_run).__name__
    if isinstance(model_or_run, (str, os.PathLike)):
        path = Path(model_or_run)
        if not path.exists():
            raise DigitlensError(f"{path}: no such run folder or model file")
        config = path / "config.json"
        if path.is_dir() and not (config.is_file() and read_json(config).get("model_file")):
            if preprocessing:
                raise DigitlensError(f"{path}: --input-scale/--normalize/--outputs describe a user's model file; "
                                     "a digitlens run normalises its own inputs")
            return models.load_model(path), str(path)
    user = load_user_model(model_or_run, preprocessing, trust_code=trust_code)
    return user, user.label


def _figure_stem(image: Path, suffix: str, taken: set) -> str:
    """``<image stem>_<suffix>``, with ``-2``, ``-3``... when two images share a stem."""
    stem, k = f"{image.stem}_{suffix}", 1
    while stem in taken:
        k += 1
        stem = f"{image.stem}-{k}_{suffix}"
    taken.add(stem)
    return stem


def predict_images(model_or_run: Any, paths, *, top: int = TOP, explain: str | None = None,
                   show_steps: bool = False, out_dir: str | os.PathLike = ".", passthrough: bool = True,
                   preprocessing: dict | None = None, trust_code: bool = False) -> list[dict]:
    """Predict the digit in each image file of ``paths``.

    Returns one dict per image, in order: ``file`` (str), ``prediction`` (int), ``probabilities``
    (10 floats, softmax of the model's output), ``top`` (``[[digit, probability], ...]``, the
    ``top`` most probable), ``preprocessing`` (``"passthrough"`` for an image already in MNIST
    form, ``"inverted"`` for dark ink on light, else ``"kept"``) and, when written, ``steps``
    (the PNG of the preprocessing stages) and ``explanation`` (the overlay PNG of method
    ``explain``), both under ``out_dir``. Every image is read and checked before any file is
    written; a bad one raises a one-line DigitlensError naming it. ``preprocessing``: what a user's
    model file expects, ``trust_code`` (see :func:`load_predictor`).
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise DigitlensError("predict: no image files given")
    if not 1 <= top <= 10:
        raise DigitlensError(f"--top {top}: expected 1 to 10")
    loaded, _ = load_predictor(model_or_run, preprocessing, trust_code)
    inputs, steps = [], []
    for path in paths:
        x, s = to_mnist(path, passthrough=passthrough, return_steps=True)
        inputs.append(x)
        steps.append(s)
    images = torch.stack(inputs)
    # a user's model: its declared preprocessing, input layout and outputs wrapped into one module
    model = loaded.prepare(images).torch_module() if isinstance(loaded, UserModel) else loaded
    method = None
    if explain is not None:
        try:
            methods = parse_methods(explain, model)
        except DigitlensError as exc:  # its messages name explain's --methods option
            raise DigitlensError(str(exc).replace("--methods", "--explain", 1)) from None
        if len(methods) != 1:
            raise DigitlensError(f"--explain {explain!r}: give one method")
        method = methods[0]
    proba = predict_proba(model, images).astype(np.float64)
    if proba.shape[1] < 2:
        raise DigitlensError(f"model: {proba.shape[1]} output, expected one per class")
    results = []
    for path, s, p in zip(paths, steps, proba):
        order = np.argsort(-p, kind="stable")[:top]
        results.append({
            "file": str(path), "prediction": int(order[0]), "probabilities": [float(v) for v in p],
            "top": [[int(d), float(p[d])] for d in order],
            "preprocessing": "passthrough" if s.passthrough else ("inverted" if s.inverted else "kept"),
        })
    if show_steps or method is not None:
        _write_figures(model, images, steps, results, method, Path(out_dir), show_steps)
    return results


def _write_figures(model, images, steps, results, method, out_dir: Path, show_steps: bool) -> None:
    """The steps and overlay PNGs of :func:`predict_images`, listed in ``out_dir/figures.json``
    (kinds ``prediction_steps`` and ``prediction_map``); adds their paths to ``results``."""
    plt = pyplot()
    heatmaps = None
    if method is not None:
        targets = torch.tensor([r["prediction"] for r in results])
        try:
            # prepare_model's frozen copy cannot be made of a TorchScript module (a deep copy's
            # parameters are not leaves, so they cannot stop requiring gradients): use it as is.
            frozen = model if isinstance(model, torch.jit.ScriptModule) else prepare_model(model)
            heatmaps = attribute(frozen, images, targets, method).sum(dim=1).numpy()
        except (RuntimeError, TypeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DigitlensError(f"--explain {method}: failed on this model ({first})") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set = set()
    with FigureWriter(out_dir, "predict", formats=("png",)) as writer:
        for i, (s, result) in enumerate(zip(steps, results)):
            path = Path(result["file"])
            if show_steps:
                title = f"{path.name}: preprocessing stages (predicted {result['prediction']})"
                display = PreprocessingStepsDisplay.from_steps(s, title=title).plot()
                written = writer.save(display.figure_, _figure_stem(path, "steps", taken), kind="prediction_steps",
                                      section="predict", title=title, image=path.name)
                plt.close(display.figure_)
                result["steps"] = str(written[0])
            if heatmaps is not None:
                d = result["prediction"]
                title = f"{path.name}: predicted {d} ({result['probabilities'][d]:.1%}), {method}"
                display = PredictionExplanationDisplay(
                    original=s.stages[0][1], model_input=images[i, 0].numpy(), heatmap=heatmaps[i],
                    probabilities=result["probabilities"], method=method, title=title).plot()
                written = writer.save(display.figure_, _figure_stem(path, method, taken), kind="prediction_map",
                                      section="predict", title=title, method=method, image=path.name)
                plt.close(display.figure_)
                result["explanation"] = str(written[0])
