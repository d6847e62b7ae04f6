"""The report of a seed group (``digitlens train --seeds``): the first seed's full report with an
"Across seeds" section in front, whose table and sentence come from ``group_summary.json``."""

from __future__ import annotations

from pathlib import Path

from digitlens.errors import DigitlensError
from digitlens.intervals import DEFAULT_BOOTSTRAP, format_ci
from digitlens.report.build import Section, Table, build_sections, render
from digitlens.report.collect import collect_run
from digitlens.runio import write_text
from digitlens.seeds import summarise_group


def _pct(v) -> str:
    return "—" if v is None else f"{v * 100:.2f}%"


def _num(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def seeds_section(summary: dict) -> Section:
    """The "Across seeds" section: one row per seed run, then mean, std and min-max rows."""
    rows = []
    for r in summary["runs"]:
        accuracy = "—" if r["accuracy"] is None else format_ci(r["accuracy"], r.get("accuracy_ci"))
        rows.append([r["run"], accuracy, _num(r["macro_f1"]), _num(r["ece"])])
    m = summary["metrics"]

    def stat_row(label, pick, fmt_acc, fmt_other):
        return [label, fmt_acc(pick(m["accuracy"]))] + [fmt_other(pick(m[k])) if k in m else "—"
                                                           for k in ("macro_f1", "ece")]

    rows.append(stat_row("Mean", lambda s: s["mean"], _pct, _num))
    rows.append(stat_row("Standard deviation", lambda s: s["std"], lambda v: f"{v * 100:.2f} pts", _num))
    rows.append(stat_row("Min – max", lambda s: (s["min"], s["max"]),
                         lambda v: f"{_pct(v[0])} – {_pct(v[1])}", lambda v: f"{_num(v[0])} – {_num(v[1])}"))
    table = Table("Across seeds", ["Run", "Test accuracy (95% Wilson interval of each run)", "Macro F1", "ECE"], rows,
                  caption=f"Standard deviation over the {len(summary['runs'])} seed runs with ddof=1; "
                          "each run's interval is its metrics.json accuracy_ci. Numbers from group_summary.json.")
    n = len(summary["seeds"])
    return Section("seeds", "Across seeds",
                   intro=[summary["sentence"],
                          f"The sections below are those of the first seed's run ({summary['runs'][0]['run']}); "
                          f"each of the {n} seed runs has its own report in its folder."],
                   tables=[table])


def write_group_report(group_dir: str | Path, *, out: str | Path | None = None, compare=None,
                       bootstrap: int = DEFAULT_BOOTSTRAP) -> Path:
    """Write ``group_dir/report.html``: the "Across seeds" section, then the first seed's report.
    The report evaluates nothing: every seed run needs its ``metrics.json`` (``digitlens evaluate
    GROUP`` writes them), else a one-line error; ``group_summary.json`` is (re)written from them.
    ``bootstrap`` is checked for the command line's sake only."""
    group_dir = Path(group_dir)
    if compare is not None:
        raise DigitlensError(f"--compare: not available for the seed group {group_dir}; compare two seed runs instead")
    summary = summarise_group(group_dir, evaluate=False, bootstrap=bootstrap)
    first = collect_run(group_dir / summary["runs"][0]["run"])
    first.name = f"{group_dir.name}/{first.name}"
    sections = [seeds_section(summary)] + build_sections([first])
    html = render([first], sections, title=f"digitlens report: {group_dir.name} ({len(summary['seeds'])} seeds)")
    return write_text(Path(out) if out is not None else group_dir / "report.html", html)
