"""The ASGI app behind ``digitlens serve``: one page (``static/``) and the JSON API it uses.

Models are loaded once, in :func:`create_app`. Every prediction goes through the same code as
``digitlens predict``: :func:`digitlens.preprocess.to_mnist` (crop, 20x20 fit, centre of mass),
the model's softmax, and :func:`digitlens.explain.methods.attribute` for the maps. Requests that
arrive while the models are busy wait in a queue and are answered together, one forward pass per
model for all of them (:class:`Batcher`); the compute runs in one worker thread, so Captum's
layer hooks (Grad-CAM) never see two requests at once.

Routes (the README's "Interactive page" section documents them for API users):

- ``GET /`` the page; ``GET /static/...`` its JS and CSS (nothing is fetched from elsewhere);
- ``GET /api/health``; ``GET /api/runs`` (models, their methods, confusion matrices);
- ``POST /api/predict`` with JSON ``{"pixels": [...]}`` or an image body (PNG, JPEG, BMP);
- ``GET /api/runs/{id}/cell?true=T&pred=P`` the test images of one confusion-matrix cell;
- ``GET /api/disagreements?a=ID&b=ID`` the test images two runs predict differently;
- ``GET /api/runs/{id}/image/{index}`` one test image; ``GET /api/runs/{id}/files/{path}`` a
  file of the run folder (figures), never one outside it.

Bad input is answered with a 4xx status and ``{"error": "<one line>"}``; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from digitlens import data
from digitlens.errors import DigitlensError
from digitlens.explain.methods import (ATTENTION_METHODS, CAM_METHODS, INPUT_GRADIENT_METHODS, METHODS, attribute,
                                       fold_batch_norm, is_attention_model, prepare_model)
from digitlens.external import UserModel
from digitlens.inference import predict_logits, softmax
from digitlens.predict import load_predictor
from digitlens.preprocess import to_mnist
from digitlens.runio import read_json, read_npz

STATIC_DIR = Path(__file__).parent / "static"
#: Largest request body accepted (bytes); a photo from a phone fits.
MAX_BODY_BYTES = 8 * 2**20
#: Largest uploaded image accepted (pixels), checked before it is decoded.
MAX_IMAGE_PIXELS = 40_000_000
#: Most queued requests answered by one batch.
MAX_BATCH = 32
#: The maps the page offers; the API accepts every method of :mod:`digitlens.explain.methods`.
PAGE_METHODS = ("saliency", "integrated_gradients", "gradcam", "attention", "attention_rollout")
#: Run files that ``/api/runs/{id}/files/`` serves, by suffix.
SERVED_SUFFIXES = {".png": "image/png", ".svg": "image/svg+xml", ".json": "application/json",
                   ".md": "text/markdown", ".csv": "text/csv", ".html": "text/html"}
#: Longest side of a preprocessing-stage picture sent to the page (larger uploads are shrunk).
STEP_PREVIEW = 280


class ApiError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------------------------
# Models

@dataclass
class ServedModel:
    """One loaded model: ``id`` (unique, used in URLs), ``source`` (the run folder or model file),
    ``model`` (eval mode), the copies the maps run on, ``methods`` (what it can explain),
    ``defaults`` (the page's default maps), and the run folder (None for a model file)."""

    id: str
    source: str
    kind: str
    model: torch.nn.Module
    gradient_model: torch.nn.Module
    layer_model: torch.nn.Module
    methods: tuple[str, ...]
    defaults: tuple[str, ...]
    run_dir: Path | None = None
    config: dict = field(default_factory=dict)
    _browse: Any = None

    def model_for(self, method: str) -> torch.nn.Module:
        """The copy ``method`` runs on: batch norm folded for input-gradient methods (same function
        of the input, faster), the frozen original for layer and attention maps."""
        return self.gradient_model if method in INPUT_GRADIENT_METHODS else self.layer_model


def load_served_model(spec: Any, ident: str, load_options: dict | None = None) -> ServedModel:
    """Load ``spec`` (a run folder or a model file) through :func:`digitlens.predict.load_predictor`.

    ``load_options``: keyword arguments handed to ``load_predictor`` unchanged; this is where the
    bring-your-own-model options (input scale, normalisation, ONNX) plug in.
    """
    model, _ = load_predictor(spec, **(load_options or {}))
    if isinstance(model, UserModel):  # a user's file: its declared preprocessing, layout and outputs in one module
        probe = torch.cat([torch.zeros(1, 1, 28, 28), torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(0))])
        model = model.prepare(probe).torch_module()
    path = Path(spec)
    run_dir = path if path.is_dir() else None
    config = read_json(run_dir / "config.json") if run_dir is not None else {}
    size = config.get("image_size", 28)
    if size != 28:
        raise DigitlensError(f"{path}: trained on {size}x{size} images; serve feeds 28x28 (MNIST form)")
    scripted = isinstance(model, torch.jit.ScriptModule)
    if scripted:  # a TorchScript module cannot be deep-copied into a frozen copy, nor hooked (Grad-CAM)
        gradient_model = layer_model = model
        methods = tuple(m for m in METHODS if m not in CAM_METHODS + ATTENTION_METHODS)
    else:
        try:
            layer_model = prepare_model(model)
            gradient_model = fold_batch_norm(model)
        except Exception:  # noqa: BLE001 - a wrapped model (e.g. another runtime's) that cannot be deep-copied
            layer_model = gradient_model = model  # is used as is; a method it cannot run is reported per request
        attention = is_attention_model(model)
        methods = tuple(m for m in METHODS if attention or m not in ATTENTION_METHODS)
    if is_attention_model(model):
        defaults = ("saliency", "integrated_gradients", "attention_rollout")
    else:
        defaults = tuple(m for m in ("saliency", "integrated_gradients", "gradcam") if m in methods)
    return ServedModel(id=ident, source=str(path), kind="run" if run_dir is not None else "model_file",
                       model=model, gradient_model=gradient_model, layer_model=layer_model, methods=methods,
                       defaults=defaults, run_dir=run_dir, config=config)


