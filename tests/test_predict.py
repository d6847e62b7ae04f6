"""`digitlens predict`: a photo-like rendered digit (dark ink on light, noisy, off-centre, a large
canvas) is read right by a CNN trained briefly on MNIST; text and --json output; --explain and
--show-steps PNGs; a TorchScript file predicts like its run; bad images are one line, nothing written."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

from digitlens import data, preprocess
from digitlens.cli import app
from digitlens.errors import DigitlensError
from digitlens.inference import predict_proba
from digitlens.predict import predict_images

from training import ExpectsMnistNormalised, brief_mnist_run

pytestmark = [
    pytest.mark.mnist,
    pytest.mark.skipif(not os.environ.get("DIGITLENS_DATA"), reason="DIGITLENS_DATA is not set (MNIST .gz files)"),
]
FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
#: Digits rendered as photos; the brief model reads each with a wide margin.
DIGITS = (2, 3, 4, 5, 7, 8)


def photo_of_digit(path, digit: int, *, seed: int = 0):
    """A photo-like picture: ``digit`` in dark grey ink, 90 px tall, off-centre on a 240x180 light
    grey RGB page with Gaussian noise (sd 8 grey levels), saved with Pillow."""
    img = Image.new("L", (240, 180), 215)
    ImageDraw.Draw(img).text((140, 40), str(digit), fill=40, font=ImageFont.truetype(str(FONT), 90))
    arr = np.asarray(img, dtype=np.float64) + np.random.default_rng(seed).normal(0, 8, (180, 240))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB").save(path)
    return path


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches on a shared machine (see training.py)
    yield brief_mnist_run(tmp_path_factory.getbasetemp() / "brief-mnist-cnn")  # shared with test_userdata
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    return [photo_of_digit(folder / f"digit_{d}.png", d, seed=d) for d in DIGITS]


@pytest.mark.slow
def test_a_photo_like_digit_is_read_right_by_a_briefly_trained_cnn(mnist_run, photos):
    run_dir, model = mnist_run
    results = predict_images(run_dir, photos)
    assert [r["prediction"] for r in results] == list(DIGITS)
    for path, r in zip(photos, results):
        assert r["file"] == str(path) and r["preprocessing"] == "inverted"
        # the probabilities are the model's on to_mnist's input (an independent call of each)
        expected = predict_proba(model, preprocess.to_mnist(path).unsqueeze(0))[0]
        np.testing.assert_allclose(r["probabilities"], expected, rtol=1e-5, atol=1e-7)  # batch of 6 vs 1
        assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert [d for d, _ in r["top"]] == np.argsort(-expected, kind="stable")[:3].tolist()
        assert r["top"][0][1] > 0.5


@pytest.mark.slow
def test_an_mnist_png_is_predicted_exactly_as_the_idx_pixels(mnist_run, tmp_path):
    run_dir, model = mnist_run
    test = data.load_mnist_split(data.locate_mnist(download=False), "test")
    path = tmp_path / "mnist_0.png"
    Image.fromarray(np.round(test.images[0, 0].numpy() * 255).astype(np.uint8)).save(path)
    (result,) = predict_images(run_dir, [path])
    assert result["preprocessing"] == "passthrough"
    assert result["probabilities"] == [float(v) for v in predict_proba(model, test.images[:1])[0]]


@pytest.mark.slow
def test_cli_prints_the_top_three_and_json_lines(mnist_run, photos):
    run_dir, _ = mnist_run
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(run_dir), *map(str, photos[:2])])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2
    for line, path, digit in zip(lines, photos, DIGITS):
        assert line.startswith(f"{path}: {digit} (") and line.count("%)") == 3
    result = runner.invoke(app, ["predict", str(run_dir), *map(str, photos), "--json"])
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [o["prediction"] for o in objects] == list(DIGITS)
    for o, path in zip(objects, photos):
        assert set(o) == {"file", "prediction", "probabilities"} and o["file"] == str(path)
        assert len(o["probabilities"]) == 10 and int(np.argmax(o["probabilities"])) == o["prediction"]


@pytest.mark.slow
def test_cli_explain_and_show_steps_write_a_png_per_image(mnist_run, photos, tmp_path):
    run_dir, _ = mnist_run
    out = tmp_path / "figures"
    result = CliRunner().invoke(app, ["predict", str(run_dir), *map(str, photos[:2]), "--explain", "saliency",
                                      "--show-steps", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.output.strip().splitlines()]
    for o, path in zip(objects, photos):
        assert o["steps"] == str(out / f"{path.stem}_steps.png")
        assert o["explanation"] == str(out / f"{path.stem}_saliency.png")
        for png in (o["steps"], o["explanation"]):
            with Image.open(png) as img:
                assert img.format == "PNG" and img.width > 3 * img.height > 600
    pngs = sorted(f"{p.stem}_{kind}.png" for p in photos[:2] for kind in ("steps", "saliency"))
    assert sorted(p.name for p in out.iterdir()) == sorted(pngs + ["figures.json"])
    # the figure manifest lists each PNG with what it shows
    manifest = json.loads((out / "figures.json").read_text())
    assert manifest["stage"] == "predict"
    entries = {e["path"]: e for e in manifest["figures"]}
    assert sorted(entries) == pngs
    for p in photos[:2]:
        steps, overlay = entries[f"{p.stem}_steps.png"], entries[f"{p.stem}_saliency.png"]
        assert (steps["kind"], steps["section"], steps["image"]) == ("prediction_steps", "predict", p.name)
        assert (overlay["kind"], overlay["method"], overlay["image"]) == ("prediction_map", "saliency", p.name)
        assert overlay["title"].startswith(f"{p.name}: predicted ")


@pytest.mark.slow
def test_two_images_with_the_same_name_get_two_figures(mnist_run, photos, tmp_path):
    run_dir, _ = mnist_run
    other = tmp_path / "elsewhere"
    other.mkdir()
    twin = photo_of_digit(other / photos[0].name, DIGITS[1])
    results = predict_images(run_dir, [photos[0], twin], show_steps=True, out_dir=tmp_path / "out")
    assert [Path(r["steps"]).name for r in results] == [f"{twin.stem}_steps.png", f"{twin.stem}-2_steps.png"]


@pytest.mark.slow
def test_a_torchscript_file_predicts_like_its_run(mnist_run, photos, tmp_path):
    run_dir, model = mnist_run
    script = tmp_path / "cnn.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(model).save(str(script))
    from_file = predict_images(script, photos[:3], explain="saliency", out_dir=tmp_path / "file", trust_code=True)
    from_run = predict_images(run_dir, photos[:3], explain="saliency", out_dir=tmp_path / "run")
    for a, b in zip(from_file, from_run):
        assert a["prediction"] == b["prediction"]
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=1e-5, atol=1e-7)
        assert Path(a["explanation"]).is_file() and Path(a["explanation"]).parent == tmp_path / "file"


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(mnist_run, photos, tmp_path):
    run_dir, _ = mnist_run
    runner = CliRunner()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    cases = [
        ([str(run_dir), str(photos[0]), str(broken), "--show-steps", "--out", str(out)], f"{broken}: not a readable image"),
        ([str(run_dir), str(tmp_path / "missing.png"), "--show-steps", "--out", str(out)], "missing.png: file not found"),
        ([str(run_dir), str(photos[0]), "--explain", "magic", "--out", str(out)], "--explain 'magic'"),
        ([str(run_dir), str(photos[0]), "--explain", "attention", "--out", str(out)], "needs a transformer"),
        ([str(tmp_path / "no_run"), str(photos[0])], "no_run: no such run folder or model file"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["predict", *args])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (message, lines)
        assert not out.exists()
    with pytest.raises(DigitlensError, match="no image files"):
        predict_images(run_dir, [])


@pytest.mark.slow
def test_an_onnx_file_and_a_normalising_model_predict_like_the_run(mnist_run, photos, tmp_path):
    """`predict` reads model files through the bring-your-own-model loader: an ONNX export predicts
    like its run (forward-only: occlusion works, saliency is one line), and a TorchScript model that
    expects MNIST-normalised input predicts like the run only with --normalize."""
    from test_external import _export_onnx

    from digitlens.explain.methods import prepare_model

    run_dir, model = mnist_run
    onnx_file = tmp_path / "cnn.onnx"
    _export_onnx(prepare_model(model), onnx_file, torch.zeros(2, 1, 28, 28))
    from_onnx = predict_images(onnx_file, photos[:3], explain="occlusion", out_dir=tmp_path / "onnx")
    from_run = predict_images(run_dir, photos[:3])
    for a, b in zip(from_onnx, from_run):
        assert a["prediction"] == b["prediction"]
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=1e-4, atol=1e-5)
        assert Path(a["explanation"]).is_file()
    result = CliRunner().invoke(app, ["predict", str(onnx_file), str(photos[0]), "--explain", "saliency"])
    assert result.exit_code == 2 and "needs a PyTorch model" in result.output and "Traceback" not in result.output

    script = tmp_path / "normalised.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(ExpectsMnistNormalised(prepare_model(model))).save(str(script))
    declared = predict_images(script, photos[:3], preprocessing={"normalize": (0.1307, 0.3081)}, trust_code=True)
    undeclared = predict_images(script, photos[:3], trust_code=True)
    for a, b, c in zip(declared, undeclared, from_run):
        np.testing.assert_allclose(a["probabilities"], c["probabilities"], rtol=1e-4, atol=1e-5)
        assert not np.allclose(b["probabilities"], c["probabilities"], rtol=1e-3, atol=1e-4)
    result = CliRunner().invoke(app, ["predict", str(run_dir), str(photos[0]), "--normalize", "0.1307,0.3081"])
    assert result.exit_code == 2 and "digitlens run normalises its own inputs" in result.output
