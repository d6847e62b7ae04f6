"""Models that digitlens did not train: a TorchScript file, an ONNX file, a digitlens run folder or
an ``nn.Module``, with the input preprocessing the model expects and its outputs checked.

digitlens' images are float32 (N, 1, 28, 28) in [0, 1]. A user's model may expect pixels in
[0, 255], normalised pixels (``(x - mean) / std``), flat (N, 784) vectors or (N, 28, 28, 1)
channels-last images, and may return logits, probabilities or log-probabilities.
:func:`load_user_model` wraps any of them into a :class:`UserModel` whose
:meth:`UserModel.predict_logits` takes digitlens' images and returns logits (N, 10)::

    from digitlens.external import Preprocessing, load_user_model

    model = load_user_model("ref.onnx", preprocessing=Preprocessing(normalize=(0.1307, 0.3081)))
    logits = model.predict_logits(images)          # torch.Tensor (N, 10)

Files are never unpickled: TorchScript goes through ``torch.jit.load``, ONNX through onnxruntime.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from digitlens import models, runio
from digitlens.errors import DigitlensError

N_CLASSES = 10
IMAGE_SIZE = 28
INPUT_SCALES = (1, 255)
OUTPUT_KINDS = ("logits", "probs", "log_probs")

#: Input layouts tried, in order, when a model's layout is not declared: name -> shape after N.
LAYOUTS = {
    "nchw": (1, IMAGE_SIZE, IMAGE_SIZE),
    "flat": (IMAGE_SIZE * IMAGE_SIZE,),
    "nhwc": (IMAGE_SIZE, IMAGE_SIZE, 1),   # Keras / TensorFlow exports (tf2onnx)
    "hw": (IMAGE_SIZE, IMAGE_SIZE),
}

#: Rows count as probabilities when they sum to 1 within this (float32 softmax sums are ~1e-7 off).
SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects and returns.

    ``input_scale``: 1 (pixels in [0, 1], digitlens' own) or 255 (pixels in [0, 255]).
    ``normalize``: ``(mean, std)`` applied after scaling, ``(x * input_scale - mean) / std``, or None.
    ``outputs``: ``auto`` (detected, see :func:`detect_outputs`), ``logits``, ``probs`` or ``log_probs``.
    ``layout``: ``auto`` (detected by trying the model) or one of :data:`LAYOUTS`.
    """

    input_scale: float = 1
    normalize: tuple[float, float] | None = None
    outputs: str = "auto"
    layout: str = "auto"

    def __post_init__(self):
        if self.input_scale not in INPUT_SCALES:
            raise DigitlensError(f"--input-scale {self.input_scale}: expected 1 (pixels in [0, 1]) or 255 (pixels in [0, 255])")
        if self.normalize is not None:
            mean, std = (float(v) for v in self.normalize)
            if not np.isfinite([mean, std]).all() or std <= 0:
                raise DigitlensError(f"--normalize {mean},{std}: expected MEAN,STD with a positive STD")
            object.__setattr__(self, "normalize", (mean, std))
        if self.outputs not in ("auto", *OUTPUT_KINDS):
            raise DigitlensError(f"--outputs {self.outputs!r}: choose auto, {', '.join(OUTPUT_KINDS)}")
        if self.layout not in ("auto", *LAYOUTS):
            raise DigitlensError(f"layout {self.layout!r}: choose auto, {', '.join(LAYOUTS)}")
        object.__setattr__(self, "input_scale", int(self.input_scale))

    def to_dict(self) -> dict:
        """JSON-ready dict (``normalize`` as [mean, std] or None)."""
        d = asdict(self)
        d["normalize"] = list(self.normalize) if self.normalize is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preprocessing":
        """The inverse of :meth:`to_dict`; unknown keys are ignored, missing ones take the defaults."""
        d = dict(d or {})
        keep = {k: d[k] for k in ("input_scale", "normalize", "outputs", "layout") if k in d}
        if keep.get("normalize") is not None:
            keep["normalize"] = tuple(keep["normalize"])
        return cls(**keep)

    def is_identity(self) -> bool:
        return self.input_scale == 1 and self.normalize is None

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (N, 1, 28, 28) in [0, 1] -> scaled and normalised images of the same shape."""
        x = images
        if self.input_scale != 1:
            x = x * float(self.input_scale)
        if self.normalize is not None:
            mean, std = self.normalize
            x = (x - mean) / std
        return x


def parse_normalize(text: str | None) -> tuple[float, float] | None:
    """``"0.1307,0.3081"`` -> (0.1307, 0.3081); None -> None; anything else a one-line error."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        mean, std = (float(p) for p in parts)
    except ValueError:
        raise DigitlensError(f"--normalize {text!r}: expected MEAN,STD, e.g. 0.1307,0.3081") from None
    return mean, std