def _unique_ids(specs: list[Any]) -> list[str]:
    """A short id per model: the run folder's or file's name, ``-2``, ``-3``... when two share one."""
    ids: list[str] = []
    for spec in specs:
        base = Path(spec).stem or "model"
        ident, k = base, 1
        while ident in ids:
            k += 1
            ident = f"{base}-{k}"
        ids.append(ident)
    return ids


def load_models(runs=(), model_files=(), load_options: dict | None = None) -> list[ServedModel]:
    """Every run folder of ``runs`` and model file of ``model_files``, loaded once. ``load_options``
    (preprocessing, trust_code) describe the model files; a run folder normalises its own inputs, so
    it gets only ``trust_code`` (an ``evaluate --model-file --out`` folder's TorchScript file)."""
    specs = [Path(r) for r in runs] + [Path(m) for m in model_files]
    if not specs:
        raise DigitlensError("serve: give at least one run folder (or --model-file)")
    for spec in runs:
        if not Path(spec).is_dir():
            raise DigitlensError(f"{spec}: run folder not found")
    for spec in model_files:
        if not Path(spec).is_file():
            raise DigitlensError(f"--model-file {spec}: file not found")
    run_options = {k: v for k, v in (load_options or {}).items() if k == "trust_code"}
    n_runs = len(runs)
    return [load_served_model(spec, ident, run_options if i < n_runs else load_options)
            for i, (spec, ident) in enumerate(zip(specs, _unique_ids(specs)))]


# ------------------------------------------------------------------------------------------------
# Predictions and maps

def compact(array: np.ndarray, significant: int = 5) -> list:
    """``array`` as nested lists, rounded to ``significant`` digits of its largest magnitude
    (a 28x28 map stays exact enough to draw and is a third the JSON of full floats)."""
    array = np.asarray(array, dtype=np.float64)
    peak = float(np.abs(array).max()) if array.size else 0.0
    decimals = significant - 1 - (math.floor(math.log10(peak)) if peak > 0 else 0)
    return np.round(array, max(0, decimals)).tolist()


