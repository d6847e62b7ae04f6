"""Bring your own model: declared preprocessing, checked outputs, TorchScript and ONNX files.

The issue's example, reproduced: the PyTorch-examples MNIST CNN (it expects normalised pixels and
returns log-probabilities) saved as TorchScript and exported to ONNX must get from digitlens
exactly the accuracy of its own evaluation loop once ``--normalize 0.1307,0.3081`` is given, and
another accuracy without it. A scikit-learn classifier converted by skl2onnx must get
scikit-learn's own probabilities.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from digitlens import data, runio
from digitlens.errors import DigitlensError
from digitlens.evaluate import evaluate_model, evaluate_run
from digitlens.external import Preprocessing, detect_outputs, load_user_model

MEAN, STD = 0.1307, 0.3081  # what the PyTorch example normalises with (torchvision's Normalize)


class ExampleNet(nn.Module):
    """The PyTorch-examples MNIST CNN (pytorch/examples, mnist/main.py), as users copy it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def _export_onnx(model: nn.Module, path, example: torch.Tensor, output_name: str = "output") -> None:
    """torch.onnx.export with a dynamic batch axis; the legacy (TorchScript-based) exporter, since
    the dynamo one needs onnxscript."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                          output_names=[output_name],
                          dynamic_axes={"input": {0: "batch"}, output_name: {0: "batch"}})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The example CNN trained briefly on digits as its script does (Adadelta lr 1.0, normalised
    inputs, NLL of log_softmax), saved as ref.pt (TorchScript) and ref.onnx; with its own test loop."""
    splits = data.load_splits("digits", val_fraction=0)
    torch.manual_seed(0)
    model = ExampleNet()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    x, y = splits.train.images, splits.train.labels
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 32: one thread is faster, and far faster on a busy machine
    try:
        for _ in range(100):
            idx = torch.randint(0, len(y), (32,))
            loss = F.nll_loss(model((x[idx] - MEAN) / STD), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    # The example's own test loop: normalise, forward, argmax, count.
    test = splits.test
    with torch.no_grad():
        own_log_probs = model((test.images - MEAN) / STD)
    own_accuracy = (own_log_probs.argmax(1) == test.labels).sum().item() / len(test)
    folder = tmp_path_factory.mktemp("ref")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(model).save(str(folder / "ref.pt"))
    _export_onnx(model, folder / "ref.onnx", torch.zeros(1, 1, 28, 28), "log_probs")
    return {"model": model, "pt": folder / "ref.pt", "onnx": folder / "ref.onnx", "test": test,
            "own_accuracy": own_accuracy, "own_log_probs": own_log_probs}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt", "onnx"])
def test_declared_normalisation_gives_the_models_own_accuracy(reference, fmt):
    own = reference["own_accuracy"]
    assert own > 0.9  # trained, not chance
    declared = evaluate_model(reference[fmt], "digits", preprocessing=Preprocessing(normalize=(MEAN, STD)),
                              progress=False, bootstrap=0, trust_code=fmt == "pt")
    assert declared["accuracy"] == own  # to the last digit
    user = declared["source"]["user_model"]
    assert (user["format"], user["layout"], user["outputs"], user["outputs_detected"]) == \
        ("torchscript" if fmt == "pt" else "onnx", "nchw", "log_probs", True)
    # The issue: without the flag the same file is silently fed unnormalised pixels.
    plain = evaluate_model(reference[fmt], "digits", progress=False, bootstrap=0, trust_code=fmt == "pt")
    assert plain["accuracy"] != own
    assert declared["ece"] < plain["ece"] / 3  # the "under-confident" ECE was an artefact too
    assert plain["source"]["user_model"]["preprocessing"]["normalize"] is None


@pytest.mark.slow
def test_onnx_predictions_equal_pytorch(reference):
    images = reference["test"].images
    onnx = load_user_model(reference["onnx"], Preprocessing(normalize=(MEAN, STD)))
    logits = onnx.predict_logits(images)
    torch_logits = reference["own_log_probs"]
    assert torch.equal(logits.argmax(1), torch_logits.argmax(1))
    assert (logits - torch_logits).abs().max().item() < 1e-4
    assert not onnx.is_differentiable
    assert load_user_model(reference["pt"], trust_code=True).is_differentiable


@pytest.mark.slow
def test_cli_records_the_flags_and_later_stages_reuse_them(reference, tmp_path, monkeypatch):
    import digitlens.evaluate
    from digitlens.cli import app

    monkeypatch.setattr(digitlens.evaluate, "write_figures", lambda *a, **k: [])  # figures: test_evaluate
    out = tmp_path / "onnx_eval"
    result = CliRunner().invoke(app, ["evaluate", "--model-file", str(reference["onnx"]), "--dataset", "digits",
                                      "--normalize", f"{MEAN},{STD}", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "outputs log_probs (detected)" in result.output
    config = runio.read_json(out / "config.json")
    assert config["model_file"] == str(reference["onnx"].resolve())
    assert config["preprocessing"] == {"input_scale": 1, "normalize": [MEAN, STD], "outputs": "auto", "layout": "auto"}
    assert (config["layout"], config["outputs"]) == ("nchw", "log_probs")
    metrics = runio.read_json(out / "metrics.json")
    assert metrics["accuracy"] == reference["own_accuracy"]
    assert metrics["source"]["user_model"]["outputs"] == "log_probs"
    # A later stage on the folder reads the model and its flags from config.json.
    again = evaluate_run(out, progress=False, bootstrap=0)
    assert again["accuracy"] == reference["own_accuracy"]
    # A flag given again overrides only itself: declaring the outputs keeps the normalisation.
    declared = evaluate_run(out, progress=False, bootstrap=0, preprocessing={"outputs": "log_probs"})
    assert declared["accuracy"] == reference["own_accuracy"]
    config = runio.read_json(out / "config.json")
    assert config["preprocessing"]["normalize"] == [MEAN, STD] and config["outputs_detected"] is False
    # load_user_model on the folder (what `predict` calls) gives the recorded file with its flags.
    from_folder = load_user_model(out)
    assert from_folder.format == "onnx" and from_folder.preprocessing.normalize == (MEAN, STD)
    assert torch.equal(from_folder.predict_logits(reference["test"].images).argmax(1),
                       reference["own_log_probs"].argmax(1))


def test_output_detection_against_softmax_and_log_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 10, generator=gen) * 3
    assert detect_outputs(logits) == "logits"
    assert detect_outputs(torch.softmax(logits, 1)) == "probs"
    assert detect_outputs(torch.log_softmax(logits, 1)) == "log_probs"
    assert detect_outputs(torch.softmax(logits, 1) * 0.5) == "logits"  # in [0, 1] but rows sum to 0.5
    underflow = torch.log(torch.softmax(logits * 100, 1))  # log of probabilities that underflowed to 0: -inf
    assert torch.isinf(underflow).any() and detect_outputs(underflow) == "log_probs"
    assert detect_outputs(torch.full((2, 10), float("nan"))) == "logits"


@pytest.mark.parametrize("head", ["probs", "log_probs", "logits"])
def test_any_output_kind_gives_the_same_predictions_and_probabilities(head):
    """A module returning probabilities, log-probabilities or logits from (N, 784) pixels in [0, 255]
    gets, after detection, the softmax of its logits: the probabilities a plain loop computes."""
    torch.manual_seed(0)
    linear = nn.Linear(784, 10)

    class Flat255(nn.Module):
        def forward(self, x):  # x: (N, 784) in [0, 255], as Keras-style models take it
            z = linear(x / 255.0 * 4)
            return {"probs": torch.softmax, "log_probs": torch.log_softmax}.get(head, lambda t, dim: t)(z, dim=1)

    images = data.load_splits("digits", val_fraction=0).test.images
    expected = torch.softmax(linear(images.reshape(-1, 784) * 4), 1)
    user = load_user_model(Flat255(), Preprocessing(input_scale=255))
    proba = torch.softmax(user.predict_logits(images), 1)
    assert (user.layout, user.outputs) == ("flat", head)
    assert torch.allclose(proba, expected, atol=1e-6)


def test_declared_outputs_override_detection():
    user = load_user_model(nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Softmax(dim=1)),
                           Preprocessing(outputs="logits"))
    user.predict_logits(torch.zeros(4, 1, 28, 28))
    assert user.outputs == "logits" and not user.outputs_detected


@pytest.mark.slow
def test_scikit_learn_model_through_skl2onnx_equals_predict_proba(tmp_path):
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    splits = data.load_splits("digits", val_fraction=0)
    x_train = splits.train.images.reshape(len(splits.train), 784).numpy()
    with warnings.catch_warnings():  # 30 iterations (not converged) keep the test fast; any fit will do
        warnings.simplefilter("ignore")
        clf = LogisticRegression(max_iter=30).fit(x_train, splits.train.labels.numpy())
    path = tmp_path / "logreg.onnx"
    path.write_bytes(to_onnx(clf, x_train[:1], options={id(clf): {"zipmap": False}}).SerializeToString())
    test = splits.test
    x_test = test.images.reshape(len(test), 784).numpy()
    user = load_user_model(path)
    proba = torch.softmax(user.predict_logits(test.images), 1).numpy()
    assert (user.layout, user.outputs) == ("flat", "probs")  # label output skipped, probabilities picked
    np.testing.assert_allclose(proba, clf.predict_proba(x_test), atol=1e-5)
    summary = evaluate_model(path, "digits", progress=False, bootstrap=0)
    assert summary["accuracy"] == clf.score(x_test, test.labels.numpy())


# ---------------------------------------------------------------------------------------------
# Bad files and flags: one line naming the file
# ---------------------------------------------------------------------------------------------

def _cli_error(args) -> str:
    from digitlens.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.slow
def test_bad_model_files_give_one_line(tmp_path):
    not_onnx = tmp_path / "junk.onnx"
    not_onnx.write_bytes(b"this is not a protobuf")
    line = _cli_error(["evaluate", "--model-file", str(not_onnx), "--dataset", "digits", "--out", str(tmp_path / "a")])
    assert "junk.onnx" in line and "not a valid ONNX model" in line

    five = tmp_path / "five.onnx"
    _export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(784, 5)), five, torch.zeros(1, 1, 28, 28))
    line = _cli_error(["evaluate", "--model-file", str(five), "--dataset", "digits", "--out", str(tmp_path / "b")])
    assert "five.onnx" in line and "returns 5 scores per image" in line

    colour = tmp_path / "colour32.onnx"  # a CIFAR-sized model: (N, 3, 32, 32)
    _export_onnx(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)), colour,
                 torch.zeros(1, 3, 32, 32))
    line = _cli_error(["evaluate", "--model-file", str(colour), "--dataset", "digits", "--out", str(tmp_path / "c")])
    assert "colour32.onnx" in line and "(N, 1, 28, 28)" in line and "3, 32, 32" in line

    script = tmp_path / "wide.pt"  # TorchScript that takes (N, 1000): every layout tried fails
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(nn.Linear(1000, 10)).save(str(script))
    line = _cli_error(["evaluate", "--model-file", str(script), "--dataset", "digits", "--out", str(tmp_path / "d"),
                       "--trust-code"])
    assert "wide.pt" in line and "(N, 1, 28, 28) or (N, 784)" in line
    assert not (tmp_path / "d" / "metrics.json").exists()

    state_dict = tmp_path / "weights.pth"  # what many users save: never unpickled
    torch.save(nn.Linear(784, 10).state_dict(), state_dict)
    line = _cli_error(["evaluate", "--model-file", str(state_dict), "--dataset", "digits", "--out", str(tmp_path / "e")])
    assert "weights.pth" in line and "torch.jit.save" in line


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--normalize", "0.1307"], "--normalize"),
    (["--normalize", "0.1,0"], "positive STD"),
    (["--input-scale", "3"], "--input-scale 3"),
    (["--outputs", "softmax"], "--outputs 'softmax'"),
])
def test_bad_flags_give_one_line(reference, tmp_path, flags, message):
    line = _cli_error(["evaluate", "--model-file", str(reference["onnx"]), "--dataset", "digits",
                       "--out", str(tmp_path / "x"), *flags])
    assert message in line


