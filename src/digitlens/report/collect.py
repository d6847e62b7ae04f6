"""Gather what a run folder holds for the report: its JSON files, its history and its figures.

Figures come from the stages' figure manifests (``figures.json``, see
:mod:`digitlens.figure_writer`) at the places the stages write them:

    evaluate  -> <run>/figures/figures.json
    explain   -> <run>/explain/figures.json
    adapt     -> <run>/adapt/<TASK>/figures.json
    subspace  -> <run>/subspace/<TASK>/figures.json

A figure that no manifest lists is not shown. Every reader returns ``None`` (or an empty list or
dict) for a stage that was not run, so the report leaves that section out instead of breaking;
a file that is there but broken is a one-line DigitlensError naming it.

History: ``history.csv`` is read by :func:`digitlens.history.read_history`, the one history parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.history import read_history
from digitlens.figure_writer import ENTRY_KEYS, MANIFEST_NAME, read_figure_manifest
from digitlens.runio import read_json, read_npz, read_text, require_run_dir


@dataclass(frozen=True)
class FigureRef:
    """One figure of a stage's manifest: ``rel`` (its PNG, relative to the run folder: the key that
    pairs the same figure of two runs), ``kind``, ``section``, ``title``, ``shows`` (what it shows:
    ``method``, ``rank``, ``module``, ``task``...), ``stage`` and ``path`` (absolute)."""

    stage: str
    rel: str
    kind: str
    section: str
    title: str
    shows: dict
    path: Path


@dataclass
class RunData:
    """Everything the report reads from one run folder; missing stages are ``None`` (or empty)."""

    run_dir: Path
    name: str
    config: dict
    history: list[dict[str, float]] | None = None
    metrics: dict | None = None
    insights: Any = None
    insights_md: str | None = None
    predictions: dict | None = None
    explain_metrics: dict | None = None
    adapt_results: dict[str, dict] = field(default_factory=dict)   # task -> adapt/<task>/results.json
    subspace: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {file name: subspace/<task>/*.json}
    figures: list[FigureRef] = field(default_factory=list)
    unlisted_figures: list[str] = field(default_factory=list)  # stage folders with figures, no figures.json


def check_predictions(path: Path, arrays: dict) -> dict:
    """``arrays`` of a ``predictions.npz`` when they fit together (``y_true``, ``y_pred``: (N,) whole
    numbers; ``proba`` and ``proba_calibrated``: (N, C)); a one-line DigitlensError naming the
    file otherwise. Returns ``arrays``."""
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


def _optional_json(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _png_of(entry: dict, folder: Path) -> Path | None:
    """The PNG of a manifest entry (its ``path``, else the PNG among its ``files``), or None."""
    path = Path(entry["path"])
    if path.suffix.lower() == ".png":
        return path
    for name in entry.get("files") or []:
        if isinstance(name, str) and name.lower().endswith(".png"):
            png = (folder / name).resolve()
            if not png.is_relative_to(folder.resolve()):
                raise DigitlensError(f"{folder / MANIFEST_NAME}: a figure's files point outside its folder ({name!r})")
            return png
    return None


def stage_folders(run_dir: Path) -> list[tuple[str, Path, str | None]]:
    """(stage, folder of its figures.json, task or None) at the contract's places, in report order."""
    folders: list[tuple[str, Path, str | None]] = [("evaluate", run_dir / "figures", None),
                                                   ("explain", run_dir / "explain", None)]
    for stage in ("adapt", "subspace"):
        base = run_dir / stage
        if base.is_dir():
            folders += [(stage, task_dir, task_dir.name) for task_dir in sorted(base.iterdir())
                        if task_dir.is_dir() and not task_dir.name.startswith(".")]
    return folders


def stage_figures(run: RunData, stage: str, folder: Path, task: str | None) -> list[FigureRef]:
    """The figures of one stage folder, from its ``figures.json``. A folder with figures but no
    manifest (written by digitlens before 0.2) shows none: it is named in ``run.unlisted_figures``
    so the report can say which stage to run again."""
    if not folder.is_dir():
        return []
    if not (folder / MANIFEST_NAME).is_file():
        if any(folder.rglob("*.png")):
            run.unlisted_figures.append(folder.relative_to(run.run_dir).as_posix())
        return []
    entries = read_figure_manifest(folder)
    root = run.run_dir.resolve()
    found = []
    for entry in entries:
        png = _png_of(entry, folder)
        if png is None or not png.is_file():
            continue
        shows = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
        if task is not None:
            shows.setdefault("task", task)  # the manifest's folder names the task
        found.append(FigureRef(stage=stage, rel=png.relative_to(root).as_posix(), kind=entry["kind"],
                               section=entry["section"], title=str(entry.get("title") or ""), shows=shows, path=png))
    return found


def _subspace_files(task_dir: Path) -> dict[str, Any]:
    """The JSON files of one subspace task folder (``subspace/<task>/*.json``, the manifest left
    out), by file name."""
    return {js.name: read_json(js) for js in sorted(task_dir.glob("*.json")) if js.name != MANIFEST_NAME}


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
    for stage, folder, task in stage_folders(run_dir):
        if stage == "adapt" and (folder / "results.json").is_file():
            data.adapt_results[task] = read_json(folder / "results.json")
        if stage == "subspace":
            data.subspace[task] = _subspace_files(folder)
        data.figures += stage_figures(data, stage, folder, task)
    return data
