"""How faithful each attribution method is: deletion / insertion curves, the randomisation
sanity check and a ranked table (from ``explain_metrics.json``'s ``faithfulness`` entry)."""

from __future__ import annotations

import numpy as np

from digitlens.errors import DigitlensError
from digitlens.plots._common import pyplot


class FaithfulnessDisplay:
    """Parameters: metrics, dict as returned by ``digitlens.explain.faithfulness`` (keys
    ``methods``, ``curves``, ``ranking``, optional ``randomisation``); title, default=None."""

    def __init__(self, *, metrics: dict, title=None):
        for key in ("methods", "curves", "ranking"):
            if key not in metrics:
                raise DigitlensError(f"faithfulness metrics: missing key {key!r}")
        self.metrics, self.title = metrics, title

    @classmethod
    def from_run(cls, run_dir):
        """Read ``run_dir/explain/explain_metrics.json``."""
        from pathlib import Path

        from digitlens.runio import read_json

        data = read_json(Path(run_dir) / "explain" / "explain_metrics.json")
        if "faithfulness" not in data:
            raise DigitlensError(f"{run_dir}/explain/explain_metrics.json: no faithfulness entry")
        return cls(metrics=data["faithfulness"], title=f"{Path(run_dir).name}: how faithful is each method")

    def plot(self) -> "FaithfulnessDisplay":
        plt = pyplot()
        m = self.metrics
        ranking = m["ranking"]
        self.figure_ = plt.figure(figsize=(14, 4.2 + 0.32 * len(ranking)), layout="constrained")
        top, bottom = self.figure_.subfigures(2, 1, height_ratios=[3, 0.9 + 0.3 * len(ranking)])
        axes = top.subplots(1, 3)
        self.axes_ = axes
        colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(ranking)}
        colours["random"] = "0.4"
        for ax, kind, better in ((axes[0], "deletion", "lower"), (axes[1], "insertion", "higher")):
            for name in ranking + ["random"]:
                curve = np.asarray(m["curves"][name][kind])
                x = np.linspace(0, 1, len(curve))
                auc = m["methods"][name][f"{kind}_auc"]
                ax.plot(x, curve, color=colours[name], ls="--" if name == "random" else "-",
                        label=f"{name} (AUC {auc:.3f})")
            ax.set_xlabel(f"fraction of patches {'removed' if kind == 'deletion' else 'revealed'}")
            ax.set_ylabel("probability of the target class")
            ax.set_title(f"{kind.capitalize()} ({better} AUC is better)", fontsize=10)
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        ax = axes[2]
        if "randomisation" in m:
            layers = m["randomisation"]["layers"]
            for name in ranking:
                ax.plot(range(len(layers)), m["randomisation"]["spearman"][name], marker="o", ms=3,
                        color=colours[name], label=name)
            ax.set_xticks(range(len(layers)))
            ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
            ax.axhline(0, color="0.5", lw=0.8)
            ax.axhspan(-0.5, 0.5, color="0.92", zorder=0, label="passes (|ρ| < 0.5)")
            lowest = min(min(m["randomisation"]["spearman"][name]) for name in ranking)
            ax.set_ylim(min(-0.2, lowest - 0.05), 1.02)  # negative correlations stay in view
            ax.set_xlabel("re-initialised down to layer (cumulative, top first)")
            ax.set_ylabel("Spearman ρ with the trained maps")
            ax.set_title("Randomisation sanity check (nearer 0 is better)", fontsize=10)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        else:
            ax.set_visible(False)
        tab_ax = bottom.subplots()
        tab_ax.axis("off")
        header = ["rank", "method", "deletion AUC\n(lower better)", "insertion AUC\n(higher better)",
                  "insertion -\ndeletion", "beats\nrandom", "Spearman after\nfull randomisation", "sanity check\n(|Spearman| < 0.5)"]
        rows = []
        for name in ranking + ["random"]:
            r = m["methods"][name]
            sp = r.get("spearman_fully_randomised")
            rows.append([str(r.get("rank", "-")), name, f"{r['deletion_auc']:.3f}", f"{r['insertion_auc']:.3f}",
                         f"{r['insertion_minus_deletion']:.3f}", "-" if name == "random" else ("yes" if r["beats_random"] else "no"),
                         "-" if sp is None else f"{sp:.2f}",
                         "-" if sp is None else ("passes" if r["passes_sanity_check"] else "FAILS")])
        table = tab_ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.3)
        for (row, _), cell in table.get_celld().items():
            if row == 0:
                cell.set_height(cell.get_height() * 1.8)
                cell.set_text_props(weight="bold")
        self.table_ = table
        n_txt = f"{m.get('n_images', '?')} images, sanity check on {m.get('sanity_n_images', '?')}"
        self.figure_.suptitle((self.title or "How faithful is each attribution method") + f" ({n_txt})", fontsize=11)
        return self
