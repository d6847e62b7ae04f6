"""Figures of the LoRA subspace study: phi(i, j) heatmaps with one shared colour bar (the LoRA
paper's figures 3, 4 and 8 / seed 003), singular-value spectra of dW, and the amplification
table (the paper's Table 7). Each function returns what it drew (a Display or a Figure); the
subspace stage saves it with its FigureWriter."""

from __future__ import annotations

import numpy as np

from digitlens.pyplot import pyplot
from digitlens.subspace.measures import chance_corrected

SPECTRA_TITLE = "Singular-value spectrum of the LoRA update dW = (alpha / r) B A"
AMPLIFICATION_TITLE = ("Amplification factor ||dW||_F / ||U^T W V^T||_F (U, V: top-r singular vectors of dW);\n"
                       "same projection for W's own top-r and random directions (Hu et al. 2021, Table 7)")


class SubspaceSimilarityDisplay:
    """A grid of phi(i, j) heatmaps sharing one colour scale and one colour bar.

    Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", figures 3, 4 and 8.

    Parameters
    ----------
    phis : list of lists of ndarray of shape (n_i, n_j), or None for an empty panel; rows x columns.
    titles : list of lists of str, default=None, one title per panel.
    row_labels : list of str, default=None, written left of each row.
    value_label : str, default="phi(i, j)", colour bar label.
    """

    def __init__(self, *, phis, titles=None, row_labels=None, value_label: str = "phi(i, j)",
                 xlabel: str = "j", ylabel: str = "i"):
        self.phis = [list(row) for row in phis]
        self.titles = titles
        self.row_labels = row_labels
        self.value_label = value_label
        self.xlabel, self.ylabel = xlabel, ylabel

    def plot(self, *, title: str | None = None, cmap: str = "magma", vmin=None, vmax=None,
             panel_size=(2.6, 3.2)) -> "SubspaceSimilarityDisplay":
        """Draw every panel with ``imshow`` (i downwards, j rightwards, 1-based), one colour bar;
        keeps ``figure_``, ``axes_`` (2-D ndarray) and ``images_``."""
        plt = pyplot()
        n_rows, n_cols = len(self.phis), max(len(r) for r in self.phis)
        values = [p[np.isfinite(p)] for row in self.phis for p in row if p is not None]
        values = np.concatenate(values) if values else np.zeros(1)
        vmin = float(values.min()) if vmin is None else vmin
        vmax = float(values.max()) if vmax is None else vmax
        if vmax <= vmin:
            vmax = vmin + 1e-6
        # No layout engine: constrained layout costs seconds per figure on a slow CPU; the figure
        # is saved with bbox_inches="tight", which trims the margins.
        height = panel_size[1] * n_rows + 1.3
        fig, axes = plt.subplots(n_rows, n_cols, squeeze=False, figsize=(panel_size[0] * n_cols + 1.4, height))
        fig.subplots_adjust(wspace=0.35, hspace=0.25 if not self.titles or not any(self.titles[1:]) else 0.45,
                            top=1.0 - 1.05 / height, bottom=0.6 / height, left=0.1, right=0.86)
        images = []
        cmap_obj = plt.get_cmap(cmap).with_extremes(bad="#dddddd")
        for r, row in enumerate(self.phis):
            for c in range(n_cols):
                ax = axes[r, c]
                panel = row[c] if c < len(row) else None
                if panel is None:
                    ax.set_visible(False)
                    continue
                n_i, n_j = panel.shape
                im = ax.imshow(np.ma.masked_invalid(panel), cmap=cmap_obj, vmin=vmin, vmax=vmax, aspect="auto",
                               interpolation="nearest", extent=(0.5, n_j + 0.5, n_i + 0.5, 0.5))
                images.append(im)
                ax.set_xticks(_index_ticks(n_j))
                ax.set_yticks(_index_ticks(n_i))
                ax.set_xlabel(self.xlabel)
                if c == 0:
                    ylabel = self.ylabel if not self.row_labels else f"{self.row_labels[r]}\n{self.ylabel}"
                    ax.set_ylabel(ylabel)
                if self.titles and self.titles[r][c]:
                    ax.set_title(self.titles[r][c], fontsize=9)
        colorbar_axis = fig.add_axes((0.89, 0.6 / height, 0.02, 1.0 - 1.65 / height))
        self.colorbar_ = fig.colorbar(images[0], cax=colorbar_axis, label=self.value_label)
        if title:
            fig.suptitle(title, y=1.0 - 0.12 / height, va="top", fontsize=10)
        self.figure_, self.axes_, self.images_ = fig, axes, images
        return self