def detect_outputs(out: torch.Tensor) -> str:
    """``probs`` when every value is in [0, 1] and every row sums to 1, ``log_probs`` when every
    value is <= 0 and every row of exp(out) sums to 1, else ``logits`` (``out`` is (N, C))."""
    x = out.detach().double()
    if bool(torch.isnan(x).any()):
        return "logits"
    in_unit = bool(((x >= -1e-6) & (x <= 1 + 1e-6)).all())
    if in_unit and bool(((x.sum(1) - 1).abs() < SUM_TOLERANCE).all()):
        return "probs"
    if bool((x <= 1e-6).all()) and bool(((x.exp().sum(1) - 1).abs() < SUM_TOLERANCE).all()):
        return "log_probs"
    return "logits"


def to_logits(out: torch.Tensor, kind: str) -> torch.Tensor:
    """Logits from outputs of ``kind``: logits and log-probabilities as they are (softmax of
    log-probabilities gives the probabilities back), probabilities through their log (a zero
    probability becomes the log of the smallest positive float32)."""
    if kind == "probs":
        return torch.log(out.clamp_min(torch.finfo(torch.float32).tiny))
    return out


# --------------------------------------------------------------------------------------------
# Loading files
# --------------------------------------------------------------------------------------------

#: What a refused TorchScript file is told (README "Safety").
TRUST_HINT = ("a TorchScript file is code, and loading it runs that code: pass --trust-code (Python: "
              "trust_code=True) only for a file from a source you trust, or give a code-free format: ONNX (.onnx) "
              "or a digitlens run folder (safetensors weights)")


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True when ``path`` is a zip archive holding TorchScript code (``torch.jit.save`` writes
    ``NAME/code/...``; ``torch.save``'s archives of tensors and pickles have no ``code/``). Read with
    :mod:`zipfile` only: nothing in the file runs."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in f"/{name}" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trusted_by_record(config: dict) -> bool:
    """True when a folder's config.json (written by ``evaluate --model-file --trust-code --out``)
    vouches for its ``model_file``: the file still has the SHA-256 recorded when it was trusted."""
    recorded, file = config.get("trusted_sha256"), config.get("model_file")
    return bool(recorded and file and Path(file).is_file() and file_sha256(file) == recorded)


def load_torchscript(path: str | os.PathLike, trust_code: bool = False) -> nn.Module:
    """Load a TorchScript model file (``torch.jit.save``) on the CPU, in eval mode. TorchScript is
    code that runs when it is loaded, so without ``trust_code`` the file is refused (one line,
    before anything of it runs; see :data:`TRUST_HINT`)."""
    path = Path(path)
    if not path.is_file():
        raise DigitlensError(f"--model-file {path}: file not found")
    if not trust_code:
        if is_torchscript_archive(path):
            raise DigitlensError(f"--model-file {path}: refused: {TRUST_HINT}")
        raise DigitlensError(f"--model-file {path}: not a TorchScript model (no TorchScript code in it); a state dict "
                             "or a pickled model is not loaded (unsafe): save it with torch.jit.save or export it to .onnx")
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; users still ship it
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise DigitlensError(f"--model-file {path}: not a TorchScript model ({first}); a state dict or a pickled "
                             "model is not loaded (unsafe): save it with torch.jit.save or export it to .onnx") from None
    # Frozen: digitlens only reads the model, and a deep copy of a ScriptModule whose parameters
    # require gradients has non-leaf parameters that cannot be frozen afterwards (torch 2.13).
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


class OnnxForward(nn.Module):
    """An onnxruntime (CPU) session as a forward-only module: torch tensor in, torch float32 tensor
    out (the chosen output: the first float output of shape (N, 10), see :func:`_pick_output`).
    No gradients flow through it; Captum's perturbation methods need only forward calls."""

    def __init__(self, path: Path):
        super().__init__()
        import onnxruntime as ort

        self.path = path
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no warnings on stderr
        # Idle worker threads sleep instead of spinning: explanations call the session many times
        # with small batches, and spinning threads slow everything else on a busy CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DigitlensError(f"--model-file {path}: not a valid ONNX model ({first[:200]})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise DigitlensError(f"--model-file {path}: the model takes {len(inputs)} inputs "
                                 f"({', '.join(i.name for i in inputs)}); digitlens feeds one image batch")
        self.input = inputs[0]
        if self.input.type not in _ORT_FLOAT_TYPES:
            raise DigitlensError(f"--model-file {path}: input {self.input.name!r} is {self.input.type}; "
                                 "digitlens feeds float images")
        self.input_dtype = _ORT_FLOAT_TYPES[self.input.type]
        self.output_index: int | None = None
        # A model exported with a fixed batch size (torch.onnx.export without dynamic axes) is fed
        # in chunks of that size.
        batch = self.input.shape[0] if self.input.shape else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def __deepcopy__(self, memo):  # an InferenceSession cannot be copied; it holds no mutable state
        return self

    def declared_rank(self) -> int | None:
        shape = self.input.shape
        return len(shape) if isinstance(shape, (list, tuple)) else None

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input.name: x})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy().astype(self.input_dtype, copy=False)
        step = self.fixed_batch or max(len(arr), 1)
        outs = []
        for start in range(0, len(arr), step):
            chunk = np.ascontiguousarray(arr[start:start + step])
            results = self._run(chunk)
            if self.output_index is None:
                self.output_index = _pick_output(self.path, self.session.get_outputs(), results, len(chunk))
            outs.append(np.asarray(results[self.output_index], dtype=np.float32))
        return torch.from_numpy(np.concatenate(outs)) if outs else torch.zeros((0, N_CLASSES))


