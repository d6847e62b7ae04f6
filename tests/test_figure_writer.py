"""The figure manifest: every figure a stage saves is on disk and listed in figures.json."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from digitlens.errors import DigitlensError  # noqa: E402
from digitlens.figure_writer import FigureWriter, read_figure_manifest  # noqa: E402


def _figure(title):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    ax.set_title(title)
    return fig


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_manifest_lists_every_saved_figure(tmp_path, monkeypatch, workers):
    monkeypatch.setenv("DIGITLENS_FIGURE_WORKERS", workers)
    with FigureWriter(tmp_path, "explain") as writer:
        for method in ("saliency", "integrated_gradients"):
            fig = _figure(f"Maps of {method}")
            writer.save(fig, f"figures/maps_{method}", kind="per_digit_maps", section="explanations", method=method)
            plt.close(fig)
    manifest = json.loads((tmp_path / "figures.json").read_text())
    assert manifest["stage"] == "explain"
    assert [e["method"] for e in manifest["figures"]] == ["saliency", "integrated_gradients"]
    assert manifest["figures"][1]["title"] == "Maps of integrated_gradients"
    for entry in manifest["figures"]:
        for rel in entry["files"]:
            assert (tmp_path / rel).stat().st_size > 0
    read = read_figure_manifest(tmp_path)
    assert [e["path"] for e in read] == [tmp_path / "figures/maps_saliency.png",
                                         tmp_path / "figures/maps_integrated_gradients.png"]


def test_no_manifest_when_the_stage_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with FigureWriter(tmp_path, "evaluate") as writer:
            writer.save(_figure("x"), "x", kind="k", section="s")
            raise RuntimeError("stage failed")
    assert not (tmp_path / "figures.json").exists()
    assert read_figure_manifest(tmp_path) == []


def test_bad_names_are_refused(tmp_path):
    writer = FigureWriter(tmp_path, "evaluate", workers=0)
    fig = _figure("x")
    for bad in ("../escape", "/abs/path", "with.png"):
        with pytest.raises(ValueError):
            writer.save(fig, bad, kind="k", section="s")
    writer.save(fig, "once", kind="k", section="s")
    with pytest.raises(ValueError, match="twice"):
        writer.save(fig, "once", kind="k", section="s")


def test_a_manifest_pointing_outside_its_folder_is_refused(tmp_path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "stage" / "figures.json").write_text(json.dumps(
        {"stage": "evaluate", "figures": [{"path": "../secret.png", "kind": "k", "section": "s"}]}))
    with pytest.raises(DigitlensError, match="outside its folder"):
        read_figure_manifest(tmp_path / "stage")
    (tmp_path / "stage" / "figures.json").write_text("[1, 2]")
    with pytest.raises(DigitlensError, match="not a figure manifest"):
        read_figure_manifest(tmp_path / "stage")