def predict_batch(models: list[ServedModel], images: torch.Tensor, methods: list[tuple[str, ...]],
                  targets: list[int | None]) -> list[list[dict]]:
    """Predict and explain a batch: ``images`` (N, 1, 28, 28) in [0, 1]; ``methods[i]`` the maps
    asked for image i (``"default"`` in it: each model's defaults), ``targets[i]`` the class they
    explain (None: the model's prediction). One forward per model for the whole batch, one
    attribution call per model and method for the images that asked for it.

    Returns, per image, per model, ``{"id", "probabilities" (10 floats), "prediction" (int),
    "maps" ({method: 28x28 list, summed over channels}), "skipped" ({method: reason})}``."""

    n = images.shape[0]
    results: list[list[dict]] = [[] for _ in range(n)]
    for served in models:
        proba = softmax(predict_logits(served.model, images)).astype(np.float64)
        predictions = proba.argmax(axis=1)
        entries = [{"id": served.id, "probabilities": [float(p) for p in proba[i]],
                    "prediction": int(predictions[i]), "maps": {}, "skipped": {}} for i in range(n)]
        wanted = [tuple(dict.fromkeys(m for name in methods[i]
                                      for m in (served.defaults if name == "default" else (name,)))) for i in range(n)]
        for method in dict.fromkeys(m for w in wanted for m in w):
            rows = [i for i in range(n) if method in wanted[i]]
            if method not in served.methods:
                for i in rows:
                    entries[i]["skipped"][method] = f"{served.id} has no {method} maps"
                continue
            target = torch.tensor([targets[i] if targets[i] is not None else int(predictions[i]) for i in rows])
            try:
                maps = attribute(served.model_for(method), images[rows], target, method).sum(dim=1).numpy()
            except (RuntimeError, TypeError, KeyError, DigitlensError) as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                for i in rows:
                    entries[i]["skipped"][method] = f"failed on {served.id} ({reason})"
                continue
            for row, i in enumerate(rows):
                entries[i]["maps"][method] = compact(maps[row])
        for i in range(n):
            results[i].append(entries[i])
    return results


class Batcher:
    """Answers concurrent predict requests in batches: a request waits while a batch computes and
    joins the next one (no added delay when idle). Compute runs in one worker thread."""

    def __init__(self, models: list[ServedModel], max_batch: int = MAX_BATCH):
        self.models = models
        self.max_batch = max_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="digitlens-serve")
        self._pending: list[tuple[torch.Tensor, tuple[str, ...], int | None, asyncio.Future]] = []
        self._draining = False
        self.batches = 0
        self.requests = 0

    async def predict(self, image: torch.Tensor, methods: tuple[str, ...], target: int | None) -> list[dict]:
        """The per-model results of :func:`predict_batch` for one image (1, 28, 28)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((image, methods, target, future))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                images = torch.stack([b[0] for b in batch])
                try:
                    results = await loop.run_in_executor(
                        self.executor, predict_batch, self.models, images, [b[1] for b in batch], [b[2] for b in batch])
                except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.batches += 1
                self.requests += len(batch)
                for (*_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._draining = False

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def step_png(array: np.ndarray) -> str:
    """A preprocessing stage (H, W) in [0, 1] as a PNG data URL, its longer side at most
    :data:`STEP_PREVIEW` pixels (the page scales small ones up, pixelated)."""
    from PIL import Image

    image = Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8))
    if max(image.size) > STEP_PREVIEW:
        image.thumbnail((STEP_PREVIEW, STEP_PREVIEW), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------------
# Request parsing: every check gives a one-line message

async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 as soon as more arrive)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, f"body: {int(declared)} bytes, more than the limit of {limit}")
        except ValueError:
            raise ApiError(400, f"Content-Length {declared!r}: not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body: more than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_methods_param(value: Any, models: list[ServedModel]) -> tuple[str, ...]:
    """Method names from a list or a comma-separated string; ``"default"`` stands for each model's
    defaults. Unknown names are a 400."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        names = [m.strip() for m in value.split(",") if m.strip()]
    elif isinstance(value, list) and all(isinstance(m, str) for m in value):
        names = [m.strip() for m in value]
    else:
        raise ApiError(400, "methods: expected a list of method names or a comma-separated string")
    names = [m.replace("-", "_") for m in names]
    for name in names:
        if name != "default" and name not in METHODS:
            raise ApiError(400, f"methods: unknown method {name!r} (choose from default, {', '.join(METHODS)})")
    return tuple(dict.fromkeys(names))


