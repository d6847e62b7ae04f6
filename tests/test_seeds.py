"""Several seeds: `train --seeds`, the group's summary over seeds and its report."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from digitlens.cli import app
from digitlens.errors import DigitlensError
from digitlens.runio import read_json
from digitlens.seeds import parse_seeds, summarise_group, train_seeds

FAST_ARGS = ["--dataset", "digits", "--epochs", "1", "--width", "4", "--width", "8", "--width", "8",
             "--batch-size", "64", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds") / "group"
    result = CliRunner().invoke(app, ["train", "--seeds", "0,1", "--out", str(out), *FAST_ARGS])
    assert result.exit_code == 0, result.output
    assert "group.json" in result.output
    return out


@pytest.mark.slow
def test_cli_trains_one_run_per_seed(group):
    info = read_json(group / "group.json")
    assert info["seeds"] == [0, 1] and info["runs"] == ["seed_0", "seed_1"]
    assert info["settings"]["dataset"] == "digits" and info["settings"]["epochs"] == 1
    assert "seed" not in info["settings"]
    for seed in (0, 1):
        assert read_json(group / f"seed_{seed}" / "config.json")["seed"] == seed
    a, b = (load_file(str(group / f"seed_{s}" / "model.safetensors")) for s in (0, 1))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_summary_mean_and_spread_equal_numpy(group):
    summary = summarise_group(group)  # evaluates the seed runs that have no metrics.json
    assert read_json(group / "group_summary.json")["metrics"] == summary["metrics"]
    accuracies = np.array([read_json(group / f"seed_{s}" / "metrics.json")["accuracy"] for s in (0, 1)])
    acc = summary["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(np.mean(accuracies), abs=1e-12)
    assert acc["std"] == pytest.approx(np.std(accuracies, ddof=1), abs=1e-12)
    assert (acc["min"], acc["max"]) == (accuracies.min(), accuracies.max())
    f1 = [read_json(group / f"seed_{s}" / "metrics.json")["macro"]["f1"] for s in (0, 1)]
    assert summary["metrics"]["macro_f1"]["mean"] == pytest.approx(np.mean(f1))
    assert "ece" in summary["metrics"]
    assert all(r["accuracy_ci"] for r in summary["runs"])
    assert summary["sentence"].startswith("Over 2 seeds the test accuracy is")
    assert "95% interval" in summary["sentence"]


@pytest.mark.slow
def test_report_of_the_group_holds_the_table(group):
    summarise_group(group)  # the seed runs are evaluated (the report itself evaluates nothing)
    result = CliRunner().invoke(app, ["report", str(group)])
    assert result.exit_code == 0, result.output
    page = (group / "report.html").read_text()
    summary = read_json(group / "group_summary.json")
    assert 'id="seeds"' in page and "<strong>Across seeds</strong>" in page
    assert "Standard deviation" in page and "Min – max" in page
    assert f"{summary['metrics']['accuracy']['mean'] * 100:.2f}%" in page
    for run in summary["runs"]:
        assert f"{run['accuracy'] * 100:.2f}%" in page
    assert 'id="overview"' in page  # the first seed's own report follows
    from digitlens.report.audit import bare_percentages

    assert bare_percentages(page) == []  # each run's accuracy with its interval; means and min-max: allow-listed


@pytest.mark.slow
def test_seed_with_seeds_is_refused_in_one_line(tmp_path):
    out = tmp_path / "g"
    result = CliRunner().invoke(app, ["train", "--seeds", "0,1", "--seed", "3", "--out", str(out), *FAST_ARGS])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--seeds" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_bad_seed_lists_and_resume(group, tmp_path):
    for text in ("", "0,x", "1,1"):
        with pytest.raises(DigitlensError):
            parse_seeds(text)
    with pytest.raises(DigitlensError, match="not empty"):
        train_seeds(group, [0, 1], dataset="digits", epochs=1, progress=False)
    with pytest.raises(DigitlensError, match="--seeds 0,1"):
        train_seeds(group, [0, 2], resume=True, progress=False)
    with pytest.raises(DigitlensError, match="no seed group"):
        train_seeds(tmp_path, [0], resume=True, progress=False)
    # Resuming a finished group leaves every finished seed run as it is.
    result = train_seeds(group, [0, 1], resume=True, progress=False)
    assert result["summaries"] == [None, None]


@pytest.mark.slow
def test_evaluate_on_a_group_evaluates_every_seed_and_prints_the_spread(group):
    result = CliRunner().invoke(app, ["evaluate", str(group), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = read_json(group / "group_summary.json")
    assert result.output.startswith(summary["sentence"])
    assert all((group / f"seed_{s}" / "metrics.json").is_file() for s in (0, 1))


@pytest.mark.slow
def test_the_report_of_a_group_evaluates_nothing(group, tmp_path):
    import shutil

    summarise_group(group)
    copy = tmp_path / "group"
    shutil.copytree(group, copy)
    (copy / "seed_1" / "metrics.json").unlink()
    result = CliRunner().invoke(app, ["report", str(copy)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {copy / 'seed_1'}: not evaluated (run `digitlens evaluate {copy / 'seed_1'}` first)"
    assert not (copy / "seed_1" / "metrics.json").exists()
