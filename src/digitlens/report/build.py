"""Assemble the report of one run (or two, side by side) and write ``report.html``.

The report is one self-contained HTML file: figures are embedded as base64 PNG data URIs and
the stylesheet is inlined, so it opens offline and can be mailed as is. Every figure comes from a
stage's figure manifest (:mod:`digitlens.report.collect`); it is placed by its ``section`` and
``kind`` and captioned from its ``title`` and what it shows. Every number comes from the stages'
JSON files (:mod:`digitlens.report.readings`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import jinja2
import numpy as np
from markdown_it import MarkdownIt
from markdown_it.token import Token

from digitlens.comparison import compare_predictions, format_p
from digitlens.errors import DigitlensError
from digitlens.intervals import DEFAULT_BOOTSTRAP, format_ci
from digitlens.report import readings as R
from digitlens.report.collect import FigureRef, RunData, collect_run
from digitlens.runio import read_text, write_json, write_text

TEMPLATES = Path(__file__).with_name("templates")

# Report sections in reading order: (id, title). The ids are the manifests' ``section`` values.
SECTIONS = (
    ("overview", "Overview"),
    ("training", "Training"),
    ("evaluation", "Confusion matrix and per-digit metrics"),
    ("galleries", "Galleries"),
    ("explanations", "Per-digit heatmaps and faithfulness"),
    ("filters", "Filters and activations"),
    ("lora", "LoRA study"),
    ("predict", "Predictions on your images"),
    ("other", "Other figures"),
    ("insights", "Insights"),
)

#: Figure kinds of the manifest contract in the order they appear within their section; a kind
#: not listed (a new one) follows them, by name.
KIND_ORDER = (
    "training_curves",
    "confusion_matrix", "confusion_matrix_normalised", "per_digit", "per_digit_groups", "reliability",
    "predictions", "misclassified", "overlay", "overlay_misclassified",
    "heatmap", "heatmap_compare", "faithfulness", "sanity",
    "filters",
    "adapt_accuracy", "adapt_per_digit", "adapt_training_curves", "subspace_paper_figure", "phi_w_vs_a",
    "phi_rank_vs_rank", "phi_seed_vs_seed", "amplification", "spectrum",
    "prediction_steps", "prediction_map",
)

#: What a figure shows, as its caption words it: (manifest key, label); in this order.
SHOWN = (("task", "task"), ("method", "method"), ("methods", "methods"), ("module", "module"),
         ("modules", "modules"), ("rank", "r"), ("ranks", "ranks"), ("seed", "seed"), ("seeds", "seeds"),
         ("run", "run"), ("group_by", "grouped by"), ("split", "split"))

_STAGE_ORDER = ("evaluate", "explain", "adapt", "subspace")


def _shown_value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(R.label(str(v)) for v in value)
    return R.label(str(value))


def figure_caption(figure: FigureRef) -> str:
    """The figure's ``title`` followed by what it shows (task, method, module, rank, seed...) that
    the title does not already say; ``chance-corrected`` for a corrected phi figure."""
    title = figure.title or R.label(figure.kind).capitalize()
    parts = []
    for key, name in SHOWN:
        if key not in figure.shows or figure.shows[key] in (None, "", []):
            continue
        value = _shown_value(figure.shows[key])
        if value not in title and value not in R.label(title):
            parts.append(f"{name} {value}" if key != "task" else f"task “{value}”")
    if figure.shows.get("corrected") is True and "corrected" not in title:
        parts.append("chance-corrected")
    return title + (" — " + ", ".join(parts) if parts else "")


def _sort_value(value: Any) -> tuple:
    """A sort key for a shown value of any JSON type (numbers before text)."""
    if isinstance(value, bool):
        return (0, int(value), "")
    if isinstance(value, (int, float)):
        return (0, value, "")
    if isinstance(value, list):
        return (1, 0, ",".join(f"{v:>12}" if isinstance(v, (int, float)) else str(v) for v in value))
    return (1, 0, str(value))


def figure_order(figure: FigureRef) -> tuple:
    """The fixed place of a figure within its section: its kind's place in :data:`KIND_ORDER`, then
    its stage, then what it shows (task, method, module, rank, seed... in :data:`SHOWN` order), then its path."""
    kind = KIND_ORDER.index(figure.kind) if figure.kind in KIND_ORDER else len(KIND_ORDER)
    stage = _STAGE_ORDER.index(figure.stage) if figure.stage in _STAGE_ORDER else len(_STAGE_ORDER)
    shown = tuple(_sort_value(figure.shows.get(key, "")) for key, _ in SHOWN) + (_sort_value(bool(figure.shows.get("corrected"))),)
    return (kind, figure.kind, stage, shown, figure.rel)


def data_uri(png: Path) -> str:
    """The PNG at ``png`` as a ``data:image/png;base64,...`` URI."""
    raw = png.read_bytes()
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise DigitlensError(f"{png}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    run: str = ""
    numeric: list[bool] = field(default_factory=list)

    def __post_init__(self):
        if not self.numeric:
            self.numeric = [False] + [True] * (len(self.columns) - 1)


def per_digit_table(run: RunData) -> Table | None:
    """Per-digit precision, recall, F1, accuracy and support of ``metrics.json``, with its intervals."""
    p = R.evaluation_of(run)
    if not p:
        return None

    def cell(d: int, key: str) -> str:  # with the bootstrap interval of metrics.json when it has one
        row = p["rows"][d]
        return format_ci(row[key], row.get(f"{key}_ci"), percent=False, digits=3)

    rows = [[str(d), cell(d, "precision"), cell(d, "recall"), cell(d, "f1"), cell(d, "accuracy"),
             f"{int(p['support'][d]):,}"] for d in p["labels"]]
    hard = int(np.argmin(p["f1"]))
    _, tied, _ = R.f1_ties(p)
    if tied is None:
        noise = ""
    elif len(tied) == 1:
        noise = ", below every other digit's F1 interval"
    else:
        noise = f", but its F1 interval overlaps those of digits {', '.join(map(str, tied[1:]))}: within noise"
    macro = ("" if p["macro_f1"] is None else
             f"; the macro F1 over all digits is {format_ci(p['macro_f1'], p['macro_f1_ci'], percent=False, digits=3)}")
    return Table("Per-digit metrics", ["Digit", "Precision", "Recall", "F1", "Accuracy (one-vs-rest)", "Support"], rows,
                 f"Values from metrics.json, with their 95% bootstrap intervals where it has them. Digit {hard} has the "
                 f"lowest F1 ({p['f1'][hard]:.3f}){noise}{macro}.", run.name)


def per_digit_diff_table(a: RunData, b: RunData, comparison: dict | None = None) -> Table | None:
    """Per-digit precision, recall and F1 of two runs (their ``metrics.json``) with the F1 difference
    (b - a); with ``comparison`` (:func:`paired_comparison`, a = its A) the caption says which
    differences survive Holm's correction."""
    pa, pb = R.evaluation_of(a), R.evaluation_of(b)
    if not pa or not pb or pa["labels"] != pb["labels"]:
        return None
    rows = []
    for d in pa["labels"]:
        rows.append([str(d), f"{pa['precision'][d]:.3f}", f"{pb['precision'][d]:.3f}", f"{pa['recall'][d]:.3f}",
                     f"{pb['recall'][d]:.3f}", f"{pa['f1'][d]:.3f}", f"{pb['f1'][d]:.3f}", f"{pb['f1'][d] - pa['f1'][d]:+.3f}"])
    delta = pb["f1"] - pa["f1"]
    up, down = int(np.argmax(delta)), int(np.argmin(delta))
    if delta[up] <= 0:
        caption = f"{b.name} is better on no digit; it loses most on digit {down} (F1 {delta[down]:+.3f})."
    elif delta[down] >= 0:
        caption = f"{b.name} is at least as good on every digit and gains most on digit {up} (F1 {delta[up]:+.3f})."
    else:
        caption = (f"{b.name} gains most on digit {up} (F1 {delta[up]:+.3f}) and loses most on digit {down} "
                   f"(F1 {delta[down]:+.3f}).")
    if comparison:
        caption += " " + holm_sentence(comparison, b.name, a.name)
    columns = ["Digit", f"Precision {a.name}", f"Precision {b.name}", f"Recall {a.name}", f"Recall {b.name}",
               f"F1 {a.name}", f"F1 {b.name}", "F1 difference"]
    return Table("Per-digit metrics compared", columns, rows, caption)


