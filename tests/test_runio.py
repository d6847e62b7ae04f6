import json
import os
import stat

import numpy as np
import pytest

from digitlens.errors import DigitlensError
from digitlens.runio import atomic_path, read_json, read_npz, write_json, write_npz


def test_write_json_round_trip_and_mode(tmp_path):
    path = write_json(tmp_path / "a.json", {"x": np.float32(0.5), "y": np.arange(3)})
    assert read_json(path) == {"x": 0.5, "y": [0, 1, 2]}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = write_json(tmp_path / "a.json", {"old": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_bad_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(DigitlensError, match="bad.json: not valid JSON"):
        read_json(bad)
    with pytest.raises(DigitlensError, match="missing.npz: file not found"):
        read_npz(tmp_path / "missing.npz")
    arrays = read_npz(write_npz(tmp_path / "ok.npz", a=np.eye(2)))
    np.testing.assert_array_equal(arrays["a"], np.eye(2))


@pytest.mark.slow
def test_figure_writer_draws_in_workers_same_bytes_as_in_process(tmp_path, monkeypatch):
    from digitlens.figure_writer import FigureWriter
    from digitlens.plots.heatmaps import PerDigitMapsDisplay
    from digitlens.pyplot import pyplot

    plt = pyplot()
    maps = np.random.default_rng(0).random((10, 7, 7))
    fig = PerDigitMapsDisplay(maps=maps).plot().figure_
    with FigureWriter(tmp_path / "here", "explain", workers=0) as writer:
        writer.save(fig, "maps", kind="heatmap", section="explanations")
    plt.close(fig)
    with FigureWriter(tmp_path / "worker", "explain", workers=2) as writer:
        fig = PerDigitMapsDisplay(maps=maps).plot().figure_
        paths = writer.save(fig, "maps", kind="heatmap", section="explanations")
        plt.close(fig)  # closing at once is fine: the worker has its own copy
    assert [p.name for p in paths] == ["maps.png", "maps.svg"]
    assert (tmp_path / "worker" / "maps.png").read_bytes() == (tmp_path / "here" / "maps.png").read_bytes()
    assert (tmp_path / "worker" / "maps.svg").stat().st_size > 1000
    assert not list(tmp_path.rglob(".*.tmp"))


def test_figure_writer_reports_a_worker_error_after_the_block(tmp_path, monkeypatch):
    from digitlens.figure_writer import FigureWriter
    from digitlens.pyplot import pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    with pytest.raises(ValueError, match="Format 'nope' is not supported"):
        with FigureWriter(tmp_path, "evaluate", workers=2) as good:
            good.save(fig, "good", kind="k", section="s")
            bad = FigureWriter(tmp_path, "evaluate", workers=2, formats=("nope",))
            bad.save(fig, "bad", kind="k", section="s")
            bad.wait()
    plt.close(fig)
    assert (tmp_path / "good.png").is_file() and not (tmp_path / "bad.nope").exists()
    assert not (tmp_path / "figures.json").exists()  # a failed stage lists nothing
    monkeypatch.setenv("DIGITLENS_FIGURE_WORKERS", "x")
    with pytest.raises(DigitlensError, match="DIGITLENS_FIGURE_WORKERS='x'"):
        FigureWriter(tmp_path, "evaluate")