def parse_target(value: Any) -> int | None:
    """The class the maps explain: None (the prediction) or a digit 0-9."""
    if value is None or value == "":
        return None
    try:
        target = int(value)
        if isinstance(value, float) and value != target:
            raise ValueError
    except (TypeError, ValueError):
        raise ApiError(400, f"target: expected a digit 0-9, got {value!r}") from None
    if isinstance(value, bool) or not 0 <= target <= 9:
        raise ApiError(400, f"target: expected a digit 0-9, got {value!r}")
    return target


def parse_flag(value: Any, name: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no"):
        return False
    raise ApiError(400, f"{name}: expected true or false, got {value!r}")


def pixels_from_json(payload: Any) -> np.ndarray:
    """``payload["pixels"]``: ``width * height`` numbers in [0, 1] (default 28 x 28), row by row,
    light ink on dark as in MNIST (dark on light works too: it is inverted); returns (H, W)."""
    if not isinstance(payload, dict):
        raise ApiError(400, "body: expected a JSON object with a \"pixels\" list")
    if "pixels" not in payload:
        raise ApiError(400, "body: missing \"pixels\" (784 numbers in 0..1, row by row)")
    pixels = payload["pixels"]
    if not isinstance(pixels, list):
        raise ApiError(400, f"pixels: expected a list of numbers, got {type(pixels).__name__}")
    width, height = payload.get("width", 28), payload.get("height", 28)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
            raise ApiError(400, f"{name}: expected a whole number 1-4096, got {value!r}")
    if len(pixels) != width * height:
        raise ApiError(400, f"pixels: expected {width * height} numbers ({width}x{height}), got {len(pixels)}")
    if any(isinstance(p, bool) or not isinstance(p, (int, float)) for p in pixels):
        raise ApiError(400, "pixels: every entry must be a number")
    array = np.asarray(pixels, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ApiError(400, f"pixels: {int((~np.isfinite(array)).sum())} entries are NaN or infinite")
    if array.min() < 0 or array.max() > 1:
        raise ApiError(400, f"pixels: values must lie in 0..1, got {array.min():g} to {array.max():g}")
    return array.reshape(height, width).astype(np.float32)


def image_from_bytes(body: bytes):
    """A Pillow image decoded from ``body``; 415 for anything that is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(body))
        if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
            raise ApiError(413, f"image: {image.size[0]}x{image.size[1]} pixels, more than {MAX_IMAGE_PIXELS}")
        image.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ApiError(415, f"body: not a readable image (PNG, JPEG or BMP): {reason}") from None
    return image.convert("RGBA") if image.mode == "P" else image


# ------------------------------------------------------------------------------------------------
# Browsing a run's test predictions

@dataclass
class BrowseData:
    """A run's test split and saved predictions: ``images`` (N, 28, 28) float32, ``y_true``,
    ``y_pred`` (N,), ``proba`` (N, 10), ``confusion`` (10x10 list, rows true, columns predicted)."""

    images: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    proba: np.ndarray
    confusion: list


def browse_data(served: ServedModel, data_dir=None) -> BrowseData:
    """Load (once) the test split and ``predictions.npz`` of a run; a one-line error when the run
    has none (``digitlens evaluate`` writes it) or they do not match."""
    if served._browse is not None:
        return served._browse
    if served.run_dir is None:
        raise ApiError(404, f"{served.id}: a model file has no saved test predictions")
    npz_path = served.run_dir / "predictions.npz"
    if not npz_path.is_file():
        raise ApiError(404, f"{npz_path}: not found (run `digitlens evaluate {served.run_dir}` first)")
    try:
        saved = read_npz(npz_path)
        if "y_true" not in saved or "proba" not in saved:
            raise DigitlensError(f"{npz_path}: no labels (y_true) saved; nothing to browse")
        test = data.load_splits_for_run(served.config).test
    except DigitlensError as exc:
        raise ApiError(409, str(exc)) from None
    y_true = saved["y_true"].astype(np.int64)
    if len(test) != len(y_true) or not np.array_equal(test.labels.numpy(), y_true):
        raise ApiError(409, f"{npz_path}: its {len(y_true)} labels do not match the run's test split ({len(test)} images)")
    proba = saved["proba"].astype(np.float64)
    y_pred = saved["y_pred"].astype(np.int64) if "y_pred" in saved else proba.argmax(axis=1)
    metrics_path = served.run_dir / "metrics.json"
    confusion = read_json(metrics_path).get("confusion_matrix") if metrics_path.is_file() else None
    if confusion is None:
        from sklearn.metrics import confusion_matrix

        confusion = confusion_matrix(y_true, y_pred, labels=np.arange(proba.shape[1])).tolist()
    served._browse = BrowseData(images=test.images[:, 0].numpy(), y_true=y_true, y_pred=y_pred, proba=proba,
                                confusion=confusion)
    return served._browse


def query_int(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        if default is None:
            raise ApiError(400, f"{name}: missing (expected a whole number {low}-{high})")
        return default
    try:
        number = int(value)
    except ValueError:
        raise ApiError(400, f"{name}: expected a whole number {low}-{high}, got {value!r}") from None
    if not low <= number <= high:
        raise ApiError(400, f"{name}: expected a whole number {low}-{high}, got {number}")
    return number


def query_float(request: Request, name: str, default: float, low: float, high: float) -> float:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ApiError(400, f"{name}: expected a number {low:g}-{high:g}, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise ApiError(400, f"{name}: expected a number {low:g}-{high:g}, got {value!r}")
    return number


# ------------------------------------------------------------------------------------------------
# The app

def create_app(runs=(), *, model_files=(), load_options: dict | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               data_dir=None) -> Starlette:
    """The Starlette app serving ``runs`` (run folders) and ``model_files`` (TorchScript files, or
    whatever :func:`digitlens.predict.load_predictor` loads with ``load_options``); every model is
    loaded here, once. ``data_dir``: where an MNIST run's test images are (else as recorded)."""
    models = load_models(runs, model_files, load_options)
    by_id = {m.id: m for m in models}
    batcher = Batcher(models)

    def model_or_404(ident: str) -> ServedModel:
        if ident not in by_id:
            raise ApiError(404, f"run {ident!r}: not served (serving {', '.join(by_id)})")
        return by_id[ident]

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": [m.id for m in models], "batches": batcher.batches,
                             "requests": batcher.requests})

    async def runs_endpoint(request: Request) -> Response:
        listing = []
        for m in models:
            entry = {"id": m.id, "source": m.source, "kind": m.kind, "architecture": m.config.get("model"),
                     "dataset": m.config.get("dataset"), "methods": list(m.methods), "defaults": list(m.defaults),
                     "browsable": False}
            try:  # the first call reads the test split: off the event loop
                browse = await run_in_threadpool(browse_data, m, data_dir)
            except ApiError as exc:
                entry["browse_note"] = exc.message
            else:
                entry.update(browsable=True, confusion=browse.confusion, n_test=int(len(browse.y_true)),
                             accuracy=float((browse.y_true == browse.y_pred).mean()))
            listing.append(entry)
        return JSONResponse({"runs": listing, "page_methods": list(PAGE_METHODS)})

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_body(request, max_body_bytes)
        if not body:
            raise ApiError(400, "body: empty (send JSON {\"pixels\": [...]} or an image file)")
        params = dict(request.query_params)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type.endswith("json"):
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"body: malformed JSON ({str(exc).splitlines()[0]})") from None
            source = pixels_from_json(payload)
            params = {**params, **{k: payload[k] for k in ("methods", "target", "steps") if k in payload}}
        else:
            source = image_from_bytes(body)
        methods = parse_methods_param(params.get("methods"), models)
        target = parse_target(params.get("target"))
        want_steps = parse_flag(params.get("steps"), "steps", True)
        try:  # off the event loop: other requests are read while this one is preprocessed
            image, steps = await run_in_threadpool(to_mnist, source, return_steps=True)
        except DigitlensError as exc:
            raise ApiError(422, str(exc)) from None
        if not image.any():  # to_mnist passes a blank 28x28 field through unchanged
            raise ApiError(422, "image: no ink found (the image is blank)")
        results = await batcher.predict(image, methods, target)
        answer = {"input": compact(image[0].numpy(), 6), "models": results,
                  "preprocessing": "passthrough" if steps.passthrough else ("inverted" if steps.inverted else "kept")}
        if want_steps:
            pngs = await run_in_threadpool(lambda: [step_png(array) for _, array in steps.stages])
            answer["steps"] = [{"title": title, "png": png} for (title, _), png in zip(steps.stages, pngs)]
        answer["elapsed_ms"] = round(1000 * (time.perf_counter() - started), 2)
        return JSONResponse(answer)

    def listing_item(browse: BrowseData, i: int) -> dict:
        return {"index": int(i), "true": int(browse.y_true[i]), "pred": int(browse.y_pred[i]),
                "confidence": round(float(browse.proba[i, browse.y_pred[i]]), 5),
                "pixels": compact(browse.images[i], 3)}

    async def with_maps(served: ServedModel, browse: BrowseData, items: list[dict], method: str | None) -> None:
        """Add ``map`` (the method's map towards the saved prediction) to each item, in one batch."""
        if not method or not items:
            return
        images = torch.from_numpy(np.stack([browse.images[it["index"]] for it in items]))[:, None]
        results = await asyncio.get_running_loop().run_in_executor(
            batcher.executor, predict_batch, [served], images, [(method,)] * len(items), [it["pred"] for it in items])
        for it, result in zip(items, results):
            it["map"] = result[0]["maps"].get(method)

    async def cell(request: Request) -> Response:
        served = model_or_404(request.path_params["run"])
        true = query_int(request, "true", None, 0, 9)
        pred = query_int(request, "pred", None, 0, 9)
        low = query_float(request, "min_confidence", 0.0, 0.0, 1.0)
        high = query_float(request, "max_confidence", 1.0, 0.0, 1.0)
        limit = query_int(request, "limit", 48, 1, 500)
        offset = query_int(request, "offset", 0, 0, 10**9)
        method = request.query_params.get("method") or None
        if method is not None:
            method = parse_methods_param(method, models)[0]
            if method not in served.methods:
                raise ApiError(400, f"method {method!r}: {served.id} has no such maps (it has {', '.join(served.methods)})")
        browse = await run_in_threadpool(browse_data, served, data_dir)
        confidence = browse.proba[np.arange(len(browse.y_pred)), browse.y_pred]
        chosen = np.flatnonzero((browse.y_true == true) & (browse.y_pred == pred) & (confidence >= low) & (confidence <= high))
        chosen = chosen[np.argsort(-confidence[chosen], kind="stable")]  # most confident first
        items = [listing_item(browse, i) for i in chosen[offset:offset + limit]]
        await with_maps(served, browse, items, method)
        return JSONResponse({"run": served.id, "true": true, "pred": pred, "total": int(len(chosen)), "items": items})

    async def test_image(request: Request) -> Response:
        served = model_or_404(request.path_params["run"])
        browse = await run_in_threadpool(browse_data, served, data_dir)
        index = request.path_params["index"]
        if not 0 <= index < len(browse.y_true):
            raise ApiError(404, f"image {index}: the test split has {len(browse.y_true)} images (0-{len(browse.y_true) - 1})")
        return JSONResponse(listing_item(browse, index))

    async def disagreements(request: Request) -> Response:
        if len(models) < 2:
            raise ApiError(400, "disagreements: needs two runs (serving one)")
        first = model_or_404(request.query_params.get("a") or models[0].id)
        second = model_or_404(request.query_params.get("b") or models[1].id)
        if first.id == second.id:
            raise ApiError(400, f"disagreements: a and b are both {first.id!r}")
        limit = query_int(request, "limit", 48, 1, 500)
        offset = query_int(request, "offset", 0, 0, 10**9)
        digit = query_int(request, "digit", -1, -1, 9)
        one = await run_in_threadpool(browse_data, first, data_dir)
        two = await run_in_threadpool(browse_data, second, data_dir)
        if not np.array_equal(one.y_true, two.y_true):
            raise ApiError(409, f"disagreements: {first.id} and {second.id} were tested on different images")
        chosen = np.flatnonzero((one.y_pred != two.y_pred) & ((digit < 0) | (one.y_true == digit)))
        # the most confident of the two first: the disagreements where one model is surest
        surest = np.maximum(one.proba[chosen, one.y_pred[chosen]], two.proba[chosen, two.y_pred[chosen]])
        chosen = chosen[np.argsort(-surest, kind="stable")]
        items = []
        for i in chosen[offset:offset + limit]:
            item = listing_item(one, i)
            item.update({"pred_a": int(one.y_pred[i]), "pred_b": int(two.y_pred[i]),
                         "confidence_a": round(float(one.proba[i, one.y_pred[i]]), 5),
                         "confidence_b": round(float(two.proba[i, two.y_pred[i]]), 5)})
            items.append(item)
        return JSONResponse({"a": first.id, "b": second.id, "total": int(len(chosen)), "items": items})

    async def run_file(request: Request) -> Response:
        served = model_or_404(request.path_params["run"])
        if served.run_dir is None:
            raise ApiError(404, f"{served.id}: a model file has no run folder")
        relative = request.path_params["path"]
        root = served.run_dir.resolve()
        target = (root / relative).resolve()
        if not target.is_relative_to(root):
            raise ApiError(403, f"{relative}: outside the run folder")
        if target.suffix.lower() not in SERVED_SUFFIXES:
            raise ApiError(403, f"{relative}: only {', '.join(sorted(SERVED_SUFFIXES))} files are served")
        if not target.is_file():
            raise ApiError(404, f"{relative}: no such file in {served.id}")
        return FileResponse(target, media_type=SERVED_SUFFIXES[target.suffix.lower()])

    async def api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"{request.url.path}: not found", 405: f"{request.method} {request.url.path}: method not allowed"}
        return JSONResponse({"error": message.get(exc.status_code, str(exc.detail))}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return JSONResponse({"error": f"internal error: {first}"}, status_code=500)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    routes = [
        Route("/", page),
        Route("/api/health", health),
        Route("/api/runs", runs_endpoint),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/runs/{run}/cell", cell),
        Route("/api/runs/{run}/image/{index:int}", test_image),
        Route("/api/runs/{run}/files/{path:path}", run_file),
        Route("/api/disagreements", disagreements),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.models = models
    app.state.batcher = batcher
    return app


#: Torch threads of the server: its batches are small, and on a machine shared with other work a
#: second thread made them far slower (integrated gradients for 4 drawings: 20 ms with 1 thread,
#: 1.7 s with 2, measured while other jobs ran on this 2-core machine).
DEFAULT_THREADS = 1


def serve(runs=(), *, host: str = "127.0.0.1", port: int = 8000, model_files=(), load_options: dict | None = None,
          data_dir=None, threads: int | None = DEFAULT_THREADS, log_level: str = "info") -> None:
    """Serve the page and API for ``runs`` on ``http://host:port/`` until Ctrl-C (uvicorn).
    Binds to 127.0.0.1 unless told otherwise; a busy port is a one-line error. ``threads``:
    torch's intra-op threads while it serves (None: torch's default); the caller's count is restored."""
    if not 0 <= port <= 65535:
        raise DigitlensError(f"--port {port}: expected 0-65535")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise DigitlensError(f"--threads {threads!r}: expected a whole number >= 1")
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        _serve_until_stopped(runs, model_files, load_options, data_dir, host, port, log_level)
    finally:  # the caller's thread count again, however the server ended
        torch.set_num_threads(previous_threads)


def _serve_until_stopped(runs, model_files, load_options, data_dir, host: str, port: int, log_level: str) -> None:
    """Check that ``host:port`` is free, then run uvicorn on the app for ``runs`` until it stops."""
    import uvicorn  # lazily: the web server stack is only needed while serving

    app = create_app(runs, model_files=model_files, load_options=load_options, data_dir=data_dir)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise DigitlensError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    print(f"digitlens serve: {', '.join(m.id for m in app.state.models)} on http://{host}:{port}/ (Ctrl-C stops)",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextmanager
def background_server(app, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Run ``app`` with uvicorn in a daemon thread (``port=0``: a free port) and yield its base
    URL (``http://host:port``); stops the server on exit. For tests, benchmarks and screenshots.
    A server that is not up within ``timeout`` seconds raises DigitlensError."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    server.install_signal_handlers = lambda: None  # not the main thread: leave Ctrl-C to the caller
    thread = threading.Thread(target=server.run, name="digitlens-serve-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise DigitlensError(f"serve: the server did not start on {host}:{port} within {timeout:g} s")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
