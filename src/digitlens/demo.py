"""``digitlens demo``: from nothing to a report, in one command.

``run_demo(out_root)`` trains a CNN and a ViT on one dataset, evaluates both, explains both
(the ViT's maps side by side with the CNN's), runs the LoRA study (r = 4, 8, 64) and the subspace
analysis on the ViT, and writes two reports:

    OUT_ROOT/demo-DATASET/cnn/report.html   the CNN with the ViT side by side (everything in one page)
    OUT_ROOT/demo-DATASET/vit/report.html   the ViT alone, with the LoRA study
    OUT_ROOT/demo-DATASET/demo.json         what ran, how long each step took, the summary numbers

It returns that ``demo.json`` dict: ``runs`` (model -> run folder), ``reports`` (paths),
``steps`` (list of ``{"step", "seconds", "status"}``), ``summary`` and ``seconds`` (total).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

from digitlens.errors import DigitlensError
from digitlens.runio import read_json, write_json

# Epochs and study sizes per dataset: the digits demo must finish in under 2 minutes on 2 CPU
# cores, the MNIST one in under 10 (measured times are in the README).
SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {
        "train": {"cnn": {"epochs": 12}, "vit": {"epochs": 30}},
        "explain": {"faithfulness_size": 200, "sanity_size": 32},
        "adapt": {"task": "groups", "ranks": (4, 8, 64), "seeds": (0, 1), "epochs": 3},
    },
    "mnist": {
        "train": {"cnn": {"epochs": 3}, "vit": {"epochs": 4}},
        "explain": {"faithfulness_size": 500, "sanity_size": 64},
        "adapt": {"task": "groups", "ranks": (4, 8, 64), "seeds": (0, 1), "epochs": 2},
    },
}

# A smaller version for tests: same steps, tiny epochs and study sizes.
FAST = {
    "train": {"cnn": {"epochs": 2}, "vit": {"epochs": 2, "model_kwargs": {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64}}},
    "explain": {"faithfulness_size": 32, "sanity_size": 8, "methods": ("saliency", "gradcam")},
    "adapt": {"task": "groups", "ranks": (2, 4), "seeds": (0, 1), "epochs": 1, "n_train": 200, "n_test": 100,
              "baselines": False},
}

MARKER = "demo.json"


def _prepare(folder: Path) -> None:
    """Empty a previous demo folder (only one this function made: it holds ``demo.json``)."""
    if folder.exists():
        if not (folder / MARKER).is_file():
            raise DigitlensError(f"{folder}: exists and was not written by `digitlens demo`; choose another --out")
        for child in ("cnn", "vit"):
            if (folder / child).exists():
                shutil.rmtree(folder / child)
    folder.mkdir(parents=True, exist_ok=True)
    # Written first, so a demo stopped half-way can be re-run into the same folder.
    write_json(folder / MARKER, {"status": "running"})


def _summary(runs: dict[str, Path]) -> dict:
    """Headline numbers read back from the run folders (accuracy, confusion, faithfulness, LoRA)."""
    out: dict[str, Any] = {"models": {}, "lora": []}
    for name, run in runs.items():
        row: dict[str, Any] = {}
        metrics_path = run / "metrics.json"
        if metrics_path.is_file():
            metrics = read_json(metrics_path)
            row["accuracy"] = metrics.get("accuracy")
            pairs = metrics.get("most_confused") or []
            if pairs:
                row["most_confused"] = f"{pairs[0]['true']} → {pairs[0]['predicted']} ({pairs[0]['count']})"
        em_path = run / "explain" / "explain_metrics.json"
        if em_path.is_file():
            ranking = (read_json(em_path).get("faithfulness") or {}).get("ranking") or []
            if ranking:
                row["most_faithful"] = ranking[0]
        out["models"][name] = row
        for results_path in sorted((run / "adapt").glob("*/results.json")) if (run / "adapt").is_dir() else []:
            results = read_json(results_path)
            for s in results.get("summary", []):
                out["lora"].append({"model": name, "task": results.get("task"), "method": s.get("method"),
                                    "rank": s.get("rank"), "accuracy": s.get("accuracy_mean"),
                                    "trainable_params": s.get("trainable_params")})
    return out


def _print_summary(console, result: dict) -> None:
    from rich.table import Table

    table = Table(title="digitlens demo: what the models learned", title_justify="left")
    for col in ("model", "test accuracy", "most-confused pair", "most faithful explanation"):
        table.add_column(col, justify="right" if col == "test accuracy" else "left")
    for name, row in result["summary"]["models"].items():
        acc = row.get("accuracy")
        table.add_row(name, "—" if acc is None else f"{acc * 100:.2f}%", row.get("most_confused", "—"),
                      row.get("most_faithful", "—"))
    console.print(table)
    lora = result["summary"]["lora"]
    if lora:
        table = Table(title=f"LoRA study on the ViT (task “{lora[0]['task']}”)", title_justify="left")
        for col in ("method", "rank", "trainable parameters", "test accuracy"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for row in lora:
            table.add_row(row["method"], str(row["rank"] or "—"), f"{row['trainable_params']:,}",
                          f"{row['accuracy'] * 100:.2f}%")
        console.print(table)
    for step in result["steps"]:
        if step["status"] != "done":
            console.print(f"[yellow]skipped[/]: {step['step']} ({step['status']})")
    if not result["reports"]:
        console.print(f"[bold yellow]Done in {result['seconds']:.0f} s, but no report could be written.[/]")
        return
    console.print(f"[bold green]Done in {result['seconds']:.0f} s.[/] Open the report: [bold]{result['reports'][0]}[/]")
    for extra in result["reports"][1:]:
        console.print(f"  and {extra}")


def run_demo(out_root: str | Path = "runs", *, dataset: str = "digits", data_dir: str | Path | None = None,
             progress: bool = True, fast: bool = False) -> dict:
    """Train, evaluate, explain, adapt and report on ``dataset``; see the module docstring.

    ``fast=True`` uses tiny epochs and study sizes (for tests). Returns the ``demo.json`` dict.
    """
    from rich.console import Console

    if dataset not in SETTINGS:
        raise DigitlensError(f"--dataset {dataset!r}: the demo runs on {' or '.join(SETTINGS)}")
    settings = FAST if fast else SETTINGS[dataset]
    console = Console(quiet=not progress, highlight=False)
    folder = Path(out_root) / f"demo-{dataset}"
    _prepare(folder)
    runs = {"cnn": folder / "cnn", "vit": folder / "vit"}
    steps: list[dict] = []
    started = time.perf_counter()

    def step(label: str, func: Callable[[], Any], needs: Any = True) -> Any:
        console.rule(f"[bold]{len(steps) + 1}. {label}")
        if needs is None:  # TEMPORARY while the stages land: a missing stage is skipped, visibly
            steps.append({"step": label, "seconds": 0.0, "status": "stage not installed yet"})
            console.print(f"[yellow]skipped[/] {label}: stage not installed yet")
            return None
        t0 = time.perf_counter()
        value = func()
        seconds = time.perf_counter() - t0
        steps.append({"step": label, "seconds": round(seconds, 2), "status": "done"})
        console.print(f"[green]✓[/] {label} [dim]({seconds:.1f} s)[/]")
        return value

    import importlib

    def stage(name):  # TEMPORARY while the stages land
        try:
            return importlib.import_module(f"digitlens.{name}")
        except ImportError:
            return None

    train, evaluate, explain, subspace, adapt = (stage(n) for n in ("train", "evaluate", "explain", "subspace", "adapt"))
    from digitlens.report import write_report

    for name in ("cnn", "vit"):
        kwargs = dict(settings["train"][name])
        step(f"Train the {name.upper()} on {dataset}",
             lambda: train.train(runs[name], dataset=dataset, model=name, data_dir=data_dir, progress=progress, **kwargs), train)
        step(f"Evaluate the {name.upper()}",
             lambda: evaluate.evaluate_run(runs[name], data_dir=data_dir, progress=progress),
             evaluate if (runs[name] / "config.json").is_file() else None)
    explain_kwargs = dict(settings["explain"])
    step("Explain the CNN (per-digit maps, overlays, filters, faithfulness)",
         lambda: explain.explain_run(runs["cnn"], data_dir=data_dir, progress=progress, **explain_kwargs),
         explain if (runs["cnn"] / "predictions.npz").is_file() else None)
    step("Explain the ViT, side by side with the CNN",
         lambda: explain.explain_run(runs["vit"], data_dir=data_dir, progress=progress, compare=runs["cnn"],
                                     **explain_kwargs),
         explain if (runs["vit"] / "predictions.npz").is_file() else None)
    adapt_kwargs = dict(settings["adapt"])
    ranks = ", ".join(map(str, adapt_kwargs["ranks"]))
    step(f"LoRA study on the ViT (r = {ranks})",
         lambda: adapt.adapt_run(runs["vit"], data_dir=data_dir, progress=progress, **adapt_kwargs),
         adapt if (runs["vit"] / "model.safetensors").is_file() else None)
    step("Subspace analysis of the adapters",
         lambda: subspace.analyse_run(runs["vit"], task=adapt_kwargs["task"]),
         subspace if (runs["vit"] / "adapt").is_dir() else None)
    reports = []
    have = {k: (v / "config.json").is_file() for k, v in runs.items()}
    reports.append(step("Write the ViT report", lambda: write_report(runs["vit"]), True if have["vit"] else None))
    reports.insert(0, step("Write the CNN report, ViT side by side", lambda: write_report(runs["cnn"], compare=runs["vit"]),
                           True if all(have.values()) else None))
    reports = [r for r in reports if r is not None]

    result = {"dataset": dataset, "fast": fast, "runs": {k: str(v) for k, v in runs.items()},
              "reports": [str(r) for r in reports], "steps": steps,
              "seconds": round(time.perf_counter() - started, 2), "summary": _summary(runs)}
    write_json(folder / MARKER, result)
    _print_summary(console, result)
    return result
