"""Several seeds: one training run per seed in a group folder, and the spread over seeds.

``train_seeds(out_dir, seeds, **train_kwargs)`` trains ``out_dir/seed_S/`` for each seed S (each an
ordinary run folder written by :func:`digitlens.train.train`) and writes ``out_dir/group.json``.
``summarise_group(out_dir)`` evaluates every seed run that has no ``metrics.json`` yet and writes
``out_dir/group_summary.json``: mean, standard deviation (sample, ``ddof=1``) and min-max over the
seeds of test accuracy, macro F1 and ECE, each run's accuracy with its 95% interval, and a sentence.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.evaluate import check_bootstrap, evaluate_run
from digitlens.intervals import DEFAULT_BOOTSTRAP
from digitlens.runio import read_json, write_json
from digitlens.train import train

GROUP_FILE = "group.json"
SUMMARY_FILE = "group_summary.json"
METRICS = (("accuracy", "Test accuracy"), ("macro_f1", "Macro F1"), ("ece", "ECE"))
# config.json keys that belong to one run, not to the group's shared settings.
_PER_RUN_KEYS = {"seed", "run_dir", "resumed_from_epoch"}


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a bad, empty or repeated list is a one-line error."""
    try:
        seeds = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DigitlensError(f"--seeds {text!r}: expected comma-separated integers like 0,1,2") from None
    if not seeds:
        raise DigitlensError(f"--seeds {text!r}: give at least one seed, like 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise DigitlensError(f"--seeds {text!r}: each seed only once")
    return seeds


def is_group(path: str | os.PathLike) -> bool:
    """True when ``path`` is a seed group folder (holds ``group.json``)."""
    return (Path(path) / GROUP_FILE).is_file()


def read_group(group_dir: str | os.PathLike) -> dict:
    group_dir = Path(group_dir)
    if not is_group(group_dir):
        raise DigitlensError(f"{group_dir}: not a seed group (no {GROUP_FILE}; run `digitlens train --seeds ...` first)")
    group = read_json(group_dir / GROUP_FILE)
    for key in ("seeds", "runs"):
        if key not in group:
            raise DigitlensError(f"{group_dir / GROUP_FILE}: missing key {key!r}")
    return group


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _shared_settings(run_dirs: list[Path]) -> dict:
    """The config.json values every seed run has in common (seed and per-run keys left out)."""
    configs = [read_json(d / "config.json") for d in run_dirs if (d / "config.json").is_file()]
    if not configs:
        return {}
    return {k: v for k, v in configs[0].items()
            if k not in _PER_RUN_KEYS and all(k in c and c[k] == v for c in configs[1:])}


def train_seeds(out_dir: str | os.PathLike, seeds, *, resume: bool = False, **train_kwargs) -> dict:
    """Train one run per seed into ``out_dir/seed_S/`` and write ``out_dir/group.json``.

    ``train_kwargs`` go to :func:`digitlens.train.train` unchanged (``seed`` is not allowed: it is
    each sub-run's). With ``resume=True`` each seed's sub-folder continues from its last checkpoint;
    a finished one is left as it is and one never started is trained from scratch. Returns the group
    dict (as written to ``group.json``) with ``summaries``: each run's training summary (or None
    for a finished run left alone)."""
    if "seed" in train_kwargs and train_kwargs["seed"] is not None:
        raise DigitlensError("--seed and --seeds: give one or the other")
    train_kwargs.pop("seed", None)
    seeds = parse_seeds(",".join(str(s) for s in seeds)) if not isinstance(seeds, str) else parse_seeds(seeds)
    out = Path(out_dir)
    if resume:
        if not is_group(out):
            raise DigitlensError(f"--resume --seeds: {out} holds no seed group to resume (no {GROUP_FILE})")
        stored = read_group(out)
        if list(stored["seeds"]) != seeds:
            raise DigitlensError(f"--resume: {out} was trained with --seeds "
                                 f"{','.join(map(str, stored['seeds']))}, not {','.join(map(str, seeds))}")
    elif out.is_dir() and any(out.iterdir()):
        raise DigitlensError(f"--out {out}: folder is not empty; choose a new --out folder for the seed group")
    runs = [f"seed_{s}" for s in seeds]
    requested = {k: _jsonable(v) for k, v in train_kwargs.items() if v is not None and k != "progress"}
    group = {"kind": "seed_group", "seeds": seeds, "runs": runs, "requested": requested, "settings": {}}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / GROUP_FILE, group)  # first, so a killed group can be resumed
    summaries = []
    for seed, rel in zip(seeds, runs):
        sub = out / rel
        if resume and (sub / "model.safetensors").is_file() and (sub / "train_summary.json").is_file():
            summaries.append(None)  # finished before the interruption
            continue
        started = (sub / "config.json").is_file()
        summaries.append(train(sub, seed=seed, resume=resume and started, **train_kwargs))
    group["settings"] = _shared_settings([out / rel for rel in runs])
    write_json(out / GROUP_FILE, group)
    return dict(group, group_dir=str(out), summaries=summaries)


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"values": [float(v) for v in a], "mean": float(np.mean(a)),
            "std": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0,
            "min": float(np.min(a)), "max": float(np.max(a))}