def holm_sentence(comparison: dict, name_b: str, name_a: str) -> str:
    """Which per-digit F1 differences (``name_b`` - ``name_a``) are significant after Holm's correction."""
    alpha = comparison["alpha"]
    sig = [d for d in comparison["per_digit"] if d["p_holm"] < alpha]
    head = (f"Paired bootstrap ({comparison['n_resamples']:,} resamples of the same "
            f"{comparison['n_images']:,} images), Holm-corrected across digits at {alpha:g}: ")
    if not sig:
        low = min(comparison["per_digit"], key=lambda d: d["p_holm"])
        return head + (f"no digit's F1 difference is significant (smallest corrected p {format_p(low['p_holm'], alpha)}, "
                       f"digit {low['digit']}).")
    parts = []
    for d in sig:  # comparison differences are A - B = name_a - name_b; the table shows name_b - name_a
        lo, hi = d["f1_difference_ci"]
        parts.append(f"digit {d['digit']} (F1 {-d['f1_difference']:+.3f}, 95% CI {-hi:+.3f} to {-lo:+.3f}, "
                     f"corrected p {format_p(d['p_holm'], alpha)})")
    return head + "significant for " + "; ".join(parts) + "."


def paired_comparison(a: RunData, b: RunData, *, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> tuple[dict | None, str | None]:
    """(:func:`digitlens.comparison.compare_predictions` of ``a`` (A) against ``b`` (B), None) when both
    runs hold ``predictions.npz`` on the same test images; (None, a note saying why not) otherwise."""
    for run in (a, b):
        if not run.predictions or "y_true" not in run.predictions or "y_pred" not in run.predictions:
            return None, f"{run.name} has no predictions.npz, so the two runs cannot be compared image by image"
    ya, yb = np.asarray(a.predictions["y_true"]), np.asarray(b.predictions["y_true"])
    if ya.shape != yb.shape or not np.array_equal(ya, yb):
        return None, ("the two runs were evaluated on different test images (their y_true differ), "
                      "so no paired test applies")
    pa, pb = np.asarray(a.predictions["y_pred"]), np.asarray(b.predictions["y_pred"])
    n_classes = max(int(a.config.get("n_classes") or 10), int(max(ya.max(), pa.max(), pb.max())) + 1)
    result = compare_predictions(ya, pa, pb, a.name, b.name, n_classes=n_classes, n_resamples=n_resamples, seed=seed)
    result["run_a"], result["run_b"] = str(a.run_dir), str(b.run_dir)
    return result, None


def confused_pairs_table(run: RunData, top: int = 5) -> Table | None:
    """The ``top`` most-confused pairs of ``metrics.json`` with their shares of the true digit."""
    p = R.evaluation_of(run)
    if not p or not p["most_confused"]:
        return None
    rows = [[f"{pair['true']} → {pair['predicted']}", f"{int(pair['count']):,}",
             format_ci(pair["share_of_true"], pair.get("share_of_true_ci"), digits=1)]
            for pair in p["most_confused"][:top]]
    return Table("Most-confused pairs", ["True → predicted", "Images", "Share of true digit (95% Wilson interval)"],
                 rows, "", run.name)


@dataclass(frozen=True)
class Estimate:
    """A number estimated from a sample of images with its 95% interval (``ci``: [low, high] or None)."""

    value: float
    ci: Any = None


def _estimate(value: Any, ci: Any = None) -> Estimate | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    ok = isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci)
    return Estimate(float(value), list(ci) if ok else None)


