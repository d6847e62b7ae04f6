"""The subspace stage: what LoRA adapters changed in a model's weights, written to a folder.

- ``analyse_adapters(base, [adapter dirs], out_dir)``: any PEFT LoRA adapters against their base
  weights (modules matched to base weights by name).
- ``analyse_run(run_dir, task)``: the LoRA study of a digitlens run's adapters
  (``runs/BASE/adapt/TASK/r{rank}_s{seed}``), written to ``runs/BASE/subspace/TASK/``.

Each replaces its output folder as a whole (:func:`digitlens.runio.staged_dir`: a kill leaves the
old folder or the new one, never a mix). The folder holds ``subspace.json`` (every number; keys in
:data:`SUBSPACE_JSON_KEYS`), ``summary.md`` (the same as tables), ``figures/*.png`` + ``.svg`` and
``figures.json``, the figure manifest (:class:`digitlens.figure_writer.FigureWriter`; section
``lora``, kinds ``subspace_paper_figure``, ``phi_w_vs_a``, ``phi_rank_vs_rank``,
``phi_seed_vs_seed``, ``amplification``, ``spectrum``). The measures themselves are in
:mod:`digitlens.subspace.measures`, the reading of adapters in :mod:`digitlens.subspace.adapters`.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.figure_writer import FigureWriter
from digitlens.plots import subspace as subspace_plots  # the module, not its names: see the note in __init__
from digitlens.pyplot import pyplot
from digitlens.runio import has_content, read_json, require_run_dir, staged_dir, write_json, write_text, writes_folders
from digitlens.subspace.adapters import LoraAdapter, LoraModule, load_base_weights, match_base_weight, read_lora_adapter
from digitlens.subspace.measures import (ALPHA, NULL_DRAWS, PAPER_TABLE7_WQ, PROJECTION_DRAWS, amplification,
                                         effective_rank, intruder_dimensions, phi_matrix, phi_summary,
                                         right_singular_vectors, svd)

STAGE = "subspace"
SECTION = "lora"
_QUERY_NAMES = ("q", "q_proj", "query", "wq")

#: The keys of ``subspace.json`` (one per output folder) and what they hold. A phi entry ("phi
#: summary") has ``dim``, ``shape``, ``k``, ``phi_1_1`` / ``phi_k_k`` / ``phi_mean`` (raw),
#: ``chance_*`` (E[phi] = max(i, j) / d), ``corrected_*`` ((phi - E) / (1 - E), None where
#: undefined) and the Monte-Carlo test ``null_draws``, ``null_mean_*``, ``null_q95_*``, ``p_*``,
#: ``above_chance_*`` (p < alpha) at (1, 1) and (k, k). An "aggregate" is the mean of such entries
#: over modules: ``n_modules``, ``phi_*_mean``, ``chance_*_mean``, ``corrected_*_mean``,
#: ``above_chance_*`` (how many modules), ``p_*_median``.
SUBSPACE_JSON_KEYS = {
    "task": "the adapt task analysed (analyse_run only)",
    "base": "the base weights (relative to the run folder for analyse_run)",
    "adapters": "the adapter folders analysed per module (relative to the run folder for analyse_run)",
    "labels": "one label per adapter (its folder name, e.g. r4_s0)",
    "ranks": "the rank of each adapter, in the order of labels",
    "seeds": "analyse_run: every seed of the study",
    "seed_for_ranks": "analyse_run: the seed whose adapters (one per rank) 'modules' describes",
    "alpha": "significance level of every above-chance verdict",
    "null_draws": "Monte-Carlo draws of the phi null",
    "projection_draws": "Monte-Carlo draws of the projection null (amplification)",
    "chance_note": "one sentence on chance levels and the test",
    "modules": "per adapted module: module, shape, d_in, adapters (per adapter: adapter, rank, scale, "
               "singular_values, effective_rank, amplification (measures.amplification), intruders, phi_W_A "
               "(phi summary of W's vs A's right-singular directions)), phi_W_random (phi summary for a random "
               "Gaussian A), phi_between (first adapter vs each other one)",
    "phi_W_A_by_target": "per target (q, v, ...) and adapter: aggregate of phi_W_A over its modules, plus "
                         "adapter 'random' (the random Gaussian A)",
    "by_adapter": "per adapter: rank, n_modules, effective_rank_mean, amplification_mean (finite values), "
                  "amplification_above_chance (modules whose dW directions carry more of W than random ones)",
    "comparisons": "analyse_run: phi between two adapters per module: id (the figure's name), kind "
                   "(ranks or seeds), title, ranks, seeds, modules (phi summaries), aggregate, figures",
    "full_finetuning_intruders": "analyse_run: intruder dimensions of full fine-tuning per module",
    "amplification_by_rank": "analyse_run: per target and rank, the amplification factor over seeds "
                             "(per_seed, mean, std, min, max, random_mean, above_chance / n_tests, paper)",
    "figures": "the PNG files written, relative to the folder (figures.json describes each)",
    "markdown": "summary.md's text",
}


# --------------------------------------------------------------------------------------------
# The two entry points
# --------------------------------------------------------------------------------------------

def analyse_adapters(base_path, adapter_dirs, out_dir, *, random_seed: int = 0, intruder_top_k: int = 10,
                     intruder_threshold: float = 0.5, modules: list[str] | None = None,
                     progress: bool = False, base_weights: dict | None = None, figures: bool = True,
                     device=None) -> dict:
    """Analyse PEFT LoRA adapters of any model against its base weights; write ``out_dir`` whole.

    ``adapter_dirs``: one or more adapter folders (all adapting the same base). For every adapted
    module of the first adapter: singular-value spectrum and effective rank of dW, amplification
    (Table 7), intruder dimensions of W + dW, and phi(W, A_k) for each adapter k plus a random
    Gaussian A (the seed-003 four-panel figure). With two or more adapters, phi(A_1, A_k) per
    module. ``out_dir`` must be new, empty or an earlier subspace output: it is replaced by
    ``subspace.json``, ``summary.md`` and (with ``figures``) ``figures/`` + ``figures.json``.
    Returns the summary dict (the content of subspace.json). ``device``: where the SVDs run.
    """
    out_dir = Path(out_dir)
    adapter_dirs = [Path(p) for p in adapter_dirs]
    if not adapter_dirs:
        raise DigitlensError("--adapter: give at least one adapter folder")
    _prepare_foreign_output(out_dir)
    base = base_weights if base_weights is not None else load_base_weights(base_path)
    adapters = [read_lora_adapter(p) for p in adapter_dirs]
    names = _module_names(adapters, modules)
    analysis = _analyse_modules(base, str(base_path), adapters, names, random_seed=random_seed,
                                intruder_top_k=intruder_top_k, intruder_threshold=intruder_threshold,
                                progress=progress, device=device)
    summary = {"base": str(base_path), "adapters": [str(p) for p in adapter_dirs], **analysis["summary"]}
    summary["markdown"] = summary_markdown(summary)
    _write_output(out_dir, summary, (lambda writer: _draw_module_figures(writer, summary, analysis, {}))
                  if figures else None)
    return summary


def analyse_run(run_dir, task: str = "groups", *, out_dir=None, seed_for_ranks: int | None = None,
                figures: bool = True, progress: bool = False, random_seed: int = 0, intruder_top_k: int = 10,
                intruder_threshold: float = 0.5, modules: list[str] | None = None, device=None) -> dict:
    """The LoRA study of a digitlens run's adapters (``runs/BASE/adapt/TASK/``): everything of
    :func:`analyse_adapters` for the ranks of one seed (phi(W_q, A_r) for every r plus a random
    A: the seed-003 figure), phi(A_r, A_r') between the smallest-but-one and the largest rank
    (paper figure 3, r = 8 vs 64 by default), phi between two seeds at the same rank (figure 4),
    the amplification factor over seeds, and intruder dimensions of full fine-tuning as a
    reference. Replaces ``runs/BASE/subspace/TASK/`` (or ``out_dir``) as a whole; returns the
    summary dict (the content of its subspace.json). Every adapter is read once."""
    run_dir = require_run_dir(run_dir)
    adapt_dir = run_dir / "adapt" / task
    if not (adapt_dir / "results.json").is_file():
        raise DigitlensError(f"{adapt_dir}: no results.json (run `digitlens adapt {run_dir} --task {task}` first)")
    results = read_json(adapt_dir / "results.json")
    own = run_dir / "subspace" / task
    out_dir = own if out_dir is None else Path(out_dir)
    if out_dir.resolve() != own.resolve():
        _prepare_foreign_output(out_dir)
    lora_rows = [r for r in results["rows"] if r["method"] == "lora"]
    ranks = sorted({r["rank"] for r in lora_rows})
    seeds = sorted({r["seed"] for r in lora_rows})
    if not ranks:
        raise DigitlensError(f"{adapt_dir / 'results.json'}: lists no LoRA adapters")
    seed = seeds[0] if seed_for_ranks is None else seed_for_ranks
    dirs = {(r["rank"], r["seed"]): run_dir / r["adapter_dir"] for r in lora_rows}
    for path in dirs.values():
        if not path.is_dir():
            raise DigitlensError(f"{path}: adapter folder listed in {adapt_dir / 'results.json'} is missing")
    missing = [r for r in ranks if (r, seed) not in dirs]
    if missing:
        raise DigitlensError(f"seed {seed}: no adapter of rank {missing[0]} in {adapt_dir / 'results.json'} "
                             f"(seeds {', '.join(map(str, seeds))})")
    base_path = run_dir / "model.safetensors"
    base = load_base_weights(base_path)
    adapters = {key: read_lora_adapter(path) for key, path in dirs.items()}
    by_rank = [adapters[(r, seed)] for r in ranks]
    names = _module_names(by_rank + [a for key, a in adapters.items() if key[1] != seed], modules)
    analysis = _analyse_modules(base, str(base_path), by_rank, names, random_seed=random_seed,
                                intruder_top_k=intruder_top_k, intruder_threshold=intruder_threshold,
                                progress=progress, device=device)
    summary = {"task": task, "base": base_path.relative_to(run_dir).as_posix(),
               "adapters": [dirs[(r, seed)].relative_to(run_dir).as_posix() for r in ranks],
               **analysis["summary"]}
    summary["seeds"] = seeds
    summary["seed_for_ranks"] = seed
    summary["comparisons"], grids = _comparisons(adapters, ranks, seeds, seed, names, device)
    full = [r for r in results["rows"] if r["method"] == "full" and r.get("adapter_dir")]
    if full:
        full_weights = load_base_weights(run_dir / full[0]["adapter_dir"] / "model.safetensors")
        summary["full_finetuning_intruders"] = [
            {"module": name, **intruder_dimensions(base[f"{name}.weight"], full_weights[f"{name}.weight"],
                                                   intruder_top_k, intruder_threshold, device=device)}
            for name in names if f"{name}.weight" in full_weights]
    summary["amplification_by_rank"] = amplification_over_seeds(base, adapters, names, device=device)
    summary["markdown"] = summary_markdown(summary) + _comparisons_markdown(summary) + amplification_markdown(summary)
    shows = {"task": task, "seeds": [seed]}

    def draw(writer: FigureWriter) -> list[str]:
        written = _draw_module_figures(writer, summary, analysis, shows)
        for comparison in summary["comparisons"]:
            comparison["figures"] = _draw_comparison(writer, comparison, grids[comparison["id"]], task)
            written += comparison["figures"]
        return written

    _write_output(out_dir, summary, draw if figures else None)
    return summary


# One writer per folder (issue 14): the run folder, or the --out folder of an analysis outside it.
analyse_run = writes_folders(STAGE, lambda run_dir, *args, out_dir=None, **kwargs: [
    (run_dir, "run"), (out_dir, "out") if out_dir is not None else None])(analyse_run)
analyse_adapters = writes_folders(
    STAGE, lambda base_path, adapter_dirs, out_dir, *args, **kwargs: [(out_dir, "out")])(analyse_adapters)


# --------------------------------------------------------------------------------------------
# The analysis (no files written here)
# --------------------------------------------------------------------------------------------

def _module_names(adapters: list[LoraAdapter], modules: list[str] | None) -> list[str]:
    """The modules to analyse: ``modules`` (checked) or every module of the first adapter; each must
    be in every adapter (one-line error naming the folder otherwise)."""
    names = list(adapters[0].modules)
    if modules:
        missing = [m for m in modules if m not in adapters[0].modules]
        if missing:
            raise DigitlensError(f"--module {missing[0]!r}: not in {adapters[0].path} "
                                 f"(has {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
        names = list(modules)
    for adapter in adapters[1:]:
        absent = [n for n in names if n not in adapter.modules]
        if absent:
            raise DigitlensError(f"{adapter.path}: has no module {absent[0]!r} that {adapters[0].path} adapts")
    return names


def _analyse_modules(base: dict, base_label: str, adapters: list[LoraAdapter], names: list[str], *,
                     random_seed: int, intruder_top_k: int, intruder_threshold: float, progress: bool,
                     device) -> dict:
    """Every per-module measure for ``adapters`` (one per rank or folder): ``{"summary": the
    subspace.json keys labels .. by_adapter, "panels": {module: [phi(W, A_k)..., phi(W, A_rand)]},
    "dims": {module: d_in}}``."""
    labels = _unique_labels(adapters)
    rng = np.random.default_rng(random_seed)
    module_results, panels = [], {}
    for name in names:
        if progress:
            print(f"subspace: {name}", flush=True)
        weight = match_base_weight(base, adapters[0].modules[name], base_label)
        for adapter in adapters[1:]:
            match_base_weight(base, adapter.modules[name], base_label)
        result, panels[name] = _analyse_module(name, weight, [a.modules[name] for a in adapters], labels, rng,
                                               intruder_top_k, intruder_threshold, device)
        module_results.append(result)
    summary = {
        "labels": labels,
        "ranks": [a.modules[names[0]].rank for a in adapters],
        "alpha": ALPHA,
        "null_draws": NULL_DRAWS,
        "projection_draws": PROJECTION_DRAWS,
        "chance_note": ("for random subspaces E[phi(i, j)] = max(i, j) / d; corrected = (phi - E) / (1 - E); "
                        f"above chance: phi larger than for random subspaces of the same shapes (Monte-Carlo null, "
                        f"{NULL_DRAWS} draws, one-sided p < {ALPHA}, not corrected for the number of modules)"),
        "modules": module_results,
        "phi_W_A_by_target": _phi_w_by_target(module_results, labels),
        "by_adapter": _by_adapter(module_results, labels),
    }
    return {"summary": summary, "panels": panels, "dims": {m["module"]: m["d_in"] for m in module_results}}


def _unique_labels(adapters: list[LoraAdapter]) -> list[str]:
    labels = [a.label for a in adapters]
    if len(set(labels)) != len(labels):
        labels = [f"{i + 1}:{a.path.parent.name}/{a.label}" for i, a in enumerate(adapters)]
    return labels


def _analyse_module(name, weight, lora_modules: list[LoraModule], labels, rng, top_k, threshold, device=None):
    """All measures for one module: (JSON-ready dict, list of phi(W, A_k) arrays + the random one)."""
    d_in = weight.shape[1]
    w_rows = right_singular_vectors(weight, device)
    per_adapter = []
    phis_w = []
    for label, module in zip(labels, lora_modules):
        delta = module.delta
        s = svd(delta, compute_uv=False, device=device)
        phi_w = phi_matrix(w_rows, right_singular_vectors(module.lora_a, device))
        phis_w.append(phi_w)
        per_adapter.append({
            "adapter": label,
            "rank": module.rank,
            "scale": module.scale,
            "singular_values": s[: max(module.rank, 1)].tolist(),
            "effective_rank": effective_rank(s[: module.rank]),
            "amplification": amplification(weight, delta, rank=module.rank,
                                           seed=int(rng.integers(2 ** 31)), device=device),
            "intruders": intruder_dimensions(weight, weight + delta, top_k=top_k, threshold=threshold, device=device),
            "phi_W_A": phi_summary(phi_w, d_in),
        })
    random_rank = max(m.rank for m in lora_modules)
    random_a = rng.standard_normal((random_rank, d_in))
    phi_random = phi_matrix(w_rows, right_singular_vectors(random_a, device))
    result = {"module": name, "shape": list(weight.shape), "d_in": int(d_in), "adapters": per_adapter,
              "phi_W_random": phi_summary(phi_random, d_in)}
    if len(lora_modules) > 1:
        first = right_singular_vectors(lora_modules[0].lora_a, device)
        result["phi_between"] = [
            {"a": labels[0], "b": labels[k], **phi_summary(phi_matrix(first, right_singular_vectors(m.lora_a, device)), d_in)}
            for k, m in enumerate(lora_modules[1:], start=1)
        ]
    return result, phis_w + [phi_random]




def aggregate_phi(entries: list[dict]) -> dict:
    """The mean of phi summaries over modules: ``n_modules``; per position (``1_1``, ``k_k``) the mean
    raw phi, chance and chance-corrected phi (None when every corrected value is), and, when the
    entries carry the Monte-Carlo test, how many modules are above chance and the median p."""
    out: dict = {"n_modules": len(entries)}
    for label in ("1_1", "k_k"):
        out[f"phi_{label}_mean"] = float(np.mean([e[f"phi_{label}"] for e in entries]))
        out[f"chance_{label}_mean"] = float(np.mean([e[f"chance_{label}"] for e in entries]))
        corrected = [e[f"corrected_{label}"] for e in entries if e.get(f"corrected_{label}") is not None]
        out[f"corrected_{label}_mean"] = float(np.mean(corrected)) if corrected else None
        tested = [e for e in entries if f"p_{label}" in e]
        if tested:
            out[f"above_chance_{label}"] = sum(bool(e[f"above_chance_{label}"]) for e in tested)
            out[f"p_{label}_median"] = float(np.median([e[f"p_{label}"] for e in tested]))
    return out


def _target_of(name: str) -> str:
    """A module's target: the last part of its name (q, v, q_proj, ...)."""
    return name.rpartition(".")[2]


def _phi_w_by_target(module_results: list[dict], labels: list[str]) -> list[dict]:
    """phi(W, A) aggregated over the modules of each target, per adapter and for the random A."""
    targets: dict[str, list[dict]] = {}
    for mod in module_results:
        targets.setdefault(_target_of(mod["module"]), []).append(mod)
    out = []
    for target, mods in targets.items():
        names = [m["module"] for m in mods]
        for k, label in enumerate(labels):
            out.append({"target": target, "adapter": label, "rank": mods[0]["adapters"][k]["rank"], "modules": names,
                        **aggregate_phi([m["adapters"][k]["phi_W_A"] for m in mods])})
        out.append({"target": target, "adapter": "random", "rank": mods[0]["phi_W_random"]["shape"][1],
                    "modules": names, **aggregate_phi([m["phi_W_random"] for m in mods])})
    return out


def _by_adapter(module_results: list[dict], labels: list[str]) -> list[dict]:
    """Per adapter, over its modules: mean effective rank, mean (finite) amplification factor and
    how many modules' dW directions carry more of W than random ones."""
    out = []
    for k, label in enumerate(labels):
        entries = [m["adapters"][k] for m in module_results]
        factors = [e["amplification"]["amplification"] for e in entries]
        factors = [f for f in factors if np.isfinite(f)]
        tested = [e["amplification"] for e in entries if "above_chance" in e["amplification"]]
        out.append({"adapter": label, "rank": entries[0]["rank"], "n_modules": len(entries),
                    "effective_rank_mean": float(np.mean([e["effective_rank"] for e in entries])),
                    "amplification_mean": float(np.mean(factors)) if factors else None,
                    "amplification_above_chance": sum(bool(a["above_chance"]) for a in tested) if tested else None})
    return out


def _comparisons(adapters: dict, ranks: list[int], seeds: list[int], seed: int, names: list[str],
                 device) -> tuple[list[dict], dict]:
    """phi between the A matrices of two adapters per module: the smallest-but-one against the
    largest rank at ``seed`` (paper figure 3) and, with two or more seeds, the first two seeds at
    each rank (figure 4). Returns (the subspace.json entries, {id: {module: phi grid}})."""
    pairs = []
    if len(ranks) >= 2:
        small = ranks[-2] if len(ranks) > 2 else ranks[0]
        pairs.append(("ranks", f"phi(A_r={small}, A_r={ranks[-1]}), seed {seed}", (small, seed), (ranks[-1], seed),
                      f"rank{small}_vs_rank{ranks[-1]}"))
    if len(seeds) >= 2:
        for rank in ranks:
            pairs.append(("seeds", f"phi(A_r={rank} seed {seeds[0]}, A_r={rank} seed {seeds[1]})",
                          (rank, seeds[0]), (rank, seeds[1]), f"seed{seeds[0]}_vs_seed{seeds[1]}_rank{rank}"))
    entries, grids = [], {}
    for kind, title, first_key, second_key, ident in pairs:
        first, second = adapters[first_key], adapters[second_key]
        grids[ident] = {}
        entry = {"id": ident, "kind": kind, "title": title, "ranks": [first_key[0], second_key[0]],
                 "seeds": [first_key[1], second_key[1]], "modules": []}
        for name in names:
            grid = phi_matrix(right_singular_vectors(first.modules[name].lora_a, device),
                              right_singular_vectors(second.modules[name].lora_a, device))
            grids[ident][name] = grid
            entry["modules"].append({"module": name, **phi_summary(grid, first.modules[name].lora_a.shape[1])})
        entry["aggregate"] = aggregate_phi(entry["modules"])
        entries.append(entry)
    return entries, grids


def amplification_over_seeds(base: dict, adapters: dict, names: list[str], device=None) -> list[dict]:
    """The amplification factor per target (last part of the module name: q, v, ...) and rank with
    its spread over seeds: for each seed the mean over the target's modules, then ``mean``, ``std``
    (ddof 1; 0 for one seed), ``min``, ``max`` over seeds; ``random_mean`` (the factor of random
    directions, mean over modules and seeds), ``above_chance`` / ``n_tests`` (module-seed pairs whose
    ΔW directions carry more of W than random ones, p < ALPHA) and ``paper`` (GPT-3 W_q, Table 7,
    for query targets at r = 4 and 64; else None). ``adapters``: {(rank, seed): LoraAdapter}."""
    targets: dict[str, list[str]] = {}
    for name in names:
        targets.setdefault(name.rpartition(".")[2], []).append(name)
    out = []
    for target, members in targets.items():
        for rank in sorted({r for r, _ in adapters}):
            seeds = sorted(s for r, s in adapters if r == rank)
            per_seed, random_factors, above = [], [], 0
            for seed in seeds:
                factors = []
                for name in members:
                    module = adapters[(rank, seed)].modules[name]
                    amp = amplification(match_base_weight(base, module), module.delta, rank=module.rank, device=device)
                    factors.append(amp["amplification"])
                    random_factors.append(amp["amplification_random_mean"])
                    above += int(amp["above_chance"])
                per_seed.append(float(np.mean(factors)))
            values = np.array(per_seed)
            out.append({"target": target, "rank": int(rank), "seeds": seeds, "per_seed": per_seed,
                        "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        "min": float(values.min()), "max": float(values.max()),
                        "random_mean": float(np.mean(random_factors)), "above_chance": above,
                        "n_tests": len(seeds) * len(members),
                        "paper": PAPER_TABLE7_WQ.get(int(rank)) if target.lower() in _QUERY_NAMES else None})
    return out



# --------------------------------------------------------------------------------------------
# Figures (drawn by digitlens.plots.subspace, saved here with the stage's FigureWriter)
# --------------------------------------------------------------------------------------------

def _target_groups(names: list[str], max_layers: int) -> dict[str, list[str]]:
    """Modules grouped by their last name part (q, v, q_proj, ...), at most ``max_layers`` evenly
    spaced modules per group (first and last included)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[2], []).append(name)
    for target, members in groups.items():
        if len(members) > max_layers:
            keep = np.unique(np.linspace(0, len(members) - 1, max_layers).round().astype(int))
            groups[target] = [members[k] for k in keep]
    return groups




def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)  # no dots: a figure name must not look like a suffix


def _save_pair(writer: FigureWriter, displays, name: str, caption: str, **shows) -> list[str]:
    """Save a (raw, chance-corrected) pair of phi displays as ``name`` and ``name_corrected``;
    return the two PNG paths relative to the writer's folder."""
    plt = pyplot()
    written = []
    for display, suffix, corrected, what in zip(displays, ("", "_corrected"), (False, True),
                                                 ("raw phi", "chance-corrected phi, 0 = chance")):
        writer.save(display.figure_, f"{name}{suffix}", section=SECTION, title=f"{caption} ({what})",
                    corrected=corrected, **shows)
        plt.close(display.figure_)
        written.append(f"{name}{suffix}.png")
    return written


def _draw_module_figures(writer: FigureWriter, summary: dict, analysis: dict, shows: dict,
                         max_layers: int = 6) -> list[str]:
    """phi(W, A_k, i, j) figures (one per target: rows are layers, columns the adapters + a random
    A), the seed-003 four-panel figure (the last layer of the first target named like a query),
    the spectra of dW and the amplification table. Returns the PNG paths, relative."""
    panels, dims = analysis["panels"], analysis["dims"]
    labels, ranks = summary["labels"], summary["ranks"]
    titles = [f"{label} (r={rank})" for label, rank in zip(labels, ranks)]
    shows = {**shows, "ranks": ranks, "adapters": labels}
    groups = _target_groups(list(panels), max_layers)
    written = []
    for target, members in groups.items():
        by_dim = {dims[m] for m in members}
        if len(by_dim) != 1:  # rectangular layers of different widths: one figure per module
            for m in members:
                written += _save_pair(writer, subspace_plots.phi_w_panel_displays([m], [panels[m]], titles, dims[m]),
                                      f"figures/phi_W_vs_A__{_safe(m)}", f"phi(W, A_r), {m}", kind="phi_w_vs_a",
                                      module=m, target=target, **shows)
            continue
        written += _save_pair(writer, subspace_plots.phi_w_panel_displays(members, [panels[m] for m in members],
                                                                          titles, by_dim.pop()),
                              f"figures/phi_W_vs_A__{_safe(target)}",
                              f"phi(W, A_r) per layer, target {target} ({', '.join(members)})", kind="phi_w_vs_a",
                              modules=members, target=target, **shows)
    query = next((t for t in groups if t.lower() in _QUERY_NAMES), next(iter(groups)))
    seed_module = groups[query][-1]
    written += _save_pair(writer, subspace_plots.phi_w_panel_displays([seed_module], [panels[seed_module]], titles,
                                                                      dims[seed_module]),
                          "figures/phi_W_vs_A_seed003",
                          f"The LoRA paper's seed-003 figure: phi(W, A_r) of {seed_module} for r = "
                          f"{', '.join(map(str, ranks))} and a random Gaussian A", kind="subspace_paper_figure",
                          module=seed_module, target=query, **shows)
    module_names = [m["module"] for m in summary["modules"]]
    plt = pyplot()
    for figure, name, kind, caption in (
            (subspace_plots.plot_spectra(summary["modules"]), "figures/dW_spectra", "spectrum",
             "Singular values of the LoRA update dW per adapter and module (log scale), effective rank in the legend"),
            (subspace_plots.plot_amplification_table(summary["modules"]), "figures/amplification", "amplification",
             "Amplification factor ||dW||_F / ||U^T W V^T||_F per module and adapter (the LoRA paper's Table 7)")):
        writer.save(figure, name, kind=kind, section=SECTION, title=caption, modules=module_names, **shows)
        plt.close(figure)
        written.append(f"{name}.png")
    return written


def _draw_comparison(writer: FigureWriter, comparison: dict, grid: dict[str, np.ndarray], task: str) -> list[str]:
    """phi heatmaps of one comparison with one row per target and one column per layer, raw and
    chance-corrected. Returns the PNG paths, relative."""
    targets, layers = [], []
    for name in grid:
        layer, _, target = name.rpartition(".")
        if target not in targets:
            targets.append(target)
        if layer not in layers:
            layers.append(layer)
    phis = [[grid.get(f"{layer}.{target}") for layer in layers] for target in targets]
    titles = [[f"{layer}.{target}" for layer in layers] for target in targets]
    dim = comparison["modules"][0]["dim"]
    displays = subspace_plots.phi_pair_displays(phis, titles, dim, row_labels=targets, title=comparison["title"])
    kind = "phi_rank_vs_rank" if comparison["kind"] == "ranks" else "phi_seed_vs_seed"
    rank_shows = ({"ranks": comparison["ranks"], "seed": comparison["seeds"][0]} if comparison["kind"] == "ranks"
                  else {"rank": comparison["ranks"][0], "seeds": comparison["seeds"]})
    return _save_pair(writer, displays, f"figures/phi_{comparison['id']}", comparison["title"], kind=kind,
                      comparison=comparison["id"], modules=list(grid), task=task, **rank_shows)


# --------------------------------------------------------------------------------------------
# Writing the output folder
# --------------------------------------------------------------------------------------------

def _prepare_foreign_output(out_dir: Path) -> None:
    """Before analysing into a folder that is not a run's own ``subspace/TASK``: put back or drop
    what a killed analysis left beside it (inside a run the run lock's clean-up does this), and
    refuse a folder holding anything but an earlier subspace output (it is replaced as a whole)."""
    pattern = f".{glob.escape(out_dir.name)}.*"
    for old in sorted(out_dir.parent.glob(pattern + ".old")):
        if old.is_dir() and not has_content(out_dir):  # killed between the two renames: the old output
            out_dir.mkdir(parents=True, exist_ok=True)
            for child in old.iterdir():
                os.replace(child, out_dir / child.name)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in out_dir.parent.glob(pattern + ".tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
    if has_content(out_dir) and not (out_dir / "subspace.json").is_file():
        raise DigitlensError(f"--out {out_dir}: holds files that are not a subspace analysis (no subspace.json); "
                             "give a new or empty folder (the analysis replaces the folder as a whole)")


def _write_output(out_dir: Path, summary: dict, draw) -> None:
    """Write the folder whole in a temporary sibling and swap it in (``staged_dir``): figures
    (``draw(writer)`` returns their relative PNG paths) with ``figures.json``, then ``summary.md``
    and ``subspace.json``."""
    with staged_dir(out_dir) as folder:
        with FigureWriter(folder, STAGE) as writer:
            summary["figures"] = draw(writer) if draw is not None else []
        write_text(folder / "summary.md", summary["markdown"])
        write_json(folder / "subspace.json", summary)


# --------------------------------------------------------------------------------------------
# Markdown tables
# --------------------------------------------------------------------------------------------

def _verdict_cell(entry: dict, label: str) -> str:
    """'yes (p = 0.001)' / 'no (p = 0.3)' for phi at ``label`` ('1_1' or 'k_k'); '' without a test."""
    if f"p_{label}" not in entry:
        return ""
    return f"{'yes' if entry[f'above_chance_{label}'] else 'no'} (p = {entry[f'p_{label}']:.2g})"


def _amplification_verdict(amp: dict) -> str:
    """'yes (p = ...)' when ΔW's top directions carry more of W than random ones; '' without a test."""
    if "p_proj_dW" not in amp:
        return ""
    return f"{'yes' if amp['above_chance'] else 'no'} (p = {amp['p_proj_dW']:.2g})"


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_markdown(summary: dict) -> str:
    """Markdown tables of a summary: per module and adapter, phi(W, A) at (k, k) raw / chance /
    corrected, amplification (Table 7), effective rank and intruder count."""
    lines = ["| module | adapter | r | phi(W,A) k,k | chance | corrected | above chance | ||dW||_F | ||U^T W V^T|| dW "
             "| W dirs | random | amplification | dW dirs in W above chance | eff. rank | intruders |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mod in summary["modules"]:
        for ad in mod["adapters"]:
            p, amp = ad["phi_W_A"], ad["amplification"]
            lines.append(
                f"| {mod['module']} | {ad['adapter']} | {ad['rank']} | {_fmt(p['phi_k_k'])} | {_fmt(p['chance_k_k'])} "
                f"| {_fmt(p['corrected_k_k'])} | {_verdict_cell(p, 'k_k')} | {_fmt(amp['norm_dW'])} | {_fmt(amp['proj_dW'])} "
                f"| {_fmt(amp['proj_W'])} | {_fmt(amp.get('proj_random_mean', amp['proj_random']))} "
                f"| {amp['amplification']:.3g} "
                f"| {_amplification_verdict(amp)} "
                f"| {_fmt(ad['effective_rank'], 2)} "
                f"| {ad['intruders']['count']}/{ad['intruders']['top_k']} |")
        p = mod["phi_W_random"]
        lines.append(f"| {mod['module']} | random Gaussian A | {p['shape'][1]} | {_fmt(p['phi_k_k'])} | "
                     f"{_fmt(p['chance_k_k'])} | {_fmt(p['corrected_k_k'])} | {_verdict_cell(p, 'k_k')} | | | | | | | | |")
    between = [(m["module"], b) for m in summary["modules"] for b in m.get("phi_between", [])]
    if between:
        lines += ["", "| module | phi(A_a, A_b) | i=j=1 | chance | corrected | above chance | i=j=k | chance | corrected "
                  "| above chance |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, b in between:
            lines.append(f"| {name} | {b['a']} vs {b['b']} | {_fmt(b['phi_1_1'])} | {_fmt(b['chance_1_1'])} | "
                         f"{_fmt(b['corrected_1_1'])} | {_verdict_cell(b, '1_1')} | {_fmt(b['phi_k_k'])} (k={b['k']}) "
                         f"| {_fmt(b['chance_k_k'])} | {_fmt(b['corrected_k_k'])} | {_verdict_cell(b, 'k_k')} |")
    lines += ["", summary.get("chance_note", ""), ""]
    return "\n".join(lines)



def amplification_markdown(summary: dict) -> str:
    """The amplification factor per target and rank, mean ± std over seeds, beside the paper's."""
    rows = summary.get("amplification_by_rank") or []
    if not rows:
        return ""
    lines = ["### Amplification factor over seeds (paper: Table 7)", "",
             "| target | r | amplification (mean ± std over seeds) | seeds | random directions | ΔW's directions in W "
             "above chance | GPT-3 W_q (paper) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['rank']} | {r['mean']:.2f} ± {r['std']:.2f} | {len(r['seeds'])} "
                     f"| {r['random_mean']:.2f} | {r['above_chance']}/{r['n_tests']} "
                     f"| {'' if r['paper'] is None else format(r['paper'], 'g')} |")
    lines += ["", f"Above chance: ||UᵀWVᵀ|| for ΔW's top-r directions larger than for random directions "
                  f"(Monte-Carlo, {PROJECTION_DRAWS} draws, p < {ALPHA}).", ""]
    return "\n".join(lines)




def _comparisons_markdown(summary: dict) -> str:
    lines = []
    for comp in summary.get("comparisons", []):
        lines += [f"### {comp['title']}", "", "| module | phi(1,1) | chance | corrected | above chance | phi(k,k) | k "
                  "| chance | corrected | above chance | mean phi | mean chance |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in comp["modules"]:
            lines.append(f"| {m['module']} | {_fmt(m['phi_1_1'])} | {_fmt(m['chance_1_1'])} | {_fmt(m['corrected_1_1'])} "
                         f"| {_verdict_cell(m, '1_1')} | {_fmt(m['phi_k_k'])} | {m['k']} | {_fmt(m['chance_k_k'])} "
                         f"| {_fmt(m['corrected_k_k'])} | {_verdict_cell(m, 'k_k')} | {_fmt(m['phi_mean'])} "
                         f"| {_fmt(m['chance_mean'])} |")
        lines.append("")
    intruders = summary.get("full_finetuning_intruders")
    if intruders:
        lines += ["### Intruder dimensions of full fine-tuning (reference for the LoRA rows above)", "",
                  "| module | intruders among top-k |", "|---|---|"]
        lines += [f"| {m['module']} | {m['count']}/{m['top_k']} |" for m in intruders]
        lines.append("")
    return "\n".join(lines)