def spread_sentence(summary: dict) -> str:
    """"over 3 seeds the test accuracy is 99.35% ± 0.04 (min 99.31%, max 99.40%); ..." """
    acc = summary["metrics"]["accuracy"]
    n = len(summary["seeds"])
    text = (f"Over {n} seed{'s' if n != 1 else ''} the test accuracy is {acc['mean'] * 100:.2f}% "
            f"± {acc['std'] * 100:.2f} (min {acc['min'] * 100:.2f}%, max {acc['max'] * 100:.2f}%)")
    widths = [r["accuracy_ci"][1] - r["accuracy_ci"][0] for r in summary["runs"] if r.get("accuracy_ci")]
    if widths:
        width = float(np.mean(widths))
        span = acc["max"] - acc["min"]
        side = "smaller" if span < width else "larger"
        meaning = ("seed-to-seed variation is within one run's test-set noise" if span < width else
                   "the seed matters more than one run's interval shows; compare models by their seed means")
        text += (f"; the spread across seeds ({span * 100:.2f} points from min to max) is {side} than each run's "
                 f"95% interval ({width * 100:.2f} points wide on average): {meaning}.")
    else:
        text += "; the runs' metrics.json hold no accuracy_ci to compare the spread with."
    return text


def summarise_group(group_dir: str | os.PathLike, *, evaluate: bool = True, data_dir: str | os.PathLike | None = None,
                    progress: bool = False, bootstrap: int = DEFAULT_BOOTSTRAP, reevaluate: bool = False,
                    device=None) -> dict:
    """Mean and spread over the group's seed runs; writes and returns ``group_summary.json``.

    A seed run without ``metrics.json`` (every seed run with ``reevaluate``) is evaluated first
    (:func:`digitlens.evaluate.evaluate_run` with ``bootstrap`` resamples) when ``evaluate`` is true;
    otherwise a missing one is a one-line error."""
    bootstrap = check_bootstrap(bootstrap)
    group_dir = Path(group_dir)
    group = read_group(group_dir)
    runs = []
    for seed, rel in zip(group["seeds"], group["runs"]):
        run_dir = group_dir / rel
        metrics_path = run_dir / "metrics.json"
        if reevaluate or not metrics_path.is_file():
            if not evaluate:
                raise DigitlensError(f"{run_dir}: not evaluated (run `digitlens evaluate {run_dir}` first)")
            evaluate_run(run_dir, data_dir=data_dir, progress=progress, bootstrap=bootstrap, device=device)
        m = read_json(metrics_path)
        macro_f1 = m.get("macro", {}).get("f1") if isinstance(m.get("macro"), dict) else m.get("macro_f1")
        runs.append({"seed": seed, "run": rel, "accuracy": m.get("accuracy"), "accuracy_ci": m.get("accuracy_ci"),
                     "macro_f1": macro_f1, "ece": m.get("ece"), "n_samples": m.get("n_samples")})
    metrics = {}
    for key, _ in METRICS:
        values = [r[key] for r in runs if r[key] is not None]
        if len(values) == len(runs):
            metrics[key] = _stats(values)
    if "accuracy" not in metrics:
        raise DigitlensError(f"{group_dir}: a seed run's metrics.json has no accuracy")
    summary = {"seeds": list(group["seeds"]), "runs": runs, "metrics": metrics, "std_ddof": 1,
               "settings": group.get("settings", {})}
    summary["sentence"] = spread_sentence(summary)
    write_json(group_dir / SUMMARY_FILE, summary)
    return summary
