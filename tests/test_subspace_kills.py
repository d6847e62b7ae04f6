"""The subspace output folder is replaced as a whole (issue 14 item 5): a SIGKILL at a seeded
random moment leaves the old analysis or the new one, never a mix; the next writer cleans what a
killed one left; a re-run never keeps figures of an earlier analysis; a foreign --out folder is
refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from digitlens.subspace import run as subspace_run
from digitlens.errors import DigitlensError
from test_kills import cli, kill_after, start, timed
from test_subspace import _peft_adapter

MODULES = ["blocks.0.attn.q", "blocks.0.attn.v"]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _whole(folder: Path) -> set[str]:
    """What a complete output of ``folder`` holds: its JSON, its summary and every file its
    manifest lists (checked against subspace.json's own list)."""
    manifest = json.loads((folder / "figures.json").read_text())
    summary = json.loads((folder / "subspace.json").read_text())
    assert [e["path"] for e in manifest["figures"]] == summary["figures"]
    return {"subspace.json", "summary.md", "figures.json", *(f for e in manifest["figures"] for f in e["files"])}


@pytest.mark.slow
def test_subspace_killed_anywhere_leaves_the_old_or_the_new_analysis_whole(tmp_path, monkeypatch):
    from digitlens.adapt import adapt_run
    from test_adapt import write_tiny_vit_run

    monkeypatch.setenv("DIGITLENS_FIGURE_WORKERS", "0")
    rng = np.random.default_rng(11)
    run = tmp_path / "tiny_vit"
    run.mkdir()
    write_tiny_vit_run(run)
    adapt_run(run, task="groups", ranks=(2, 4), seeds=(0, 1), epochs=1, n_train=128, n_test=100, progress=False,
              baselines=False)
    folder = run / "subspace" / "groups"
    code, output = cli("subspace", run, "--module", MODULES[0])  # the old analysis: one module
    assert code == 0, output
    old = _files(folder)
    assert old == _whole(folder) and "figures/phi_W_vs_A__v.png" not in old
    duration = timed("subspace", run)  # the new analysis: both modules, more figures
    new = _files(folder)
    assert new == _whole(folder) and "figures/phi_W_vs_A__v.png" in new
    assert cli("subspace", run, "--module", MODULES[0])[0] == 0 and _files(folder) == old  # back to the old one
    for fraction in rng.uniform(0.3, 1.0, size=2):
        kill_after(start("subspace", run), duration * fraction)
        files = _files(folder)
        assert files in (old, new), sorted(files ^ old)
        assert files == _whole(folder)
        modules = [m["module"] for m in json.loads((folder / "subspace.json").read_text())["modules"]]
        assert modules == (MODULES if files == new else MODULES[:1])
        code, output = cli("subspace", run, "--module", MODULES[0])  # the next writer cleans up
        assert code == 0, output
        assert _files(folder) == old
        assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]


def test_a_rerun_replaces_the_folder_and_keeps_no_figure_of_the_earlier_analysis(tmp_path):
    base_path, adapter, _ = _peft_adapter(tmp_path, rank=4, seed=0)
    out = tmp_path / "out"
    subspace_run.analyse_adapters(base_path, [adapter], out)
    assert (out / "figures" / "phi_W_vs_A__fc_out.png").is_file()
    subspace_run.analyse_adapters(base_path, [adapter], out, modules=["encoder.fc_in"])
    assert not (out / "figures" / "phi_W_vs_A__fc_out.png").exists()
    assert _files(out) == _whole(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_foreign_out_folder_is_refused_and_left_alone(tmp_path):
    base_path, adapter, _ = _peft_adapter(tmp_path, rank=2, seed=0)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DigitlensError, match=r"--out .*mine: holds files that are not a subspace analysis") as info:
        subspace_run.analyse_adapters(base_path, [adapter], out)
    assert "\n" not in str(info.value)
    assert _files(out) == {"notes.txt"}


def test_leftovers_of_a_killed_analysis_outside_a_run_are_cleaned_or_put_back(tmp_path):
    base_path, adapter, _ = _peft_adapter(tmp_path, rank=2, seed=0)
    out = tmp_path / "out"
    subspace_run.analyse_adapters(base_path, [adapter], out, figures=False)
    before = _files(out)
    # Killed between staged_dir's two renames: the old output aside, a half-written new one beside it.
    shutil.move(out, tmp_path / ".out.k1x.old")
    (tmp_path / ".out.k2y.tmp").mkdir()
    (tmp_path / ".out.k2y.tmp" / "subspace.json").write_text("{")
    with pytest.raises(DigitlensError, match="--module 'nope'"):  # a failing analysis keeps the old output
        subspace_run.analyse_adapters(base_path, [adapter], out, modules=["nope"], figures=False)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    shutil.move(out, tmp_path / ".out.k3z.old")
    subspace_run.analyse_adapters(base_path, [adapter], out)  # a succeeding one replaces it
    assert _files(out) == _whole(out) and len(_files(out)) > len(before)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