@pytest.mark.slow
def test_flags_on_a_digitlens_run_are_refused(tmp_path):
    from digitlens import models

    run = tmp_path / "run"
    run.mkdir()
    runio.write_json(run / "config.json", {"dataset": "digits", "model": "mlp", "n_classes": 10})
    models.save_model(models.build_model("mlp"), run / "model.safetensors")
    with pytest.raises(DigitlensError, match="normalises its own inputs"):
        evaluate_run(run, progress=False, preprocessing={"normalize": (MEAN, STD)})


# ---------------------------------------------------------------------------------------------
# Explanations of a user's model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    """digitlens' own CNN trained briefly on digits, as an nn.Module and exported to ONNX."""
    from training import train_briefly

    from digitlens import models

    splits = data.load_splits("digits", val_fraction=0)
    torch.manual_seed(0)
    model = train_briefly(models.build_model("cnn"), splits.train.images, splits.train.labels, epochs=1)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    _export_onnx(model, path, torch.zeros(1, 1, 28, 28), "logits")
    return {"model": model, "onnx": path, "test": splits.test}


@pytest.mark.slow
def test_onnx_perturbation_maps_equal_pytorch_ones(small_cnn):
    """Occlusion, feature ablation and Shapley value sampling on the ONNX forward give the maps
    of the same methods on the PyTorch model; occlusion and feature ablation over 4x4 patches
    (two Captum implementations) agree with each other."""
    from digitlens.explain.run import explain_model

    test = small_cnn["test"]
    images, labels = test.images[:16], test.labels[:16].numpy()
    methods = ("occlusion", "feature_ablation", "shapley_value_sampling")
    onnx = explain_model(load_user_model(small_cnn["onnx"]), images, labels, methods=methods, faithfulness_size=0)
    torch_result = explain_model(small_cnn["model"], images, labels, methods=methods, faithfulness_size=0)
    for method in methods:
        np.testing.assert_allclose(onnx["pixel_maps"][method], torch_result["pixel_maps"][method], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(onnx["pixel_maps"]["occlusion"], onnx["pixel_maps"]["feature_ablation"], atol=1e-6)
    assert not np.allclose(onnx["pixel_maps"]["shapley_value_sampling"], onnx["pixel_maps"]["occlusion"])
    np.testing.assert_array_equal(onnx["y_pred"], torch_result["y_pred"])
    from digitlens.explain.methods import default_methods

    assert default_methods(load_user_model(small_cnn["onnx"]).prepare(images).torch_module()) == ("occlusion",)


@pytest.mark.slow
def test_torchscript_attributions_are_on_the_users_pixel_scale(reference):
    """Saliency of the TorchScript reference with --normalize is the gradient of its score with
    respect to the [0, 1] pixels (the normalisation is inside the explained function), computed
    here by autograd on the plain module."""
    from digitlens.explain.run import explain_model

    test = reference["test"]
    images, labels = test.images[:24], test.labels[:24]
    user = load_user_model(reference["pt"], Preprocessing(normalize=(MEAN, STD)), trust_code=True)
    result = explain_model(user, images, labels.numpy(), methods=("saliency",), faithfulness_size=0)
    x = images.clone().requires_grad_()
    scores = reference["model"]((x - MEAN) / STD)  # log-probabilities, used as logits
    (grad,) = torch.autograd.grad(scores[torch.arange(len(labels)), labels].sum(), x)
    expected = np.zeros((10, 28, 28))
    np.add.at(expected, labels.numpy(), grad.abs()[:, 0].double().numpy())
    expected /= np.maximum(np.bincount(labels.numpy(), minlength=10), 1)[:, None, None]
    np.testing.assert_allclose(result["pixel_maps"]["saliency"], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_cli_explains_and_reports_an_onnx_model(small_cnn, tmp_path, monkeypatch):
    import digitlens.evaluate
    from digitlens.cli import app

    monkeypatch.setattr(digitlens.evaluate, "FIGURE_FORMATS", ("png",))
    out = tmp_path / "onnx_run"
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--model-file", str(small_cnn["onnx"]), "--dataset", "digits",
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    line = _cli_error(["explain", str(out), "--methods", "saliency", "--no-progress"])
    assert line == ("error: saliency needs a PyTorch model; cnn.onnx is ONNX "
                    "(use occlusion, feature-ablation or shapley-value-sampling)")
    line = _cli_error(["explain", str(out), "--methods", "occlusion", "--normalize", "0.1,0.3", "--input-scale", "7"])
    assert "--input-scale 7" in line
    result = runner.invoke(app, ["explain", str(out), "--methods", "occlusion", "--faithfulness-size", "20",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    metrics = runio.read_json(out / "explain" / "explain_metrics.json")
    assert metrics["methods"] == ["occlusion"] and metrics["user_model"]["format"] == "onnx"
    assert "randomisation_note" in metrics["faithfulness"] and "random-logit" in metrics["verdict"]
    assert (out / "explain" / "figures" / "per_digit_occlusion.png").is_file()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    assert "cnn.onnx" in html and "onnx file, pixels in [0, 1], not normalised, layout nchw, outputs logits (detected)" in html
