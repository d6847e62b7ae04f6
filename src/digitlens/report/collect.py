"""Gather what a run folder holds for the report: its JSON files, its history and its figures.

Every reader returns ``None`` (or an empty list) for a stage that was not run, so the report
leaves that section out instead of breaking.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digitlens.errors import DigitlensError
from digitlens.runio import read_json, read_npz, read_text, require_run_dir

# Folders of a run searched for figures (PNG; the SVG twins are not embedded), in report order.
FIGURE_FOLDERS = ("figures", "explain/figures", "explain", "adapt", "subspace")


@dataclass
class RunData:
    """Everything the report reads from one run folder; missing stages are ``None``."""

    run_dir: Path
    name: str
    config: dict
    history: list[dict[str, float]] | None = None
    metrics: dict | None = None
    insights: Any = None
    insights_md: str | None = None
    predictions: dict | None = None
    explain_metrics: dict | None = None
    explain_manifest: dict | None = None
    adapt_results: dict[str, dict] = field(default_factory=dict)   # task -> results.json
    subspace: dict[str, Any] = field(default_factory=dict)         # relative path -> JSON
    figures: list[Path] = field(default_factory=list)              # relative PNG paths

    def figure_path(self, rel: Path | str) -> Path:
        return self.run_dir / rel


def _optional_json(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def read_history(path: Path) -> list[dict[str, float]] | None:
    """Rows of ``history.csv`` as dicts of floats (empty cells skipped); ``None`` when absent."""
    if not path.is_file():
        return None
    rows = []
    text = read_text(path)
    try:
        for line_no, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2):
            parsed = {}
            for key, value in row.items():
                if key is None or value in (None, ""):
                    continue
                if isinstance(value, list):  # more cells than the header has columns
                    raise DigitlensError(f"{path}: line {line_no}: {len(row) - 1 + len(value)} cells for "
                                         f"{len(row) - 1} columns")
                try:
                    parsed[key.strip()] = float(value)
                except ValueError:
                    raise DigitlensError(f"{path}: line {line_no}: column {key!r} is not a number ({value!r})") from None
            rows.append(parsed)
    except csv.Error as exc:
        raise DigitlensError(f"{path}: not a readable CSV file ({exc})") from None
    return rows or None


def check_predictions(path: Path, arrays: dict) -> dict:
    """``arrays`` of a ``predictions.npz`` when they fit together (``y_true``, ``y_pred``: (N,) whole
    numbers; ``proba`` and ``proba_calibrated``: (N, C)); a one-line DigitlensError naming the
    file otherwise. Returns ``arrays``."""
    import numpy as np

    n = None
    for key in ("y_true", "y_pred"):
        if key not in arrays:
            continue
        a = arrays[key]
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)):
            raise DigitlensError(f"{path}: {key} has shape {a.shape} and type {a.dtype}; expected (N,) whole numbers")
        if a.size and a.min() < 0:
            raise DigitlensError(f"{path}: {key} holds the negative class {int(a.min())}")
        if n is not None and a.shape[0] != n:
            raise DigitlensError(f"{path}: {a.shape[0]} {key} for {n} y_true")
        n = a.shape[0]
    for key in ("proba", "proba_calibrated"):
        if key not in arrays:
            continue
        a = arrays[key]
        if a.ndim != 2 or (n is not None and a.shape[0] != n) or not np.issubdtype(a.dtype, np.floating):
            raise DigitlensError(f"{path}: {key} has shape {a.shape} and type {a.dtype}; expected ({n}, classes) floats")
        if "y_pred" in arrays and arrays["y_pred"].size and arrays["y_pred"].max() >= a.shape[1]:
            raise DigitlensError(f"{path}: y_pred holds class {int(arrays['y_pred'].max())}, {key} has "
                                 f"{a.shape[1]} classes")
    return arrays


def find_figures(run_dir: Path) -> list[Path]:
    """Every PNG under the figure folders, as paths relative to ``run_dir`` (sorted, no duplicates)."""
    found: list[Path] = []
    seen = set()
    for folder in FIGURE_FOLDERS:
        base = run_dir / folder
        if not base.is_dir():
            continue
        pattern = "*.png" if folder in ("figures", "explain/figures", "explain") else "**/*.png"
        for png in sorted(base.glob(pattern)):
            rel = png.relative_to(run_dir)
            if rel not in seen and not png.name.startswith("."):
                seen.add(rel)
                found.append(rel)
    return found


def collect_run(run_dir: str | Path) -> RunData:
    """Read one run folder into a :class:`RunData`."""
    run_dir = require_run_dir(run_dir)
    data = RunData(run_dir=run_dir, name=run_dir.resolve().name, config=read_json(run_dir / "config.json"))
    data.history = read_history(run_dir / "history.csv")
    data.metrics = _optional_json(run_dir / "metrics.json")
    data.insights = _optional_json(run_dir / "insights.json")
    if (run_dir / "insights.md").is_file():
        data.insights_md = read_text(run_dir / "insights.md")
    if (run_dir / "predictions.npz").is_file():
        data.predictions = check_predictions(run_dir / "predictions.npz", read_npz(run_dir / "predictions.npz"))
    data.explain_metrics = _optional_json(run_dir / "explain" / "explain_metrics.json")
    data.explain_manifest = _optional_json(run_dir / "explain" / "manifest.json")
    adapt_dir = run_dir / "adapt"
    if adapt_dir.is_dir():
        for results in sorted(adapt_dir.glob("*/results.json")):
            data.adapt_results[results.parent.name] = read_json(results)
    subspace_dir = run_dir / "subspace"
    if subspace_dir.is_dir():
        for js in sorted(subspace_dir.rglob("*.json")):
            try:
                data.subspace[str(js.relative_to(subspace_dir))] = json.loads(read_text(js))
            except json.JSONDecodeError as exc:
                raise DigitlensError(f"{js}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    data.figures = find_figures(run_dir)
    return data
