"""How faithful each attribution method is: deletion / insertion curves, the randomisation
sanity check and a ranked table (from ``explain_metrics.json``'s ``faithfulness`` entry)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.pyplot import pyplot
from digitlens.runio import read_json


class FaithfulnessDisplay:
    """Parameters: metrics, dict as returned by ``digitlens.explain.scoring.faithfulness_report`` (keys
    ``methods``, ``curves``, ``ranking``, optional ``randomisation``); title, default=None."""

    def __init__(self, *, metrics: dict, title=None):
        for key in ("methods", "curves", "ranking"):
            if key not in metrics:
                raise DigitlensError(f"faithfulness metrics: missing key {key!r}")
        self.metrics, self.title = metrics, title

    @classmethod
    def from_run(cls, run_dir):
        """Read ``run_dir/explain/explain_metrics.json``."""
        data = read_json(Path(run_dir) / "explain" / "explain_metrics.json")
        if "faithfulness" not in data:
            raise DigitlensError(f"{run_dir}/explain/explain_metrics.json: no faithfulness entry")
        return cls(metrics=data["faithfulness"], title=f"{Path(run_dir).name}: how faithful is each method")

    def plot(self) -> "FaithfulnessDisplay":
        """Top: ROAD curves (most- and least-relevant first, 7x7 patches removed by noisy linear
        imputation) with both random baselines, the deletion/insertion curves (patches set to 0,
        for reference) and the randomisation check; bottom: the ranked table with the verdict."""
        plt = pyplot()
        m = self.metrics
        ranking = m["ranking"]
        baselines = [b for b in ("random", "ink_random") if b in m["methods"]]
        has_road = "road_morf" in m["curves"].get(ranking[0], {}) if ranking else False
        n_rows = len(ranking) + len(baselines)
        self.figure_ = plt.figure(figsize=(18, 4.6 + 0.34 * n_rows), layout="constrained")
        top, bottom = self.figure_.subfigures(2, 1, height_ratios=[3, 1.0 + 0.34 * n_rows])
        axes = top.subplots(1, 4 if has_road else 3)
        self.axes_ = axes
        colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(ranking)}
        colours.update(random="0.45", ink_random="0.1")
        styles = {"random": "--", "ink_random": ":"}
        labels = {"random": "random patches", "ink_random": "ink patches, random order"}
        panels = []
        if has_road:
            fr = np.asarray(m.get("road_fractions") or np.linspace(0, 0.9, len(m["curves"][ranking[0]]["road_morf"])))
            panels += [("road_morf", "road_morf_auc", fr, "fraction of patches removed (most relevant first)",
                        "ROAD, most relevant first (lower AUC is better)"),
                       ("road_lerf", "road_lerf_auc", fr, "fraction of patches removed (least relevant first)",
                        "ROAD, least relevant first (higher AUC is better)")]
        panels.append(("deletion", "deletion_auc", None, "fraction of patches set to 0 (most relevant first)",
                       "Deletion to black (reference only: on MNIST\nblack is the background)" if has_road
                       else "Deletion (lower AUC is better)"))
        if not has_road:
            panels.append(("insertion", "insertion_auc", None, "fraction of patches revealed", "Insertion (higher AUC is better)"))
        for ax, (kind, auc_key, x, xlabel, title) in zip(axes, panels):
            for name in ranking + baselines:
                curve = np.asarray(m["curves"][name][kind])
                xs = x if x is not None else np.linspace(0, 1, len(curve))
                ax.plot(xs, curve, color=colours[name], ls=styles.get(name, "-"),
                        label=f"{labels.get(name, name)} (AUC {m['methods'][name][auc_key]:.3f})")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("probability of the target class")
            ax.set_title(title, fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=6.5)
            ax.grid(alpha=0.3)
        ax = axes[-1]
        if "randomisation" in m:
            layers = m["randomisation"]["layers"]
            for name in ranking:
                ax.plot(range(len(layers)), m["randomisation"]["spearman"][name], marker="o", ms=3,
                        color=colours[name], label=name)
            ax.set_xticks(range(len(layers)))
            ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
            ax.axhline(0, color="0.5", lw=0.8)
            limit = m.get("sanity_max_spearman", 0.5)
            ax.axhspan(-limit, limit, color="0.92", zorder=0, label=f"passes (|ρ| < {limit})")
            lowest = min(min(m["randomisation"]["spearman"][name]) for name in ranking)
            ax.set_ylim(min(-0.2, lowest - 0.05), 1.02)  # negative correlations stay in view
            ax.set_xlabel("re-initialised down to layer (cumulative, top first)", fontsize=8)
            ax.set_ylabel("Spearman ρ with the trained maps")
            ax.set_title("Randomisation sanity check (nearer 0 is better)", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        else:
            ax.set_visible(False)
        tab_ax = bottom.subplots()
        tab_ax.axis("off")

        def fmt(r, key, digits=3):
            return "-" if r.get(key) is None else f"{r[key]:.{digits}f}"

        def check(r, key, value_key):
            return "-" if r.get(key) is None else f"{'passes' if r[key] else 'FAILS'} ({r[value_key]:.2f})"

        if has_road:
            header = ["rank", "method", "ROAD MoRF\n(lower better)", "ROAD LeRF\n(higher better)", "ROAD score\nLeRF - MoRF",
                      "ROAD score\n(pixels)", "deletion\nto black", "randomisation\ncheck (ρ)", "random-logit\ncheck (ρ)",
                      "verdict"]
        else:
            header = ["rank", "method", "deletion AUC", "insertion AUC", "insertion -\ndeletion", "randomisation\ncheck (ρ)"]
        rows = []
        for name in ranking + baselines:
            r = m["methods"][name]
            if has_road:
                verdict = ("-" if name in baselines else "most faithful" if name == m.get("most_faithful")
                           else "eligible" if r.get("eligible") else _short_reason(r))
                if name not in baselines and r.get("beats_ink_random") is False:
                    verdict += "; MoRF no better than random ink"
                rows.append([str(r.get("rank", "-")), labels.get(name, name), fmt(r, "road_morf_auc"), fmt(r, "road_lerf_auc"),
                             fmt(r, "road_score"), fmt(r, "road_pixel_score"), fmt(r, "deletion_auc"),
                             check(r, "passes_sanity_check", "spearman_fully_randomised"),
                             check(r, "passes_random_logit", "random_logit_spearman"), verdict])
            else:
                rows.append([str(r.get("rank", "-")), labels.get(name, name), fmt(r, "deletion_auc"), fmt(r, "insertion_auc"),
                             fmt(r, "insertion_minus_deletion"), check(r, "passes_sanity_check", "spearman_fully_randomised")])
        table = tab_ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.3)
        for (row, col), cell in table.get_celld().items():
            if row == 0:
                cell.set_height(cell.get_height() * 1.8)
                cell.set_text_props(weight="bold")
            elif has_road and col == len(header) - 1 and rows[row - 1][-1] == "most faithful":
                cell.set_text_props(weight="bold")
        if has_road:
            table.auto_set_column_width(list(range(len(header))))
        self.table_ = table
        n_txt = f"{m.get('n_images', '?')} images, checks on {m.get('sanity_n_images', '?')}"
        verdict = ("\n" + textwrap.fill(f"{m['verdict'][0].upper()}{m['verdict'][1:]}.", width=160)) if m.get("verdict") else ""
        self.figure_.suptitle((self.title or "How faithful is each attribution method") + f" ({n_txt}){verdict}",
                              fontsize=11)
        return self


def _short_reason(row: dict) -> str:
    """The failed checks of a method's row in a few words, for a table cell."""
    parts = []
    if row.get("passes_sanity_check") is False:
        parts.append("follows the ink, not the model")
    if row.get("passes_random_logit") is False:
        parts.append("same map for any class")
    return "not trusted: " + "; ".join(parts) if parts else "-"