def _pick_output(path: Path, metas, results: list, n: int) -> int:
    """Index of the first float output of shape (n, 10): e.g. skl2onnx's ``probabilities`` beside
    its integer ``label``."""
    found = []
    for i, (meta, value) in enumerate(zip(metas, results)):
        arr = np.asarray(value) if not isinstance(value, list) else None
        shape = arr.shape if arr is not None else f"list of {len(value)}"
        found.append(f"{meta.name} {shape}")
        if arr is not None and arr.dtype.kind == "f" and arr.ndim == 2 and arr.shape == (n, N_CLASSES):
            return i
    scores = [(meta.name, np.asarray(v).shape[1]) for meta, v in zip(metas, results)
              if not isinstance(v, list) and np.asarray(v).dtype.kind == "f" and np.asarray(v).ndim == 2]
    if scores:
        name, k = scores[0]
        raise DigitlensError(f"--model-file {path}: returns {k} scores per image (output {name!r}); digitlens needs "
                             f"{N_CLASSES}, one per digit")
    raise DigitlensError(f"--model-file {path}: no output of shape (N, {N_CLASSES}) (one score per digit) among "
                         f"{', '.join(found)}" + ("; convert scikit-learn models with options={'zipmap': False}"
                                                  if any("list" in f for f in found) else ""))


# --------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------

class _Preprocessed(nn.Module):
    """``preprocessing`` + layout + ``model`` + outputs -> logits, as one nn.Module on [0, 1] pixels."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, layout: str, outputs: str):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.layout = layout
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(to_layout(self.preprocessing.apply(x), self.layout))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return to_logits(out, self.outputs)


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, 1, 28, 28) images in the model's ``layout`` (see :data:`LAYOUTS`)."""
    if layout == "nchw":
        return x
    if layout == "nhwc":
        return x.permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], *LAYOUTS[layout])


