"""``digitlens serve``'s API through Starlette's TestClient: predictions against the models run
directly, maps against Captum, the PNG path against ``digitlens predict``, browsing against
scikit-learn's confusion matrix, and every kind of bad input answered by a one-line 4xx."""

from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest
import torch
from serve_runs import small_runs
from training import ExpectsMnistNormalised

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from digitlens.errors import DigitlensError  # noqa: E402
from digitlens.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return small_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def client(runs):
    with TestClient(create_app(runs, max_body_bytes=200_000)) as client:
        yield client


@pytest.fixture(scope="module")
def test_split():
    from digitlens import data

    return data.load_splits("digits", val_fraction=0.1, seed=0).test


def stroke_png(tmp_path=None) -> bytes:
    """A 200x200 PNG of a thick vertical stroke, dark ink on white paper (a drawn 1)."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(image).line([(100, 30), (104, 170)], fill=0, width=14)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_health_and_runs(client, runs):
    from sklearn.metrics import confusion_matrix

    assert client.get("/api/health").json()["status"] == "ok"
    listing = client.get("/api/runs").json()["runs"]
    assert [r["id"] for r in listing] == ["cnn", "vit"]
    cnn, vit = listing
    assert "attention_rollout" in vit["methods"] and "attention_rollout" not in cnn["methods"]
    assert cnn["defaults"] == ["saliency", "integrated_gradients", "gradcam"]
    saved = np.load(runs[0] / "predictions.npz")
    assert cnn["confusion"] == confusion_matrix(saved["y_true"], saved["y_pred"], labels=range(10)).tolist()
    assert cnn["accuracy"] == pytest.approx(float((saved["y_true"] == saved["y_pred"]).mean()))
    assert cnn["accuracy"] > 0.8  # the CNN learned something; the untrained ViT is the contrast


@pytest.mark.slow
def test_predict_pixels_matches_the_models_and_captum(client, runs, test_split):
    from captum.attr import Saliency

    from digitlens import models

    # MNIST form already: passed through unchanged, read as 8-bit grey as an image file would be
    image = torch.round(test_split.images[7] * 255) / 255
    answer = client.post("/api/predict", json={"pixels": image.flatten().tolist(), "methods": ["saliency"]}).json()
    assert answer["preprocessing"] == "passthrough"
    np.testing.assert_allclose(answer["input"], image[0].numpy(), atol=1e-4)
    for result, run in zip(answer["models"], runs):
        model = models.load_model(run)
        with torch.no_grad():
            expected = torch.softmax(model(image[None]), dim=1)[0].numpy()
        np.testing.assert_allclose(result["probabilities"], expected, atol=1e-5)
        assert result["prediction"] == int(expected.argmax())
        oracle = Saliency(model).attribute(image[None].clone().requires_grad_(), target=int(expected.argmax()),
                                           abs=True).sum(dim=1)[0].numpy()
        np.testing.assert_allclose(result["maps"]["saliency"], oracle, atol=1e-4 * np.abs(oracle).max() + 1e-9, rtol=1e-3)


@pytest.mark.slow
def test_target_explains_another_class(client, test_split, runs):
    from captum.attr import Saliency

    from digitlens import models

    image = torch.round(test_split.images[3] * 255) / 255
    answer = client.post("/api/predict", json={"pixels": image.flatten().tolist(), "methods": "saliency",
                                               "target": 4, "steps": False}).json()
    assert "steps" not in answer
    model = models.load_model(runs[0])
    oracle = Saliency(model).attribute(image[None].clone().requires_grad_(), target=4, abs=True).sum(dim=1)[0].numpy()
    np.testing.assert_allclose(answer["models"][0]["maps"]["saliency"], oracle, atol=1e-4 * np.abs(oracle).max(), rtol=1e-3)


@pytest.mark.slow
def test_png_body_is_what_digitlens_predict_sees(client, runs, tmp_path):
    from digitlens.predict import predict_images
    from digitlens.preprocess import to_mnist

    png = stroke_png()
    (tmp_path / "one.png").write_bytes(png)
    answer = client.post("/api/predict?methods=default", content=png, headers={"Content-Type": "image/png"}).json()
    assert answer["preprocessing"] == "inverted"
    np.testing.assert_allclose(answer["input"], to_mnist(tmp_path / "one.png")[0].numpy(), atol=1e-4)
    for result, run in zip(answer["models"], runs):
        cli = predict_images(run, [tmp_path / "one.png"])[0]
        np.testing.assert_allclose(result["probabilities"], cli["probabilities"], atol=1e-5)
        assert result["prediction"] == cli["prediction"]
    cnn, vit = answer["models"]
    assert set(cnn["maps"]) == {"saliency", "integrated_gradients", "gradcam"}
    assert set(vit["maps"]) == {"saliency", "integrated_gradients", "attention_rollout"}
    assert all(np.asarray(m).shape == (28, 28) and np.isfinite(m).all() for r in (cnn, vit) for m in r["maps"].values())
    assert [s["title"].split(" ")[0] for s in answer["steps"]] == ["input,", "inverted", "ink", "fitted", "centred"]
    assert all(s["png"].startswith("data:image/png;base64,") for s in answer["steps"])


@pytest.mark.slow
def test_a_method_one_model_lacks_is_skipped_with_a_reason(client, test_split):
    image = test_split.images[0].flatten().tolist()
    cnn, vit = client.post("/api/predict", json={"pixels": image, "methods": "attention"}).json()["models"]
    assert cnn["maps"] == {} and "attention" in cnn["skipped"]
    assert np.asarray(vit["maps"]["attention"]).shape == (28, 28)


@pytest.mark.slow
def test_batched_answers_equal_single_answers(runs, test_split):
    from digitlens.serve.app import load_models, predict_batch

    served = load_models(runs)
    images = test_split.images[:5]
    methods = [("saliency",), (), ("default",), ("saliency", "gradcam"), ("integrated_gradients",)]
    batch = predict_batch(served, images, methods, [None, None, 2, None, None])
    for i in range(5):
        single = predict_batch(served, images[i:i + 1], [methods[i]], [2 if i == 2 else None])[0]
        for got, want in zip(batch[i], single):
            np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
            assert got["maps"].keys() == want["maps"].keys()
            for key in got["maps"]:
                np.testing.assert_allclose(got["maps"][key], want["maps"][key], rtol=1e-3,
                                           atol=1e-3 * np.abs(want["maps"][key]).max() + 1e-9)


@pytest.mark.slow
def test_cell_lists_the_pair_most_confident_first(client, runs):
    saved = np.load(runs[1] / "predictions.npz")  # the untrained ViT: plenty of mistakes
    confidence = saved["proba"][np.arange(len(saved["y_pred"])), saved["y_pred"]]
    true, pred = max(((t, p) for t in range(10) for p in range(10) if t != p),
                     key=lambda tp: ((saved["y_true"] == tp[0]) & (saved["y_pred"] == tp[1])).sum())
    expected = [i for i in np.argsort(-confidence, kind="stable") if saved["y_true"][i] == true and saved["y_pred"][i] == pred]
    answer = client.get(f"/api/runs/vit/cell?true={true}&pred={pred}&method=attention").json()
    assert answer["total"] == len(expected) >= 2
    assert [it["index"] for it in answer["items"]] == expected[:48]
    assert all(np.asarray(it["map"]).shape == (28, 28) for it in answer["items"])
    cut = float(np.median(confidence[expected]))
    filtered = client.get(f"/api/runs/vit/cell?true={true}&pred={pred}&min_confidence={cut}").json()
    assert [it["index"] for it in filtered["items"]] == [i for i in expected if confidence[i] >= cut][:48]


@pytest.mark.slow
def test_disagreements_and_one_image(client, runs, test_split):
    one, two = (np.load(r / "predictions.npz") for r in runs)
    answer = client.get("/api/disagreements?a=cnn&b=vit&limit=500").json()
    assert answer["total"] == int((one["y_pred"] != two["y_pred"]).sum())
    assert {it["index"] for it in answer["items"]} == set(np.flatnonzero(one["y_pred"] != two["y_pred"]).tolist())
    item = client.get("/api/runs/cnn/image/5").json()
    np.testing.assert_allclose(item["pixels"], test_split.images[5, 0].numpy(), atol=1e-3)
    assert item["true"] == int(test_split.labels[5])


@pytest.mark.slow
def test_run_files_are_served_only_from_inside_the_run(client, runs):
    assert client.get("/api/runs/cnn/files/metrics.json").json()["n_samples"] == 450


def error_of(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert message and "\n" not in message and "Traceback" not in message
    return message


GOOD = [0.0] * 784


@pytest.mark.slow
@pytest.mark.parametrize("body, content_type, status, words", [
    (b'{"pixels": [0.1, ', "application/json", 400, "malformed JSON"),
    (b'[1, 2, 3]', "application/json", 400, "JSON object"),
    (b'{"pix": []}', "application/json", 400, "missing"),
    (json.dumps({"pixels": [0.5] * 783}).encode(), "application/json", 400, "expected 784"),
    (json.dumps({"pixels": [0.5] * 785}).encode(), "application/json", 400, "expected 784"),
    (json.dumps({"pixels": "0.5"}).encode(), "application/json", 400, "list"),
    (b'{"pixels": [NaN' + b', 0' * 783 + b']}', "application/json", 400, "NaN"),
    (b'{"pixels": [Infinity' + b', 0' * 783 + b']}', "application/json", 400, "infinite"),
    (json.dumps({"pixels": [2.0] + GOOD[1:]}).encode(), "application/json", 400, "0..1"),
    (json.dumps({"pixels": ["a"] + GOOD[1:]}).encode(), "application/json", 400, "number"),
    (json.dumps({"pixels": [True] + GOOD[1:]}).encode(), "application/json", 400, "number"),
    (json.dumps({"pixels": GOOD, "width": 0}).encode(), "application/json", 400, "width"),
    (json.dumps({"pixels": GOOD, "methods": ["saliency", "telepathy"]}).encode(), "application/json", 400, "telepathy"),
    (json.dumps({"pixels": GOOD, "methods": 3}).encode(), "application/json", 400, "methods"),
    (json.dumps({"pixels": GOOD, "target": 10}).encode(), "application/json", 400, "target"),
    (json.dumps({"pixels": GOOD, "steps": "maybe"}).encode(), "application/json", 400, "steps"),
    (json.dumps({"pixels": GOOD}).encode(), "application/json", 422, "no ink"),
    (b"", "image/png", 400, "empty"),
    (b"hello, this is not an image", "image/png", 415, "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png", 415, "not a readable image"),
    (b"x" * 200_001, "image/png", 413, "limit"),
])
def test_bad_predict_input(client, body, content_type, status, words):
    message = error_of(client.post("/api/predict", content=body, headers={"Content-Type": content_type}), status)
    assert words in message
    assert client.get("/api/health").json()["status"] == "ok"  # and the server keeps serving


@pytest.mark.slow
def test_truncated_png_and_a_huge_declared_size(client):
    png = stroke_png()
    assert "not a readable image" in error_of(client.post("/api/predict", content=png[: len(png) // 2],
                                                          headers={"Content-Type": "image/png"}), 415)
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buffer, format="PNG")  # small file, 48 megapixels
    assert "pixels, more than" in error_of(client.post("/api/predict", content=buffer.getvalue(),
                                                    headers={"Content-Type": "image/png"}), 413)


@pytest.mark.slow
@pytest.mark.parametrize("url, status, words", [
    ("/api/runs/cnn/files/..%2F..%2Fserve-runs%2Fvit%2Fmetrics.json", 403, "outside the run folder"),
    ("/api/runs/cnn/files/%2Fetc%2Fhostname", 403, "outside the run folder"),
    ("/api/runs/cnn/files/model.safetensors", 403, "only"),
    ("/api/runs/cnn/files/figures/none.png", 404, "no such file"),
    ("/api/runs/nope/cell?true=1&pred=2", 404, "not served"),
    ("/api/runs/cnn/cell?true=x&pred=2", 400, "true"),
    ("/api/runs/cnn/cell?true=1", 400, "pred: missing"),
    ("/api/runs/cnn/cell?true=1&pred=11", 400, "pred"),
    ("/api/runs/cnn/cell?true=1&pred=2&min_confidence=nan", 400, "min_confidence"),
    ("/api/runs/cnn/cell?true=1&pred=2&method=telepathy", 400, "telepathy"),
    ("/api/runs/cnn/cell?true=1&pred=2&method=attention", 400, "no such maps"),
    ("/api/runs/cnn/image/100000", 404, "450 images"),
    ("/api/disagreements?a=cnn&b=cnn", 400, "both"),
    ("/api/nothing-here", 404, "not found"),
])
def test_bad_get_requests(client, url, status, words):
    assert words in error_of(client.get(url), status)


@pytest.mark.slow
def test_wrong_method_is_a_json_405(client):
    assert "not allowed" in error_of(client.get("/api/predict"), 405)


@pytest.mark.slow
def test_page_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas id=\"pad\"" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from elsewhere
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "fetch(`/api/predict" in script.text
    assert "https://" not in script.text and "https://" not in client.get("/static/style.css").text


@pytest.mark.slow
def test_load_errors_are_one_line(runs, tmp_path):
    with pytest.raises(DigitlensError, match="give at least one run"):
        create_app([])
    with pytest.raises(DigitlensError, match="run folder not found"):
        create_app([tmp_path / "missing"])
    with pytest.raises(DigitlensError, match="--model-file .*file not found"):
        create_app([], model_files=[tmp_path / "missing.pt"])


@pytest.mark.slow
def test_torchscript_model_file_is_served(runs, tmp_path, test_split):
    from digitlens import models

    model = models.load_model(runs[0])
    scripted = torch.jit.trace(model, test_split.images[:2])
    scripted.save(str(tmp_path / "cnn.pt"))
    with TestClient(create_app([runs[0]], model_files=[tmp_path / "cnn.pt"], load_options={"trust_code": True})) as client:
        listing = client.get("/api/runs").json()["runs"]
        assert [r["kind"] for r in listing] == ["run", "model_file"] and not listing[1]["browsable"]
        answer = client.post("/api/predict", json={"pixels": test_split.images[1].flatten().tolist(),
                                                   "methods": "saliency,gradcam"}).json()
        run_result, file_result = answer["models"]
        np.testing.assert_allclose(file_result["probabilities"], run_result["probabilities"], atol=1e-5)
        assert "saliency" in file_result["maps"] and "gradcam" in file_result["skipped"]


@pytest.mark.slow
def test_an_onnx_file_with_declared_normalisation_is_served_like_its_run(runs, tmp_path, test_split):
    """A user's ONNX model that expects MNIST-normalised input, served with its declared --normalize:
    the same probabilities as the run it was exported from; forward-only, so occlusion but no saliency."""
    import warnings

    from digitlens import models
    from digitlens.explain.methods import prepare_model

    onnx_file = tmp_path / "normalised.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ExpectsMnistNormalised(prepare_model(models.load_model(runs[0]))), (test_split.images[:2],),
                          str(onnx_file), dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    options = {"preprocessing": {"normalize": (0.1307, 0.3081)}}
    with TestClient(create_app([runs[0]], model_files=[onnx_file], load_options=options)) as client:
        answer = client.post("/api/predict", json={"pixels": test_split.images[3].flatten().tolist(),
                                                   "methods": "saliency,occlusion"}).json()
        run_result, file_result = answer["models"]
        np.testing.assert_allclose(file_result["probabilities"], run_result["probabilities"], atol=1e-5)
        assert "occlusion" in file_result["maps"] and "saliency" in file_result["skipped"]


@pytest.mark.slow
def test_cli_errors_are_one_line(runs):
    from typer.testing import CliRunner

    from digitlens.cli import app

    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2 and "error: serve: give at least one run" in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(runs[0]), "--port", str(port)])
    assert result.exit_code == 2 and f"error: --host 127.0.0.1 --port {port}: cannot listen there" in result.output


@pytest.mark.slow
def test_concurrent_requests_over_http_are_batched(runs, test_split):
    """Eight clients at once through uvicorn: every answer equals its single answer, and the
    requests were answered in fewer batches than requests."""
    import concurrent.futures

    import httpx

    from digitlens.serve.app import background_server

    app = create_app(runs)
    bodies = [{"pixels": test_split.images[i].flatten().tolist(), "methods": ["saliency"], "steps": False} for i in range(16)]
    with background_server(app, timeout=30) as url, httpx.Client(base_url=url, timeout=30) as http:
        single = [http.post("/api/predict", json=b).json() for b in bodies[:4]]
        before = http.get("/api/health").json()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{url}/api/predict", json=b, timeout=30), bodies))
        after = http.get("/api/health").json()
    assert all(a.status_code == 200 for a in answers)
    for got, want in zip(answers, single):
        np.testing.assert_allclose(got.json()["models"][0]["probabilities"], want["models"][0]["probabilities"], atol=1e-6)
    assert after["requests"] - before["requests"] == 16
    assert after["batches"] - before["batches"] < 16


@pytest.mark.slow
def test_disagreements_of_one_digit(client, runs):
    one, two = (np.load(r / "predictions.npz") for r in runs)
    answer = client.get("/api/disagreements?digit=3&limit=500").json()
    expected = np.flatnonzero((one["y_pred"] != two["y_pred"]) & (one["y_true"] == 3))
    assert answer["total"] == len(expected) and sorted(it["index"] for it in answer["items"]) == expected.tolist()


@pytest.mark.slow
def test_an_internal_error_is_a_one_line_500_and_the_server_goes_on(runs, monkeypatch, test_split):
    from digitlens.serve import app as serve_app

    client = TestClient(create_app(runs[:1]), raise_server_exceptions=False)
    body = {"pixels": test_split.images[0].flatten().tolist()}
    with monkeypatch.context() as patch:
        patch.setattr(serve_app, "predict_batch", lambda *a: (_ for _ in ()).throw(RuntimeError("boom\nsecond line")))
        assert error_of(client.post("/api/predict", json=body), 500) == "internal error: boom"
    assert client.post("/api/predict", json=body).status_code == 200


@pytest.mark.slow
def test_ctrl_c_stops_the_server_cleanly(runs):
    """``digitlens serve`` in a subprocess answers, and SIGINT ends it with status 0, no traceback."""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "digitlens", "serve", str(runs[0]), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start within 60 s"
            time.sleep(0.1)
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, err
    assert "Traceback" not in err and f"http://127.0.0.1:{port}/" in out


@pytest.mark.slow
def test_serve_gives_the_caller_its_thread_count_back(runs):
    """serve(threads=N) sets torch's threads for the server only: after it ends (here: a busy port)
    the caller's count is back."""
    from digitlens.serve import serve

    before = torch.get_num_threads()
    threads = 1 if before != 1 else 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(DigitlensError, match="cannot listen there"):
            serve([runs[0]], port=busy.getsockname()[1], threads=threads)
    assert torch.get_num_threads() == before