def overview_facts(run: RunData) -> dict[str, Any]:
    """Headline numbers of a run (used by the overview table and by the comparison), as the stages
    wrote them; numbers estimated from images are :class:`Estimate` with their 95% intervals."""
    cfg = run.config
    h = R.history_summary(run) or {}
    p = R.evaluation_of(run) or {}
    metrics = run.metrics or {}
    overfit = R.overfitting_of(run) or {}
    facts: dict[str, Any] = {
        "Dataset": cfg.get("dataset"),
        "Model": cfg.get("model"),
        "Model input (declared; outputs as used)": _user_model_text(cfg),
        "Parameters": R.dig(cfg, "n_parameters", "parameters", "num_parameters"),
        "Epochs": cfg.get("epochs", h.get("epochs")),
        "Seed": cfg.get("seed"),
        "Training time (s)": h.get("seconds"),
        "Best validation accuracy (95% Wilson interval)": _estimate(h.get("best_val_accuracy"), h.get("best_val_accuracy_ci")),
        "Overfits from epoch": (overfit.get("from_epoch") if overfit.get("diverges") else "no") if overfit.get("available") else None,
        "Test accuracy (95% Wilson interval)": _estimate(p.get("accuracy"), p.get("accuracy_ci")),
        "Macro F1 (95% bootstrap interval)": _estimate(p.get("macro_f1"), p.get("macro_f1_ci")),
        "Expected calibration error (95% bootstrap interval)": _estimate(R.ece_of(run), metrics.get("ece_ci")),
        "ECE after temperature scaling (95% bootstrap interval)": _estimate(metrics.get("ece_calibrated"),
                                                                           metrics.get("ece_calibrated_ci")),
        "Temperature (fitted on validation)": metrics.get("temperature"),
        "Test images": p.get("n"),
        "Mistakes": p.get("errors"),
    }
    if p and p["most_confused"]:
        top = p["most_confused"][0]
        facts["Most-confused pair"] = f"{top['true']} → {top['predicted']} ({top['count']})"
    best = best_explain_method(run)
    if best:
        facts["Most faithful explanation"] = best
    return {k: v for k, v in facts.items() if v is not None}