class UserModel:
    """A user's model with its declared preprocessing; see :func:`load_user_model`.

    Attributes: ``path`` (str or None), ``format`` (``torchscript``, ``onnx``, ``run`` or
    ``module``), ``preprocessing`` (:class:`Preprocessing` as declared), ``layout`` and ``outputs``
    (as declared, or detected on the first images predicted; None until then), ``is_differentiable``.
    """

    def __init__(self, model: nn.Module, *, fmt: str, path: str | None, preprocessing: Preprocessing):
        self.model = model
        self.format = fmt
        self.path = path
        self.preprocessing = preprocessing
        self.layout: str | None = None if preprocessing.layout == "auto" else preprocessing.layout
        self.outputs: str | None = None if preprocessing.outputs == "auto" else preprocessing.outputs
        self.outputs_detected = preprocessing.outputs == "auto"

    @property
    def is_differentiable(self) -> bool:
        """False for ONNX models (onnxruntime gives no gradients), True otherwise."""
        return self.format != "onnx"

    @property
    def name(self) -> str:
        """The file's name, or the module's class name."""
        return Path(self.path).name if self.path else type(self.model).__name__

    @property
    def label(self) -> str:
        """How errors name the model: ``--model-file PATH`` or the module's class name."""
        return f"--model-file {self.path}" if self.path else f"model {self.name}"

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise DigitlensError(f"{self.label}: returned {type(out).__name__}, expected a tensor of scores (N, {N_CLASSES})")
        return out

    def prepare(self, images: torch.Tensor) -> "UserModel":
        """Detect the layout (by trying each of :data:`LAYOUTS`) and the kind of outputs on the first
        64 of ``images`` (N, 1, 28, 28) unless both are known; return self."""
        if self.layout is not None and self.outputs is not None:
            return self
        was_training = getattr(self.model, "training", False)
        if hasattr(self.model, "eval"):
            self.model.eval()
        try:
            self._fit(torch.as_tensor(images[:64], dtype=torch.float32))
        finally:
            if was_training and hasattr(self.model, "train"):
                self.model.train()
        return self

    def _fit(self, images: torch.Tensor) -> None:
        probe = self.preprocessing.apply(images)
        tried, out = [], None
        if self.layout is None:
            candidates = list(LAYOUTS)
            rank = self.model.declared_rank() if isinstance(self.model, OnnxForward) else None
            if rank is not None:  # an ONNX file declares its input rank: try only the layouts of that rank
                candidates = [c for c in candidates if len(LAYOUTS[c]) + 1 == rank] or candidates
        else:
            candidates = [self.layout]
        errors = []
        for layout in candidates:
            shape = (len(probe), *LAYOUTS[layout])
            tried.append("(N, " + ", ".join(str(s) for s in shape[1:]) + ")")
            try:
                with torch.inference_mode():
                    candidate = self._call(to_layout(probe, layout))
            except DigitlensError:
                raise
            except Exception as exc:  # any framework's shape error means: not this layout
                errors.append(str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__)
                continue
            if candidate.ndim == 2 and candidate.shape[0] == len(probe):
                self.layout, out = layout, candidate
                break
            errors.append(f"output of shape {tuple(candidate.shape)}")
        if out is None:
            declared = ""
            if isinstance(self.model, OnnxForward):
                dims = ", ".join(str(d) for d in self.model.input.shape)
                declared = f"; the file declares input {self.model.input.name!r} of shape ({dims})"
            raise DigitlensError(f"{self.label}: accepts none of the input shapes tried, {' or '.join(tried)}"
                                 f"{declared} (last error: {errors[-1] if errors else 'none'})")
        if out.shape[1] != N_CLASSES:
            raise DigitlensError(f"{self.label}: returns {out.shape[1]} scores per image; digitlens needs "
                                 f"{N_CLASSES}, one per digit")
        if self.outputs is None:
            self.outputs = detect_outputs(out)

    def predict_logits(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Logits (N, 10) float32 of ``images`` (N, 1, 28, 28) in [0, 1], after the declared
        preprocessing; outputs declared or detected as probabilities become their log."""
        images = torch.as_tensor(images, dtype=torch.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise DigitlensError(f"{self.label}: images of shape {tuple(images.shape)}, expected (N, 1, 28, 28)")
        if len(images) == 0:
            return torch.zeros((0, N_CLASSES))
        module = self.prepare(images).torch_module()
        was_training = getattr(module, "training", False)
        module.eval()
        try:
            with torch.inference_mode():
                chunks = [module(images[start:start + batch_size]).float() for start in range(0, len(images), batch_size)]
        finally:
            if was_training:
                module.train()
        return torch.cat(chunks)

    def torch_module(self) -> nn.Module:
        """An nn.Module (N, 1, 28, 28) in [0, 1] -> logits (N, 10): preprocessing, layout,
        the model and the output conversion in one, so attributions are on digitlens' [0, 1] pixels.
        For an ONNX model its forward runs onnxruntime (no gradients)."""
        if self.layout is None or self.outputs is None:
            raise DigitlensError(f"{self.label}: call prepare(images) or predict_logits once before torch_module "
                                 "(layout and outputs not detected yet)")
        if self.preprocessing.is_identity() and self.layout == "nchw" and self.outputs != "probs" and \
                self.format in ("run", "module"):
            return self.model  # keep the model itself: Grad-CAM layers and attention maps stay reachable
        return _Preprocessed(self.model, self.preprocessing, self.layout, self.outputs)

    def describe(self) -> dict:
        """JSON-ready record for config.json and metrics.json: ``model_file``, ``format``, the
        declared ``preprocessing`` and the ``layout`` and ``outputs`` used (``outputs_detected``
        tells whether they were detected)."""
        return {"model_file": self.path, "format": self.format, "preprocessing": self.preprocessing.to_dict(),
                "layout": self.layout, "outputs": self.outputs, "outputs_detected": self.outputs_detected}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict_logits(images)


def load_user_model(model: Any, preprocessing: Preprocessing | dict | None = None, *,
                    trust_code: bool = False) -> UserModel:
    """Wrap a user's model as a :class:`UserModel`.

    ``model``: a path to a TorchScript file (``torch.jit.save``; any suffix but ``.onnx``), an ONNX
    file (``.onnx``, run by onnxruntime on the CPU), a digitlens run folder (its config.json and
    model.safetensors; the ``--out`` folder of ``evaluate --model-file`` gives the file it recorded,
    with the recorded preprocessing, which a ``preprocessing`` dict overrides key by key), an ``nn.Module`` taking (N, 1, 28, 28) [0, 1] images, or a UserModel
    (returned with ``preprocessing`` applied when given). ``preprocessing``: a
    :class:`Preprocessing` or its dict (default: pixels in [0, 1], no normalisation, layout and
    outputs detected). Bad files raise a one-line :class:`DigitlensError` naming the file.
    ``trust_code``: load a TorchScript file (code that runs when loaded; refused otherwise). A
    folder of ``evaluate --model-file --trust-code --out`` vouches for its file as long as the file
    keeps the SHA-256 recorded there (:func:`trusted_by_record`).
    """
    if preprocessing is None:
        prep = None
    elif isinstance(preprocessing, Preprocessing):
        prep = preprocessing
    elif isinstance(preprocessing, dict):
        prep = Preprocessing.from_dict(preprocessing)
    else:
        raise DigitlensError(f"preprocessing: expected a Preprocessing or a dict, got {type(preprocessing).__name__}")
    if isinstance(model, UserModel):
        if prep is None:
            return model
        return UserModel(model.model, fmt=model.format, path=model.path, preprocessing=prep)
    prep = prep or Preprocessing()
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir():
            config = runio.read_json(runio.require_run_dir(path) / "config.json")
            if config.get("model_file"):  # the --out folder of `evaluate --model-file`: its file, its flags
                recorded = config.get("preprocessing") or {}
                merged = {**recorded, **preprocessing} if isinstance(preprocessing, dict) else (preprocessing or recorded)
                return load_user_model(config["model_file"], merged,
                                       trust_code=trust_code or trusted_by_record(config))
            return UserModel(models.load_model(path), fmt="run", path=str(path), preprocessing=prep)
        if not path.is_file():
            raise DigitlensError(f"--model-file {path}: file not found")
        if path.suffix.lower() == ".onnx":
            return UserModel(OnnxForward(path), fmt="onnx", path=str(path), preprocessing=prep)
        return UserModel(load_torchscript(path, trust_code), fmt="torchscript", path=str(path), preprocessing=prep)
    if isinstance(model, nn.Module) or callable(model):
        return UserModel(model, fmt="module", path=None, preprocessing=prep)
    raise DigitlensError(f"model: expected a model file, a run folder or a torch.nn.Module, got {type(model).__name__}")
