"""Kill tests (issue 14): SIGKILL `train`, `explain`, `adapt` and `report` at seeded random moments;
afterwards every stage either resumes (or restarts) or refuses in one line, and no later stage
reads a mix of an old and a new output. Each test starts real `digitlens` processes (a torch
import each, a few seconds), so each kills only two or three times."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from digitlens.cli import app

pytestmark = pytest.mark.slow  # 20-60 s each: whole processes started and killed


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch):
    monkeypatch.setenv("DIGITLENS_FIGURE_WORKERS", "0")


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback instead of one line: {result.exception!r}")
    return result.exit_code, result.output


def start(*args) -> subprocess.Popen:
    """``python -m digitlens ARGS`` in its own process group (so its workers die with it)."""
    env = dict(os.environ, DIGITLENS_FIGURE_WORKERS="0")
    return subprocess.Popen([sys.executable, "-m", "digitlens", *map(str, args)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def kill_after(proc: subprocess.Popen, seconds: float) -> int | None:
    """SIGKILL ``proc``'s group after ``seconds`` unless it ended first; its exit code, or None if killed."""
    try:
        code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert code in (None, 0), stderr[-2000:]
    return code


def timed(*args) -> float:
    """Seconds ``python -m digitlens ARGS`` takes to finish (it must succeed)."""
    tic = time.monotonic()
    proc = start(*args)
    assert kill_after(proc, 300) == 0
    return time.monotonic() - tic


TRAIN = ("--epochs", 3, "--seed", 3, "--width", 4, "--width", 8, "--width", 8, "--batch-size", 64, "--threads", 1,
         "--no-progress")


def test_train_killed_anywhere_resumes_to_the_uninterrupted_weights(tmp_path):
    rng = np.random.default_rng(14)
    whole = tmp_path / "whole"
    duration = timed("train", "--out", whole, *TRAIN)
    reference = load_file(str(whole / "model.safetensors"))
    for k, fraction in enumerate(rng.uniform(0.2, 1.0, size=3)):
        out = tmp_path / f"killed{k}"
        kill_after(start("train", "--out", out, *TRAIN), duration * fraction)
        code, output = cli("train", "--out", out, "--resume", "--no-progress")
        if code == 2:  # killed before config.json: nothing to resume, and a fresh start works
            assert output.startswith("error: --resume") and "no run to resume" in output, output
            assert not (out / "config.json").exists()
            code, output = cli("train", "--out", out, *TRAIN)
        assert code == 0, output
        weights = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(weights[key], reference[key]) for key in reference), f"kill {k} at {fraction:.2f}"
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _explain_files(explain: Path) -> set[str]:
    return {p.relative_to(explain).as_posix() for p in explain.rglob("*") if p.is_file()}


def test_explain_killed_anywhere_leaves_the_old_or_the_new_output_whole(tmp_path):
    rng = np.random.default_rng(5)
    run = tmp_path / "run"
    assert cli("train", "--out", run, "--epochs", 1, "--no-progress")[0] == 0
    explain = run / "explain"
    # The output of an earlier `explain --methods saliency` (only what the check below needs):
    (explain / "figures").mkdir(parents=True)
    np.savez(explain / "maps_saliency.npz", maps=np.zeros((10, 7, 7)))
    from PIL import Image

    Image.new("L", (4, 4)).save(explain / "figures" / "per_digit_saliency.png")
    (explain / "manifest.json").write_text(json.dumps({"methods": ["saliency"]}))
    old = _explain_files(explain)
    args = ("explain", run, "--methods", "input_x_gradient", "--group-by", "predicted", "--faithfulness-size", 0,
            "--no-progress")
    for delay in rng.uniform(2.0, 12.0, size=2):
        kill_after(start(*args), delay)
        files = _explain_files(explain)
        if files != old:  # then the new output, whole: every file its manifest names, nothing else
            manifest = json.loads((explain / "manifest.json").read_text())
            assert manifest["methods"] == ["input_x_gradient"]
            listed = {*(f for f in manifest["files"]["maps"].values()),
                      *(f"figures/{f}" for f in manifest["files"]["figures"])}
            assert listed <= files and not any("saliency" in f for f in files), files
            old = files
        code, output = cli("report", run)  # the next writer cleans what the killed one left
        assert code == 0, output
        assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]


def test_adapt_killed_anywhere_leaves_no_half_study_and_runs_again(tmp_path):
    from test_adapt import write_tiny_vit_run

    rng = np.random.default_rng(7)
    run = tmp_path / "tiny_vit"
    run.mkdir()
    write_tiny_vit_run(run)
    args = ("adapt", run, "--ranks", "2,4", "--seeds", "0", "--epochs", 1, "--n-train", 256, "--n-test", 200,
            "--no-subspace", "--no-progress")
    for delay in rng.uniform(2.0, 10.0, size=2):
        kill_after(start(*args), delay)
        task = run / "adapt" / "groups"
        if task.exists():  # only ever a whole study: results.json and every adapter it lists
            results = json.loads((task / "results.json").read_text())
            assert all((run / row["adapter_dir"]).is_dir() for row in results["rows"] if row["adapter_dir"])
    code, output = cli(*args)
    assert code == 0, output
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert sorted(p.name for p in (run / "adapt" / "groups").iterdir() if p.is_dir()) == [
        "figures", "full_s0", "r2_s0", "r4_s0"]


def test_report_killed_anywhere_leaves_no_half_page(tmp_path):
    rng = np.random.default_rng(3)
    run = tmp_path / "run"
    assert cli("train", "--out", run, "--epochs", 1, "--no-progress")[0] == 0
    for delay in rng.uniform(1.0, 6.0, size=2):
        kill_after(start("report", run), delay)
        page = run / "report.html"
        assert not page.exists() or page.read_text().rstrip().endswith("</html>")
    assert cli("report", run)[0] == 0
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