def _user_model_text(cfg: dict) -> str | None:
    """A user's model file (config.json of `evaluate --model-file --out`): its format, declared
    preprocessing and the outputs it was read as; None for a digitlens run."""
    if not cfg.get("model_file"):
        return None
    prep = cfg.get("preprocessing") or {}
    norm = prep.get("normalize")
    parts = [f"{cfg.get('model_format', 'model')} file", f"pixels in [0, {prep.get('input_scale', 1)}]",
             f"normalised with mean {norm[0]:g}, std {norm[1]:g}" if norm else "not normalised",
             f"layout {cfg.get('layout')}",
             f"outputs {cfg.get('outputs')} ({'detected' if cfg.get('outputs_detected') else 'declared'})"]
    return ", ".join(parts)


PERCENT_FACTS = {"Best validation accuracy (95% Wilson interval)", "Test accuracy (95% Wilson interval)"}
NO_DIFF_FACTS = {"Seed", "Overfits from epoch"}
TEST_ACCURACY = "Test accuracy (95% Wilson interval)"


def fmt_fact(key: str, value: Any) -> str:
    """A cell of the overview table: estimates as ``99.31% (99.13-99.45)`` or ``0.0123 (0.0101-0.0150)``."""
    if isinstance(value, Estimate):
        return format_ci(value.value, value.ci, percent=key in PERCENT_FACTS, digits=2 if key in PERCENT_FACTS else 4)
    if key in PERCENT_FACTS and isinstance(value, (int, float)):
        return R.pct(value, 2)
    if key == "Training time (s)" and isinstance(value, (int, float)):
        return f"{value:.1f}"
    return R.num(value, 4) if isinstance(value, float) else R.num(value)


def best_explain_method(run: RunData) -> str | None:
    """The explain stage's ``most_faithful`` (a method that passes both sanity checks), as it wrote
    it; 'none passes both sanity checks' when it named none; None for runs explained before the verdict."""
    em = run.explain_metrics or {}
    if "most_faithful" in em:
        margin = R.dig(em, "faithfulness.margin", default={}) or {}
        tie = f" ({margin['runner_up']} within noise)" if margin.get("within_noise") else ""
        return (em["most_faithful"] or "none passes both sanity checks") + tie
    return None


# --------------------------------------------------------------------------- sections


@dataclass
class Panel:
    run: str
    uri: str
    path: str
    reading: list[str]


@dataclass
class Figure:
    id: str
    caption: str
    panels: list[Panel]


