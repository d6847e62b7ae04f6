"""What digitlens refuses to trust: TorchScript files (code) without --trust-code, and --out folders
that hold another stage's results (issue #14, items 1 and 4)."""

from __future__ import annotations

import warnings

import pytest
import torch
from typer.testing import CliRunner

from digitlens import runio
from digitlens.cli import app
from digitlens.errors import DigitlensError
from digitlens.external import is_torchscript_archive, load_user_model


def _script(path, module=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module or torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))).save(str(path))
    return path


def _one_line_error(args) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.slow
def test_torchscript_is_not_loaded_without_trust(tmp_path, monkeypatch):
    """Without --trust-code torch.jit.load is never called (nothing of the file runs); with it, it is."""
    script = _script(tmp_path / "model.pt")
    assert is_torchscript_archive(script)
    calls = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    line = _one_line_error(["evaluate", "--model-file", str(script), "--dataset", "digits", "--out", str(tmp_path / "o")])
    assert "model.pt" in line and "--trust-code" in line and ".onnx" in line
    assert calls == [] and not (tmp_path / "o").exists()
    with pytest.raises(DigitlensError, match="trust_code=True"):
        load_user_model(script)
    assert calls == []
    result = CliRunner().invoke(app, ["evaluate", "--model-file", str(script), "--dataset", "digits",
                                      "--out", str(tmp_path / "o"), "--no-progress", "--trust-code"])
    assert result.exit_code == 0, result.output
    assert len(calls) >= 1


def test_a_state_dict_is_not_a_torchscript_archive(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(torch.nn.Linear(784, 10).state_dict(), path)
    assert not is_torchscript_archive(path)
    line = _one_line_error(["evaluate", "--model-file", str(path), "--dataset", "digits", "--out", str(tmp_path / "o")])
    assert "weights.pth" in line and "state dict" in line and "torch.jit.save" in line


@pytest.mark.slow
def test_a_trusted_folder_vouches_for_its_file_until_the_file_changes(tmp_path):
    script = _script(tmp_path / "model.pt")
    out = tmp_path / "byo"
    result = CliRunner().invoke(app, ["evaluate", "--model-file", str(script), "--dataset", "digits", "--out", str(out),
                                      "--no-progress", "--trust-code", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    assert runio.read_json(out / "config.json")["trusted_sha256"]
    assert load_user_model(out).format == "torchscript"  # the recorded hash still matches: no flag needed
    _script(script, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)))  # other bytes, same name
    with pytest.raises(DigitlensError, match="refused"):
        load_user_model(out)


@pytest.mark.slow
def test_another_model_never_overwrites_a_runs_results_or_a_foreign_folder(tmp_path):
    from digitlens.train import train

    run = tmp_path / "run"
    train(run, dataset="digits", epochs=1, progress=False)
    onnx_free = _script(tmp_path / "other.pt")
    line = _one_line_error(["evaluate", str(run), "--model-file", str(onnx_free), "--trust-code"])
    assert "--out" in line and str(run) in line
    assert not (run / "metrics.json").exists()
    # a training run (or any folder with other files) is not an --out for a model's evaluation
    line = _one_line_error(["evaluate", "--model-file", str(onnx_free), "--trust-code", "--dataset", "digits",
                            "--out", str(run)])
    assert "not empty" in line and not (run / "metrics.json").exists()
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    _one_line_error(["evaluate", "--model-file", str(onnx_free), "--trust-code", "--dataset", "digits",
                     "--out", str(stray)])
    # with its own --out the other model is evaluated on the run's test split, beside the run
    own = tmp_path / "other_on_run"
    result = CliRunner().invoke(app, ["evaluate", str(run), "--model-file", str(onnx_free), "--trust-code",
                                      "--out", str(own), "--no-progress", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    assert (own / "metrics.json").is_file() and runio.read_json(own / "config.json")["model_file"]
    assert not (run / "metrics.json").exists()
    # and the same --out can be evaluated again (its own earlier output)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--model-file", str(onnx_free), "--trust-code",
                                      "--out", str(own), "--no-progress", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
