"""Reading PEFT LoRA adapters and base-model weights into float64 numpy arrays (no PEFT import:
``adapter_config.json`` and ``safetensors`` are all an adapter is).

- ``read_lora_adapter(folder) -> LoraAdapter``: every adapted module's A (r, in), B (out, r) and
  scale (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA; ``alpha_pattern`` honoured); DoRA
  adapters, quantised or non-finite tensors are refused in one line.
- ``load_base_weights(file)``: every tensor of a base model's ``.safetensors`` file by name.
- ``match_base_weight(base, module)``: the base weight an adapted module changes, in (out, in)
  orientation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from digitlens.errors import DigitlensError
from digitlens.runio import read_json

# PEFT prefixes a module's name with these when it saves an adapter.
_PEFT_PREFIXES = ("base_model.model.",)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass
class LoraModule:
    """One adapted linear layer: ``delta = scale * B @ A``; A of shape (r, in), B of shape (out, r)."""

    name: str
    lora_a: np.ndarray
    lora_b: np.ndarray
    scale: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def delta(self) -> np.ndarray:
        """scale * B @ A as float64, shape (out, in)."""
        return self.scale * (self.lora_b @ self.lora_a)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from a folder: its config and its modules by (stripped) name."""

    path: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.path.name


def _strip_peft_prefix(name: str) -> str:
    for prefix in _PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _pattern_value(patterns: dict, name: str, default, config_path: Path | str = "adapter_config.json",
                   field_name: str = "alpha_pattern"):
    """PEFT's rank_pattern / alpha_pattern lookup: first key that matches the end of ``name``
    (a one-line DigitlensError for a pattern that is not a {regex: value} object)."""
    if patterns is None:
        return default
    if not isinstance(patterns, dict):
        raise DigitlensError(f"{config_path}: {field_name} is a {type(patterns).__name__}, expected an object")
    for key, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", name)
        except re.error as exc:
            raise DigitlensError(f"{config_path}: {field_name} key {key!r} is not a regular expression ({exc})") from None
        if matched:
            return value
    return default


def _positive_number(value, config_path: Path, field_name: str) -> float:
    """``value`` as a finite float (a one-line DigitlensError naming the field otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DigitlensError(f"{config_path}: {field_name} {value!r} is not a finite number")
    return float(value)


def read_lora_adapter(adapter_dir) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    into float64 numpy arrays; raise a one-line DigitlensError if it is not one."""

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not adapter_dir.is_dir():
        raise DigitlensError(f"--adapter {adapter_dir}: folder not found")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise DigitlensError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise DigitlensError(f"{config_path}: peft_type {config.get('peft_type')!r} is not a LoRA adapter")
    if not weights_path.is_file():
        raise DigitlensError(f"{weights_path}: file not found (only .safetensors adapters are read)")
    try:
        tensors = _load_safetensors_float64(weights_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DigitlensError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    if config.get("use_dora") or any("lora_magnitude_vector" in key for key in tensors):
        # DoRA rescales every row of W + dW by a learned magnitude: its update is not scale * B @ A,
        # and analysing it as plain LoRA would describe a different matrix.
        raise DigitlensError(f"{adapter_dir}: a DoRA adapter (use_dora / lora_magnitude_vector); only plain LoRA "
                             "adapters are analysed")
    bad = next((k for k, v in tensors.items() if not np.isfinite(v).all()), None)
    if bad is not None:
        raise DigitlensError(f"{weights_path}: tensor {bad!r} holds NaN or infinite values")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            pairs.setdefault(_strip_peft_prefix(match["module"]), {})[match["which"]] = value
    if not pairs:
        raise DigitlensError(f"{weights_path}: no '*.lora_A.weight' / '*.lora_B.weight' tensors found")
    adapter = LoraAdapter(adapter_dir, config)
    default_alpha = _positive_number(config.get("lora_alpha", config.get("r", 8)), config_path, "lora_alpha")
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise DigitlensError(f"{weights_path}: module {name!r} has lora_{next(iter(pair))} but not its partner")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise DigitlensError(f"{weights_path}: module {name!r}: lora_A {a.shape} and lora_B {b.shape} "
                                 "are not a (r, in) / (out, r) pair (conv LoRA is not supported)")
        rank = a.shape[0]
        if rank == 0:
            raise DigitlensError(f"{weights_path}: module {name!r} has rank 0 (lora_A {a.shape})")
        alpha = _positive_number(_pattern_value(config.get("alpha_pattern"), name, default_alpha, config_path),
                                 config_path, f"alpha_pattern value for {name!r}")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        adapter.modules[name] = LoraModule(name, a, b, scale, bool(config.get("fan_in_fan_out", False)))
    return adapter


def _load_safetensors_float64(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float64 numpy arrays (bfloat16 via torch)."""

    out = {}
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            tensor = fh.get_tensor(key)
            if not tensor.is_floating_point():
                # Quantised weights (int8 with separate scales) are not the matrices they stand for.
                raise DigitlensError(f"{path}: tensor {key!r} is {str(tensor.dtype).replace('torch.', '')}; "
                                     "only floating-point weights are analysed (not a quantised model)")
            out[key] = tensor.double().numpy()
    return out


def load_base_weights(base_path) -> dict[str, np.ndarray]:
    """Every tensor of a base-model ``.safetensors`` file as float64 numpy arrays by name."""

    base_path = Path(base_path)
    if not base_path.is_file():
        raise DigitlensError(f"--base {base_path}: file not found")
    try:
        weights = _load_safetensors_float64(base_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DigitlensError(f"--base {base_path}: not a readable safetensors file ({exc})") from None
    bad = next((k for k, v in weights.items() if not np.isfinite(v).all()), None)
    if bad is not None:
        raise DigitlensError(f"--base {base_path}: tensor {bad!r} holds NaN or infinite values")
    return weights


def match_base_weight(base: dict[str, np.ndarray], module: LoraModule, base_label: str = "base") -> np.ndarray:
    """The base weight of ``module`` in (out, in) orientation, found by name (exact, else the one
    key whose module path ends with the adapter's or vice versa); one-line error on no match,
    several matches or a shape that does not fit the LoRA update."""
    name = module.name
    candidates = [f"{name}.weight", f"{name}.base_layer.weight"]
    key = next((c for c in candidates if c in base), None)
    if key is None:
        suffix_hits = [k for k in base if k.endswith(".weight")
                       and (k[:-7].endswith("." + name) or name.endswith("." + k[:-7]))]
        if len(suffix_hits) == 1:
            key = suffix_hits[0]
        elif len(suffix_hits) > 1:
            raise DigitlensError(f"{base_label}: adapter module {name!r} matches several base weights "
                                 f"({', '.join(sorted(suffix_hits)[:3])})")
        else:
            raise DigitlensError(f"{base_label}: no weight named {name + '.weight'!r} for adapter module "
                                 f"{name!r} (base has e.g. {', '.join(sorted(base)[:3])})")
    weight = base[key]
    if module.fan_in_fan_out:
        weight = weight.T
    expected = (module.lora_b.shape[0], module.lora_a.shape[1])
    if weight.shape != expected:
        raise DigitlensError(f"{base_label}: weight {key!r} has shape {tuple(weight.shape)} but adapter module "
                             f"{name!r} changes a {expected} matrix (lora_B {module.lora_b.shape} @ lora_A "
                             f"{module.lora_a.shape})")
    return weight