@dataclass
class Section:
    id: str
    title: str
    intro: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    html_blocks: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.tables or self.figures or self.html_blocks or (self.intro and self.id == "overview"))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def faithfulness_table(run: RunData) -> Table | None:
    """One row per explanation method (best first, random order last) from ``explain_metrics.json``."""
    f = R.faithfulness_of(run)
    if not f:
        return None
    ranking = list(f.get("ranking") or [])
    baselines = [b for b in ("random", "ink_random") if b in f["methods"]]
    names = ranking + [m for m in f["methods"] if m not in ranking and m not in baselines] + baselines

    def fmt(v, key, digits=3):
        return "—" if v.get(key) is None else f"{v[key]:.{digits}f}"

    def check(v, key):
        return "—" if v.get(key) is None else ("passes" if v[key] else "fails")

    rows = []
    for m in names:
        v = f["methods"][m]
        baseline = m in baselines
        verdict = "—" if baseline or "eligible" not in v else ("eligible" if v["eligible"] else "; ".join(v.get("reasons", [])))
        rows.append([R.label(m) + (" (baseline)" if baseline else ""), str(v.get("rank", "—")),
                     fmt(v, "road_morf_auc"), fmt(v, "road_lerf_auc"), fmt(v, "road_score"), fmt(v, "road_pixel_score"),
                     fmt(v, "deletion_auc"), fmt(v, "insertion_auc"),
                     "—" if baseline else check(v, "passes_sanity_check"), "—" if baseline else check(v, "passes_random_logit"),
                     verdict])
    ig = R.dig(run.explain_metrics or {}, "integrated_gradients")
    caption = (f"Over {f.get('n_images', '?')} test images. ROAD (noisy linear imputation, 7x7 patches; pixel level in its "
               f"own column): MoRF AUC lower is better, LeRF AUC higher, score = LeRF − MoRF. Deletion/insertion replace "
               f"patches by 0, which on MNIST is the background, so methods that multiply by the input win them by "
               f"construction; they are shown for reference only. " + (f.get("verdict", "").capitalize() + "." if f.get("verdict") else ""))
    if isinstance(ig, dict) and "completeness_rel_error_mean" in ig:
        caption += (f" Integrated gradients used {ig.get('mean_steps', float('nan')):.1f} steps per image on average, "
                    f"with a mean completeness error of {ig['completeness_rel_error_mean'] * 100:.2f}%.")
    return Table("Faithfulness of each explanation method",
                 ["Method", "Rank", "ROAD MoRF AUC", "ROAD LeRF AUC", "ROAD score", "ROAD score (pixels)",
                  "Deletion AUC", "Insertion AUC", "Randomisation check", "Random-logit check", "Verdict"],
                 rows, caption, run.name)


def _section_tables(section: str, run: RunData) -> list[Table]:
    tables: list[Table] = []
    if section == "evaluation":
        tables += [t for t in (per_digit_table(run), confused_pairs_table(run)) if t]
    elif section == "explanations":
        table = faithfulness_table(run)
        if table:
            tables.append(table)
    return tables


def _section_blocks(section: str, run: RunData, run_index: int | None) -> list[str]:
    """HTML blocks: the stages' own Markdown tables (LoRA results, subspace summary) and insights;
    ``run_index`` (1 or 2) tags them with the run's name in a comparison."""
    prefix = (f'<p><span class="run-tag run-{run_index}">{html.escape(run.name)}</span></p>\n'
              if run_index else "")
    blocks = []
    if section == "lora":
        for task in run.adapt_results:
            md = run.run_dir / "adapt" / task / "results.md"
            if md.is_file():
                blocks.append(prefix + f"<h3>LoRA against baselines, task “{html.escape(task)}”</h3>\n"
                              + markdown_to_html(read_text(md), md.parent, run.run_dir))
        for task in run.subspace:
            md = run.run_dir / "subspace" / task / "summary.md"
            if not md.is_file():
                continue
            blocks.append(prefix + f"<h3>Subspace analysis, task “{html.escape(task)}”</h3>\n"
                          + "<div class=\"table-wrap\">" + markdown_to_html(read_text(md), md.parent, run.run_dir) + "</div>")
    elif section == "insights" and run.insights_md:
        blocks.append(prefix + markdown_to_html(run.insights_md, run.run_dir, run.run_dir))
    return blocks