def _index_ticks(n: int) -> list[int]:
    """About five 1-based tick positions from 1 to n."""
    if n <= 8:
        return list(range(1, n + 1))
    step = max(1, int(round(n / 4 / 4)) * 4) if n > 16 else max(1, n // 4)
    ticks = list(range(step, n + 1, step))
    return [1] + [t for t in ticks if t > 1]


def phi_pair_displays(phis, titles, dim: int, *, row_labels=None, title: str = "", xlabel="j",
                      ylabel="i") -> tuple[SubspaceSimilarityDisplay, SubspaceSimilarityDisplay]:
    """The same panels twice, drawn: raw phi and chance-corrected phi ``(phi - E) / (1 - E)``,
    each with one shared colour bar. Returns (raw display, corrected display); their ``figure_``
    is for the caller to save and close."""
    raw = SubspaceSimilarityDisplay(phis=phis, titles=titles, row_labels=row_labels, value_label="phi(i, j)",
                                    xlabel=xlabel, ylabel=ylabel)
    raw.plot(title=f"{title}\nraw phi; chance level E[phi] = max(i, j) / d, d = {dim}")
    corrected = [[None if p is None else chance_corrected(p, dim) for p in row] for row in phis]
    corr = SubspaceSimilarityDisplay(phis=corrected, titles=titles, row_labels=row_labels, xlabel=xlabel,
                                     ylabel=ylabel, value_label="(phi - E) / (1 - E)   (0 = chance)")
    finite = [np.abs(p[np.isfinite(p)]) for row in corrected for p in row if p is not None]
    finite = np.concatenate(finite) if finite else np.ones(1)
    # Symmetric scale around chance (0); the 99th percentile keeps the few noisy cells near
    # max(i, j) = d, where 1 - E is tiny, from washing out the rest.
    limit = max(float(np.percentile(finite, 99)), 1e-6)
    corr.plot(title=f"{title}\nchance-corrected phi, 0 = chance (grey: undefined, max(i, j) = d)", cmap="RdBu_r",
              vmin=-limit, vmax=limit)
    return raw, corr


def phi_w_panel_displays(modules: list[str], phis: list[list], titles: list[str],
                         dim: int) -> tuple[SubspaceSimilarityDisplay, SubspaceSimilarityDisplay]:
    """The seed-003 figure: phi(W, A_k, i, j) for each adapter k plus a random Gaussian A (last
    entry of each ``phis[m]``), i over W's top right-singular directions, one row per module in
    ``modules``, one shared colour bar. Returns (raw display, chance-corrected display)."""
    random_rank = phis[0][-1].shape[1]
    head = [f"phi(W, A, i, j)\n{t}" for t in titles] + [f"phi(W, A_rand, i, j)\nrandom Gaussian A (r={random_rank})"]
    panel_titles = [head] + [[None] * len(head) for _ in modules[1:]]
    return phi_pair_displays([list(p) for p in phis], panel_titles, dim, row_labels=list(modules),
                             title=phi_w_title(modules), ylabel="i (W direction)", xlabel="j (A direction)")


def phi_w_title(modules: list[str]) -> str:
    """The title of a phi(W, A) figure of ``modules`` (one, or the first ... last)."""
    name = modules[0] if len(modules) == 1 else f"{modules[0]} ... {modules[-1]}"
    return f"{name}: W's top-i vs A's top-j right-singular directions"


def plot_spectra(modules: list[dict]):
    """Singular values of dW = scale * B A, one panel per adapter, one line per module (log
    scale), effective rank in the legend. ``modules``: the ``modules`` entries of subspace.json.
    Returns the matplotlib Figure (for the caller to save and close)."""
    from matplotlib.ticker import MaxNLocator  # matplotlib is imported only when plotting (plots/__init__)

    plt = pyplot()
    adapters = [a["adapter"] for a in modules[0]["adapters"]]
    fig, axes = plt.subplots(1, len(adapters), figsize=(4.2 * len(adapters), 3.8), squeeze=False)
    fig.subplots_adjust(wspace=0.4, top=0.82)
    cmap = plt.get_cmap("viridis")
    for k, label in enumerate(adapters):
        ax = axes[0, k]
        for m, mod in enumerate(modules):
            entry = mod["adapters"][k]
            s = np.asarray(entry["singular_values"])
            s = np.where(s > 0, s, np.nan)
            ax.plot(np.arange(1, len(s) + 1), s, marker="o" if len(s) <= 16 else None, ms=3,
                    color=cmap(m / max(1, len(modules) - 1)),
                    label=f"{mod['module']} (eff. rank {entry['effective_rank']:.1f})")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("singular value index")
        ax.set_ylabel("singular value of dW")
        ax.set_title(f"{label} (r={modules[0]['adapters'][k]['rank']})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(SPECTRA_TITLE)
    return fig


def plot_amplification_table(modules: list[dict]):
    """The paper's Table 7 as a figure: per module and adapter, ||U^T W V^T||_F for dW's, W's own
    and random top-r directions, ||W||_F, ||dW||_F and the amplification factor. ``modules``: the
    ``modules`` entries of subspace.json. Returns the matplotlib Figure."""
    plt = pyplot()
    header = ["module", "adapter", "r", "||U^T W V^T||_F\ndW's top-r dirs", "\nW's top-r dirs", "\nrandom dirs",
              "||W||_F", "||dW||_F", "amplification\nfactor"]
    rows = []
    for mod in modules:
        for ad in mod["adapters"]:
            amp = ad["amplification"]
            rows.append([mod["module"], ad["adapter"], str(ad["rank"]), f"{amp['proj_dW']:.3f}", f"{amp['proj_W']:.3f}",
                         f"{amp['proj_random']:.3f}", f"{amp['norm_W']:.2f}", f"{amp['norm_dW']:.3f}",
                         f"{amp['amplification']:.3g}"])
    fig, ax = plt.subplots(figsize=(10, 0.25 * (len(rows) + 2) + 0.9))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1.0 - 0.8 / (0.25 * (len(rows) + 2) + 0.9))
    ax.axis("off")
    widths = np.array([2.6, 1.8, 0.5, 1.6, 1.3, 1.3, 1.0, 1.0, 1.2])
    table = ax.table(cellText=rows, colLabels=header, bbox=(0, 0, 1, 1), cellLoc="right", colLoc="right",
                     colWidths=list(widths / widths.sum()))
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for col in range(len(header)):
        table[0, col].set_height(table[0, col].get_height() * 1.6)
        table[0, col].set_text_props(fontweight="bold")
    ax.set_title(AMPLIFICATION_TITLE, fontsize=10)
    return fig
