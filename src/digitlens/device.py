"""Which device a stage computes on: ``--device auto|cpu|cuda[:N]|mps`` and ``--precision fp32|bf16``.

``resolve_device(None)`` reads ``DIGITLENS_DEVICE`` (so a test session or a shell can move every
stage at once) and falls back to ``auto``: CUDA when ``torch.cuda.is_available()``, else MPS when
available, else the CPU. Everything a run writes (weights, checkpoints, maps) is stored on the CPU,
so a run trained on a GPU evaluates, explains and resumes on a CPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

from digitlens.errors import DigitlensError

DEVICE_ENV = "DIGITLENS_DEVICE"
PRECISIONS = ("fp32", "bf16")


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """The torch.device for ``spec`` ('auto', 'cpu', 'cuda', 'cuda:N', 'mps', a torch.device, or None:
    ``$DIGITLENS_DEVICE`` or 'auto'); CUDA always with its index (``cuda:0``), so devices compare
    equal to a parameter's; a one-line error when it is unknown or not available here."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec if spec is not None else os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DigitlensError(f"--device {spec!r}: unknown device (choose auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DigitlensError(f"--device {text}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DigitlensError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type == "mps":
        if not _mps_available():
            raise DigitlensError(f"--device {text}: MPS is not available here; use --device cpu")
        return device
    raise DigitlensError(f"--device {spec!r}: unknown device (choose auto, cpu, cuda, cuda:N or mps)")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def check_precision(precision: str | None, device: torch.device) -> str:
    """``precision`` ('fp32' or 'bf16', default 'fp32') checked against ``device``: bf16 autocast is
    offered on CUDA only (on this project's 2-core CPU it ran 2.6x slower than fp32)."""
    precision = (precision or "fp32").lower()
    if precision not in PRECISIONS:
        raise DigitlensError(f"--precision {precision!r}: choose fp32 or bf16")
    if precision == "bf16" and device.type != "cuda":
        raise DigitlensError(f"--precision bf16: only on a CUDA device (this stage runs on {device})")
    return precision


def autocast(device: torch.device, precision: str):
    """A context that runs the forward pass in bf16 (``torch.autocast``) for precision 'bf16', else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model without either."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for honest timings on CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