def _escape_norm_bars(text: str) -> str:
    """Escape ``||x||`` norm bars in a table header whose cell count exceeds its separator row's
    (a header like ``| ||dW||_F |`` is otherwise split into extra cells and the table is lost)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1):
        head, sep = lines[i], lines[i + 1]
        if head.lstrip().startswith("|") and re.fullmatch(r"\s*\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*", sep):
            if head.count("|") > sep.count("|"):
                lines[i] = head.replace("||", "\\|\\|")
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def _embedded_image(src: str, base: Path | None, root: Path | None) -> str | None:
    """The data URI of a Markdown image ``src`` when it is a PNG file of the run (a path relative
    to ``base`` that stays inside ``root``) or already a PNG data URI; None for anything else (a
    web address, a file outside the run, not a PNG), which the report must not load."""
    if src.startswith("data:image/png;base64,"):
        return src
    if base is None or root is None or urlparse(src).scheme or src.startswith(("//", "\\")):
        return None
    path = (base / unquote(src)).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        return None
    try:
        return data_uri(path)
    except DigitlensError:
        return None


def markdown_to_html(text: str, base: Path | None = None, root: Path | None = None) -> str:
    """``insights.md`` (Markdown with pipe tables) as HTML, headings shifted below the report's h2.

    The report opens offline and loads nothing: an image is inlined when it is a PNG of the run
    (``root``; relative paths start at ``base``, the Markdown file's folder) and replaced by a
    note otherwise."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(_escape_norm_bars(text))
    for token in tokens:
        for i, child in enumerate(token.children or []):
            if child.type != "image":
                continue
            src = str(child.attrGet("src") or "")
            uri = _embedded_image(src, base, root)
            if uri is not None:
                child.attrSet("src", uri)
            else:
                note = Token("text", "", 0)
                shown = src if len(src) <= 80 else src[:77] + "..."
                note.content = f"[image {shown} left out: the report embeds only the run's own PNG files]"
                token.children[i] = note
    body = md.renderer.render(tokens, md.options, {})
    # The file's "# Insights" duplicates the section title; its other headings move down two levels.
    body = re.sub(r"<h1>.*?</h1>\n?", "", body, count=1)
    return re.sub(r"<(/?)h([1-4])>", lambda m: f"<{m.group(1)}h{min(int(m.group(2)) + 2, 6)}>", body)


def build_sections(runs: list[RunData], comparison: dict | None = None, note: str | None = None) -> list[Section]:
    """The report's sections for one run, or two runs side by side; empty sections dropped.
    ``comparison`` (:func:`paired_comparison`) or ``note`` (why there is none) word the comparison.

    Figures: one per manifest entry (the same figure of two runs, by its path in the run, gets one
    panel per run), in its ``section`` (an unknown one: "Other figures") at :func:`figure_order`."""
    sections = {sid: Section(sid, title) for sid, title in SECTIONS}
    slots: dict[str, FigureRef] = {}
    for run in runs:
        for figure in run.figures:
            slots.setdefault(figure.rel, figure)
    for rel, first in sorted(slots.items(), key=lambda kv: figure_order(kv[1])):
        panels = []
        for run in runs:
            own = next((f for f in run.figures if f.rel == rel), None)
            if own is not None:
                panels.append(Panel(run.name, data_uri(own.path), rel, R.reading(own.kind, run, own)))
        sid = first.section if first.section in sections and first.section not in ("overview", "insights") else "other"
        sections[sid].figures.append(Figure(_slug("fig-" + rel), figure_caption(first), panels))
    diff = per_digit_diff_table(*runs, comparison) if len(runs) == 2 else None
    if diff:
        sections["evaluation"].tables.append(diff)
    for index, run in enumerate(runs, start=1):
        for sid, _ in SECTIONS:
            tables = _section_tables(sid, run)
            if diff and sid == "evaluation":  # the comparison table replaces the two per-run ones
                tables = [t for t in tables if t.title != "Per-digit metrics"]
            sections[sid].tables += tables
            sections[sid].html_blocks += _section_blocks(sid, run, index if len(runs) > 1 else None)
    overview = sections["overview"]
    overview.tables.append(overview_table(runs, comparison, note))
    for run in runs:
        if run.unlisted_figures:
            overview.intro.append(f"{run.name}: the figures in {', '.join(run.unlisted_figures)} are not shown: that "
                                  "folder has no figures.json (it was written by an older digitlens); run its stage again.")
    return [s for s in sections.values() if not s.empty]


def overview_table(runs: list[RunData], comparison: dict | None = None, note: str | None = None) -> Table:
    """Headline facts, one column per run; for two runs a difference column and a caption: the paired
    test's (``comparison``) when there is one, else the accuracies with ``note`` saying why no test."""
    facts = [overview_facts(r) for r in runs]
    keys: list[str] = []
    for f in facts:
        keys += [k for k in f if k not in keys]
    columns = [""] + [r.name for r in runs]
    if len(runs) == 2:
        columns.append("Difference")
    rows = []
    for key in keys:
        row = [key] + [fmt_fact(key, f.get(key)) if key in f else "—" for f in facts]
        if len(runs) == 2:
            a, b = (v.value if isinstance(v, Estimate) else v for v in (facts[0].get(key), facts[1].get(key)))
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
            if numeric and a != b and key not in NO_DIFF_FACTS:
                d = b - a
                row.append(f"{d * 100:+.2f} pts" if key in PERCENT_FACTS else f"{d:+.1f}" if key == "Training time (s)"
                           else f"{d:+,}" if isinstance(d, int) else f"{d:+.4f}")
            else:
                row.append("")
        rows.append(row)
    title = "Runs compared" if len(runs) == 2 else "Run at a glance"
    caption = ""
    if len(runs) == 2 and comparison:
        caption = comparison["caption"] + " Difference: second run minus first."
    elif len(runs) == 2 and all(TEST_ACCURACY in f for f in facts):
        a, b = facts[0][TEST_ACCURACY], facts[1][TEST_ACCURACY]
        caption = (f"Test accuracy {R.pct_ci(a.value, a.ci)} ({runs[0].name}) against {R.pct_ci(b.value, b.ci)} "
                   f"({runs[1].name}), {abs(b.value - a.value) * 100:.2f} points apart; untested: "
                   f"{note or 'no paired test'}. Difference: second run minus first.")
    return Table(title, columns, rows, caption)


# --------------------------------------------------------------------------- writing


def render(runs: list[RunData], sections: list[Section], title: str | None = None) -> str:
    """The HTML page of ``sections`` (the template of ``templates/``, stylesheet inlined)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
    css = (TEMPLATES / "report.css").read_text()
    if title is None:
        title = f"digitlens report: {runs[0].name}" + (f" vs {runs[1].name}" if len(runs) > 1 else "")
    return env.get_template("report.html").render(
        title=title, css=css, runs=runs, sections=sections, compare=len(runs) > 1,
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    )


def write_run_report(run_dir: str | Path, *, compare: str | Path | None = None, out: str | Path | None = None,
                     bootstrap: int = DEFAULT_BOOTSTRAP) -> Path:
    """Write ``run_dir/report.html`` (or ``out``): one self-contained HTML file for the run,
    with ``compare`` (another run folder) side by side when given. Returns the path written.

    With ``compare``, when both runs hold ``predictions.npz`` on the same test images, also writes
    ``comparison.json`` beside the report (:func:`paired_comparison`: McNemar's exact test, paired
    bootstrap intervals with ``bootstrap`` resamples, Holm-corrected per-digit F1; this run is A,
    ``compare`` is B)."""
    runs = [collect_run(run_dir)]
    if compare is not None:
        other = collect_run(compare)
        if other.run_dir.resolve() == runs[0].run_dir.resolve():
            raise DigitlensError(f"--compare {compare}: is the same run as {run_dir}")
        if other.name == runs[0].name:  # two folders with one name: tell them apart in the columns
            other.name = f"{other.run_dir.resolve().parent.name}/{other.name}"
        runs.append(other)
    target = Path(out) if out is not None else runs[0].run_dir / "report.html"
    comparison, note = paired_comparison(*runs, n_resamples=bootstrap or DEFAULT_BOOTSTRAP) if len(runs) == 2 else (None, None)
    if comparison:
        write_json(target.parent / "comparison.json", comparison)
    sections = build_sections(runs, comparison, note)
    return write_text(target, render(runs, sections))
